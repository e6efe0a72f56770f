"""How often a process that waits (for a pool slot, a lock) says what it waits for.

Every ``SKMM_WAIT_REPORT_S`` seconds (default 30; tests set a shorter one): :class:`WaitReport` says
when the next report is due, so a wait of any length is never silent for longer than that.
"""

from __future__ import annotations

import math
import os
import time

from skmm_pipeline.core.errors import ConfigError

ENV = "SKMM_WAIT_REPORT_S"
DEFAULT_S = 30.0


def report_interval() -> float:
    """Seconds between two reports of one wait: ``$SKMM_WAIT_REPORT_S``, else 30."""
    raw = os.environ.get(ENV, "")
    if not raw:
        return DEFAULT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{ENV}={raw!r} is not a positive number of seconds: unset it (30 s) or give e.g. 10")
    return seconds


class WaitReport:
    """``due()`` is true once every :func:`report_interval` seconds after the wait began, the first time
    one interval in (a wait shorter than that is not reported)."""

    def __init__(self, interval: float | None = None) -> None:
        self.interval = report_interval() if interval is None else float(interval)
        self.started = time.monotonic()
        self._next = self.started + self.interval

    @property
    def waited(self) -> float:
        return time.monotonic() - self.started

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.interval
        return True
