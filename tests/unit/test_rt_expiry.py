"""Firm deadlines: a firm request whose next token can no longer be on time (TTFT, ITL or deadline_ms) is
dropped (FinishReason.DEADLINE) and its KV freed at once; a firm token sampled late is never delivered."""
import pytest

from rtserve.client.output_processor import OutputProcessor
from rtserve.client.rt_report import RTTracker
from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig
from rtserve.engine import firm_deadlines
from rtserve.engine.core import EngineCore
from rtserve.protocol import EngineCoreOutput, EngineCoreRequest, FinishReason, RTParams
from rtserve.sampling_params import SamplingParams
from tests.unit.conftest import TINY
from rtserve.engine.scheduler_output import RunnerOutput
from tests.unit.rt_helpers import FakeClock, ids, make_sched, rt_req, step


def test_firm_request_whose_ttft_passes_while_queued_is_dropped():
    sched, kv, clock, _ = make_sched(max_seqs=1)
    sched.add_request(rt_req("busy", 8, clock.now, max_tokens=100, ttft_s=0.05))  # earlier deadline
    sched.add_request(rt_req("firm", 8, clock.now, "firm", ttft_s=0.2))
    sched.add_request(rt_req("soft", 8, clock.now, ttft_s=0.2))
    step(sched, clock, 0.1)
    assert sched.expire() == []
    clock.advance(0.15)
    outs = sched.expire()
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outs] == [("firm", "deadline", [])]
    assert "ttft budget of 200 ms passed while queued" in outs[0].error
    assert "firm" not in sched.requests and [r.request_id for r in sched.waiting] == ["soft"]
    assert sched.expire() == []  # soft requests are never dropped


def test_firm_request_late_mid_prefill_is_dropped_and_its_blocks_freed():
    sched, kv, clock, _ = make_sched(budget=64)
    sched.add_request(rt_req("firm", 300, clock.now, "firm", ttft_s=0.05))
    step(sched, clock, 0.03)
    assert kv.num_free_blocks < 256
    clock.advance(0.03)
    outs = sched.expire()
    assert outs[0].finish_reason == FinishReason.DEADLINE and "while prefilling" in outs[0].error
    assert kv.num_free_blocks == 256 and not sched.has_unfinished


def test_firm_stream_past_its_deadline_stops_with_finish_reason_deadline():
    sched, kv, clock, _ = make_sched()
    sched.add_request(rt_req("firm", 8, clock.now, "firm", max_tokens=100, ttft_s=0.5, deadline_s=0.1))
    for _ in range(5):
        step(sched, clock, 0.01)
        assert sched.expire() == []
    clock.advance(0.1)
    outs = sched.expire()
    assert outs[0].finish_reason == "deadline" and "deadline_ms budget of 100 ms" in outs[0].error
    assert "after 5 tokens" in outs[0].error
    assert kv.num_free_blocks == 256 and not sched.has_unfinished


def test_fcfs_never_expires():
    sched, _, clock, _ = make_sched("fcfs", max_seqs=1)
    sched.add_request(rt_req("busy", 8, clock.now))
    sched.add_request(rt_req("firm", 8, clock.now, "firm", ttft_s=0.01))
    step(sched, clock, 1.0)
    assert sched.expire() == []


def test_engine_core_expires_on_the_tiny_model(tiny_weights):
    cfg = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=1, max_model_len=512),
                       rt=RTConfig(policy="deadline"))
    core = EngineCore(cfg, TINY, tiny_weights)
    clock = FakeClock(50.0)
    core.scheduler.clock = clock
    core.add_request(EngineCoreRequest("busy", [1, 2, 3], SamplingParams(temperature=0, max_tokens=20), 50.0,
                                       rt=RTParams("soft", ttft_s=0.05)))
    core.add_request(EngineCoreRequest("firm", [4, 5, 6], SamplingParams(temperature=0, max_tokens=5), 50.0,
                                       rt=RTParams("firm", ttft_s=0.1)))
    core.step()
    clock.advance(0.2)
    outs = core.expire_requests()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("firm", "deadline")]
    assert core.stats().num_waiting == 0
    core.abort_requests(["busy"])
    assert core.kv.num_free_blocks == 64
    snap = core.stats().queue
    assert snap.policy == "deadline" and snap.num_requests_added == 2


