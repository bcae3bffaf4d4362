"""Sage v1.1 line amounts: quantity × unit price, rounded half-up per line, is exactly the
Stripe line's amount; the Polars form agrees with the plain-Python reference."""

from __future__ import annotations

import random
from decimal import ROUND_HALF_UP, Decimal

import polars as pl
import pytest

from stripe_sage.money import exponent
from stripe_sage.plan.documents import exponent_expr
from stripe_sage.plan.line_amounts import line_price, with_line_prices

pytestmark = pytest.mark.unit


def extension(quantity: str, unit_price: str, currency: str) -> Decimal:
    """What the Sage contract does with a line."""
    step = Decimal(1).scaleb(-exponent(currency))
    return (Decimal(quantity) * Decimal(unit_price)).quantize(step, rounding=ROUND_HALF_UP)


@pytest.mark.parametrize(
    ("amount", "quantity", "currency", "expected"),
    [
        (1000, 1, "USD", ("1", "10.00")),
        (10000, 3, "USD", ("3", "33.333")),  # net 100.00 for 3 units: 99.999 → 100.00
        (2001, 2, "JPY", ("2", "1000.5")),
        (2500, 2, "KWD", ("2", "1.250")),
        (-500, 1, "USD", ("1", "-5.00")),  # a proration credit line
        (-1000, 3, "USD", ("3", "-3.333")),
        (840, None, "USD", ("1", "8.40")),
        (100, 7, "USD", ("7", "0.143")),  # 7 x 0.143 = 1.001 → 1.00
        (100, 9999, "USD", ("9999", "0.0001")),  # all 4 extra decimals: 0.9999 → 1.00
        (1, 3, "USD", ("3", "0.003")),  # 3 x 0.003 = 0.009 → 0.01
    ],
)
def test_line_price_examples(
    amount: int, quantity: int | None, currency: str, expected: tuple[str, str]
) -> None:
    assert line_price(amount, quantity, currency) == expected
    assert extension(*expected, currency) == Decimal(amount).scaleb(-exponent(currency))


def test_quantity_beyond_four_decimals_falls_back_to_one_unit_of_the_amount() -> None:
    # 123,457 units of 0.01 in total: no 4-decimal unit price extends to exactly 0.01.
    assert line_price(1, 123_457, "USD") == ("1", "0.01")


def test_polars_form_equals_reference_and_is_exact() -> None:
    rng = random.Random(7)
    rows = [
        (
            rng.randint(-(10**7), 10**7),
            rng.choice([None, 0, 1, 2, 3, 7, 12, 99, 1000, 9999, 10_000, 123_457]),
            rng.choice(["USD", "JPY", "KWD", "EUR"]),
        )
        for _ in range(5000)
    ]
    df = pl.DataFrame(rows, schema=["amount", "quantity", "currency"], orient="row")
    out = with_line_prices(
        df,
        pl.col("amount"),
        pl.col("quantity"),
        exponent_expr(pl.col("currency")),
        quantity_as="q",
        price_as="price",
    )
    assert out.columns == ["amount", "quantity", "currency", "q", "price"]  # no step left
    for amount, quantity, currency, q_s, price_s in out.iter_rows():
        assert (q_s, price_s) == line_price(amount, quantity, currency)
        exp = exponent(currency)
        assert extension(q_s, price_s, currency) == Decimal(amount).scaleb(-exp)
        decimals = len(price_s.split(".")[1]) if "." in price_s else 0
        assert exp <= decimals <= exp + 4
        if quantity is not None and 1 <= quantity < 10_000:
            assert q_s == str(quantity)  # Stripe's quantity kept: stock moves by it
