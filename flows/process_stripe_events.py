"""Webhook-triggered runs: drain the inbox into staging, then post just what changed."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, runtime

from stripe_sage.settings import Settings
from stripe_sage.stripe.webhooks import Inbox
from tasks.inbox import drain_inbox, mark_processed
from tasks.reconcile import itemise_payouts, reconciliation_report
from tasks.sage import fiscal_periods, load, plan, write_back_task
from tasks.staging import publish_snapshot, quality, stage
from tasks.writer import open_run


@flow(name="process_stripe_events", log_prints=True)
def process_stripe_events(trigger: str = "webhook") -> dict[str, Any]:
    """Triggered by the receiver's ``stripe.events.received`` Prefect event. Every object an
    event names is re-fetched from Stripe, staged, validated, planned and loaded through the
    same exactly-once outbox as the scheduled sync; the events are marked processed only
    after that, so a crashed run leaves them for the next one."""
    settings = Settings()
    inbox = Inbox(settings.webhook_inbox)
    if not inbox.unprocessed(1):
        return {"events": 0, "status": "nothing to do"}
    prefect_id = runtime.flow_run.id
    run_id = str(prefect_id or uuid.uuid4())
    t0 = time.perf_counter()
    with open_run(settings, run_id) as ctx:
        st = ctx.staging
        st.start_run(
            run_id, flow="process_stripe_events", prefect_run_id=prefect_id, trigger=trigger
        )
        counts: dict[str, Any] = {"writer_slot": ctx.writer_slot}
        try:
            event_ids = drain_inbox(ctx.extractor, inbox)
            counts["events"] = len(event_ids)
            previous: dict[str, int] = {}
            counts["staged"] = stage(st, run_id)
            counts["payouts_itemised"] = itemise_payouts(ctx.reader, st, run_id)
            q = quality(st, run_id, previous, Path(settings.staging_db).parent / "data_docs")
            counts["quarantined"] = q.quarantined
            plan(st, ctx.loader, ctx.mapping, fiscal_periods(ctx.sage), ctx.sage, run_id)
            counts["load"] = load(ctx.loader)
            counts["write_back"] = write_back_task(ctx.reader, st, run_id)
            counts["inbox"] = mark_processed(inbox, event_ids, run_id)
            counts["reconciliation"] = reconciliation_report(
                st, ctx.mapping, run_id, Path(settings.staging_db).parent / "reconciliation.html"
            )
            counts["snapshot"] = publish_snapshot(
                st, Path(settings.staging_db).parent / "snapshot", run_id
            )
            counts["seconds"] = round(time.perf_counter() - t0, 3)
            st.finish_run(run_id, status="completed", counts=counts)
            return counts
        except BaseException as exc:
            st.finish_run(run_id, status="failed", counts=counts, error=str(exc)[:2000])
            raise
