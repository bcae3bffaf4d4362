"""The one Stripe client: the official SDK's transport, our rate limit and our single retry level.

stripe-python retries 409/5xx/connection errors but not 429 and never reads ``Retry-After``,
so its own retries are switched off (``max_network_retries=0``) and every retry happens here,
once: 429 (honouring ``Retry-After`` when given), 5xx, timeouts and connection errors, with
exponential backoff and jitter, under the product's one retry policy (``stripe_sage/retry.py``,
shared with the Sage client). 401/403/404/400 are never retried and never read as an empty
stream. Responses are read raw (the SDK's ``raw_request`` path) as plain dicts: building
``StripeObject`` trees would cost more than the network, and so does the SDK's own JSON
parse (``json.loads`` into ``OrderedDict``s, a fifth of the extractor's CPU): successful
bodies are parsed with orjson, error bodies still go through the SDK's error mapping.
The API key never appears in an error message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import msgspec
import orjson
import stripe

from stripe_sage.errors import (
    FatalError,
    RetryableError,
    StripeSageError,
    error_for_status,
    parse_retry_after,
)
from stripe_sage.retry import RetryPolicy, call_with_retries
from stripe_sage.stripe import sdk

log = logging.getLogger(__name__)
JSON = dict[str, Any]
Parsed = TypeVar("Parsed")


sdk.debug_log_only_when_logged()


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a list as Stripe sent it, and what paging needs from it."""

    body: bytes  # ``{"object": "list", "data": [...], "has_more": ...}``
    ids: list[str]  # the objects' ids, in the page's order
    has_more: bool
    parsed: list[JSON] | None = None  # the objects, when the page was parsed whole

    def objects(self) -> list[JSON]:
        """The page's objects, parsed on demand (a writer can store ``body`` as it is)."""
        if self.parsed is not None:
            return self.parsed
        data: list[JSON] = orjson.loads(self.body)["data"]
        return data


class _Listed(msgspec.Struct):
    id: str


class _ListHead(msgspec.Struct):
    object: str
    data: list[_Listed] = msgspec.field(default_factory=list)
    has_more: bool = False


# Paging needs each page's ids and has_more only: decoding just those (msgspec skips the rest
# of each object without building it) takes a fifth of the time of parsing the whole page.
_LIST_HEAD = msgspec.json.Decoder(_ListHead)


def _list_page(body: bytes) -> ListPage:
    head = _LIST_HEAD.decode(body)
    if head.object != "list":  # never read another object as an empty list
        raise ValueError(f"a {head.object!r}, not a list")
    return ListPage(body, [o.id for o in head.data], head.has_more)


def _parsed_page(body: bytes) -> ListPage:
    """A list page parsed whole, for callers that want its objects."""
    page = _json_object(body)
    data: list[JSON] = page.get("data", [])
    return ListPage(body, [o["id"] for o in data], bool(page.get("has_more")), data)


def _json_object(body: bytes) -> JSON:
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


class RateLimiter:
    """Thread-safe token buckets: one per endpoint family, and one for the whole account."""

    def __init__(
        self,
        per_endpoint_rps: float,
        total_rps: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rates = {"*": total_rps or per_endpoint_rps * 4}
        self.per_endpoint = per_endpoint_rps
        self.clock, self.sleep = clock, sleep
        self.lock = threading.Lock()
        self.buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, key: str, now: float) -> float:
        rate = self.rates.get(key, self.per_endpoint)
        tokens, last = self.buckets.get(key, (rate, now))
        return min(rate, tokens + (now - last) * rate)

    def acquire(self, family: str) -> None:
        """Block until both the endpoint's and the account's bucket hold a token."""
        while True:
            with self.lock:
                now = self.clock()
                waits = []
                for key in (family, "*"):
                    tokens = self._tokens(key, now)
                    rate = self.rates.get(key, self.per_endpoint)
                    waits.append(0.0 if tokens >= 1 else (1 - tokens) / rate)
                if max(waits) == 0.0:
                    for key in (family, "*"):
                        self.buckets[key] = (self._tokens(key, now) - 1, now)
                    return
            self.sleep(max(waits))


