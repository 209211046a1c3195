"""Step-by-step progress with timings for the command line, on a text stream (stderr).

Each step prints `[i/n] title ...` when it starts and `done (1.2 s)` when it ends. On a
terminal, `update(text)` rewrites the current line in place with a carriage return (epoch and
batch counters, cut to the terminal's width); on a file or a pipe updates are dropped so that
logs stay one line per step.
With `stream=None` nothing is printed but the timings are still recorded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """Progress of a fixed number of named steps.

    Args:
        total_steps: how many steps will run (for the `[i/n]` prefix).
        stream: where to write (e.g. `sys.stderr`), or None to stay silent.

    Attributes:
        seconds: wall time of each finished step, by title, in order.
    """

    def __init__(self, total_steps: int, stream: TextIO | None) -> None:
        self.total_steps = total_steps
        self.stream = stream
        self.seconds: dict[str, float] = {}
        self._index = 0
        self._line = ""
        self._title = ""
        self._live = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def _write(self, text: str, end: str = "") -> None:
        if self.stream is None:
            return
        if self._live:
            padding = " " * max(0, len(self._line) - len(text))
            self.stream.write("\r" + text + padding + end)
        else:
            self.stream.write(text[len(self._line) :] if text.startswith(self._line) else "\n" + text)
            self.stream.write(end)
        self._line = "" if end else text
        self.stream.flush()

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Time the enclosed block as the next step and report its start and end (or failure)."""
        self._index += 1
        self._title = f"[{self._index}/{self.total_steps}] {title} ..."
        self._write(self._title)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self._write(f"{self._title} failed", end="\n")
            raise
        elapsed = time.perf_counter() - start
        self.seconds[title] = elapsed
        self._write(f"{self._title} done ({elapsed:.1f} s)", end="\n")

    def update(self, text: str) -> None:
        """Show `text` after the current step's title (terminals only)."""
        if self._live:
            self._write(f"{self._title} {text}"[: max(20, shutil.get_terminal_size().columns - 1)])
