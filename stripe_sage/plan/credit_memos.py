"""Stripe refunds → Sage credit memos (``plan_refunds``).

Every refund that moved money becomes a credit memo against Stripe Clearing; a refund that
later failed also a journal entry reversing it; a refund of a foreign-currency sale also a
Realized FX journal for what it cost beyond the sale. The memos of an invoice's later life
(credit notes, voids, write-offs, credit balances) are in ``after_posting``.
``select_inputs`` reads what a slice of refunds is planned from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.cash_receipts import captured
from stripe_sage.plan.customers import guest_customer_key
from stripe_sage.plan.documents import (
    JOURNAL_LINE,
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
from stripe_sage.store.staging import Staging, not_quarantined


def refunded_invoices(invoice_payments: pl.DataFrame, invoices: pl.DataFrame) -> pl.DataFrame:
    """Per charge that paid a Stripe invoice (a paid invoice payment): the invoice and its
    Stripe number (null until staged), for the reason of a refund of that charge."""
    paid = invoice_payments.filter(pl.col("status") == "paid").select("charge", "invoice")
    numbers = invoices.select(
        pl.col("id").alias("invoice"), pl.col("number").alias("invoice_number")
    )
    return (
        paid.join(numbers, on="invoice", how="left")
        .sort("charge", "invoice")
        .unique(subset="charge", keep="first", maintain_order=True)
    )


def plan_refunds(
    refunds: pl.DataFrame,
    charges: pl.DataFrame,
    bts: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    charge_refunds: pl.DataFrame | None = None,
    credited_refunds: Sequence[str] = (),
    refunded_invoices: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Every refund that moved money → a credit memo against Stripe Clearing; a refund that
    later failed → also a journal entry reversing it (Dr Clearing, Cr Sales Returns).

    A refund of an invoice payment without a credit note is such a memo too (the invoice
    stays paid, as in Stripe); its reason names the invoice, by its Stripe number (else its
    id): ``refunded_invoices`` (``refunded_invoices()``: charge → invoice, number).

    A refund of a foreign-currency sale reverses the sale at the charge's own rate (the memo)
    and a journal moves the rest of what it cost at the refund's rate between Stripe Clearing
    and Realized FX gain/loss (docs/accounting.md, "Foreign currency, first class").
    ``charge_refunds``: every staged refund of the same charges (earlier ones may be posted
    already); the default is ``refunds`` itself. ``credited_refunds``: refunds a credit note
    names (issue 19): they post through that note's memo only, never a second time."""
    df = refunds.filter(
        pl.col("balance_transaction").is_not_null() & ~pl.col("id").is_in(sorted(credited_refunds))
    )
    if df.is_empty():
        return empty_docs()
    ch = with_settlement(
        charges.select(
            "id",
            "customer",
            "amount",
            "currency",
            "balance_transaction",
            captured(charges).alias("_charge_captured"),
        ).rename({"id": "charge", "customer": "charge_customer"}),
        bts,
        "balance_transaction",
    ).select(
        "charge",
        "charge_customer",
        "_charge_captured",
        pl.col("amount").alias("charge_amount"),
        pl.col("currency").alias("charge_currency"),
        pl.col("settlement_amount").alias("charge_settled"),
    )
    siblings = (charge_refunds if charge_refunds is not None else refunds).filter(
        pl.col("balance_transaction").is_not_null()
    )
    sale = refund_sale_amounts(siblings, ch)
    df = (
        df.join(ch.with_columns(pl.lit(True).alias("_charge_found")), on="charge", how="left")
        .join(sale, on="id", how="left")
        .filter(
            # Releasing an authorization that was never captured refunds no money.
            pl.col("_charge_captured").fill_null(True)
        )
    )
    if df.is_empty():
        return empty_docs()
    guest_key = guest_customer_key(mapping)
    df = with_settlement(df, bts, "balance_transaction", sign=-1).with_columns(
        presentment(pl.col("amount"), pl.col("currency"), pl.col("exchange_rate")).alias(
            "presentment"
        ),
        local_date(pl.col("created"), mapping.timezone).alias("doc_date"),
        # A refund of a guest charge credits the guest customer the charge was posted to.
        pl.when(pl.col("charge_customer").is_not_null())
        .then(pl.concat_str([pl.lit("customer:"), pl.col("charge_customer")]))
        .otherwise(pl.lit(guest_key, pl.String))
        .alias("customer_key"),
    )
    # A sale in another currency than it settled in: the memo reverses it at the charge's
    # rate, the FX journal takes the difference (a tiny refund whose share rounds to nothing
    # stays whole in the memo).
    fx = (pl.col("charge_currency") != pl.col("settlement_currency")) & (
        pl.col("sale_amount").fill_null(0) > 0
    )
    df = df.with_columns(
        fx.fill_null(False).alias("_fx"),
        pl.when(fx)
        .then(pl.col("sale_amount"))
        .otherwise(pl.col("settlement_amount"))
        .alias("memo_amount"),
    ).with_columns(
        (pl.col("settlement_amount") - pl.col("memo_amount")).alias("fx_difference"),
    )
    df = apply_rules(df, mapping.refunds.credit_memo, "m_")
    clearing = pl.col("settlement_currency").replace_strict(mapping.accounts.clearing, default=None)
    error = first_error(
        pl.when(pl.col("_charge_found").is_null()).then(
            pl.format("waiting: refund's charge {} is not staged", pl.col("charge"))
        ),
        pl.when(
            pl.col("_charge_found")
            & pl.col("charge_settled").is_null()
            & (pl.col("charge_currency") != pl.col("settlement_currency"))
        ).then(
            pl.format(
                "waiting: the balance transaction of the refund's charge {} is not staged "
                "(its rate converts the sale back)",
                pl.col("charge"),
            )
        ),
        pl.when(pl.col("customer_key").is_null()).then(
            pl.format(
                "refund's charge {} has no customer to credit and the mapping sets no "
                "charges.guest_customer_id",
                pl.col("charge"),
            )
        ),
        pl.when(pl.col("settlement_amount").is_null()).then(
            pl.format(
                "waiting: balance transaction {} of the refund is not staged",
                pl.col("balance_transaction"),
            )
        ),
        join_errors(),
    )
    settle = money_string(pl.col("memo_amount"), pl.col("settlement_currency"))
    df = df.with_columns(error.alias("error"))
    if refunded_invoices is None or refunded_invoices.is_empty():
        df = df.with_columns(pl.lit(None, pl.String).alias("_invoice_name"))
    else:
        names = refunded_invoices.select(
            "charge", pl.coalesce("invoice_number", "invoice").alias("_invoice_name")
        ).unique(subset="charge", keep="first", maintain_order=True)
        df = df.join(names, on="charge", how="left")
    # The invoice's name is never cut off: what is before it is shortened to fit 60.
    invoice_part = pl.concat_str([pl.lit(", invoice "), pl.col("_invoice_name")])
    said = pl.concat_str([pl.col("m_reason"), pl.lit(" "), pl.col("presentment")])
    reason = (
        pl.when(pl.col("_invoice_name").is_not_null())
        .then(
            pl.concat_str(
                [said.str.slice(0, pl.lit(60) - invoice_part.str.len_chars()), invoice_part]
            )
        )
        .otherwise(said)
        .str.slice(0, 60)
    )
    memos = df.with_columns(
        pl.lit("credit_memo").alias("doc_type"),
        pl.struct(
            pl.concat_str([pl.lit("@xref:"), pl.col("customer_key")]).alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("memo_date"),
            settle.alias("amount"),
            pl.col("settlement_currency").alias("currency"),
            pl.col("id").alias("reference"),
            reason.alias("reason"),
            clearing.alias("gl_account"),
        ).alias("payload"),
        pl.concat_list([pl.col("customer_key")]).alias("depends_on"),
    )
    failed = df.filter(pl.col("failure_balance_transaction").is_not_null())
    frames = [_docs(memos, mapping, periods), _refund_fx_journals(df, mapping, periods)]
    if not failed.is_empty():
        fb = bts.select(
            pl.col("id").alias("failure_balance_transaction"),
            pl.col("amount").alias("failure_amount"),
            local_date(pl.col("created"), mapping.timezone).alias("failure_date"),
        )
        failed = failed.join(fb, on="failure_balance_transaction", how="left")
        cur = pl.col("settlement_currency")
        desc = pl.concat_str([pl.lit("Refund failed "), pl.col("id")])
        # The money came back: clearing gets what the failure returned, Sales Returns loses
        # what the memo booked, and FX gain/loss takes back any difference between the two.
        back = pl.col("failure_amount") - pl.col("memo_amount")
        journals = failed.with_columns(
            pl.lit("journal_entry").alias("doc_type"),
            pl.concat_str([pl.lit("refund_failure:"), pl.col("id")]).alias("stripe_key"),
            journal_payload(
                mapping,
                pl.col("failure_date"),
                desc,
                pl.col("id"),
                cur,
                pl.concat_list(
                    [
                        journal_line(clearing, pl.col("failure_amount"), cur, desc),
                        journal_line(
                            pl.lit(mapping.accounts.sales_returns),
                            -pl.col("memo_amount"),
                            cur,
                            desc,
                        ),
                    ]
                ).list.concat(
                    pl.when(back != 0)
                    .then(
                        pl.concat_list(
                            [journal_line(pl.lit(mapping.accounts.fx_gain_loss), -back, cur, desc)]
                        )
                    )
                    .otherwise(pl.lit([], pl.List(JOURNAL_LINE)))
                ),
            ).alias("payload"),
            pl.lit([], pl.List(pl.String)).alias("depends_on"),
            first_error(
                pl.when(pl.col("failure_amount").is_null()).then(
                    pl.format(
                        "waiting: failure balance transaction {} is not staged",
                        pl.col("failure_balance_transaction"),
                    )
                )
            ).alias("error"),
        )
        frames.append(
            _docs(
                journals.with_columns(pl.col("failure_date").alias("doc_date")),
                mapping,
                periods,
                key_col="stripe_key",
            )
        )
    return pl.concat(frames)


