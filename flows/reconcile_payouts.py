"""Payout reconciliation on its own (daily): journals for paid and failed payouts, the report."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from prefect import flow, runtime

from stripe_sage.settings import Settings
from tasks.reconcile import itemise_payouts, plan_payout_journals, reconciliation_report
from tasks.sage import enqueue, fiscal_periods, load
from tasks.staging import stage
from tasks.stripe import extract_events, extract_stream
from tasks.writer import open_run

STREAMS = ("payouts", "balance_transactions")


@flow(name="reconcile_payouts", log_prints=True)
def reconcile_payouts(trigger: str = "manual") -> dict[str, Any]:
    """Read new payouts and balance transactions, itemise each paid payout, post one journal
    per payout (and a reversal for a failed one), and publish the reconciliation report."""
    settings = Settings()
    prefect_id = runtime.flow_run.id
    run_id = str(prefect_id or uuid.uuid4())
    with open_run(settings, run_id) as ctx:
        st = ctx.staging
        st.start_run(run_id, flow="reconcile_payouts", prefect_run_id=prefect_id, trigger=trigger)
        counts: dict[str, Any] = {"writer_slot": ctx.writer_slot}
        try:
            for stream in STREAMS:
                extract_stream(ctx.extractor, stream)
            counts["events"] = extract_events(ctx.extractor, ("payouts",))
            stage(st, run_id)
            counts["payouts_itemised"] = itemise_payouts(ctx.reader, st, run_id)
            docs = plan_payout_journals(st, ctx.mapping, fiscal_periods(ctx.sage))
            enqueue(ctx.loader, docs)
            counts["load"] = load(ctx.loader)
            counts["reconciliation"] = reconciliation_report(
                st, ctx.mapping, run_id, Path(settings.staging_db).parent / "reconciliation.html"
            )
            st.finish_run(run_id, status="completed", counts=counts)
            return counts
        except BaseException as exc:
            st.finish_run(run_id, status="failed", counts=counts, error=str(exc)[:2000])
            raise
