"""Planning into the outbox: the staged rows still to plan, slice by slice (rows the outbox
has not settled, not quarantined, in the batch's scope); for each slice, the rows its
documents need, read by the family's selection beside its planner (e.g.
``cash_receipts.select_inputs``), turned into Sage documents by that planner, and enqueued
before the next slice is read. No Prefect import: the ``plan`` task wraps it, tests call it."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan import cash_receipts, credit_memos, customers, invoices, orders
from stripe_sage.plan.after_posting import (
    BALANCE_PREFIX,
    VOID_PREFIX,
    WRITE_OFF_PREFIX,
    plan_credit_balances,
    plan_credit_notes,
    plan_invoice_closures,
)
from stripe_sage.plan.cash_receipts import RECOVERY_PREFIX, REPLACED_WAITS, plan_charges
from stripe_sage.plan.credit_memos import plan_refunds
from stripe_sage.plan.customers import (
    plan_customer_updates,
    plan_customers,
    plan_guest_customer,
)
from stripe_sage.plan.documents import empty_docs, periods_frame
from stripe_sage.plan.invoices import plan_invoices
from stripe_sage.plan.items import plan_default_item, plan_items
from stripe_sage.plan.orders import plan_order_items, plan_orders
from stripe_sage.plan.scope import SCOPE_TABLE, build_scope, in_scope
from stripe_sage.reconcile.report import (
    TOPUP_CATEGORIES,
    daily_recognition_sql,
    plan_daily_journals,
    plan_payouts,
    plan_topups,
)
from stripe_sage.store.staging import SETTLED_DOCUMENTS, Staging, not_quarantined, now_utc

# -- planning ------------------------------------------------------------------------------
# Planning reads the staged rows in slices (keyset on id) and hands each slice's documents
# to the outbox before reading the next: one frame of every document of a 1M-charge first
# run is ~2M JSON payloads (6 GiB); a slice reads only the rows its documents need.
PLAN_SLICE_ROWS = 25_000
PAYOUT_SLICE = 20  # payouts carry all their balance transactions (~3,000 a day at 1M/year)

# Doc keys that need no planning again: pending, posted, blocked, or dead for a Sage reason
# (a waiting document is planned again by every run until what it waits for exists).
_SETTLED = SETTLED_DOCUMENTS


def _todo(stream: str, *prefixes: str, alternatives: bool = False, scoped: bool = False) -> str:
    """SQL condition on ``s`` (a row of ``staging.<stream>``): not quarantined, and some of
    its documents (``prefixes`` of doc_key) not settled; with ``alternatives``, none of them
    settled (one document in either form); ``scoped``: in the batch's scope (plan/scope.py)."""
    settled = [
        f"EXISTS (SELECT 1 FROM _settled k WHERE k.doc_key = '{p}' || s.id)" for p in prefixes
    ]
    joined = (" OR " if alternatives else " AND ").join(settled)
    return f"{not_quarantined(stream)} AND NOT ({joined}){in_scope(scoped)}"


def _rows_to_plan(st: Staging, stream: str, todo: str, size: int) -> Iterator[pl.DataFrame]:
    """The rows of ``staging.<stream>`` matching ``todo``, ``size`` at a time, by id."""
    after: str | None = None  # not "": an empty id is still a row to plan
    while True:
        rows = st.frame(
            f"WITH _settled AS ({_SETTLED}) SELECT s.* FROM staging.{stream} s "
            f"WHERE {todo} AND (? IS NULL OR s.id > ?) ORDER BY s.id LIMIT {size}",
            [after, after],
        )
        if rows.is_empty():
            return
        yield rows
        if rows.height < size:
            return
        after = rows["id"][-1]


