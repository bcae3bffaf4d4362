"""The one typed Sage Pro client (``docs/sage_api.md``): retries, exactly-once creates, no secrets.

Retries happen at this level only, so attempts never multiply across layers; the waits come
from the product's one :class:`~stripe_sage.retry.RetryPolicy` (shared with the Stripe
client), the loop from :func:`~stripe_sage.retry.call_with_retries`:

- ``429`` — a definite rejection: sleep ``Retry-After`` (else the backoff) and send again.
- ``5xx``, timeouts, dropped connections — transient: exponential backoff with jitter,
  ``min(backoff_max, backoff_base * 2**(attempt-1)) * (0.5 + jitter() / 2)``, up to
  ``max_attempts`` requests, then :class:`~stripe_sage.errors.RetryableError`.
- ``401``/``403`` — :class:`~stripe_sage.errors.AuthenticationError` at once; ``404`` —
  :class:`~stripe_sage.errors.NotFoundError`; ``400``/``422`` —
  :class:`~stripe_sage.errors.ValidationError` carrying the API's ``code``
  (``unbalanced``, ``period_closed``, ``over_application``, ...) and ``field``. No retry.

**Exactly once.** Sage Pro does not deduplicate. A create whose outcome is uncertain — a 5xx,
a read timeout, a connection cut after the request went out — may have been committed (the
sandbox's ``commit_then_503`` fault does exactly that). Before posting again, the client
looks the document up (``GET /api/v1/<collection>?reference=``, or the customer by its
``customer_id``) and returns what it finds instead of creating a second one. A 429 or a
connection that was never made is a definite "not done" and is simply retried.

The API key is held as a ``SecretStr``, sent per request (so an injected ``httpx.Client``
such as Starlette's ``TestClient`` works), and never put in a message, a repr or a log line.
"""

from __future__ import annotations

import datetime
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from stripe_sage.errors import (
    FatalError,
    NotFoundError,
    RetryableError,
    StripeSageError,
    ValidationError,
    error_for_status,
    parse_retry_after,
)
from stripe_sage.retry import RetryPolicy, call_with_retries

log = logging.getLogger(__name__)

SYSTEM = "sagepro"
# collection → the server-assigned (or, for customers, client-chosen) key of its documents.
COLLECTIONS: dict[str, str] = {
    "customers": "customer_id",
    "salesorders": "order_no",
    "invoices": "invoice_no",
    "cashreceipts": "receipt_no",
    "creditmemos": "memo_no",
    "journalentries": "entry_no",
    "items": "item",  # v1.1, client-chosen like customer_id: create with create_item
}
MAX_PAGE = 200

JsonDict = dict[str, Any]


@dataclass
class SageClientStats:
    """Counters a loader reports: how hard the client had to work for its results."""

    attempts: int = 0  # HTTP requests sent (lookups included)
    retries: int = 0  # backoff sleeps taken before another request
    rate_limited: int = 0  # 429 answers
    server_errors: int = 0  # 5xx answers
    transport_errors: int = 0  # timeouts, refused/reset/dropped connections
    recovered_by_lookup: int = 0  # creates answered with the document found by lookup

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Transient(Exception):
    """One failed exchange that may succeed later; ``uncertain``: the server may have acted."""

    def __init__(self, error: RetryableError, *, uncertain: bool) -> None:
        super().__init__(error.message)
        self.error = error
        self.uncertain = uncertain


class _GaveUp(Exception):
    """A nested call's final error, passed through the outer retry loop untouched (attempts
    never multiply across layers)."""

    def __init__(self, error: RetryableError) -> None:
        super().__init__(error.message)
        self.error = error


