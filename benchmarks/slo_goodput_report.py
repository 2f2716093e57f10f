"""slo_goodput.py's outputs from its rows: markdown tables (the policies side by side per rate, with
their goodput ratio; every metric per policy; run-to-run spread when repeated) and a PNG of goodput
against rate per workload. Rows with an error are listed, never averaged."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

_DETAIL = (("sent", "num_sent", 0), ("done", "num_completed", 0), ("TTFT p50", "ttft_p50_ms", 0),
           ("TTFT p99", "ttft_p99_ms", 0), ("TPOT mean", "tpot_mean_ms", 1),
           ("TPOT p50", "tpot_p50_ms", 1), ("TPOT p99", "tpot_p99_ms", 1),
           ("ITL p99", "itl_p99_ms", 1), ("SLO %", "slo_attainment_pct", 1),
           ("goodput req/s", "goodput_req_per_s", 3), ("req/s", "throughput_req_per_s", 3),
           ("out tok/s", "output_tok_per_s", 1), ("run s", "load_s", 1))


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def group_rows(rows: list[dict]) -> dict[tuple, list[dict]]:
    """(tool, workload, policy, rate) -> the rows of its repeats, errors left out."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            groups[(r["tool"], r["workload"], r["policy"], r["rate_per_s"])].append(r)
    return groups


