"""Payout reconciliation tasks: itemise paid payouts, then report what matched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from stripe_sage.mapping import Mapping
from stripe_sage.plan.outbox import plan_payout_documents, record_flags
from stripe_sage.reconcile import report as reconcile
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from tasks.context import in_run, run_logger


@task(name="itemise-payouts", cache_policy=NO_CACHE)
def itemise_payouts(reader: StripeReader, st: Staging, run_id: str) -> int:
    """Read the account's payout schedule and the transactions of every newly paid
    automatic payout, then stage them."""
    interval = reconcile.read_payout_schedule(reader, st)
    todo = reconcile.payouts_to_itemise(st)
    n = reconcile.itemise_payouts(reader, st, run_id, todo)
    st.stage("balance_transactions", run_id)
    run_logger().info(
        "itemised %d payouts (%d balance transactions); payout schedule: %s",
        len(todo),
        n,
        interval or "unknown",
    )
    return len(todo)


@task(name="plan-payout-journals", cache_policy=NO_CACHE)
def plan_payout_journals(
    st: Staging, mapping: Mapping, periods: list[dict[str, Any]], run_id: str | None = None
) -> pl.DataFrame:
    """Payout, top-up and daily journals; those posting to suspense go to ``ops.flags``."""
    docs = plan_payout_documents(st, mapping, periods)
    flagged = docs.filter(pl.col("flag").is_not_null() & pl.col("error").is_null())
    if flagged.height:
        record_flags(st, flagged, run_id)
    run_logger().info("planned %d payout journals", docs.height)
    return docs


@task(name="reconciliation-report", cache_policy=NO_CACHE)
def reconciliation_report(
    st: Staging, mapping: Mapping, run_id: str, html_path: Path | None
) -> dict[str, Any]:
    rep, clearing, ar = reconcile.build_report(st, mapping, html_path=html_path)
    reconcile.store(st, rep, run_id)
    reconcile.store_ar(st, ar, run_id)
    if rep.height and in_run():
        create_table_artifact(
            key="payout-reconciliation",
            table=rep.select(*reconcile.REPORT_COLUMNS)
            .with_columns(rep["arrival_date"].cast(str))
            .to_dicts(),
            description="Per payout: Σ of its balance transactions vs the Sage journal",
        )
    by_status = dict(rep.group_by("recon_status").len().iter_rows()) if rep.height else {}
    logger = run_logger()
    logger.info("reconciliation: %s", by_status)
    for c in clearing:
        if c["unexplained"]:
            logger.warning(
                "Stripe Clearing %s is off by %d minor units with no unposted "
                "document to explain it",
                c["currency"],
                c["unexplained"],
            )
    from stripe_sage.reconcile.ar import unexplained_messages

    for line in unexplained_messages(ar)[:20]:
        logger.warning("%s (no unposted document explains it)", line)
    balance = reconcile.balance_journals(st)
    suspense = reconcile.suspense_postings(st)
    # This run's suspense postings (the alert names them too); earlier ones stay listed.
    for row in suspense.filter(suspense["run_id"] == run_id).head(20).iter_rows(named=True):
        logger.warning("%s: %s", row["doc_key"], row["flag"])
    return {
        "payouts": by_status,
        # Top-up and daily journals per kind and state; journals with lines in suspense.
        "balance_journals": {
            f"{kind}:{status}": n
            for kind, status, n in balance.group_by("kind", "status")
            .len()
            .sort("kind", "status")
            .iter_rows()
        },
        "suspense": suspense.height,
        "clearing": [{k: v for k, v in c.items() if k != "unposted_documents"} for c in clearing],
        # Per currency: Sage open AR, Stripe open, difference, explained, unexplained.
        "ar": [
            {k: v for k, v in t.items() if k not in ("rows", "customers_unexplained")} for t in ar
        ],
        # Realized FX gain/loss posted, per settlement currency (issue 20).
        "realized_fx": reconcile.realized_fx(st, mapping),
        "html": str(html_path) if html_path else None,
    }