class RequestPacer:
    """A client-side token bucket without burst: requests leave at most ``rps`` a second,
    evenly spaced, whatever the number of threads (each takes the next free slot). Kept
    under the server's budget, the client never triggers its 429s (whose ``Retry-After`` is
    at least a whole second), so it sustains the allowed rate instead of stalling."""

    def __init__(
        self,
        rps: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rps <= 0:
            raise ValueError("rps must be positive")
        self.interval = 1.0 / rps
        self.clock, self.sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            now = self.clock()
            at = max(now, self._next)
            self._next = at + self.interval
        if at > now:
            self.sleep(at - now)


class SageProClient:
    """Typed, retrying, exactly-once client of the Sage Pro API v1.

    Everything comes in by keyword, nothing from the environment: tests inject
    ``http_client`` (e.g. ``starlette.testclient.TestClient(app)``), a recording ``sleep``
    and a fixed ``jitter``. An owned ``httpx.Client`` uses ``timeout``; an injected one keeps
    its own settings.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | SecretStr,
        *,
        http_client: httpx.Client | None = None,
        timeout: float = 10.0,
        max_attempts: int = 6,
        backoff_base: float = 0.25,
        backoff_max: float = 20.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        max_rps: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=timeout)
        # A 429 waits exactly its Retry-After (no jitter); other failures back off.
        self.policy = RetryPolicy(
            max_attempts=max_attempts,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            jitter=jitter,
            sleep=sleep,
        )
        self.stats = SageClientStats()
        # ``max_rps`` (SAGE_MAX_RPS): pace requests under the server's rate limit.
        self.pacer = RequestPacer(max_rps, sleep=sleep) if max_rps else None

    def __repr__(self) -> str:
        return f"SageProClient(base_url={self.base_url!r})"

    # lifecycle

    def close(self) -> None:
        """Close the HTTP client if this object created it (an injected one is the caller's)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> SageProClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # customers

    def create_customer(self, payload: JsonDict) -> JsonDict:
        """Create a customer; an uncertain outcome is resolved by ``GET customers/{id}``."""
        return self.create("customers", payload)

    def update_customer(
        self,
        customer_id: str,
        fields: JsonDict,
        *,
        attempts: int | None = None,
        pause: bool = True,
    ) -> JsonDict:
        """Merge ``fields`` into the customer (``NotFoundError`` when absent). Safe to resend.
        ``attempts`` and ``pause`` as for :meth:`create`."""
        return self._call(
            "PUT",
            f"/api/v1/customers/{_seg(customer_id)}",
            json=fields,
            max_attempts=attempts,
            pause=pause,
        )

    def get_customer(
        self, customer_id: str, *, attempts: int | None = None, pause: bool = True
    ) -> JsonDict:
        return self.get("customers", customer_id, attempts=attempts, pause=pause)

    def list_customers(
        self, updated_since: datetime.datetime | str | None = None
    ) -> Iterator[JsonDict]:
        """Every customer (all pages), or those changed at or after ``updated_since``."""
        params: JsonDict = {}
        if isinstance(updated_since, datetime.datetime):
            moment = updated_since
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=datetime.UTC)
            params["updated_since"] = moment.isoformat()
        elif updated_since is not None:
            params["updated_since"] = updated_since
        return self._paginate("/api/v1/customers", params)

    # documents

    def create_sales_order(self, payload: JsonDict) -> JsonDict:
        return self.create("salesorders", payload)

    def create_invoice(self, payload: JsonDict) -> JsonDict:
        return self.create("invoices", payload)

    def create_cash_receipt(self, payload: JsonDict) -> JsonDict:
        return self.create("cashreceipts", payload)

    def create_credit_memo(self, payload: JsonDict) -> JsonDict:
        return self.create("creditmemos", payload)

    def create_journal_entry(self, payload: JsonDict) -> JsonDict:
        return self.create("journalentries", payload)

    def create(
        self,
        collection: str,
        payload: JsonDict,
        *,
        reference_unique: bool = True,
        check_first: bool = False,
        attempts: int | None = None,
        pause: bool = True,
    ) -> JsonDict:
        """POST one document exactly once and return it as Sage stored it.

        ``reference_unique=True`` (the default) declares that ``payload["reference"]`` (the
        Stripe id) identifies this document: at most one document of ``collection`` carries
        it. Then an uncertain outcome (5xx, timeout, dropped connection) is resolved by
        ``GET ?reference=`` before any resend: if the document is there it is returned (and
        ``stats.recovered_by_lookup`` counts it), otherwise the POST is sent again. A payload
        without a reference is refused up front (``ValidationError``, code
        ``missing_reference``), since nothing could tell a resend from a duplicate.
        Customers are identified by their client-chosen ``customer_id`` instead.

        ``reference_unique=False`` is for documents that legitimately share a reference: the
        client then never resends after an uncertain outcome and raises ``FatalError`` with
        code ``outcome_unknown`` (dead-letter it; a human checks Sage before replaying).

        ``check_first=True`` looks the document up before the first POST too — for replays
        after a crash, when an earlier process may have posted it without recording that.

        ``attempts`` caps the exchanges of this call (default ``max_attempts``);
        ``pause=False`` sends the next one at once after a 5xx or a dropped connection (the
        pacer still spaces requests) and gives up at the first 429, leaving its
        ``Retry-After`` to the caller. The loader posts that way: a posting thread never
        sleeps through a backoff, and the loader's rounds retry what is left
        (``Loader.run``) — after a 429 without a lookup (``maybe_done`` is False), after an
        uncertain answer with one.
        """
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown Sage Pro collection {collection!r}")
        resolve: Callable[[], JsonDict | None] | None = None
        if collection == "customers":
            customer_id = payload.get("customer_id")
            if not isinstance(customer_id, str) or not customer_id:
                raise ValidationError(
                    "a customer needs a customer_id",
                    code="validation_error",
                    field="customer_id",
                    system=SYSTEM,
                )
            resolve = lambda: self._existing_customer(customer_id, payload)  # noqa: E731
        elif reference_unique:
            reference = payload.get("reference")
            if not isinstance(reference, str) or not reference:
                raise ValidationError(
                    f"{collection}: a reference_unique create needs a reference",
                    code="missing_reference",
                    field="reference",
                    system=SYSTEM,
                )
            resolve = lambda: self._first_by_reference(collection, reference)  # noqa: E731
        return self._call(
            "POST",
            f"/api/v1/{collection}",
            json=payload,
            resolve=resolve,
            resend_uncertain=False,
            check_first=check_first,
            max_attempts=attempts,
            pause=pause,
        )

    def get(
        self, collection: str, key: str, *, attempts: int | None = None, pause: bool = True
    ) -> JsonDict:
        """One document by its number (``NotFoundError`` when there is none). ``attempts``
        and ``pause`` as for :meth:`create`."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown Sage Pro collection {collection!r}")
        return self._call(
            "GET", f"/api/v1/{collection}/{_seg(key)}", max_attempts=attempts, pause=pause
        )

    def find_by_reference(self, collection: str, reference: str) -> list[JsonDict]:
        """Every document of ``collection`` whose ``reference`` equals ``reference``."""
        if collection not in COLLECTIONS:
            raise ValueError(f"unknown Sage Pro collection {collection!r}")
        return list(self._paginate(f"/api/v1/{collection}", {"reference": reference}))

    # items (v1.1)

    def get_item(self, item: str, *, attempts: int | None = None, pause: bool = True) -> JsonDict:
        """One item of the item master (``NotFoundError`` when Sage has none by that code).
        ``attempts`` and ``pause`` as for :meth:`create`."""
        return self._call("GET", f"/api/v1/items/{_seg(item)}", max_attempts=attempts, pause=pause)

    def list_items(self, reference: str | None = None) -> Iterator[JsonDict]:
        """Every item (all pages), or those made from the Stripe product ``reference``."""
        return self._paginate(
            "/api/v1/items", {} if reference is None else {"reference": reference}
        )

    def create_item(
        self, payload: JsonDict, *, attempts: int | None = None, pause: bool = True
    ) -> tuple[JsonDict, bool]:
        """The item ``payload["item"]``, created unless Sage has it: ``(item, created)``.

        Idempotent, and safe when two runs (or a run and a webhook) race for the same
        product: an item already there is returned (``created=False``, *linked*), and a POST
        refused because the code was taken meanwhile resolves to the item that took it. An
        uncertain outcome is resolved by ``GET items/{item}`` before any resend. An existing
        item made from *another* Stripe product (its ``reference`` differs) is a
        ``ValidationError`` on ``item``: the code is not ours to link. ``attempts`` and
        ``pause`` apply to each exchange as for :meth:`create` (the loader's policy: no
        sleep in a posting thread, a 429 handed back with its ``Retry-After``)."""
        code = payload.get("item")
        if not isinstance(code, str) or not code:
            raise ValidationError(
                "an item needs an item code", code="validation_error", field="item", system=SYSTEM
            )
        policy: dict[str, Any] = {"max_attempts": attempts, "pause": pause}
        existing = self._existing_item(code, payload, **policy)
        if existing is not None:
            return existing, False
        try:
            doc = self._call(
                "POST",
                "/api/v1/items",
                json=payload,
                resolve=lambda: self._existing_item(code, payload, **policy),
                resend_uncertain=False,
                **policy,
            )
        except ValidationError as exc:
            if exc.field != "item":
                raise
            raced = self._existing_item(
                code, payload, **policy
            )  # created by someone else meanwhile
            if raced is None:
                raise
            return raced, False
        # A lookup after an uncertain POST may have found it: created by us all the same.
        return dict(doc), True

    def _existing_item(
        self, code: str, payload: JsonDict, *, max_attempts: int | None = None, pause: bool = True
    ) -> JsonDict | None:
        try:
            found = self._call(
                "GET", f"/api/v1/items/{_seg(code)}", max_attempts=max_attempts, pause=pause
            )
        except NotFoundError:
            return None
        reference = payload.get("reference")
        theirs = found.get("reference")
        if reference is not None and theirs is not None and theirs != reference:
            raise ValidationError(
                f"item {code} exists in Sage, made from {theirs}, not {reference}",
                code="validation_error",
                field="item",
                system=SYSTEM,
            )
        return dict(found)

    # reference data

    def gl_accounts(self) -> list[JsonDict]:
        return list(self._paginate("/api/v1/glaccounts", {}))

    def fiscal_periods(self) -> list[JsonDict]:
        return list(self._paginate("/api/v1/fiscalperiods", {}))

    # internals

    def _existing_customer(self, customer_id: str, payload: JsonDict) -> JsonDict | None:
        try:
            found = self._once("GET", f"/api/v1/customers/{_seg(customer_id)}")
        except StripeSageError as exc:
            if exc.http_status == 404:
                return None
            raise
        reference = payload.get("reference")
        if reference is not None and found.get("reference") != reference:
            raise ValidationError(
                f"customer {customer_id} exists with another reference",
                code="validation_error",
                field="customer_id",
                system=SYSTEM,
            )
        return dict(found)

    def _first_by_reference(self, collection: str, reference: str) -> JsonDict | None:
        page = self._once(
            "GET", f"/api/v1/{collection}", params={"reference": reference, "limit": MAX_PAGE}
        )
        data = page.get("data") or []
        if len(data) > 1:
            log.warning(
                "sagepro: %d %s share reference %s; using the first",
                len(data),
                collection,
                reference,
            )
        return dict(data[0]) if data else None

    def _paginate(self, path: str, params: JsonDict) -> Iterator[JsonDict]:
        cursor: str | None = None
        while True:
            query = {**params, "limit": MAX_PAGE}
            if cursor:
                query["cursor"] = cursor
            page = self._call("GET", path, params=query)
            yield from page.get("data") or []
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: JsonDict | None = None,
        params: JsonDict | None = None,
        resolve: Callable[[], JsonDict | None] | None = None,
        resend_uncertain: bool = True,
        check_first: bool = False,
        max_attempts: int | None = None,
        pause: bool = True,
    ) -> Any:
        """Send with the retry policy; ``resolve`` finds a create that may already exist."""
        uncertain = check_first
        maybe_done = False  # an exchange of this call may have been acted on
        absent = False  # a lookup found nothing, and nothing sent since can have been acted on
        tries = 0

        def send(attempt: int) -> Any:
            nonlocal uncertain, maybe_done, absent, tries
            tries = attempt
            try:
                if uncertain and resolve is not None:
                    try:
                        found = resolve()
                    except _Transient as failure:  # a failed lookup changes nothing in Sage
                        raise _Transient(failure.error, uncertain=False) from None
                    except RetryableError as error:  # a lookup that retried on its own
                        raise _GaveUp(error) from None
                    if found is not None:
                        self.stats.recovered_by_lookup += 1
                        log.info("sagepro: %s %s was already done; found by lookup", method, path)
                        return found
                    # Sage does not hold it: what was uncertain before is settled, and the
                    # next attempt needs no lookup unless this one is uncertain again.
                    uncertain = maybe_done = False
                    absent = True
                return self._once(method, path, json=json, params=params)
            except _Transient as failure:
                if failure.uncertain and method != "GET":
                    uncertain = maybe_done = True
                    absent = False
                    if resolve is None and not resend_uncertain:
                        raise FatalError(
                            f"{method} {path}: outcome unknown after {failure.error.message}; "
                            "check Sage before replaying",
                            http_status=failure.error.http_status,
                            code="outcome_unknown",
                            system=SYSTEM,
                        ) from None
                raise failure.error from None

        def log_retry(attempt: int, error: RetryableError, delay: float) -> None:
            self.stats.retries += 1
            log.warning(
                "sagepro: %s %s failed (%s); attempt %d of %d, retrying in %.2fs",
                method,
                path,
                error.code or error.http_status or "transport",
                attempt,
                max(1, max_attempts) if max_attempts is not None else self.policy.max_attempts,
                delay,
            )

        try:
            return call_with_retries(
                send,
                self.policy,
                attempts=max_attempts,
                pause=pause,
                # Without pauses a 429 goes back to the caller with its Retry-After.
                give_up=lambda error: not pause and error.http_status == 429,
                on_retry=log_retry,
            )
        except _GaveUp as gave_up:
            raise gave_up.error from None
        except RetryableError as error:
            raise RetryableError(
                f"gave up after {tries} attempts: {error.message}",
                retry_after=error.retry_after,
                http_status=error.http_status,
                code=error.code,
                field=error.field,
                system=SYSTEM,
                maybe_done=maybe_done or method == "GET",
                absent=absent,
            ) from None

    def _once(
        self,
        method: str,
        path: str,
        *,
        json: JsonDict | None = None,
        params: JsonDict | None = None,
    ) -> Any:
        """One exchange: the parsed body, a fatal error, or ``_Transient``."""
        if self.pacer is not None:
            self.pacer.acquire()
        self.stats.attempts += 1
        headers = {
            "Authorization": f"Bearer {self._api_key.get_secret_value()}",
            "Accept": "application/json",
        }
        try:
            response = self._http.request(
                method, f"{self.base_url}{path}", json=json, params=params, headers=headers
            )
        except httpx.TransportError as exc:
            self.stats.transport_errors += 1
            # A connection never made, or a pool wait, means the request never left.
            sent = not isinstance(
                exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
            )
            code = "timeout" if isinstance(exc, httpx.TimeoutException) else "unavailable"
            error = RetryableError(
                self._scrub(f"{method} {path}: {type(exc).__name__}: {exc}"),
                code=code,
                system=SYSTEM,
            )
            raise _Transient(error, uncertain=sent) from None
        if response.is_success:
            try:
                return response.json()
            except ValueError:
                raise _Transient(
                    RetryableError(
                        f"{method} {path}: HTTP {response.status_code} with a non-JSON body",
                        code="unavailable",
                        system=SYSTEM,
                    ),
                    uncertain=True,
                ) from None
        failure = self._error(method, path, response)
        if isinstance(failure, RetryableError):
            if response.status_code == 429:
                self.stats.rate_limited += 1
            else:
                self.stats.server_errors += 1
            raise _Transient(failure, uncertain=response.status_code != 429)
        raise failure

    def _error(self, method: str, path: str, response: httpx.Response) -> StripeSageError:
        code = field = None
        message = response.reason_phrase or f"HTTP {response.status_code}"
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            detail = body["error"]
            code = detail.get("code") if isinstance(detail.get("code"), str) else None
            field = detail.get("field") if isinstance(detail.get("field"), str) else None
            if isinstance(detail.get("message"), str):
                message = detail["message"]
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return error_for_status(
            response.status_code,
            self._scrub(f"{method} {path}: {message}"),
            code=code,
            field=field,
            retry_after=retry_after,
            system=SYSTEM,
        )

    def _scrub(self, text: str) -> str:
        secret = self._api_key.get_secret_value()
        return text.replace(secret, "**********") if secret else text


def _seg(value: str) -> str:
    """A path segment, escaped (a key is data, not path syntax)."""
    return quote(value, safe="")