def _document_slices(
    st: Staging,
    mapping: Mapping,
    periods: list[dict[str, object]],
    *,
    sage_customers: Callable[[], pl.DataFrame] | None,
    run_id: str | None,
    slice_rows: int,
    customer_exists: Callable[[str], bool] | None = None,
    sales_orders: Callable[[list[str]], set[str]] | None = None,
    scoped: bool = False,
) -> Iterator[pl.DataFrame]:
    """The documents the staged data implies, a slice at a time (before the final check
    against the outbox, see :func:`plan_slices`). For each slice of rows still to plan, the
    family's selection beside its planner (``cash_receipts.select_inputs``, …) reads the
    rows its documents need (balance transactions, charges, lines, items), then its planner
    turns them into documents."""
    columns = customers.customer_columns()
    new_customers = st.frame(
        f"WITH _settled AS ({_SETTLED}) SELECT {columns} FROM staging.customers s WHERE "
        + _todo("customers", "customer:", "customer_link:", alternatives=True, scoped=scoped)
    )
    sage = customers.select_sage_customers(st, new_customers, sage_customers)
    if not new_customers.is_empty():  # (each planner costs ~10 ms even on no rows)
        yield plan_customers(new_customers, mapping, sage)
    del new_customers
    gid = mapping.charges.guest_customer_id
    if gid and not customers.guest_planned(st, gid) and customers.guest_needed(st):
        in_sage = customer_exists(gid) if customer_exists is not None else False
        yield plan_guest_customer(mapping, in_sage)
    if run_id is not None:
        changed = customers.select_changed(st, run_id)
        if not changed.is_empty():
            yield plan_customer_updates(changed, mapping)
    yield from _item_documents(st, mapping, scoped)
    pf = periods_frame(periods) if periods else None

    yield from _order_documents(st, mapping, pf, slice_rows, scoped)

    known_orders: set[str] = set()  # ERP order ids Sage has (asked once each per run)
    asked: set[str] = set()
    read_until = cash_receipts.sessions_read_until(st)
    for charges in _rows_to_plan(
        st,
        "charges",
        # One document or the other: a charge paying a written-off invoice is a recovery.
        _todo("charges", "cash_receipt:", RECOVERY_PREFIX, alternatives=True, scoped=scoped),
        slice_rows,
    ):
        ci = cash_receipts.select_inputs(st, charges, mapping, read_until)
        known: set[str] | None = None  # (None: not checked)
        if sales_orders is not None:
            ids = sorted(set(ci.charges["erp_order_id"].drop_nulls().to_list()) - asked)
            if ids:
                known_orders |= sales_orders(ids)
                asked.update(ids)
            known = known_orders
        yield plan_charges(
            ci.charges,
            ci.bts,
            ci.invoice_payments,
            mapping,
            pf,
            known,
            written_off=ci.written_off,
            payment_shares=ci.payment_shares,
        )

    tax_rates = st.table("tax_rates")  # a handful of rows: the Sage tax codes come from them
    for rows in _rows_to_plan(
        st, "invoices", _todo("invoices", "invoice:", scoped=scoped), slice_rows
    ):
        ii = invoices.select_inputs(st, rows)
        yield plan_invoices(rows, ii.lines, mapping, pf, tax_rates, ii.settlements)

    yield from _after_posting_documents(st, mapping, pf, tax_rates, slice_rows, scoped)

    refunds_todo = _todo(
        "refunds",
        "credit_memo:",
        "journal_entry:refund_failure:",
        "journal_entry:refund_fx:",
        scoped=scoped,
    )
    for refunds in _rows_to_plan(st, "refunds", refunds_todo, slice_rows):
        ri = credit_memos.select_inputs(st, refunds)
        yield plan_refunds(
            refunds,
            ri.charges,
            ri.bts,
            mapping,
            pf,
            ri.charge_refunds,
            ri.credited,
            ri.refunded_invoices,
        )

    yield from _payout_documents(st, mapping, pf, scoped)


def _after_posting_documents(
    st: Staging,
    mapping: Mapping,
    pf: pl.DataFrame | None,
    tax_rates: pl.DataFrame,
    slice_rows: int,
    scoped: bool = False,
) -> Iterator[pl.DataFrame]:
    """Issue 19: credit notes, the memos of voided and written-off invoices, and of credit
    balances invoices used."""
    for notes in _rows_to_plan(
        st, "credit_notes", _todo("credit_notes", "credit_memo:", scoped=scoped), slice_rows
    ):
        yield plan_credit_notes(notes, mapping, pf, tax_rates)
    closing = (
        f"{not_quarantined('invoices')} AND ("
        "(s.status = 'void' AND NOT EXISTS (SELECT 1 FROM _settled k "
        f"WHERE k.doc_key = 'credit_memo:{VOID_PREFIX}' || s.id)) OR "
        # Written off, even if Stripe collected it later (then a recovery journal follows).
        "(s.marked_uncollectible_at IS NOT NULL AND s.status IN ('uncollectible', 'paid') "
        "AND NOT EXISTS (SELECT 1 FROM _settled k "
        f"WHERE k.doc_key = 'credit_memo:{WRITE_OFF_PREFIX}' || s.id))){in_scope(scoped)}"
    )
    for rows in _rows_to_plan(st, "invoices", closing, slice_rows):
        yield plan_invoice_closures(rows, mapping, pf, tax_rates)
    # A credit-balance memo reads its invoice's row only: in scope when the invoice is.
    credit_used = (
        f"{not_quarantined('invoices')} AND s.ending_balance - s.starting_balance > 0 "
        "AND NOT EXISTS (SELECT 1 FROM _settled k "
        f"WHERE k.doc_key = 'credit_memo:{BALANCE_PREFIX}' || s.id){in_scope(scoped)}"
    )
    for rows in _rows_to_plan(st, "invoices", credit_used, slice_rows):
        yield plan_credit_balances(rows, mapping, pf)


