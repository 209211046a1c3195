"""Progress for long work, in one style across the library: steps and bars on stderr.

Two shapes, one look:

- `Progress(total_steps, stream)`: named steps of a command. Each step prints
  `[i/n] title ...` when it starts and `done (1.2 s)` when it ends; `update(text)` shows a
  counter after the title.
- `bar(total, title)`: a counter for one loop of the library (batches scored, Hessian rows,
  retrainings): `title: 40% 400/1000 [3.1 s, ~4.6 s left]`. Library bars stay silent unless
  enabled (`configure(enabled=True)`, the environment variable `VESTIGIA_PROGRESS=1`, or a
  `Progress` step running on a stream, which is how the `vestigia` command turns them on), so
  that scripts and tests print nothing by default; `VESTIGIA_PROGRESS=0` or
  `configure(enabled=False)` silences everything, `--quiet` silences the command.

On a terminal the current line is rewritten in place with a carriage return, cut to the
terminal's width; on a file or a pipe updates are dropped and each step or bar writes one final
line, so that logs stay one line per piece of work. With `stream=None` nothing is printed but
the timings are still recorded.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TextIO, TypeVar

__all__ = ["Bar", "Progress", "bar", "configure", "known_length", "track"]

T = TypeVar("T")
_REFRESH_SECONDS = 0.2
_settings: dict[str, object] = {"enabled": None, "stream": None}
_active_steps: list[Progress] = []


def configure(enabled: bool | None = None, stream: TextIO | None = None) -> None:
    """Turn the library's progress bars on (`True`), off (`False`) or back to the default (`None`).

    Args:
        enabled: True shows bars, False hides every bar, None: shown only inside a command step
            or when `VESTIGIA_PROGRESS=1`.
        stream: where bars go (default: `sys.stderr`).
    """
    _settings["enabled"] = enabled
    _settings["stream"] = stream


def _env() -> str:
    return os.environ.get("VESTIGIA_PROGRESS", "").strip().lower()


def _env_off() -> bool:
    return _env() in ("0", "false", "no", "off")


def _library_stream() -> TextIO | None:
    """The stream library bars write to now, or None when they are silent."""
    enabled = _settings["enabled"]
    env = _env()
    if enabled is False or _env_off():
        return None
    if _active_steps:  # inside a command step: bars continue its line
        return _active_steps[-1].stream
    if enabled is True or env in ("1", "true", "yes", "on"):
        stream = _settings["stream"]
        return stream if stream is not None else sys.stderr  # type: ignore[return-value]
    return None


def _is_terminal(stream: TextIO | None) -> bool:
    return bool(stream is not None and getattr(stream, "isatty", lambda: False)())


def _width() -> int:
    return max(20, shutil.get_terminal_size().columns - 1)


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


class Bar:
    """A counter of `total` units of work (None: unknown) titled `title`, written to `stream`.

    Use `advance(n)` as units finish and `close()` at the end (or `bar(...)` as a context
    manager). Inside a `Progress` step the bar shows after the step's title.
    """

    def __init__(self, total: int | None, title: str, stream: TextIO | None, prefix: str = "") -> None:
        self.total, self.title, self.stream, self.prefix = total, title, stream, prefix
        self.done = 0
        self.start = time.perf_counter()
        self._shown = 0.0
        self._live = _is_terminal(stream)
        self.closed = False

    def text(self) -> str:
        """The bar's current line, e.g. `scoring: 40% 400/1000 [3.1 s, ~4.6 s left]`."""
        elapsed = time.perf_counter() - self.start
        if self.total:
            share = min(1.0, self.done / self.total)
            left = f", ~{_seconds(elapsed * (1 - share) / share)} left" if 0 < share < 1 else ""
            return f"{self.title}: {share:4.0%} {self.done}/{self.total} [{_seconds(elapsed)}{left}]"
        return f"{self.title}: {self.done} [{_seconds(elapsed)}]"

    def advance(self, n: int = 1) -> None:
        """Count `n` more finished units and refresh the line (at most 5 times a second)."""
        self.done += n
        now = time.perf_counter()
        if self._live and now - self._shown >= _REFRESH_SECONDS:
            self._shown = now
            self.stream.write("\r" + (self.prefix + self.text())[: _width()] + "\x1b[K")  # type: ignore[union-attr]
            self.stream.flush()  # type: ignore[union-attr]

    def close(self) -> None:
        """Write the final line (files and pipes) or clear the live one (terminals)."""
        if self.closed or self.stream is None:
            self.closed = True
            return
        self.closed = True
        if self._live:
            self.stream.write("\r" + self.prefix.rstrip() + "\x1b[K")
        elif not self.prefix:  # a bar of its own: one line in logs
            self.stream.write(self.text() + "\n")
        self.stream.flush()


@contextmanager
def bar(total: int | None, title: str, enabled: bool | None = None, done: int = 0) -> Iterator[Bar]:
    """A library progress bar for the enclosed loop (silent unless enabled, see the module).

    Args:
        total: units of work (None: unknown).
        title: what is counted.
        enabled: True shows this bar on stderr even when library bars are off by default
            (a function's own `progress=True`), unless they were turned off everywhere; False
            hides it; None follows `configure`.
        done: units already done before the bar starts (resumed work).
    """
    stream = _library_stream() if enabled is not False else None
    if enabled and stream is None and _settings["enabled"] is not False and not _env_off():
        stream = sys.stderr
    prefix = _active_steps[-1].current_title + " " if _active_steps and stream is not None else ""
    progress = Bar(total, title, stream, prefix)
    progress.done = done
    try:
        yield progress
    finally:
        progress.close()


def track(items: Iterable[T], title: str, total: int | None = None) -> Iterator[T]:
    """Yield from `items`, counting each on a library bar.

    `total`: the number of items if known (default: `len(items)` when it has one, the
    cardinality of a `tf.data.Dataset` when finite).
    """
    if total is None:
        total = known_length(items)
    with bar(total, title) as progress:
        for item in items:
            yield item
            progress.advance()


def known_length(items: object) -> int | None:
    """`len(items)`, or the cardinality of a finite `tf.data.Dataset`, or None when unknown."""
    cardinality = getattr(items, "cardinality", None)
    if hasattr(items, "__len__") and not callable(cardinality):
        try:
            return len(items)  # type: ignore[arg-type]
        except TypeError:  # e.g. a tf.data.Dataset of unknown length
            pass
    cardinality = getattr(items, "cardinality", None)
    if callable(cardinality):
        try:
            value = int(cardinality())
        except (TypeError, ValueError):
            return None
        return value if value >= 0 else None
    return None


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
        self._live = _is_terminal(stream)

    @property
    def current_title(self) -> str:
        """`[i/n] title ...` of the running step."""
        return self._title

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
        """Time the enclosed block as the next step and report its start and end (or failure).

        Library bars inside the block show on this step's line (terminals only).
        """
        self._index += 1
        self._title = f"[{self._index}/{self.total_steps}] {title} ..."
        self._write(self._title)
        start = time.perf_counter()
        if self.stream is not None:
            _active_steps.append(self)
        try:
            yield
        except BaseException:
            self._write(f"{self._title} failed", end="\n")
            raise
        finally:
            if self.stream is not None:
                _active_steps.remove(self)
        elapsed = time.perf_counter() - start
        self.seconds[title] = elapsed
        self._write(f"{self._title} done ({elapsed:.1f} s)", end="\n")

    def update(self, text: str) -> None:
        """Show `text` after the current step's title (terminals only)."""
        if self._live:
            self._write(f"{self._title} {text}"[: _width()])
