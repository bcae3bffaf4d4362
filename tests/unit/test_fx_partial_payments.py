"""A foreign-currency invoice paid in parts (docs/accounting.md, "Foreign currency, first
class"): the invoice is booked at its first payment's rate; every later part receipts its
share of the booked amount (cumulative, the last part takes the rounding remainder) and a
journal moves what Stripe settled beyond that share between Stripe Clearing and Realized FX
gain/loss — so clearing moves by exactly each charge's bt.amount and the invoice is left
with nothing open."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

import polars as pl
import pytest

from stripe_sage.mapping import load_mapping
from stripe_sage.plan.cash_receipts import plan_charges
from stripe_sage.plan.fx import invoice_payment_shares, invoice_settlements
from tests.unit.test_fx_refunds import account_total
from tests.unit.test_transform import bts, charges, payloads, periods, ts

pytestmark = pytest.mark.unit

# EUR 1,000.00 invoiced; 400.00 paid at 1.08 (USD 432.00), 600.00 later at 1.10 (660.00).
PARTS = [
    ("ch_a", 40_000, 43_200, "2026-06-10T12:00:00"),
    ("ch_b", 60_000, 66_000, "2026-06-20T09:00:00"),
]


def frames(parts: list[tuple[str, int, int, str]], invoice: str = "in_1") -> tuple[Any, ...]:
    ch = charges(
        *[
            {
                "id": cid,
                "amount": amount,
                "currency": "EUR",
                "balance_transaction": f"txn_{cid}",
                "created": ts(at),
            }
            for cid, amount, _, at in parts
        ]
    )
    bt = bts(
        *[
            {"id": f"txn_{cid}", "amount": settled, "exchange_rate": settled / amount}
            for cid, amount, settled, _ in parts
        ]
    )
    pays = pl.DataFrame(
        [
            {
                "invoice": invoice,
                "charge": cid,
                "amount_paid": amount,
                "status": "paid",
                "paid_at": ts(at),
            }
            for cid, amount, _, at in parts
        ],
        schema={
            "invoice": pl.String,
            "charge": pl.String,
            "amount_paid": pl.Int64,
            "status": pl.String,
            "paid_at": pl.Datetime("us", "UTC"),
        },
    )
    return ch, bt, pays


def plan(parts: list[tuple[str, int, int, str]]) -> pl.DataFrame:
    ch, bt, pays = frames(parts)
    shares = invoice_payment_shares(pays, ch, bt)
    return plan_charges(ch, bt, pays, load_mapping(), periods(), None, payment_shares=shares)


def minor(text: str) -> int:
    return int(Decimal(text) * 100)


def test_the_invoice_is_booked_at_its_first_payment_whatever_order_the_rows_come_in() -> None:
    ch, bt, pays = frames(PARTS)
    for rows in (pays, pays.reverse()):
        [row] = invoice_settlements(rows, ch, bt).to_dicts()
        assert (row["paid"], row["settled"]) == (40_000, 43_200)


def test_the_later_part_receipts_its_share_and_books_the_gain() -> None:
    docs = plan(PARTS)
    assert docs["error"].to_list() == [None] * docs.height
    receipts = {r["reference"]: r for r in payloads(docs, "cash_receipt")}
    # Booked at 1.08: the invoice is USD 1,080.00; the first part is its own settled 432.00.
    assert receipts["ch_a"]["amount"] == "432.00"
    assert receipts["ch_b"]["amount"] == "648.00"  # 600.00 x 1.08
    for r in receipts.values():
        assert r["apply_to"] == [{"invoice_no": "@xref:invoice:in_1", "amount": r["amount"]}]
    [journal] = payloads(docs, "journal_entry")
    assert journal["reference"] == "txn_ch_b" and journal["currency"] == "USD"
    assert account_total(docs, "7500") == Decimal("-12.00")  # Cr: a gain of 660.00 - 648.00
    assert account_total(docs, "1050") == Decimal("12.00")
    keys = docs.filter(pl.col("doc_type") == "journal_entry")["doc_key"].to_list()
    assert keys == ["journal_entry:payment_fx:ch_b"]


def test_a_part_settled_at_a_lower_rate_books_a_loss() -> None:
    parts = [PARTS[0], ("ch_b", 60_000, 63_000, "2026-06-20T09:00:00")]
    docs = plan(parts)
    assert account_total(docs, "7500") == Decimal("18.00")  # Dr: 648.00 - 630.00
    assert account_total(docs, "1050") == Decimal("-18.00")


def test_a_part_whose_first_payment_is_not_settled_waits_naming_it() -> None:
    ch, bt, pays = frames(PARTS)
    bt = bt.filter(pl.col("id") != "txn_ch_a")
    shares = invoice_payment_shares(pays, ch, bt)
    docs = plan_charges(ch, bt, pays, load_mapping(), periods(), None, payment_shares=shares)
    later = docs.filter(pl.col("stripe_id") == "ch_b")
    assert later.height == 1  # the receipt only: no FX journal before the share is known
    error = later["error"][0]
    assert error.startswith("waiting:") and "ch_a" in error and "in_1" in error


def test_random_partial_payments_add_up_to_the_booked_total_and_clearing_moves_by_bt() -> None:
    rng = random.Random(2020)
    for n in range(30):
        total = rng.randint(2, 5_000_000)
        k = rng.randint(1, 4)
        cuts = sorted(rng.sample(range(1, total), min(k - 1, total - 1)))
        amounts = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
        base = rng.uniform(0.5, 1.5)
        parts = []
        for p, amount in enumerate(amounts):
            rate = base if p == 0 else base * (1 + rng.uniform(-0.05, 0.05))
            at = (dt.datetime(2026, 6, 1, 12) + dt.timedelta(days=p)).isoformat()
            parts.append((f"ch_{n}_{p}", amount, max(1, round(amount * rate)), at))
        docs = plan(parts)
        assert docs["error"].to_list() == [None] * docs.height, parts
        booked = (2 * total * parts[0][2] + parts[0][1]) // (2 * parts[0][1])
        receipts = payloads(docs, "cash_receipt")
        assert sum(minor(r["amount"]) for r in receipts) == booked, parts
        # Clearing (receipts + journals) moves by exactly Σ bt.amount.
        clearing = sum(minor(r["amount"]) for r in receipts) + int(
            account_total(docs, "1050") * 100
        )
        assert clearing == sum(settled for _, _, settled, _ in parts)
        assert account_total(docs, "7500") == -account_total(docs, "1050")


def test_a_part_settled_in_another_currency_than_the_invoice_is_booked_in_is_an_error() -> None:
    ch, bt, pays = frames(PARTS)
    bt = bt.with_columns(
        pl.when(pl.col("id") == "txn_ch_b")
        .then(pl.lit("GBP"))
        .otherwise("currency")
        .alias("currency")
    )
    mapping = load_mapping()
    mapping.settlement_currencies = ["USD", "GBP"]
    shares = invoice_payment_shares(pays, ch, bt)
    docs = plan_charges(ch, bt, pays, mapping, periods(), None, payment_shares=shares)
    [error] = docs.filter(pl.col("stripe_id") == "ch_b")["error"].to_list()
    assert error is not None and not error.startswith("waiting:")
    assert "GBP" in error and "in_1" in error and "USD" in error