def _order_documents(
    st: Staging, mapping: Mapping, pf: pl.DataFrame | None, slice_rows: int, scoped: bool = False
) -> Iterator[pl.DataFrame]:
    """Completed goods Checkout Sessions → sales order + invoice (plan/orders.py), with the
    shipping and discount items they name planned first."""
    if not mapping.orders.enabled:
        return
    todo = (
        _todo("checkout_sessions", "sales_order:", "invoice:", scoped=scoped)
        + " AND s.mode = 'payment' AND NOT coalesce(s.invoice_creation, false)"
        + " AND s.status = 'complete'"
    )
    first = True
    for sessions in _rows_to_plan(st, "checkout_sessions", todo, slice_rows):
        if first:
            yield plan_order_items(mapping)
            first = False
        yield plan_orders(sessions, orders.select_inputs(st, sessions), mapping, pf)


def _item_documents(st: Staging, mapping: Mapping, scoped: bool = False) -> Iterator[pl.DataFrame]:
    """The Sage items lines will name: the default item, then one per staged product whose
    item is not settled (posted under either form), before any document that names them."""
    yield plan_default_item(mapping)
    products = st.frame(
        f"WITH _settled AS ({_SETTLED}) SELECT s.* FROM staging.products s WHERE "
        + _todo("products", "item:", "item_link:", alternatives=True, scoped=scoped)
    )
    if not products.is_empty():
        yield plan_items(products, mapping)


def _payout_documents(
    st: Staging, mapping: Mapping, pf: pl.DataFrame | None, scoped: bool = False
) -> Iterator[pl.DataFrame]:
    todo = _todo("payouts", "journal_entry:", "journal_entry:payout_failure:", scoped=scoped)
    for payouts in _rows_to_plan(st, "payouts", todo, PAYOUT_SLICE):
        with st.registered("_plan_slice", payouts.select("id", "failure_balance_transaction")):
            items = st.frame(
                "SELECT i.* FROM staging.payout_items i "
                "WHERE i.payout IN (SELECT id FROM _plan_slice)"
            )
            bts = st.frame(
                "SELECT b.* FROM staging.balance_transactions b WHERE b.id IN ("
                "SELECT i.balance_transaction FROM staging.payout_items i "
                "WHERE i.payout IN (SELECT id FROM _plan_slice) "
                "UNION ALL SELECT failure_balance_transaction FROM _plan_slice)"
            )
        yield plan_payouts(payouts, items, bts, mapping, pf)
    yield from _balance_documents(st, mapping, pf, scoped=scoped)


def _balance_documents(
    st: Staging,
    mapping: Mapping,
    pf: pl.DataFrame | None,
    today: dt.date | None = None,
    scoped: bool = False,
) -> Iterator[pl.DataFrame]:
    """Top-up journals, and the daily journals of the fees and adjustments no automatic
    payout recognises: on an account paid out only manually every day's, on one with
    automatic payouts those of the days a manual (or instant) payout swept transactions
    from (docs/accounting.md, section 6)."""
    topups = st.frame(
        f"WITH _settled AS ({_SETTLED}) SELECT s.* FROM staging.balance_transactions s "
        "WHERE s.reporting_category IN (SELECT unnest(?::VARCHAR[])) AND "
        + not_quarantined("balance_transactions")
        + " AND NOT EXISTS (SELECT 1 FROM _settled k WHERE k.doc_key = "
        "'journal_entry:' || s.reporting_category || ':' || coalesce(s.source, s.id))"
        + in_scope(scoped),
        [list(TOPUP_CATEGORIES)],
    )
    yield plan_topups(topups, mapping, pf)
    today = today or dt.datetime.now(dt.UTC).date()
    # Transactions no automatic payout recognises, of days whose journal is not settled
    # (a day is planned once it has ended, with all its transactions staged).
    unitemised = st.frame(
        f"WITH _settled AS ({_SETTLED}) SELECT s.* FROM staging.balance_transactions s "
        f"WHERE {daily_recognition_sql(st.payouts_manual_only(), 's')} AND "
        + not_quarantined("balance_transactions")
        + " AND CAST(timezone('UTC', s.created) AS DATE) < ? "
        "AND NOT EXISTS (SELECT 1 FROM _settled k WHERE k.doc_key = 'journal_entry:stripe_day:' "
        "|| upper(s.currency) || ':' || CAST(CAST(timezone('UTC', s.created) AS DATE) AS VARCHAR))",
        [today],
    )
    if not unitemised.is_empty():
        yield plan_daily_journals(unitemised, mapping, today, pf)


