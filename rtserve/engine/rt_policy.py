"""Real-time scheduling policy: what runs next, how many prefill tokens fit, who is preempted, who expired.

The scheduler owns the mechanics (token budget, KV allocation, preemption by recompute); it asks a
policy object four questions each step. Two implementations, chosen by `RTConfig.policy`:

- `FCFSPolicy` ("fcfs"): arrival order, full prefill budget, the last admitted request is preempted,
  nothing expires. Today's behaviour, kept as the baseline to compare against.
- `DeadlinePolicy` ("deadline"): earliest deadline first (EDF) over each request's next due time
  (TTFT deadline before its first token, last token + ITL budget after it); each step's prefill
  tokens are capped so the cost model predicts the step to end before the tightest next-token
  deadline of the running streams (decodes never stall behind a long prompt); batch requests carry
  a virtual deadline `arrival + batch_max_wait_s`, so they fill leftover capacity but never starve;
  the victim of a preemption is the request with most slack, batch first.

Request classes: `firm` is refused at admission if its TTFT cannot be met (rtserve/engine/admission.py)
and dropped (FinishReason.DEADLINE) once its TTFT deadline passes before its first token, or its
whole-response deadline passes while streaming; `soft` is best effort, misses are counted;
`batch` has no deadline. `hard` is refused: see HARD_CLASS_MESSAGE.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from rtserve.config import RTConfig
from rtserve.engine.cost_model import StepCostModel, StepFeatures
from rtserve.engine.request import Request
from rtserve.engine.rt_params import HARD_CLASS_MESSAGE, resolve_rt  # noqa: F401 - re-exported
from rtserve.protocol import RTClass

class FCFSPolicy:
    """Arrival order; the scheduler's behaviour before real-time policy existed."""

    name = "fcfs"
    enforces_deadlines = False  # no admission control, no expiry

    def order_key(self, req: Request) -> float:
        return req.arrival_time

    def order_waiting(self, waiting: deque[Request], now: float) -> None:
        """Preempted requests were put back at the front; the rest stay in arrival order."""

    def order_running(self, running: list[Request], now: float) -> None:
        pass

    def prefill_token_budget(self, running: list[Request], now: float, token_budget: int,
                             waiting: Iterable[Request] = ()) -> int:
        return token_budget

    def step_time_budget_s(self, running: list[Request], now: float) -> float | None:
        return None

    def pick_victim(self, candidates: list[Request], now: float) -> Request:
        return candidates[-1]  # the most recently admitted

    def expired(self, requests: Iterable[Request], now: float) -> list[tuple[Request, str]]:
        return []

    def late_token(self, req: Request, now: float) -> str | None:
        return None


