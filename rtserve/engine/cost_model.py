"""Step-time cost model: predicts how long one engine step takes from what it computes.

    step_s ≈ c0 + c_decode · num_decodes + c_prefill · num_prefill_tokens + c_ctx · num_context_tokens/1000
             + c_pairs · num_prefill_pairs/10^6 + c_seq · num_prefill_seqs

A linear model (the intercept absorbs per-step Python and I/O overhead, `c_ctx` the attention reads
over the KV of every scheduled sequence, `c_pairs` the prefill attention: a chunk of n tokens starting
at position s scores n·s + n(n+1)/2 query-key pairs, so a 16-token chunk at position 1,900 costs
more than a 256-token one at 0: measured on the 2-core host, 42 ms against 21 ms at position 0 beside
one decode; `c_seq` what each prefill chunk costs besides its tokens: its own attention call per layer
with its gather of the context, and the unscripted mixed-step path: 16 tokens beside 32 decodes
measured 71 ms against 41 ms for the decodes alone), calibrated online from measured steps: every `refit_every`
steps it is refitted by least squares over the last `window` steps (the window is the forgetting),
with every coefficient kept non-negative (an active-set refit), a light ridge pull toward the prior
(a feature no recent step exercised keeps its prior cost), and one trimmed refit that drops stalls
(a step preempted by another process or a GC pause), so it predicts a typical step, not a mean
inflated by rare multi-second outliers. How far real steps overrun that typical prediction is kept
apart: `overrun_ratio` is the measured / predicted ratio a step exceeds about once in 10^5 steps,
extrapolated from the window's median and 99th percentile of log ratios as if they were normal (256
steps cannot show a 10^-5 tail); until 32 steps are measured it is a cautious 1.5. `overrun_p99` is
the ratio the window's steps exceed once in 100 (until 32 steps: 1.2). A deadline plan leaves one of
these margins (rtserve/engine/rt_policy.py): beside a firm stream the 10^-5 tail (a firm stream lives
for hundreds of steps, and one overrun step drops it); beside soft streams the p99 (an overrun there
is one late gap, counted as a miss, not a lost request).

Why not recursive least squares: with the non-negativity projection and a forgetting factor, RLS
diverged on a contended CPU (coefficients of 1e14 after a few hundred noisy steps); a windowed refit
cannot diverge and costs ~50 µs every few steps. Prediction error (EWMA of absolute and relative
error, measured before each refit can see the sample) is exported in the engine's stats.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtserve.config import COST_PRIOR_S as DEFAULT_PRIOR

NUM_FEATURES = 6
_ERR_ALPHA = 0.05    # EWMA weight of the newest prediction error
_RIDGE = 1e-4        # pull toward the prior, relative to each feature's own energy in the window
_TAIL_STRETCH = 4.265 / 2.326  # normal quantiles: z(1 - 1e-5) / z(0.99)
_OVERRUN_MIN_SAMPLES = 32
_FACTOR_ALPHA = 0.1  # EWMA weight of a step's measured slowdown at a reduced thread count
_MAX_FACTOR = 8.0
_TRUST_MIN_TOKENS = 64  # prefill tokens a step may take before larger steps have been measured
_OVERRUN_PRIOR = 1.5
_OVERRUN_P99_PRIOR = 1.2
_KEPT_SAMPLES = 32     # large prefill steps kept beside the window ...
_KEPT_MIN_TOKENS = 64  # ... of at least this many prefill tokens
# What one grammar-constrained logits row adds to a step, beyond what the forward costs: its token
# bitmask filled (on a worker thread beside the forward, not always hidden by it), applied to the
# row before sampling, and the sampled token fed to the matcher. benchmarks/structured.py on the
# 2-core host, SmolLM2 (49,152 logits): 16 constrained decode streams took 3.5-3.7 ms a step more
# than 16 unconstrained ones (about 0.23 ms a row). A constant, not a fitted coefficient: the fit's
# features leave it out (`observe` takes it off each measured step first).
MASK_ROW_S = 0.00023


@dataclass(frozen=True)
class StepFeatures:
    """What one step computes: decodes, prefill tokens, context tokens read by attention, and the
    query-key pairs of the prefill chunks' attention (`prefill_pairs`), and the number of chunks."""

    num_decodes: int
    num_prefill_tokens: int
    num_context_tokens: int = 0
    num_prefill_pairs: int = 0
    num_prefill_seqs: int = -1  # -1: one chunk when there are prefill tokens, else none
    num_masked_rows: int = 0  # logits rows under a grammar's token mask (not a fitted feature: MASK_ROW_S)

    def vector(self) -> list[float]:
        seqs = self.num_prefill_seqs if self.num_prefill_seqs >= 0 else int(self.num_prefill_tokens > 0)
        return [1.0, float(self.num_decodes), float(self.num_prefill_tokens), self.num_context_tokens / 1000.0,
                self.num_prefill_pairs / 1e6, float(seqs)]


