"""`rtserve chat`: the session logic against scripted HTTP answers, and the terminal program itself
through a pseudo-terminal against a real uvicorn with the fake engine. The pseudo-terminal's output also
drives a terminal emulator (pyte), whose screen is saved as chat-terminal.png in $RTSERVE_TEST_ARTIFACTS
(default: pytest's temporary directory) when a system Chromium is there to rasterize it."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pexpect
import pyte
import pytest
from rich.console import Console
from rich.style import Style
from rich.text import Text

from rtserve.chat.session import AnswerStats, ChatError, ChatSession, parse_budget
from rtserve.client.rt_report import RTReport
from tests.integration.fake_engine import FakeEngine, LiveServer, build_test_app

KEY = "chat-key"


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


RT_REPORT = {"class": "firm", "budget": {"ttft_ms": 300.0, "itl_ms": 50.0, "deadline_ms": None},
             "ttft_ms": 120.0, "itl_ms": {"p50": 20.0, "p99": 70.0, "max": 70.0}, "deadline_met": False,
             "missed": ["itl"], "dropped": False}


def scripted(handler) -> httpx.Client:
    return httpx.Client(base_url="http://server", transport=httpx.MockTransport(handler))


def test_session_streams_keeps_history_and_sends_rt_only_when_asked():
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, content=sse(delta("Hel"), delta("lo", "stop"), {
            "choices": [], "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}},
            "rt": RT_REPORT}), headers={"content-type": "text/event-stream"})

    session = ChatSession(model="m", system="be brief")
    with scripted(handler) as client:
        events = list(session.stream(client, "hi"))
        assert "".join(e.text for e in events) == "Hello"
        assert "rt" not in bodies[0] and bodies[0]["messages"][0] == {"role": "system", "content": "be brief"}
        session.rt_class, session.budgets_ms = "firm", parse_budget(["ttft=300", "itl_ms=50"])
        list(session.stream(client, "again"))
    assert bodies[1]["rt"] == {"class": "firm", "ttft_ms": 300.0, "itl_ms": 50.0}
    assert [m["role"] for m in bodies[1]["messages"]] == ["system", "user", "assistant", "user"]
    assert session.history[-1] == {"role": "assistant", "content": "Hello"}
    stats = events[-1].stats
    assert stats.num_tokens == 2 and stats.finish_reason == "stop"
    footer = stats.footer()
    assert "8 cached" in footer and "firm (ttft 300 ms, itl 50 ms): missed itl" in footer


def test_plain_openai_server_without_rt_or_usage():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(delta("A"), delta("B"), delta("", "length")))

    session = ChatSession(model="gpt")
    with scripted(handler) as client:
        stats = list(session.stream(client, "hi"))[-1].stats
    assert stats.rt is None and stats.verdict is None and stats.num_tokens == 2
    assert stats.footer().endswith("2 tokens · finish: length")


def test_refusal_takes_the_question_back_and_reads_retry_after():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"error": {"message": "queue is full", "code": "queue_full"}},
                              headers={"retry-after": "2", "retry-after-ms": "1500"})

    session = ChatSession(model="m")
    with scripted(handler) as client, pytest.raises(ChatError) as exc:
        list(session.stream(client, "hi"))
    assert (exc.value.status, exc.value.retry_after_s) == (429, 1.5) and "queue_full" in exc.value.message
    assert session.history == []


def test_in_band_error_after_some_text_keeps_the_partial_answer():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse(delta("Par"), {"error": {"message": "engine died"}}))

    session = ChatSession(model="m")
    with scripted(handler) as client, pytest.raises(ChatError, match="engine died"):
        list(session.stream(client, "hi"))
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Par"}]


def test_answer_stats_and_budget_parsing():
    stats = AnswerStats(sent_s=0.0)
    for now_s in (0.1, 0.12, 0.15, 0.17, 0.30):
        stats.on_text(now_s)
    assert stats.ttft_ms == pytest.approx(100.0)
    assert stats.itl_p99_ms == pytest.approx(130.0)  # the largest of four gaps
    assert stats.tokens_per_s() == pytest.approx(4 / 0.2)
    assert stats.verdict is None  # no rt report: any OpenAI-compatible server
    stats.rt = {**RT_REPORT, "dropped": True}
    assert stats.verdict == "dropped"
    with pytest.raises(ValueError, match="unknown budget 'tpot'"):
        parse_budget(["tpot=5"])
    with pytest.raises(ValueError, match="itl must be a positive"):
        parse_budget(["itl=-3"])


# ---- the terminal program in a pseudo-terminal --------------------------------------------------------

class ReportingEngine(FakeEngine):
    """The fake engine, plus an rt report on each finished answer (the budgets it resolved for the last
    request it admitted, nothing missed), as the real engine sends one for every request."""

    async def _tokens(self, prompt_ids, params, request_id):  # noqa: ANN001 - FakeEngine's signature
        async for out in super()._tokens(prompt_ids, params, request_id):
            if out.finished and getattr(self, "rt_params", None):
                rt = self.rt_params[-1]
                out = dataclasses.replace(out, rt=RTReport(rt.rt_class, rt.ttft_s, rt.itl_s, rt.deadline_s))
            yield out


@pytest.fixture
def served():
    # 50 ms a token: the answer (cut by length near 350 tokens) streams for ~17 s, so the Ctrl-C the
    # test sends once the live footer shows lands mid-answer even on a loaded CI host (at 20 ms a
    # token, one CI run saw the answer end first).
    engine = ReportingEngine(reply="Paris is the capital of France. " * 20, step_s=0.05)
    app, engine = build_test_app(engine, api_key=KEY)
    with LiveServer(app) as server:
        yield server, engine


ROWS, COLUMNS = 30, 100
# The same lookup as the browser tests: Debian's chromium (.ci/run installs it when missing).
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class TerminalScreen:
    """What a person would see: everything the program writes to the pseudo-terminal (pexpect's
    `logfile_read`) goes through a VT100 emulator, so cursor moves and the live footer's erasing apply."""

    def __init__(self) -> None:
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.Stream(self.screen)

    def write(self, data: str) -> None:
        self.stream.feed(data)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        """The screen's rows, trailing blank rows dropped."""
        lines = [line.rstrip() for line in self.screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def snapshot(self) -> Text:
        """The screen as rich Text, colours and bold kept (trailing blank rows dropped)."""
        def color(name: str) -> str | None:
            if name == "default":
                return None
            if re.fullmatch(r"[0-9a-fA-F]{6}", name):
                return "#" + name
            name = name.replace("brown", "yellow")  # pyte's name for ANSI colour 3
            return "bright_" + name.removeprefix("bright") if name.startswith("bright") else name

        rows = []
        for y in range(self.screen.lines):
            row, line = Text(), self.screen.buffer[y]
            for x in range(self.screen.columns):
                char = line[x]
                if char.data:  # the second cell of a wide character is empty
                    row.append(char.data, Style(color=color(char.fg), bgcolor=color(char.bg), bold=char.bold,
                                                italic=char.italics, underline=char.underscore,
                                                strike=char.strikethrough, reverse=char.reverse))
            row.rstrip()
            rows.append(row)
        while rows and not rows[-1].plain:
            rows.pop()
        return Text("\n").join(rows)


def save_terminal_png(text: Text, path: Path) -> None:
    """rich draws the screen as a terminal window (SVG); Chromium rasterizes it. Nothing is fetched: the
    SVG's web-font URLs are refused, so a local monospace font draws it."""
    console = Console(record=True, width=COLUMNS, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor")
    console.print(text)
    svg = console.export_svg(title="rtserve chat")
    width, height = (float(v) for v in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    from playwright.sync_api import sync_playwright  # only where a Chromium is there to drive

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": int(width) + 1, "height": int(height) + 1})
            page.route("**/*", lambda route: route.abort())
            page.set_content(f"<body style='margin:0'><style>svg{{display:block;width:{width}px;"
                             f"height:{height}px}}</style>{svg}</body>")
            page.evaluate("document.fonts.ready.then(() => true)")
            page.locator("svg").screenshot(path=str(path))
        finally:
            browser.close()


def spawn_chat(url: str) -> pexpect.spawn:
    # Colours on (no NO_COLOR) so that the screenshot shows them; TERM=xterm keeps rich to 16 colours.
    env = {**os.environ, "TERM": "xterm", "COLUMNS": str(COLUMNS), "LINES": str(ROWS), "PROMPT_TOOLKIT_NO_CPR": "1"}
    env.pop("NO_COLOR", None)
    # Started with SIGINT ignored, as from a background job (how one CI run started the suite): Ctrl-C
    # must still stop an answer.
    child = pexpect.spawn(sys.executable, ["-m", "rtserve", "chat", "--base-url", url + "/v1", "--api-key", KEY],
                          env=env, dimensions=(ROWS, COLUMNS), encoding="utf-8", timeout=30,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    child.logfile_read = TerminalScreen()
    child.expect("model fake-model")
    child.expect("you>")
    return child


def wait_until(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_terminal_chat_streams_stops_on_ctrl_c_and_sends_the_class(served, tmp_path):
    server, engine = served
    child = spawn_chat(server.url)
    terminal = child.logfile_read
    try:
        child.sendline("/class firm")
        child.expect("class firm")
        child.expect("you>")
        child.sendline("Where is Paris?")
        child.expect("Paris is the")          # text arrives while the answer streams
        child.expect(r"TTFT \d+ ms")          # under the live footer
        assert engine.rt_params[-1].rt_class == "firm"  # the rt object reached the server
        child.sendcontrol("c")
        child.expect("stopped")
        child.expect("you>")                 # the program is still there
        wait_until(lambda: engine.aborted, "the server saw the request end early")
        assert not engine.finished
        engine.reply = "Still here."
        child.sendline("Are you there?")      # the next question gets an answer
        child.expect("Still here.")
        child.expect(r"11 tokens")
        child.expect("you>")
        screen, lines = terminal.snapshot(), terminal.lines()
        wait_until(lambda: engine.finished, "the second answer completed")
        history = engine.prompts[engine.finished[-1]]
        assert "Where is Paris?" in bytes(i - 1 for i in history).decode()  # the conversation went on
        child.send("one\x1b\rtwo\r")          # Esc Enter: a new line inside one message
        wait_until(lambda: len(engine.finished) == 2, "the two-line message was answered")
        assert "one\ntwo" in bytes(i - 1 for i in engine.prompts[engine.finished[-1]]).decode()
        child.expect("you>")
        child.sendline("/class default")
        child.expect("class default")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    # On the screen after the second answer: each answer printed once under its final footer (the live
    # footer erased itself), the stopped one marked so, the firm one with its verdict.
    footers = [line for line in lines if line.startswith("TTFT ")]
    assert len(footers) == 2, lines
    text = "\n".join(lines)
    first, second, question = text.index(footers[0]), text.index(footers[1]), text.index("you> Are you there?")
    assert first < question < second and "stopped" in text[first:question], lines
    assert re.search(r"11 tokens · firm.*: (met|missed|dropped)", text[second:].replace("\n", " ")), lines
    assert "Still here." in lines and lines[-1].startswith("you>"), lines
    if CHROMIUM is not None:
        artifacts = Path(os.environ.get("RTSERVE_TEST_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        save_terminal_png(screen, artifacts / "chat-terminal.png")
        assert (artifacts / "chat-terminal.png").read_bytes().startswith(b"\x89PNG")