class DeadlinePolicy:
    """Earliest deadline first, ITL-slack-sized prefill chunks, most-slack preemption, firm expiry."""

    name = "deadline"
    enforces_deadlines = True

    def __init__(self, config: RTConfig, cost_model: StepCostModel) -> None:
        self.config = config
        self.cost_model = cost_model

    def order_key(self, req: Request) -> float:
        """When this request next needs service; batch work gets a virtual, distant deadline."""
        due = req.next_token_deadline
        if due is not None:
            return due
        return req.arrival_time + self.config.batch_max_wait_s

    def order_waiting(self, waiting: deque[Request], now: float) -> None:
        ordered = sorted(waiting, key=lambda r: (self.order_key(r), r.arrival_time))
        waiting.clear()
        waiting.extend(ordered)

    def order_running(self, running: list[Request], now: float) -> None:
        """Decodes first (stall-free), each group by deadline; the tail holds the preemption candidates."""
        running.sort(key=lambda r: (r.num_remaining_prefill_tokens > 0, self.order_key(r), r.arrival_time))

    def prefill_token_budget(self, running: list[Request], now: float, token_budget: int,
                             waiting: Iterable[Request] = ()) -> int:
        """Prefill tokens that keep the step's predicted time within the tightest ITL slack.

        EDF across both kinds of work: when some prompt's TTFT deadline, still reachable, comes before
        the tightest stream's next token, the prompt is the more urgent work and gets the whole budget.
        A prompt already past its deadline does not (under overload every queued prompt is late, and
        letting them all win would stall every stream: EDF's domino effect).
        """
        if not self.cost_model.is_calibrated:
            return token_budget
        decodes = [r for r in running if not r.is_paused and r.num_remaining_prefill_tokens == 0]
        streams = _streams(decodes)
        if not streams:
            return token_budget
        stream_due = min(r.next_token_deadline for r in streams)
        prompt_dues = [self.order_key(r) for r in (*running, *waiting)
                       if not r.is_paused and r.num_remaining_prefill_tokens > 0]
        if any(now <= due <= stream_due for due in prompt_dues):
            return token_budget
        time_budget_s = self.step_time_budget_s(decodes, now)
        num_context = sum(r.num_computed_tokens for r in running if not r.is_paused)
        fit = self.cost_model.max_prefill_tokens(time_budget_s, len(decodes), num_context)
        return max(min(fit, token_budget), min(self.config.min_prefill_chunk, token_budget))

    def step_time_budget_s(self, running: list[Request], now: float) -> float | None:
        """Seconds the next step may take so that the tightest stream's next token is on time; None
        when no running stream has an ITL budget. Bounds prefill chunks and verification alike.

        A stream already late (slack used up) still bounds the step: to half its ITL budget, so that
        prefill keeps progressing and the next gap stays near the budget.
        """
        streams = _streams(r for r in running if not r.is_paused and r.num_remaining_prefill_tokens == 0)
        if not streams:
            return None
        stream_due = min(r.next_token_deadline for r in streams)
        return max(stream_due - now, 0.5 * min(r.rt.itl_s for r in streams))

    def pick_victim(self, candidates: list[Request], now: float) -> Request:
        """Batch first, then the most slack; among equals the most recently admitted."""
        def rank(item: tuple[int, Request]) -> tuple[bool, float, int]:
            i, r = item
            return r.rt.rt_class == RTClass.BATCH, self.order_key(r) - now, i
        return max(enumerate(candidates), key=rank)[1]

    def expired(self, requests: Iterable[Request], now: float) -> list[tuple[Request, str]]:
        """Firm requests that became late, or will be before even the shortest step could end.

        Returns (request, error text). Soft and batch never expire.
        """
        out = []
        # No step ends sooner than the model's smallest step: a first token due before then is lost.
        horizon_s = self.cost_model.predict_s(StepFeatures(0, 1, 0)) if self.cost_model.is_calibrated else 0.0
        for req in requests:
            if not req.is_firm:
                continue
            ttft_due, deadline = req.ttft_deadline, req.deadline
            if req.first_token_time is None and ttft_due is not None and now + horizon_s > ttft_due:
                where = "queued" if req.num_computed_tokens == 0 else "prefilling"
                out.append((req, f"deadline: ttft budget of {req.rt.ttft_s * 1000:.0f} ms passed while "
                                 f"{where} ({(now - req.arrival_time) * 1000:.0f} ms since arrival); "
                                 f"dropped without sending a token"))
            elif deadline is not None and now > deadline:
                out.append((req, f"deadline: deadline_ms budget of {req.rt.deadline_s * 1000:.0f} ms passed "
                                 f"after {req.num_output_tokens} tokens; stopped"))
        return out

    def late_token(self, req: Request, now: float) -> str | None:
        """A firm request's token sampled after its deadline is not delivered: the error text, or None."""
        if not req.is_firm:
            return None
        if req.first_token_time is None and req.ttft_deadline is not None and now > req.ttft_deadline:
            return (f"deadline: ttft budget of {req.rt.ttft_s * 1000:.0f} ms passed before the first token was "
                    f"ready ({(now - req.arrival_time) * 1000:.0f} ms); dropped without sending a token")
        if req.deadline is not None and now > req.deadline:
            return (f"deadline: deadline_ms budget of {req.rt.deadline_s * 1000:.0f} ms passed after "
                    f"{req.num_output_tokens} tokens; stopped")
        return None


def _streams(decodes: Iterable[Request]) -> list[Request]:
    """Decoding requests that have sent a token and have an ITL budget (a next-token deadline)."""
    return [r for r in decodes if r.last_token_time is not None and r.rt.itl_s is not None]


def make_policy(config: RTConfig, cost_model: StepCostModel) -> FCFSPolicy | DeadlinePolicy:
    if config.policy == "fcfs":
        return FCFSPolicy()
    return DeadlinePolicy(config, cost_model)
