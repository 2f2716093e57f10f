"""Step-time cost model: predicts how long one engine step takes from what it computes.

    step_s ≈ c0 + c_decode · num_decodes + c_prefill · num_prefill_tokens + c_ctx · num_context_tokens/1000

A linear model (the intercept absorbs per-step Python and I/O overhead, `c_ctx` the attention reads
over the KV of every scheduled sequence). It starts from a prior and is calibrated online from every
measured step by recursive least squares with a forgetting factor, so it follows a machine whose speed
drifts (thermal, other tenants). Prediction error is tracked (EWMA of absolute and relative error) and
exported in the engine's stats. Pure Python: a 4x4 update costs microseconds, not a host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

NUM_FEATURES = 4
_P_INIT = 1.0       # initial covariance: trust measured steps quickly
_P_MAX_TRACE = 1e6  # forgetting inflates P along directions no step excites; cap it
_ERR_ALPHA = 0.05   # EWMA weight of the newest prediction error


@dataclass(frozen=True)
class StepFeatures:
    """What one step computes: decodes, prefill tokens, and context tokens read by attention."""

    num_decodes: int
    num_prefill_tokens: int
    num_context_tokens: int = 0

    def vector(self) -> list[float]:
        return [1.0, float(self.num_decodes), float(self.num_prefill_tokens), self.num_context_tokens / 1000.0]


class StepCostModel:
    """Linear step-time model calibrated by recursive least squares (RLS) with forgetting."""

    def __init__(self, prior: tuple[float, ...] = (0.005, 0.0005, 0.0001, 0.0), forgetting: float = 0.98,
                 min_samples: int = 8) -> None:
        if len(prior) != NUM_FEATURES:
            raise ValueError(f"cost model prior needs {NUM_FEATURES} coefficients")
        self.theta = [float(c) for c in prior]
        self.forgetting = forgetting
        self.min_samples = min_samples
        self.num_samples = 0
        self.mean_abs_error_s = 0.0
        self.mean_rel_error = 0.0
        self._p = [[_P_INIT if i == j else 0.0 for j in range(NUM_FEATURES)] for i in range(NUM_FEATURES)]

    @classmethod
    def from_coeffs(cls, coeffs: tuple[float, ...], calibrated: bool = True) -> "StepCostModel":
        """A read-only copy from a snapshot (the client predicts with the engine's latest model)."""
        model = cls(tuple(coeffs) if coeffs else (0.005, 0.0005, 0.0001, 0.0), min_samples=1)
        model.num_samples = 1 if calibrated else 0
        return model

    @property
    def is_calibrated(self) -> bool:
        return self.num_samples >= self.min_samples

    @property
    def coeffs(self) -> tuple[float, ...]:
        return tuple(self.theta)

    def predict_s(self, f: StepFeatures) -> float:
        x = f.vector()
        return max(sum(t * xi for t, xi in zip(self.theta, x)), 0.0)

    def observe(self, f: StepFeatures, measured_s: float) -> None:
        """Update the coefficients with one measured step (RLS; modifies the model)."""
        x = f.vector()
        err = measured_s - self.predict_s(f)
        if self.num_samples > 0:
            self.mean_abs_error_s += _ERR_ALPHA * (abs(err) - self.mean_abs_error_s)
            rel = abs(err) / max(measured_s, 1e-6)
            self.mean_rel_error += _ERR_ALPHA * (rel - self.mean_rel_error)
        self.num_samples += 1
        lam, p = self.forgetting, self._p
        px = [sum(p[i][j] * x[j] for j in range(NUM_FEATURES)) for i in range(NUM_FEATURES)]
        denom = lam + sum(x[i] * px[i] for i in range(NUM_FEATURES))
        gain = [v / denom for v in px]
        innovation = measured_s - sum(t * xi for t, xi in zip(self.theta, x))
        # Every coefficient is a cost, so none may be negative (projected RLS); with few or collinear
        # samples an unconstrained fit trades a negative slope for a large intercept and then
        # mispredicts steps of another shape.
        self.theta = [max(t + g * innovation, 0.0) for t, g in zip(self.theta, gain)]
        # P <- (P - g x^T P) / lambda; P is symmetric so x^T P = px^T.
        for i in range(NUM_FEATURES):
            for j in range(NUM_FEATURES):
                p[i][j] = (p[i][j] - gain[i] * px[j]) / lam
        trace = sum(p[i][i] for i in range(NUM_FEATURES))
        if trace > _P_MAX_TRACE:
            scale = _P_MAX_TRACE / trace
            self._p = [[v * scale for v in row] for row in p]

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
