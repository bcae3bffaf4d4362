"""After an invoice is posted (issue 19; docs/accounting.md §3 "Stripe Billing, completely").

What follows a Stripe invoice, as Sage credit memos:

- a credit note on an open invoice → a memo against it (``invoice_no``) for the note's
  total, its tax reversed per rate (``tax_amount``/``tax_lines``, the mapping's tax codes);
- a credit note that refunds a paid invoice (it names ``refunds``) → one memo to Stripe
  Clearing, not applied (the invoice stays paid), tax reversed; the refunds it names post
  through this memo only (``plan_refunds`` leaves them out);
- a voided invoice → a memo against it for its open balance (``amount_remaining``), the tax
  reversed in proportion to that balance, ``reference`` = the invoice id;
- an invoice marked uncollectible → a memo against it for its open balance with
  ``expense_account`` = Bad Debt (the whole balance: no tax relief is claimed here); when
  Stripe collects it later, the memo still posts (for what the payment paid) and the charge
  books a recovery journal instead of a receipt (``plan_charges``);
- an invoice paid partly from the customer's credit balance → a memo against it for the
  credit it used (``ending_balance − starting_balance``: Stripe keeps credit as a negative
  balance) with ``expense_account`` = Customer Credit (Dr Customer Credit, Cr AR), no tax:
  the invoice's tax is all in the invoice, whoever pays it.

A memo against an invoice depends on that invoice's Sage document (``invoice:<in_…>``): the
loader posts it only once the invoice is in Sage and resolves ``@xref:invoice:<in_…>`` to
the Sage invoice number; until then it waits (a reason, never a dead letter).
"""

from __future__ import annotations

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.documents import (
    _docs,
    empty_docs,
    local_date,
    money_string,
)
from stripe_sage.plan.invoice_tax import TAXES_DTYPE, invoice_tax_lines

# The doc-key prefixes (after ``credit_memo:``) of the memos an invoice's later life makes.
VOID_PREFIX = "void:"
WRITE_OFF_PREFIX = "writeoff:"
BALANCE_PREFIX = "balance:"
# The credit-balance memo's Sage reference: the invoice id is its void or write-off memo's.
BALANCE_REFERENCE_SUFFIX = "-CB"


def _tax_money(
    frame: pl.DataFrame, mapping: Mapping, tax_rates: pl.DataFrame | None
) -> pl.DataFrame:
    """``frame`` (``id``, ``currency``, ``taxes``) with ``tax_lines``, ``tax_error``, ``_tax``."""
    coded = invoice_tax_lines(
        frame.select("id", "currency", "taxes"), tax_rates, mapping, money_string
    )
    return frame.join(coded, on="id", how="left").with_columns(
        pl.col("taxes")
        .list.eval(pl.element().struct.field("amount"))
        .list.sum()
        .fill_null(0)
        .alias("_tax")
    )


def _memo_payload(
    memo_date: pl.Expr,
    amount: pl.Expr,
    reason: pl.Expr,
    invoice_no: pl.Expr | None,
    gl_account: pl.Expr | None,
    expense_account: pl.Expr | None,
) -> pl.Expr:
    fields = [
        pl.concat_str([pl.lit("@xref:customer:"), pl.col("customer")]).alias("customer_id"),
        memo_date.cast(pl.String).alias("memo_date"),
        money_string(amount, pl.col("currency")).alias("amount"),
        pl.col("currency"),
        pl.col("reference"),
        reason.str.slice(0, 60).alias("reason"),
        money_string(pl.col("_tax"), pl.col("currency")).alias("tax_amount"),
        pl.when(pl.col("tax_lines").list.len() > 0).then(pl.col("tax_lines")).alias("tax_lines"),
    ]
    if invoice_no is not None:
        # Sage credits the invoice's receivable: no gl_account (SAGEPRO_API.md, optional then).
        fields.append(invoice_no.alias("invoice_no"))
    elif gl_account is not None:
        fields.append(gl_account.alias("gl_account"))
    if expense_account is not None:
        fields.append(expense_account.alias("expense_account"))
    return pl.struct(fields)


