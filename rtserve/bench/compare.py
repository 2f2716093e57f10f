"""`rtserve bench --compare A.json B.json`: two runs side by side, with B/A ratios."""
from __future__ import annotations

from rtserve.bench.report import fmt_rate

# (label, path into a phase's "metrics", scale)
_ROWS: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("requests", ("num_requests",), 1), ("completed", ("num_completed",), 1),
    ("rejected", ("num_rejected",), 1), ("errors", ("num_errors",), 1),
    ("cancelled", ("num_cancelled",), 1), ("dropped", ("num_dropped",), 1),
    ("req/s", ("request_throughput_per_s",), 1),
    ("output tok/s", ("output_throughput_tok_per_s",), 1),
    ("total tok/s", ("total_throughput_tok_per_s",), 1),
    ("TTFT mean ms", ("ttft", "mean_ms"), 1), ("TTFT p50 ms", ("ttft", "p50_ms"), 1),
    ("TTFT p99 ms", ("ttft", "p99_ms"), 1),
    ("TPOT mean ms", ("tpot", "mean_ms"), 1), ("TPOT p50 ms", ("tpot", "p50_ms"), 1),
    ("TPOT p99 ms", ("tpot", "p99_ms"), 1),
    ("ITL mean ms", ("itl", "mean_ms"), 1), ("ITL p50 ms", ("itl", "p50_ms"), 1),
    ("ITL p99 ms", ("itl", "p99_ms"), 1),
    ("E2E p50 ms", ("e2e", "p50_ms"), 1), ("E2E p99 ms", ("e2e", "p99_ms"), 1),
    ("max ITL p99 ms", ("max_itl", "p99_ms"), 1),
    ("SLO attainment %", ("slo", "attainment"), 100), ("goodput req/s", ("slo", "goodput_req_per_s"), 1),
)


def _get(metrics: dict, path: tuple[str, ...]) -> float | None:
    value = metrics
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) else None


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.3f}"


def _rows(metrics_a: dict, metrics_b: dict) -> list[tuple[str, float | None, float | None]]:
    rows = []
    for label, path, scale in _ROWS:
        a, b = _get(metrics_a, path), _get(metrics_b, path)
        rows.append((label, None if a is None else a * scale, None if b is None else b * scale))
    classes = [c for c in metrics_a.get("per_class", {}) if c in metrics_b.get("per_class", {})]
    for c in classes:
        for label, key in (("late", "num_late"), ("rejected", "num_rejected"), ("dropped", "num_dropped")):
            a, b = _get(metrics_a["per_class"][c], (key,)), _get(metrics_b["per_class"][c], (key,))
            if a is not None or b is not None:
                rows.append((f"{c} {label}", a, b))
        for kind in ("slo", "budget"):
            a = _get(metrics_a["per_class"][c], (kind, "attainment"))
            b = _get(metrics_b["per_class"][c], (kind, "attainment"))
            if a is not None or b is not None:
                rows.append((f"{c} {kind} %", None if a is None else 100 * a,
                             None if b is None else 100 * b))
    return rows


def compare_results(doc_a: dict, doc_b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """A text table per phase (phases paired in order), one row per metric: A, B and B/A."""
    lines = [f"A = {name_a}  ({doc_a['target']['model']}, {doc_a.get('command_line', '')})",
             f"B = {name_b}  ({doc_b['target']['model']}, {doc_b.get('command_line', '')})"]
    phases_a, phases_b = doc_a["phases"], doc_b["phases"]
    if len(phases_a) != len(phases_b):
        lines.append(f"note: A has {len(phases_a)} phases, B has {len(phases_b)}; "
                     f"comparing the first {min(len(phases_a), len(phases_b))} in order")
    for pa, pb in zip(phases_a, phases_b):
        lines.append(f"\n=== A rate {fmt_rate(pa['rate_per_s'])}/s vs B rate "
                     f"{fmt_rate(pb['rate_per_s'])}/s ===")
        lines.append(f"{'metric':<20}{'A':>12}{'B':>12}{'B/A':>9}")
        for label, a, b in _rows(pa["metrics"], pb["metrics"]):
            lines.append(f"{label:<20}{_fmt(a):>12}{_fmt(b):>12}{_ratio(a, b):>9}")
    return "\n".join(lines)
