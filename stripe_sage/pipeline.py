"""The main job's stages as plain functions (no Prefect import): tasks wrap them, tests call them.

extract → stage → quality → plan (Polars) → outbox → load. Each stage takes its inputs as
arguments and returns counts for ``ops.runs``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.reconcile import plan_payouts
from stripe_sage.staging import Staging
from stripe_sage.streams import STREAM_ORDER, STREAMS
from stripe_sage.transform import (
    empty_docs,
    periods_frame,
    plan_charges,
    plan_customer_updates,
    plan_customers,
    plan_invoices,
    plan_refunds,
)

# Reference checks: which staged ids a stream's rows must point at.
REFERENCES = {
    "refunds": ("charges",),
    "invoice_lines": ("invoices",),
    "invoice_payments": ("invoices",),
    "disputes": ("charges",),
}


@dataclass
class QualityOutcome:
    rows: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    markdown: str = ""
    docs_path: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


def stage_all(st: Staging, run_id: str, streams: tuple[str, ...] = STREAM_ORDER) -> dict[str, int]:
    return {s: st.stage(s, run_id) for s in streams}


def validate_all(
    st: Staging,
    run_id: str,
    *,
    now: dt.datetime,
    docs_dir: Path | None = None,
    previous_rows: dict[str, int] | None = None,
) -> QualityOutcome:
    """Validate what this run staged; failing rows go to ``staging.quarantine``."""
    from quality.runner import build_data_docs, check_wholesale, render_markdown, validate_stream

    outcome = QualityOutcome()
    validations = []
    for stream in STREAM_ORDER:
        df = st.changed(stream, run_id)
        if df.is_empty():
            continue
        known = {
            ref: st.frame(f"SELECT id FROM staging.{ref}")["id"]
            for ref in REFERENCES.get(stream, ())
        }
        v = validate_stream(stream, df, known_ids=known, now=now, run_id=run_id)
        # The table's size before and after this run: a collapse, not a small increment.
        check_wholesale(
            v,
            previous_rows=(previous_rows or {}).get(stream),
            current_rows=st.count(f"staging.{stream}"),
        )
        st.replace_quarantine(stream, df["id"].to_list(), v.quarantine)
        outcome.rows[stream] = v.rows
        outcome.quarantined[stream] = v.quarantine["id"].n_unique() if v.quarantine.height else 0
        outcome.results.extend({"stream": stream, **r} for r in v.results)
        validations.append(v)
    outcome.markdown = render_markdown(validations) if validations else ""
    if docs_dir is not None and validations:
        path = build_data_docs(validations, docs_dir)
        outcome.docs_path = str(path) if path else None
    return outcome


def _clean(st: Staging, stream: str) -> pl.DataFrame:
    """Staged rows of a stream, without the quarantined ones (never loaded)."""
    return st.frame(
        f"SELECT * FROM staging.{stream} s WHERE NOT EXISTS ("
        "SELECT 1 FROM staging.quarantine q WHERE q.stream = ? AND q.id = s.id)",
        [stream],
    )


def _settled_keys(st: Staging) -> pl.DataFrame:
    """Doc keys that need no planning again: pending, posted, or dead for a Sage reason."""
    return st.frame(
        "SELECT o.doc_key FROM sage.outbox o LEFT JOIN ops.dead_letters d USING (doc_key) "
        "WHERE o.status <> 'dead' OR coalesce(d.error_code, '') <> 'planning'"
    )


def _unsettled(
    df: pl.DataFrame, settled: pl.DataFrame, *keys: str, alternatives: bool = False
) -> pl.DataFrame:
    """Rows whose documents (``keys``, prefixes of doc_key) are not all settled; with
    ``alternatives``, rows none of whose keys is settled (one document in either form)."""
    if df.is_empty():
        return df
    if alternatives:
        done = pl.concat(
            [
                df.select(pl.col("id"), pl.concat_str([pl.lit(p), pl.col("id")]).alias("doc_key"))
                for p in keys
            ]
        )
        done = done.join(settled, on="doc_key", how="semi").select("id").unique()
        return df.join(done, on="id", how="anti")
    need = None
    for prefix in keys:
        k = (
            df.select(pl.col("id"), pl.concat_str([pl.lit(prefix), pl.col("id")]).alias("doc_key"))
            .join(settled, on="doc_key", how="anti")
            .select("id")
        )
        need = k if need is None else pl.concat([need, k])
    assert need is not None
    return df.join(need.unique(), on="id", how="semi")


def plan_documents(
    st: Staging,
    mapping: Mapping,
    periods: list[dict[str, object]],
    *,
    sage_customers: Callable[[], pl.DataFrame] | None = None,
    run_id: str | None = None,
) -> pl.DataFrame:
    """Every Sage document the staged data implies that the outbox does not hold yet.

    ``sage_customers`` lists Sage's customers for email matching (called only when some
    Stripe customer still needs a Sage customer); ``run_id`` selects the customers this run
    changed, whose updates go to Sage."""
    settled = _settled_keys(st)
    new_customers = _unsettled(
        _clean(st, "customers"), settled, "customer:", "customer_link:", alternatives=True
    )
    sage = None
    if (
        sage_customers is not None
        and new_customers.filter(pl.col("sage_customer_id").is_null()).height
    ):
        linked = st.frame(
            "SELECT sage_id AS customer_id, stripe_id AS linked_to FROM sage.xref "
            "WHERE doc_type = 'customer'"
        )
        sage = sage_customers().join(linked, on="customer_id", how="left")
    changed = pl.DataFrame()
    if run_id is not None:
        # Customers this run changed that Sage already has, with what was last sent for them.
        changed = st.frame(
            "SELECT c.*, (SELECT CAST(o.payload AS VARCHAR) FROM sage.outbox o "
            "WHERE o.status = 'posted' AND (o.stripe_id = c.id OR o.stripe_id LIKE c.id || ':%') "
            "AND o.doc_type IN ('customer', 'customer_link', 'customer_update') "
            "ORDER BY o.posted_at DESC LIMIT 1) AS last_sent "
            "FROM staging.customers c JOIN sage.xref x ON x.stripe_id = c.id "
            "AND x.doc_type = 'customer' WHERE c.run_id = ? AND x.run_id <> ?",
            [run_id, run_id],
        )
    pf = periods_frame(periods) if periods else None
    bts = st.table("balance_transactions")
    charges_all = _clean(st, "charges")
    invoice_payments = st.table("invoice_payments")
    frames = [
        plan_customers(new_customers, mapping, sage),
        plan_customer_updates(changed, mapping),
        plan_charges(
            _unsettled(charges_all, settled, "cash_receipt:"), bts, invoice_payments, mapping, pf
        ),
        plan_invoices(
            _unsettled(_clean(st, "invoices"), settled, "invoice:"),
            _clean(st, "invoice_lines"),
            mapping,
            pf,
        ),
        plan_refunds(
            _unsettled(
                _clean(st, "refunds"), settled, "credit_memo:", "journal_entry:refund_failure:"
            ),
            charges_all,
            bts,
            mapping,
            pf,
        ),
        plan_payouts(
            _unsettled(
                _clean(st, "payouts"), settled, "journal_entry:", "journal_entry:payout_failure:"
            ),
            st.table("payout_items"),
            bts,
            mapping,
            pf,
        ),
    ]
    docs = pl.concat([f for f in frames if not f.is_empty()] or [empty_docs()])
    # Keys already settled (e.g. the invoice of a charge whose refund is new) are dropped, and
    # so are records still failing planning the same way: they are dead letters already.
    still_failing = st.frame(
        "SELECT doc_key, reason AS error FROM ops.dead_letters WHERE error_code = 'planning' "
        "AND NOT replayed"
    )
    return docs.join(settled, on="doc_key", how="anti").join(
        still_failing, on=["doc_key", "error"], how="anti"
    )


def plan_payout_documents(
    st: Staging, mapping: Mapping, periods: list[dict[str, object]]
) -> pl.DataFrame:
    """Only the payout journals (the ``reconcile_payouts`` flow)."""
    settled = _settled_keys(st)
    docs = plan_payouts(
        _unsettled(
            _clean(st, "payouts"), settled, "journal_entry:", "journal_entry:payout_failure:"
        ),
        st.table("payout_items"),
        st.table("balance_transactions"),
        mapping,
        periods_frame(periods) if periods else None,
    )
    return docs.join(settled, on="doc_key", how="anti")


def previous_totals(st: Staging) -> dict[str, int]:
    return {s: st.count(f"staging.{s}") for s in STREAMS}


def summary_counts(st: Staging) -> dict[str, Any]:
    """Totals per document type and status, for the run summary and the demo."""
    rows = st.con.execute(
        "SELECT doc_type, status, count(*) FROM sage.outbox GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    out: dict[str, dict[str, int]] = {}
    for doc_type, status, n in rows:
        out.setdefault(doc_type, {})[status] = int(n)
    return out
