"""rtserve.bench.workloads: lengths, the built-in prompt set, class shares and rt budgets."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from rtserve.bench.config import BenchConfig, parse_mix
from rtserve.bench.workloads import iter_workload, load_prompt_data, sample_len


def _take(cfg: BenchConfig, n: int):
    return list(itertools.islice(iter_workload(cfg), n))


def test_prompt_data_ships_with_the_package():
    data = load_prompt_data()
    assert len(data["chat"]) >= 40
    assert {e["kind"] for e in data["chat"]} == {"short", "medium", "long"}
    assert len(data["shared_prefix_questions"]) >= 10


@pytest.mark.parametrize("dist", ["fixed", "uniform", "lognormal"])
def test_length_distributions_keep_the_mean(dist):
    rng = np.random.default_rng(0)
    lens = [sample_len(200, dist, rng) for _ in range(4000)]
    assert min(lens) >= 1
    assert np.mean(lens) == pytest.approx(200, rel=0.05)


def test_synthetic_prompt_has_about_input_len_words_and_is_seeded():
    specs = _take(BenchConfig(input_len=300, output_len=20), 3)
    assert [len(s.prompt.split()) for s in specs] == [300, 300, 300]
    assert all(s.max_tokens == 20 and s.rt is None for s in specs)
    assert specs[0].prompt != specs[1].prompt
    assert [s.prompt for s in _take(BenchConfig(input_len=300, output_len=20), 3)] == [s.prompt for s in specs]


def test_shared_prefix_shares_the_system_prompt():
    specs = _take(BenchConfig(workload="shared-prefix", prefix_len=500), 5)
    assert len({s.messages[0]["content"] for s in specs}) == 1
    assert len(specs[0].messages[0]["content"].split()) == pytest.approx(500, rel=0.1)


def test_realtime_mix_shares_and_budgets():
    cfg = BenchConfig(workload="realtime-mix", mix=parse_mix("firm:1,soft:2,batch:1"),
                      rt_deadline_ms=2000.0, long_input_len=100)
    specs = _take(cfg, 800)
    counts = {c: sum(s.rt_class == c for s in specs) / len(specs) for c in ("firm", "soft", "batch")}
    assert counts == pytest.approx({"firm": 0.25, "soft": 0.5, "batch": 0.25}, abs=0.05)
    firm = next(s for s in specs if s.rt_class == "firm")
    assert firm.rt.to_wire() == {"class": "firm", "ttft_ms": 500.0, "itl_ms": 50.0, "deadline_ms": 2000.0}
    batch = next(s for s in specs if s.rt_class == "batch")
    assert batch.rt.to_wire() == {"class": "batch"} and batch.input_len_est == 100


def test_interference_has_periodic_long_prompts():
    specs = _take(BenchConfig(workload="long-prompt-interference", long_every=4, long_input_len=64), 12)
    assert [s.rt_class for s in specs].count("long") == 3
    assert all(s.rt_class == "long" for s in specs[3::4])
