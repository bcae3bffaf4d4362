"""Foreign-currency invoices at Stripe's settled amount (docs/accounting.md, "Foreign
currency, first class").

An invoice in a currency that is not a settlement currency posts once Stripe has settled the
charge that paid it, in the settlement currency, at that charge's own rate (``bt.amount ÷
charge.amount``; no outside rate source). Every amount of the invoice — each line, the
discount, each tax line — is converted at that rate and rounded half-up; the rounding
remainder goes on the largest line, so lines − discount + tax is exactly the converted total
(which, for an invoice paid in full by one charge, is exactly the charge's ``bt.amount``, so
the receipt applied to it leaves nothing open). Amounts are integer minor units of their own
currency (JPY → USD: 0 → 2 decimals); pure Polars, no I/O.
"""

from __future__ import annotations

import polars as pl

COMPONENT_SCHEMA = {
    "invoice": pl.String,
    "kind": pl.String,  # "line" | "discount" | "tax"
    "key": pl.String,  # the line's position, "discount", or the tax line's code
    "amount": pl.Int64,  # presentment minor units; a discount is positive and subtracted
}
SIGN = {"line": 1, "discount": -1, "tax": 1}


def _convert(amount: pl.Expr, paid: pl.Expr, settled: pl.Expr) -> pl.Expr:
    """round-half-up(amount × settled ÷ paid), away from zero for negative amounts."""
    mag = (2 * amount.abs() * settled + paid) // (2 * paid)
    return pl.when(amount < 0).then(-mag).otherwise(mag)


def settle_invoice_amounts(components: pl.DataFrame, rates: pl.DataFrame) -> pl.DataFrame:
    """Convert every amount of each invoice at its paying charge's rate.

    ``components``: COMPONENT_SCHEMA rows. ``rates``: ``invoice``, ``total`` (the invoice's
    total, presentment), ``paid`` (the paying charge's amount, presentment), ``settled``
    (that charge's ``bt.amount``, settlement currency). Returns ``components`` with
    ``settled_amount``; per invoice, Σ sign × settled_amount == round(total × settled ÷
    paid), the remainder on the line of the largest amount (the first such by position)."""
    df = components.join(rates, on="invoice", how="inner").with_columns(
        _convert(pl.col("amount"), pl.col("paid"), pl.col("settled")).alias("_conv"),
        pl.col("kind").replace_strict(SIGN, return_dtype=pl.Int64).alias("_sign"),
    )
    target = (
        df.group_by("invoice")
        .agg(
            _convert(
                pl.col("total").first(), pl.col("paid").first(), pl.col("settled").first()
            ).alias("_target"),
            (pl.col("_sign") * pl.col("_conv")).sum().alias("_sum"),
        )
        .with_columns((pl.col("_target") - pl.col("_sum")).alias("_remainder"))
    )
    is_line = pl.col("kind") == "line"
    # The largest line takes the remainder (ties: the lowest position, as Stripe orders them).
    rank = (
        pl.when(is_line)
        .then(pl.struct(-pl.col("amount").abs(), pl.col("key").cast(pl.Int64, strict=False)))
        .otherwise(None)
    )
    df = df.join(target.select("invoice", "_remainder"), on="invoice").with_columns(
        (is_line & (rank.rank("ordinal").over("invoice") == 1)).alias("_takes")
    )
    return df.select(
        *components.columns,
        (pl.col("_conv") + pl.when(pl.col("_takes")).then(pl.col("_remainder")).otherwise(0)).alias(
            "settled_amount"
        ),
    )


SETTLEMENT_SCHEMA = {
    "invoice": pl.String,
    "paid": pl.Int64,  # the paying charge's amount (presentment minor units)
    "settled": pl.Int64,  # its balance transaction's amount (settlement minor units)
    "settlement_currency": pl.String,
}


