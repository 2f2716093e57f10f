"""Admission control: TTFT prediction from a queue snapshot, firm refusal with Retry-After, bounded
queues, and the engine client raising AdmissionRejected before its first yield; slow-reader pausing."""
import asyncio
import time

import pytest

from rtserve.client.async_llm import AdmissionRejected, AsyncLLM
from rtserve.config import EngineConfig, RTConfig
from rtserve.engine.admission import PendingRequest, decide, order_key, predict_ttft_s
from rtserve.engine.rt_params import BACKGROUND, LATE, ON_TIME
from rtserve.protocol import (EngineCoreAbort, EngineCoreOutput, EngineCoreOutputs, EngineCorePause,
                              EngineCoreRequest, EngineStats, QueueSnapshot, RTParams)
from rtserve.sampling_params import SamplingParams
from tests.unit.rt_helpers import FAKE_COEFFS

FIRM = RTParams("firm", ttft_s=0.3, itl_s=0.05)
SOFT = RTParams("soft", ttft_s=0.3, itl_s=0.05)


def on_time(key: float) -> tuple[int, float]:
    return ON_TIME, key


def snapshot(waiting=(), policy="deadline", calibrated=True, **kw) -> QueueSnapshot:
    """`waiting` as (deadline, num_tokens): every entry on time."""
    kw.setdefault("prefill_token_budget", 100)
    kw.setdefault("num_free_slots", 64 - kw.get("num_running", 0))
    kw.setdefault("num_requests_added", 0)
    return QueueSnapshot(timestamp=0.0, policy=policy, waiting=[(on_time(k), n) for k, n in waiting],
                         cost_coeffs=FAKE_COEFFS, cost_calibrated=calibrated, **kw)


def test_predicted_ttft_counts_prefill_work_ahead_in_policy_order():
    # 10 ms + 0.1 ms/token per step; 100 prefill tokens per step.
    snap = snapshot([(1.0, 300), (5.0, 1000)])
    assert predict_ttft_s(snap, [], key=on_time(2.0), num_prompt_tokens=100) == pytest.approx(4 * 0.020)
    assert predict_ttft_s(snap, [], key=on_time(9.0), num_prompt_tokens=100) == pytest.approx(14 * 0.020)
    pending = [PendingRequest(1, on_time(1.5), 200)]
    assert predict_ttft_s(snap, pending, key=on_time(2.0), num_prompt_tokens=100) == pytest.approx(6 * 0.020)
    # Running decodes make each step dearer; running prefills ranked before it are ahead of it.
    snap = snapshot([], num_decodes=10, num_running=10, running_prefills=[(on_time(0.5), 100)])
    assert predict_ttft_s(snap, [], key=on_time(1.0), num_prompt_tokens=100) == pytest.approx(2 * 0.030)


def test_predicted_ttft_counts_the_prefill_attention_of_long_prompts_ahead():
    snap = snapshot([(1.0, 2000)])
    snap.cost_coeffs = FAKE_COEFFS + (0.5,)  # 0.5 s per million query-key pairs
    without = 21 * 0.020  # 2,100 tokens at 100 per 20 ms step
    pairs = 2000 * 2001 // 2 + 100 * 101 // 2
    assert predict_ttft_s(snap, [], key=on_time(2.0), num_prompt_tokens=100) == pytest.approx(without + 0.5 * pairs / 1e6)


def test_late_and_background_work_is_not_ahead_of_an_on_time_request():
    # A late soft prompt and a batch prompt, waiting and running: the deadline policy serves them after it.
    snap = snapshot([], num_decodes=10, num_running=10)
    snap.waiting = [((LATE, 0.5), 1000), ((BACKGROUND, 0.1), 2000)]
    snap.running_prefills = [((BACKGROUND, 0.0), 2000)]
    assert predict_ttft_s(snap, [], key=on_time(1.0), num_prompt_tokens=100) == pytest.approx(0.030)
    assert order_key("deadline", FIRM, 1.0, RTConfig()) == (ON_TIME, 1.3)
    assert order_key("deadline", RTParams("batch"), 1.0, RTConfig()) == (BACKGROUND, 1.0)
    assert order_key("fcfs", FIRM, 1.0, RTConfig()) == (ON_TIME, 1.0)


