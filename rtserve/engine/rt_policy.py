"""Real-time scheduling policy: what runs next, how much fits a step, who makes room, who is dropped.

The scheduler owns the mechanics (token budget, KV allocation, preemption by recompute); each step it
asks a policy object to order the queues and for the step's prefill plan (`plan_step` returns a
`StepPlan`: the prefill tokens and predicted time the step may spend, which the scheduler spends chunk
by chunk), and to agree to each admission, pick victims and name late requests. Two implementations of
one interface, chosen by `RTConfig.policy`:

- `FCFSPolicy` ("fcfs"): arrival order, full prefill budget, admission limited only by sequence slots
  and KV blocks, the last admitted request is preempted, nothing expires (vLLM's behaviour: the
  baseline to compare against).
- `DeadlinePolicy` ("deadline"), built for overload, where plain EDF fails: every queued request is
  late, and serving the most overdue first makes every newer one late too (the domino effect). So work
  is ordered in tiers, EDF inside each (`order_key` = (tier, time)):

      starving  <  on time  <  late  <  background

  *on time*: firm or soft work whose next deadline (TTFT, then last token + ITL) is still ahead;
  *late*: soft work already past it (it has missed; it runs in capacity on-time work leaves);
  *background*: batch, by arrival; *starving*: the oldest batch or late soft request that has waited
  past `batch_max_wait_s` and still needs prefill: first in line for slots and blocks, but limited to
  `min_prefill_chunk` prefill tokens a step, so nothing starves forever yet it cannot stall the
  streams. While a firm stream runs nothing is starving: that share, deep in a long prompt, costs
  more than a firm gap leaves, and the request takes only what the firm streams' steps leave. A
  waiting request ranked before a running prefill takes the prefill budget first (`runs_first`).

  How long a step may be. TTFT and ITL are deadlines of the same kind, and a step is planned to end
  before the earliest one it could break. A running stream's next token is due at its ITL deadline
  (last token + ITL); the step is planned to end by then, less the step-time model's measured overrun
  (its p99 beside soft streams; its 10^-5 tail beside a firm stream, which one overrun drops). The
  prefill that fits serves the waiting prompts in deadline order. When that is not enough (a prompt
  on time would miss its TTFT at ITL-sized steps but would make it with longer ones), the plan
  chooses by goodput, the requests served within both budgets, a stream's ITL judged as its mean pace
  (TPOT): a soft stream that is ahead of its pace (first token + n ITLs for its n-th next token) can
  take one longer gap and still end within budget, while the prompt's missed TTFT is a lost request.
  So the step may stretch to the soft streams' pace deadlines (never past a firm stream's ITL
  deadline, never beyond `rescue_step_fraction` of the interactive TTFT budget, so an arrival does
  not wait long for the step in flight); the stretched gaps are reported as ITL misses all the same.
  Beside soft streams alone, their pace is what prompts are served with: a prompt on time may take
  chunks up to the rescue step (within every stream's pace), and the chunk that ends a prompt (its
  first token comes with the step) up to the TTFT budget, within their pace. When no prompt is on
  time the late ones get that spare pace, so a late request's TTFT stays near what FCFS gives it.
  A prefill chunk must also be worth its fixed cost (`_chunk_overhead_s`: on the CPU path a chunk
  beside decodes costs ~11 ms besides its tokens); otherwise the decodes run alone and bank pace.
  Beside a firm stream a step carries one prefill chunk (`StepPlan.max_chunks`): the online fit
  apportions the per-chunk cost least well, and two or three chunks made steps planned at 36 ms take
  60-90 ms in simulation, dropping the firm stream.

  Triage (`_triage`): a soft prompt that would miss its TTFT even served in deadline order at the
  fastest prefill the plan allows is ranked with the late at once, before any deadline passes, so
  it does not push the prompts behind it past theirs (the domino effect of plain EDF). Prefill is
  counted from a waiting prompt's prefix-cache hit (`Request.num_prefix_hit_tokens`).
  A request joins the running set only while a step with one more decode still fits the ITL budget
  (`can_admit`); late and batch work only below `background_slot_share` of that. A waiting on-time
  firm request that finds no slot or blocks may preempt batch work, then soft work with the most slack
  (`victims_for`); firm streams are never preempted for it.

  Batch work takes the time interactive work leaves. With no interactive request running, batch
  requests fill the sequence slots (an on-time soft or firm arrival preempts them for a slot or
  blocks); beside interactive work their decodes sit steps out, keeping their blocks
  (`_held_decodes`): all of them while an interactive prompt on time needs prefill, all but the
  background share of the ITL cap beside interactive decodes.

Firm requests are refused at admission when their TTFT cannot be met (rtserve/engine/admission.py)
and dropped once their next token can no longer be on time (rtserve/engine/firm_deadlines.py).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from rtserve.config import RTConfig
from rtserve.engine import firm_deadlines
from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request, RequestStatus
from rtserve.engine.rt_params import HARD_CLASS_MESSAGE, resolve_rt  # noqa: F401 - re-exported
from rtserve.engine.rt_params import BACKGROUND, LATE, ON_TIME, STARVING, OrderKey
from rtserve.protocol import RTClass


@dataclass
class StepPlan:
    """One step's prefill plan: made by a policy from the scheduler's state, spent by the scheduler.

    `prefill_token_budget` bounds the step's prefill tokens in all; `time_left_s` the predicted seconds
    its chunks may add (None: unbounded), each chunk costed by its position (a chunk deep in a long
    prompt attends to all before it); `trust_left` the tokens the cost model has grounds to predict
    (`StepCostModel.trusted_prefill_tokens`). The step's first chunk gets at least `min_chunk` tokens
    so prefill always progresses, except a request in `no_min_chunk_ids` (background work beside
    running streams: it gets only what fits, possibly nothing). A request in `fixed_chunk` (the
    starving one) gets its share whatever is left of the plan; its cost still comes off the plan.
    """

    prefill_token_budget: int
    time_left_s: float | None = None
    trust_left: int = 1 << 30
    min_chunk: int = 0
    no_min_chunk_ids: frozenset[str] = frozenset()
    fixed_chunk: dict[str, int] = field(default_factory=dict)
    cost_model: StepCostModel | None = None
    rescue: bool = False  # stretched to the soft streams' pace to save a TTFT (module doc)
    # A chunk whose tokens cost less than this (and is not its prompt's last) is not worth the fixed
    # cost of a chunk: it waits for a step with more room.
    min_chunk_work_s: float = 0.0
    # Beside soft streams only (None otherwise): the predicted seconds a chunk of a prompt in
    # `stretch_ids` may add, the step stretching within the streams' pace (`stretch_left_s`, also
    # capped by the rescue step) and, for the chunk that ends its prompt (its first token comes with
    # the step), within their pace alone (`finish_left_s`).
    stretch_left_s: float | None = None
    finish_left_s: float | None = None
    stretch_ids: frozenset[str] = frozenset()
    # Beside a firm stream a step carries at most this many prefill chunks (None: no bound): each
    # chunk adds a fixed cost the online fit apportions least well (module doc).
    max_chunks: int | None = None
    # Running batch decodes that sit this step out, keeping their blocks: `held_ids` always, `yield_ids`
    # when the step carries a chunk of a prompt in `yield_to_ids` (`DeadlinePolicy._held_decodes`).
    held_ids: frozenset[str] = frozenset()
    yield_ids: frozenset[str] = frozenset()
    yield_to_ids: frozenset[str] = frozenset()
    _placed_chunk: bool = False
    _num_chunks: int = 0

    def max_chunk_tokens(self, req: Request) -> int | None:
        return self.fixed_chunk.get(req.request_id)

    def chunk_tokens(self, req: Request, start: int, num_tokens: int) -> int:
        """At most `num_tokens` of `req`'s prompt from position `start` that fit what is left of the plan."""
        if self.time_left_s is None or req.request_id in self.fixed_chunk:
            return num_tokens
        if self.max_chunks is not None and self._num_chunks >= self.max_chunks:
            return 0
        trust = max(self.trust_left, 0)
        time_left_s = self.time_left_s
        if self.stretch_left_s is not None and req.request_id in self.stretch_ids:
            time_left_s = max(time_left_s, self.stretch_left_s)
            if (start + num_tokens >= req.num_tokens and num_tokens <= trust
                    and self.cost_model.prefill_chunk_s(num_tokens, start) <= self.finish_left_s):
                return num_tokens
        fit = min(self.cost_model.max_chunk_tokens(time_left_s, start), trust)
        if fit < num_tokens and self.min_chunk_work_s > 0:
            fit = self._worth_chunk(start, fit)
        if fit < self.min_chunk and not self._placed_chunk and req.request_id not in self.no_min_chunk_ids:
            fit = self.min_chunk
        return min(num_tokens, fit)

    def _worth_chunk(self, start: int, fit: int) -> int:
        """`fit` tokens at `start` if they are worth a chunk's fixed cost; else nothing (the chunk
        waits for a step with room; its prompt's last chunk never comes here)."""
        work_s = self.cost_model.prefill_chunk_s(fit, start) - max(self.cost_model.coeffs[5], 0.0)
        return fit if fit > 0 and work_s >= self.min_chunk_work_s else 0

    def spend(self, req: Request, start: int, num_tokens: int) -> None:
        """A prefill chunk was placed in the step: its predicted cost comes off the plan."""
        if req.request_id not in self.fixed_chunk:  # a fixed share is not the step's guaranteed chunk
            self._placed_chunk = True
            self._num_chunks += 1
        self.trust_left -= num_tokens
        if self.time_left_s is not None:
            cost_s = self.cost_model.prefill_chunk_s(num_tokens, start)
            self.time_left_s -= cost_s
            if self.stretch_left_s is not None:
                self.stretch_left_s -= cost_s
                self.finish_left_s -= cost_s