def _without_settled(st: Staging, docs: pl.DataFrame) -> pl.DataFrame:
    """``docs`` minus the keys the outbox has settled (e.g. the invoice of a charge whose
    refund is new)."""
    with st.registered("_plan_keys", docs.select("doc_key")):
        settled = st.frame(
            f"SELECT doc_key FROM ({_SETTLED}) WHERE doc_key IN (SELECT doc_key FROM _plan_keys)"
        )
    return docs.join(settled, on="doc_key", how="anti")


def plan_slices(
    st: Staging,
    mapping: Mapping,
    periods: list[dict[str, object]],
    *,
    sage_customers: Callable[[], pl.DataFrame] | None = None,
    run_id: str | None = None,
    slice_rows: int = PLAN_SLICE_ROWS,
    customer_exists: Callable[[str], bool] | None = None,
    sales_orders: Callable[[list[str]], set[str]] | None = None,
    scope_run_id: str | None = None,
    scope_excludes_run: str | None = None,
) -> Iterator[pl.DataFrame]:
    """Every Sage document the staged data implies that the outbox does not hold yet, as
    frames of at most a slice's documents (customers first, then charges, invoices, refunds
    and payouts). Enqueue each frame before asking for the next: the slices that follow
    skip what the outbox holds.

    ``sage_customers`` lists Sage's customers for email matching (called only when some
    Stripe customer still needs a Sage customer); ``run_id`` selects the customers this run
    changed, whose updates go to Sage; ``customer_exists`` says whether Sage has a customer
    id (the guest customer is linked, not created, when it does); ``sales_orders`` returns
    which of the given ERP order ids Sage has (the others post on account). Without them
    (previews, tests) the guest customer is created and every ERP order taken as known.
    ``scope_run_id``: plan only what that run (a micro-batch) staged and what depends on it
    (plan/scope.py); the same documents as the full plan gives for them.
    ``scope_excludes_run``: a sync in progress whose staged rows quality has not checked yet
    (a micro-batch it serves): those rows stay out of the scope, and a batch that would need
    a full plan plans nothing (the sync's own plan covers it)."""
    scoped = scope_run_id is not None and build_scope(st, scope_run_id)
    if scope_run_id is not None and scope_excludes_run is not None:
        if not scoped:
            return
        st.drop_from_scope(SCOPE_TABLE, scope_excludes_run)
    # Records still failing planning the same way are dead letters already.
    still_failing = st.frame(
        "SELECT doc_key, reason AS error FROM ops.dead_letters WHERE error_code = 'planning' "
        "AND NOT replayed"
    )
    for docs in _document_slices(
        st,
        mapping,
        periods,
        sage_customers=sage_customers,
        run_id=run_id,
        slice_rows=slice_rows,
        customer_exists=customer_exists,
        sales_orders=sales_orders,
        scoped=scoped,
    ):
        if docs.is_empty():
            continue
        docs = _without_settled(st, docs).join(still_failing, on=["doc_key", "error"], how="anti")
        if not docs.is_empty():
            yield docs


