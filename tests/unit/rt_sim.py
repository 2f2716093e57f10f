"""A deterministic simulation of the engine under load: the real scheduler, policy, KV manager and
admission control, with a fake clock and a fake model whose step time comes from a cost model.

Workloads follow `rtserve bench --workload ...` (`SimConfig.workload`):
- `realtime-mix`: firm/soft chats with TTFT/ITL budgets, batch 2048-token summaries;
- `synthetic`: 256-token prompts, 128 output tokens, soft (the outside benchmarks' standard load);
- `chat`: multi-turn conversations over a shared 256-token system prompt (prefix-cache hits), soft;
- `long-prompt-interference`: short soft chats, every 8th request a 2048-token batch summary.
Arrivals are Poisson, or evenly spaced (`arrivals="constant"`, guidellm's profile). Each request is
admitted (or refused) at its arrival from the queue snapshot of the last finished step, as the API
process does; the engine loop drops late firm requests before each step, runs schedule -> (fake)
execute -> update, and tokens reach the client when the step ends. Step times carry lognormal noise,
and a contention phase (`contention`: start, end, factor) slows every step in it, as a co-located
process taking part of a core does. After `duration_s` whatever is still in flight is cancelled, as
the bench does.

    python -m tests.unit.rt_sim [workload] [rate ...]   # fcfs vs deadline at each rate
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np

from rtserve.config import RTConfig, SchedulerConfig
from rtserve.engine.admission import PendingRequest, decide, order_key
from rtserve.engine.cost_model import StepCostModel
from rtserve.engine.queue_snapshot import build_queue_snapshot
from rtserve.engine.request import Request
from rtserve.engine.rt_policy import make_policy, resolve_rt
from rtserve.engine.scheduler import Scheduler
from rtserve.engine.scheduler_output import RunnerOutput
from rtserve.kv.manager import KVCacheManager
from rtserve.protocol import FinishReason, RTParams
from rtserve.sampling_params import SamplingParams
from tests.unit.rt_helpers import FakeClock

# SmolLM2-135M on 2 CPU cores, roughly: 8 ms per step, 1.5 ms per decode, 0.6 ms per prefill token,
# 1 ms per 1000 context tokens read by attention.
CPU_COEFFS = (0.008, 0.0015, 0.0006, 0.001)
MAX_MODEL_LEN = 8192


@dataclass(frozen=True, eq=False)
class SimConfig:
    policy: str = "deadline"
    rate_per_s: float = 4.0
    workload: str = "realtime-mix"  # | synthetic | chat | long-prompt-interference
    arrivals: str = "poisson"       # | constant
    duration_s: float = 60.0
    seed: int = 0
    mix: tuple[float, float, float] = (0.3, 0.5, 0.2)  # firm, soft, batch shares
    ttft_s: float = 0.5
    itl_s: float = 0.05
    chat_prompt_len: tuple[int, int] = (40, 110)  # chat template + a short or medium question
    chat_output_len: tuple[int, int] = (64, 256)
    batch_prompt_len: int = 2048
    batch_output_len: int = 128
    coeffs: tuple[float, float, float, float] = CPU_COEFFS
    step_noise: float = 0.1  # lognormal sigma of the measured step time around the model's prediction
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    num_blocks: int = 712  # 512 MiB of fp32 KV for SmolLM2-135M, 16-token blocks
    block_size: int = 16
    goodput_ttft_s: float = 0.5  # `--goodput ttft:500 tpot:50`, as benchmarks/realtime_mix.sh
    goodput_tpot_s: float = 0.05
    contention: tuple[float, float, float] | None = None  # (start_s, end_s, step-time factor)
    rt_overrides: dict = field(default_factory=dict)  # RTConfig fields


@dataclass
class SimRecord:
    request_id: str
    rt_class: str
    arrival_s: float
    rt: RTParams
    status: str = "pending"  # rejected | ok | dropped | cancelled
    token_times_s: list[float] = field(default_factory=list)  # per step that delivered tokens
    num_tokens: int = 0
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def gaps_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float:
        if self.num_tokens <= 1:
            return 0.0
        return (self.token_times_s[-1] - self.token_times_s[0]) / (self.num_tokens - 1)

    def served_late(self) -> bool:
        """A token reached the client after its budget (TTFT, a gap past ITL, or past deadline_ms)."""
        rt = self.rt
        if not self.token_times_s:
            return False
        if rt.ttft_s is not None and self.ttft_s > rt.ttft_s + 1e-9:
            return True
        if rt.itl_s is not None and max(self.gaps_s, default=0.0) > rt.itl_s + 1e-9:
            return True
        return rt.deadline_s is not None and self.token_times_s[-1] - self.arrival_s > rt.deadline_s + 1e-9

    def met_budget(self) -> bool:
        return self.status == "ok" and bool(self.token_times_s) and not self.served_late()

    def met_goodput(self, cfg: SimConfig) -> bool:
        return (self.status == "ok" and self.ttft_s is not None and self.ttft_s <= cfg.goodput_ttft_s
                and self.tpot_s <= cfg.goodput_tpot_s)


@dataclass
class SimResult:
    config: SimConfig
    records: list[SimRecord]
    num_steps: int
    num_preemptions: int

    def of(self, rt_class: str) -> list[SimRecord]:
        return [r for r in self.records if r.rt_class == rt_class]

    @property
    def goodput_req_per_s(self) -> float:
        return sum(r.met_goodput(self.config) for r in self.records) / self.config.duration_s

    def summary(self) -> dict[str, float]:
        firm = self.of("firm")
        admitted = [r for r in firm if r.status != "rejected"]
        finished = [r for r in admitted if r.status != "cancelled"]  # not cut off by the end of the run
        gaps = [g for r in self.records if r.status == "ok" for g in r.gaps_s]  # pooled, as the bench does
        p50, p99 = np.percentile(gaps, [50, 99]) if gaps else (math.nan, math.nan)
        ttfts = [r.ttft_s for r in self.records if r.status == "ok"]
        tpots = [r.tpot_s for r in self.records if r.status == "ok"]
        out = {"goodput_req_per_s": self.goodput_req_per_s,
               "attainment_pct": 100.0 * sum(r.met_goodput(self.config) for r in self.records)
               / max(len(self.records), 1),
               "ttft_p50_ms": 1000 * float(np.percentile(ttfts, 50)) if ttfts else math.nan,
               "ttft_p90_ms": 1000 * float(np.percentile(ttfts, 90)) if ttfts else math.nan,
               "tpot_mean_ms": 1000 * float(np.mean(tpots)) if tpots else math.nan,
               "firm_admitted": len(admitted), "firm_rejected": len(firm) - len(admitted),
               "firm_cancelled": sum(r.status == "cancelled" for r in admitted),
               "firm_admitted_met_pct": 100.0 * sum(r.met_budget() for r in finished) / max(len(finished), 1),
               "firm_served_late": sum(r.served_late() for r in firm),
               "firm_dropped": sum(r.status == "dropped" for r in firm),
               "itl_p50_ms": 1000 * p50, "itl_p99_ms": 1000 * p99, "itl_p99_over_p50": p99 / p50,
               "preemptions": self.num_preemptions}
        for c in ("firm", "soft", "batch"):
            recs = self.of(c)
            out[f"{c}_requests"] = len(recs)
            out[f"{c}_completed"] = sum(r.status == "ok" for r in recs)
            out[f"{c}_good"] = sum(r.met_goodput(self.config) for r in recs)
        return out


Arrival = tuple[float, str, list[int], int]  # (arrival_s, class, prompt token ids, max_tokens)


def make_arrivals(cfg: SimConfig) -> list[Arrival]:
    """The workload's requests in arrival order, seeded; the same for every policy."""
    rng = np.random.default_rng([cfg.seed, 0x51])
    maker = _WORKLOADS[cfg.workload]
    out, t = [], 0.0
    while t < cfg.duration_s:
        rt_class, prompt, max_tokens = maker(cfg, len(out), rng)
        out.append((t, rt_class, prompt, max_tokens))
        t += 1.0 / cfg.rate_per_s if cfg.arrivals == "constant" else float(rng.exponential(1.0 / cfg.rate_per_s))
    return out


def _unique(index: int, n: int, salt: int = 0) -> list[int]:
    """n token ids no other request shares (ids above the shared prefixes' range)."""
    return [1000 + (index * 8 + salt) * 4096 + j for j in range(n)]


def _chat_prompt(index: int, prompt_len: int) -> list[int]:
    """A 32-token chat template prefix shared by every prompt, then tokens of this request's own."""
    return list(range(1, 33))[:prompt_len] + _unique(index, prompt_len - 32)


def _realtime_mix(cfg: SimConfig, index: int, rng: np.random.Generator) -> tuple[str, list[int], int]:
    shares = np.array(cfg.mix) / sum(cfg.mix)
    rt_class = ("firm", "soft", "batch")[int(rng.choice(3, p=shares))]
    if rt_class == "batch":
        return rt_class, _chat_prompt(index, cfg.batch_prompt_len), cfg.batch_output_len
    return (rt_class, _chat_prompt(index, int(rng.integers(*cfg.chat_prompt_len))),
            int(rng.integers(*cfg.chat_output_len)))


def _synthetic(cfg: SimConfig, index: int, rng: np.random.Generator) -> tuple[str, list[int], int]:
    return "soft", _unique(index, 256), 128


_SYSTEM_PROMPT = list(range(1, 257))  # shared by every conversation of the chat workload
_TURNS_PER_CHAT = 4


