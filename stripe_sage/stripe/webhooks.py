"""The Stripe webhook receiver: verify, store durably, answer 2xx, then ask Prefect for a run.

The receiver never opens the DuckDB staging file (a running flow may hold it): its inbox
(``stripe_sage/store/inbox.py``) is a small SQLite file in WAL mode with ``synchronous=FULL``,
so an event is on disk before Stripe hears 200. Duplicate event ids are stored once. A
background notifier turns bursts into a handful of Prefect events (``stripe.events.received``,
posted to the server's ``POST /api/events``), which a deployment trigger turns into
``process_stripe_events`` runs. When Prefect is unreachable, events wait in the inbox and the
notifier keeps trying; the scheduled sync drains the inbox too, so nothing is lost.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stripe_sage.store.inbox import Inbox

log = logging.getLogger(__name__)

# Event types the product subscribes to (configure the Stripe endpoint with these).
SUBSCRIBED_PREFIXES = (
    "charge.",
    "refund.",
    "invoice.",
    "invoice_payment.",
    "customer.",
    "payout.",
    "balance.",
    "charge.dispute.",
    "checkout.session.",
)
MAX_BODY = 512 * 1024  # Stripe's events are far smaller; larger bodies are refused (413)
TRIGGER_EVENT = "stripe.events.received"
INBOX_RESOURCE = "stripe-sage.webhook-inbox"


def subscribed(event_type: str) -> bool:
    return event_type.startswith(SUBSCRIBED_PREFIXES)


class Notifier:
    """Debounced Prefect events: at most one per ``batch_seconds`` while events arrive, and
    again every ``retry_seconds`` while the inbox holds unprocessed events (a lost trigger or
    a Prefect outage never strands them)."""

    def __init__(
        self,
        inbox: Inbox,
        prefect_api_url: str | None,
        *,
        batch_seconds: float = 1.0,
        retry_seconds: float = 15.0,
        post: Callable[[str, list[dict[str, Any]]], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.url = prefect_api_url.rstrip("/") if prefect_api_url else None
        self.batch_seconds = batch_seconds
        self.retry_seconds = retry_seconds
        self._post = post or self._post_http
        # One client for the notifier's life: a client per event would build a new TLS
        # context each time (~20 ms of CPU loading the CA bundle), once a second in a burst.
        self._http: httpx.Client | None = None
        self._pending = threading.Event()
        self._stop = threading.Event()
        self.last_sent = 0.0
        self.sent = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="prefect-notifier")

    def start(self) -> None:
        if self.url:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def poke(self) -> None:
        self._pending.set()

    def _post_http(self, url: str, events: list[dict[str, Any]]) -> None:
        if self._http is None:
            self._http = httpx.Client(timeout=5)
        self._http.post(f"{url}/events", json=events).raise_for_status()

    def _run(self) -> None:
        try:
            self._notify_until_stopped()
        finally:
            if self._http is not None:
                self._http.close()

    def _notify_until_stopped(self) -> None:
        assert self.url is not None
        while not self._stop.wait(0.1):
            now = time.monotonic()
            due = self._pending.is_set() and now - self.last_sent >= self.batch_seconds
            stale = (
                now - self.last_sent >= self.retry_seconds
                and self.inbox.counts()["unprocessed"] > 0
            )
            if not (due or stale):
                continue
            self._pending.clear()
            event = {
                "id": str(uuid.uuid4()),
                "occurred": dt.datetime.now(dt.UTC).isoformat(),
                "event": TRIGGER_EVENT,
                "resource": {
                    "prefect.resource.id": INBOX_RESOURCE,
                    "prefect.resource.name": "Stripe webhook inbox",
                },
                "payload": self.inbox.counts(),
            }
            try:
                self._post(self.url, [event])
                self.sent += 1
                self.last_sent = now
            except Exception as exc:  # Prefect down: keep the flag, try again shortly
                self.failures += 1
                self._pending.set()
                self.last_sent = now  # pace retries at batch_seconds
                log.warning(
                    "could not reach Prefect to trigger a run (%s); events stay in the inbox",
                    type(exc).__name__,
                )


MAX_ID_LENGTH = 255  # Stripe's ids are far shorter; longer ones are not Stripe's
MAX_CREATED = 2**53  # a Unix time in seconds beyond any real one (and within SQLite's range)


def event_problem(event: Any) -> str | None:
    """Why a parsed body cannot be stored as a Stripe event (``None``: it can). The inbox
    and the processor read ``id``, ``type``, ``created`` and ``data.object``'s ``id`` and
    ``object``; each must have Stripe's type, so a bad body is refused with a reason
    instead of failing later."""
    if not isinstance(event, dict):
        return f"the body is a JSON {type(event).__name__}, not an object"
    for key in ("id", "type"):
        value = event.get(key)
        if not isinstance(value, str) or not value:
            return f"'{key}' must be a non-empty string"
        if len(value) > MAX_ID_LENGTH:
            return f"'{key}' is longer than {MAX_ID_LENGTH} characters"
    created = event.get("created")
    if created is not None and (
        isinstance(created, bool) or not isinstance(created, int) or not 0 <= created < MAX_CREATED
    ):
        return "'created' must be a Unix time in seconds"
    data = event.get("data")
    if not isinstance(data, dict):
        return "'data' must be an object"
    obj = data.get("object")
    if not isinstance(obj, dict):
        return "'data.object' must be an object"
    for key in ("id", "object"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_LENGTH):
            return f"'data.object.{key}' must be a string of at most {MAX_ID_LENGTH} characters"
    return None


def create_receiver(
    inbox: Inbox,
    secrets: Sequence[str],
    *,
    notifier: Notifier | None = None,
    tolerance: int = 300,
    path: str = "/stripe/webhook",
) -> Starlette:
    """The ASGI app. ``secrets``: the endpoint's signing secrets (two while one rotates)."""
    if not secrets:
        raise ValueError("a webhook receiver needs at least one signing secret")

    def verify(payload: bytes, header: str) -> None:
        last: Exception | None = None
        for secret in secrets:
            try:
                stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
                return
            except stripe.SignatureVerificationError as exc:
                last = exc
        assert last is not None
        raise last

    def refuse(status: int, reason: str) -> JSONResponse:
        log.warning("webhook refused (%d): %s", status, reason)
        return JSONResponse({"error": reason}, status_code=status)

    async def receive(request: Request) -> JSONResponse:
        length = request.headers.get("content-length", "")
        if length and not length.isdigit():
            return refuse(400, "Content-Length is not a number")
        if length and int(length) > MAX_BODY:
            return refuse(413, "body too large")
        payload = await request.body()
        if len(payload) > MAX_BODY:
            return refuse(413, "body too large")
        header = request.headers.get("stripe-signature")
        if not header:
            return refuse(400, "missing Stripe-Signature header")
        try:
            verify(payload, header)
        except stripe.SignatureVerificationError as exc:
            # The reason (bad signature, no v1, too old) without the secret or the header.
            log.warning("webhook refused: %s", str(exc).split(":")[0][:120])
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        except UnicodeDecodeError:  # the signature is over the UTF-8 text of the body
            return refuse(400, "body is not valid JSON (not UTF-8)")
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python goes
            return refuse(400, "body is not valid JSON")
        problem = event_problem(event)
        if problem is not None:
            # Signed by Stripe's secret yet not an event we can store: say why, store nothing.
            return refuse(400, f"not a Stripe event: {problem}")
        if not subscribed(event["type"]):
            return JSONResponse(
                {
                    "received": True,
                    "stored": False,
                    "reason": f"event type {event['type']} is not subscribed",
                }
            )
        try:
            new = inbox.store(event, payload)
        except sqlite3.Error as exc:
            # Not the sender's fault: 503 makes Stripe deliver it again later.
            log.error("webhook inbox unavailable: %s", type(exc).__name__)
            return JSONResponse({"error": "inbox unavailable, retry later"}, status_code=503)
        if notifier is not None:
            notifier.poke()
        return JSONResponse({"received": True, "stored": new, "duplicate": not new})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, **inbox.counts()})

    return Starlette(
        routes=[Route(path, receive, methods=["POST"]), Route("/healthz", health, methods=["GET"])]
    )


def events_by_stream(
    rows: list[dict[str, Any]],
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, dict[str, Any]]]]:
    """Route inbox events to the streams whose objects they changed (object id → type), and
    set apart the echoes of our own metadata write-backs (object id → metadata values)."""
    from stripe_sage.stripe.extract import writeback_echo
    from stripe_sage.stripe.streams import OBJECT_TO_STREAM

    changed: dict[str, dict[str, str]] = {}
    echoes: dict[str, dict[str, dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r["created"] or 0):
        stream = OBJECT_TO_STREAM.get(r["object_type"] or "")
        patch = writeback_echo(json.loads(r["payload"])) if r.get("payload") else None
        if patch is not None and stream and r["object_id"]:
            echoes.setdefault(stream, {}).setdefault(r["object_id"], {}).update(patch)
            continue
        if stream and r["object_id"]:
            changed.setdefault(stream, {})[r["object_id"]] = r["type"]
        if r["object_type"] == "invoice" and r["type"] in (
            "invoice.paid",
            "invoice.payment_succeeded",
        ):
            changed.setdefault("invoice_payments", {})["invoice:" + r["object_id"]] = r["type"]
    return changed, echoes