def test_the_rest_of_the_step_in_flight_and_the_model_error_count():
    snap = snapshot([(1.0, 100)], step_s=0.040)
    snap.timestamp = 10.0
    # Prefill: 2 steps of 20 ms, after the 30 ms left of the step in flight since the snapshot.
    assert predict_ttft_s(snap, [], on_time(2.0), 100, 0.0, now=10.010) == pytest.approx(0.070)
    assert predict_ttft_s(snap, [], on_time(2.0), 100, 0.0, now=10.100) == pytest.approx(0.040)
    snap.cost_mean_rel_error = 0.1  # a model that errs by 10% on average: its waits are padded by 20%
    assert predict_ttft_s(snap, [], on_time(2.0), 100, 0.0, now=10.100) == pytest.approx(0.048)


def test_waiting_for_a_sequence_slot_is_predicted_from_running_remaining_tokens():
    snap = snapshot([], num_free_slots=0, num_running=2, num_decodes=2, running_remaining_tokens=[5, 40])
    # A slot frees after 5 decode steps of 12 ms each; the prefill itself is one 20 ms step.
    assert predict_ttft_s(snap, [], key=on_time(0.0), num_prompt_tokens=100) == pytest.approx(5 * 0.012)
    # Over the deadline policy's ITL cap by one: the second stream to finish frees the slot.
    snap.num_free_slots = -1
    assert predict_ttft_s(snap, [], key=on_time(0.0), num_prompt_tokens=100) == pytest.approx(40 * 0.012)


def test_firm_is_refused_with_retry_after_the_excess_soft_is_admitted():
    cfg = RTConfig()
    snap = snapshot([(0.0, 2000)])  # 21 steps of 20 ms ahead: 420 ms > 300 ms
    d = decide(cfg, snap, [], FIRM, arrival_s=1.0, num_prompt_tokens=100, now=1.0)
    assert not d.admitted and d.reason == "ttft"
    assert d.predicted_ttft_s == pytest.approx(0.42)
    assert d.retry_after_s == pytest.approx(0.12 + cfg.firm_delivery_margin_s)
    assert "ttft_ms budget of 300 ms" in d.message
    assert decide(cfg, snap, [], SOFT, 1.0, 100, 1.0).admitted
    assert decide(cfg, snapshot([(0.0, 1000)]), [], FIRM, 1.0, 100, 1.0).admitted  # 220 ms fits
    # Time already spent since arrival counts.
    assert not decide(cfg, snapshot([(0.0, 1000)]), [], FIRM, 1.0, 100, now=1.1).admitted
    firm_deadline = RTParams("firm", ttft_s=1.0, itl_s=0.05, deadline_s=0.2)
    assert decide(cfg, snapshot([(0.0, 1000)]), [], firm_deadline, 1.0, 100, 1.0).reason == "deadline"


def test_no_prediction_under_fcfs_or_before_calibration():
    cfg = RTConfig()
    big = [(0.0, 20000)]
    assert decide(cfg, snapshot(big, policy="fcfs"), [], FIRM, 1.0, 100, 1.0).admitted
    assert decide(cfg, snapshot(big, calibrated=False), [], FIRM, 1.0, 100, 1.0).admitted
    assert decide(cfg, None, [], FIRM, 1.0, 100, 1.0).admitted


