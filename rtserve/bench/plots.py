"""PNG plots of a results.json document (matplotlib, Agg backend): TTFT and ITL CDFs, tokens/s and
concurrency over time, and attainment/throughput vs rate for sweeps."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

_DPI = 110


def write_plots(doc: dict, out_dir: str | Path) -> list[Path]:
    """Write every applicable plot for `doc` into `out_dir`; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    phases = doc["phases"]
    paths = [
        _cdf(phases, "TTFT", lambda r: [r["ttft_s"]], out / "ttft_cdf.png"),
        _cdf(phases, "ITL", _gaps_s, out / "itl_cdf.png"),
        _timeline(phases, out / "timeline.png"),
    ]
    if len(phases) > 1:
        paths.append(_versus_rate(phases, out / "attainment_vs_rate.png"))
    return paths


def _label(phase: dict) -> str:
    rate = phase["rate_per_s"]
    return f"rate {rate if rate == 'inf' else format(rate, 'g')}/s"


def _ok(phase: dict) -> list[dict]:
    return [r for r in phase["requests"] if r["status"] == "ok"]


def _gaps_s(record: dict) -> list[float]:
    times = record["chunk_times_s"]
    return [b - a for a, b in zip(times, times[1:])]


def _cdf(phases: list[dict], name: str, values_of, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for phase in phases:
        values_ms = np.sort([v * 1000 for r in _ok(phase) for v in values_of(r) if v is not None])
        if len(values_ms):
            ax.plot(values_ms, np.arange(1, len(values_ms) + 1) / len(values_ms), label=_label(phase))
    ax.set_xlabel(f"{name} (ms)")
    ax.set_ylabel("fraction of samples")
    ax.set_title(f"{name} CDF (completed requests)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, path)


def _timeline(phases: list[dict], path: Path) -> Path:
    fig, (ax_tok, ax_conc) = plt.subplots(2, 1, figsize=(7.2, 6), sharex=True)
    for phase in phases:
        end_s = max(phase["duration_s"] or 0.0, 1e-3)
        bin_s = max(0.1, end_s / 100)
        edges = np.arange(0.0, end_s + bin_s, bin_s)
        times, weights = [], []
        for r in _ok(phase):
            chunks = r["chunk_times_s"]
            times += [r["send_s"] + t for t in chunks]
            weights += [r["output_tokens"] / len(chunks)] * len(chunks)
        counts, _ = np.histogram(times, bins=edges, weights=weights)
        ax_tok.plot(edges[:-1], counts / bin_s, drawstyle="steps-post", label=_label(phase))
        events = sorted([(r["send_s"], 1) for r in phase["requests"] if r["finished_s"] is not None]
                        + [(r["send_s"] + r["finished_s"], -1) for r in phase["requests"]
                           if r["finished_s"] is not None])
        steps = np.cumsum([step for _, step in events]) if events else []
        ax_conc.step([t for t, _ in events], steps, where="post", label=_label(phase))
    ax_tok.set_ylabel("output tokens/s")
    ax_conc.set_ylabel("requests in flight")
    ax_conc.set_xlabel("time since phase start (s)")
    for ax in (ax_tok, ax_conc):
        ax.grid(alpha=0.3)
    if ax_tok.get_legend_handles_labels()[0]:
        ax_tok.legend()
    return _save(fig, path)


def _versus_rate(phases: list[dict], path: Path) -> Path:
    finite = [p for p in phases if p["rate_per_s"] != "inf"]
    rates = [p["rate_per_s"] for p in finite]
    fig, (ax_att, ax_tput) = plt.subplots(2, 1, figsize=(6.4, 6), sharex=True)
    slo = [p["metrics"]["slo"] for p in finite]
    if rates and all(s is not None for s in slo):
        ax_att.plot(rates, [100 * s["attainment"] for s in slo], "o-", label="--goodput SLO")
    classes = sorted({c for p in finite for c in p["metrics"]["per_class"]})
    for c in classes:
        points = [(p["rate_per_s"], p["metrics"]["per_class"][c]["budget"]) for p in finite
                  if c in p["metrics"]["per_class"]]
        points = [(rate, 100 * b["attainment"]) for rate, b in points if b is not None]
        if points:
            ax_att.plot(*zip(*points), "s--", label=f"{c} (rt budget)")
    ax_att.set_ylabel("SLO attainment (%)")
    ax_att.set_ylim(0, 105)
    ax_tput.plot(rates, [p["metrics"]["output_throughput_tok_per_s"] for p in finite], "o-")
    ax_tput.set_ylabel("output tokens/s")
    ax_tput.set_xlabel("request rate (req/s)")
    for ax in (ax_att, ax_tput):
        ax.grid(alpha=0.3)
    if ax_att.get_legend_handles_labels()[0]:
        ax_att.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path
