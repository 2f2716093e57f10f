"""The chat page and dashboard in a real browser: Playwright driving the system Chromium (Playwright
cannot download its own browsers here; .ci/run installs Debian's `chromium` when it is missing).

Most tests run the page against a real uvicorn with the fake engine (scripted replies: markup in the
answer, refusals, slow streams); the `slow` one runs a real `rtserve serve` on SmolLM2. Screenshots go
to $RTSERVE_TEST_ARTIFACTS (default: pytest's temporary directory).
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from rtserve.client.async_llm import AdmissionRejected
from rtserve.client.outputs import RequestOutput
from rtserve.engine.admission import AdmissionDecision
from tests.integration.fake_engine import FakeEngine, LiveServer, ServerProcess, build_test_app

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (.ci/run installs Debian's chromium)")

KEY = "browser-key"
HOSTILE = "Look: <img src=x onerror=alert(1)> and <script>window.__pwned = 1; alert(2)</script> **done**"


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    path = Path(os.environ.get("RTSERVE_TEST_ARTIFACTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 390, "height": 844})  # phone width
    pg = context.new_page()
    pg.dialogs, pg.errors = [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    yield pg
    context.close()
    assert pg.errors == []  # no uncaught script error on the page


def serve(engine: FakeEngine, **settings) -> LiveServer:
    app, _ = build_test_app(engine, **settings)
    return LiveServer(app)


def open_chat(page, url: str, key: str | None = None) -> None:
    page.goto(url + "/")
    if key is not None:
        page.wait_for_selector("#key-dialog:not([hidden])")
        page.fill("#key-input", key)
        page.click("#key-submit")
    page.wait_for_selector("body[data-ready='1']")


def watch_answer_growth(page) -> None:
    """Record every distinct length the newest answer's text takes (what the user saw grow)."""
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.msg.assistant .body');
            if (!bodies.length) return;
            const n = bodies[bodies.length - 1].textContent.length;
            if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


def strip_has_bars(page) -> bool:
    """Whether the newest answer's gap strip has anything drawn on it."""
    return page.evaluate("""() => {
        const strips = document.querySelectorAll('.msg.assistant canvas.gaps');
        const c = strips[strips.length - 1];
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        return px.some((v, i) => i % 4 === 3 && v > 0);
    }""")


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator(".msg.assistant").last


def test_key_prompt_streaming_and_hostile_markup_stays_text(page, artifacts):
    with serve(FakeEngine(reply=HOSTILE, step_s=0.01), api_key=KEY) as server:
        open_chat(page, server.url, key=KEY)
        assert page.evaluate("sessionStorage.getItem('rtserve-api-key')") == KEY
        watch_answer_growth(page)
        send(page, "Say something nasty")
        page.wait_for_selector(".msg.assistant[data-state='done']", timeout=20_000)
        answer = last_answer(page)
        body = answer.locator(".body")
        assert "<img src=x onerror=alert(1)>" in body.inner_text()
        assert "<script>window.__pwned = 1; alert(2)</script>" in body.inner_text()
        assert body.locator("img, script").count() == 0
        assert body.locator("strong").inner_text() == "done"  # Markdown still renders
        assert page.evaluate("window.__pwned") is None and page.dialogs == []
        lengths = page.evaluate("window.__lengths")
        assert len([n for n in lengths if n > 0]) >= 3, lengths  # grew in visible steps (** vanish at the end)
        assert re.fullmatch(r"\d+(\.\d)? ms", answer.locator(".fig-ttft .value").inner_text())
        assert answer.locator("canvas.gaps").count() == 1
        assert strip_has_bars(page)
        page.screenshot(path=str(artifacts / "chat-fake.png"), full_page=True)


def test_key_is_kept_for_the_tab_only(browser):
    with serve(FakeEngine(), api_key=KEY) as server:
        context = browser.new_context()
        try:
            first = context.new_page()
            open_chat(first, server.url, key=KEY)
            first.reload()
            first.wait_for_selector("body[data-ready='1']")  # same tab: no second prompt
            other = context.new_page()
            other.goto(server.url + "/")
            other.wait_for_selector("#key-dialog:not([hidden])")  # a new tab asks again
            other.fill("#key-input", "wrong")
            other.click("#key-submit")
            other.wait_for_function("() => document.getElementById('key-message').textContent.includes('refused')")
        finally:
            context.close()


def test_websocket_transport_and_stop(page):
    engine = FakeEngine(reply="tick " * 400, step_s=0.02)
    with serve(engine, api_key=KEY) as server:
        open_chat(page, server.url, key=KEY)
        page.click("#settings summary")
        page.select_option("#transport", "ws")
        send(page, "count")
        page.wait_for_function("() => document.querySelectorAll('.msg.assistant .body')[0]?.textContent.length > 20")
        page.click("#stop")
        page.wait_for_selector(".msg.assistant[data-state='stopped']")
        assert "Stopped by you" in last_answer(page).inner_text()
        deadline = time.monotonic() + 20
        while not engine.aborted:
            assert time.monotonic() < deadline, "the engine request was not aborted"
            time.sleep(0.05)
        assert not engine.finished


