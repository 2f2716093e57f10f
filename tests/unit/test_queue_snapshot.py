"""The queue as admission control sees it: tiered keys, running prefills, the starving batch's share,
free slots under the ITL cap, the step in flight."""
from rtserve.config import RTClassDefaults
from rtserve.engine.cost_model import StepCostModel
from rtserve.engine.queue_snapshot import build_queue_snapshot
from rtserve.engine.rt_params import BACKGROUND, LATE, ON_TIME
from tests.unit.rt_helpers import FAKE_COEFFS, make_sched, rt_req, step


def test_keys_tiers_and_the_starving_batch_share():
    sched, kv, clock, _ = make_sched("deadline", budget=512, max_seqs=1, min_prefill_chunk=16,
                                     rescue_step_fraction=0.0)  # 50 ms steps with no stream running
    sched.add_request(rt_req("starving", 2000, clock.now - 40.0, "batch"))
    sched.add_request(rt_req("young", 2000, clock.now - 1.0, "batch", first_token=3000))
    sched.add_request(rt_req("late", 50, clock.now - 2.0, ttft_s=0.5, first_token=6000))
    sched.add_request(rt_req("fresh", 100, clock.now, ttft_s=0.5, first_token=7000))
    step(sched, clock, 0.01)  # the starving batch takes the only slot, 16 tokens of the step
    snap = build_queue_snapshot(sched, sched.policy.cost_model, 4, 8192, clock.now)
    assert snap.waiting == [((ON_TIME, clock.now - 0.01 + 0.5), 100), ((LATE, clock.now - 2.01 + 0.5), 50),
                            ((BACKGROUND, clock.now - 1.01), 2000)]
    assert snap.running_prefills == []  # the starving batch is a share of each step, not work ahead
    assert 383 <= snap.prefill_token_budget <= 384  # (50 ms - 10 ms) / 0.1 ms, less its 16 tokens
    assert snap.num_free_slots == 0 and snap.num_requests_added == 4
    assert snap.step_s > 0.0


def test_free_slots_follow_the_itl_cap_and_can_be_negative():
    tight = RTClassDefaults(0.5, 0.020, None)
    sched, kv, clock, _ = make_sched("deadline", budget=512, max_seqs=64, soft=tight, firm=tight)
    for i in range(8):
        sched.add_request(rt_req(f"s{i}", 8, clock.now, itl_s=0.020, first_token=100 * i + 1))
    step(sched, clock, 0.005)
    snap = build_queue_snapshot(sched, sched.policy.cost_model, 8, 8192, clock.now)
    assert snap.num_free_slots == 1  # a cap of 9 decodes, 8 running
    sched.policy.cost_model.overrun_ratio = 2.0  # steps now run long: half the slack, a cap of 0
    snap = build_queue_snapshot(sched, sched.policy.cost_model, 8, 8192, clock.now)
    assert snap.num_free_slots < 0
    fcfs, _, clock2, _ = make_sched("fcfs", max_seqs=4)
    fcfs.add_request(rt_req("a", 8, clock2.now))
    step(fcfs, clock2)
    assert build_queue_snapshot(fcfs, StepCostModel.from_coeffs(FAKE_COEFFS), 1, 8192, clock2.now).num_free_slots == 3


def test_budget_and_victims_are_what_a_firm_arrival_would_get():
    sched, kv, clock, _ = make_sched("deadline", budget=512, min_prefill_chunk=16, min_running=2)
    sched.add_request(rt_req("stream", 8, clock.now, itl_s=0.0105, max_tokens=1000))
    step(sched, clock)
    sched.add_request(rt_req("long", 2000, clock.now, "batch", first_token=3000))
    assert [s.request.request_id for s in step(sched, clock).seqs] == ["stream"]  # batch gets nothing ...
    snap = build_queue_snapshot(sched, sched.policy.cost_model, 2, 8192, clock.now)
    assert snap.prefill_token_budget == 16  # ... but an interactive prompt would get the minimum chunk
    assert snap.num_preemptible == 1  # the soft stream could give a firm arrival its slot


def test_running_batch_work_is_neither_ahead_of_an_interactive_arrival_nor_holding_its_slot():
    tight = RTClassDefaults(0.5, 0.020, None)
    snaps = {}
    for policy in ("deadline", "fcfs"):
        sched, kv, clock, _ = make_sched(policy, budget=512, max_seqs=8, soft=tight, firm=tight)
        for i in range(8):  # no interactive work: batch fills every slot
            sched.add_request(rt_req(f"b{i}", 8, clock.now, "batch", max_tokens=1000, first_token=100 * i + 1))
        step(sched, clock, 0.005)
        step(sched, clock, 0.005)
        assert len(sched.running) == 8
        snaps[policy] = build_queue_snapshot(sched, StepCostModel.from_coeffs(FAKE_COEFFS), 8, 8192, clock.now)
    # an interactive prompt's steps hold the batch decodes, and it may preempt batch for a slot
    assert snaps["deadline"].num_decodes == 0 and snaps["deadline"].num_free_slots == 8
    assert snaps["deadline"].running_remaining_tokens == [] and snaps["deadline"].num_running == 8
    assert snaps["fcfs"].num_decodes == 8 and snaps["fcfs"].num_free_slots == 0
