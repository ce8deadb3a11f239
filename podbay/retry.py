"""The one retry policy: capped exponential backoff with jitter, and which failures to retry.

Every transport retries through this module, so "how long does podbay wait before trying
the homeserver again" has one answer. The delay before retry *n* (1-based) is drawn from
``[c/2, c]`` with ``c = min(cap, base * 2**(n-1))``: the jitter spreads many clients apart,
and the lower half-bound keeps a known minimum pace (tests derive request counts from it).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

# HTTP statuses worth retrying: the server is overloaded, restarting or asks us to wait.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class Backoff:
    """Capped exponential backoff with jitter; ``failures`` counts retries since a success."""

    base: float = 0.5
    cap: float = 60.0
    failures: int = 0
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def ceiling(self, attempt: int) -> float:
        """The largest delay before retry ``attempt`` (1-based)."""
        return min(self.cap, self.base * 2.0 ** (attempt - 1))

    def minimum(self, attempt: int) -> float:
        """The smallest delay before retry ``attempt``: half its ceiling."""
        return self.ceiling(attempt) / 2

    def next_delay(self, retry_after_s: float | None = None) -> float:
        """Count one more failure and return how long to wait; a server's ``retry_after``
        wins (never below 50 ms, never above the cap)."""
        self.failures += 1
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.05), self.cap)
        ceiling = self.ceiling(self.failures)
        return self._random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def max_attempts_within(backoff: Backoff, seconds: float) -> int:
    """An upper bound on the attempts a retry loop paced by ``backoff`` makes in ``seconds``
    (from its first failed attempt to its last): every wait is at least ``minimum``."""
    attempts, spent = 1, 0.0
    while True:
        spent += backoff.minimum(attempts)
        if spent > seconds:
            return attempts
        attempts += 1


def is_transient(exc: BaseException) -> bool:
    """Network trouble that a later attempt may not meet: refused, reset, timeouts."""
    import aiohttp

    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status in TRANSIENT_HTTP
    return isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError | aiohttp.ClientError)


def describe(exc: BaseException) -> str:
    """A short, human description of a failure for status lines (no traceback)."""
    import aiohttp

    if isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, aiohttp.ClientConnectorError)
        and isinstance(exc.os_error, ConnectionRefusedError)
    ):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return text or type(exc).__name__


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    attempts: int | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Call ``call`` until it returns, retrying transient exceptions with ``backoff``.

    A non-transient exception, or the last of ``attempts`` (None: no limit), is raised.
    ``on_retry(attempt, error, delay)`` runs before each wait (for logs and status).
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            result = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not transient(exc) or (attempts is not None and attempt >= attempts):
                raise
            delay = backoff.next_delay()
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            await sleep(delay)
            continue
        backoff.reset()
        return result
