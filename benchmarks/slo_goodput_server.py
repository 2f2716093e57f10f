"""A fresh `rtserve serve` per benchmark run, and load-tool subprocesses that never outlive the script.

Each child runs in its own process group (session), so stopping it also stops what it spawned (the
engine-core process, guidellm's workers). Groups still alive when the script exits, by return,
exception, SIGINT or SIGTERM, are killed.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

_LIVE_GROUPS: set[int] = set()  # process-group ids this script started and has not reaped


def _kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        _signal_group(pgid, signal.SIGKILL)
    _LIVE_GROUPS.clear()


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `with` blocks, which stop their servers


atexit.register(_kill_live_groups)
signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the child's group, then SIGKILL it after `grace_s`; reaps the child."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group, if any
    proc.wait()
    _LIVE_GROUPS.discard(proc.pid)


def start_group(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    _LIVE_GROUPS.add(proc.pid)
    return proc


def run_process_group(cmd: list[str], log_path: Path, timeout_s: float,
                      env: dict | None = None) -> int:
    """Run `cmd` to the end (output to `log_path`); its group is stopped on timeout or interrupt."""
    proc = start_group(cmd, log_path, env)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise TimeoutError(f"{Path(cmd[0]).name} ran past {timeout_s:.0f} s; see {log_path}") from exc
    finally:
        stop_group(proc, grace_s=5.0)


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on `port`. SO_REUSEADDR, as uvicorn binds: the TIME_WAIT
    connections a stopped server leaves behind do not make its port busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(first: int, tries: int = 100) -> int:
    for port in range(first, first + tries):
        if is_port_free(port):
            return port
    raise OSError(f"no free port in {first}..{first + tries - 1}")


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_status(url: str) -> int | None:
    try:
        with _NO_PROXY.open(url, timeout=15) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class RtserveServer:
    """`rtserve serve --policy P` on 127.0.0.1, as a context manager that always stops it.

    Ready means /health answers 200 (model loaded, socket bound) and then /ready answers 200 (a
    one-token generation went through the engine: the first request pays no warm-up).
    """

    def __init__(self, policy: str, first_port: int, extra_args: list[str], log_path: Path,
                 ready_timeout_s: float = 180.0) -> None:
        self.policy = policy
        self.port = free_port(first_port)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "rtserve", "serve", "--host", "127.0.0.1",
                    "--port", str(self.port), "--policy", policy, *extra_args]
        self.log_path = log_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "RtserveServer":
        self.proc = start_group(self.cmd, self.log_path)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        for path in ("/health", "/ready"):
            while _get_status(self.base_url + path) != 200:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"rtserve serve exited with {self.proc.returncode}; "
                                       f"see {self.log_path}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.base_url}{path} not 200 after "
                                       f"{self.ready_timeout_s:.0f} s; see {self.log_path}")
                time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_group(self.proc)
        self.proc = None
        deadline = time.monotonic() + 10.0  # the next run may want the same port
        while not is_port_free(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