def _chat(cfg: SimConfig, index: int, rng: np.random.Generator) -> tuple[str, list[int], int]:
    """Turn k of a conversation: system prompt + the k earlier turns (their user text and answer,
    the same ids every time, so they hit the prefix cache) + this turn's question."""
    conv, turn = divmod(index, _TURNS_PER_CHAT)
    history = [tok for k in range(turn) for tok in _unique(conv, 60 + 100, salt=k)]
    return "soft", _SYSTEM_PROMPT + history + _unique(conv, 60, salt=turn), int(rng.integers(64, 192))


def _interference(cfg: SimConfig, index: int, rng: np.random.Generator) -> tuple[str, list[int], int]:
    if index % 8 == 7:
        return "batch", _chat_prompt(index, cfg.batch_prompt_len), cfg.batch_output_len
    return "soft", _chat_prompt(index, int(rng.integers(*cfg.chat_prompt_len))), int(rng.integers(*cfg.chat_output_len))


_WORKLOADS = {"realtime-mix": _realtime_mix, "synthetic": _synthetic, "chat": _chat,
              "long-prompt-interference": _interference}


def simulate(cfg: SimConfig) -> SimResult:
    clock = FakeClock(0.0)
    rt_config = RTConfig(policy=cfg.policy, **cfg.rt_overrides)
    true_model = StepCostModel.from_coeffs(cfg.coeffs)  # what a step really costs, before noise
    model = StepCostModel.from_coeffs(cfg.coeffs)  # the engine's model: calibrated, refitted online
    kv = KVCacheManager(cfg.num_blocks, cfg.block_size)
    sched = Scheduler(SchedulerConfig(cfg.max_num_batched_tokens, cfg.max_num_seqs, MAX_MODEL_LEN), kv,
                      MAX_MODEL_LEN, make_policy(rt_config, model), clock)
    noise = np.random.default_rng([cfg.seed, 0x57])
    arrivals = make_arrivals(cfg)
    records: dict[str, SimRecord] = {}
    snap = build_queue_snapshot(sched, model, 0, MAX_MODEL_LEN, 0.0)
    decide_snap = snap  # the snapshot an arrival is decided from: the latest when its step began
    pending: list[PendingRequest] = []
    num_added = num_steps = 0
    next_arrival = 0
    while clock.now < cfg.duration_s:
        # Requests that arrived during the last step: decided on arrival from the snapshot taken when
        # it began, plus the requests sent since (`pending`), as the engine client decides them.
        added: list[PendingRequest] = []  # the snapshot taken before this step will not reflect them
        while next_arrival < len(arrivals) and arrivals[next_arrival][0] <= clock.now:
            t, rt_class, prompt, max_tokens = arrivals[next_arrival]
            rid = f"{rt_class}-{next_arrival}"
            next_arrival += 1
            prompt_len = len(prompt)
            rt = resolve_rt(RTParams(rt_class), rt_config)
            rec = records[rid] = SimRecord(rid, rt_class, t, rt)
            decision = decide(rt_config, decide_snap, pending, rt, t, prompt_len, now=t)
            if not decision.admitted:
                rec.status = "rejected"
                continue
            num_added += 1
            added.append(PendingRequest(num_added, order_key(decide_snap.policy, rt, t, rt_config), prompt_len))
            pending.append(added[-1])
            sched.add_request(Request(rid, list(prompt),
                                      SamplingParams(temperature=0, max_tokens=max_tokens), t,
                                      eos_token_ids=(0,), rt=rt))
        outputs = sched.expire()
        if not sched.has_unfinished:
            _deliver(records, outputs, clock.now)
            if next_arrival >= len(arrivals):
                break
            clock.now = arrivals[next_arrival][0]
            decide_snap, pending = snap, []  # idle: the latest snapshot is current
            continue
        out = sched.schedule()
        step_start_snap = snap  # requests arriving during this step are decided from it, as in the engine client
        step_s = true_model.predict_s(out.step_features) * float(noise.lognormal(0.0, cfg.step_noise))
        if cfg.contention is not None and cfg.contention[0] <= clock.now < cfg.contention[1]:
            step_s *= cfg.contention[2]
        clock.advance(step_s)
        model.observe(out.step_features, step_s)  # refitted online, as in the engine
        num_steps += 1
        outputs += sched.update(out, RunnerOutput({s.request.request_id: 7 for s in out.seqs if s.do_sample}))
        _deliver(records, outputs, clock.now)
        snap = build_queue_snapshot(sched, model, num_added, MAX_MODEL_LEN, clock.now)
        decide_snap, pending = step_start_snap, added
    for t, rt_class, _, _ in arrivals[next_arrival:]:  # sent by the bench but never read by the engine
        rid = f"{rt_class}-{next_arrival}"
        records[rid] = SimRecord(rid, rt_class, t, resolve_rt(RTParams(rt_class), rt_config))
        next_arrival += 1
    for rec in records.values():
        if rec.status == "pending":
            rec.status = "cancelled"
    return SimResult(cfg, list(records.values()), num_steps, sched.num_preemptions)


def _deliver(records: dict[str, SimRecord], outputs, now: float) -> None:
    for o in outputs:
        rec = records[o.request_id]
        if o.new_token_ids:
            rec.token_times_s.append(now)
            rec.num_tokens += len(o.new_token_ids)
        if o.finish_reason is not None:
            rec.error = o.error
            rec.status = "dropped" if o.finish_reason == FinishReason.DEADLINE else "ok"


def compare(rate_per_s: float, **kw) -> str:
    rows = {p: simulate(SimConfig(policy=p, rate_per_s=rate_per_s, **kw)).summary()
            for p in ("fcfs", "deadline")}
    lines = [f"{kw.get('workload', 'realtime-mix')} at {rate_per_s:g}/s",
             f"{'metric':<26}{'fcfs':>12}{'deadline':>12}"]
    for key in rows["fcfs"]:
        lines.append(f"{key:<26}{rows['fcfs'][key]:>12.3f}{rows['deadline'][key]:>12.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    workload = args.pop(0) if args and args[0] in _WORKLOADS else "realtime-mix"
    for rate in [float(a) for a in args] or [2.0]:
        print(compare(rate, workload=workload), "\n")
