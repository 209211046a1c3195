"""Progress of chunked work (stage, chunks done, rate, time left), on the library's one style.

Every store, out-of-core and Ray loop reports through `chunk_progress`, so that the look of the
bars is decided in one place (`vestigia.progress.Progress`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from vestigia.progress import Progress

ProgressArg = bool | TextIO | None


def _stream(progress: ProgressArg) -> TextIO | None:
    if progress is True:
        return sys.stderr
    if progress is False or progress is None:
        return None
    return progress


class ChunkCounter:
    """Counts finished chunks of one stage and shows `done/total, rate, time left`."""

    def __init__(self, bar: Progress, total: int) -> None:
        self._bar = bar
        self.total = total
        self.done = 0
        self._start = time.perf_counter()

    def advance(self, count: int = 1) -> None:
        """Record `count` more finished chunks."""
        self.done += count
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        self._bar.update(f"{self.done}/{self.total} chunks, {rate:.2f} chunks/s, {left:.0f} s left")


@contextmanager
def chunk_progress(stage: str, total: int, progress: ProgressArg = False) -> Iterator[ChunkCounter]:
    """A progress line for `total` chunks of `stage`.

    Args:
        stage: what is being computed ("featurising", "scoring", ...).
        total: number of chunks to do in this run (skipped chunks excluded).
        progress: True for stderr, a text stream, or False / None for silence.
    """
    bar = Progress(1, _stream(progress))
    with bar.step(f"{stage} ({total} chunks)"):
        yield ChunkCounter(bar, total)