class FCFSPolicy:
    """Arrival order; the scheduler's behaviour before real-time policy existed."""

    name = "fcfs"

    def order_key(self, req: Request, now: float) -> OrderKey:
        return ON_TIME, req.arrival_time

    def order(self, running: list[Request], waiting: deque[Request], now: float) -> None:
        """Preempted requests were put back at the front; the rest stay in arrival order."""

    def plan_step(self, running: list[Request], waiting: Iterable[Request], now: float,
                  token_budget: int) -> StepPlan:
        return StepPlan(token_budget)

    def interactive_prefill_tokens(self, plan: StepPlan, token_budget: int) -> int:
        return token_budget

    def step_time_budget_s(self, running: list[Request], now: float) -> float | None:
        return None

    def max_chunk_tokens(self, req: Request, now: float) -> int | None:
        return None

    def runs_first(self, waiting_req: Request, running_req: Request, now: float) -> bool:
        return False  # running requests keep the prefill budget they had

    def can_admit(self, req: Request, running: list[Request], now: float) -> bool:
        return True

    def beside_interactive_prompt(self, running: list[Request]) -> list[Request]:
        return running  # every running request's decode shares every step

    def max_num_running(self, running: list[Request], req: Request | None = None) -> int | None:
        return None

    def pick_victim(self, candidates: list[Request], now: float) -> Request:
        return candidates[-1]  # the most recently admitted

    def victims_for(self, req: Request, running: list[Request], now: float) -> list[Request]:
        return []

    def num_firm_victims(self, running: list[Request], now: float) -> int:
        return 0

    def expired(self, requests: Iterable[Request], now: float) -> list[tuple[Request, str]]:
        return []

    def late_token(self, req: Request, now: float) -> str | None:
        return None


