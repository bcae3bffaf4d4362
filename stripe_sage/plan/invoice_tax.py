"""An invoice's tax per Stripe tax rate → Sage ``tax_lines`` (issue 18), as pure Polars.

Each entry of the invoice's staged ``taxes`` (Stripe's ``total_taxes``: one per tax rate,
inclusive or exclusive) becomes one ``{tax_code, amount}``. The Sage tax code comes from the
mapping's ``tax`` section: by the rate's id, else by the staged rate's jurisdiction and
percentage, else the default code. A rate none of these codes is never guessed: the invoice
gets a reason naming the rate (``waiting:`` while the rate itself is not staged yet and only
its jurisdiction could code it)."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from stripe_sage.mapping import Mapping

TAX_RATE_COLUMNS = {
    "id": pl.String(),
    "jurisdiction": pl.String(),
    "percentage": pl.Float64(),
    "display_name": pl.String(),
}
TAXES_DTYPE = pl.List(
    pl.Struct(
        {
            "tax_rate": pl.String(),
            "amount": pl.Int64(),
            "taxable_amount": pl.Int64(),
            "inclusive": pl.Boolean(),
        }
    )
)
TAX_LINES_SCHEMA = {
    "id": pl.String(),
    "tax_lines": pl.List(pl.Struct({"tax_code": pl.String(), "amount": pl.String()})),
    "tax_error": pl.String(),
}
Money = Callable[[pl.Expr, pl.Expr], pl.Expr]  # (minor units, currency) → Sage money string


def empty_tax_rates() -> pl.DataFrame:
    return pl.DataFrame(schema=TAX_RATE_COLUMNS)


def _percent_key(value: pl.Expr) -> pl.Expr:
    """A percentage as an integer of 1/10,000 percent, so 8.25 and 8.2500 match exactly."""
    return (value.cast(pl.Float64) * 10_000).round(0).cast(pl.Int64)


def invoice_tax_lines(
    invoices: pl.DataFrame, tax_rates: pl.DataFrame | None, mapping: Mapping, money: Money
) -> pl.DataFrame:
    """Per invoice ``id``: its ``tax_lines`` (``{tax_code, amount}`` with the amount rendered
    by ``money``, in Stripe's rate order) and ``tax_error`` (null, or why a rate has no Sage
    code)."""
    rates = tax_rates if tax_rates is not None else empty_tax_rates()
    rates = rates.select(
        pl.col("id").alias("tax_rate"),
        pl.col("jurisdiction").alias("_jurisdiction"),
        _percent_key(pl.col("percentage")).alias("_pct"),
        pl.col("display_name").alias("_rate_name"),
    )
    by_id = pl.DataFrame(
        {"tax_rate": list(mapping.tax.codes), "_code_by_id": list(mapping.tax.codes.values())},
        schema={"tax_rate": pl.String(), "_code_by_id": pl.String()},
    )
    by_place = pl.DataFrame(
        {
            "_jurisdiction": [j.jurisdiction for j in mapping.tax.by_jurisdiction],
            "_pct": [round(float(j.percentage) * 10_000) for j in mapping.tax.by_jurisdiction],
            "_code_by_place": [j.code for j in mapping.tax.by_jurisdiction],
        },
        schema={"_jurisdiction": pl.String(), "_pct": pl.Int64(), "_code_by_place": pl.String()},
    ).unique(subset=["_jurisdiction", "_pct"], keep="first", maintain_order=True)
    taxes = (
        invoices.select("id", "currency", "taxes")
        .with_row_index("_inv")
        .explode("taxes")
        .filter(pl.col("taxes").is_not_null())
        .with_columns(pl.int_range(pl.len()).over("_inv").alias("_k"))
        .unnest("taxes")
        .join(rates, on="tax_rate", how="left")
        .join(by_id, on="tax_rate", how="left")
        .join(by_place, on=["_jurisdiction", "_pct"], how="left")
        .with_columns(
            pl.coalesce(
                "_code_by_id", "_code_by_place", pl.lit(mapping.tax.default_code, pl.String)
            ).alias("tax_code")
        )
        .with_columns(
            pl.when(pl.col("tax_code").is_not_null())
            .then(None)
            .when(pl.col("_jurisdiction").is_null() & pl.col("_pct").is_null())
            .then(
                pl.format(
                    "waiting: tax rate {} is not staged (its jurisdiction would give its code)",
                    pl.col("tax_rate"),
                )
            )
            .otherwise(
                pl.format(
                    "tax rate {} ({}, {}, {}%) has no Sage tax code: add it to the mapping's "
                    "tax.codes or tax.by_jurisdiction, or set tax.default_code",
                    pl.col("tax_rate"),
                    pl.col("_rate_name").fill_null("?"),
                    pl.col("_jurisdiction").fill_null("no jurisdiction"),
                    (pl.col("_pct") / 10_000).cast(pl.String),
                )
            )
            .alias("_rate_error")
        )
        .sort("_inv", "_k")
    )
    per_invoice = taxes.group_by("id", maintain_order=True).agg(
        pl.struct(
            pl.col("tax_code"), money(pl.col("amount"), pl.col("currency")).alias("amount")
        ).alias("tax_lines"),
        # A reason that is not a wait wins over a wait: waiting would never end it.
        pl.col("_rate_error")
        .sort_by(pl.col("_rate_error").str.starts_with("waiting:").fill_null(True))
        .drop_nulls()
        .first()
        .alias("tax_error"),
    )
    return per_invoice.select(TAX_LINES_SCHEMA.keys()).cast(TAX_LINES_SCHEMA)  # type: ignore[arg-type]
