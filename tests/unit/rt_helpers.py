"""Shared helpers for the real-time policy tests: a fake clock, a fake cost model, tiny schedulers."""
from __future__ import annotations

from rtserve.config import RTConfig, SchedulerConfig
from rtserve.engine.cost_model import StepCostModel
from rtserve.engine.request import Request
from rtserve.engine.rt_policy import make_policy, resolve_rt
from rtserve.engine.scheduler import Scheduler
from rtserve.engine.scheduler_output import RunnerOutput
from rtserve.kv.manager import KVCacheManager
from rtserve.protocol import RTParams
from rtserve.sampling_params import SamplingParams

# 10 ms per step, 1 ms per decode, 0.1 ms per prefill token, no context term.
FAKE_COEFFS = (0.010, 0.001, 0.0001, 0.0)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


def make_sched(policy="deadline", budget=512, max_seqs=8, num_blocks=256, block_size=16, clock=None,
               calibrated=True, **rt_kw):
    """A scheduler on the fake cost model; steps are planned to fill the whole slack (the model has no
    measured overruns, no delivery margins) unless `step_slack_fraction` or a delivery margin is given."""
    rt = RTConfig(policy=policy, **{"step_slack_fraction": 1.0, "min_running": 0, "firm_delivery_margin_s": 0.0,
                          "delivery_margin_s": 0.0, **rt_kw})
    model = StepCostModel.from_coeffs(FAKE_COEFFS, calibrated=calibrated)
    model.overrun_ratio = model.overrun_p99 = 1.0
    kv = KVCacheManager(num_blocks, block_size)
    clock = clock or FakeClock()
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=8192),
                      kv, 8192, make_policy(rt, model), clock)
    return sched, kv, clock, rt


def rt_req(rid, n, arrival, rt_class="soft", max_tokens=64, config=None, first_token=1, **budgets_s):
    """A request of `n` prompt tokens first_token, first_token + 1, ... (shared prefixes hit the cache)."""
    rt = resolve_rt(RTParams(rt_class, **budgets_s), config or RTConfig())
    return Request(rid, list(range(first_token, first_token + n)),
                   SamplingParams(temperature=0, max_tokens=max_tokens), arrival, eos_token_ids=(0,), rt=rt)


def step(sched, clock, dt=0.01, token=7):
    """schedule -> (fake) execute taking dt -> update; returns the SchedulerOutput."""
    out = sched.schedule()
    clock.advance(dt)
    sched.update(out, RunnerOutput({s.request.request_id: token for s in out.seqs if s.do_sample}))
    return out


def ids(out):
    return [(s.request.request_id, s.num_new_tokens) for s in out.seqs]
