"""The one retry policy both HTTP clients use (stripe_sage/retry.py): waits and the loop."""

from __future__ import annotations

import pytest

from stripe_sage.errors import RetryableError, ValidationError
from stripe_sage.retry import RetryPolicy, call_with_retries


def policy(slept: list[float], **kw: object) -> RetryPolicy:
    kw.setdefault("jitter", lambda: 1.0)
    return RetryPolicy(sleep=slept.append, **kw)  # type: ignore[arg-type]


def failing(errors: list[Exception], result: str = "ok") -> tuple[list[int], object]:
    """A ``send`` raising ``errors`` in turn, then returning ``result``; records attempts."""
    seen: list[int] = []

    def send(attempt: int) -> str:
        seen.append(attempt)
        if errors:
            raise errors.pop(0)
        return result

    return seen, send


def test_backoff_doubles_from_the_base_up_to_the_cap_scaled_by_jitter() -> None:
    slept: list[float] = []
    p = policy(slept, backoff_base=0.5, backoff_max=3.0)
    assert [p.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    half = RetryPolicy(backoff_base=1.0, backoff_max=8.0, jitter=lambda: 0.0)
    assert [half.delay(n) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]


def test_a_retry_after_is_waited_as_given_plus_its_own_jitter() -> None:
    sage = RetryPolicy(jitter=lambda: 1.0)
    stripe = RetryPolicy(jitter=lambda: 1.0, retry_after_jitter=0.25)
    assert sage.delay(3, retry_after=2.0) == 2.0
    assert stripe.delay(3, retry_after=2.0) == 2.25


def test_retryable_errors_are_retried_with_the_policy_waits_until_success() -> None:
    slept: list[float] = []
    seen, send = failing([RetryableError("503"), RetryableError("429", retry_after=1.5)])
    assert call_with_retries(send, policy(slept, backoff_base=0.25)) == "ok"  # type: ignore[arg-type]
    assert seen == [1, 2, 3]
    assert slept == [0.25, 1.5]


def test_the_last_error_is_raised_after_the_attempts_and_others_at_once() -> None:
    slept: list[float] = []
    seen, send = failing([RetryableError(f"503 #{n}") for n in range(5)])
    with pytest.raises(RetryableError, match="503 #2"):
        call_with_retries(send, policy(slept), attempts=3)  # type: ignore[arg-type]
    assert seen == [1, 2, 3] and len(slept) == 2
    seen, send = failing([ValidationError("bad")])
    with pytest.raises(ValidationError):
        call_with_retries(send, policy(slept))  # type: ignore[arg-type]
    assert seen == [1]


def test_without_pauses_nothing_sleeps_and_give_up_ends_early() -> None:
    slept: list[float] = []
    retries: list[tuple[int, float]] = []
    seen, send = failing(
        [RetryableError("503"), RetryableError("429", http_status=429, retry_after=1.0)]
    )
    with pytest.raises(RetryableError, match="429"):
        call_with_retries(
            send,  # type: ignore[arg-type]
            policy(slept),
            pause=False,
            give_up=lambda e: e.http_status == 429,
            on_retry=lambda attempt, error, delay: retries.append((attempt, delay)),
        )
    assert seen == [1, 2] and slept == [] and retries == [(1, 0.0)]


def test_a_policy_needs_at_least_one_attempt() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