class DeadlinePolicy:
    """Tiered EDF, deadline-sized steps and admission, firm-first room making, firm drops (module doc)."""

    name = "deadline"

    def __init__(self, config: RTConfig, cost_model: StepCostModel) -> None:
        self.config = config
        self.cost_model = cost_model
        self._starving_id: str | None = None  # refreshed by `order` each step
        self._hopeless: set[str] = set()  # soft prompts predicted to miss their TTFT (`_triage`)

    def order_key(self, req: Request, now: float) -> OrderKey:
        if req.request_id == self._starving_id:
            return STARVING, req.arrival_time
        due = req.next_token_deadline
        if due is None:
            return BACKGROUND, req.arrival_time
        return (ON_TIME if due >= now and req.request_id not in self._hopeless else LATE), due

    def order(self, running: list[Request], waiting: deque[Request], now: float) -> None:
        """Running: decodes first (stall-free), then prefills by key. Waiting: by key."""
        self._starving_id = self._oldest_starving((*running, *waiting), now)
        self._triage(running, waiting, now)
        running.sort(key=lambda r: (r.num_remaining_prefill_tokens > 0, self.order_key(r, now),
                                    r.arrival_time))
        ordered = sorted(waiting, key=lambda r: (self.order_key(r, now), r.arrival_time))
        waiting.clear()
        waiting.extend(ordered)

    def _oldest_starving(self, requests: Iterable[Request], now: float) -> str | None:
        """The oldest batch request, or soft one past its TTFT, that has waited `batch_max_wait_s` for
        its prompt: under overload on-time work would otherwise keep it waiting forever. None while a
        firm stream runs: its every gap is a deadline, and a starving chunk deep in a long prompt
        (its attention over the tokens before it) costs more than the firm gap leaves: in simulation
        it made the steps after a firm first token 60-90 ms and dropped the stream. The request
        waits as background work, taking only the time the firm streams' steps leave."""
        if any(r.is_firm and r.last_token_time is not None and not r.is_paused for r in requests):
            return None

        # Batch work is starved only while none of it decodes: admitting one more batch request beside
        # the ones interactive work holds (`_held_decodes`) would only add a held decode.
        batch_runs = any(r.rt.rt_class == RTClass.BATCH and r.status is RequestStatus.RUNNING
                         and r.num_remaining_prefill_tokens == 0 for r in requests)

        def waits_too_long(r: Request) -> bool:
            if r.is_paused or r.num_remaining_prefill_tokens == 0 or now - r.arrival_time < self.config.batch_max_wait_s:
                return False
            if r.rt.rt_class == RTClass.BATCH:
                return not batch_runs
            return r.rt.rt_class == RTClass.SOFT and r.first_token_time is None
        starving = [r for r in requests if waits_too_long(r)]
        return min(starving, key=lambda r: r.arrival_time).request_id if starving else None

    def _triage(self, running: list[Request], waiting: Iterable[Request], now: float) -> None:
        """Mark the soft prompts that would miss their TTFT even if served in deadline order at the
        fastest prefill the plan allows (steps of `_rescue_step_s` beside the running decodes): they
        are late already, and ranked with the late (module doc) they no longer push the prompts
        behind them past their TTFT too (the domino effect, before any deadline has passed). The
        mark stays: a prompt predicted lost is not let back in front of those it would push out.
        Firm prompts are never marked (admission refused those it could not serve) but take their
        place in the order."""
        self._hopeless &= {r.request_id for r in (*running, *waiting)}
        step_s = self._rescue_step_s()
        if not self.cost_model.is_calibrated or step_s <= 0:
            return
        prompts = sorted((r for r in (*running, *waiting) if not r.is_paused and r.first_token_time is None
                          and r.ttft_deadline is not None and r.ttft_deadline >= now
                          and r.request_id not in self._hopeless and not self.is_starving(r)),
                         key=lambda r: r.ttft_deadline)
        if not prompts:
            return
        active = [r for r in running if not r.is_paused]
        decodes = [r for r in active if r.num_remaining_prefill_tokens == 0]
        decode_s = self.cost_model.predict_s(_decode_features(decodes, active))
        prefill_share = max(step_s - decode_s, 0.5 * step_s) / step_s
        busy_s = 0.0
        for req in prompts:
            start, num_tokens = _prefill_left(req)
            done_s = busy_s + self.cost_model.prefill_chunk_s(num_tokens, start) / prefill_share
            if req.rt.rt_class == RTClass.SOFT and now + done_s > req.ttft_deadline:
                self._hopeless.add(req.request_id)
            else:
                busy_s = done_s

    def is_starving(self, req: Request) -> bool:
        return req.request_id == self._starving_id

    def overrun(self, firm: bool) -> float:
        """Measured / predicted step time a plan must absorb: the 10^-5 tail beside a firm stream (one
        overrun drops it), the p99 otherwise (one overrun is one late gap)."""
        ratio = (min(self.cost_model.overrun_ratio, _MAX_FIRM_OVERRUN) if firm
                 else min(self.cost_model.overrun_p99, _MAX_OVERRUN))
        return max(ratio, 1.0 / self.config.step_slack_fraction)

    def step_time_budget_s(self, running: list[Request], now: float) -> float | None:
        """Seconds the next step may take so that every running stream's next token is on time, less
        the model's overrun margin; None when no running stream has an ITL budget. Bounds speculative
        verification as prefill chunks are."""
        streams = _streams(r for r in running if not r.is_paused and r.num_remaining_prefill_tokens == 0)
        if not streams:
            return None
        return min(self._gap_budget_s(r, now) for r in streams)

    def _gap_budget_s(self, req: Request, now: float) -> float:
        """Step time that keeps `req`'s next gap within its ITL budget; a stream already late (a soft
        one: firm ones are dropped) still allows half its ITL budget, so that work progresses."""
        slack_s = req.next_token_deadline - now - (0.0 if req.is_firm else self.config.delivery_margin_s)
        return max(slack_s, 0.5 * req.rt.itl_s) / self.overrun(req.is_firm)

    def _pace_budget_s(self, req: Request, now: float, step_s: float) -> float:
        """Step time that keeps `req` within its ITL budget on average (its TPOT), a firm stream's
        every gap being a deadline. A soft stream may take a longer gap when it is ahead of its pace
        (first token + n ITLs for its n-th next token) or will be within `PACE_HORIZON_TOKENS` tokens
        at steps of `step_s` (the decodes alone: each gap shorter than the ITL repays some of the
        long one)."""
        gap_s = self._gap_budget_s(req, now)
        if req.is_firm or req.first_token_time is None:
            return gap_s
        itl_s = req.rt.itl_s
        horizon = PACE_HORIZON_TOKENS
        if req.sampling_params.max_tokens is not None:
            horizon = max(min(horizon, req.sampling_params.max_tokens - req.num_output_tokens - 1), 0)
        pace_due = (req.first_token_time + (req.num_output_tokens + horizon) * itl_s
                    - horizon * min(step_s, itl_s))
        return max(gap_s, (pace_due - now - self.config.delivery_margin_s) / self.overrun(False))

    def plan_step(self, running: list[Request], waiting: Iterable[Request], now: float,
                  token_budget: int) -> StepPlan:
        """This step's prefill plan (module doc: how long a step may be)."""
        active = [r for r in running if not r.is_paused]
        waiting = [r for r in waiting if not r.is_paused]
        fixed = {r.request_id: self.config.min_prefill_chunk for r in (*active, *waiting) if self.is_starving(r)}
        trust = self.cost_model.trusted_prefill_tokens
        if not self.cost_model.is_calibrated:  # small steps until the model has measured some
            return StepPlan(min(token_budget, UNCALIBRATED_PREFILL_TOKENS), fixed_chunk=fixed)
        held, yielding, yield_to = self._held_decodes(active, waiting, now)
        active = [r for r in active if r.request_id not in held and r.request_id not in yielding]
        decodes = [r for r in active if r.num_remaining_prefill_tokens == 0]
        streams = _streams(decodes)
        decode_step_s = self.cost_model.predict_s(_decode_features(decodes, active))
        step_s = self._step_budget_s(streams, any(r.is_firm for r in (*active, *waiting)))
        if step_s is None:
            return StepPlan(token_budget, fixed_chunk=fixed)
        if streams:
            step_s = min(self._gap_budget_s(r, now) for r in streams)
        pace_s = min((self._pace_budget_s(r, now, decode_step_s) for r in streams), default=math.inf)
        stretched_s = self._stretch_for_ttft(active, waiting, now, len(decodes), step_s,
                                             min(pace_s, self._rescue_step_s()))
        rescue, step_s = stretched_s > step_s, stretched_s
        background = frozenset(r.request_id for r in (*active, *waiting)
                               if streams and self.order_key(r, now)[0] == BACKGROUND)
        # Beside soft streams only, the streams' pace is spent on prompts: a step stretches to hold
        # the chunks of prompts on time (`_stretch_ids`), and a chunk must be worth its fixed cost
        # (otherwise a decode-only step banks pace for it). Beside firm work (every gap a deadline; a
        # firm prompt admitted on a prediction of ITL-sized steps) prefill progresses by the minimum
        # chunk.
        min_chunk, min_work_s, stretch_s, finish_s = self.config.min_prefill_chunk, 0.0, None, None
        if streams and not any(r.is_firm for r in (*active, *waiting)):
            min_work_s = _EFFICIENT_CHUNK_FACTOR * self._chunk_overhead_s()
            min_chunk = 0 if min_work_s > 0 else min_chunk
            stretch_s = max(min(pace_s, self._rescue_step_s()), step_s) - decode_step_s
            finish_s = max(min(pace_s, self._ttft_budget_s()), step_s) - decode_step_s
        return StepPlan(token_budget, step_s - decode_step_s, trust, min_chunk,
                        background, fixed, self.cost_model, rescue, min_chunk_work_s=min_work_s,
                        stretch_left_s=stretch_s, finish_left_s=finish_s,
                        stretch_ids=self._stretch_ids(active, waiting, now),
                        max_chunks=1 if any(r.is_firm for r in streams) else None,
                        held_ids=held, yield_ids=yielding, yield_to_ids=yield_to)

    def _held_decodes(self, active: list[Request], waiting: list[Request],
                      now: float) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """Running batch decodes that sit this step out, keeping their blocks: batch work takes the
        time interactive (firm and soft) work leaves, not the time it needs. Returns (held: always,
        yielding: when the step carries a chunk of a prompt in the third set).

        With no interactive request running or waiting, none sits out (batch fills the engine). Beside
        interactive work the oldest run within `background_slot_share` of the ITL cap, as batch
        admission does there (`can_admit`); the rest are held. Those yield to the interactive prompts
        on time: a step that carries one of their chunks runs none of them, since every decode in it
        would come off that prompt's prefill (`plan_step` gives a prompt the step's time less its
        decodes'); in the Batch API benchmark soft attainment fell 11.7 points beside a batch whose
        decodes always ran. A batch decode that waited `batch_max_wait_s` runs whatever comes, as a
        starving prompt does, so none waits forever."""
        none = frozenset()
        background = [r for r in active if r.rt.rt_class == RTClass.BATCH and r.num_remaining_prefill_tokens == 0
                      and now - (r.last_token_time or r.arrival_time) < self.config.batch_max_wait_s]
        interactive = [r for r in (*active, *waiting) if r.rt.rt_class != RTClass.BATCH]
        if not background or not interactive:
            return none, none, none
        running = [r for r in active if r.rt.rt_class != RTClass.BATCH]
        cap = self.max_num_running(running, background[0])  # as `can_admit` sizes a batch candidate
        allowed = len(background) if cap is None else max(
            int(cap * self.config.background_slot_share) - len(running), 0)
        background.sort(key=lambda r: r.arrival_time)
        yield_to = frozenset(r.request_id for r in interactive
                             if r.num_remaining_prefill_tokens > 0 and self.order_key(r, now)[0] == ON_TIME)
        held = frozenset(r.request_id for r in background[allowed:])
        yielding = frozenset(r.request_id for r in background[:allowed]) if yield_to else none
        return held, yielding, yield_to

    def _stretch_ids(self, active: list[Request], waiting: list[Request], now: float) -> frozenset[str]:
        """The prompts a step may stretch for: those on time; when none is, the late ones (the
        streams' spare pace serves them rather than nothing, and their TTFT tail stays near FCFS's).

        Every prompt on time, not only one short of slack (`_stretch_for_ttft`): in simulation
        (tests/unit/rt_sim.py, host-fitted step costs) stretching only for prompts short of slack
        lost 10-30% goodput on the chat and long-prompt workloads; a stream's pace refills while
        its steps are short, and a prompt served early leaves the next arrivals their slack."""
        prompts = [r for r in (*active, *waiting) if r.num_remaining_prefill_tokens > 0]
        for tier in (ON_TIME, LATE):
            ids = frozenset(r.request_id for r in prompts if self.order_key(r, now)[0] == tier)
            if ids:
                return ids
        return frozenset()

    def _chunk_overhead_s(self) -> float:
        """What a prefill chunk costs besides its tokens (its own attention call and gather per layer,
        the mixed step's path): on the 2-core CPU path about 11 ms, so 8-token chunks in every
        ITL-sized step spent most of each step on overhead and fell behind the arriving prompts."""
        return max(self.cost_model.coeffs[5], 0.0)

    def _step_budget_s(self, streams: list[Request], firm_queued: bool) -> float | None:
        """A step's length with no stream to pace it: what a request arriving meanwhile can afford to
        wait for the step in flight, the longest TTFT rescue step (at least the interactive classes'
        ITL budget; only that while a firm request is queued, its admission predicted ITL-sized
        steps); None when no class has a budget."""
        if streams:
            return 0.0
        budgets = [b for b in (self.config.firm.itl_s, self.config.soft.itl_s) if b is not None]
        if not budgets:
            return None
        itl_step_s = min(budgets) / self.overrun(False)
        return itl_step_s if firm_queued else max(itl_step_s, self._rescue_step_s())

    def _rescue_step_s(self) -> float:
        """The longest step a TTFT rescue may plan: a share of the interactive TTFT budget, so that a
        request arriving meanwhile still has most of its own budget left after the step in flight."""
        return self.config.rescue_step_fraction * self._ttft_budget_s()

    def _ttft_budget_s(self) -> float:
        """The interactive classes' tightest TTFT budget (0 when neither has one). A step that ends a
        prompt may last this long (within the streams' pace): longer, and a request arriving
        meanwhile would miss its TTFT whatever comes next."""
        budgets = [b for b in (self.config.firm.ttft_s, self.config.soft.ttft_s) if b is not None]
        return min(budgets) if budgets else 0.0

    def _stretch_for_ttft(self, active: list[Request], waiting: list[Request], now: float, num_decodes: int,
                          step_s: float, longest_s: float) -> float:
        """`longest_s` when some prompt on time is running out of TTFT slack at `step_s`-long steps
        (they would need more than `RESCUE_SLACK_SHARE` of its slack) and would make its TTFT at
        `longest_s`-long ones; else `step_s`. Prompts are served in deadline order (the scheduler's).

        This is the goodput choice: a prompt that misses its TTFT is a request lost; the longer gaps
        cost the soft streams nothing within both budgets, since `longest_s` keeps each of them
        within its pace (`_pace_budget_s`). A prompt that cannot make its TTFT even at `longest_s`
        is lost whatever the plan, and stretches nothing. Nothing is stretched while a firm prompt
        waits: its admission predicted its TTFT at ITL-sized steps.
        """
        if longest_s <= step_s or any(r.is_firm and r.first_token_time is None for r in (*active, *waiting)):
            return step_s  # a firm prompt was admitted on a prediction of ITL-sized steps
        prompts = sorted((r for r in (*active, *waiting) if r.first_token_time is None
                          and r.num_remaining_prefill_tokens > 0 and r.ttft_deadline is not None
                          and self.order_key(r, now)[0] == ON_TIME), key=lambda r: self.order_key(r, now))
        num_context = _num_context(active)
        rates = [self._prefill_rate(s, num_decodes, num_context) for s in (step_s, longest_s)]
        num_ahead = 0
        for req in prompts:
            num_ahead += _prefill_left(req)[1]
            slack_s = req.ttft_deadline - now
            short_s, long_s = (num_ahead / rate if rate > 0 else math.inf for rate in rates)
            if short_s > RESCUE_SLACK_SHARE * slack_s and long_s <= slack_s:
                return longest_s
        return step_s

    def _prefill_rate(self, step_s: float, num_decodes: int, num_context: int) -> float:
        """Prefill tokens per second when every step lasts `step_s` beside these decodes."""
        fit = min(self.cost_model.max_prefill_tokens(step_s, num_decodes, num_context),
                  self.cost_model.trusted_prefill_tokens)
        return max(fit, self.config.min_prefill_chunk) / max(step_s, 1e-6)

    def interactive_prefill_tokens(self, plan: StepPlan, token_budget: int) -> int:
        """Prefill tokens an arriving interactive prompt would get per step (admission's prediction):
        one chunk at position 0 within `plan` (the next step's), at least `min_prefill_chunk`."""
        if plan.time_left_s is None:
            return plan.prefill_token_budget
        time_left_s = plan.time_left_s - sum(
            self.cost_model.prefill_chunk_s(n, 0) for n in plan.fixed_chunk.values())
        fit = min(self.cost_model.max_chunk_tokens(max(time_left_s, 0.0), 0), plan.trust_left)
        return max(min(fit, token_budget), min(self.config.min_prefill_chunk, token_budget))

    def runs_first(self, waiting_req: Request, running_req: Request, now: float) -> bool:
        """A waiting request ranked before a running prefill takes the prefill budget before it."""
        return self.order_key(waiting_req, now) < self.order_key(running_req, now)

    def max_chunk_tokens(self, req: Request, now: float) -> int | None:
        """The starving batch request's share of each step; None (no cap) for everyone else."""
        return self.config.min_prefill_chunk if self.is_starving(req) else None

    def can_admit(self, req: Request, running: list[Request], now: float) -> bool:
        """True while a step with one more decode still fits the ITL budget (see `max_num_running`).

        Late and background (batch) work joins only below `background_slot_share` of that cap: it holds
        its slot for many steps, and the rest of the cap stays free for on-time arrivals. Batch work
        with no interactive request running joins up to the sequence slots (an interactive arrival
        preempts it: `victims_for`), and an interactive candidate does not count running batch
        requests (beside it their decodes take only their share: `_held_decodes`). The first request
        always joins an empty running set.
        """
        active = [r for r in running if not r.is_paused]
        batch = req.rt.rt_class == RTClass.BATCH
        if batch and all(r.rt.rt_class == RTClass.BATCH for r in active):
            return True  # no interactive work: batch fills the engine (an arrival makes room: `victims_for`)
        if not batch:  # batch decodes beyond their share sit out the steps beside it (`_held_decodes`)
            active = [r for r in active if r.rt.rt_class != RTClass.BATCH]
        cap = self.max_num_running(active, req)
        if cap is None:
            return True
        if self.order_key(req, now)[0] in (LATE, BACKGROUND):
            cap = int(cap * self.config.background_slot_share)
        # Alone, a request runs whatever the model predicts: nothing would run better, and the engine
        # must make progress.
        return len(active) + 1 <= max(cap, 1)

    def beside_interactive_prompt(self, running: list[Request]) -> list[Request]:
        """The running requests whose decodes share the steps of an arriving interactive prompt's
        prefill, and whose slots it cannot take: all but batch work (`_held_decodes`, `victims_for`),
        the starving batch request excepted."""
        return [r for r in running if r.rt.rt_class != RTClass.BATCH or self.is_starving(r)]

    def max_num_running(self, running: list[Request], req: Request | None = None) -> int | None:
        """Most sequences a step may hold (as decodes, beside a minimum prefill chunk) and still end
        within the tightest ITL budget, less the delivery margin and the overrun margin (`overrun`):
        the running streams', the candidate's
        (a firm request's default when `req` is None). Batch candidates are also held to the interactive
        classes' default ITL, so batch decodes never take the capacity a stream would need.
        None: no bound (uncalibrated model, or no ITL budget anywhere).
        """
        if not self.cost_model.is_calibrated:
            return None
        active = [r for r in running if not r.is_paused]
        itls = [r.rt.itl_s for r in active if r.rt.itl_s is not None]
        if req is None or req.rt.rt_class == RTClass.BATCH:
            itls += [self.config.firm.itl_s] + ([self.config.soft.itl_s] if req is not None else [])
        else:
            itls.append(req.rt.itl_s)
        itls = [i for i in itls if i is not None]
        if not itls:
            return None
        num_context = sum(r.num_tokens for r in active) + (req.num_tokens if req is not None else 0)
        firm = req is None or req.is_firm or any(r.is_firm for r in active)
        margin_s = self.config.firm_delivery_margin_s if firm else self.config.delivery_margin_s
        step_s = (min(itls) - margin_s) / self.overrun(firm)
        # Beside a firm stream every step must leave room for a minimum prefill chunk (its gaps are
        # deadlines); soft streams are paced (module doc), so a step of decodes alone must fit.
        chunk = self.config.min_prefill_chunk if firm else 0
        cap = self.cost_model.max_decodes(step_s, chunk, num_context)
        # Never below `min_running`: in a real run on a contended host the linear model's fit drove
        # the cap to 0 and serialized the streams (soft TTFT p99 30 s at 0.75 req/s).
        return None if cap is None else max(cap, self.config.min_running)

    def _slack_s(self, req: Request, now: float) -> float:
        due = req.next_token_deadline
        return (req.arrival_time + self.config.batch_max_wait_s if due is None else due) - now

    def _victim_rank(self, req: Request) -> int:
        """Who gives way first: batch (not starving), soft, the starving batch, firm."""
        if req.rt.rt_class == RTClass.BATCH:
            return 1 if self.is_starving(req) else 3
        return 2 if req.rt.rt_class == RTClass.SOFT else 0

    def pick_victim(self, candidates: list[Request], now: float) -> Request:
        """Batch first, then soft, then the most slack; among equals the most recently admitted."""
        def rank(item: tuple[int, Request]) -> tuple[int, float, int]:
            i, r = item
            return self._victim_rank(r), self._slack_s(r, now), i
        return max(enumerate(candidates), key=rank)[1]

    def victims_for(self, req: Request, running: list[Request], now: float) -> list[Request]:
        """Running requests that may be preempted to make room for waiting `req`, first victim first.

        An on-time firm request makes room from batch (not the starving one) and soft work, batch by
        most slack, then soft by most slack; a soft one, on time or late, from batch only: batch fills
        the slots and blocks interactive work leaves, and its decodes beside interactive work are
        mostly held (`_held_decodes`), so a soft request waiting for batch to finish its blocks waited
        40-90 s in the Batch API benchmark. Firm streams are never displaced.
        """
        if req.rt.rt_class == RTClass.BATCH or (req.is_firm and self.order_key(req, now)[0] != ON_TIME):
            return []
        on_time_firm = req.is_firm and self.order_key(req, now)[0] == ON_TIME
        movable = [(i, r) for i, r in enumerate(running) if self._victim_rank(r) >= (2 if on_time_firm else 3)]
        # among equals the most recently admitted, as `pick_victim`
        return [r for _, r in sorted(movable, key=lambda m: (self._victim_rank(m[1]), self._slack_s(m[1], now), m[0]),
                                     reverse=True)]

    def num_firm_victims(self, running: list[Request], now: float) -> int:
        """How many running requests an on-time firm arrival could preempt (admission's slot wait)."""
        return sum(1 for r in running if self._victim_rank(r) >= 2)

    def expired(self, requests: Iterable[Request], now: float) -> list[tuple[Request, str]]:
        """Firm requests whose next token can no longer be on time: (request, error text)."""
        out = []
        for req in requests:
            reason = firm_deadlines.drop_reason(req, now, self.cost_model)
            if reason is not None:
                out.append((req, reason))
        return out

    def late_token(self, req: Request, now: float) -> str | None:
        """A firm token sampled after its deadline is not delivered: the error text, or None."""
        return firm_deadlines.late_token_reason(req, now)