def _paid_rows(
    invoice_payments: pl.DataFrame, charges: pl.DataFrame, bts: pl.DataFrame
) -> pl.DataFrame:
    """The paid rows of ``invoice_payments``, each with its charge's amount (``paid``) and
    what Stripe settled for it (``settled``, null while its balance transaction is not
    staged), in the order the invoice was paid (``paid_at``, the charge's ``created``, id):
    the first is the payment whose rate books the invoice."""
    pays = invoice_payments.filter(pl.col("status") == "paid")
    amount_paid = pl.col("amount_paid") if "amount_paid" in pays.columns else pl.lit(None)
    paid_at = pl.col("paid_at") if "paid_at" in pays.columns else pl.lit(None)
    pays = pays.select(
        "invoice",
        "charge",
        amount_paid.cast(pl.Int64).alias("amount_paid"),
        paid_at.alias("_paid_at"),
    )
    ch = charges.select(
        pl.col("id").alias("charge"),
        pl.col("amount").cast(pl.Int64).alias("paid"),
        pl.col("created").alias("_charge_created"),
        "balance_transaction",
    )
    bt = bts.select(
        pl.col("id").alias("balance_transaction"),
        pl.col("amount").cast(pl.Int64).alias("settled"),
        pl.col("currency").str.to_uppercase().alias("settlement_currency"),
    )
    return (
        pays.join(ch, on="charge")
        .join(bt, on="balance_transaction", how="left")
        .with_columns(pl.coalesce("amount_paid", "paid").alias("amount_paid"))
        .sort("invoice", "_paid_at", "_charge_created", "charge", nulls_last=True)
    )


def invoice_settlements(
    invoice_payments: pl.DataFrame, charges: pl.DataFrame, bts: pl.DataFrame
) -> pl.DataFrame:
    """Per paid invoice, the payment whose rate books it — its first (an invoice paid in
    parts posts once its first part settles) — and what Stripe settled for it
    (SETTLEMENT_SCHEMA); an invoice whose first paying charge or its balance transaction is
    not staged has no row (it waits)."""
    if invoice_payments.is_empty():
        return pl.DataFrame(schema=SETTLEMENT_SCHEMA)
    return (
        _paid_rows(invoice_payments, charges, bts)
        .group_by("invoice", maintain_order=True)
        .first()
        .filter(pl.col("settled").is_not_null())
        .select(*SETTLEMENT_SCHEMA)
        .cast(SETTLEMENT_SCHEMA)  # type: ignore[arg-type]
    )


PAYMENT_SHARE_SCHEMA = {
    "charge": pl.String,
    "invoice": pl.String,
    "invoice_share": pl.Int64,  # settlement minor units; null: the booking rate is not known
    "booking_currency": pl.String,  # the settlement currency the invoice is booked in
    "share_wait": pl.String,  # why there is no share yet
}


def invoice_payment_shares(
    invoice_payments: pl.DataFrame, charges: pl.DataFrame, bts: pl.DataFrame
) -> pl.DataFrame:
    """Per charge that paid (part of) an invoice: the part of the invoice's booked amount it
    settles, at the invoice's booking rate (its first payment's ``settled ÷ paid``, the rate
    the invoice was posted at). Cumulative over the invoice's payments in the order they
    were paid, ``round(Σ paid up to it × rate) − round(Σ paid before it × rate)`` (half-up),
    so the parts of a fully paid invoice add up to exactly its booked total and the last
    part takes the rounding remainder; the first part's share is its own settled amount.
    ``invoice_payments`` must hold every paid row of the invoices asked about (earlier
    parts may be posted already). What a part settled beyond its share is realized FX."""
    if invoice_payments.is_empty():
        return pl.DataFrame(schema=PAYMENT_SHARE_SCHEMA)
    df = _paid_rows(invoice_payments, charges, bts).with_columns(
        pl.col("amount_paid").cum_sum().over("invoice").alias("_to"),
        pl.col("paid").first().over("invoice").alias("_book_paid"),
        pl.col("settled").first().over("invoice").alias("_book_settled"),
        pl.col("settlement_currency").first().over("invoice").alias("booking_currency"),
        pl.col("charge").first().over("invoice").alias("_first"),
    )
    a, settled = pl.col("_book_paid"), pl.col("_book_settled")

    def booked(presentment: pl.Expr) -> pl.Expr:  # round-half-up(presentment x settled / a)
        return (2 * presentment * settled + a) // (2 * a)

    known = settled.is_not_null() & (a > 0)
    return df.select(
        "charge",
        "invoice",
        pl.when(known)
        .then(booked(pl.col("_to")) - booked(pl.col("_to") - pl.col("amount_paid")))
        .alias("invoice_share"),
        "booking_currency",
        pl.when(~known)
        .then(
            pl.format(
                "waiting: the first payment {} of invoice {} is not settled yet (its rate "
                "books the invoice)",
                pl.col("_first"),
                pl.col("invoice"),
            )
        )
        .alias("share_wait"),
    ).cast(PAYMENT_SHARE_SCHEMA)  # type: ignore[arg-type]