def test_429_counts_down_and_firm_drop_is_explained(page):
    rejected = AdmissionRejected(AdmissionDecision(False, 2.0, 2.2, "queue_full", "the queue is full"), "soft")
    engine = FakeEngine(reject_with=rejected)
    with serve(engine) as server:
        open_chat(page, server.url)
        send(page, "hello")
        notice = last_answer(page).locator(".notice")
        notice.wait_for()
        assert "its queue is full" in notice.inner_text()
        assert re.search(r"Retry in [23] s", notice.inner_text())
        page.wait_for_function("() => Number(document.querySelector('.notice').dataset.retryIn) <= 1", timeout=10_000)
        page.wait_for_selector("button.retry:not([disabled])", timeout=10_000)

    class DroppingEngine(FakeEngine):
        async def _tokens(self, prompt_ids, params, request_id):
            yield RequestOutput(request_id=request_id, finished=True, finish_reason="deadline",
                                num_prompt_tokens=len(prompt_ids), error="deadline: TTFT budget passed")

    with serve(DroppingEngine()) as server:
        open_chat(page, server.url)
        page.click("#settings summary")
        page.select_option("#rt-class", "firm")
        page.fill("#ttft-ms", "200")
        send(page, "hello")
        notice = last_answer(page).locator(".notice.error")
        notice.wait_for()
        assert "could not get its first token within its TTFT budget (200 ms)" in notice.inner_text()
        assert "Nothing was generated" in notice.inner_text()

    class CuttingEngine(FakeEngine):
        async def _tokens(self, prompt_ids, params, request_id):
            for i, ch in enumerate("abc"):
                yield RequestOutput(request_id=request_id, text=ch, token_ids=[ord(ch) + 1], num_output_tokens=i + 1)
            yield RequestOutput(request_id=request_id, finished=True, finish_reason="deadline", num_output_tokens=3)

    with serve(CuttingEngine()) as server:
        open_chat(page, server.url)
        send(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state='done']")
        assert last_answer(page).locator(".body").inner_text() == "abc"
        assert "Cut short by its deadline" in last_answer(page).locator(".notice.warn").inner_text()

    with serve(FakeEngine(reply="abcdef", error_after=3)) as server:  # fails after three tokens
        open_chat(page, server.url)
        send(page, "hello")
        page.wait_for_selector(".msg.assistant[data-state='error']")
        assert last_answer(page).locator(".body").inner_text() == "abc"
        assert "Error" in last_answer(page).locator(".notice.error").inner_text()


def test_dashboard_plots_update_under_load(page, artifacts):
    engine = FakeEngine(reply="x" * 40, step_s=0.01)
    with serve(engine, api_key=KEY) as server:
        page.goto(server.url + "/dashboard")
        page.fill("#key-input", KEY)
        page.click("#key-submit")
        page.wait_for_function("() => Number(document.getElementById('plot-tps').dataset.points) >= 1")

        def load() -> None:
            with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {KEY}"}) as client:
                for _ in range(6):
                    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})

        worker = threading.Thread(target=load)
        worker.start()
        page.wait_for_function("() => Number(document.querySelector('#plot-tps .value').textContent) > 0",
                               timeout=30_000)
        page.wait_for_function("() => document.querySelector('#plot-ttft .value').textContent !== '–'",
                               timeout=30_000)
        worker.join()
        before = int(page.get_attribute("#plot-tps", "data-points"))
        page.wait_for_function(f"() => Number(document.getElementById('plot-tps').dataset.points) > {before}")
        assert page.locator("#conn").inner_text() == "live"
        page.screenshot(path=str(artifacts / "dashboard-fake.png"), full_page=True)


@pytest.mark.slow
def test_real_server_streams_reports_rt_and_stop_frees_the_engine(browser, artifacts):
    """A real `rtserve serve` (SmolLM2): the answer grows token by token with TTFT and the rt verdict;
    the dashboard's plots move while a small mixed-class load runs; Stop ends the request (running back
    to 0)."""
    with ServerProcess("--max-num-seqs", "4") as server:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        try:
            dash = context.new_page()
            dash.goto(server.url + "/dashboard")
            dash.wait_for_function("() => Number(document.getElementById('plot-tps').dataset.points) >= 1")
            page = context.new_page()
            open_chat(page, server.url)
            watch_answer_growth(page)
            page.click("#settings summary")
            page.fill("#max-tokens", "48")
            page.click("#settings summary")
            send(page, "Write two sentences about the sea.")
            page.wait_for_selector(".msg.assistant[data-state='done']", timeout=120_000)
            answer = last_answer(page)
            assert len(page.evaluate("window.__lengths")) >= 3
            assert re.fullmatch(r"\d+(\.\d)? ms", answer.locator(".fig-ttft .value").inner_text())
            assert answer.locator(".fig-verdict").get_attribute("data-verdict") in ("met", "missed")
            assert "soft" in answer.locator(".fig-class .value").inner_text()
            assert strip_has_bars(page)
            page.screenshot(path=str(artifacts / "chat.png"))

            worker = threading.Thread(target=mixed_load, args=(server.url,))
            worker.start()
            dash.wait_for_function("() => Number(document.querySelector('#plot-tps .value').textContent) > 0",
                                   timeout=60_000)
            worker.join()
            dash.wait_for_function("() => document.querySelector('#plot-ttft .value').textContent !== '–'",
                                   timeout=30_000)
            dash.screenshot(path=str(artifacts / "dashboard.png"))

            page.click("#settings summary")
            page.fill("#max-tokens", "")
            send(page, "Now write a long story about a lighthouse keeper.")
            page.wait_for_selector(".msg.assistant[data-state='streaming']", timeout=120_000)
            page.click("#stop")
            page.wait_for_selector(".msg.assistant[data-state='stopped']")
            deadline = time.monotonic() + 30
            while running(server) != 0:
                assert time.monotonic() < deadline, "the stopped request still runs"
                time.sleep(0.1)
        finally:
            context.close()


def mixed_load(url: str) -> None:
    """Nine short requests, three per class, three at a time."""
    def one(rt_class: str) -> None:
        httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": f"Name three {rt_class} things."}], "max_tokens": 32,
            "rt": {"class": rt_class}})
    for _ in range(3):
        threads = [threading.Thread(target=one, args=(c,)) for c in ("firm", "soft", "batch")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def running(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M).group(1))
