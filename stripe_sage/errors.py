"""The product's error hierarchy.

Two kinds decide what happens next, as in the Singer SDK and stripe-python:

    StripeSageError
    ├── RetryableError        transient: 429, 5xx, timeouts, resets (carries ``retry_after``)
    └── FatalError            retrying cannot help
        ├── AuthenticationError   401/403: stop the run, alert, no retry storm
        ├── NotFoundError         404: a missing object or permission is never an empty stream
        ├── ValidationError       the document or record is wrong: dead-letter it
        ├── ConfigurationError    settings or mapping file are wrong
        └── DataQualityError      a suite failed wholesale: stop the load

Every error carries the HTTP status and error code when there is one; no error message ever
contains a secret (clients build messages from response bodies, never from request headers).
"""

from __future__ import annotations

import datetime
import email.utils


class StripeSageError(Exception):
    """Base of every error the product raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str | None = None,
        field: str | None = None,
        system: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.code = code
        self.field = field
        self.system = system

    def __str__(self) -> str:
        parts = [self.message]
        if self.system:
            parts.insert(0, f"[{self.system}]")
        if self.http_status is not None:
            parts.append(f"(HTTP {self.http_status}")
            parts[-1] += f", code={self.code})" if self.code else ")"
        if self.field:
            parts.append(f"field={self.field}")
        return " ".join(parts)


class RetryableError(StripeSageError):
    """Transient: retry with backoff, honouring ``retry_after`` seconds when the server gave it."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        maybe_done: bool = True,
        absent: bool = False,
        **kw: object,
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after
        # False when no write of the failed call can have been acted on (every answer was
        # a definite refusal, e.g. 429): the next attempt needs no lookup first.
        self.maybe_done = maybe_done
        # True when the call looked the document up, found none, and nothing it sent after
        # that can have been acted on: earlier uncertain attempts are resolved too.
        self.absent = absent


class FatalError(StripeSageError):
    """Retrying cannot help."""


class AuthenticationError(FatalError):
    """Bad or missing credentials: stop the run."""


class NotFoundError(FatalError):
    """The record (or the permission to see it) does not exist."""


class ValidationError(FatalError):
    """The document or record is wrong; dead-letter it with this reason."""


class ConfigurationError(FatalError):
    """Settings or the mapping file are wrong."""


class DataQualityError(FatalError):
    """A data-quality suite failed wholesale; the load must not go on."""


# The one HTTP status → error table, shared by the Stripe and the Sage clients: 429 and 5xx
# are retried (``error_for_status``); these stop a run or dead-letter a record; any other
# status is a plain ``FatalError``. 402 is Stripe's "request failed" (a valid request the
# object refused), 422 Sage's refused document.
STATUS_ERRORS: dict[int, type[FatalError]] = {
    400: ValidationError,
    402: ValidationError,
    409: ValidationError,
    422: ValidationError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
}


def error_for_status(
    status: int,
    message: str,
    *,
    code: str | None = None,
    field: str | None = None,
    retry_after: float | None = None,
    system: str | None = None,
) -> StripeSageError:
    """Map one HTTP answer to the error class that decides retry vs fatal (``STATUS_ERRORS``).
    Both clients call it; neither keeps a map of its own."""
    kw: dict[str, object] = {"http_status": status, "code": code, "field": field, "system": system}
    if status == 429 or status >= 500:
        return RetryableError(message, retry_after=retry_after, **kw)  # type: ignore[arg-type]
    return STATUS_ERRORS.get(status, FatalError)(message, **kw)  # type: ignore[arg-type]


def parse_retry_after(value: str | None, *, now: datetime.datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds (integer or decimal) or HTTP-date."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    now = now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - now).total_seconds())
