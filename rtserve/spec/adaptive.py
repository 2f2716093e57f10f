"""Adaptive speculation length: measured acceptance and step times in, k per request out (0 included).

With per-token acceptance rate a, the j-th draft token of a request is used only if all j before it
were, so it adds a^j expected tokens; k drafts give E = 1 + a + ... + a^k tokens per verify step
(Leviathan et al.). The runner computes every draft as one more decode row, so a step with m drafts
costs what a decode step with m more rows costs: that is measured (StepTimeTable), not assumed.
Each step the chooser takes the draft tokens with the largest expected gain first and keeps the
prefix that maximises

    goodput = expected emitted tokens / (predicted step time + predicted draft time)

(SmartSpec, arXiv 2406.14066); equivalently, drafts are verified only when the tokens they are
expected to add, each worth the step's time per token without drafts, outweigh the extra step time.
k = 0 for everyone is always a candidate (and the answer unless the gain beats it by
`min_rel_gain`), and no candidate may take longer than the step's real-time budget.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Sequence



class StepTimeTable:
    """Measured time of decode-only steps by their number of decode rows (the median of the last
    `window` steps of each size: another process stalling a step does not move it).

    CPU kernels make step time far from linear in rows (an int4 GEMV per row below some M, a bf16
    GEMM above it), so the k chooser trusts what steps of the same size actually took, interpolates
    between measured sizes, and extrapolates with the steeper of the cost model's slope and the
    measured one. A size is forgotten when not seen for `max_age_steps`, or sooner while it has few
    samples (`probe_age_steps` per sample): a size that looked slow once (a stall) must not block
    speculation for long. The engine's first `warmup_steps` steps are not recorded: they run cold
    (TorchScript's profiling runs, first allocations) and took several times a warm step here.
    """

    def __init__(self, window: int = 9, max_age_steps: int = 1000, probe_age_steps: int = 30,
                 warmup_steps: int = 8) -> None:
        self.window, self.max_age_steps, self.probe_age_steps = window, max_age_steps, probe_age_steps
        self.warmup_steps = warmup_steps
        self._num_seen = 0
        self._step = 0
        self._samples: dict[int, deque[float]] = {}
        self._table: dict[int, tuple[float, int]] = {}  # num_rows -> (median seconds, step last seen)

    def observe(self, num_rows: int, step_s: float) -> None:
        self._num_seen += 1
        if self._num_seen <= self.warmup_steps:
            return
        self._step += 1
        samples = self._samples.setdefault(num_rows, deque(maxlen=self.window))
        if not self._is_fresh(num_rows):
            samples.clear()
        samples.append(step_s)
        self._table[num_rows] = (median(samples), self._step)

    def _is_fresh(self, num_rows: int) -> bool:
        entry = self._table.get(num_rows)
        if entry is None:
            return False
        max_age = min(self.max_age_steps, self.probe_age_steps * len(self._samples[num_rows]))
        return self._step - entry[1] <= max_age

    def curve(self, fallback: Callable[[int], float]) -> Callable[[int], float]:
        """A predictor n -> seconds over the current measurements (build it once per decision);
        `fallback(n)` (the cost model) fills the ranges nothing was measured in."""
        fresh = sorted((n, v) for n, (v, _) in self._table.items() if self._is_fresh(n))
        if not fresh:
            return fallback
        sizes, values = [n for n, _ in fresh], [v for _, v in fresh]
        top, v_top = sizes[-1], values[-1]
        slope = (v_top - values[-2]) / (top - sizes[-2]) if len(sizes) > 1 else 0.0
        at_bottom, at_top = fallback(sizes[0]), fallback(top)  # the chooser asks for ~100 sizes a step

        def predict(n: int) -> float:
            if n > top:  # above every measured size: the steeper of the model and the measured slope
                return v_top + max(fallback(n) - at_top, slope * (n - top))
            i = bisect.bisect_left(sizes, n)
            if sizes[i] == n:
                return values[i]
            if i > 0:
                w = (n - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
                return (1 - w) * values[i - 1] + w * values[i]
            return max(values[0] - (at_bottom - fallback(n)), 0.0)  # below: the model's difference, >= 0
        return predict

    def predict(self, num_rows: int, fallback: Callable[[int], float]) -> float:
        return self.curve(fallback)(num_rows)


class _RecentOutcomes:
    """The last `window` verify-step outcomes, each stamped with the step it was measured at. Those
    older than `max_age_steps` are forgotten, so a correction that stopped speculation lapses and
    speculation is probed again; until `min_samples` fresh ones exist there is no correction."""

    def __init__(self, window: int, min_samples: int, max_age_steps: int) -> None:
        self.min_samples, self.max_age_steps = min_samples, max_age_steps
        self._samples: deque[tuple] = deque(maxlen=window)  # (step, *values)
        self._step = 0

    def tick(self) -> None:
        self._step += 1

    def _record(self, *values: float) -> None:
        self._samples.append((self._step, *values))

    def _fresh(self) -> list[tuple]:
        """The values of the fresh outcomes, or [] while there are fewer than `min_samples`."""
        fresh = [values for step, *values in self._samples if self._step - step <= self.max_age_steps]
        return fresh if len(fresh) >= self.min_samples else []


class DraftCostCorrection(_RecentOutcomes):
    """How much more (or less) verifying drafts really costs than predicted: over the last `window`
    verify steps, their measured extra time (over the same step without drafts) summed, divided by
    the predicted extra time summed. A sum weighs each step by its drafts: with 32 streams a step
    with 3 drafts is predicted 2 ms over its base and measured within +-3 ms of noise.

    The step-time curve extrapolates draft rows past the sizes it measured with the cost model's
    slope, and a verify step also pays for what it emits (acceptance, more tokens out). At 16 and
    32 streams here that made verify steps 7-15 ms longer than predicted, and speculation with 66-82%
    acceptance cost 6% throughput. Each step's measurement is clamped to [`lo`, `hi`] times its
    prediction (a stalled step), and the scale is 1 until `min_samples` steps were measured (one cold
    verify step must not stop speculation).
    """

    def __init__(self, window: int = 16, min_samples: int = 4, max_age_steps: int = 500,
                 lo: float = 0.5, hi: float = 4.0) -> None:
        super().__init__(window, min_samples, max_age_steps)
        self.lo, self.hi = lo, hi

    def observe(self, predicted_extra_s: float, measured_extra_s: float) -> None:
        if predicted_extra_s > 0:
            measured = min(max(measured_extra_s, self.lo * predicted_extra_s), self.hi * predicted_extra_s)
            self._record(predicted_extra_s, measured)

    @property
    def scale(self) -> float:
        fresh = self._fresh()
        return sum(m for _, m in fresh) / sum(p for p, _ in fresh) if fresh else 1.0


class SpeedupCalibration(_RecentOutcomes):
    """How far the chooser's predicted speed-ups have come true: the median, over the last `window`
    decode-only verify steps, of realized / predicted speed-up, where a step's realized speed-up is
    (tokens emitted / decodes) x (predicted step time without drafts / measured time).

    The chooser's prediction multiplies acceptance estimates by step-time estimates, and both err: at
    32 streams here verify steps predicted at 1.18x realized 0.96x (0.91 vs 1.12 tokens per ms for
    the steps without drafts). The engine then discounts its predictions by that factor before it
    decides to speculate (`required_gain`): whatever the source of the error, speculation that has
    not been paying stops. A median over at least `min_samples` steps (a stalled step is one sample),
    never above 1 (pessimistic predictions are left alone).
    """

    def __init__(self, window: int = 32, min_samples: int = 8, max_age_steps: int = 500) -> None:
        super().__init__(window, min_samples, max_age_steps)

    def observe(self, predicted_speedup: float, realized_speedup: float) -> None:
        if predicted_speedup > 0:
            self._record(realized_speedup / predicted_speedup)

    @property
    def factor(self) -> float:
        """Realized / predicted speed-up lately, at most 1 (1 until measured)."""
        fresh = self._fresh()
        return min(median(r for (r,) in fresh), 1.0) if fresh else 1.0

    def required_gain(self, min_rel_gain: float) -> float:
        """Predicted gain over `min_rel_gain` needed so that the discounted prediction clears it."""
        return (1.0 + min_rel_gain) / max(self.factor, 1e-3) - (1.0 + min_rel_gain)


@dataclass
class SpecLengthChooser:
    """Chooses how many draft tokens each request verifies this step.

    `min_rel_gain`: speculate only if predicted goodput beats k = 0 by this fraction (step times
    are noisy; a marginal predicted win is not worth the variance it adds to the step time).
    """

    max_k: int
    min_rel_gain: float = 0.05
    _last_goodput: tuple[float, float] = field(default=(0.0, 0.0), repr=False)  # (k=0, chosen), per second

    def choose(self, rates: Sequence[float], max_ks: Sequence[int], step_time_s: Callable[[int], float],
               draft_time_s: Callable[[int, int], float] = lambda num_rounds, num_tokens: 0.0,
               max_step_s: float = math.inf, extra_gain: float = 0.0) -> list[int]:
        """k per request. rates[i]: acceptance rate; max_ks[i]: tokens available (proposal length, or
        max_k before proposing); step_time_s(n): predicted step time with n draft rows on top of this
        step's decodes and prefill; draft_time_s(rounds, tokens): predicted proposing time;
        max_step_s: the real-time budget of the step (drafts included), inf when none; extra_gain:
        predicted speed-up demanded on top of `min_rel_gain` (the predictions' measured optimism).
        """
        # Largest gain first; ties (rate 1) in position order, so each request's drafts stay a prefix.
        gains = sorted(((rate ** j, i, j) for i, rate in enumerate(rates)
                        for j in range(1, min(max_ks[i], self.max_k) + 1) if rate > 0.0),
                       key=lambda g: (-g[0], g[1], g[2]))
        base = len(rates) / max(step_time_s(0), 1e-9)
        best_m, best, tokens, depth = 0, base, float(len(rates)), 0
        for m, (gain, i, j) in enumerate(gains, start=1):
            tokens += gain
            depth = max(depth, j)
            time_s = step_time_s(m) + draft_time_s(depth, m)
            if time_s > max_step_s:
                break  # later prefixes only add rows
            goodput = tokens / max(time_s, 1e-9)
            if goodput > best:
                best_m, best = m, goodput
        if best < base * (1.0 + self.min_rel_gain + extra_gain):
            best_m, best = 0, base
        self._last_goodput = (base, best)
        ks = [0] * len(rates)
        for _, i, j in gains[:best_m]:
            ks[i] = max(ks[i], j)
        return ks

    @property
    def predicted_speedup(self) -> float:
        """Predicted goodput of the last choice relative to no speculation (1.0: none chosen)."""
        base, chosen = self._last_goodput
        return chosen / base if base > 0 else 1.0