def plan_documents(
    st: Staging,
    mapping: Mapping,
    periods: list[dict[str, object]],
    *,
    sage_customers: Callable[[], pl.DataFrame] | None = None,
    run_id: str | None = None,
    customer_exists: Callable[[str], bool] | None = None,
    sales_orders: Callable[[list[str]], set[str]] | None = None,
    scope_run_id: str | None = None,
) -> pl.DataFrame:
    """All of :func:`plan_slices` in one frame (previews and tests; runs enqueue slice by
    slice with :func:`plan_into_outbox`)."""
    frames = list(
        plan_slices(
            st,
            mapping,
            periods,
            sage_customers=sage_customers,
            run_id=run_id,
            customer_exists=customer_exists,
            sales_orders=sales_orders,
            scope_run_id=scope_run_id,
        )
    )
    return pl.concat(frames) if frames else empty_docs()


@dataclass
class PlanTotals:
    planned: dict[str, int] = field(default_factory=dict)  # doc_type → documents planned
    errors: int = 0  # planned documents that failed planning (dead letters)
    flagged: int = 0  # planned documents posted as planned but flagged for a person
    enqueued: int = 0  # rows the outbox took
    enqueue_seconds: float = 0.0  # of the planning time, what the outbox inserts took
    superseded: list[str] = field(default_factory=list)  # waiting rows another plan replaced

    def as_dict(self) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "planned_errors": self.errors,
            "flagged": self.flagged,
            "enqueued": self.enqueued,
            "enqueue_seconds": round(self.enqueue_seconds, 3),
            "superseded": self.superseded,
        }


def plan_into_outbox(
    st: Staging,
    mapping: Mapping,
    periods: list[dict[str, object]],
    enqueue: Callable[[pl.DataFrame], int] | None,
    *,
    sage_customers: Callable[[], pl.DataFrame] | None = None,
    run_id: str | None = None,
    slice_rows: int = PLAN_SLICE_ROWS,
    customer_exists: Callable[[str], bool] | None = None,
    sales_orders: Callable[[list[str]], set[str]] | None = None,
    scope_run_id: str | None = None,
    scope_excludes_run: str | None = None,
    between: Callable[[], None] | None = None,
) -> PlanTotals:
    """Plan slice by slice, each slice into the outbox (``enqueue``) before the next is read;
    with ``enqueue=None`` (a dry run) only count. Memory is one slice's documents. Flagged
    documents are recorded in ``ops.flags`` for a person to list. ``scope_run_id``: see
    :func:`plan_slices`."""
    totals = PlanTotals()
    for docs in plan_slices(
        st,
        mapping,
        periods,
        sage_customers=sage_customers,
        run_id=run_id,
        slice_rows=slice_rows,
        customer_exists=customer_exists,
        sales_orders=sales_orders,
        scope_run_id=scope_run_id,
        scope_excludes_run=scope_excludes_run,
    ):
        for doc_type, n in docs.group_by("doc_type").len().iter_rows():
            totals.planned[doc_type] = totals.planned.get(doc_type, 0) + n
        totals.errors += int(docs["error"].is_not_null().sum())
        flagged = docs.filter(pl.col("flag").is_not_null() & pl.col("error").is_null())
        totals.flagged += flagged.height
        if enqueue is not None:
            t = time.perf_counter()
            totals.enqueued += enqueue(docs)
            if flagged.height:
                record_flags(st, flagged, run_id)
            totals.enqueue_seconds += time.perf_counter() - t
        if between is not None:
            # Between two slices nothing of the plan is open (each slice is read by keyset
            # into memory): a sync serves webhook events here.
            between()
    if enqueue is not None:
        for waiting_prefix, replacement_prefix in REPLACED_WAITS:
            totals.superseded += st.drop_waits_replaced(waiting_prefix, replacement_prefix)
    return totals


def record_flags(st: Staging, flagged: pl.DataFrame, run_id: str | None) -> None:
    """``ops.flags``: documents posted as planned that a person should look at (``SELECT *
    FROM ops.flags``), one row per document, kept when it posts."""
    rows = flagged.select(
        "doc_key",
        "doc_type",
        "stripe_id",
        "flag",
        pl.lit(now_utc()).alias("flagged_at"),
        pl.lit(run_id, pl.String).alias("run_id"),
    )
    st.write_flags(rows)


def plan_payout_documents(
    st: Staging, mapping: Mapping, periods: list[dict[str, object]]
) -> pl.DataFrame:
    """Only the payout journals (the ``reconcile_payouts`` flow)."""
    pf = periods_frame(periods) if periods else None
    frames = [
        _without_settled(st, docs)
        for docs in _payout_documents(st, mapping, pf)
        if not docs.is_empty()
    ]
    return pl.concat(frames) if frames else empty_docs()
