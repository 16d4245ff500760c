"""A log line now and then inside a long loop (a fine-tuning epoch on a CPU can take an hour): how far,
how fast, how long still.

Plain log lines rather than a progress bar, so batch jobs' logs read the same as a terminal and other
ranks' lines do not tear it. Only the clock and a batch count are read: nothing waits for the device, so
it can sit on the hot path (tests/train/test_host_sync.py counts the reads).
"""

from __future__ import annotations

import logging
import time


class Progress:
    """`update(done)` after each of `total` items logs "WHAT: ITEM done/total (p%), r/s, about T left"
    when `every_s` seconds have passed since the last line (or the start); silent where `shown` is false
    (every rank but 0), and at the end, which the caller reports itself."""

    def __init__(self, log: logging.Logger, what: str, item: str, total: int, shown: bool, every_s: float = 30.0):
        self.log, self.what, self.item, self.total, self.shown, self.every_s = log, what, item, total, shown, every_s
        self.started = self.last = time.monotonic()

    def update(self, done: int) -> None:
        if not self.shown:
            return
        now = time.monotonic()
        if now - self.last < self.every_s or done >= self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        self.log.info(
            "%s: %s %d/%d (%d%%), %.3g/s, about %s left",
            self.what,
            self.item,
            done,
            self.total,
            100 * done // self.total,
            rate,
            duration((self.total - done) / rate),
        )


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 45 s, 12 min 5 s, 3 h 20 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
