"""Step-time cost model: predicts how long one engine step takes from what it computes.

    step_s ≈ c0 + c_decode · num_decodes + c_prefill · num_prefill_tokens + c_ctx · num_context_tokens/1000

A linear model (the intercept absorbs per-step Python and I/O overhead, `c_ctx` the attention reads
over the KV of every scheduled sequence), calibrated online from measured steps: every `refit_every`
steps it is refitted by least squares over the last `window` steps (the window is the forgetting),
with every coefficient kept non-negative (an active-set refit), a light ridge pull toward the prior
(a feature no recent step exercised keeps its prior cost), and one trimmed refit that drops stalls
(a step preempted by another process or a GC pause), so it predicts a typical step, not a mean
inflated by rare multi-second outliers. How far real steps overrun that typical prediction is kept
apart: `overrun_ratio` is the measured / predicted ratio a step exceeds about once in 10^5 steps,
extrapolated from the window's median and 99th percentile of log ratios as if they were normal (256
steps cannot show a 10^-5 tail); until 32 steps are measured it is a cautious 1.5. A deadline plan
leaves that margin (rtserve/engine/rt_policy.py): a firm stream lives for hundreds of steps, and one
overrun step drops it.

Why not recursive least squares: with the non-negativity projection and a forgetting factor, RLS
diverged on a contended CPU (coefficients of 1e14 after a few hundred noisy steps); a windowed refit
cannot diverge and costs ~50 µs every few steps. Prediction error (EWMA of absolute and relative
error, measured before each refit can see the sample) is exported in the engine's stats.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

NUM_FEATURES = 4
DEFAULT_PRIOR = (0.005, 0.0005, 0.0001, 0.0)
_ERR_ALPHA = 0.05    # EWMA weight of the newest prediction error
_RIDGE = 1e-4        # pull toward the prior, relative to each feature's own energy in the window
_TAIL_STRETCH = 4.265 / 2.326  # normal quantiles: z(1 - 1e-5) / z(0.99)
_OVERRUN_MIN_SAMPLES = 32
_OVERRUN_PRIOR = 1.5


@dataclass(frozen=True)
class StepFeatures:
    """What one step computes: decodes, prefill tokens, and context tokens read by attention."""

    num_decodes: int
    num_prefill_tokens: int
    num_context_tokens: int = 0

    def vector(self) -> list[float]:
        return [1.0, float(self.num_decodes), float(self.num_prefill_tokens), self.num_context_tokens / 1000.0]


class StepCostModel:
    """Linear step-time model, refitted online over a sliding window with non-negative coefficients."""

    def __init__(self, prior: tuple[float, ...] = DEFAULT_PRIOR, window: int = 256, min_samples: int = 8,
                 refit_every: int = 4) -> None:
        if len(prior) != NUM_FEATURES:
            raise ValueError(f"cost model prior needs {NUM_FEATURES} coefficients")
        self.prior = np.array(prior, dtype=np.float64)
        self.theta = [float(c) for c in prior]
        self.min_samples = min_samples
        self.refit_every = refit_every
        self.num_samples = 0
        self.mean_abs_error_s = 0.0
        self.mean_rel_error = 0.0
        self.overrun_ratio = _OVERRUN_PRIOR  # measured / predicted step time exceeded once in ~10^5 steps
        self._xs: deque[list[float]] = deque(maxlen=window)
        self._ys: deque[float] = deque(maxlen=window)

    @classmethod
    def from_coeffs(cls, coeffs: tuple[float, ...], calibrated: bool = True) -> "StepCostModel":
        """A read-only copy from a snapshot (the client predicts with the engine's latest model)."""
        model = cls(tuple(coeffs) if coeffs else DEFAULT_PRIOR, min_samples=1)
        model.num_samples = 1 if calibrated else 0
        return model

    @property
    def is_calibrated(self) -> bool:
        return self.num_samples >= self.min_samples

    @property
    def coeffs(self) -> tuple[float, ...]:
        return tuple(self.theta)

    def predict_s(self, f: StepFeatures) -> float:
        return max(sum(t * x for t, x in zip(self.theta, f.vector())), 0.0)

    def observe(self, f: StepFeatures, measured_s: float) -> None:
        """Record one measured step; refit every `refit_every` samples (modifies the model)."""
        if not math.isfinite(measured_s) or measured_s < 0:
            return
        if self.num_samples > 0:
            err = abs(measured_s - self.predict_s(f))
            self.mean_abs_error_s += _ERR_ALPHA * (err - self.mean_abs_error_s)
            self.mean_rel_error += _ERR_ALPHA * (err / max(measured_s, 1e-6) - self.mean_rel_error)
        self._xs.append(f.vector())
        self._ys.append(measured_s)
        self.num_samples += 1
        if self.num_samples % self.refit_every == 0 or self.num_samples == self.min_samples:
            self.theta = self._fit()
            self.overrun_ratio = self._overrun_ratio()

    def _fit(self) -> list[float]:
        """Fit, then refit without outliers (stalls: residual above 3 median absolute residuals)."""
        x = np.array(self._xs, dtype=np.float64)  # [n, NUM_FEATURES]
        y = np.array(self._ys, dtype=np.float64)  # [n]
        theta = self._solve(x, y)
        if len(y) >= 16:
            resid = np.abs(y - x @ theta)
            keep = resid <= 3.0 * np.median(resid) + 1e-4
            if keep.sum() >= NUM_FEATURES * 2 and not keep.all():
                theta = self._solve(x[keep], y[keep])
        return theta.tolist()

    def _overrun_ratio(self) -> float:
        if len(self._ys) < _OVERRUN_MIN_SAMPLES:
            return _OVERRUN_PRIOR
        x = np.array(self._xs, dtype=np.float64)  # [n, NUM_FEATURES]
        y = np.array(self._ys, dtype=np.float64)  # [n]
        log_ratio = np.log(np.maximum(y, 1e-9) / np.maximum(x @ np.array(self.theta), 1e-9))
        median, p99 = np.quantile(log_ratio, [0.5, 0.99])
        return max(float(np.exp(median + _TAIL_STRETCH * (p99 - median))), 1.0)

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

    def max_prefill_tokens(self, time_budget_s: float, num_decodes: int, num_context_tokens: int) -> int:
        """Most prefill tokens a step with these decodes can add and still be predicted within budget.

        Returns 0 when even the decodes alone are predicted over budget; a huge number when prefill
        tokens are (so far) predicted to cost nothing.
        """
        base = self.predict_s(StepFeatures(num_decodes, 0, num_context_tokens))
        per_token = self.theta[2]
        if time_budget_s <= base:
            return 0
        if per_token <= 0:
            return 1 << 30
        return int(math.floor((time_budget_s - base) / per_token))

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
