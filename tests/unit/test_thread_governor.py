"""ThreadGovernor with a fake clock and fake CPU counters."""
from rtserve.engine.thread_governor import ThreadGovernor, read_system_busy_s


class FakeCpu:
    """System-wide and own CPU seconds, advanced by `run(wall, own_cores, other_cores)`."""

    def __init__(self):
        self.now = self.system = self.own = 0.0

    def run(self, wall, own_cores, other_cores):
        self.now += wall
        self.own += wall * own_cores
        self.system += wall * (own_cores + other_cores)


def make(cpu, max_threads=2, cores=2):
    calls = []
    gov = ThreadGovernor(max_threads, calls.append, interval_s=0.5, num_cores=cores, clock=lambda: cpu.now,
                         system_busy_s=lambda: cpu.system, self_cpu_s=lambda: cpu.own)
    return gov, calls


def test_keeps_all_threads_on_a_quiet_machine():
    cpu = FakeCpu()
    gov, calls = make(cpu)
    for _ in range(10):
        cpu.run(0.6, own_cores=2.0, other_cores=0.1)
        assert gov.tick() is None
    assert gov.threads == 2 and calls == []


def test_drops_at_once_when_another_process_takes_a_core_and_returns_after_two_quiet_intervals():
    cpu = FakeCpu()
    gov, calls = make(cpu)
    cpu.run(0.6, own_cores=1.0, other_cores=1.0)  # a neighbour holds a core
    assert gov.tick() == 1 and calls == [1]
    cpu.run(0.6, own_cores=1.0, other_cores=0.9)
    assert gov.tick() is None and gov.threads == 1
    cpu.run(0.6, own_cores=1.0, other_cores=0.2)  # quiet again: one interval is not enough
    assert gov.tick() is None and gov.threads == 1
    cpu.run(0.6, own_cores=1.0, other_cores=0.1)
    assert gov.tick() == 2 and calls == [1, 2]


def test_ticks_inside_the_interval_do_nothing_and_one_thread_never_changes():
    cpu = FakeCpu()
    gov, calls = make(cpu)
    cpu.run(0.2, own_cores=1.0, other_cores=2.0)
    assert gov.tick() is None  # 0.2 s < interval
    single, single_calls = make(cpu, max_threads=1)
    cpu.run(1.0, own_cores=1.0, other_cores=1.0)
    assert not single.enabled and single.tick() is None and single_calls == []


def test_never_below_one_thread_under_heavy_load():
    cpu = FakeCpu()
    gov, _ = make(cpu, max_threads=4, cores=4)
    cpu.run(0.6, own_cores=0.5, other_cores=6.0)
    assert gov.tick() == 1


def test_reads_proc_stat_on_linux():
    busy = read_system_busy_s()
    assert busy is None or busy > 0
