"""Payout reconciliation on its own (daily): journals for paid and failed payouts, the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.lifecycle import flow_run
from stripe_sage.settings import Settings
from tasks.reconcile import itemise_payouts, plan_payout_journals, reconciliation_report
from tasks.sage import enqueue, fiscal_periods, load
from tasks.staging import stage
from tasks.stripe import extract_events, extract_stream

STREAMS = ("payouts", "balance_transactions")


@flow(name="reconcile_payouts", log_prints=True)
def reconcile_payouts(trigger: str = "manual") -> dict[str, Any]:
    """Read new payouts and balance transactions, itemise each paid payout, post one journal
    per payout (and a reversal for a failed one), and publish the reconciliation report."""
    settings = Settings()  # a flow run is an entry point: resolved once, passed down
    with flow_run(settings, flow="reconcile_payouts", trigger=trigger) as run:
        ctx, st, counts = run.context, run.context.staging, run.counts
        for stream in STREAMS:
            extract_stream(ctx.extractor, stream)
        counts["events"] = extract_events(ctx.extractor, ("payouts",))
        stage(st, run.run_id)
        counts["payouts_itemised"] = itemise_payouts(ctx.reader, st, run.run_id)
        docs = plan_payout_journals(st, ctx.mapping, fiscal_periods(ctx.sage), run.run_id)
        enqueue(ctx.loader, docs)
        counts["load"] = load(ctx.loader)
        counts["reconciliation"] = reconciliation_report(
            st, ctx.mapping, run.run_id, Path(settings.staging_db).parent / "reconciliation.html"
        )
        return counts
