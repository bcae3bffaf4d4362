"""The Stripe sandbox: the part of Stripe's API the product uses, over a generated business.

Faithful where the product (or stripe-python) could notice: list semantics (newest first,
``limit`` 1–100, ``starting_after``/``ending_before``, ``has_more``, ``created[gt|gte|lt|lte]``,
``expand[]`` in both the indexed and the ``[]`` form), form-encoded bracket parameters, error
bodies and statuses (401, 404 ``resource_missing``, 400 ``parameter_unknown``/``invalid``,
429 with ``Stripe-Rate-Limited-Reason``), a per-endpoint request budget (test mode's
25 req/s by default), idempotent POSTs, and signed webhook delivery with Stripe's
at-least-once, unordered behaviour. Sandbox-only controls live under ``/_sandbox/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from devkit.sandbox.stripe_business import BT_KINDS, EVENT_TYPES, BusinessConfig
from devkit.sandbox.stripe_state import JSON, StripeWorld

LIST_PARAMS = {"limit", "starting_after", "ending_before", "created", "expand"}
# Per resource: the list filters it accepts, and the fields that ``expand`` can replace.
FILTERS: dict[str, set[str]] = {
    "customers": {"email"},
    "charges": {"customer", "payment_intent"},
    "refunds": {"charge", "payment_intent"},
    "disputes": {"charge", "payment_intent"},
    "invoices": {"customer", "status", "subscription", "collection_method"},
    "subscriptions": {"customer", "status"},
    "payouts": {"status", "arrival_date", "destination"},
    "balance_transactions": {"payout", "type", "source", "currency"},
    "events": {"type", "types", "delivery_success"},
    "invoice_payments": {"invoice", "payment", "status"},
    "tax_rates": {"active", "inclusive"},
    "topups": set(),
    "application_fees": set(),
    "transfers": set(),
    "credit_notes": {"invoice", "customer"},
    "checkout_sessions": {"payment_intent"},
    "payment_intents": set(),
}
EXPANDABLE: dict[str, set[str]] = {
    "charges": {"balance_transaction", "refunds", "customer"},
    "refunds": {"balance_transaction", "charge"},
    "disputes": {"charge"},
    # Every expansion Stripe accepts on an invoice; those whose field is null or a fixed
    # value here (no default payment method, no test clock, ...) leave the field as it is.
    "invoices": {
        "customer",
        "discounts",
        "total_discount_amounts.discount",
        "lines.data.discounts",
        "lines.data.discount_amounts.discount",
        "account_tax_ids",
        "application",
        "default_payment_method",
        "default_source",
        "from_invoice.invoice",
        "latest_revision",
        "on_behalf_of",
        "test_clock",
        "last_finalization_error.payment_method",
        "last_finalization_error.source",
        "payments",
        "confirmation_secret",
    },
    "payouts": {"balance_transaction"},
    "balance_transactions": {"source"},
    "invoice_lines": {"discounts", "discount_amounts.discount"},
    "checkout_sessions": {"line_items"},
}


class StripeApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body: JSON = {"message": self.message, "type": self.type}
        if self.code:
            body["code"] = self.code
            body["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param:
            body["param"] = self.param
        headers = {"Request-Id": f"req_{secrets.token_hex(7)}", **self.headers}
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def parse_params(items: list[tuple[str, str]]) -> JSON:
    """Stripe's bracket encoding → nested dicts/lists.

    ``created[gte]=1`` → ``{"created": {"gte": "1"}}``; ``expand[0]=a&expand[1]=b`` and
    ``expand[]=a&expand[]=b`` → ``{"expand": ["a", "b"]}``; ``metadata[k]=v`` → dict.
    """
    out: JSON = {}
    for raw_key, value in items:
        head, _, rest = raw_key.partition("[")
        parts = [head] + ([p.rstrip("]") for p in rest.split("[")] if rest else [])
        node: Any = out
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            nxt_is_list = not last and (parts[depth + 1] == "" or parts[depth + 1].isdigit())
            if isinstance(node, list):
                if last:
                    node.append(value)
                    break
                if part == "" or part.isdigit():
                    idx = int(part) if part.isdigit() else len(node)
                    while len(node) <= idx:
                        node.append({} if not nxt_is_list else [])
                    node = node[idx]
                continue
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, [] if nxt_is_list else {})
    return out


def _int(params: JSON, key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StripeApiError(
            400, f"Invalid integer: {value}", code="parameter_invalid_integer", param=key
        ) from None


@dataclass
class WebhookEndpoint:
    url: str
    secret: str
    duplicate_rate: float = 0.0
    shuffle_window: int = 0  # deliver in random order within windows of this many events
    max_attempts: int = 10
    dropped: int = 0
    retry_base: float = 0.5
    delivered: int = 0
    failed_attempts: int = 0
    buffer: list[JSON] = field(default_factory=list)


def _item_page(items: list[JSON], params: JSON, url: str) -> JSON:
    """One page of a sub-list whose cursors are item ids, in the parent's order."""
    limit = _int(params, "limit", params.get("limit", 10))
    if not 1 <= limit <= 100:
        raise StripeApiError(
            400,
            "Invalid limit: must be between 1 and 100",
            code="parameter_invalid_integer",
            param="limit",
        )
    ids = [x["id"] for x in items]
    start, stop = 0, len(items)
    for key in ("starting_after", "ending_before"):
        if key in params:
            if params[key] not in ids:
                raise StripeApiError(
                    404, f"No such line item: '{params[key]}'", code="resource_missing", param=key
                )
            if key == "starting_after":
                start = ids.index(params[key]) + 1
            else:
                stop = ids.index(params[key])
    if "ending_before" in params:
        page, more = items[max(start, stop - limit) : stop], stop - limit > start
    else:
        page, more = items[start : start + limit], start + limit < stop
    return {"object": "list", "data": page, "has_more": more, "url": url}