def test_bounded_queue_refuses_every_class():
    cfg = RTConfig(max_num_waiting=3, max_waiting_tokens=1000)
    full = snapshot([(0.0, 10)] * 3)
    for rt in (FIRM, SOFT, RTParams("batch")):
        d = decide(cfg, full, [], rt, 1.0, 10, 1.0)
        assert not d.admitted and d.reason == "queue_full" and d.retry_after_s > 0
    assert not decide(cfg, snapshot([(0.0, 950)]), [], SOFT, 1.0, 100, 1.0).admitted  # tokens bound
    assert not decide(cfg, snapshot([(0.0, 10)] * 2), [PendingRequest(1, on_time(0.0), 10)], SOFT, 1.0, 10,
                      1.0).admitted


def test_decision_takes_well_under_10_ms_with_a_full_queue():
    cfg = RTConfig()
    snap = snapshot([(float(i), 200) for i in range(255)], running_remaining_tokens=list(range(64)),
                    num_running=64, num_decodes=64)
    pending = [PendingRequest(i, on_time(float(i)), 100) for i in range(50)]
    start = time.perf_counter()
    for _ in range(100):
        decide(cfg, snap, pending, FIRM, 100.0, 500, 100.0)
    assert (time.perf_counter() - start) / 100 < 0.010


class FakeTokenizer:
    special_token_ids = frozenset()
    vocab_size = 1000
    bos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i % 26) for i in ids)


class RecordingTransport:
    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


def client(**rt_kw) -> AsyncLLM:
    llm = AsyncLLM(EngineConfig(rt=RTConfig(**rt_kw)), tokenizer=FakeTokenizer())
    llm.max_model_len = 512
    llm._transport = RecordingTransport()
    llm._loop = asyncio.get_running_loop()
    return llm


async def test_generate_raises_admission_rejected_before_sending_or_yielding():
    llm = client()
    llm.stats = EngineStats(queue=snapshot([(0.0, 5000)]))
    gen = llm.generate([1, 2, 3], SamplingParams(max_tokens=4), "r1", rt=FIRM)
    with pytest.raises(AdmissionRejected) as exc:
        await gen.__anext__()
    assert exc.value.retry_after_s > 0 and exc.value.reason == "ttft" and exc.value.rt_class == "firm"
    assert llm._transport.sent == [] and "r1" not in llm._queues
    with pytest.raises(ValueError, match="garbage collector"):
        await llm.generate([1, 2], SamplingParams(), "r2", rt=RTParams("hard")).__anext__()


async def test_admitted_request_counts_as_pending_until_a_snapshot_reflects_it():
    llm = client(max_num_waiting=2)
    llm.stats = EngineStats(queue=snapshot([(0.0, 10)]))
    gen = llm.generate([1, 2], SamplingParams(max_tokens=2), "a", rt=SOFT)
    task = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    sent = llm._transport.sent[0]
    assert isinstance(sent, EngineCoreRequest) and sent.rt.rt_class == "soft" and sent.rt.ttft_s == 0.3
    assert not llm.admit(SOFT, time.monotonic(), 2).admitted  # 1 waiting + 1 pending = bound
    llm.stats = EngineStats(queue=snapshot([], num_requests_added=1))
    assert llm.admit(SOFT, time.monotonic(), 2).admitted
    task.cancel()


async def test_final_delta_carries_the_rt_report():
    llm = client()
    gen = llm.generate([1, 2], SamplingParams(max_tokens=2), "a", rt=FIRM)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    llm._on_outputs(EngineCoreOutputs([EngineCoreOutput("a", [5], num_prompt_tokens=2)], 0.0))
    assert (await first).rt is None
    llm._on_outputs(EngineCoreOutputs([EngineCoreOutput("a", [6], finish_reason="length",
                                                        num_preemptions=1)], 0.0))
    last = await gen.__anext__()
    assert last.finished and last.rt.rt_class == "firm" and last.rt.num_tokens == 2
    assert last.rt.ttft_s is not None and last.rt.num_preemptions == 1 and last.rt.met
    wire = last.rt.to_wire()
    assert set(wire) >= {"class", "ttft_ms", "itl_ms", "deadline_met", "missed"}