def plan_credit_notes(
    notes: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    tax_rates: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Issued credit notes → one credit memo each (``credit_memo:<cn_…>``)."""
    notes = notes.filter(pl.col("status") == "issued")
    if notes.is_empty():
        return empty_docs()
    df = _tax_money(notes.with_columns(pl.col("taxes").cast(TAXES_DTYPE)), mapping, tax_rates)
    refunds_paid = pl.col("refunds").list.len() > 0
    clearing = pl.col("currency").replace_strict(
        mapping.accounts.clearing, default=None, return_dtype=pl.String
    )
    df = df.with_columns(
        pl.col("id").alias("reference"),
        local_date(pl.coalesce("effective_at", "created"), mapping.timezone).alias("doc_date"),
        pl.lit("credit_memo").alias("doc_type"),
    )
    on_invoice = df.filter(~refunds_paid)
    refunding = df.filter(refunds_paid)
    frames = []
    if not on_invoice.is_empty():
        frames.append(
            on_invoice.with_columns(
                _memo_payload(
                    pl.col("doc_date"),
                    pl.col("total"),
                    pl.format("Credit note {} on invoice {}", pl.col("number"), pl.col("invoice")),
                    pl.concat_str([pl.lit("@xref:invoice:"), pl.col("invoice")]),
                    None,
                    None,
                ).alias("payload"),
                pl.concat_list(
                    [
                        pl.concat_str([pl.lit("customer:"), pl.col("customer")]),
                        pl.concat_str([pl.lit("invoice:"), pl.col("invoice")]),
                    ]
                ).alias("depends_on"),
                pl.col("tax_error").alias("error"),
            )
        )
    if not refunding.is_empty():
        frames.append(
            refunding.with_columns(
                _memo_payload(
                    pl.col("doc_date"),
                    pl.col("total"),
                    pl.format(
                        "Credit note {} refunds invoice {} ({})",
                        pl.col("number"),
                        pl.col("invoice"),
                        pl.col("refunds").list.join(" "),
                    ),
                    None,
                    clearing,
                    None,
                ).alias("payload"),
                pl.concat_list([pl.concat_str([pl.lit("customer:"), pl.col("customer")])]).alias(
                    "depends_on"
                ),
                pl.coalesce(
                    pl.col("tax_error"),
                    pl.when(clearing.is_null()).then(
                        pl.format("no Stripe Clearing account for {}", pl.col("currency"))
                    ),
                ).alias("error"),
            )
        )
    return pl.concat([_docs(f, mapping, periods) for f in frames])


def plan_invoice_closures(
    invoices: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    tax_rates: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Voided and uncollectible invoices → a memo against each for its open balance:
    ``credit_memo:void:<in_…>`` (tax reversed in proportion) or ``credit_memo:writeoff:<in_…>``
    (``expense_account`` = Bad Debt)."""
    # Written off and later collected: the write-off still posts, for what was open then,
    # which is what the later payment paid (the recovery journal books that payment).
    collected = (pl.col("status") == "paid") & pl.col("marked_uncollectible_at").is_not_null()
    inv = invoices.with_columns(
        pl.when(collected)
        .then(pl.col("amount_paid"))
        .otherwise(pl.col("amount_remaining"))
        .alias("amount_remaining"),
        pl.when(collected)
        .then(pl.lit("uncollectible"))
        .otherwise(pl.col("status"))
        .alias("status"),
    ).filter(pl.col("status").is_in(["void", "uncollectible"]) & (pl.col("amount_remaining") > 0))
    if inv.is_empty():
        return empty_docs()
    void = pl.col("status") == "void"
    # Tax in proportion to the open balance: per rate floor(tax * remaining / total), the
    # first rate takes the remainder so the memo's tax is the invoice's tax scaled exactly.
    exploded = (
        inv.select("id", "status", "total", "amount_remaining", pl.col("taxes").cast(TAXES_DTYPE))
        .with_columns(pl.when(void).then(pl.col("taxes")).otherwise(pl.lit([], TAXES_DTYPE)))
        .drop("status")
        .explode("taxes")
        .filter(pl.col("taxes").is_not_null())
        .unnest("taxes")
    )
    if exploded.is_empty():
        scaled = inv.select("id", pl.lit([], TAXES_DTYPE).alias("taxes"))
    else:
        share = pl.col("amount") * pl.col("amount_remaining") // pl.col("total")
        target = pl.col("amount").sum().over("id") * pl.col("amount_remaining") // pl.col("total")
        exploded = exploded.with_columns(share.alias("_share"), target.alias("_target"))
        exploded = exploded.with_columns(
            pl.when(pl.int_range(pl.len()).over("id") == 0)
            .then(pl.col("_share") + pl.col("_target") - pl.col("_share").sum().over("id"))
            .otherwise(pl.col("_share"))
            .alias("amount")
        )
        scaled = exploded.group_by("id", maintain_order=True).agg(
            pl.struct(
                "tax_rate",
                "amount",
                (pl.col("taxable_amount") * pl.col("amount_remaining") // pl.col("total")).alias(
                    "taxable_amount"
                ),
                "inclusive",
            )
            .cast(TAXES_DTYPE.inner)
            .alias("taxes")
        )
    df = (
        inv.drop("taxes")
        .join(scaled, on="id", how="left")
        .with_columns(pl.col("taxes").fill_null(pl.lit([], TAXES_DTYPE)))
    )
    df = _tax_money(df, mapping, tax_rates)
    df = df.with_columns(
        pl.col("id").alias("reference"),
        pl.concat_str(
            [pl.when(void).then(pl.lit(VOID_PREFIX)).otherwise(pl.lit(WRITE_OFF_PREFIX)), "id"]
        ).alias("stripe_key"),
        local_date(
            pl.when(void).then(pl.col("voided_at")).otherwise(pl.col("marked_uncollectible_at")),
            mapping.timezone,
        ).alias("doc_date"),
        pl.lit("credit_memo").alias("doc_type"),
    )
    frames = []
    for is_void in (True, False):
        part = df.filter(void if is_void else ~void)
        if part.is_empty():
            continue
        what = "Void of invoice {}" if is_void else "Invoice {} uncollectible: bad debt"
        frames.append(
            part.with_columns(
                _memo_payload(
                    pl.col("doc_date"),
                    pl.col("amount_remaining"),
                    pl.format(what, pl.coalesce("number", "id")),
                    pl.concat_str([pl.lit("@xref:invoice:"), pl.col("id")]),
                    None,
                    None if is_void else pl.lit(mapping.accounts.bad_debt),
                ).alias("payload"),
                pl.concat_list(
                    [
                        pl.concat_str([pl.lit("customer:"), pl.col("customer")]),
                        pl.concat_str([pl.lit("invoice:"), pl.col("id")]),
                    ]
                ).alias("depends_on"),
                pl.col("tax_error").alias("error"),
            )
        )
    return pl.concat([_docs(f, mapping, periods, key_col="stripe_key") for f in frames])


def plan_credit_balances(
    invoices: pl.DataFrame, mapping: Mapping, periods: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Finalized invoices that used the customer's credit balance → a memo against each for
    that credit (``credit_memo:balance:<in_…>``), ``expense_account`` = Customer Credit,
    dated the invoice's finalization. A foreign-currency invoice's credit is not converted:
    its memo is a planning error naming the invoice (posting it would need FX)."""
    used = pl.col("ending_balance") - pl.col("starting_balance")
    inv = invoices.filter(
        pl.col("status").is_in(["open", "paid", "void", "uncollectible"]) & (used > 0)
    )
    if inv.is_empty():
        return empty_docs()
    settles = pl.col("currency").is_in(mapping.settlement_currencies)
    df = inv.with_columns(
        used.alias("_used"),
        pl.concat_str([pl.lit(BALANCE_PREFIX), pl.col("id")]).alias("stripe_key"),
        local_date(pl.coalesce("finalized_at", "created"), mapping.timezone).alias("doc_date"),
        pl.lit("credit_memo").alias("doc_type"),
    )
    df = df.with_columns(
        pl.struct(
            pl.concat_str([pl.lit("@xref:customer:"), pl.col("customer")]).alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("memo_date"),
            money_string(pl.col("_used"), pl.col("currency")).alias("amount"),
            pl.col("currency"),
            pl.concat_str([pl.col("id"), pl.lit(BALANCE_REFERENCE_SUFFIX)])
            .str.slice(0, 30)
            .alias("reference"),
            pl.format("Customer credit applied to invoice {}", pl.coalesce("number", "id"))
            .str.slice(0, 60)
            .alias("reason"),
            money_string(pl.lit(0), pl.col("currency")).alias("tax_amount"),
            pl.concat_str([pl.lit("@xref:invoice:"), pl.col("id")]).alias("invoice_no"),
            pl.lit(mapping.accounts.customer_credit).alias("expense_account"),
        ).alias("payload"),
        pl.concat_list(
            [
                pl.concat_str([pl.lit("customer:"), pl.col("customer")]),
                pl.concat_str([pl.lit("invoice:"), pl.col("id")]),
            ]
        ).alias("depends_on"),
        pl.when(~settles)
        .then(
            pl.format(
                "invoice {}: credit balance applied in {}, not a settlement currency "
                "(posting it would need FX)",
                pl.col("id"),
                pl.col("currency"),
            )
        )
        .alias("error"),
    )
    return _docs(df, mapping, periods, key_col="stripe_key")
