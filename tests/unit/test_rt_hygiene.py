"""rtserve.engine.rt_hygiene: the garbage collector moved between steps, the KV cache pre-faulted, and
every refused measure logged and skipped (never raised). Nothing here changes this process's CPU
affinity, scheduling class or niceness: the calls that would are refused or replaced."""
from __future__ import annotations

import gc
import logging
import os

import pytest
import torch

from rtserve.api.server import build_parser, engine_config_from_args
from rtserve.config import HygieneConfig, parse_cpu_list
from rtserve.engine import rt_hygiene
from rtserve.engine.rt_hygiene import FULL_EVERY_YOUNG, EngineHygiene


@pytest.fixture
def restore_gc():
    yield
    gc.enable()
    gc.unfreeze()


class Cycle:
    def __init__(self) -> None:
        self.me = self


def make_cyclic_garbage(n: int) -> None:
    for _ in range(n):
        Cycle()


def test_gc_is_frozen_and_collected_only_between_steps_and_when_idle(make_core, restore_gc):
    hygiene = EngineHygiene(HygieneConfig(gc_young_budget=500, prefault_kv=False))
    hygiene.after_warmup(make_core())
    assert not gc.isenabled() and gc.get_freeze_count() > 0
    assert any(a.startswith("gc=frozen") for a in hygiene.applied)
    make_cyclic_garbage(2000)  # the automatic collector would have run here: it is off
    assert gc.get_count()[0] >= 500
    hygiene.between_steps()
    assert hygiene.num_young_collections == 1 and gc.get_count()[0] < 500
    hygiene.between_steps()  # under the budget: nothing
    assert hygiene.num_young_collections == 1
    for _ in range(FULL_EVERY_YOUNG - 1):
        make_cyclic_garbage(600)
        hygiene.between_steps()
    assert hygiene.num_full_collections == 1  # every tenth collection is a full one
    make_cyclic_garbage(10)
    hygiene.idle()
    assert hygiene.num_full_collections == 2 and gc.get_count()[1:] == (0, 0) and gc.get_count()[0] < 10


def test_prefault_writes_the_kv_cache(make_core, restore_gc):
    core = make_core()
    for cache in core.runner.kv_caches:
        cache.fill_(float("nan"))
    EngineHygiene(HygieneConfig(gc=False)).after_warmup(core)
    assert all(not torch.isnan(c).any() for c in core.runner.kv_caches)


def test_off_applies_nothing(make_core, restore_gc, caplog):
    hygiene = EngineHygiene(HygieneConfig(gc=False, prefault_kv=False))
    hygiene.before_load()
    with caplog.at_level(logging.INFO, logger="rtserve.engine"):
        hygiene.after_warmup(make_core())
    assert hygiene.applied == [] and gc.isenabled()
    assert "real-time hygiene: none" in caplog.text
    hygiene.between_steps()
    hygiene.idle()
    assert hygiene.num_full_collections == hygiene.num_young_collections == 0


def test_refused_measures_are_logged_and_skipped(make_core, restore_gc, monkeypatch, caplog):
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(os, "nice", refuse)
    monkeypatch.setattr(rt_hygiene, "_mlockall", lambda: refuse())
    before = os.sched_getaffinity(0)
    with caplog.at_level(logging.INFO, logger="rtserve.engine"):
        fifo = EngineHygiene(HygieneConfig(sched="fifo", cpus="100000", mlock=True, gc=False))
        fifo.before_load()
        fifo.after_warmup(make_core())
        nice = EngineHygiene(HygieneConfig(sched="nice"))
        nice.before_load()
    assert os.sched_getaffinity(0) == before
    assert fifo.applied == ["prefault_kv"] and nice.applied == []
    for name in ("sched=fifo", "cpus", "mlock", "nice-5"):
        assert f"real-time hygiene: {name} not applied" in caplog.text
    assert "not permitted" in caplog.text and "real-time hygiene: prefault_kv" in caplog.text


def test_cpu_lists_and_config_checks():
    assert parse_cpu_list("0-3,6, 8") == {0, 1, 2, 3, 6, 8} and parse_cpu_list("") == set()
    for bad in ("x", "3-1", "-1", "1-a"):
        with pytest.raises(ValueError, match="CPU list"):
            parse_cpu_list(bad)
    with pytest.raises(ValueError, match="sched"):
        HygieneConfig(sched="batch")
    with pytest.raises(ValueError):
        HygieneConfig(sched_priority=0)


def test_serve_flags():
    default = engine_config_from_args(build_parser().parse_args([])).hygiene
    assert default == HygieneConfig() and default.gc and default.prefault_kv and not default.mlock
    off = engine_config_from_args(build_parser().parse_args(["--no-rt-hygiene"])).hygiene
    assert not off.gc and not off.prefault_kv
    on = engine_config_from_args(build_parser().parse_args([
        "--rt-mlock", "--rt-engine-cpus", "1-3", "--rt-sched", "fifo", "--rt-sched-priority", "10"])).hygiene
    assert (on.mlock, on.cpus, on.sched, on.sched_priority, on.gc) == (True, "1-3", "fifo", 10, True)


def test_api_share_sets_the_engine_openmp_wait_policy(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert rt_hygiene.apply_api_hygiene("", freeze_heap=False) == []
    assert "OMP_WAIT_POLICY" not in os.environ
    applied = rt_hygiene.apply_api_hygiene("", freeze_heap=False, omp_wait_policy="passive")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and applied == ["engine OMP_WAIT_POLICY=PASSIVE"]
    assert build_parser().parse_args(["--rt-omp-wait-policy", "passive"]).rt_omp_wait_policy == "passive"
