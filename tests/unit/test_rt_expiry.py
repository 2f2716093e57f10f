"""Queue expiry: late firm requests are dropped (FinishReason.DEADLINE) and their KV freed at once."""
from rtserve.client.output_processor import OutputProcessor
from rtserve.client.rt_report import RTTracker
from rtserve.config import CacheConfig, EngineConfig, RTConfig, SchedulerConfig
from rtserve.engine.core import EngineCore
from rtserve.protocol import EngineCoreOutput, EngineCoreRequest, FinishReason, RTParams
from rtserve.sampling_params import SamplingParams
from tests.unit.conftest import TINY
from rtserve.engine.scheduler_output import RunnerOutput
from tests.unit.rt_helpers import FakeClock, make_sched, rt_req, step


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
