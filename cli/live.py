"""The rich live view of `m3edge chat --mic/--camera`: state, mic level, attachments, the answer as
it streams, tokens/s. Finished turns scroll above the live panel as plain lines
("you> [speech 1.4 s + camera frame 37]", "m3> ...") so a terminal log reads like a transcript."""

from __future__ import annotations

import sys
import threading

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

STATE_STYLE = {"listening": "green", "hearing": "bold yellow", "thinking": "cyan", "answering": "magenta",
               "waiting": "dim"}


def meter(db: float, width: int = 20) -> str:
    n = int(max(0.0, min(1.0, (db + 60) / 60)) * width)
    return "#" * n + "." * (width - n)


class LiveView:
    def __init__(self, console: Console):
        self.console = console
        self.state, self.level, self.answer, self.rate, self.attached = "waiting", -120.0, "", 0.0, ""
        self.lock = threading.Lock()
        self.live = Live(self._render(), console=console, refresh_per_second=8, transient=True,
                         redirect_stdout=False, redirect_stderr=False)

    def _render(self):
        head = Text.assemble((f"[{self.state}]", STATE_STYLE.get(self.state, "")), "  mic ",
                             (meter(self.level), "green"), f"  {self.attached}",
                             (f"  {self.rate:.1f} tok/s" if self.rate else "", "dim"))
        return Group(head, Text(self.answer[-2000:])) if self.answer else head

    def event(self, kind: str, data) -> None:
        with self.lock:
            if kind == "state":
                self.state = data
            elif kind == "level":
                self.level = data
            elif kind == "turn":
                self.attached = describe(data)
                self.console.print(f"you> {self.attached}", markup=False, highlight=False)
                self.answer, self.rate = "", 0.0
            elif kind == "token":
                self.answer += data.text
                self.rate = data.tokens_per_s
            elif kind in ("done", "interrupted"):
                tail = "  (interrupted)" if kind == "interrupted" else ""
                self.console.print(f"m3> {self.answer}{tail}", markup=False, highlight=False)
                if data is not None:
                    self.console.print(f"[dim][{data.generated_tokens} tokens, {data.tokens_per_s:.1f} tok/s, "
                                       f"first token {data.ttft_s * 1000:.0f} ms][/]", highlight=False)
                self.answer = ""
            elif kind == "notice":
                self.console.print(f"[yellow]note:[/] {data}", soft_wrap=True, highlight=False)
            self.live.update(self._render())


def describe(turn) -> str:
    parts = []
    if turn.speech is not None:
        parts.append(f"[speech {turn.speech.end_s - turn.speech.start_s:.1f} s]")
    parts += [f"[camera frame {f.index}]" for f in turn.frames]
    if turn.text:
        parts.append(turn.text)
    return " ".join(parts)


def run_live(chat, console: Console) -> None:
    """Drive a LiveChat with this view; stdin lines go to the chat (a thread reads them)."""
    view = LiveView(console)
    chat.on = view.event

    def keyboard():
        for line in sys.stdin:
            chat.submit(line.rstrip("\n"))
        chat.stop()  # Ctrl-D

    threading.Thread(target=keyboard, name="m3edge-keyboard", daemon=True).start()
    with view.live:
        try:
            chat.run()
        except KeyboardInterrupt:
            pass
