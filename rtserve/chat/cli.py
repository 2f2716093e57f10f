"""`rtserve chat`: the terminal front end (prompt_toolkit for input, rich for the streamed answer).

Enter sends, Esc then Enter (or Alt+Enter) starts a new line, and a paste keeps its lines. While an answer
streams, the screen shows its tail and a live footer (TTFT, tok/s, ITL p99, the budget verdict); when it
ends the whole answer is printed as Markdown with the final footer. Ctrl-C stops the answer (the request
is closed, so the server aborts it) and returns to the prompt; at the prompt Ctrl-C clears the line and
Ctrl-D or /quit leaves.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import httpx
from prompt_toolkit import PromptSession
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from rtserve.chat.session import RT_CLASSES, AnswerStats, ChatError, ChatSession, parse_budget

HELP = """commands:
  /system TEXT      set the system prompt (/system alone clears it)
  /class CLASS      firm, soft or batch (sent as the request's rt object); /class default: none
  /budget K=MS ...  ttft=, itl=, deadline= in milliseconds; /budget off clears them
  /reset            forget the conversation (settings stay)
  /help, /quit"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rtserve chat", description="Terminal chat with any OpenAI-compatible "
                                "server; rtserve's real-time fields are shown when present.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (a /v1 suffix is ok)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    p.add_argument("--model", help="model id (default: the first id of GET /v1/models)")
    p.add_argument("--class", dest="rt_class", choices=RT_CLASSES, help="real-time class sent as rt.class")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--max-tokens", type=int, help="max_tokens per answer")
    return p.parse_args(argv)


class Tail:
    """The last lines of `text` that fit the screen above the footer (an answer longer than the screen
    streams without leaving copies of itself in the scrollback)."""

    def __init__(self, text: str, reserve_lines: int = 3) -> None:
        self.text, self.reserve_lines = text, reserve_lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = Text(self.text).wrap(console, options.max_width)
        keep = max(1, console.size.height - self.reserve_lines)
        yield from lines[-keep:]


class ChatApp:
    def __init__(self, args: argparse.Namespace, console: Console | None = None) -> None:
        self.console = console or Console()
        base = args.base_url.rstrip("/").removesuffix("/v1")
        headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.client = httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(600.0, connect=10.0))
        self.session = ChatSession(model=args.model or "", system=args.system, rt_class=args.rt_class,
                                   max_tokens=args.max_tokens)

    def find_model(self) -> None:
        if self.session.model:
            return
        try:
            r = self.client.get("/v1/models")
            self.session.model = r.json()["data"][0]["id"] if r.status_code == 200 else "default"
        except (httpx.HTTPError, ValueError, KeyError, IndexError):
            self.session.model = "default"

    def settings_line(self) -> str:
        s = self.session
        budgets = " ".join(f"{k}={v:g}ms" for k, v in s.budgets_ms.items())
        return (f"model {s.model} · class {s.rt_class or 'default'}{' · ' + budgets if budgets else ''}"
                f"{' · system set' if s.system else ''}")

    def command(self, line: str) -> bool:
        """Run a /command; False to quit."""
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        s = self.session
        if name in ("/quit", "/exit"):
            return False
        if name == "/system":
            s.system = rest
            self.console.print("system prompt " + ("set" if rest else "cleared"), style="dim")
        elif name == "/class":
            if rest not in (*RT_CLASSES, "default"):
                self.console.print(f"/class takes one of {', '.join(RT_CLASSES)} or default", style="red")
            else:
                s.rt_class = None if rest == "default" else rest
                self.console.print(self.settings_line(), style="dim")
        elif name == "/budget":
            try:
                s.budgets_ms = {} if rest in ("off", "") else parse_budget(rest.split())
                self.console.print(self.settings_line(), style="dim")
            except ValueError as exc:
                self.console.print(str(exc), style="red")
        elif name == "/reset":
            s.history.clear()
            self.console.print("conversation cleared", style="dim")
        elif name == "/help":
            self.console.print(HELP, markup=False)
        else:
            self.console.print(f"unknown command {name} (try /help)", style="red")
        return True

    def ask(self, text: str) -> None:
        """Stream one answer under a live footer; Ctrl-C stops it."""
        stats: AnswerStats | None = None
        answer = ""
        answers = self.session.stream(self.client, text)
        with Live(console=self.console, refresh_per_second=12, transient=True) as live:
            try:
                for event in answers:
                    answer, stats = answer + event.text, event.stats
                    live.update(Group(Tail(answer), Text(stats.footer(time.monotonic()), style="cyan")))
            except KeyboardInterrupt:
                answers.close()
                stats = stats or AnswerStats(sent_s=time.monotonic())
                stats.stopped = True
            except ChatError as err:
                live.stop()
                self.refused(err, answer)
                return
            except httpx.HTTPError as exc:
                live.stop()
                self.console.print(f"connection failed: {exc}", style="red")
                return
        self.console.print(Markdown(answer) if answer else Text("(no text)", style="dim"))
        if stats is not None:
            self.console.print(Text(stats.footer(), style="cyan"))

    def refused(self, err: ChatError, answer: str) -> None:
        if answer:
            self.console.print(Markdown(answer))
        if err.status == 504:
            msg = ("dropped: this firm request could not get its first token within its TTFT budget, so the "
                   "server dropped it rather than answer late; nothing was generated")
        elif err.retry_after_s is not None:
            msg = f"refused for now ({err.message}); retry in {err.retry_after_s:.1f} s"
        else:
            msg = f"error {err.status or ''}: {err.message}".replace("  ", " ")
        self.console.print(msg, style="red")

    def run(self) -> int:
        self.find_model()
        self.console.print(f"rtserve chat · {self.client.base_url} · {self.settings_line()}", style="bold")
        self.console.print("Enter sends · Esc Enter: new line · Ctrl-C stops an answer · /help", style="dim")
        keys = KeyBindings()

        @keys.add("escape", "enter")
        def _newline(event) -> None:  # noqa: ANN001 - prompt_toolkit's event type
            event.current_buffer.insert_text("\n")

        prompt = PromptSession(history=InMemoryHistory(), key_bindings=keys, multiline=False)
        while True:
            try:
                line = prompt.prompt("you> ")
            except KeyboardInterrupt:
                continue
            except EOFError:
                return 0
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return 0
                continue
            try:
                self.ask(line)
            except KeyboardInterrupt:  # Ctrl-C between sending and the first byte read
                self.console.print("stopped", style="cyan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # Ctrl-C stops an answer. A process started with SIGINT ignored (from a background job or a
    # harness that ignores it) inherits that, and Python then installs no handler: take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    app = ChatApp(args)
    try:
        return app.run()
    finally:
        app.client.close()