def settle_foreign_invoices(
    invoices: pl.DataFrame, lines: pl.DataFrame, settlements: pl.DataFrame
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The invoices of ``settlements`` (and their lines) restated in the settlement currency
    at their paying charge's rate, ready for the ordinary invoice planning: each line's
    ``amount`` is its converted net (``tax_inclusive`` 0), ``discount``, ``taxes`` amounts and
    ``tax_exclusive`` (= Σ taxes) converted, ``total`` = the converted total; lines − discount
    + tax equal it exactly (``settle_invoice_amounts``)."""
    inv = invoices.join(settlements.rename({"invoice": "id"}), on="id", how="inner").with_columns(
        pl.col("taxes").fill_null([])
    )
    if inv.is_empty():
        return invoices.clear(), lines.clear()
    ln = lines.join(inv.select(pl.col("id").alias("invoice")), on="invoice", how="semi")
    taxes = (
        inv.select("id", "taxes")
        .explode("taxes")
        .filter(pl.col("taxes").is_not_null())
        .with_columns(pl.int_range(pl.len()).over("id").alias("_k"))
        .unnest("taxes")
    )
    components = pl.concat(
        [
            ln.select(
                "invoice",
                pl.lit("line").alias("kind"),
                pl.col("position").cast(pl.String).alias("key"),
                (pl.col("amount") - pl.col("tax_inclusive")).alias("amount"),
            ),
            inv.select(
                pl.col("id").alias("invoice"),
                pl.lit("discount").alias("kind"),
                pl.lit("discount").alias("key"),
                pl.col("discount").alias("amount"),
            ),
            taxes.select(
                pl.col("id").alias("invoice"),
                pl.lit("tax").alias("kind"),
                pl.col("_k").cast(pl.String).alias("key"),
                pl.col("amount"),
            ),
        ]
    ).cast(COMPONENT_SCHEMA)  # type: ignore[arg-type]
    rates = inv.select(pl.col("id").alias("invoice"), "total", "paid", "settled")
    conv = settle_invoice_amounts(components, rates)
    cur = inv.select(pl.col("id").alias("invoice"), "settlement_currency")

    def part(kind: str) -> pl.DataFrame:
        return conv.filter(pl.col("kind") == kind).select("invoice", "key", "settled_amount")

    lines_out = (
        ln.with_columns(pl.col("position").cast(pl.String).alias("key"))
        .join(part("line"), on=["invoice", "key"])
        .join(cur, on="invoice")
        .with_columns(
            pl.col("settled_amount").alias("amount"),
            pl.lit(0, pl.Int64).alias("tax_inclusive"),
            pl.col("settlement_currency").alias("currency"),
        )
        .select(lines.columns)
    )
    tax_conv = (
        taxes.with_columns(pl.col("_k").cast(pl.String).alias("key"))
        .join(part("tax").rename({"invoice": "id"}), on=["id", "key"])
        .with_columns(
            _convert(
                pl.col("taxable_amount"),
                pl.col("id").replace_strict(rates["invoice"], rates["paid"]),
                pl.col("id").replace_strict(rates["invoice"], rates["settled"]),
            ).alias("taxable_amount"),
            pl.col("settled_amount").alias("amount"),
        )
        .sort("id", "_k")
        .group_by("id", maintain_order=True)
        .agg(
            pl.struct("tax_rate", "amount", "taxable_amount", "inclusive").alias("taxes"),
            pl.col("amount").sum().alias("tax_exclusive"),
        )
    )
    inv_out = (
        inv.drop("taxes", "tax_exclusive")
        .join(tax_conv, on="id", how="left")
        .join(part("discount").rename({"invoice": "id"}).drop("key"), on="id")
        .with_columns(
            pl.col("settled_amount").alias("discount"),
            pl.col("taxes").fill_null([]).cast(invoices.schema["taxes"]),
            pl.col("tax_exclusive").fill_null(0),
            pl.col("tax_exclusive").fill_null(0).alias("tax"),
            pl.lit(0, pl.Int64).alias("tax_inclusive"),
            _convert(pl.col("total"), pl.col("paid"), pl.col("settled")).alias("total"),
            pl.col("settlement_currency").alias("currency"),
        )
        .select(invoices.columns)
    )
    return inv_out, lines_out
