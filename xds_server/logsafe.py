"""Client-supplied strings made safe to log and show, and repeated warnings rate-limited.

A node id, a NACK's error message, a requested type URL or a peer address is whatever the
client sent. Logged verbatim, a 1 MB node id on each of 300 requests wrote 315 MB of log in
0.19 s, and a NACK message with a newline forged a log line of its own. `clip` makes such a
string one short printable line; `LogLimiter` lets a kind of warning through a few times per
interval and counts the rest (`hybridlb_log_suppressed_total{what}`), so a client repeating
a request cannot turn it into log volume either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

#: Longest client string kept, in characters (before escaping): room for a SPIFFE id or a
#: Kubernetes pod name twice over, and for the gist of a NACK's error.
MAX_CHARS = 256


def clip(text: str, limit: int = MAX_CHARS) -> str:
    """`text` cut to `limit` characters, with its length noted when cut, and every character
    that could break a line or the terminal (newlines, controls, U+2028) escaped: at most
    `6 * limit` characters plus the note, on one line."""
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                       for c in head)
    if len(text) > limit:
        head += f"...[{len(text)} chars]"
    return head


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    """At most `burst` lines of one kind (`what`, a fixed name, never a client string) per
    `interval_s`; further ones are counted, and the next line that gets through says how
    many were left out."""

    def __init__(self, counter: Counter, *, burst: int = 10, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._counter = counter
        self._burst = burst
        self._interval_s = interval_s
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, logger: logging.Logger, level: int, what: str, msg: str,
            *args: object) -> None:
        if not logger.isEnabledFor(level):
            return
        now = self._clock()
        window = self._windows.get(what)
        if window is None or now - window.started >= self._interval_s:
            left_out = window.suppressed if window is not None else 0
            window = self._windows[what] = _Window(started=now)
            if left_out:
                msg += f" ({left_out} more like it left out in the last {self._interval_s:g} s)"
        if window.logged >= self._burst:
            window.suppressed += 1
            self._counter.labels(what).inc()
            return
        window.logged += 1
        logger.log(level, msg, *args)
