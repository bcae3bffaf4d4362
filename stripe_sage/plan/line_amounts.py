"""Sage v1.1 line amounts: Stripe's line (amount, quantity) → Sage's (quantity, unit_price).

Sage extends a line as quantity × unit_price rounded half-up to the currency's exponent, and
a unit price may carry up to 4 more decimals than the currency (docs/sage_api.md, "Line
amounts"). Stripe gives a line's amount (net of inclusive tax once the planner subtracts it)
and its quantity; the unit price below makes the extension exactly that amount, so the
document's total is Stripe's to the cent and stock moves by Stripe's quantity. Amounts are
integer minor units; a negative amount is a credit line (invoices only)."""

from __future__ import annotations

from decimal import Decimal

import polars as pl

from stripe_sage.money import exponent

EXTRA_DECIMALS = 4
SCALE = 10**EXTRA_DECIMALS  # a unit price is held in 1/10_000 of a minor unit


def _exact_units(amount_abs: int, quantity: int) -> int | None:
    """The shortest unit price (in 1/SCALE minor units) whose extension is ``amount_abs``:
    the fewest extra decimals (0..4) that make it exact; None when none does."""
    for extra in range(EXTRA_DECIMALS + 1):
        step = 10**extra
        units = (2 * amount_abs * step + quantity) // (2 * quantity)  # rounded half-up
        if (2 * quantity * units + step) // (2 * step) == amount_abs:
            return units * 10 ** (EXTRA_DECIMALS - extra)
    return None


def line_price(amount: int, quantity: int | None, currency: str) -> tuple[str, str]:
    """(quantity, unit_price) strings for one line; the reference for ``with_line_prices``.

    Quantity × the returned price rounds to ``amount`` exactly, with as few extra decimals as
    that needs; when no price with 4 extra decimals can (quantities of 10,000 and more), the
    line is one unit of the whole amount."""
    q = quantity if quantity is not None and quantity >= 1 else 1
    units = _exact_units(abs(amount), q)
    if units is None:
        q, units = 1, abs(amount) * SCALE
    price = Decimal(units if amount >= 0 else -units).scaleb(-(exponent(currency) + EXTRA_DECIMALS))
    return str(q), _trim(price, exponent(currency))


def _trim(price: Decimal, exp: int) -> str:
    """Drop trailing zeros beyond the currency's exponent: 33.333300 → "33.3333", 10 → "10.00"."""
    text = f"{price:.{exp + EXTRA_DECIMALS}f}"
    if "." not in text:
        return text
    whole, frac = text.split(".")
    frac = frac.rstrip("0").ljust(exp, "0")
    return f"{whole}.{frac}" if frac else whole


def with_line_prices(
    frame: pl.DataFrame,
    amount: pl.Expr,
    quantity: pl.Expr,
    exp: pl.Expr,
    *,
    quantity_as: str,
    price_as: str,
) -> pl.DataFrame:
    """``frame`` with the Polars form of ``line_price``: the (quantity string, unit_price
    string) of each row as columns ``quantity_as`` and ``price_as``.

    ``exp`` is the currency's exponent (``documents.exponent_expr``); an unknown currency
    gives a null price, which the planner reports as a missing required field.

    Computed in steps, each over the previous step's columns: written as one expression,
    each part is repeated wherever a later part uses it (a Polars expression is a tree, not a
    graph), and the tree grew to tens of MB: 0.2 s to plan for a four-row frame."""
    t = "__line_price_"

    def c(name: str) -> pl.Expr:
        return pl.col(t + name)

    f = frame.with_columns(
        amount.cast(pl.Int64).alias(t + "a"),
        quantity.cast(pl.Int64).fill_null(1).alias(t + "q0"),
        exp.alias(t + "exp"),
    ).with_columns(
        pl.when(c("q0") >= 1).then(c("q0")).otherwise(1).alias(t + "q0"),
        c("a").abs().alias(t + "mag"),
    )
    # for each count of extra decimals (0..4): the rounded unit price, and whether it extends
    # to exactly the amount
    steps = range(EXTRA_DECIMALS + 1)
    f = f.with_columns(
        ((2 * c("mag") * 10**extra + c("q0")) // (2 * c("q0"))).alias(f"{t}u{extra}")
        for extra in steps
    )
    f = f.with_columns(
        ((2 * c("q0") * c(f"u{extra}") + 10**extra) // (2 * 10**extra) == c("mag")).alias(
            f"{t}exact{extra}"
        )
        for extra in steps
    )
    # the fewest extra decimals that are exact
    chosen: pl.Expr = pl.lit(None, pl.Int64)
    for extra in reversed(steps):
        chosen = (
            pl.when(c(f"exact{extra}"))
            .then(c(f"u{extra}") * 10 ** (EXTRA_DECIMALS - extra))
            .otherwise(chosen)
        )
    f = f.with_columns(chosen.alias(t + "chosen")).with_columns(
        pl.when(c("chosen").is_not_null()).then(c("q0")).otherwise(1).alias(t + "q"),
        pl.when(c("chosen").is_not_null())
        .then(c("chosen"))
        .otherwise(c("mag") * SCALE)
        .alias(t + "units"),
    )
    # trailing zeros of the 4 extra decimals, dropped (never into the currency's own decimals)
    units = c("units")
    f = f.with_columns(
        pl.when(units % 10_000 == 0)
        .then(4)
        .when(units % 1_000 == 0)
        .then(3)
        .when(units % 100 == 0)
        .then(2)
        .when(units % 10 == 0)
        .then(1)
        .otherwise(0)
        .alias(t + "zeros")
    )
    f = f.with_columns(
        (units // pl.lit(10, pl.Int64).pow(c("zeros"))).alias(t + "value"),
        (c("exp") + EXTRA_DECIMALS - c("zeros")).alias(t + "decimals"),
    ).with_columns(pl.lit(10, pl.Int64).pow(c("decimals")).alias(t + "base"))
    whole = (c("value") // c("base")).cast(pl.String)
    # frac zero-padded to ``decimals`` digits: render base + frac and drop the leading "1"
    frac = (c("base") + c("value") % c("base")).cast(pl.String).str.slice(1)
    sign = pl.when(c("a") < 0).then(pl.lit("-")).otherwise(pl.lit(""))
    price = (
        pl.when(c("decimals") == 0)
        .then(pl.concat_str([sign, whole]))
        .otherwise(pl.concat_str([sign, whole, pl.lit("."), frac]))
    )
    f = f.with_columns(c("q").cast(pl.String).alias(quantity_as), price.alias(price_as))
    return f.drop(pl.selectors.starts_with(t))
