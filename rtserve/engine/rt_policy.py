"""Real-time scheduling policy: what runs next, how much fits a step, who makes room, who is dropped.

The scheduler owns the mechanics (token budget, KV allocation, preemption by recompute); each step it
asks a policy object to order the queues, size the prefill budget, admit, pick victims and name late
requests. Two implementations, chosen by `RTConfig.policy`:

- `FCFSPolicy` ("fcfs"): arrival order, full prefill budget, admission limited only by sequence slots
  and KV blocks, the last admitted request is preempted, nothing expires (vLLM's behaviour: the
  baseline to compare against).
- `DeadlinePolicy` ("deadline"), built for overload, where plain EDF fails: every queued request is
  late, and serving the most overdue first makes every newer one late too (the domino effect). So work
  is ordered in tiers, EDF inside each (`order_key` = (tier, time)):

      starving batch  <  on time  <  late  <  background

  *on time*: firm or soft work whose next deadline (TTFT, then last token + ITL) is still ahead;
  *late*: soft work already past it (it has missed; it runs in capacity on-time work leaves);
  *background*: batch, by arrival; *starving batch*: the oldest batch request that has waited past
  `batch_max_wait_s` and still needs prefill: first in line for slots and blocks, but limited to
  `min_prefill_chunk` prefill tokens a step, so batch never starves yet cannot stall the streams.
  A waiting request ranked before a running prefill takes the prefill budget first (`runs_first`).
  Each step is planned with the cost model to end within a fraction (`plan_fraction`, which leaves
  room for the model's measured overruns) of the tightest running stream's ITL slack, and to last at
  most `max_step_stretch` times its decodes alone (an even cadence). A request joins the running set
  only while a step with one more decode still fits the ITL budget (`can_admit`): more streams than
  that would make every stream late; late and batch work only below `background_slot_share` of that.
  A waiting on-time firm request that finds no slot or blocks may preempt batch work, then soft work
  with the most slack (`victims_for`); firm streams are never preempted for it.

Firm requests are refused at admission when their TTFT cannot be met (rtserve/engine/admission.py)
and dropped once their next token can no longer be on time (rtserve/engine/firm_deadlines.py).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from rtserve.config import RTConfig
from rtserve.engine import firm_deadlines
from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request
from rtserve.engine.rt_params import HARD_CLASS_MESSAGE, resolve_rt  # noqa: F401 - re-exported
from rtserve.engine.rt_params import BACKGROUND, LATE, ON_TIME, STARVING, OrderKey
from rtserve.protocol import RTClass


class FCFSPolicy:
    """Arrival order; the scheduler's behaviour before real-time policy existed."""

    name = "fcfs"
    enforces_deadlines = False  # no admission control, no expiry

    def order_key(self, req: Request, now: float) -> OrderKey:
        return ON_TIME, req.arrival_time

    def order(self, running: list[Request], waiting: deque[Request], now: float) -> None:
        """Preempted requests were put back at the front; the rest stay in arrival order."""

    def prefill_token_budget(self, running: list[Request], now: float, token_budget: int,
                             waiting: Iterable[Request] = (), interactive: bool = False) -> int:
        return token_budget

    def step_time_budget_s(self, running: list[Request], now: float) -> float | None:
        return None

    def max_chunk_tokens(self, req: Request, now: float) -> int | None:
        return None

    def chunk_tokens(self, req: Request, start: int, num_tokens: int, now: float) -> int:
        return num_tokens

    def spend_prefill(self, req: Request, start: int, num_tokens: int) -> None:
        pass

    def runs_first(self, waiting_req: Request, running_req: Request, now: float) -> bool:
        return False  # running requests keep the prefill budget they had

    def can_admit(self, req: Request, running: list[Request], now: float) -> bool:
        return True

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
    """Tiered EDF, ITL-sized steps and admission, firm-first room making, firm drops (module doc)."""

    name = "deadline"
    enforces_deadlines = True

    def __init__(self, config: RTConfig, cost_model: StepCostModel) -> None:
        self.config = config
        self.cost_model = cost_model
        self._starving_id: str | None = None  # refreshed by `order` each step
        # This step's prefill plan (set by `prefill_token_budget`, spent chunk by chunk): seconds left
        # for prefill chunks (None: unbounded), whether streams are running, whether a chunk was placed.
        self._prefill_left_s: float | None = None
        self._plan_has_streams = False
        self._plan_first_chunk = True
        self._prefill_trust_left = 0  # prefill tokens the model has grounds to predict (see the cost model)

    def order_key(self, req: Request, now: float) -> OrderKey:
        if req.request_id == self._starving_id:
            return STARVING, req.arrival_time
        due = req.next_token_deadline
        if due is None:
            return BACKGROUND, req.arrival_time
        return (ON_TIME if due >= now else LATE), due

    def order(self, running: list[Request], waiting: deque[Request], now: float) -> None:
        """Running: decodes first (stall-free), then prefills by key. Waiting: by key."""
        self._starving_id = self._oldest_starving_batch((*running, *waiting), now)
        running.sort(key=lambda r: (r.num_remaining_prefill_tokens > 0, self.order_key(r, now),
                                    r.arrival_time))
        ordered = sorted(waiting, key=lambda r: (self.order_key(r, now), r.arrival_time))
        waiting.clear()
        waiting.extend(ordered)

    def _oldest_starving_batch(self, requests: Iterable[Request], now: float) -> str | None:
        starving = [r for r in requests if r.rt.rt_class == RTClass.BATCH and not r.is_paused
                    and r.num_remaining_prefill_tokens > 0 and now - r.arrival_time >= self.config.batch_max_wait_s]
        return min(starving, key=lambda r: r.arrival_time).request_id if starving else None

    def is_starving(self, req: Request) -> bool:
        return req.request_id == self._starving_id

    def plan_fraction(self, firm: bool = False) -> float:
        """The share of a slack a step is planned to fill: the rest absorbs the cost model's overruns.

        Beside a firm stream, one overrun past its deadline drops it, so the plan follows the measured
        overrun tail down to `_MIN_FIRM_PLAN_FRACTION`; otherwise never below `_MIN_PLAN_FRACTION`.
        """
        floor = _MIN_FIRM_PLAN_FRACTION if firm else _MIN_PLAN_FRACTION
        return max(min(self.config.step_slack_fraction, 1.0 / self.cost_model.overrun_ratio), floor)

    def prefill_token_budget(self, running: list[Request], now: float, token_budget: int,
                             waiting: Iterable[Request] = (), interactive: bool = False) -> int:
        """Prefill tokens that keep the step's predicted time within the tightest stream's slack.

        The slack is the time left to the earliest next-token deadline of the running streams; a
        stream already late (a soft one: firm ones are dropped) still bounds the step to half its ITL
        budget, so that prefill progresses and the next gap stays near the budget. With no stream
        running the step is bounded by the interactive classes' ITL budget all the same: a request
        arriving meanwhile waits for the step in flight. The step is planned to fill `plan_fraction`
        of that time, and each chunk is sized by its own position (`chunk_tokens`): this returns the
        step's whole token budget. `interactive`: returns instead the tokens an arriving interactive
        prompt would get (a chunk at position 0, at least `min_prefill_chunk`: admission's
        prediction), and leaves the step's plan alone.
        """
        if not interactive:
            self._prefill_left_s, self._plan_has_streams, self._plan_first_chunk = None, False, True
            self._prefill_trust_left = self.cost_model.trusted_prefill_tokens
        if not self.cost_model.is_calibrated:  # small steps until the model has measured some
            return min(token_budget, UNCALIBRATED_PREFILL_TOKENS)
        active = [r for r in running if not r.is_paused]
        decodes = [r for r in active if r.num_remaining_prefill_tokens == 0]
        streams = _streams(decodes)
        if streams:
            slack_s = _stream_slack_s(streams, now)
        else:
            budgets = [b for b in (self.config.firm.itl_s, self.config.soft.itl_s) if b is not None]
            if not budgets:
                return token_budget
            slack_s = min(budgets)
        num_context = sum(r.num_computed_tokens for r in active)
        time_budget_s = self.plan_fraction(any(r.is_firm for r in streams)) * slack_s
        decode_step_s = self.cost_model.predict_s(StepFeatures(len(decodes), 0, num_context))
        if streams:  # keep the cadence even: a prefill step is at most this much longer than a decode step
            time_budget_s = min(time_budget_s, self.config.max_step_stretch * decode_step_s)
        if not interactive:  # each chunk then takes what its own position costs (`chunk_tokens`)
            self._prefill_left_s, self._plan_has_streams = time_budget_s - decode_step_s, bool(streams)
            return token_budget
        starving = next((r for r in (*active, *waiting) if self.is_starving(r)), None)
        if starving is not None:  # its share runs first
            time_budget_s -= self.cost_model.prefill_chunk_s(
                min(self.config.min_prefill_chunk, starving.num_remaining_prefill_tokens), starving.num_computed_tokens)
        fit = min(self.cost_model.max_prefill_tokens(time_budget_s, len(decodes), num_context),  # at position 0
                  self.cost_model.trusted_prefill_tokens)
        return max(min(fit, token_budget), min(self.config.min_prefill_chunk, token_budget))

    def chunk_tokens(self, req: Request, start: int, num_tokens: int, now: float) -> int:
        """At most `num_tokens` of `req`'s prompt from position `start` that fit this step's plan.

        A chunk costs by its position (a chunk deep in a long prompt attends to all before it), and
        a step holds no more prefill tokens than the model has grounds to predict
        (`StepCostModel.trusted_prefill_tokens`). The
        starving batch request always gets its fixed share. The step's first other chunk gets at
        least `min_prefill_chunk` tokens, so prefill always progresses,
        except background batch work beside running streams: it gets only what fits, possibly nothing
        (16 tokens at position 1,900 beside 4 decodes measured 62 ms, over a 50 ms ITL budget), until
        the streams leave room or it starves.
        """
        if self._prefill_left_s is None or self.is_starving(req):
            return num_tokens  # the starving batch request's share is fixed (`max_chunk_tokens`)
        fit = min(self.cost_model.max_chunk_tokens(self._prefill_left_s, start),
                  max(self._prefill_trust_left, 0))
        if fit < self.config.min_prefill_chunk and self._plan_first_chunk and not (
                self._plan_has_streams and self.order_key(req, now)[0] == BACKGROUND):
            fit = self.config.min_prefill_chunk
        return min(num_tokens, fit)

    def spend_prefill(self, req: Request, start: int, num_tokens: int) -> None:
        """A prefill chunk was placed in the step: its predicted cost comes off the plan."""
        if not self.is_starving(req):
            self._plan_first_chunk = False
        self._prefill_trust_left -= num_tokens
        if self._prefill_left_s is not None:
            self._prefill_left_s -= self.cost_model.prefill_chunk_s(num_tokens, start)

    def step_time_budget_s(self, running: list[Request], now: float) -> float | None:
        """Seconds the next step may take so that the tightest stream's next token is on time (the
        planned share of its slack; a late stream still allows half its ITL budget); None when no
        running stream has an ITL budget. Bounds speculative verification as prefill chunks are."""
        streams = _streams(r for r in running if not r.is_paused and r.num_remaining_prefill_tokens == 0)
        if not streams:
            return None
        return self.plan_fraction(any(r.is_firm for r in streams)) * _stream_slack_s(streams, now)

    def runs_first(self, waiting_req: Request, running_req: Request, now: float) -> bool:
        """A waiting request ranked before a running prefill takes the prefill budget before it."""
        return self.order_key(waiting_req, now) < self.order_key(running_req, now)

    def max_chunk_tokens(self, req: Request, now: float) -> int | None:
        """The starving batch request's share of each step; None (no cap) for everyone else."""
        return self.config.min_prefill_chunk if self.is_starving(req) else None

    def can_admit(self, req: Request, running: list[Request], now: float) -> bool:
        """True while a step with one more decode still fits the ITL budget (see `max_num_running`).

        Late and background (batch) work joins only below `background_slot_share` of that cap: it holds
        its slot for many steps, and the rest of the cap stays free for on-time arrivals. The first
        request always joins an empty running set.
        """
        cap = self.max_num_running(running, req)
        if cap is None:
            return True
        if self.order_key(req, now)[0] in (LATE, BACKGROUND):
            cap = int(cap * self.config.background_slot_share)
        # Alone, a request runs whatever the model predicts: nothing would run better, and the engine
        # must make progress.
        return sum(1 for r in running if not r.is_paused) + 1 <= max(cap, 1)

    def max_num_running(self, running: list[Request], req: Request | None = None) -> int | None:
        """Most sequences a step may hold (as decodes, beside a minimum prefill chunk) and still end
        within `plan_fraction` of the tightest ITL budget: the running streams', the candidate's
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
        cap = self.cost_model.max_decodes(self.plan_fraction() * min(itls), self.config.min_prefill_chunk,
                                          num_context)
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

        Only an on-time firm request makes room, and only batch (not the starving one) and soft work
        give it: batch by most slack, then soft by most slack. Firm streams are never displaced.
        """
        if not req.is_firm or self.order_key(req, now)[0] != ON_TIME:
            return []
        movable = [r for r in running if self._victim_rank(r) >= 2]
        return sorted(movable, key=lambda r: (self._victim_rank(r), self._slack_s(r, now)), reverse=True)

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
_MIN_PLAN_FRACTION = 0.5  # a noisy host's overrun tail must not shrink every plan to nothing
_MIN_FIRM_PLAN_FRACTION = 0.25


def _streams(decodes: Iterable[Request]) -> list[Request]:
    """Decoding requests that have sent a token and have an ITL budget (a next-token deadline)."""
    return [r for r in decodes if r.last_token_time is not None and r.rt.itl_s is not None]


def _stream_slack_s(streams: list[Request], now: float) -> float:
    """Time to the tightest stream's next-token deadline; a stream already late (a soft one: firm ones
    are dropped) still allows half its ITL budget, so that work progresses."""
    return max(min(r.next_token_deadline for r in streams) - now, 0.5 * min(r.rt.itl_s for r in streams))


def make_policy(config: RTConfig, cost_model: StepCostModel) -> FCFSPolicy | DeadlinePolicy:
    if config.policy == "fcfs":
        return FCFSPolicy()
    return DeadlinePolicy(config, cost_model)
