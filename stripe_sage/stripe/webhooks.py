"""The Stripe webhook receiver: verify, store durably, answer 2xx, then ask Prefect for a run.

The receiver never opens the DuckDB staging file (a running flow may hold it): its inbox is a
small SQLite file in WAL mode with ``synchronous=FULL``, so an event is on disk before Stripe
hears 200. Duplicate event ids are stored once. A background notifier turns bursts into a
handful of Prefect events (``stripe.events.received``, posted to the server's
``POST /api/events``), which a deployment trigger turns into ``process_stripe_events`` runs.
When Prefect is unreachable, events wait in the inbox and the notifier keeps trying; the
scheduled sync drains the inbox too, so nothing is lost.
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
from pathlib import Path
from typing import Any

import httpx
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from stripe_sage.store.schema import INBOX_DDL

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


class Inbox:
    """The receiver's own durable store (SQLite, WAL); flows drain it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(INBOX_DDL)  # stripe_sage/store/schema.py
        con.commit()

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")  # on disk before we answer 200
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    def store(self, event: dict[str, Any], payload: bytes) -> bool:
        """True when new; a duplicate id only bumps a counter."""
        obj = event.get("data", {}).get("object", {}) or {}
        con = self._con()
        cur = con.execute(
            "INSERT OR IGNORE INTO inbox (event_id, type, object_type, object_id, created, "
            "received_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event["id"],
                event["type"],
                obj.get("object"),
                obj.get("id"),
                event.get("created"),
                dt.datetime.now(dt.UTC).isoformat(),
                payload.decode(),
            ),
        )
        if cur.rowcount == 0:
            con.execute(
                "UPDATE inbox SET duplicates = duplicates + 1 WHERE event_id = ?", (event["id"],)
            )
            return False
        return True

    def unprocessed(self, limit: int = 10_000) -> list[dict[str, Any]]:
        rows = (
            self._con()
            .execute(
                "SELECT event_id, type, object_type, object_id, created, payload FROM inbox "
                "WHERE processed_at IS NULL ORDER BY created, event_id LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [
            dict(
                zip(
                    ("event_id", "type", "object_type", "object_id", "created", "payload"),
                    r,
                    strict=True,
                )
            )
            for r in rows
        ]

    def mark_processed(self, event_ids: Sequence[str], run_id: str) -> None:
        con = self._con()
        now = dt.datetime.now(dt.UTC).isoformat()
        con.execute("BEGIN")
        con.executemany(
            "UPDATE inbox SET processed_at = ?, run_id = ? WHERE event_id = ?",
            [(now, run_id, e) for e in event_ids],
        )
        con.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        total, pending, dupes = (
            self._con()
            .execute(
                "SELECT count(*), count(*) FILTER (WHERE processed_at IS NULL), "
                "coalesce(sum(duplicates), 0) FROM inbox"
            )
            .fetchone()
        )
        return {"stored": total, "unprocessed": pending, "duplicates_ignored": dupes}


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

    @staticmethod
    def _post_http(url: str, events: list[dict[str, Any]]) -> None:
        httpx.post(f"{url}/events", json=events, timeout=5).raise_for_status()

    def _run(self) -> None:
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

    def verify(payload: bytes, header: str) -> dict[str, Any]:
        last: Exception | None = None
        for secret in secrets:
            try:
                event = stripe.Webhook.construct_event(payload, header, secret, tolerance)
                return event.to_dict()
            except stripe.SignatureVerificationError as exc:
                last = exc
        assert last is not None
        raise last

    async def receive(request: Request) -> JSONResponse:
        length = request.headers.get("content-length")
        if length and int(length) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        payload = await request.body()
        if len(payload) > MAX_BODY:
            return JSONResponse({"error": "body too large"}, status_code=413)
        header = request.headers.get("stripe-signature")
        if not header:
            log.warning("webhook refused: no Stripe-Signature header")
            return JSONResponse({"error": "missing Stripe-Signature header"}, status_code=400)
        try:
            event = verify(payload, header)
        except stripe.SignatureVerificationError as exc:
            # The reason (bad signature, no v1, too old) without the secret or the header.
            log.warning("webhook refused: %s", str(exc).split(":")[0][:120])
            return JSONResponse({"error": "invalid signature"}, status_code=400)
        except ValueError:
            log.warning("webhook refused: body is not JSON")
            return JSONResponse({"error": "body is not valid JSON"}, status_code=400)
        if not isinstance(event.get("id"), str) or not isinstance(event.get("type"), str):
            return JSONResponse({"error": "not a Stripe event"}, status_code=400)
        if not subscribed(event["type"]):
            return JSONResponse(
                {
                    "received": True,
                    "stored": False,
                    "reason": f"event type {event['type']} is not subscribed",
                }
            )
        new = inbox.store(event, payload)
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