def refund_sale_amounts(refunds: pl.DataFrame, charges: pl.DataFrame) -> pl.DataFrame:
    """``id`` → ``sale_amount``: the part of its charge's settled gross each refund reverses,
    at the charge's own rate, in settlement minor units. Cumulative, so the refunds of one
    charge add up to exactly its settled gross once it is fully refunded (the last partial
    refund takes the rounding remainder): share(n) = round(Σ refunded to n × settled / amount)
    − round(Σ refunded before n × settled / amount), half-up. Null where the charge's
    settlement is not staged."""
    if refunds.is_empty():
        return pl.DataFrame(schema={"id": pl.String, "sale_amount": pl.Int64})
    df = (
        refunds.select("id", "charge", "created", pl.col("amount").cast(pl.Int64))
        .join(charges.select("charge", "charge_amount", "charge_settled"), on="charge", how="left")
        .sort("charge", "created", "id")
        .with_columns(pl.col("amount").cum_sum().over("charge").alias("_to"))
    )
    a, settled = pl.col("charge_amount").cast(pl.Int64), pl.col("charge_settled").cast(pl.Int64)

    def share(refunded: pl.Expr) -> pl.Expr:  # round-half-up(refunded x settled / a)
        return (2 * refunded * settled + a) // (2 * a)

    return df.select(
        "id",
        pl.when(a > 0)
        .then(share(pl.col("_to")) - share(pl.col("_to") - pl.col("amount")))
        .otherwise(None)
        .alias("sale_amount"),
    )


def _refund_fx_journals(
    df: pl.DataFrame, mapping: Mapping, periods: pl.DataFrame | None
) -> pl.DataFrame:
    """Realized FX on refunds of foreign-currency sales: the memo reversed the sale at the
    charge's rate; this moves the difference to what the refund cost (its balance
    transaction) between Stripe Clearing and FX gain/loss, so clearing moves by exactly the
    refund's ``bt.amount`` and a full refund leaves net sales where they were."""
    fx = df.filter(pl.col("_fx") & (pl.col("fx_difference") != 0) & pl.col("error").is_null())
    if fx.is_empty():
        return empty_docs()
    # > 0: the refund cost more than the sale brought in (a loss). Its own balance
    # transaction is the reference: the refund id is the memo's and, when it fails, the
    # reversing journal's (Sage finds documents by reference).
    return _fx_journals(
        fx,
        mapping,
        periods,
        kind="refund_fx",
        desc=pl.concat_str([pl.lit("Realized FX on refund "), pl.col("id")]),
        clearing=pl.col("settlement_currency").replace_strict(
            mapping.accounts.clearing, default=None
        ),
        gain=-pl.col("fx_difference"),
    )


# -- selection: the staged rows a slice of refunds is planned from ------------------------
@dataclass(frozen=True)
class RefundInputs:
    """What ``plan_refunds`` plans one slice of refunds from."""

    charges: pl.DataFrame  # the refunded charges (unquarantined)
    bts: pl.DataFrame  # the refunds', their failures' and their charges' balance transactions
    charge_refunds: pl.DataFrame  # every refund of those charges
    credited: list[str]  # refunds a credit note names
    refunded_invoices: pl.DataFrame  # the invoices the refunded charges paid


