"""Webhook-triggered runs: drain the inbox into staging, then post just what changed."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.lifecycle import flow_run
from flows.stages import run_stages
from stripe_sage.settings import Settings
from stripe_sage.store.inbox import Inbox


@flow(name="process_stripe_events", log_prints=True)
def process_stripe_events(trigger: str = "webhook") -> dict[str, Any]:
    """Triggered by the receiver's ``stripe.events.received`` Prefect event. Every object an
    event names is re-fetched from Stripe, staged, validated, planned and loaded through the
    same exactly-once outbox as the scheduled sync; the events are marked processed only
    after that, so a crashed run leaves them for the next one."""
    settings = Settings()  # a flow run is an entry point: resolved once, passed down
    inbox = Inbox(settings.webhook_inbox)
    if not inbox.unprocessed(1):
        return {"events": 0, "status": "nothing to do"}
    with flow_run(settings, flow="process_stripe_events", trigger=trigger) as run:
        # A webhook run is a handful of objects: no volume comparison with the last run.
        return run_stages(run.context, run, inbox=inbox, previous_rows={})
