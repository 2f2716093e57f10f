from rtserve.config import SchedulerConfig
from rtserve.engine.request import Request, RequestStatus
from rtserve.engine.scheduler import Scheduler
from rtserve.engine.scheduler_output import RunnerOutput
from rtserve.kv.manager import KVCacheManager
from rtserve.sampling_params import SamplingParams


def make(num_blocks=16, budget=8, max_seqs=4, block_size=4):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs), kv, 512), kv


def req(rid, n, max_tokens=4):
    return Request(rid, list(range(1, n + 1)), SamplingParams(temperature=0, max_tokens=max_tokens), 0.0,
                   eos_token_ids=(0,))


def sample_all(sched, out, token=7):
    return RunnerOutput({s.request.request_id: token for s in out.seqs if s.do_sample})


def test_chunked_prefill_shares_budget_with_decodes():
    s, kv = make(budget=8)
    s.add_request(req("a", 5))
    s.add_request(req("b", 10))
    out = s.schedule()
    assert [(x.request.request_id, x.start_pos, x.num_new_tokens) for x in out.seqs] == [("a", 0, 5), ("b", 0, 3)]
    assert [x.do_sample for x in out.seqs] == [True, False]
    assert [x.block_ids for x in out.seqs] == [[0, 1], [2]]
    s.update(out, sample_all(s, out))
    out = s.schedule()
    # a decodes one token, b continues its prompt with the rest of the budget.
    assert [(x.request.request_id, x.start_pos, x.num_new_tokens) for x in out.seqs] == [("a", 5, 1), ("b", 3, 7)]
    assert out.seqs[1].block_ids == [2, 3, 4]


def test_max_num_seqs_limits_admission_in_arrival_order():
    s, _ = make(budget=64, max_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 3))
    out = s.schedule()
    assert [x.request.request_id for x in out.seqs] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_preemption_by_recompute_picks_last_admitted_and_requeues_it_first():
    s, kv = make(num_blocks=4, budget=16, block_size=4)
    s.add_request(req("a", 8, max_tokens=8))
    s.add_request(req("b", 8, max_tokens=8))
    out = s.schedule()
    assert [x.block_ids for x in out.seqs] == [[0, 1], [2, 3]]
    s.update(out, sample_all(s, out))
    # Each now needs a third block: none free, so b (admitted last) is preempted for a.
    out = s.schedule()
    assert out.preempted_ids == ["b"]
    assert [(x.request.request_id, x.num_new_tokens) for x in out.seqs] == [("a", 1)]
    assert out.seqs[0].block_ids[:2] == [0, 1] and len(out.seqs[0].block_ids) == 3
    b = s.requests["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.output_token_ids == [7]
    assert s.waiting[0] is b and s.num_preemptions == 1


def test_finish_on_eos_and_length_frees_blocks():
    s, kv = make()
    s.add_request(req("a", 3, max_tokens=2))
    s.add_request(req("b", 3, max_tokens=5))
    out = s.schedule()
    outs = s.update(out, RunnerOutput({"a": 7, "b": 0}))  # b samples EOS
    assert {o.request_id: o.finish_reason for o in outs} == {"a": None, "b": "stop"}
    out = s.schedule()
    outs = s.update(out, RunnerOutput({"a": 7}))
    assert outs[0].finish_reason == "length"
    assert kv.num_free_blocks == 16 and not s.has_unfinished


def test_abort_waiting_and_running_frees_everything():
    s, kv = make(budget=4)
    s.add_request(req("a", 3))
    s.add_request(req("b", 3))
    out = s.schedule()
    assert [x.request.request_id for x in out.seqs] == ["a", "b"]
    s.add_request(req("c", 3))
    outs = s.finish_requests(["a", "c", "missing"], "abort")
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort"), ("c", "abort")]
    s.update(out, sample_all(s, out))  # a was aborted mid-step: ignored
    s.finish_requests(["b"], "abort")
    assert kv.num_free_blocks == 16 and not s.has_unfinished
