"""Deadline scheduling against FCFS at twice the sustainable load, in the deterministic simulation
(tests/unit/rt_sim.py: the real scheduler, policy, KV manager and admission control; a fake clock and
a fake model with 10% step-time noise). `python -m tests.unit.rt_sim 0.5 1 2 4` prints the whole table.
"""
from tests.unit.rt_sim import SimConfig, simulate

# Where FCFS still serves about 80% of the interactive requests within budget in this model.
SUSTAINABLE_RATE_PER_S = 1.0


def test_at_twice_the_sustainable_rate_deadline_scheduling_more_than_doubles_goodput():
    fcfs = simulate(SimConfig(policy="fcfs", rate_per_s=2 * SUSTAINABLE_RATE_PER_S))
    deadline = simulate(SimConfig(policy="deadline", rate_per_s=2 * SUSTAINABLE_RATE_PER_S))
    f, d = fcfs.summary(), deadline.summary()
    assert d["goodput_req_per_s"] >= 2 * f["goodput_req_per_s"] > 0
    # Admission control refused the firm requests that could not make it; the admitted ones made it,
    # and none was served late (a firm token past its deadline is never delivered).
    assert d["firm_rejected"] > 0 and d["firm_admitted_met_pct"] >= 99.0 and d["firm_served_late"] == 0
    # FCFS is plain arrival order: no deadline-based refusal, no drop; its late firm tokens are served.
    assert f["firm_rejected"] == 0 and f["firm_dropped"] == 0 and f["firm_served_late"] > 0
    # Batch work still completes under the deadline policy (it fills leftover capacity, never starves).
    assert d["batch_completed"] > 0


def test_refused_dropped_and_cancelled_requests_are_never_goodput():
    result = simulate(SimConfig(policy="deadline", rate_per_s=4.0, duration_s=20.0))
    statuses = {r.status for r in result.records}
    assert {"rejected", "ok"} <= statuses
    for r in result.records:
        if r.status != "ok":
            assert not r.met_goodput(result.config) and not r.met_budget()
    good = sum(r.met_goodput(result.config) for r in result.records)
    assert result.goodput_req_per_s == good / 20.0
