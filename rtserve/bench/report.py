"""The terminal summary and `results.json` (every request's timings, aggregates, the exact config)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from rtserve.bench.metrics import Attainment, Distribution, PhaseMetrics
from rtserve.bench.runner import BenchRun

SCHEMA = "rtserve-bench-results/1"
_LATENCY_ROWS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"),
                 ("max ITL/request", "max_itl"))


def fmt_rate(rate_per_s: float | str | None) -> str:
    if rate_per_s in (None, "inf") or (isinstance(rate_per_s, float) and math.isinf(rate_per_s)):
        return "inf"
    return f"{rate_per_s:g}"


def format_phase(m: PhaseMetrics, limits_text: str) -> str:
    """The full summary of one phase."""
    lines = [
        f"=== rate {fmt_rate(m.rate_per_s)}/s: {m.num_requests} requests in {m.duration_s:.2f} s ===",
        f"completed {m.num_completed}  rejected {m.num_rejected} (429/503/529)  errors {m.num_errors}"
        f"  cancelled {m.num_cancelled}  dropped {m.num_dropped} (deadline)"
        f"  peak concurrency {m.peak_concurrency}",
        f"throughput {m.request_throughput_per_s:.2f} req/s  {m.output_throughput_tok_per_s:.1f} "
        f"output tok/s  {m.total_throughput_tok_per_s:.1f} total tok/s "
        f"({m.total_input_tokens} in / {m.total_output_tokens} out tokens)",
        f"{'latency (ms)':<16}{'n':>7}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}",
    ]
    for name, key in _LATENCY_ROWS:
        d: Distribution = getattr(m, key)
        lines.append(f"{name:<16}{d.count:>7}" + "".join(
            f"{v:>10.1f}" for v in (d.mean_ms, d.p50_ms, d.p90_ms, d.p99_ms, d.max_ms)))
    if m.slo is not None:
        lines.append(f"goodput ({limits_text}): {_attained(m.slo)}, {m.slo.goodput_req_per_s:.2f} req/s")
    if m.per_class:
        lines.append(f"{'class':<8}{'sent':>6}{'done':>6}{'late':>6}{'rej':>5}{'drop':>6}{'err':>5}"
                     f"{'canc':>6}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'ITL p99':>9}"
                     f"{'SLO %':>8}{'budget %':>10}")
        for c in m.per_class.values():
            lines.append(f"{c.rt_class:<8}{c.num_requests:>6}{c.num_completed:>6}{c.num_late:>6}"
                         f"{c.num_rejected:>5}{c.num_dropped:>6}{c.num_errors:>5}{c.num_cancelled:>6}"
                         f"{c.ttft.p50_ms:>10.1f}{c.ttft.p99_ms:>10.1f}{c.tpot.p50_ms:>10.1f}{c.itl.p99_ms:>9.1f}"
                         f"{_pct(c.slo):>8}{_pct(c.budget):>10}")
    return "\n".join(lines)


def format_sweep(phases: list[PhaseMetrics]) -> str:
    """One row per rate, for runs with several phases."""
    header = (f"{'rate/s':>7}{'sent':>6}{'done':>6}{'rej':>5}{'err':>5}{'req/s':>8}{'out tok/s':>10}"
              f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'ITL p99':>9}{'SLO %':>8}")
    rows = [f"{fmt_rate(m.rate_per_s):>7}{m.num_requests:>6}{m.num_completed:>6}{m.num_rejected:>5}"
            f"{m.num_errors:>5}{m.request_throughput_per_s:>8.2f}{m.output_throughput_tok_per_s:>10.1f}"
            f"{m.ttft.p50_ms:>10.1f}{m.ttft.p99_ms:>10.1f}{m.tpot.p50_ms:>10.1f}{m.itl.p99_ms:>9.1f}"
            f"{_pct(m.slo):>8}" for m in phases]
    return "\n".join(["=== sweep ===", header, *rows])


def _attained(a: Attainment) -> str:
    return f"{a.num_good}/{a.num_requests} = {100 * a.attainment:.1f}% attained"


def _pct(a: Attainment | None) -> str:
    return "-" if a is None else f"{100 * a.attainment:.1f}"


def build_results(run: BenchRun, metrics: list[PhaseMetrics]) -> dict:
    """The results.json document (JSON-safe: nan -> null, inf -> "inf")."""
    cfg = run.config
    config = asdict(cfg)
    config["api_key"] = "***" if cfg.api_key else None
    doc = {
        "schema": SCHEMA,
        "started_at": run.started_at,
        "command_line": cfg.command_line,
        "config": config,
        "target": {"url": run.target.url, "model": run.target.model,
                   "owned_by": run.target.owned_by, "rt_extension": run.target.rt_extension},
        "phases": [
            {"rate_per_s": phase.rate_per_s, "duration_s": phase.duration_s,
             "metrics": asdict(m), "requests": [asdict(r) for r in phase.records]}
            for phase, m in zip(run.phases, metrics)
        ],
    }
    return json_safe(doc)


def json_safe(value):
    """Floats rounded to the microsecond range, nan -> None, inf -> "inf"; recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return round(value, 6)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(doc: dict, result_dir: str | Path) -> Path:
    path = Path(result_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    return path


def load_results(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not an rtserve bench results.json (schema {doc.get('schema')!r})")
    return doc