UNCALIBRATED_PREFILL_TOKENS = 64  # a fresh server's 512-token prefill steps took 400-740 ms each
# A prompt is running out of TTFT slack when the prefill ahead of it, at ITL-sized steps, would take
# more than this share of it: predictions are of typical steps, and more prompts may arrive before it.
RESCUE_SLACK_SHARE = 0.4
_EFFICIENT_CHUNK_FACTOR = 4  # a chunk's tokens cost at least 4x its fixed cost (overhead <= 20 %)
PACE_HORIZON_TOKENS = 16  # a soft stream's longer gap must be repaid within this many tokens
# A noisy host's overrun tail must not shrink every plan to nothing: margins are capped at these.
_MAX_OVERRUN = 2.0
_MAX_FIRM_OVERRUN = 4.0


def _streams(decodes: Iterable[Request]) -> list[Request]:
    """Decoding requests that have sent a token and have an ITL budget (a next-token deadline)."""
    return [r for r in decodes if r.last_token_time is not None and r.rt.itl_s is not None]


def _prefill_left(req: Request) -> tuple[int, int]:
    """(position, tokens) of the prefill `req` still needs: a waiting prompt starts after the part
    the prefix cache holds (`Request.num_prefix_hit_tokens`)."""
    start = max(req.num_computed_tokens, req.num_prefix_hit_tokens)
    return start, max(req.num_tokens - start, 0)


def _decode_features(decodes: list[Request], active: list[Request]) -> StepFeatures:
    """A step of these decodes alone, each grammar-constrained one paying its mask (cost_model.MASK_ROW_S)."""
    return StepFeatures(len(decodes), 0, _num_context(active),
                        num_masked_rows=sum(r.grammar is not None for r in decodes))


def _num_context(requests: Iterable[Request]) -> int:
    return sum(r.num_computed_tokens for r in requests)


def make_policy(config: RTConfig, cost_model: StepCostModel) -> FCFSPolicy | DeadlinePolicy:
    if config.policy == "fcfs":
        return FCFSPolicy()
    return DeadlinePolicy(config, cost_model)
