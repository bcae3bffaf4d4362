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
