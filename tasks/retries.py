"""The retry policy of one source HTTP request: ``Retry-After``, backoff with jitter, the client-side rate limit.

Plain objects over tenacity's retry state (no Prefect, no httpx): :func:`parse_retry_after` reads the header
(delta-seconds or HTTP-date), :class:`RetryAfterOrBackoff` picks the wait, :func:`should_retry` decides from the
kind of failure (:class:`TransientAttempt`: 429, 5xx, transport errors; :class:`MalformedBody`: a body that is not JSON,
re-fetched once), :class:`RateLimiter` spaces request starts. ``tasks.extract`` applies them per request; its
module doc states the whole failure policy.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

import tenacity
from tenacity.wait import wait_base

from tasks.errors import ConfigurationError

Sleep = Callable[[float], None]
Clock = Callable[[], float]


# --- Retry-After and backoff -------------------------------------------------------------------


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None when absent or unreadable.

    A date in the past gives ``0.0``.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class TransientAttempt(Exception):
    """One failed attempt that may succeed if repeated (429, 5xx, transport error)."""

    def __init__(self, what: str, url: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.url = url
        self.status = status
        self.retry_after = retry_after


class MalformedBody(Exception):
    """The body was not valid JSON."""

    def __init__(self, url: str, size: int, detail: str) -> None:
        super().__init__(detail)
        self.url = url
        self.size = size
        self.detail = detail


class RetryAfterOrBackoff(wait_base):
    """Wait a positive ``Retry-After`` hint (capped at ``cap``), else exponential backoff with jitter.

    The backoff is ``base * 2**(attempt-1) + uniform(0, base)``, at least ``base`` and at most ``cap``, so a
    ``Retry-After: 0`` or a missing header never turns into a burst of instant retries.
    """

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = max(cap, base)
        self._backoff = tenacity.wait_exponential_jitter(initial=base, max=self.cap, jitter=base)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None and hint > 0:
            return min(hint, self.cap)
        return max(self.base, self._backoff(retry_state))


def should_retry(retry_state: tenacity.RetryCallState) -> bool:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    if isinstance(exc, TransientAttempt):
        return True
    if isinstance(exc, MalformedBody):
        return retry_state.attempt_number < 2  # one re-fetch for a broken body, no more
    return False


# --- rate limit --------------------------------------------------------------------------------


class RateLimiter:
    """Client-side cap: at most ``per_second`` request starts per second (minimum spacing, no bursts).

    ``clock`` and ``sleep`` are injectable so tests can check spacing without waiting.
    """

    def __init__(self, per_second: float | None, *, clock: Clock = time.monotonic, sleep: Sleep = time.sleep) -> None:
        if per_second is not None and per_second <= 0:
            raise ConfigurationError("rate_limit_per_second", f"must be > 0, got {per_second}")
        self.interval = 1.0 / per_second if per_second else 0.0
        self.clock = clock
        self.sleep = sleep
        self._next: float | None = None

    def acquire(self) -> None:
        if not self.interval:
            return
        now = self.clock()
        if self._next is not None and now < self._next:
            self.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval
