"""Stripe charges → Sage cash receipts: where a Stripe charge becomes a Sage cash receipt
(``plan_charges``).

A succeeded, captured charge becomes a cash receipt in the settlement currency, applied to
the invoice it paid: the Stripe Billing invoice's, a Checkout order's, or else its own Sage
invoice (or sales order and invoice), planned here too. A charge that paid a written-off
invoice becomes a recovery journal instead of a receipt; a payment of a foreign-currency
invoice also a Realized FX journal. ``select_inputs`` reads what a slice of charges is
planned from.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.after_posting import WRITE_OFF_PREFIX
from stripe_sage.plan.customers import guest_customer_key
from stripe_sage.plan.documents import (
    _docs,
    _fx_journals,
    apply_rules,
    empty_docs,
    first_error,
    join_errors,
    journal_line,
    journal_payload,
    local_date,
    money_string,
    presentment,
    with_settlement,
)
from stripe_sage.plan.fx import PAYMENT_SHARE_SCHEMA, invoice_payment_shares
from stripe_sage.plan.invoices import paying_charges
from stripe_sage.plan.item_codes import default_item_key
from stripe_sage.plan.orders import link_charges_to_sessions
from stripe_sage.store.staging import Staging

# A charge that paid a written-off invoice posts this journal instead of its receipt.
RECOVERY_PREFIX = "journal_entry:recovery:"
# (waiting doc-key prefix, the prefix of the document that replaces it): a receipt that
# waited (say for its balance transaction) while the invoice's write-off was not staged yet
# is replaced by the recovery journal once it is, and must not wait for ever.
REPLACED_WAITS = (("cash_receipt:", RECOVERY_PREFIX),)


def captured(df: pl.DataFrame) -> pl.Expr:
    """Money exists: the charge was captured. An authorization not captured yet plans
    nothing (it is planned when a later run sees it captured); one that expired or was
    released stays uncaptured and plans nothing ever. Rows staged before the column
    existed (null) were captured: Stripe gave them a balance transaction."""
    if "captured" not in df.columns:
        return pl.lit(True)
    return pl.col("captured").fill_null(True)


def classify_charges(charges: pl.DataFrame, invoice_payments: pl.DataFrame) -> pl.DataFrame:
    """Succeeded, captured charges, each with the Stripe invoice it paid (if any)."""
    paid = charges.filter((pl.col("status") == "succeeded") & pl.col("paid") & captured(charges))
    links = (
        invoice_payments.filter(pl.col("status") == "paid")
        .select(pl.col("charge").alias("id"), pl.col("invoice").alias("paid_invoice"))
        .unique(subset="id")
    )
    return paid.join(links, on="id", how="left")


def plan_charges(
    charges: pl.DataFrame,
    bts: pl.DataFrame,
    invoice_payments: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    known_orders: Iterable[str] | None = None,
    *,
    written_off: pl.DataFrame | None = None,
    payment_shares: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Each succeeded, captured charge → a Sage invoice (or its ERP sales order's invoice) +
    a cash receipt applied to it; a charge that paid a Stripe Billing invoice → just the
    receipt, applied to that invoice's Sage document. Amounts in the settlement currency.

    A charge that paid (part of) an invoice in a currency that is not a settlement currency
    (``payment_shares``: ``fx.invoice_payment_shares``) receipts its share of the invoice at
    the rate the invoice was booked at, and a journal moves what Stripe settled beyond that
    share between Stripe Clearing and Realized FX gain/loss — clearing still moves by exactly
    the charge's ``bt.amount`` and the invoice is left with nothing open once fully paid.

    A charge without a Stripe customer posts to the mapping's guest customer. With
    ``known_orders`` (the ``metadata.erp_order_id`` values Sage has a sales order for), a
    charge naming an order Sage does not have posts its receipt on account (no invoice, no
    ``apply_to``) and is flagged (``charges.unknown_erp_order: on_account``), or is a planning
    error (``reject``); ``None`` means not checked (every order taken as known).

    A charge that paid an invoice after it was written off (``written_off``: ``id``,
    ``marked_uncollectible_at`` of such invoices) is a recovery: no receipt (the invoice's
    balance is gone), a journal Stripe Clearing Dr / Bad Debt Cr for what Stripe collected
    (``journal_entry:recovery:<ch_…>``), after the write-off memo."""
    df = classify_charges(charges, invoice_payments)
    if df.is_empty():
        return empty_docs()
    if written_off is not None and not written_off.is_empty():
        df = df.join(
            written_off.select(
                pl.col("id").alias("paid_invoice"),
                pl.col("marked_uncollectible_at").alias("_written_off_at"),
            ),
            on="paid_invoice",
            how="left",
        ).with_columns(
            (
                pl.col("_written_off_at").is_not_null()
                & (pl.col("_written_off_at") <= pl.col("created"))
            )
            .fill_null(False)
            .alias("_recovery")
        )
    else:
        df = df.with_columns(pl.lit(False).alias("_recovery"))
    # Checkout (plan/orders.py): the goods session a charge paid (only its receipt posts,
    # applied to the order's invoice), or why it waits for one. Absent: neither.
    for col in ("order_session", "session_wait"):
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias(col))
    df = with_settlement(df, bts, "balance_transaction").with_columns(
        presentment(pl.col("amount"), pl.col("currency"), pl.col("exchange_rate")).alias(
            "presentment"
        ),
        local_date(pl.col("created"), mapping.timezone).alias("doc_date"),
    )
    # A payment of a foreign-currency invoice: its share of the invoice at the booking rate.
    shares = (
        payment_shares if payment_shares is not None else pl.DataFrame(schema=PAYMENT_SHARE_SCHEMA)
    ).select(pl.col("charge").alias("id"), "invoice_share", "booking_currency", "share_wait")
    pays_foreign_invoice = (
        pl.col("paid_invoice").is_not_null()
        & ~pl.col("currency").str.to_uppercase().is_in(mapping.settlement_currencies)
        & pl.lit(payment_shares is not None)
    )
    df = df.join(shares, on="id", how="left").with_columns(
        pays_foreign_invoice.alias("_fx_payment"),
        pl.when(pays_foreign_invoice)
        .then(pl.col("invoice_share"))
        .otherwise(pl.col("settlement_amount"))
        .alias("receipt_amount"),
    )
    tz_clearing = mapping.accounts.clearing
    guest = mapping.charges.guest_customer_id
    df = apply_rules(
        df,
        {
            **{f"inv_{k}": v for k, v in mapping.charges.invoice.items()},
            **{f"rcp_{k}": v for k, v in mapping.charges.receipt.items()},
        },
        "",
    )
    guest_key = guest_customer_key(mapping)
    customer_key = (
        pl.when(pl.col("customer").is_not_null())
        .then(pl.concat_str([pl.lit("customer:"), pl.col("customer")]))
        .otherwise(pl.lit(guest_key, pl.String))
    )
    customer_ref = pl.concat_str([pl.lit("@xref:"), customer_key])
    erp = pl.col("erp_order_id").is_not_null()
    if known_orders is None:
        unknown_order = pl.lit(False)
    else:
        unknown_order = erp & ~pl.col("erp_order_id").is_in(sorted(set(known_orders)))
    on_account = unknown_order & pl.lit(mapping.charges.unknown_erp_order == "on_account")
    settle = money_string(pl.col("receipt_amount"), pl.col("settlement_currency"))
    missing = first_error(
        pl.col("session_wait"),
        # A succeeded charge before Stripe created its balance transaction: no amount to
        # post yet. It waits (the next run plans it again), never a POST with null money.
        pl.when(pl.col("balance_transaction").is_null()).then(
            pl.format("waiting: waiting for the balance transaction of {}", pl.col("id"))
        ),
        pl.when(pl.col("settlement_amount").is_null()).then(
            pl.format(
                "waiting: balance transaction {} of the charge is not staged",
                pl.col("balance_transaction"),
            )
        ),
        pl.when(~pl.col("settlement_currency").is_in(mapping.settlement_currencies)).then(
            pl.format(
                "settlement currency {} is not in the mapping's settlement_currencies",
                pl.col("settlement_currency"),
            )
        ),
        pl.when(pl.col("_fx_payment") & pl.col("invoice_share").is_null()).then(
            pl.coalesce(
                pl.col("share_wait"),
                pl.format(
                    "waiting: the payments of invoice {} are not staged", pl.col("paid_invoice")
                ),
            )
        ),
        pl.when(
            pl.col("_fx_payment") & (pl.col("booking_currency") != pl.col("settlement_currency"))
        ).then(
            pl.format(
                "charge settled in {} but invoice {} is booked in {}: a payment of an invoice "
                "settles in the invoice's settlement currency",
                pl.col("settlement_currency"),
                pl.col("paid_invoice"),
                pl.col("booking_currency"),
            )
        ),
        pl.when(pl.col("customer").is_null() & pl.lit(guest is None)).then(
            pl.lit("charge has no customer and the mapping sets no charges.guest_customer_id")
        ),
        pl.when(unknown_order & ~on_account).then(
            pl.format(
                "metadata.erp_order_id {}: Sage has no such sales order "
                "(charges.unknown_erp_order: reject)",
                pl.col("erp_order_id"),
            )
        ),
        join_errors(),
    )
    df = df.with_columns(
        missing.alias("error"),
        customer_ref.alias("customer_ref"),
        customer_key.alias("customer_key"),
        pl.col("settlement_currency")
        .replace_strict(tz_clearing, default=None)
        .alias("clearing_account"),
        on_account.alias("_on_account"),
    )
    base_deps = (
        pl.when(pl.col("customer_key").is_not_null())
        .then(pl.concat_list([pl.col("customer_key")]))
        .otherwise(pl.lit([], pl.List(pl.String)))
    )

    own = df.filter(
        pl.col("paid_invoice").is_null()
        & ~pl.col("_on_account")
        & pl.col("order_session").is_null()
        & pl.col("session_wait").is_null()
    )
    as_order = mapping.charges.document == "sales_order_and_invoice"
    item, item_deps = _charge_item(mapping)
    line = pl.struct(
        item.alias("item"),
        pl.col("inv_description").alias("description"),
        pl.lit("1").alias("quantity"),
        settle.alias("unit_price"),
    )
    order_key = pl.concat_str([pl.lit("sales_order:"), pl.col("id")])
    invoice_key = pl.concat_str([pl.lit("invoice:"), pl.col("id")])
    frames = []
    if as_order:
        orders = own.filter(~erp).with_columns(
            pl.lit("sales_order").alias("doc_type"),
            pl.struct(
                pl.col("customer_ref").alias("customer_id"),
                pl.col("doc_date").cast(pl.String).alias("order_date"),
                pl.col("settlement_currency").alias("currency"),
                pl.col("id").alias("reference"),
                pl.concat_list([line]).alias("lines"),
            ).alias("payload"),
            pl.concat_list([base_deps, item_deps]).alias("depends_on"),
        )
        frames.append(orders)
    invoices = own.with_columns(
        pl.lit("invoice").alias("doc_type"),
        pl.struct(
            pl.col("customer_ref").alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("invoice_date"),
            pl.col("doc_date").cast(pl.String).alias("due_date"),
            pl.col("settlement_currency").alias("currency"),
            pl.col("id").alias("reference"),
            pl.when(erp)
            .then(pl.col("erp_order_id"))
            .otherwise(
                pl.concat_str([pl.lit("@xref:"), order_key])
                if as_order
                else pl.lit(None, pl.String)
            )
            .alias("sales_order_no"),
            pl.concat_list([line]).alias("lines"),
            money_string(pl.lit(0), pl.col("settlement_currency")).alias("tax_amount"),
            settle.alias("total"),
        ).alias("payload"),
        (
            pl.concat_list(
                [
                    base_deps,
                    item_deps,
                    pl.when(~erp)
                    .then(pl.concat_list([order_key]))
                    .otherwise(pl.lit([], pl.List(pl.String))),
                ]
            )
            if as_order
            else pl.concat_list([base_deps, item_deps])
        ).alias("depends_on"),
    )
    frames.append(invoices)
    applied_key = (
        pl.when(pl.col("paid_invoice").is_not_null())
        .then(pl.concat_str([pl.lit("invoice:"), pl.col("paid_invoice")]))
        .when(pl.col("order_session").is_not_null())
        .then(pl.concat_str([pl.lit("invoice:"), pl.col("order_session")]))
        .otherwise(invoice_key)
    )
    applied = pl.concat_list(
        [
            pl.struct(
                pl.concat_str([pl.lit("@xref:"), applied_key]).alias("invoice_no"),
                settle.alias("amount"),
            )
        ]
    )
    flag = pl.when(pl.col("_on_account")).then(
        pl.format(
            "unlinked: Sage has no sales order {} (metadata.erp_order_id); receipt on account",
            pl.col("erp_order_id"),
        )
    )
    # A flagged receipt says so in its memo, where the person applying it in Sage looks.
    memo = (
        pl.when(pl.col("_on_account"))
        .then(
            pl.concat_str(
                [pl.lit("UNLINKED SO "), pl.col("erp_order_id"), pl.lit(" "), pl.col("rcp_memo")]
            ).str.slice(0, 60)
        )
        .otherwise(pl.col("rcp_memo"))
    )
    recoveries = df.filter(pl.col("_recovery"))
    if not recoveries.is_empty():
        frames.append(_recovery_journals(recoveries, base_deps, mapping))
    receipts = df.filter(~pl.col("_recovery")).with_columns(
        pl.lit("cash_receipt").alias("doc_type"),
        pl.struct(
            pl.col("customer_ref").alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("receipt_date"),
            settle.alias("amount"),
            pl.col("settlement_currency").alias("currency"),
            pl.col("rcp_payment_method").alias("payment_method"),
            pl.col("id").alias("reference"),
            pl.col("clearing_account").alias("deposit_account"),
            pl.when(pl.col("_on_account"))
            .then(applied.list.slice(0, 0))
            .otherwise(applied)
            .alias("apply_to"),
            memo.alias("memo"),
        ).alias("payload"),
        pl.when(pl.col("_on_account"))
        .then(base_deps)
        .otherwise(pl.concat_list([base_deps, pl.concat_list([applied_key])]))
        .alias("depends_on"),
        flag.alias("flag"),
    )
    frames.append(receipts)
    return pl.concat(
        [
            *(
                _docs(
                    f, mapping, periods, key_col="stripe_key" if "stripe_key" in f.columns else "id"
                )
                for f in frames
            ),
            _payment_fx_journals(df, mapping, periods),
        ]
    )


def _recovery_journals(df: pl.DataFrame, base_deps: pl.Expr, mapping: Mapping) -> pl.DataFrame:
    """Charges that collected a written-off invoice: Stripe Clearing Dr / Bad Debt Cr for the
    charge's settled amount (ACCOUNTING.md: a recovery journal, not a receipt), dated the
    charge's day, reference the charge; after the invoice's write-off memo (phase 4)."""
    cur = pl.col("settlement_currency")
    amount = pl.col("settlement_amount")
    desc = pl.format("Recovery of written-off invoice {} by {}", pl.col("paid_invoice"), "id")
    return df.with_columns(
        pl.lit("journal_entry").alias("doc_type"),
        pl.lit(4).alias("phase"),
        pl.concat_str([pl.lit("recovery:"), pl.col("id")]).alias("stripe_key"),
        journal_payload(
            mapping,
            pl.col("doc_date"),
            desc.str.slice(0, 60),
            pl.col("id"),
            cur,
            pl.concat_list(
                [
                    journal_line(pl.col("clearing_account"), amount, cur, desc.str.slice(0, 60)),
                    journal_line(
                        pl.lit(mapping.accounts.bad_debt), -amount, cur, desc.str.slice(0, 60)
                    ),
                ]
            ),
        ).alias("payload"),
        pl.concat_list(
            [
                base_deps,
                pl.concat_list(
                    [pl.concat_str([pl.lit(f"credit_memo:{WRITE_OFF_PREFIX}"), "paid_invoice"])]
                ),
            ]
        ).alias("depends_on"),
    )


def _payment_fx_journals(
    df: pl.DataFrame, mapping: Mapping, periods: pl.DataFrame | None
) -> pl.DataFrame:
    """Realized FX on a later payment of a foreign-currency invoice: its receipt applied its
    share of the invoice at the booking rate; this moves what Stripe settled beyond that
    share (its ``bt.amount`` − share) between Stripe Clearing and FX gain/loss — a gain when
    the payment settled more, a loss when less. A payment at the booking rate (an invoice's
    first) needs none."""
    fx = df.filter(
        pl.col("_fx_payment")
        & pl.col("error").is_null()
        & (pl.col("settlement_amount") != pl.col("receipt_amount"))
    )
    if fx.is_empty():
        return empty_docs()
    # Sage allows 60 characters: the charge names its invoice (Stripe's invoice_payments).
    # Its balance transaction is the reference: the charge id is its receipt's.
    return _fx_journals(
        fx,
        mapping,
        periods,
        kind="payment_fx",
        desc=pl.concat_str([pl.lit("Realized FX on payment "), pl.col("id")]),
        clearing=pl.col("clearing_account"),
        gain=pl.col("settlement_amount") - pl.col("receipt_amount"),
    )


def _charge_item(mapping: Mapping) -> tuple[pl.Expr, pl.Expr]:
    """(the item a charge's line names, the item documents it waits for): the mapping's
    ``charges.invoice.item`` rule when it sets one (that item must exist in Sage), else the
    default item, which the product plans (``item:default:<code>``) and posts first."""
    if "item" in mapping.charges.invoice:
        return pl.col("inv_item"), pl.lit([], pl.List(pl.String))
    return pl.lit(mapping.items.default_item), pl.lit([default_item_key(mapping)])


# -- selection: the staged rows a slice of charges is planned from ------------------------
@dataclass(frozen=True)
class ChargeInputs:
    """What ``plan_charges`` plans one slice of charges from."""

    charges: pl.DataFrame  # the slice, linked to its Checkout sessions (plan/orders.py)
    bts: pl.DataFrame  # the charges' balance transactions
    invoice_payments: pl.DataFrame  # the charges' invoice payments
    written_off: pl.DataFrame  # the invoices they paid that were written off first
    payment_shares: pl.DataFrame  # their shares of foreign-currency invoices (plan/fx.py)


def sessions_read_until(st: Staging) -> dt.datetime | None:
    """How far the ``checkout_sessions`` stream has been listed (its created cursor): every
    session created before it is staged, with the events read in the same run."""
    state = st.sync_state("checkout_sessions") or {}
    cursor = state.get("created_cursor")
    return None if cursor is None else dt.datetime.fromtimestamp(int(cursor), dt.UTC)


def select_inputs(
    st: Staging,
    charges: pl.DataFrame,
    mapping: Mapping,
    read_until: dt.datetime | None,
) -> ChargeInputs:
    """The staged rows a slice of ``charges`` is planned from, read while the slice is
    registered as ``_plan_slice``; ``read_until``: :func:`sessions_read_until`, read once
    per plan."""
    with st.registered(
        "_plan_slice", charges.select("id", "balance_transaction", "payment_intent", "created")
    ):
        bts = st.frame(
            "SELECT b.* FROM staging.balance_transactions b "
            "WHERE b.id IN (SELECT balance_transaction FROM _plan_slice)"
        )
        invoice_payments = st.frame(
            "SELECT p.* FROM staging.invoice_payments p "
            "WHERE p.charge IN (SELECT id FROM _plan_slice)"
        )
        # Every payment of the invoices these charges paid, with its charge and what
        # Stripe settled: a part of a foreign-currency invoice receipts its share at the
        # rate the invoice was booked at (plan/fx.py).
        all_payments = st.frame(
            "SELECT p.* FROM staging.invoice_payments p WHERE p.invoice IN "
            "(SELECT invoice FROM staging.invoice_payments "
            "WHERE charge IN (SELECT id FROM _plan_slice))"
        )
        paying, paying_bts = paying_charges(st, all_payments)
        # Quarantined sessions too: their charge's receipt is then blocked by the
        # order's missing invoice (named), never posted as a second, standalone sale.
        sessions = st.frame(
            "SELECT payment_intent, id AS session, status AS session_status, "
            "(mode = 'payment' AND NOT coalesce(invoice_creation, false)) AS session_goods "
            "FROM staging.checkout_sessions "
            "WHERE payment_intent IN (SELECT payment_intent FROM _plan_slice)"
        )
        looked_up = st.frame(
            "SELECT payment_intent FROM staging.checkout_lookups "
            "WHERE payment_intent IN (SELECT payment_intent FROM _plan_slice)"
        )
        # Sessions still open when these charges were made (plan/orders.py): one may
        # complete with a charge of this slice after sessions were read.
        open_sessions = st.frame(
            "SELECT id AS open_session, created AS open_created "
            "FROM staging.checkout_sessions WHERE status = 'open' AND mode = 'payment' "
            "AND created <= (SELECT max(created) FROM _plan_slice) "
            "AND created >= (SELECT min(created) FROM _plan_slice) - INTERVAL 1 DAY"
        )
        # Invoices these charges paid that were written off first: a recovery, not a
        # receipt (issue 19).
        written_off = st.frame(
            "SELECT id, marked_uncollectible_at FROM staging.invoices "
            "WHERE marked_uncollectible_at IS NOT NULL AND id IN (SELECT p.invoice FROM "
            "staging.invoice_payments p WHERE p.charge IN (SELECT id FROM _plan_slice))"
        )
    return ChargeInputs(
        charges=link_charges_to_sessions(
            charges, sessions, looked_up, read_until, mapping, open_sessions
        ),
        bts=bts,
        invoice_payments=invoice_payments,
        written_off=written_off,
        payment_shares=invoice_payment_shares(all_payments, paying, paying_bts),
    )