def select_inputs(st: Staging, refunds: pl.DataFrame) -> RefundInputs:
    """The staged rows a slice of ``refunds`` is planned from, read while the slice is
    registered as ``_plan_slice``."""
    with st.registered(
        "_plan_slice",
        refunds.select("charge", "balance_transaction", "failure_balance_transaction"),
    ):
        # The charges' own balance transactions too: their rate converts a foreign sale
        # back; and every refund of those charges (a partial refund's share of the sale
        # depends on the refunds before it, posted or not).
        bts = st.frame(
            "SELECT b.* FROM staging.balance_transactions b WHERE b.id IN ("
            "SELECT balance_transaction FROM _plan_slice "
            "UNION ALL SELECT failure_balance_transaction FROM _plan_slice "
            "UNION ALL SELECT c.balance_transaction FROM staging.charges c "
            "WHERE c.id IN (SELECT charge FROM _plan_slice))"
        )
        charges = st.frame(
            "SELECT s.* FROM staging.charges s "
            "WHERE s.id IN (SELECT charge FROM _plan_slice) AND " + not_quarantined("charges")
        )
        charge_refunds = st.frame(
            "SELECT r.* FROM staging.refunds r WHERE r.charge IN (SELECT charge FROM _plan_slice)"
        )
        # Refunds a credit note names post through the note's memo (issue 19).
        credited = st.frame(
            "SELECT DISTINCT r AS id FROM (SELECT unnest(refunds) AS r "
            "FROM staging.credit_notes WHERE status = 'issued') "
            "WHERE r IN (SELECT id FROM staging.refunds)"
        )["id"].to_list()
        # The invoices the refunded charges paid: a refund's reason names its invoice.
        paid = refunded_invoices(
            st.frame(
                "SELECT p.* FROM staging.invoice_payments p "
                "WHERE p.charge IN (SELECT charge FROM _plan_slice)"
            ),
            st.frame(
                "SELECT i.id, i.number FROM staging.invoices i WHERE i.id IN ("
                "SELECT p.invoice FROM staging.invoice_payments p "
                "WHERE p.charge IN (SELECT charge FROM _plan_slice))"
            ),
        )
    return RefundInputs(
        charges=charges,
        bts=bts,
        charge_refunds=charge_refunds,
        credited=credited,
        refunded_invoices=paid,
    )
