"""Making room for a waiting firm request: batch first, then soft by most slack; never firm, never in vain.
A soft request, on time or late, makes room from batch only.

6 KV blocks of 4 tokens. A 7-token prompt holds 2 blocks through its first decode; a 10-token firm prompt
needs 3.
"""
from tests.unit.rt_helpers import ids, make_sched, rt_req, step


def running_with(policy, *reqs, **kw):
    sched, kv, clock, _ = make_sched(policy, budget=64, num_blocks=6, block_size=4, **kw)
    for r in reqs:
        sched.add_request(r(clock))
    step(sched, clock, 0.01)
    return sched, kv, clock


def batch(rid="batch", n=7):
    return lambda clock: rt_req(rid, n, clock.now, "batch", max_tokens=100, first_token=100)


def soft(rid, itl_s, first_token):
    return lambda clock: rt_req(rid, 7, clock.now, max_tokens=100, itl_s=itl_s, first_token=first_token)


def firm(rid="firm", n=10, first_token=900, arrival_offset_s=0.0, clock=None):
    return rt_req(rid, n, clock.now + arrival_offset_s, "firm", max_tokens=100, ttft_s=0.5, itl_s=0.05,
                  first_token=first_token)


def test_batch_is_preempted_for_a_firm_request_waiting_for_blocks():
    sched, kv, clock = running_with("deadline", batch(), soft("soft", 0.05, 200))
    assert kv.block_ids("soft") == [0, 1] and kv.block_ids("batch") == [2, 3] and kv.num_free_blocks == 2
    sched.add_request(firm(clock=clock))
    out = sched.schedule()
    assert out.preempted_ids == ["batch"]
    assert ids(out) == [("soft", 1), ("firm", 10)]  # batch's decode was taken out of the step
    assert kv.block_ids("firm") == [4, 5, 3] and kv.block_ids("batch") == []
    victim = sched.waiting[0]
    assert victim.request_id == "batch" and victim.num_computed_tokens == 0 and victim.num_preemptions == 1


def test_without_batch_the_soft_stream_with_most_slack_gives_way():
    sched, kv, clock = running_with("deadline", soft("tight", 0.05, 200), soft("loose", 0.5, 300))
    sched.add_request(firm(clock=clock))
    out = sched.schedule()
    assert out.preempted_ids == ["loose"] and ids(out) == [("tight", 1), ("firm", 10)]


def test_firm_streams_are_never_displaced_and_fcfs_never_makes_room():
    sched, kv, clock = running_with("deadline", lambda c: firm("f1", 7, 200, clock=c),
                                    lambda c: firm("f2", 7, 300, clock=c))
    sched.add_request(firm(clock=clock))
    out = sched.schedule()
    assert out.preempted_ids == [] and ids(out) == [("f1", 1), ("f2", 1)]
    fcfs, _, clock2 = running_with("fcfs", batch(), soft("soft", 0.05, 200))
    fcfs.add_request(firm(clock=clock2))
    out = fcfs.schedule()
    assert out.preempted_ids == [] and sorted(ids(out)) == [("batch", 1), ("soft", 1)]


def test_nothing_is_preempted_when_the_victims_could_not_free_enough():
    # A 15-token firm stream holds 4 blocks, the batch 2: freeing the batch leaves the firm prompt 1 short.
    sched, kv, clock = running_with("deadline", batch(), lambda c: firm("stream", 15, 200, clock=c))
    assert kv.num_free_blocks == 0
    sched.add_request(firm(clock=clock))
    out = sched.schedule()
    assert out.preempted_ids == [] and sorted(ids(out)) == [("batch", 1), ("stream", 1)]


def test_a_late_firm_request_makes_no_room_and_a_soft_one_only_from_batch():
    sched, kv, clock = running_with("deadline", batch(), soft("soft", 0.05, 200))
    sched.add_request(firm(clock=clock, arrival_offset_s=-1.0))  # its TTFT deadline passed already
    assert sched.schedule().preempted_ids == []
    sched, kv, clock = running_with("deadline", batch(), soft("soft", 0.05, 200))
    sched.add_request(rt_req("soft2", 10, clock.now, max_tokens=100, first_token=700))
    out = sched.schedule()
    assert out.preempted_ids == ["batch"] and ids(out) == [("soft", 1), ("soft2", 10)]
    sched, kv, clock = running_with("deadline", batch(), soft("soft", 0.05, 200))
    sched.add_request(rt_req("late-soft", 10, clock.now - 1.0, max_tokens=100, first_token=700))  # TTFT passed
    assert sched.schedule().preempted_ids == ["batch"]  # nor a late one waits for batch to finish
    sched, kv, clock = running_with("deadline", soft("s1", 0.05, 200), soft("s2", 0.5, 300))
    sched.add_request(rt_req("soft2", 10, clock.now, max_tokens=100, first_token=700))
    assert sched.schedule().preempted_ids == []  # soft streams never give way to soft


def test_batch_is_preempted_for_a_firm_request_waiting_for_a_sequence_slot():
    sched, kv, clock, _ = make_sched("deadline", budget=64, max_seqs=2)
    sched.add_request(batch()(clock))
    sched.add_request(soft("soft", 0.05, 200)(clock))
    step(sched, clock, 0.01)
    sched.add_request(firm(clock=clock))
    out = sched.schedule()
    assert out.preempted_ids == ["batch"] and ids(out) == [("soft", 1), ("firm", 10)]


def test_a_request_admitted_in_the_same_step_is_not_a_victim():
    sched, kv, clock, _ = make_sched("deadline", budget=64, max_seqs=1)
    # Both wait for the one slot; the soft prompt is due first and takes it; the firm one then waits.
    sched.add_request(rt_req("urgent-soft", 10, clock.now - 0.4, max_tokens=100, first_token=500))
    sched.add_request(firm(clock=clock))
    out = sched.schedule()
    assert out.preempted_ids == [] and ids(out) == [("urgent-soft", 10)]
