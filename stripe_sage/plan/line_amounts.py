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
    """(quantity, unit_price) strings for one line; the reference for ``line_price_exprs``.

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


def line_price_exprs(amount: pl.Expr, quantity: pl.Expr, exp: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    """Polars form of ``line_price``: (quantity string, unit_price string) per row.

    ``exp`` is the currency's exponent (``documents.exponent_expr``); an unknown currency
    gives a null price, which the planner reports as a missing required field."""
    q0 = quantity.cast(pl.Int64).fill_null(1)
    q0 = pl.when(q0 >= 1).then(q0).otherwise(1)
    a = amount.cast(pl.Int64)
    mag = a.abs()
    # the fewest extra decimals (0..4) whose rounded unit price extends to exactly the amount
    chosen: pl.Expr = pl.lit(None, pl.Int64)
    for extra in reversed(range(EXTRA_DECIMALS + 1)):
        step = 10**extra
        units_k = (2 * mag * step + q0) // (2 * q0)
        exact_k = (2 * q0 * units_k + step) // (2 * step) == mag
        chosen = pl.when(exact_k).then(units_k * 10 ** (EXTRA_DECIMALS - extra)).otherwise(chosen)
    exact = chosen.is_not_null()
    q = pl.when(exact).then(q0).otherwise(1)
    units = pl.when(exact).then(chosen).otherwise(mag * SCALE)
    # trailing zeros of the 4 extra decimals, dropped (never into the currency's own decimals)
    zeros = (
        pl.when(units % 10_000 == 0)
        .then(4)
        .when(units % 1_000 == 0)
        .then(3)
        .when(units % 100 == 0)
        .then(2)
        .when(units % 10 == 0)
        .then(1)
        .otherwise(0)
    )
    value = units // pl.lit(10, pl.Int64).pow(zeros)
    decimals = exp + EXTRA_DECIMALS - zeros
    base = pl.lit(10, pl.Int64).pow(decimals)
    whole = (value // base).cast(pl.String)
    # frac zero-padded to ``decimals`` digits: render base + frac and drop the leading "1"
    frac = (base + value % base).cast(pl.String).str.slice(1)
    sign = pl.when(a < 0).then(pl.lit("-")).otherwise(pl.lit(""))
    price = (
        pl.when(decimals == 0)
        .then(pl.concat_str([sign, whole]))
        .otherwise(pl.concat_str([sign, whole, pl.lit("."), frac]))
    )
    return q.cast(pl.String), price
