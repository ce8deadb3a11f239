"""Per-sender rate limiting: at most ``per_minute`` messages in any 60 s window.

A sender over the limit is told once (``"tripped"``); what they send while still over it
is dropped quietly (``"limited"``) until the window has room again. Memory stays bounded:
a sender's entry goes once their window is empty, and at most ``max_senders`` are kept.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Literal

Verdict = Literal["ok", "tripped", "limited"]
WINDOW_S = 60.0


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_senders: int = 10_000,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._max = max_senders
        self._seen: OrderedDict[str, deque[float]] = OrderedDict()
        self._tripped: set[str] = set()

    def check(self, sender: str) -> Verdict:
        """Count one message from ``sender`` and say whether it may go on."""
        if self.per_minute <= 0:
            return "ok"
        now = self._clock()
        times = self._seen.pop(sender, None) or deque()
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        self._seen[sender] = times  # most recently active last
        if len(times) < self.per_minute:
            times.append(now)
            self._tripped.discard(sender)
            self._trim()
            return "ok"
        if sender in self._tripped:
            return "limited"
        self._tripped.add(sender)
        return "tripped"

    def retry_in(self, sender: str) -> float:
        """Seconds until ``sender`` may send again."""
        times = self._seen.get(sender)
        if not times:
            return 0.0
        return max(0.0, times[0] + WINDOW_S - self._clock())

    def _trim(self) -> None:
        while len(self._seen) > self._max:
            sender, _ = self._seen.popitem(last=False)
            self._tripped.discard(sender)

    def __len__(self) -> int:
        return len(self._seen)