def _goodput_cell(rows: list[dict]) -> str:
    values = [r["goodput_req_per_s"] for r in rows if r.get("goodput_req_per_s") is not None]
    if not values:
        return "-"
    text = f"{statistics.fmean(values):.3f}"
    return text + (f" ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 else "")


def _ratio_cell(rows_a: list[dict], rows_b: list[dict]) -> str:
    """Ratio of mean goodputs; with repeats, also the range of the per-repeat ratios."""
    a, b = _mean(rows_a, "goodput_req_per_s"), _mean(rows_b, "goodput_req_per_s")
    if a is None or b is None:
        return "-"
    text = f"{a / b:.2f}" if b > 0 else ("0/0" if a == 0 else "inf")
    by_rep_b = {r["repeat"]: r.get("goodput_req_per_s") for r in rows_b}
    per_rep = [r["goodput_req_per_s"] / by_rep_b[r["repeat"]] for r in rows_a
               if by_rep_b.get(r["repeat"]) and r.get("goodput_req_per_s") is not None]
    return text + (f" ({min(per_rep):.2f}–{max(per_rep):.2f})" if len(per_rep) > 1 else "")


def _side_by_side(groups, tool, workload, rates, policies, multiples) -> list[str]:
    head = ["rate/s"] + (["× fcfs-rate"] if any(multiples.values()) else [])
    head += [f"goodput {p}" for p in policies]
    head += [f"{policies[0]}/{policies[1]}"] if len(policies) == 2 else []
    head += [f"SLO % {p}" for p in policies] + [f"done/sent {p}" for p in policies]
    head += [f"TTFT p99 {p}" for p in policies] + [f"TPOT p99 {p}" for p in policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rate in rates:
        cells = {p: groups.get((tool, workload, p, rate), []) for p in policies}
        row = [f"{rate:g}"] + ([f"{multiples[rate]:g}" if multiples[rate] else "-"]
                               if any(multiples.values()) else [])
        row += [_goodput_cell(cells[p]) for p in policies]
        row += [_ratio_cell(cells[policies[0]], cells[policies[1]])] if len(policies) == 2 else []
        row += [_fmt(_mean(cells[p], "slo_attainment_pct"), 1) for p in policies]
        row += [f"{_fmt(_mean(cells[p], 'num_completed'), 0)}/{_fmt(_mean(cells[p], 'num_sent'), 0)}"
                for p in policies]
        row += [_fmt(_mean(cells[p], "ttft_p99_ms"), 0) for p in policies]
        row += [_fmt(_mean(cells[p], "tpot_p99_ms"), 1) for p in policies]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _detail(groups, tool, workload, rates, policies) -> list[str]:
    head = ["rate/s", "policy"] + [label for label, _, _ in _DETAIL[:2]] + ["rej/drop/canc"] + \
        [label for label, _, _ in _DETAIL[2:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rate in rates:
        for p in policies:
            rows = groups.get((tool, workload, p, rate), [])
            if rows:
                cells = [_fmt(_mean(rows, key), digits) for _, key, digits in _DETAIL]
                cells.insert(2, "/".join(_fmt(_mean(rows, k), 0) for k in
                                         ("num_rejected", "num_dropped", "num_cancelled")))
                lines.append("| " + " | ".join([f"{rate:g}", p, *cells]) + " |")
    return lines


def _per_class(groups, tool, workload, rates, policies) -> list[str]:
    """Realtime-mix and interference classes: SLO % and attainment of each request's own rt budget."""
    lines = ["| rate/s | policy | class | sent | done | late | SLO % | own budget % |", "|" + "---|" * 8]
    for rate in rates:
        for p in policies:
            rows = groups.get((tool, workload, p, rate), [])
            for c in dict.fromkeys(c for r in rows for c in r.get("per_class") or {}):
                per = [r["per_class"][c] for r in rows if c in (r.get("per_class") or {})]
                cells = [_fmt(_mean(per, k), d) for k, d in (("sent", 0), ("done", 0), ("late", 0),
                         ("slo_attainment_pct", 1), ("budget_attainment_pct", 1))]
                lines.append("| " + " | ".join([f"{rate:g}", p, c, *cells]) + " |")
    return lines if len(lines) > 2 else []


def _spread(groups) -> list[str]:
    head = ("tool", "workload", "policy", "rate/s", "runs", "goodput mean", "stdev", "min", "max",
            "(max-min)/mean")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (tool, workload, policy, rate), rows in sorted(groups.items()):
        values = [r["goodput_req_per_s"] for r in rows if r.get("goodput_req_per_s") is not None]
        if len(values) < 2:
            continue
        mean = statistics.fmean(values)
        rel = f"{100 * (max(values) - min(values)) / mean:.0f}%" if mean > 0 else "-"
        lines.append(f"| {tool} | {workload} | {policy} | {rate:g} | {len(values)} | {mean:.3f} | "
                     f"{statistics.stdev(values):.3f} | {min(values):.3f} | {max(values):.3f} | {rel} |")
    return lines if len(lines) > 2 else []


def format_table(doc: dict) -> str:
    cfg, rows = doc["config"], doc["rows"]
    policies = cfg["policies"]
    groups = group_rows(rows)
    multiples = {r["rate_per_s"]: r["multiple"] for r in rows}
    rates = sorted(multiples)
    out = [f"# SLO goodput: {' vs '.join(policies)}", "",
           f"Good request: completed with TTFT ≤ {cfg['ttft_ms']:g} ms and TPOT ≤ {cfg['tpot_ms']:g} ms "
           f"(vLLM's TPOT). SLO % = good / sent; goodput = good / run duration. "
           f"{cfg['duration_s']:g} s of arrivals per run, fresh server per run, "
           f"{cfg['repeat']} repeat(s); values are means over repeats, (min–max) when repeated. "
           f"Host: {doc['host_cpus']} CPUs.", ""]
    for tool in dict.fromkeys(r["tool"] for r in rows):
        for workload in dict.fromkeys(r["workload"] for r in rows if r["tool"] == tool):
            out += [f"## {tool}: {workload}", ""]
            out += _side_by_side(groups, tool, workload, rates, policies, multiples) + [""]
            out += _detail(groups, tool, workload, rates, policies) + [""]
            per_class = _per_class(groups, tool, workload, rates, policies)
            out += per_class + [""] if per_class else []
    spread = _spread(groups)
    if spread:
        out += ["## Run-to-run spread of goodput", ""] + spread + [""]
    errors = [r for r in rows if "error" in r]
    if errors:
        out += ["## Failed runs", ""] + [f"- {r['tool']} {r['workload']} {r['policy']} rate "
                                          f"{r['rate_per_s']:g} rep {r['repeat']}: {r['error']}"
                                          for r in errors] + [""]
    if "guidellm" in {r["tool"] for r in rows}:
        out += ["guidellm rows: TTFT and TPOT are computed from its per-request records with the "
                "definitions above; its ITL p99 is over each request's mean gap (it keeps no "
                "per-gap samples), and it reports no rejections or deadline drops.", ""]
    return "\n".join(out)


def write_table(doc: dict, path: Path) -> str:
    text = format_table(doc)
    path.write_text(text + "\n", encoding="utf-8")
    return text


def write_plot(doc: dict, path: Path) -> Path | None:
    """Goodput vs rate, one panel per workload, a line per (tool, policy); None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(doc["rows"])
    workloads = list(dict.fromkeys(k[1] for k in groups))
    if not workloads:
        return None
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.2 * len(workloads), 4.2), squeeze=False)
    colors = {p: f"C{i}" for i, p in enumerate(doc["config"]["policies"])}  # a colour per policy
    for ax, workload in zip(axes[0], workloads):
        series = sorted({(k[0], k[2]) for k in groups if k[1] == workload})
        rates = sorted({k[3] for k in groups if k[1] == workload})
        for tool, policy in series:
            points = [(rate, [r["goodput_req_per_s"] or 0.0 for r in groups[(tool, workload, policy, rate)]])
                      for rate in rates if (tool, workload, policy, rate) in groups]
            xs = [x for x, _ in points]
            means = [statistics.fmean(v) for _, v in points]
            err = [[m - min(v) for m, (_, v) in zip(means, points)],
                   [max(v) - m for m, (_, v) in zip(means, points)]]
            ax.errorbar(xs, means, yerr=err, marker="o", capsize=3,
                        color=colors.get(policy), linestyle="-" if tool == "rtserve-bench" else "--",
                        label=f"{policy} ({tool})")
        ax.plot(rates, rates, color="grey", linewidth=0.8, linestyle=":", label="offered rate")
        ax.set_title(workload)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("goodput (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = doc["config"]
    fig.suptitle(f"SLO goodput: TTFT ≤ {cfg['ttft_ms']:g} ms and TPOT ≤ {cfg['tpot_ms']:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
