"""Progress of long steps (pretraining epochs, rows sketched, benchmark runs), on one logger.

Library code reports through :class:`Progress` to the ``skmm_pipeline.progress`` logger. Dagster
captures that logger into each run's logs (``dagster_home/dagster.yaml``, ``python_logs``), so the
lines show in the UI's run view; ``skmm demo`` prints them on the console. Lines are throttled to one
per ``every`` seconds, plus the last one.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable

LOGGER_NAME = "skmm_pipeline.progress"
logger = logging.getLogger(LOGGER_NAME)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """``what: done/total unit (pct), elapsed, about ETA left``, at most once per ``every`` seconds and
    always when done reaches total. ``clock`` is injectable for tests (monotonic seconds)."""

    def __init__(self, what: str, total: int, unit: str = "", every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.what, self.total, self.unit, self.every = what, max(int(total), 0), unit, float(every)
        self.clock, self.emit = clock, emit or logger.info
        self.start = self.last = clock()
        self.done = 0

    def update(self, done: int) -> str | None:
        """Set the count done; returns the line emitted, if any."""
        self.done = int(done)
        now = self.clock()
        finished = self.total and self.done >= self.total
        if not finished and now - self.last < self.every:
            return None
        self.last = now
        elapsed = now - self.start
        line = f"{self.what}: {self.done}/{self.total}{' ' + self.unit if self.unit else ''}"
        if self.total:
            line += f" ({100 * self.done / self.total:.0f}%)"
        line += f", {_duration(elapsed)}"
        if not finished and self.done > 0 and self.total:
            line += f", about {_duration(elapsed * (self.total - self.done) / self.done)} left"
        self.emit(line)
        return line

    def advance(self, step: int = 1) -> str | None:
        return self.update(self.done + step)


class _Lines(logging.Handler):
    def __init__(self, emit: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.emit_line = emit

    def emit(self, record: logging.LogRecord) -> None:
        self.emit_line(record.getMessage())


@contextmanager
def progress_to(emit: Callable[[str], None]):
    """Hand every progress line to ``emit`` (e.g. the console) while the block runs."""
    handler, level = _Lines(emit), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