def test_deadline_drop_reaches_the_caller_as_finish_reason_deadline_with_its_rt_report():
    class Tok:
        special_token_ids = frozenset()

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(96 + i) for i in ids)

        def convert_ids_to_tokens(self, ids):
            return [chr(96 + i) for i in ids]

    proc = OutputProcessor(Tok())
    proc.add_request("r", [1, 2], SamplingParams(max_tokens=10))
    err = "deadline: ttft budget of 200 ms passed while queued (250 ms since arrival); dropped"
    delta, _ = proc.process(EngineCoreOutput("r", [], finish_reason="deadline", error=err))
    assert delta.finished and delta.finish_reason == "deadline" and delta.error == err
    tracker = RTTracker(RTParams("firm", 0.2, 0.05, None), arrival_s=0.0)
    report = tracker.finish(0.25, delta.finish_reason)
    assert report.dropped and report.missed == ["ttft"] and not report.met
    assert report.to_wire()["deadline_met"] is False and report.to_wire()["budget"]["ttft_ms"] == 200.0


def test_core_loop_pause_message_stops_and_resumes_scheduling(tiny_weights):
    from rtserve.engine.core_loop import _handle
    from rtserve.protocol import EngineCorePause
    cfg = EngineConfig(cache=CacheConfig(block_size=4, num_blocks=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=512))
    core = EngineCore(cfg, TINY, tiny_weights)
    core.add_request(EngineCoreRequest("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=20), 0.0))
    core.step()
    assert _handle(core, EngineCorePause(["a"], paused=True)) == []
    assert core.step().outputs == [] and core.stats().num_scheduled_tokens == 0
    _handle(core, EngineCorePause(["a"], paused=False))
    assert [o.request_id for o in core.step().outputs] == ["a"]


def test_firm_first_token_ready_after_its_deadline_is_never_delivered():
    sched, kv, clock, _ = make_sched()
    sched.add_request(rt_req("firm", 8, clock.now, "firm", ttft_s=0.05))
    sched.add_request(rt_req("soft", 8, clock.now, ttft_s=0.05))
    out = sched.schedule()
    clock.advance(0.08)  # the step ran past the firm TTFT deadline
    outs = sched.update(out, RunnerOutput({"firm": 7, "soft": 7}))
    got = {o.request_id: (o.new_token_ids, o.finish_reason) for o in outs}
    assert got["firm"] == ([], "deadline") and got["soft"] == ([7], None)
    assert "firm" not in sched.requests and kv.block_ids("firm") == []


def test_firm_that_cannot_make_its_ttft_even_with_the_shortest_step_is_dropped_early():
    sched, _, clock, _ = make_sched(max_seqs=1)  # smallest step: 10 ms + 0.1 ms
    sched.add_request(rt_req("busy", 8, clock.now, ttft_s=0.001))
    sched.add_request(rt_req("firm", 8, clock.now, "firm", ttft_s=0.1))
    step(sched, clock, 0.095)  # 5 ms of budget left: less than any step
    assert [o.request_id for o in sched.expire()] == ["firm"]


def test_firm_stream_whose_next_token_cannot_be_on_time_is_dropped_not_served_late():
    sched, kv, clock, _ = make_sched()
    sched.add_request(rt_req("firm", 8, clock.now, "firm", max_tokens=100, ttft_s=0.5, itl_s=0.05))
    sched.add_request(rt_req("soft", 8, clock.now, max_tokens=100, ttft_s=0.5, itl_s=0.05, first_token=100))
    for _ in range(3):
        step(sched, clock, 0.01)
        assert sched.expire() == []
    clock.advance(0.038)  # 12 ms left of its 50 ms budget; the shortest step (one decode) takes 11 ms
    assert sched.expire() == []
    clock.advance(0.002)  # 10 ms left: its 4th token can no longer be on time
    outs = sched.expire()
    assert [(o.request_id, o.finish_reason, o.new_token_ids) for o in outs] == [("firm", "deadline", [])]
    assert "itl budget of 50 ms cannot be met for token 4 (40 ms since token 3); stopped" in outs[0].error
    assert kv.block_ids("firm") == [] and "firm" not in sched.requests
    clock.advance(1.0)
    assert sched.expire() == [] and "soft" in sched.requests  # a late soft stream is never dropped


def test_firm_token_sampled_after_its_itl_deadline_is_never_delivered():
    sched, kv, clock, _ = make_sched()
    sched.add_request(rt_req("firm", 8, clock.now, "firm", max_tokens=100, ttft_s=0.5, itl_s=0.05))
    sched.add_request(rt_req("soft", 8, clock.now, max_tokens=100, ttft_s=0.5, itl_s=0.05, first_token=100))
    step(sched, clock, 0.01)
    out = sched.schedule()
    clock.advance(0.06)  # the step ran 10 ms past both streams' ITL deadline
    outs = {o.request_id: o for o in sched.update(out, RunnerOutput({"firm": 7, "soft": 7}))}
    assert (outs["firm"].new_token_ids, outs["firm"].finish_reason) == ([], "deadline")
    assert "itl budget of 50 ms was missed for token 2 (60 ms since token 1)" in outs["firm"].error
    assert (outs["soft"].new_token_ids, outs["soft"].finish_reason) == ([7], None)
    assert kv.block_ids("firm") == [] and sched.requests["soft"].num_output_tokens == 2


def test_firm_stream_is_stopped_as_soon_as_its_deadline_ms_cannot_be_met():
    sched, kv, clock, _ = make_sched()
    sched.add_request(rt_req("firm", 8, clock.now, "firm", max_tokens=100, ttft_s=0.5, itl_s=1.0,
                             deadline_s=0.1))
    for _ in range(5):
        step(sched, clock, 0.01)
    clock.advance(0.04)  # 10 ms before its deadline, less than one decode step (11 ms)
    outs = sched.expire()
    assert outs[0].finish_reason == "deadline"
    assert "deadline_ms budget of 100 ms cannot be met after 5 tokens" in outs[0].error


def test_fcfs_delivers_late_firm_tokens():
    sched, _, clock, _ = make_sched("fcfs")
    sched.add_request(rt_req("firm", 8, clock.now, "firm", max_tokens=100, ttft_s=0.5, itl_s=0.05))
    step(sched, clock, 0.01)
    clock.advance(1.0)
    assert sched.expire() == []
    assert ids(step(sched, clock, 0.5)) == [("firm", 1)] and sched.requests["firm"].num_output_tokens == 2


def test_a_stream_dropped_for_its_itl_or_its_deadline_reports_that_budget_missed():
    itl_drop = RTTracker(RTParams("firm", 0.3, 0.05, 2.0), arrival_s=0.0)
    itl_drop.on_tokens(1, 0.1)
    itl_drop.on_tokens(1, 0.14)
    report = itl_drop.finish(0.2, "deadline", error="deadline: itl budget of 50 ms cannot be met for token 3")
    assert report.dropped and report.missed == ["itl"] and report.num_itl_misses == 0
    no_deadline = RTTracker(RTParams("firm", 0.3, 0.05, None), arrival_s=0.0)
    no_deadline.on_tokens(1, 0.1)
    assert no_deadline.finish(0.2, "deadline").missed == ["itl"]
    deadline_drop = RTTracker(RTParams("firm", 0.3, 0.05, 0.5), arrival_s=0.0)
    deadline_drop.on_tokens(1, 0.1)
    report = deadline_drop.finish(0.45, "deadline", error="deadline: deadline_ms budget of 500 ms cannot be met")
    assert report.missed == ["deadline"] and not report.met


def test_firm_deadlines_are_earlier_by_the_delivery_margin_and_only_firm_ones(tiny_weights):
    cfg = EngineConfig(cache=CacheConfig(num_blocks=64, block_size=4), rt=RTConfig(firm_delivery_margin_s=0.004))
    core = EngineCore(cfg, TINY, tiny_weights)
    for rid, cls in (("f", "firm"), ("s", "soft")):
        core.add_request(EngineCoreRequest(rid, [1, 2, 3], SamplingParams(max_tokens=4), 10.0,
                                           rt=RTParams(cls, ttft_s=0.5, itl_s=0.05, deadline_s=2.0)))
    firm, soft = core.scheduler.requests["f"], core.scheduler.requests["s"]
    assert firm.deadline_margin_s == 0.004 and soft.deadline_margin_s == 0.0
    assert firm.ttft_deadline == pytest.approx(10.496) and soft.ttft_deadline == pytest.approx(10.5)
    assert firm.deadline == pytest.approx(11.996)
    firm.last_token_time = firm.first_token_time = 10.2
    assert firm.next_token_deadline == firm.itl_deadline == pytest.approx(10.246)
    # A token sampled 48 ms after the last one is on time by the budget, not once it has travelled.
    assert firm_deadlines.late_token_reason(firm, 10.248) is not None
    assert firm_deadlines.late_token_reason(firm, 10.245) is None
