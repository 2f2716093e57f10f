"""Real-time hygiene in a real `rtserve serve`: the engine process logs what it applied (heap frozen,
KV cache pre-faulted) and a measure the system refuses (here CPUs that do not exist) is one log line,
not a failed start; the server then serves. `--no-rt-hygiene` turns the default measures off: its engine
process holds the KV pool's pages only as they are used, so it is smaller by about the pool's size."""
from __future__ import annotations

import httpx
import psutil
import pytest

try:
    from tests.integration.fake_engine import ServerProcess
except ImportError:  # tests/integration not importable as a package
    from fake_engine import ServerProcess

pytestmark = pytest.mark.slow

KV_BYTES = 256 * 2**20


def engine_rss(server: ServerProcess) -> int:
    children = psutil.Process(server.proc.pid).children()
    return sum(c.memory_info().rss for c in children if "resource_tracker" not in " ".join(c.cmdline()))


def test_hygiene_is_applied_and_a_refused_measure_is_logged_and_off_turns_it_off():
    with ServerProcess("--no-rt-calibrate", "--no-batch-api", "--kv-cache-bytes", str(KV_BYTES),
                       "--rt-engine-cpus", "100000") as server:
        log = server.log_text()
        assert "real-time hygiene: cpus not applied" in log
        line = next(x for x in log.splitlines() if "real-time hygiene: prefault_kv" in x)
        assert "gc=frozen(" in line and "between-steps" in line
        assert "real-time hygiene (API process): gc=frozen(" in log
        prefaulted_rss = engine_rss(server)
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    with ServerProcess("--no-rt-calibrate", "--no-batch-api", "--kv-cache-bytes", str(KV_BYTES),
                       "--no-rt-hygiene") as server:
        log = server.log_text()
        assert "real-time hygiene: none" in log and "real-time hygiene (API process): none" in log
        backend = next(x for x in log.splitlines() if "rtserve.engine: backend:" in x)
        if " fast " in backend and "native_kernels=True" in backend:  # else the pool is made zeroed: touched anyway
            assert prefaulted_rss - engine_rss(server) > KV_BYTES // 2