class StripeReader:
    """Reads (and, for write-back, updates) Stripe. Configured by arguments only."""

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str | None = None,
        max_rps: float = 20.0,
        total_rps: float | None = None,
        max_attempts: int = 6,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        http_client = stripe.HTTPXClient(timeout=timeout, allow_sync_methods=True)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=0,
            http_client=http_client,
        )
        self.api_version: str = stripe.api_version
        self.limiter = RateLimiter(max_rps, total_rps, sleep=sleep)
        # A Retry-After gets up to 0.25 s of jitter: threads refused together spread out.
        self.policy = RetryPolicy(
            max_attempts=max_attempts,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            retry_after_jitter=0.25,
            jitter=jitter,
            sleep=sleep,
        )
        self.stats = {"requests": 0, "retries": 0, "rate_limited": 0}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"StripeReader(max_attempts={self.policy.max_attempts})"

    # -- one request with the single retry level -------------------------------------------
    def request(
        self, method: str, path: str, params: JSON | None = None, idempotency_key: str | None = None
    ) -> JSON:
        return self._request(method, path, params, idempotency_key, _json_object)

    def _request(
        self,
        method: str,
        path: str,
        params: JSON | None,
        idempotency_key: str | None,
        parse: Callable[[bytes], Parsed],
    ) -> Parsed:
        family = path.split("/")[2] if path.startswith("/v1/") else path
        params = dict(params or {})
        if idempotency_key:
            params["idempotency_key"] = idempotency_key

        def send(attempt: int) -> Parsed:
            self.limiter.acquire(family)
            with self._stats_lock:
                self.stats["requests"] += 1
            try:
                return self._raw_request(method, path, params, parse)
            except stripe.StripeError as exc:
                err = _map_error(exc, method, path)
            if isinstance(err, RetryableError):
                with self._stats_lock:
                    self.stats["retries"] += 1
                    if err.http_status == 429:
                        self.stats["rate_limited"] += 1
            raise err

        def log_retry(attempt: int, err: RetryableError, delay: float) -> None:
            log.warning(
                "Stripe %s %s: %s; retry %d/%d in %.2fs",
                method.upper(),
                path,
                err.message,
                attempt,
                self.policy.max_attempts - 1,
                delay,
            )

        return call_with_retries(send, self.policy, on_retry=log_retry)

    def _raw_request(
        self, method: str, path: str, params: JSON, parse: Callable[[bytes], Parsed]
    ) -> Parsed:
        """``StripeClient.raw_request`` (stripe 16), with ``parse`` reading a successful body."""
        body, code, headers, api_mode = sdk.raw_request(self._client, method, path, params)
        if 200 <= code < 300:
            try:
                return parse(cast(bytes, body))
            except ValueError:  # orjson's and msgspec's decode errors, or not the shape asked
                pass  # the SDK's parse below raises its "invalid response body" error
        sdk.raise_for_response(self._client, body, code, headers, api_mode)  # 4xx/5xx raise
        # A 2xx body that is JSON but not what was asked for (an object, a list page).
        raise FatalError(
            f"{method.upper()} {path}: unexpected response body from Stripe",
            http_status=code,
            system="stripe",
        )

    # -- reading ---------------------------------------------------------------------------
    def list_pages(
        self, path: str, params: JSON | None = None, *, limit: int = 100
    ) -> Iterator[list[JSON]]:
        """Every page of a list, newest first, following ``starting_after``."""
        for page in self._pages(path, params, limit, _parsed_page):
            yield page.objects()

    def list_bodies(
        self, path: str, params: JSON | None = None, *, limit: int = 100
    ) -> Iterator[ListPage]:
        """``list_pages`` with each page as Stripe sent it (for a writer that stores the
        objects without building them in Python): paging reads only ids and ``has_more``."""
        return self._pages(path, params, limit, _list_page)

    def _pages(
        self, path: str, params: JSON | None, limit: int, parse: Callable[[bytes], ListPage]
    ) -> Iterator[ListPage]:
        query: JSON = {**(params or {}), "limit": limit}
        while True:
            page = self._request("get", path, query, None, parse)
            if page.ids:
                yield page
            if not page.has_more or not page.ids:
                return
            query["starting_after"] = page.ids[-1]

    def retrieve(self, path: str, object_id: str, expand: tuple[str, ...] = ()) -> JSON:
        params = {"expand": list(expand)} if expand else None
        return self.request("get", f"{path}/{object_id}", params)

    def update(self, path: str, object_id: str, params: JSON, *, idempotency_key: str) -> JSON:
        """A POST update carrying an idempotency key (Stripe keeps keys ≥ 24 h)."""
        return self.request("post", f"{path}/{object_id}", params, idempotency_key)


def _map_error(exc: stripe.StripeError, method: str, path: str) -> StripeSageError:
    """The SDK's error as ours, through the one status table (``errors.error_for_status``);
    no answer at all (a timeout, a reset connection) is transient."""
    code = getattr(exc, "code", None)
    param = getattr(exc, "param", None)
    # Build the message from Stripe's own user message, never from the request.
    text = exc.user_message or type(exc).__name__
    message = f"{method.upper()} {path}: {text}"
    status = exc.http_status
    if isinstance(exc, stripe.APIConnectionError) or status is None:
        return RetryableError(message, http_status=status, code=code, system="stripe")
    headers = exc.headers or {}
    retry_after = parse_retry_after(headers.get("retry-after") or headers.get("Retry-After"))
    return error_for_status(
        status, message, code=code, field=param, retry_after=retry_after, system="stripe"
    )
