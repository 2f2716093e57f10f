"""A test double for rtserve.client.async_llm.AsyncLLM: same surface, scripted output, records aborts.

It "generates" a fixed reply one ASCII character per token (ids = byte + 1), optionally gated by an
event (to hold requests queued or mid-decode) and slowed by `step_s`. Used by the fast API tests.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rtserve.client.outputs import RequestOutput
from rtserve.config import LimitsConfig
from rtserve.protocol import EngineStats, TokenLogprob
from rtserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """Same name as the real one; the API maps it to 503."""


class FakeTokenizer:
    """Byte-level: id = byte + 1; id 0 is EOS."""

    eos_token_id = 0
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - 1 for i in ids if 1 <= i <= 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode_as_text(self, text: str) -> list[int]:
        return self.encode(text)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


@dataclass
class FakeEngine:
    reply: str = "Paris is the capital of France."
    step_s: float = 0.0
    max_model_len: int = 512
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    max_running: int = 4
    num_cached_tokens: int = 0
    gate: asyncio.Event | None = None     # when set: every token waits for it
    fail_after: int | None = None         # raise EngineDeadError after this many tokens
    error_after: int | None = None        # yield finish_reason="error" after this many tokens
    model_name: str = "fake-model"
    is_dead: bool = False
    ready: bool = True
    reject_with: Exception | None = None  # raised by check_admission (e.g. an AdmissionRejected)
    rt_listener: object | None = None

    def __post_init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.stats = EngineStats(num_total_blocks=100, num_free_blocks=100)
        self.started: list[str] = []
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.params: dict[str, SamplingParams] = {}
        self.prompts: dict[str, list[int]] = {}
        self._slots: asyncio.Semaphore | None = None
        self.num_starts = 0
        self.num_shutdowns = 0

    async def start(self) -> None:
        self.num_starts += 1

    async def shutdown(self) -> None:
        self.num_shutdowns += 1

    async def check_ready(self, timeout_s: float = 10.0) -> bool:
        return self.ready

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("prompt must not be empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt is too long ({len(prompt_ids)} tokens)")
        params.validate(max_tokens_cap=self.limits.max_tokens_cap, max_n=self.limits.max_n,
                        max_logprobs=self.limits.max_logprobs)

    def _refresh_stats(self, running: int, waiting: int) -> None:
        self.stats.num_running += running
        self.stats.num_waiting += waiting
        self.stats.kv_usage = self.stats.num_running / 10

    def check_admission(self, num_prompt_tokens: int, rt=None, arrival_s: float | None = None):
        """Same contract as AsyncLLM.check_admission: resolved budgets, or raise."""
        from rtserve.config import RTConfig
        from rtserve.engine.rt_params import resolve_rt
        resolved = resolve_rt(rt, RTConfig())
        if self.reject_with is not None:
            raise self.reject_with
        self.rt_params = getattr(self, "rt_params", [])
        self.rt_params.append(resolved)
        return resolved

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str, rt=None,
                       arrival_s: float | None = None, admitted: bool = False) -> AsyncIterator[RequestOutput]:
        if self.is_dead:
            raise EngineDeadError("engine core died")
        self.validate(prompt_ids, params)
        self.started.append(request_id)
        self.params[request_id], self.prompts[request_id] = params, list(prompt_ids)
        self._slots = self._slots or asyncio.Semaphore(self.max_running)
        self._refresh_stats(0, 1)
        is_running, is_done = False, False
        try:
            await self._slots.acquire()
            self._refresh_stats(1, -1)
            is_running = True
            async for out in self._tokens(prompt_ids, params, request_id):
                is_done = out.finished
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted.append(request_id)
            raise
        finally:
            if is_running:
                self._slots.release()
                self._refresh_stats(-1, 0)
            else:
                self._refresh_stats(0, -1)
            if is_done:
                self.finished.append(request_id)

    async def _tokens(self, prompt_ids: list[int], params: SamplingParams,
                      request_id: str) -> AsyncIterator[RequestOutput]:
        max_tokens = params.max_tokens or self.max_model_len - len(prompt_ids)
        reply = self.reply
        for i, ch in enumerate(reply):
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.step_s)
            if self.fail_after is not None and i >= self.fail_after:
                self.is_dead = True
                raise EngineDeadError("engine core died")
            common = dict(request_id=request_id, num_prompt_tokens=len(prompt_ids),
                          num_cached_tokens=self.num_cached_tokens, num_output_tokens=i + 1)
            if self.error_after is not None and i >= self.error_after:
                yield RequestOutput(**common, finished=True, finish_reason="error", error="simulated failure")
                return
            stop = next((s for s in params.stop if reply[i:].startswith(s)), None)
            if stop is not None:
                yield RequestOutput(**common, finished=True, finish_reason="stop", stop_reason=stop)
                return
            token_id = ord(ch) + 1
            logprobs = None
            if params.logprobs is not None:
                top = [token_id, 1 + ord("x"), 1 + ord("y")][: params.logprobs]
                logprobs = [TokenLogprob(token_id, -0.25, top, [-0.25 - k for k in range(len(top))])]
            is_last = i + 1 == len(reply) or i + 1 >= max_tokens
            reason = None if not is_last else ("length" if i + 1 >= max_tokens and i + 1 < len(reply) else "stop")
            yield RequestOutput(**common, text=ch, token_ids=[token_id], logprobs=logprobs, finished=is_last,
                                finish_reason=reason)
            if is_last:
                return


# ---- helpers shared by the fast API tests -------------------------------------------------------------

def build_test_app(engine: FakeEngine | None = None, **settings_fields):
    """(app, engine) with a FakeEngine; the lifespan is not needed (the fake needs no start)."""
    from rtserve.api.app import ServerSettings, build_app

    engine = engine or FakeEngine()
    settings_fields.setdefault("manage_engine_lifecycle", False)
    return build_app(engine, ServerSettings(**settings_fields)), engine


def asgi_client(app, **kwargs):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", **kwargs)


class LiveServer:
    """A real uvicorn (httptools) server on 127.0.0.1 in a background thread, for socket-level tests."""

    def __init__(self, app, http="httptools") -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, loop="asyncio", http=http,
                                log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class ServerProcess:
    """A real `python -m rtserve serve` subprocess on 127.0.0.1 (integration tests); log kept in a file."""

    def __init__(self, *args: str, startup_timeout_s: float = 180.0) -> None:
        import socket
        import sys
        import tempfile

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.own_data_dir = None
        if "--data-dir" not in args and "--no-batch-api" not in args:  # never the user's own data dir
            self.own_data_dir = tempfile.mkdtemp(prefix="rtserve-data-")
            args = (*args, "--data-dir", self.own_data_dir)
        self.cmd = [sys.executable, "-m", "rtserve", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="rtserve-serve-", suffix=".log", delete=False)
        self.startup_timeout_s = startup_timeout_s
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def __enter__(self) -> "ServerProcess":
        import os
        import subprocess
        import time

        import httpx

        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=root)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"server not healthy after {self.startup_timeout_s} s:\n{self.log_text()[-3000:]}")

    def __exit__(self, *exc_info: object) -> None:
        import subprocess

        import signal

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # drains: requests still in flight may run on for --shutdown-timeout-s
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)  # a second signal: the server kills its engine and exits
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        if self.own_data_dir is not None and (self.proc is None or self.proc.poll() is not None):
            import shutil
            shutil.rmtree(self.own_data_dir, ignore_errors=True)