def sign_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """``Stripe-Signature`` header for ``payload``: HMAC-SHA256 over ``f"{t}.{body}"``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class Limiter:
    """Token bucket per endpoint family: test mode allows about 25 requests/s per endpoint."""

    def __init__(self, rps: float | None) -> None:
        self.rps = rps
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        if not self.rps:
            return True
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.rps, now))
        tokens = min(self.rps, tokens + (now - last) * self.rps)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1, now)
        return True


class StripeSandbox:
    """State of one sandbox app: the world, its limiter, faults, webhooks and live mode."""

    def __init__(
        self,
        world: StripeWorld,
        *,
        api_key: str,
        rate_limit: float | None,
        webhook_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.world = world
        self.api_key = api_key
        self.limiter = Limiter(rate_limit)
        self.faults: JSON = {}
        self.fault_rng = random.Random(0)
        self.endpoints: list[WebhookEndpoint] = []
        self.idempotency: dict[str, tuple[str, int, bytes]] = {}
        self.queue: asyncio.Queue[JSON] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.live_rate = 0.0
        self.live_rng = random.Random(world.config.seed + 1)
        self.webhook_client = webhook_client
        self.requests = 0
        self.deliveries: set[asyncio.Task[None]] = set()  # keep running deliveries referenced
        self.in_flight = asyncio.Semaphore(16)
        world.listeners.append(self._on_event)
        world.endpoint_count = lambda: len(self.endpoints)

    # -- webhooks ------------------------------------------------------------------------
    def _on_event(self, event: JSON) -> None:
        if not self.endpoints or self.queue is None or self.loop is None:
            return
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def deliver_forever(self) -> None:
        assert self.queue is not None
        client = self.webhook_client or httpx.AsyncClient(timeout=10.0)
        try:
            while True:
                event = await self.queue.get()
                for ep in list(self.endpoints):
                    batch = [event]
                    if ep.shuffle_window > 1:
                        ep.buffer.append(event)
                        if len(ep.buffer) < ep.shuffle_window and not self.queue.empty():
                            continue
                        batch, ep.buffer = ep.buffer, []
                        self.live_rng.shuffle(batch)
                    for ev in batch:
                        copies = 2 if self.live_rng.random() < ep.duplicate_rate else 1
                        for _ in range(copies):
                            task = asyncio.create_task(self._deliver(client, ep, ev))
                            self.deliveries.add(task)
                            task.add_done_callback(self.deliveries.discard)
        finally:
            if self.webhook_client is None:
                await client.aclose()

    async def _deliver(self, client: httpx.AsyncClient, ep: WebhookEndpoint, event: JSON) -> None:
        payload = json.dumps(event).encode()
        for attempt in range(ep.max_attempts):
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": sign_payload(payload, ep.secret),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            }
            try:
                # A bounded number in flight, as Stripe does: a burst queues here instead of
                # timing out in the connection pool.
                async with self.in_flight:
                    r = await client.post(ep.url, content=payload, headers=headers)
                if 200 <= r.status_code < 300:
                    ep.delivered += 1
                    return
            except httpx.HTTPError:
                pass
            ep.failed_attempts += 1
            await asyncio.sleep(min(ep.retry_base * 2**attempt, 30.0))
        ep.dropped += 1  # Stripe gives up after days; the sandbox after max_attempts

    async def flush_webhooks(self) -> None:
        for ep in self.endpoints:
            if ep.buffer and self.queue is not None:
                batch, ep.buffer = ep.buffer, []
                for ev in batch:
                    self.queue.put_nowait(ev)

    # -- live mode -----------------------------------------------------------------------
    def live_step(self) -> list[str]:
        """One random piece of new activity, as a live Stripe account would produce."""
        w, rng = self.world, self.live_rng
        roll = rng.random()
        with w.lock:
            n_cust = w.count("customers")
            if roll < 0.70:
                k = rng.randrange(n_cust)
                if w.is_deleted(k):
                    return []  # Stripe charges no deleted customer
                i = w.create_charge(
                    customer=k,
                    amount=rng.randrange(500, 50_000),
                    currency=rng.choice(["usd", "usd", "usd", "eur", "jpy"]),
                )
                return [w.make_id("charges", i)]
            if roll < 0.85:
                i = w.count("charges") - 1 - rng.randrange(min(50, w.count("charges")))
                ch = w.charge(i)
                refunded, _, _ = w._charge_state(i, w._tick())
                if ch.failed or ch.auth or refunded >= ch.amount:
                    return []  # nothing to refund (declined, never captured, or all back)
                r = w.refund_charge(i, max(1, (ch.amount - refunded) // 2))
                return [w.make_id("refunds", r)]
            if roll < 0.93:
                opens = w.open_invoices()
                if opens:
                    return [w.make_id("charges", w.pay_invoice(rng.choice(opens)))]
                return []
            k = w.create_customer(name=f"Live Customer {n_cust}", email=f"live{n_cust}@example.com")
            return [w.make_id("customers", k)]

    async def live_forever(self) -> None:
        while True:
            if self.live_rate > 0:
                self.live_step()
                await asyncio.sleep(1.0 / self.live_rate)
            else:
                await asyncio.sleep(0.05)


def create_stripe_app(
    config: BusinessConfig | None = None,
    *,
    api_key: str,
    rate_limit: float | None = 25.0,
    clock: Callable[[], float] = time.time,
    world: StripeWorld | None = None,
    live_rate: float = 0.0,
    webhook_endpoints: list[WebhookEndpoint] | None = None,
) -> FastAPI:
    """The sandbox app. ``rate_limit`` is requests/s per endpoint family (None: unlimited)."""
    world = world or StripeWorld(config or BusinessConfig(), clock=clock)
    sb = StripeSandbox(world, api_key=api_key, rate_limit=rate_limit)
    sb.live_rate = live_rate
    sb.endpoints.extend(webhook_endpoints or [])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sb.loop = asyncio.get_running_loop()
        sb.queue = asyncio.Queue()
        tasks = [asyncio.create_task(sb.deliver_forever()), asyncio.create_task(sb.live_forever())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            sb.loop = None

    app = FastAPI(
        title="Stripe sandbox (stripe-sage)",
        lifespan=lifespan,
        description=__doc__,
        version=world.config.seed.__str__(),
    )
    app.state.sandbox = sb

    @app.exception_handler(StripeApiError)
    async def _stripe_error(request: Request, exc: StripeApiError) -> JSONResponse:
        return exc.response()

    @app.middleware("http")
    async def _gate(request: Request, call_next: Callable[[Request], Any]) -> Response:
        path = request.url.path
        if not path.startswith("/v1/"):
            return await call_next(request)
        sb.requests += 1
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else ""
        if auth.lower().startswith("basic "):
            import base64

            with contextlib.suppress(Exception):
                key = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
        if not key or not hmac.compare_digest(key.encode(), sb.api_key.encode()):
            return StripeApiError(
                401, "Invalid API Key provided. Check the key you are using."
            ).response()
        family = path.split("/")[2] if path.count("/") >= 2 else path
        if not sb.limiter.allow(family):
            return StripeApiError(
                429,
                "Request rate limit exceeded. Learn more about rate limits here "
                "https://stripe.com/docs/rate-limits.",
                code="rate_limit",
                headers={"Stripe-Rate-Limited-Reason": "endpoint-rate"},
            ).response()
        if sb.faults:
            roll = sb.fault_rng.random()
            if roll < sb.faults.get("rate_500", 0.0):
                return StripeApiError(
                    500, "An unknown error occurred", type_="api_error"
                ).response()
            if roll < sb.faults.get("rate_500", 0.0) + sb.faults.get("rate_429", 0.0):
                return StripeApiError(
                    429,
                    "Request rate limit exceeded.",
                    code="rate_limit",
                    headers={"Stripe-Rate-Limited-Reason": "global-rate"},
                ).response()
        return await call_next(request)

    def ok(body: JSON) -> Response:
        return Response(
            orjson.dumps(body),
            media_type="application/json",
            headers={
                "Request-Id": f"req_{secrets.token_hex(7)}",
                "Stripe-Version": "2026-10-28.endive",
            },
        )

    def query(request: Request) -> JSON:
        return parse_params(list(request.query_params.multi_items()))

    def check_known(params: JSON, allowed: set[str]) -> None:
        for key in params:
            if key not in allowed:
                raise StripeApiError(
                    400, f"Received unknown parameter: {key}", code="parameter_unknown", param=key
                )
        if isinstance(params.get("metadata"), dict):
            check_metadata(params["metadata"])

    def check_metadata(metadata: JSON) -> None:
        """Stripe's limits on metadata: up to 50 keys, keys up to 40 characters, values up
        to 500 (https://docs.stripe.com/metadata)."""
        if len(metadata) > 50:
            raise StripeApiError(
                400,
                "You can have at most 50 metadata keys.",
                code="parameter_invalid_string_length",
            )
        for key, value in metadata.items():
            if len(key) > 40:
                raise StripeApiError(
                    400,
                    f"Metadata keys can have up to 40 characters, but you passed in a key that "
                    f"is {len(key)} characters.",
                    code="parameter_invalid_string_length",
                    param=f"metadata[{key}]",
                )
            if isinstance(value, str) and len(value) > 500:
                raise StripeApiError(
                    400,
                    f"Metadata values can have up to 500 characters, but you passed in a value "
                    f"that is {len(value)} characters.",
                    code="parameter_invalid_string_length",
                    param=f"metadata[{key}]",
                )

    def expand_set(params: JSON, resource: str, prefix: str = "") -> frozenset[str]:
        raw = params.get("expand", [])
        raw = [raw] if isinstance(raw, str) else list(raw)
        out = set()
        for item in raw:
            if prefix and not item.startswith(prefix):
                raise StripeApiError(
                    400,
                    f"This property cannot be expanded ({item}). You may "
                    f"want to try expanding '{prefix}{item}' instead.",
                    param="expand",
                )
            name = item[len(prefix) :]
            if name not in EXPANDABLE.get(resource, set()):
                raise StripeApiError(
                    400, f"This property cannot be expanded ({name}).", param="expand"
                )
            out.add(name)
        return frozenset(out)

    def lookup(resource: str, obj_id: str, param: str = "id") -> int:
        idx = world.parse_id(resource, obj_id)
        if idx is None:
            noun = resource[:-1].replace("_", " ")
            raise StripeApiError(
                404, f"No such {noun}: '{obj_id}'", code="resource_missing", param=param
            )
        return idx

    # -- list engine -----------------------------------------------------------------------
    def created_bounds(resource: str, created: Any) -> tuple[int, int]:
        n = world.count(resource)
        lo, hi = 0, n
        if created is None:
            return lo, hi
        if isinstance(created, str):
            created = {"eq": created}
        if not isinstance(created, dict):
            raise StripeApiError(400, "Invalid created", param="created")
        base = world.base_created(resource)
        extra = [world.created_of(resource, k) for k in range(len(base), n)]
        arr = np.concatenate([base, np.array(extra, np.int64)]) if extra else base
        for op, value in created.items():
            ts = _int(created, f"created[{op}]", value)
            if op == "gte":
                lo = max(lo, int(np.searchsorted(arr, ts, "left")))
            elif op == "gt":
                lo = max(lo, int(np.searchsorted(arr, ts, "right")))
            elif op == "lt":
                hi = min(hi, int(np.searchsorted(arr, ts, "left")))
            elif op == "lte":
                hi = min(hi, int(np.searchsorted(arr, ts, "right")))
            elif op == "eq":
                lo = max(lo, int(np.searchsorted(arr, ts, "left")))
                hi = min(hi, int(np.searchsorted(arr, ts, "right")))
            else:
                raise StripeApiError(
                    400,
                    f"Received unknown parameter: created[{op}]",
                    code="parameter_unknown",
                    param=f"created[{op}]",
                )
        return lo, hi

    Selector = Callable[[int, int], np.ndarray]

    def selector(resource: str, filters: JSON) -> Selector | None:
        """Indices in [a, b) passing the filters, ascending; None when nothing filters."""
        if resource == "customers" and (world.o.deleted_customers or world.b.cu_deleted_at.any()):
            # Stripe's customer list leaves deleted customers out.
            filters = {**filters, "_not_deleted": True}
        if not filters:
            return None
        b = world.b
        n_base = world.base_count(resource)
        predicates: list[Callable[[int, int], np.ndarray]] = []
        overlay: list[Callable[[int], bool]] = []
        fixed: np.ndarray | None = None
        for key, value in filters.items():
            if resource == "charges" and key == "customer":
                k = lookup("customers", value, key)
                predicates.append(lambda a, z, k=k: b.ch_customer[a:z] == k)
                overlay.append(lambda i, k=k: world.charge(i).customer == k)
            elif resource == "charges" and key == "payment_intent":
                i = world.parse_id("charges", "ch_" + str(value)[3:])
                fixed = np.array([] if i is None else [i], np.int64)
            elif resource == "checkout_sessions" and key == "payment_intent":
                i = world.parse_id("charges", "ch_" + str(value)[3:])
                k = -1 if i is None else world.session_of_charge(i)
                fixed = np.array([k] if k >= 0 else [], np.int64)
            elif resource in ("refunds", "disputes") and key == "charge":
                i = lookup("charges", value, key)
                if resource == "refunds":
                    fixed = np.array(sorted(world.refunds_of_charge(i)), np.int64)
                else:
                    d = int(b.ch_dispute[i]) if i < len(b.charges) else -1
                    fixed = np.array([d] if d >= 0 else [], np.int64)
            elif resource == "invoices" and key == "customer":
                k = lookup("customers", value, key)
                predicates.append(lambda a, z, k=k: b.ch_customer[b.inv_charge[a:z]] == k)
            elif resource == "invoices" and key == "subscription":
                s = lookup("subscriptions", value, key)
                predicates.append(lambda a, z, s=s: b.inv_subscription[a:z] == s)
            elif resource == "invoices" and key == "status":
                want = value
                predicates.append(
                    lambda a, z, want=want: np.array(
                        [world.invoice_status(j, world.now()) == want for j in range(a, z)],
                        bool,
                    )
                )
            elif resource == "invoices" and key == "collection_method":
                predicates.append(lambda a, z, v=value: np.full(z - a, v == "charge_automatically"))
            elif resource == "credit_notes" and key == "invoice":
                j = lookup("invoices", value, key)
                cn = int(b.inv_credit_note[j])
                fixed = np.array([cn] if cn >= 0 else [], np.int64)
            elif resource == "credit_notes" and key == "customer":
                k = lookup("customers", value, key)
                predicates.append(
                    lambda a, z, k=k: b.ch_customer[b.inv_charge[b.cn_invoice[a:z]]] == k
                )
            elif resource == "tax_rates" and key in ("active", "inclusive"):
                want_true = str(value).lower() == "true"
                predicates.append(
                    lambda a, z, key=key, want_true=want_true: np.array(
                        [bool(world.tax_rates[k][key]) == want_true for k in range(a, z)], bool
                    )
                )
            elif resource == "subscriptions" and key == "customer":
                k = lookup("customers", value, key)
                predicates.append(lambda a, z, k=k: b.sub_customer[a:z] == k)
            elif resource == "subscriptions" and key == "status":
                predicates.append(lambda a, z, v=value: np.full(z - a, v in ("active", "all")))
            elif resource == "payouts" and key == "status":
                predicates.append(
                    lambda a, z, v=value: np.array(
                        [world._payout_state(p, world.now())[0] == v for p in range(a, z)], bool
                    )
                )
            elif resource == "balance_transactions" and key == "payout":
                p = lookup("payouts", value, key)
                if not b.po_automatic[p]:  # Stripe itemises automatic payouts only
                    raise StripeApiError(
                        400,
                        "Balance transaction history can only be filtered on automatic "
                        "transfers, not manual.",
                        code="parameter_invalid",
                        param="payout",
                    )
                fixed = np.sort(b.payout_bts(p))
            elif resource == "balance_transactions" and key == "type":
                kinds = [k for k, (t, _) in enumerate(BT_KINDS) if t == value]
                predicates.append(lambda a, z, kinds=kinds: np.isin(b.bt_kind[a:z], kinds))
                overlay.append(lambda x, value=value: BT_KINDS[world.bt(x).kind][0] == value)
            elif resource == "balance_transactions" and key == "source":
                predicates.append(
                    lambda a, z, v=value: np.array(
                        [
                            world._render_balance_transactions(x, world.now(), frozenset())[
                                "source"
                            ]
                            == v
                            for x in range(a, z)
                        ],
                        bool,
                    )
                )
            elif resource == "events" and key in ("type", "types"):
                patterns = [value] if isinstance(value, str) else list(value)
                if len(patterns) > 20:
                    raise StripeApiError(400, "You may pass at most 20 types.", param="types")

                def matches(name: str, patterns: list[str] = patterns) -> bool:
                    return any(
                        name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns
                    )

                codes = [c for c, (name, _) in enumerate(EVENT_TYPES) if matches(name)]
                predicates.append(lambda a, z, codes=codes: np.isin(b.ev_type[a:z], codes))
                overlay.append(lambda e, m=matches: m(world.render("events", e)["type"]))
            elif key == "_not_deleted":
                now = world.now()
                cut = world.b.cu_deleted_at
                later = [k for k in world.o.deleted_customers if world.is_deleted(k, now)]
                gone = np.union1d(
                    np.nonzero((cut > 0) & (cut <= now))[0], np.array(later, np.int64)
                )
                predicates.append(lambda a, z, gone=gone: ~np.isin(np.arange(a, z), gone))
                overlay.append(lambda k, now=now: not world.is_deleted(k, now))
            elif resource == "invoice_payments" and key == "invoice":
                j = lookup("invoices", value, key)
                fixed = np.nonzero(b.ip_invoice == j)[0].astype(np.int64)
            elif (
                key == "currency"
                or key == "delivery_success"
                or key == "destination"
                or (key == "arrival_date")
                or key == "email"
                or key == "payment"
                or (key == "status" and resource == "invoice_payments")
            ):
                if key == "email":
                    predicates.append(
                        lambda a, z, v=value: np.array(
                            [world._customer_attrs(k)["email"] == v for k in range(a, z)], bool
                        )
                    )
                    overlay.append(lambda k, v=value: world._customer_attrs(k)["email"] == v)
                continue
            else:
                raise StripeApiError(
                    400, f"Received unknown parameter: {key}", code="parameter_unknown", param=key
                )

        def select(a: int, z: int) -> np.ndarray:
            if fixed is not None:
                cand = fixed[(fixed >= a) & (fixed < z)]
                return cand
            za = min(z, n_base)
            parts = []
            if a < za:
                mask = np.ones(za - a, bool)
                for pred in predicates:
                    mask &= pred(a, za)
                parts.append(a + np.nonzero(mask)[0])
            if z > n_base:
                parts.append(
                    np.array(
                        [i for i in range(max(a, n_base), z) if all(f(i) for f in overlay)],
                        np.int64,
                    )
                )
            return np.concatenate(parts) if parts else np.array([], np.int64)

        return select

    def list_page(resource: str, params: JSON, url: str) -> JSON:
        check_known(params, LIST_PARAMS | FILTERS.get(resource, set()))
        limit = _int(params, "limit", params.get("limit", 10))
        if not 1 <= limit <= 100:
            raise StripeApiError(
                400,
                "Invalid limit: must be between 1 and 100",
                code="parameter_invalid_integer",
                param="limit",
            )
        if "starting_after" in params and "ending_before" in params:
            raise StripeApiError(
                400,
                "You may only specify one of these parameters: ending_before, starting_after.",
                param="starting_after",
            )
        expand = expand_set(params, resource, prefix="data.")
        filters = {k: v for k, v in params.items() if k not in LIST_PARAMS}
        with world.lock:
            lo, hi = created_bounds(resource, params.get("created"))
            if "starting_after" in params:
                cursor = params["starting_after"]
                idx = world.parse_id(resource, cursor)
                if idx is None:
                    raise StripeApiError(
                        404,
                        f"No such object: '{cursor}'",
                        code="resource_missing",
                        param="starting_after",
                    )
                hi = min(hi, idx)
            ending = "ending_before" in params
            if ending:
                cursor = params["ending_before"]
                idx = world.parse_id(resource, cursor)
                if idx is None:
                    raise StripeApiError(
                        404,
                        f"No such object: '{cursor}'",
                        code="resource_missing",
                        param="ending_before",
                    )
                lo = max(lo, idx + 1)
            select = selector(resource, filters)
            found: list[int] = []
            chunk = max(limit + 1, 256)
            if ending:
                bottom = lo
                while bottom < hi and len(found) <= limit:
                    z = min(hi, bottom + chunk)
                    got = np.arange(bottom, z) if select is None else select(bottom, z)
                    found.extend(int(x) for x in got[: limit + 1 - len(found)])
                    bottom, chunk = z, chunk * 2
                page = list(reversed(found[:limit]))
            else:
                top = hi
                while top > lo and len(found) <= limit:
                    a = max(lo, top - chunk)
                    got = np.arange(a, top) if select is None else select(a, top)
                    found.extend(int(x) for x in got[::-1][: limit + 1 - len(found)])
                    top, chunk = a, chunk * 2
                page = found[:limit]
            data = [world.render(resource, i, expand=expand) for i in page]
        return {"object": "list", "data": data, "has_more": len(found) > limit, "url": url}

    # -- routes ----------------------------------------------------------------------------
    simple = [
        "customers",
        "charges",
        "refunds",
        "disputes",
        "invoices",
        "subscriptions",
        "payouts",
        "balance_transactions",
        "events",
        "invoice_payments",
        "products",
        "tax_rates",
        "topups",
        "application_fees",
        "transfers",
        "credit_notes",
        "payment_intents",
    ]

    def make_list(resource: str) -> Callable[[Request], Any]:
        async def list_route(request: Request) -> Response:
            return ok(list_page(resource, query(request), f"/v1/{resource}"))

        list_route.__name__ = f"list_{resource}"
        return list_route

    def make_retrieve(resource: str) -> Callable[..., Any]:
        async def retrieve_route(request: Request, obj_id: str) -> Response:
            params = query(request)
            check_known(params, {"expand"})
            expand = expand_set(params, resource)
            with world.lock:
                idx = lookup(resource, obj_id)
                return ok(world.render(resource, idx, expand=expand))

        retrieve_route.__name__ = f"retrieve_{resource}"
        return retrieve_route

    for res in simple:
        app.add_api_route(f"/v1/{res}", make_list(res), methods=["GET"], summary=f"List {res}")
        app.add_api_route(
            f"/v1/{res}/{{obj_id}}",
            make_retrieve(res),
            methods=["GET"],
            summary=f"Retrieve one of {res}",
        )

    @app.get("/v1/account", summary="The account (its payout schedule: daily, or manual)")
    async def account() -> Response:
        return ok(world.render_account())

    @app.get(
        "/v1/customers/{obj_id}/balance_transactions",
        summary="A customer's balance transactions (credit granted, applied to invoices)",
    )
    async def customer_balance_transactions(request: Request, obj_id: str) -> Response:
        params = query(request)
        check_known(params, {"limit", "starting_after", "ending_before", "expand"})
        limit = int(params.get("limit", 10))
        url = f"/v1/customers/{obj_id}/balance_transactions"
        with world.lock:
            t = world.now()
            k = lookup("customers", obj_id)
            found = list(reversed(world.customer_balance_transactions(k, t)))
            if params.get("starting_after"):
                after = lookup("customer_balance_transactions", params["starting_after"])
                found = found[found.index(after) + 1 :] if after in found else []
            page = found[:limit]
            data = [world.render("customer_balance_transactions", x) for x in page]
        # Newest first, as Stripe lists them.
        return ok({"object": "list", "data": data, "has_more": len(found) > limit, "url": url})

    @app.get(
        "/v1/customers/{obj_id}/balance_transactions/{txn_id}",
        summary="One of a customer's balance transactions",
    )
    async def customer_balance_transaction(obj_id: str, txn_id: str) -> Response:
        with world.lock:
            k = lookup("customers", obj_id)
            x = lookup("customer_balance_transactions", txn_id)
            if int(world.b.cbtxn_customer[x]) != k or x not in world.customer_balance_transactions(
                k, world.now()
            ):
                raise StripeApiError(
                    404,
                    f"No such customer balance transaction: '{txn_id}'",
                    code="resource_missing",
                    param="id",
                )
            return ok(world.render("customer_balance_transactions", x))

    @app.get("/v1/credit_notes/{obj_id}/lines", summary="All lines of a credit note")
    async def credit_note_lines(request: Request, obj_id: str) -> Response:
        params = query(request)
        check_known(params, {"limit", "starting_after", "ending_before", "expand"})
        with world.lock:
            lines = world.credit_note_lines(lookup("credit_notes", obj_id))
        # A credit note here credits one line: the whole list is one page.
        return ok(
            {
                "object": "list",
                "data": lines,
                "has_more": False,
                "url": f"/v1/credit_notes/{obj_id}/lines",
            }
        )

    # Checkout Sessions live under /v1/checkout/sessions (Stripe's path for the resource).
    app.add_api_route(
        "/v1/checkout/sessions",
        make_list("checkout_sessions"),
        methods=["GET"],
        summary="List Checkout Sessions (filter payment_intent; expand[]=data.line_items)",
    )
    app.add_api_route(
        "/v1/checkout/sessions/{obj_id}",
        make_retrieve("checkout_sessions"),
        methods=["GET"],
        summary="Retrieve a Checkout Session (expand[]=line_items)",
    )

    @app.get(
        "/v1/checkout/sessions/{obj_id}/line_items",
        summary="The line items of a Checkout Session (paged)",
    )
    async def checkout_line_items(request: Request, obj_id: str) -> Response:
        params = query(request)
        check_known(params, {"limit", "starting_after", "ending_before", "expand"})
        with world.lock:
            items = world.checkout_line_items(lookup("checkout_sessions", obj_id))
        return ok(_item_page(items, params, f"/v1/checkout/sessions/{obj_id}/line_items"))

    @app.get("/v1/invoices/{obj_id}/lines", summary="All lines of an invoice (paged)")
    async def invoice_lines(request: Request, obj_id: str) -> Response:
        params = query(request)
        check_known(params, {"limit", "starting_after", "ending_before", "expand"})
        limit = _int(params, "limit", params.get("limit", 10))
        if not 1 <= limit <= 100:
            raise StripeApiError(
                400,
                "Invalid limit: must be between 1 and 100",
                code="parameter_invalid_integer",
                param="limit",
            )
        expand = expand_set(params, "invoice_lines", prefix="data.")
        with world.lock:
            lines = world._invoice_lines(lookup("invoices", obj_id), expand)
        # Lines keep their invoice order; the cursors are line ids.
        ids = [line["id"] for line in lines]
        start, stop = 0, len(lines)
        for key in ("starting_after", "ending_before"):
            if key in params:
                if params[key] not in ids:
                    raise StripeApiError(
                        404,
                        f"No such line item: '{params[key]}'",
                        code="resource_missing",
                        param=key,
                    )
                if key == "starting_after":
                    start = ids.index(params[key]) + 1
                else:
                    stop = ids.index(params[key])
        if "ending_before" in params:
            page = lines[max(start, stop - limit) : stop]
            more = stop - limit > start
        else:
            page = lines[start : start + limit]
            more = start + limit < stop
        return ok(
            {
                "object": "list",
                "data": page,
                "has_more": more,
                "url": f"/v1/invoices/{obj_id}/lines",
            }
        )

    async def form(request: Request) -> JSON:
        raw = (await request.body()).decode()
        return parse_params(parse_qsl(raw, keep_blank_values=True))

    async def idempotent(request: Request, handler: Callable[[JSON], JSON]) -> Response:
        key = request.headers.get("idempotency-key")
        raw = await request.body()
        fingerprint = hashlib.sha256(request.url.path.encode() + b"?" + raw).hexdigest()
        if key and key in sb.idempotency:
            seen_fp, status, body = sb.idempotency[key]
            if seen_fp != fingerprint:
                raise StripeApiError(
                    400,
                    "Keys for idempotent requests can only be used with "
                    "the same parameters they were first used with.",
                    type_="idempotency_error",
                )
            return Response(
                body,
                status_code=status,
                media_type="application/json",
                headers={"Idempotent-Replayed": "true"},
            )
        result = handler(await form(request))
        body = orjson.dumps(result)
        if key:
            sb.idempotency[key] = (fingerprint, 200, body)
        return Response(body, media_type="application/json")

    updatable = {"name", "email", "phone", "address", "metadata", "description"}

    @app.post("/v1/customers/{obj_id}", summary="Update a customer")
    async def update_customer(request: Request, obj_id: str) -> Response:
        def handle(params: JSON) -> JSON:
            check_known(params, updatable | {"expand"})
            k = lookup("customers", obj_id)
            if world.is_deleted(k):
                raise StripeApiError(
                    404, f"No such customer: '{obj_id}'", code="resource_missing", param="id"
                )
            return world.update_object(
                "customers", k, {x: v for x, v in params.items() if x != "expand"}
            )

        return await idempotent(request, handle)

    @app.post("/v1/customers", summary="Create a customer")
    async def create_customer(request: Request) -> Response:
        def handle(params: JSON) -> JSON:
            check_known(params, updatable | {"expand"})
            k = world.create_customer(
                name=params.get("name") or "",
                email=params.get("email"),
                metadata=params.get("metadata"),
                phone=params.get("phone"),
            )
            return world.render("customers", k)

        return await idempotent(request, handle)

    @app.delete("/v1/customers/{obj_id}", summary="Delete a customer")
    async def delete_customer(request: Request, obj_id: str) -> Response:
        k = lookup("customers", obj_id)
        if world.is_deleted(k):
            raise StripeApiError(
                404, f"No such customer: '{obj_id}'", code="resource_missing", param="id"
            )
        return ok(world.delete_customer(k))

    @app.post("/v1/charges/{obj_id}", summary="Update a charge (metadata, description)")
    async def update_charge(request: Request, obj_id: str) -> Response:
        def handle(params: JSON) -> JSON:
            check_known(params, {"metadata", "description", "expand"})
            i = lookup("charges", obj_id)
            return world.update_object(
                "charges", i, {x: v for x, v in params.items() if x != "expand"}
            )

        return await idempotent(request, handle)

    @app.post("/v1/payment_intents/{obj_id}", summary="Update a payment intent (metadata)")
    async def update_payment_intent(request: Request, obj_id: str) -> Response:
        def handle(params: JSON) -> JSON:
            check_known(params, {"metadata", "description", "expand"})
            i = lookup("payment_intents", obj_id)
            return world.update_object(
                "payment_intents", i, {x: v for x, v in params.items() if x != "expand"}
            )

        return await idempotent(request, handle)

    @app.post("/v1/products/{obj_id}", summary="Update a product (metadata, name)")
    async def update_product(request: Request, obj_id: str) -> Response:
        def handle(params: JSON) -> JSON:
            check_known(params, {"metadata", "name", "expand"})
            k = lookup("products", obj_id)
            return world.update_object(
                "products", k, {x: v for x, v in params.items() if x != "expand"}
            )

        return await idempotent(request, handle)

    # -- sandbox controls ------------------------------------------------------------------
    @app.get("/_sandbox/info", summary="Sandbox configuration and object counts")
    async def info() -> JSON:
        c = world.config
        return {
            "seed": c.seed,
            "charges": c.charges,
            "start": c.start,
            "end": c.end,
            "days": c.days,
            "rate_limit": sb.limiter.rps,
            "live_rate": sb.live_rate,
            "requests": sb.requests,
            "counts": {r: world.count(r) for r in simple},
            "webhook_endpoints": [
                {
                    "url": e.url,
                    "delivered": e.delivered,
                    "failed_attempts": e.failed_attempts,
                    "dropped": e.dropped,
                }
                for e in sb.endpoints
            ],
        }

    @app.post("/_sandbox/activity", summary="Create activity now (charge, refund, ...)")
    async def activity(request: Request) -> JSON:
        body = await request.json()
        action = body.get("action")
        try:
            with world.lock:
                if action == "charge":
                    if body.get("guest"):
                        cust = -1  # a guest checkout: no Stripe customer
                    else:
                        cust = lookup("customers", body["customer"]) if body.get("customer") else 0
                    i = world.create_charge(
                        customer=cust,
                        amount=int(body.get("amount", 2000)),
                        currency=body.get("currency", "usd"),
                        metadata=body.get("metadata"),
                        balance_transaction_delay=float(body.get("balance_transaction_delay", 0.0)),
                    )
                    return {"id": world.make_id("charges", i)}
                if action == "refund":
                    i = lookup("charges", body["charge"])
                    r = world.refund_charge(i, body.get("amount"))
                    return {"id": world.make_id("refunds", r)}
                if action == "pay_invoice":
                    j = lookup("invoices", body["invoice"])
                    i = world.pay_invoice(j)
                    return {"id": world.make_id("charges", i)}
                if action == "customer":
                    k = world.create_customer(
                        name=body.get("name", "New Customer"),
                        email=body.get("email"),
                        metadata=body.get("metadata"),
                    )
                    return {"id": world.make_id("customers", k)}
                if action == "update_customer":
                    k = lookup("customers", body["customer"])
                    world.update_object("customers", k, body.get("fields", {}))
                    return {"id": body["customer"]}
                if action == "delete_customer":
                    k = lookup("customers", body["customer"])
                    world.delete_customer(k)
                    return {"id": body["customer"]}
                if action == "live_step":
                    return {
                        "ids": [x for _ in range(int(body.get("count", 1))) for x in sb.live_step()]
                    }
        except ValueError as exc:
            raise StripeApiError(400, str(exc)) from None
        raise StripeApiError(400, f"unknown action {action!r}", param="action")

    @app.get("/_sandbox/open_invoices", summary="Invoices whose payment failed and are open")
    async def open_invoices() -> JSON:
        return {"data": [world.make_id("invoices", j) for j in world.open_invoices()]}

    @app.post("/_sandbox/webhook_endpoints", summary="Deliver events to an endpoint, signed")
    async def add_endpoint(request: Request) -> JSON:
        body = await request.json()
        ep = WebhookEndpoint(
            url=body["url"],
            secret=body["secret"],
            duplicate_rate=float(body.get("duplicate_rate", 0.0)),
            shuffle_window=int(body.get("shuffle_window", 0)),
            max_attempts=int(body.get("max_attempts", 10)),
            retry_base=float(body.get("retry_base", 0.5)),
        )
        sb.endpoints.append(ep)
        return {"url": ep.url, "endpoints": len(sb.endpoints)}

    @app.delete("/_sandbox/webhook_endpoints", summary="Stop delivering webhooks")
    async def clear_endpoints() -> JSON:
        sb.endpoints.clear()
        return {"endpoints": 0}

    @app.post("/_sandbox/webhooks/flush", summary="Deliver events held for shuffling now")
    async def flush() -> JSON:
        await sb.flush_webhooks()
        return {"ok": True}

    @app.post("/_sandbox/live", summary="Set the live activity rate (actions per second)")
    async def live(request: Request) -> JSON:
        body = await request.json()
        sb.live_rate = float(body.get("rate", 0.0))
        return {"live_rate": sb.live_rate}

    @app.post("/_sandbox/rate_limit", summary="Set the per-endpoint request budget")
    async def set_rate_limit(request: Request) -> JSON:
        body = await request.json()
        sb.limiter = Limiter(body.get("rps"))
        return {"rate_limit": sb.limiter.rps}

    @app.post("/_sandbox/faults", summary="Inject 500s / 429s into a fraction of /v1 requests")
    async def set_faults(request: Request) -> JSON:
        body = await request.json()
        sb.faults = {k: float(v) for k, v in body.items() if k in ("rate_500", "rate_429")}
        sb.fault_rng = random.Random(int(body.get("seed", 0)))
        return {"faults": sb.faults}

    @app.delete("/_sandbox/faults", summary="Turn faults off")
    async def clear_faults() -> JSON:
        sb.faults = {}
        return {"faults": {}}

    return app
