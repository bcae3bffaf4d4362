"""The one retry and pacing policy of the product's HTTP clients (Stripe and Sage Pro).

Each client retries at one level only (docs/architecture.md, "Errors and retries"): a
:class:`RetryPolicy` says how many exchanges a call may make and how long to wait between
them, and :func:`call_with_retries` runs the loop. What a failed exchange means (which
error, whether the server may have acted on it) stays with the client; whether an error is
worth retrying is decided once, by its class (:class:`~stripe_sage.errors.RetryableError`,
from ``errors.error_for_status``).

The wait before retry ``n`` (1 for the first retry) is the server's ``Retry-After`` when it
gave one (plus up to ``retry_after_jitter`` seconds, so that threads refused together do not
come back together), else ``min(backoff_max, backoff_base * 2**(n-1))`` scaled by
``0.5 + jitter() / 2`` (full jitter in the upper half).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from stripe_sage.errors import RetryableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries: attempts, backoff, jitter, and how it waits (tests inject
    ``sleep`` and ``jitter``)."""

    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_after_jitter: float = 0.0
    jitter: Callable[[], float] = field(default=random.random, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return retry_after + self.jitter() * self.retry_after_jitter
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return float(ceiling * (0.5 + self.jitter() / 2))


def call_with_retries(
    send: Callable[[int], T],
    policy: RetryPolicy,
    *,
    attempts: int | None = None,
    pause: bool = True,
    give_up: Callable[[RetryableError], bool] | None = None,
    on_retry: Callable[[int, RetryableError, float], None] | None = None,
) -> T:
    """``send(attempt)`` (1-based) until it returns. A :class:`RetryableError` is retried
    after :meth:`RetryPolicy.delay` — at once, without sleeping, when ``pause`` is False (a
    caller that schedules its own retries, such as the Sage loader) — up to ``attempts``
    exchanges (default ``policy.max_attempts``), or until ``give_up(error)`` says so; then
    the last error is raised. Any other error is raised at once. ``on_retry(attempt, error,
    delay)`` is told of each retry before the wait (counters, the log line)."""
    limit = max(1, attempts) if attempts is not None else policy.max_attempts
    attempt = 0
    while True:
        attempt += 1
        try:
            return send(attempt)
        except RetryableError as error:
            if attempt >= limit or (give_up is not None and give_up(error)):
                raise
            delay = policy.delay(attempt, error.retry_after) if pause else 0.0
            if on_retry is not None:
                on_retry(attempt, error, delay)
            if pause:
                policy.sleep(delay)