async def test_slow_reader_is_paused_then_aborted_with_a_bounded_buffer():
    llm = client(max_buffered_outputs=4, slow_reader_timeout_s=0.05)
    gen = llm.generate([1, 2], SamplingParams(max_tokens=100), "slow", rt=SOFT)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    for i in range(6):  # the consumer does not read
        llm._on_outputs(EngineCoreOutputs([EngineCoreOutput("slow", [5 + i])], 0.0))
    await first  # took the first item; 5 remain buffered
    pauses = [m for m in llm._transport.sent if isinstance(m, EngineCorePause)]
    assert len(pauses) == 1 and pauses[0].paused and pauses[0].request_ids == ["slow"]
    await asyncio.sleep(0.1)  # slow_reader_timeout_s passes
    assert any(isinstance(m, EngineCoreAbort) and m.request_ids == ["slow"] for m in llm._transport.sent)
    llm._on_outputs(EngineCoreOutputs([EngineCoreOutput("slow", [9])], 0.0))  # late output: dropped
    items = [item async for item in gen]
    assert len(items) == 6 and items[-1].finished and "slow reader" in items[-1].error
    assert llm._queues == {} and llm._paused == {}


async def test_reader_that_catches_up_is_resumed():
    llm = client(max_buffered_outputs=4, slow_reader_timeout_s=5.0)
    gen = llm.generate([1, 2], SamplingParams(max_tokens=100), "r", rt=SOFT)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0)
    for i in range(5):
        llm._on_outputs(EngineCoreOutputs([EngineCoreOutput("r", [5 + i])], 0.0))
    await first
    for _ in range(3):
        await gen.__anext__()
    pauses = [m.paused for m in llm._transport.sent if isinstance(m, EngineCorePause)]
    assert pauses == [True, False] and llm._paused == {}
    await gen.aclose()


def test_a_firm_request_counts_preemptible_work_as_free_slots():
    # Running set full (8 soft streams, 200 tokens left each): a soft arrival waits for one to finish;
    # a firm one takes a soft stream's slot by preemption, so only its prefill step counts.
    snap = snapshot([], num_free_slots=0, num_running=8, num_decodes=8, num_preemptible=8,
                    running_remaining_tokens=[200] * 8)
    assert predict_ttft_s(snap, [], on_time(0.0), 100) == pytest.approx(200 * 0.018)
    assert predict_ttft_s(snap, [], on_time(0.0), 100, can_preempt=True) == pytest.approx(0.028)
    assert decide(RTConfig(), snap, [], FIRM, 0.0, 100, 0.0).admitted


def test_firm_ttft_must_fit_its_budget_less_the_delivery_margin():
    snap = snapshot([(0.0, 1400)])  # 14 steps of 20 ms + its own: 300 ms of a 302 ms budget
    firm = RTParams("firm", ttft_s=0.302, itl_s=0.05)
    assert decide(RTConfig(firm_delivery_margin_s=0.0), snap, [], firm, 1.0, 100, 1.0).admitted
    d = decide(RTConfig(firm_delivery_margin_s=0.005), snap, [], firm, 1.0, 100, 1.0)
    assert not d.admitted and d.reason == "ttft" and d.predicted_ttft_s == pytest.approx(0.300)


def test_soft_is_refused_only_with_reject_and_only_beyond_the_bound():
    snap = snapshot([(0.0, 2000)])  # 21 steps of 20 ms ahead: 420 ms, 120 ms past a 300 ms budget
    reject = RTConfig(soft_overload="reject", soft_overload_bound_s=0.05)
    d = decide(reject, snap, [], SOFT, 1.0, 100, 1.0)
    assert not d.admitted and d.reason == "ttft" and d.predicted_ttft_s == pytest.approx(0.42)
    assert d.retry_after_s == pytest.approx(0.07)  # the excess over the bound
    assert "soft request refused" in d.message and "bound of 50 ms" in d.message
    assert decide(RTConfig(soft_overload="reject", soft_overload_bound_s=0.2), snap, [], SOFT, 1.0, 100, 1.0).admitted
    assert decide(RTConfig(), snap, [], SOFT, 1.0, 100, 1.0).admitted  # serve-late (default)
    assert decide(RTConfig(soft_overload="serve-late", soft_overload_bound_s=0.0), snap, [], SOFT, 1.0, 100,
                  1.0).admitted
    # The default bound (1 s): 1,020 ms predicted is 720 ms late; 1,420 ms is 1,120 ms late.
    assert decide(RTConfig(soft_overload="reject"), snapshot([(0.0, 5000)]), [], SOFT, 1.0, 100, 1.0).admitted
    d = decide(RTConfig(soft_overload="reject"), snapshot([(0.0, 7000)]), [], SOFT, 1.0, 100, 1.0)
    assert not d.admitted and d.retry_after_s == pytest.approx(0.12)
    # Time already spent since arrival counts.
    assert not decide(RTConfig(soft_overload="reject"), snapshot([(0.0, 5000)]), [], SOFT, 1.0, 100, now=1.5).admitted


def test_soft_reject_waits_for_a_slot_without_preempting_and_clamps_retry_after():
    # One running stream with 100,000 tokens left (11 ms decode steps): a soft arrival waits for it
    # (1,100 s); a firm one would preempt it.
    snap = snapshot([], num_free_slots=0, num_running=1, num_decodes=1, num_preemptible=1,
                    running_remaining_tokens=[100_000])
    d = decide(RTConfig(soft_overload="reject"), snap, [], SOFT, 0.0, 100, 0.0)
    assert not d.admitted and d.retry_after_s == 60.0
    assert decide(RTConfig(soft_overload="reject"), snap, [], FIRM, 0.0, 100, 0.0).admitted


def test_soft_reject_never_refuses_batch_and_leaves_firm_unchanged():
    reject = RTConfig(soft_overload="reject", soft_overload_bound_s=0.0)
    snap = snapshot([(0.0, 20000)])
    for batch in (RTParams("batch"), RTParams("batch", ttft_s=0.3)):
        assert decide(reject, snap, [], batch, 1.0, 100, 1.0).admitted
    for firm_snap in (snap, snapshot([(0.0, 1000)])):
        assert decide(reject, firm_snap, [], FIRM, 1.0, 100, 1.0) == decide(RTConfig(), firm_snap, [], FIRM, 1.0,
                                                                             100, 1.0)
    # Like firm admission: no prediction under fcfs or before the cost model is calibrated.
    assert decide(reject, snapshot([(0.0, 20000)], policy="fcfs"), [], SOFT, 1.0, 100, 1.0).admitted
    assert decide(reject, snapshot([(0.0, 20000)], calibrated=False), [], SOFT, 1.0, 100, 1.0).admitted


def test_soft_overload_config_is_validated():
    with pytest.raises(ValueError, match="soft_overload"):
        RTConfig(soft_overload="drop")
    with pytest.raises(ValueError, match="soft_overload_bound_s"):
        RTConfig(soft_overload_bound_s=-0.1)


def test_decodes_under_a_grammar_mask_make_each_step_dearer():
    from rtserve.engine.cost_model import MASK_ROW_S
    plain = snapshot([(1.0, 300)], num_decodes=16, num_running=16)
    masked = snapshot([(1.0, 300)], num_decodes=16, num_running=16, num_masked_decodes=16)
    extra = predict_ttft_s(masked, [], on_time(2.0), 100) - predict_ttft_s(plain, [], on_time(2.0), 100)
    assert extra == pytest.approx(4 * 16 * MASK_ROW_S)  # four steps of prefill, each with 16 masked rows
