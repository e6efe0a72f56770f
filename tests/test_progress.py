"""Progress lines of long steps: throttled, with the share done and the time left, always the last one."""

import logging

from skmm_pipeline.core.progress import LOGGER_NAME, Progress, progress_to


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_are_throttled_and_the_last_one_always_comes():
    clock, lines = Clock(), []
    p = Progress("sketching a", 100, "rows", every=10, clock=clock, emit=lines.append)
    clock.now = 2.0
    assert p.update(10) is None  # too soon after the start
    clock.now = 12.0
    assert p.update(40) == "sketching a: 40/100 rows (40%), 12 s, about 18 s left"
    clock.now = 13.0
    assert p.advance(50) is None and p.done == 90  # one second after the last line
    clock.now = 130.0
    assert p.advance(10) == "sketching a: 100/100 rows (100%), 2 min 10 s"
    assert lines[0].endswith("about 18 s left") and lines[-1].endswith("2 min 10 s")


def test_progress_to_hands_the_lines_to_a_callable_only_inside_the_block():
    got = []
    with progress_to(got.append):
        Progress("runs", 2, every=0).update(2)
    Progress("runs", 2, every=0).update(2)
    assert got == ["runs: 2/2 (100%), 0 s"]
    assert not logging.getLogger(LOGGER_NAME).handlers