def prefill_pairs(num_tokens: int, start: int = 0) -> int:
    """Query-key pairs a causal prefill chunk of `num_tokens` starting at position `start` scores."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


class StepCostModel:
    """Linear step-time model, refitted online over a sliding window with non-negative coefficients."""

    def __init__(self, prior: tuple[float, ...] = DEFAULT_PRIOR, window: int = 256, min_samples: int = 8,
                 refit_every: int = 4) -> None:
        if not 1 <= len(prior) <= NUM_FEATURES:
            raise ValueError(f"cost model prior needs up to {NUM_FEATURES} coefficients")
        prior = tuple(prior) + (0.0,) * (NUM_FEATURES - len(prior))  # features not given cost nothing a priori
        self.prior = np.array(prior, dtype=np.float64)
        self.theta = [float(c) for c in prior]
        self.min_samples = min_samples
        self.refit_every = refit_every
        self.num_samples = 0
        self.mean_abs_error_s = 0.0
        self.mean_rel_error = 0.0
        self.overrun_ratio = _OVERRUN_PRIOR  # measured / predicted step time exceeded once in ~10^5 steps
        self.overrun_p99 = _OVERRUN_P99_PRIOR  # ... and once in 100 steps
        self._xs: deque[list[float]] = deque(maxlen=window)
        self._ys: deque[float] = deque(maxlen=window)
        # Large prefill steps that left the window: the fit and the trust region keep them, so that
        # steps planned small for a while (ITL-sized chunks) do not forget what a large one costs.
        self._kept: deque[tuple[list[float], float]] = deque(maxlen=_KEPT_SAMPLES)
        self._fitted = False  # coefficients from measurements: predictions need their range
        self._given = False   # coefficients given (`from_coeffs`)
        # Fewer engine threads than the model was fitted at (the thread governor gives cores to other
        # processes): `theta` is the fitted model times `_factor`, the measured slowdown at this
        # count; the window holds steps divided by it (`set_threads`).
        self._threads: int | None = None
        self._base_threads: int | None = None
        self._factor = 1.0
        self._factors: dict[int, float] = {}
        self.mask_row_s = MASK_ROW_S

    @classmethod
    def from_coeffs(cls, coeffs: tuple[float, ...], calibrated: bool = True) -> "StepCostModel":
        """A read-only copy from a snapshot (the client predicts with the engine's latest model)."""
        model = cls(tuple(coeffs) if coeffs else DEFAULT_PRIOR, min_samples=1)
        model.num_samples = 1 if calibrated else 0
        model._given = True
        return model

    @property
    def is_calibrated(self) -> bool:
        return self.num_samples >= self.min_samples

    @property
    def coeffs(self) -> tuple[float, ...]:
        return tuple(self.theta)

    def predict_s(self, f: StepFeatures) -> float:
        return max(sum(t * x for t, x in zip(self.theta, f.vector())), 0.0) + self.mask_row_s * f.num_masked_rows

    def line_s(self, base: StepFeatures, per_unit: StepFeatures) -> Callable[[float], float]:
        """m -> predict_s(base + m * per_unit) as one multiply-add (the model is linear): for callers
        that scan many sizes of one step. `per_unit`'s own intercept and chunk count are not added."""
        a = sum(t * x for t, x in zip(self.theta, base.vector())) + self.mask_row_s * base.num_masked_rows
        b = (sum(t * x for t, x in zip(self.theta[1:5], per_unit.vector()[1:5]))
             + self.mask_row_s * per_unit.num_masked_rows)
        return lambda m: max(a + b * m, 0.0)

    @property
    def trusted_prefill_tokens(self) -> int:
        """The most prefill tokens a planned step should hold: twice the most the window (or the large
        steps kept beside it) has measured (at least 64). A fit extrapolates badly: with only 8-token chunks in its window, a real run's
        model predicted a 512-token chunk at 20 ms, and it took 295 ms; growing the chunks at most 2x
        per measurement keeps every prediction near measured ground."""
        if self._given and self.is_calibrated and not self._fitted:
            return 1 << 30  # given coefficients (a snapshot's copy, a test's fake model) are trusted
        largest = max((x[2] for x in (*self._xs, *(k[0] for k in self._kept))), default=0)  # x[2]: prefill tokens
        return max(2 * int(largest), _TRUST_MIN_TOKENS)

    def set_threads(self, threads: int, base_threads: int) -> None:
        """The engine now runs `threads` threads, of the `base_threads` it was started with.

        At fewer threads every step is slower by about one factor (the same ops on fewer cores: 1.7x
        at 1 thread of 2 on the AMD host), so the model keeps one fit, of steps at the full count,
        and one slowdown factor per count, measured online (the mean ratio of measured to fitted step
        time at that count). A governor switching counts no longer leaves a window that mixes both
        (mispredicting either until 256 steps have passed), and a count seen before comes back with
        its factor at once; one never seen starts at base_threads / threads.
        """
        threads, base_threads = max(threads, 1), max(base_threads, 1)
        if self._threads is not None:
            self._factors[self._threads] = self._factor
        self._threads, self._base_threads = threads, base_threads
        factor = 1.0 if threads >= base_threads else self._factors.get(threads, base_threads / threads)
        self._set_factor(factor)

    def _set_factor(self, factor: float) -> None:
        base = [t / self._factor for t in self.theta]
        self._factor = factor
        self.theta = [c * factor for c in base]

    def prefill_attention_s(self, num_pairs: int) -> float:
        """The prefill-attention part of a prediction: `num_pairs` query-key pairs, however chunked."""
        return max(self.theta[4], 0.0) * num_pairs / 1e6

    def observe(self, f: StepFeatures, measured_s: float) -> None:
        """Record one measured step; refit every `refit_every` samples (modifies the model)."""
        if not math.isfinite(measured_s) or measured_s < 0:
            return
        predicted_s = self.predict_s(f)
        if self.num_samples > 0:
            err = abs(measured_s - predicted_s)
            self.mean_abs_error_s += _ERR_ALPHA * (err - self.mean_abs_error_s)
            self.mean_rel_error += _ERR_ALPHA * (err / max(measured_s, 1e-6) - self.mean_rel_error)
        mask_s = self.mask_row_s * f.num_masked_rows
        measured_s, predicted_s = max(measured_s - mask_s, 0.0), predicted_s - mask_s  # the fit's part
        if self._factor != 1.0 or (self._threads or 0) < (self._base_threads or 0):
            if self.is_calibrated and predicted_s > 0:  # the slowdown at this thread count, measured
                ratio = measured_s * self._factor / predicted_s
                self._set_factor(min(max(self._factor + _FACTOR_ALPHA * (ratio - self._factor), 1.0),
                                     _MAX_FACTOR))
            measured_s /= self._factor  # the window holds steps as at the full thread count
        if len(self._xs) == self._xs.maxlen and self._xs[0][2] >= _KEPT_MIN_TOKENS:
            self._kept.append((self._xs[0], self._ys[0]))  # about to leave the window: keep its range
        self._xs.append(f.vector())
        self._ys.append(measured_s)
        self.num_samples += 1
        if self.num_samples % self.refit_every == 0 or self.num_samples == self.min_samples:
            self.theta = [c * self._factor for c in self._fit()]
            self._fitted = True
            self.overrun_ratio, self.overrun_p99 = self._overrun_ratios()

    def to_json(self) -> dict:
        """The model as plain JSON values: the window's samples, each [num_decodes,
        num_prefill_tokens, num_context_tokens, num_prefill_pairs, num_prefill_seqs, measured
        seconds], and the error averages; the coefficients and overrun ratio are there for reading
        (`load_json` refits them from the samples)."""
        return {"coeffs": [t / self._factor for t in self.theta], "overrun_ratio": self.overrun_ratio,
                "mean_abs_error_s": self.mean_abs_error_s, "mean_rel_error": self.mean_rel_error,
                "samples": [[int(x[1]), int(x[2]), round(x[3] * 1000), round(x[4] * 1e6), int(x[5]), y]
                            for x, y in (*self._kept, *zip(self._xs, self._ys))]}

    def load_json(self, state: dict) -> None:
        """Forget everything measured, then observe `to_json`'s samples again, so that the
        coefficients, `is_calibrated`, `trusted_prefill_tokens` and the overrun ratio are those of
        that window (under this model's prior and window length); the error averages are taken as
        stored. Modifies the model; raises ValueError, changing nothing, on a malformed state."""
        samples = state.get("samples")
        if not isinstance(samples, list) or not all(
                isinstance(s, list) and len(s) == NUM_FEATURES
                and all(type(v) is int and v >= 0 for v in s[:-1])
                and isinstance(s[-1], (int, float)) and math.isfinite(s[-1]) and s[-1] >= 0 for s in samples):
            raise ValueError("cost model state: 'samples' must be lists of 5 feature counts and seconds")
        errors = [state.get(k, 0.0) for k in ("mean_abs_error_s", "mean_rel_error")]
        if not all(isinstance(e, (int, float)) and math.isfinite(e) and e >= 0 for e in errors):
            raise ValueError("cost model state: error averages must be non-negative numbers")
        self.__init__(tuple(self.prior), self._xs.maxlen, self.min_samples, self.refit_every)  # the prior again
        for s in samples:
            self.observe(StepFeatures(*s[:-1]), float(s[-1]))
        if samples:
            self.mean_abs_error_s, self.mean_rel_error = (float(e) for e in errors)

    def _fit(self) -> list[float]:
        """Fit the window and the kept large steps, then refit without outliers (stalls: residual above
        3 median absolute residuals)."""
        y = np.array([*(k[1] for k in self._kept), *self._ys], dtype=np.float64)  # [n]
        # Relative errors are what plans need (a 10 ms decode step mispredicted by 5 ms matters more
        # than a 300 ms prefill step by 20 ms): each step is weighted by 1 / its time.
        w = 1.0 / np.maximum(y, 1e-3)
        x = np.array([*(k[0] for k in self._kept), *self._xs], dtype=np.float64) * w[:, None]  # [n, NUM_FEATURES]
        y = y * w
        theta = self._solve(x, y)
        if len(y) >= 16:
            resid = np.abs(y - x @ theta)
            keep = resid <= 3.0 * np.median(resid) + 1e-2
            if keep.sum() >= NUM_FEATURES * 2 and not keep.all():
                theta = self._solve(x[keep], y[keep])
        return theta.tolist()

    def _overrun_ratios(self) -> tuple[float, float]:
        """(the 10^-5 tail, the p99) of measured / predicted step time over the window."""
        if len(self._ys) < _OVERRUN_MIN_SAMPLES:
            return _OVERRUN_PRIOR, _OVERRUN_P99_PRIOR
        x = np.array(self._xs, dtype=np.float64)  # [n, NUM_FEATURES]
        y = np.array(self._ys, dtype=np.float64)  # [n]
        base = np.array(self.theta) / self._factor  # the window's steps are as at the full thread count
        log_ratio = np.log(np.maximum(y, 1e-9) / np.maximum(x @ base, 1e-9))
        median, p99 = np.quantile(log_ratio, [0.5, 0.99])
        return (max(float(np.exp(median + _TAIL_STRETCH * (p99 - median))), 1.0),
                max(float(np.exp(p99)), 1.0))

    def _solve(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ridge least squares toward the prior; coefficients that come out negative are fixed at 0."""
        active = list(range(NUM_FEATURES))
        theta = np.zeros(NUM_FEATURES)
        while active:
            xa = x[:, active]
            gram = xa.T @ xa
            penalty = _RIDGE * np.diag(gram) + 1e-12 * len(y)
            rhs = xa.T @ y + penalty * self.prior[active]
            sol = np.linalg.solve(gram + np.diag(penalty), rhs)
            if (sol >= 0).all():
                theta[active] = sol
                break
            active = [i for i, c in zip(active, sol) if c > 0]  # drop the negative ones, refit the rest
        return theta

    def prefill_chunk_s(self, num_tokens: int, start: int = 0) -> float:
        """What adding a prefill chunk of `num_tokens` at position `start` adds to a step."""
        if num_tokens <= 0:
            return 0.0
        return max(self.theta[2] * num_tokens + self.theta[4] * prefill_pairs(num_tokens, start) / 1e6
                   + self.theta[5], 0.0)

    def max_chunk_tokens(self, time_s: float, start: int = 0) -> int:
        """Most tokens of a prefill chunk at position `start` that add at most `time_s` to a step:
        0 when not even one fits; a huge number when prefill tokens are (so far) predicted free."""
        if self.prefill_chunk_s(1, start) > time_s:
            return 0
        if self.theta[2] <= 0 and self.theta[4] <= 0:
            return 1 << 30
        lo, hi = 1, 2
        while self.prefill_chunk_s(hi, start) <= time_s and hi < (1 << 30):
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # the chunk cost is increasing in its length
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.prefill_chunk_s(mid, start) <= time_s else (lo, mid)
        return lo

    def max_prefill_tokens(self, time_budget_s: float, num_decodes: int, num_context_tokens: int,
                           prefill_start: int = 0) -> int:
        """Most prefill tokens a step with these decodes can add and still be predicted within budget,
        as one chunk starting at position `prefill_start` (its attention grows with the position).

        Returns 0 when even the decodes alone are predicted over budget; a huge number when prefill
        tokens are (so far) predicted to cost nothing.
        """
        base = self.predict_s(StepFeatures(num_decodes, 0, num_context_tokens))
        if time_budget_s <= base:
            return 0
        return self.max_chunk_tokens(time_budget_s - base, prefill_start)

    def max_decodes(self, time_budget_s: float, num_prefill_tokens: int, num_context_tokens: int) -> int | None:
        """Most decodes a step with this prefill can hold and still be predicted within budget.

        Returns 0 when even the prefill alone is predicted over budget; None (no bound) when decodes
        are (so far) predicted to cost nothing.
        """
        base = self.predict_s(StepFeatures(0, num_prefill_tokens, num_context_tokens))
        per_decode = self.theta[1]
        if time_budget_s <= base:
            return 0
        if per_decode <= 0:
            return None
        return int(math.floor((time_budget_s - base) / per_decode))
