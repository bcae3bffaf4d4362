"""Webhook inbox tasks: re-fetch what the received events say changed, mark them processed."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from stripe_sage.store.inbox import Inbox
from stripe_sage.stripe.extract import Extractor
from stripe_sage.stripe.webhooks import events_by_stream
from tasks.context import run_logger


@task(name="drain-inbox", cache_policy=NO_CACHE)
def drain_inbox(
    extractor: Extractor, inbox: Inbox, limit: int = 20_000, recheck_waits: bool = False
) -> list[str]:
    """Re-fetch every object the unprocessed events name (from Stripe, never from the event
    payload: an out-of-order or old-version payload can never overwrite newer state).
    ``recheck_waits``: also retrieve again the charges whose balance transaction Stripe had
    not created yet. Returns the event ids to mark processed once the run has committed its
    documents."""
    if recheck_waits:
        n = extractor.refetch_charges_waiting_for_balance_transactions()
        run_logger().info("re-fetched %d charges waiting for their balance transaction", n)
    rows = inbox.unprocessed(limit)
    if not rows:
        return []
    changed, echoes = events_by_stream(rows)
    extractor.claim_echoes(echoes, changed)
    counts = extractor.refetch_changed(changed, source="webhook")
    counts["write_back_echoes"] = extractor.apply_echoes(echoes, changed)
    counts["customers_referenced"] = extractor.fetch_missing_customers()
    counts["balance_transactions_referenced"] = extractor.fetch_missing_balance_transactions()
    # A charge's webhook may come before its checkout.session.completed: its session is
    # asked for by payment intent, so the charge never posts as a standalone sale.
    counts["checkout_sessions_of_charges"] = extractor.fetch_checkout_sessions_of_charges()
    run_logger().info("inbox: %d events, re-fetched %s", len(rows), counts)
    return [r["event_id"] for r in rows]


@task(name="mark-inbox-processed", cache_policy=NO_CACHE)
def mark_processed(inbox: Inbox, event_ids: list[str], run_id: str) -> dict[str, Any]:
    if event_ids:
        inbox.mark_processed(event_ids, run_id)
    return inbox.counts()
