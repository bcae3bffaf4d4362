"""Foreign-currency invoices converted at the paying charge's rate: every amount rounded
half-up, the remainder on the largest line, lines − discount + tax == the converted total."""

from __future__ import annotations

import datetime as dt
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import polars as pl
import pytest

from stripe_sage.mapping import load_mapping
from stripe_sage.plan.fx import COMPONENT_SCHEMA, SIGN, settle_invoice_amounts
from stripe_sage.plan.invoice_tax import TAXES_DTYPE
from stripe_sage.plan.invoices import plan_invoices
from stripe_sage.sage.loader import wait_kind
from stripe_sage.store.staging import Staging

pytestmark = pytest.mark.unit


def components(rows: list[tuple[str, str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=COMPONENT_SCHEMA, orient="row")


def test_three_equal_lines_a_discount_and_tax_add_up_to_the_settled_amount() -> None:
    # EUR 108.00 (3 lines of 33.33/33.33/33.34, 10.00 off, 18.00 VAT) settled as USD 117.65.
    comp = components(
        [
            ("in_1", "line", "0", 3333),
            ("in_1", "line", "1", 3333),
            ("in_1", "line", "2", 3334),
            ("in_1", "discount", "discount", 1000),
            ("in_1", "tax", "VAT20", 1800),
        ]
    )
    rates = pl.DataFrame(
        {"invoice": ["in_1"], "total": [10800], "paid": [10800], "settled": [11765]}
    )
    out = settle_invoice_amounts(comp, rates)
    got = dict(zip(out["key"], out["settled_amount"], strict=True))
    # 3334 x 1.08935 = 3631.9 → 3632, but the sum is one cent over: the largest line gives it back
    assert got == {"0": 3631, "1": 3631, "2": 3631, "discount": 1089, "VAT20": 1961}
    assert 3631 * 3 - 1089 + 1961 == 11765


def test_zero_decimal_presentment_to_two_decimal_settlement() -> None:
    comp = components([("in_j", "line", "0", -500), ("in_j", "line", "1", 10500)])
    rates = pl.DataFrame(
        {"invoice": ["in_j"], "total": [10000], "paid": [10000], "settled": [6700]}
    )
    out = settle_invoice_amounts(comp, rates)
    assert out["settled_amount"].to_list() == [-335, 7035]  # JPY 10,000 → USD 67.00


def test_random_invoices_convert_exactly() -> None:
    rng = random.Random(20)
    rows: list[tuple[str, str, str, int]] = []
    rates = []
    for n in range(400):
        inv = f"in_{n}"
        lines = [rng.randint(-2_000, 90_000) for _ in range(rng.randint(1, 6))]
        if sum(lines) <= 0:
            lines.append(1 - sum(lines) + rng.randint(0, 5000))
        discount = rng.choice([0, rng.randint(0, sum(lines) // 2)])
        taxes = [rng.randint(0, 5_000) for _ in range(rng.randint(0, 2))]
        total = sum(lines) - discount + sum(taxes)
        rows += [(inv, "line", str(i), a) for i, a in enumerate(lines)]
        rows.append((inv, "discount", "discount", discount))
        rows += [(inv, "tax", f"T{i}", t) for i, t in enumerate(taxes)]
        paid = total if rng.random() < 0.8 else total + rng.randint(1, 1000)
        rates.append((inv, total, paid, max(1, round(paid * rng.uniform(0.005, 3.5)))))
    rate_df = pl.DataFrame(rates, schema=["invoice", "total", "paid", "settled"], orient="row")
    out = settle_invoice_amounts(components(rows), rate_df)
    by_inv = {r[0]: r for r in rates}
    for (inv,), grp in out.group_by("invoice"):
        _, total, paid, settled = by_inv[str(inv)]
        signed = sum(SIGN[k] * a for k, a in zip(grp["kind"], grp["settled_amount"], strict=True))
        expected = (2 * total * settled + paid) // (2 * paid)
        assert signed == expected
        if paid == total:
            assert signed == settled  # paid in full by one charge: exactly its bt.amount
        # Every amount is its own conversion, but for one line by the remainder.
        off = [
            (k, a, s)
            for k, a, s in zip(grp["kind"], grp["amount"], grp["settled_amount"], strict=True)
            if abs(s - a * settled / paid) > 0.5 + 1e-9
        ]
        assert len(off) <= 1 and all(k == "line" for k, _, _ in off)


def test_awaiting_settlement_is_overdue_only_after_its_due_date(tmp_path: Path) -> None:
    """A foreign-currency invoice not paid yet waits as its normal state: the waiting alert
    counts from the due date its reason names, not from when it began to wait."""
    reason = (
        "waiting: awaiting settlement: EUR invoice in_1 posts when Stripe settles its "
        "payment (due 2026-07-15)"
    )
    bt_reason = "waiting: balance transaction txn_1 is not staged"
    since = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    with Staging(tmp_path / "s.duckdb") as st:
        for key, why, kind in [
            ("invoice:in_1", reason, "settlement"),
            ("cash_receipt:ch_1", bt_reason, "balance_transaction"),
        ]:
            st.con.execute(
                "INSERT INTO sage.outbox (doc_key, doc_type, stripe_id, status, last_error, "
                "created_at, waiting_since, wait_kind) VALUES (?, ?, ?, 'waiting', ?, ?, ?, ?)",
                [key, key.split(":")[0], key.split(":")[1], why, since, since, kind],
            )
        hours = {"default": 24.0}
        before_due = st.overdue_waiting(hours, now=dt.datetime(2026, 7, 10, tzinfo=dt.UTC))
        assert [o["doc_key"] for o in before_due] == ["cash_receipt:ch_1"]
        after_due = st.overdue_waiting(hours, now=dt.datetime(2026, 7, 17, tzinfo=dt.UTC))
        assert sorted(o["doc_key"] for o in after_due) == ["cash_receipt:ch_1", "invoice:in_1"]


# -- planning a foreign-currency invoice -----------------------------------------------------
def eur_invoice() -> tuple[pl.DataFrame, pl.DataFrame]:
    """EUR lines 33.33 + 33.33 (3 units) + 33.34 (2 units), 10.00 off, 18.00 VAT: 108.00,
    as staged (the issue-18 columns)."""
    taxes = [
        {"tax_rate": "txr_vat", "amount": 1800, "taxable_amount": 9000, "inclusive": False},
    ]
    inv = pl.DataFrame(
        {
            "id": ["in_eur"],
            "customer": ["cus_1"],
            "status": ["paid"],
            "currency": ["EUR"],
            "tax": [1800],
            "tax_inclusive": [0],
            "tax_exclusive": [1800],
            "discount": [1000],
            "taxes": [taxes],
            "total": [10800],
            "finalized_at": [None],
            "created": [dt.datetime(2026, 6, 10, 12, tzinfo=dt.UTC)],
            "due_date": [None],
        },
        schema_overrides={
            "finalized_at": pl.Datetime("us", "UTC"),
            "due_date": pl.Datetime("us", "UTC"),
            "taxes": TAXES_DTYPE,
        },
    )
    lines = pl.DataFrame(
        [
            {
                "id": f"il_{k}",
                "invoice": "in_eur",
                "position": k,
                "amount": amount,
                "currency": "EUR",
                "description": f"line {k}",
                "quantity": quantity,
                "product": None,
                "product_staged": None,
                "discount": 0,
                "tax_inclusive": 0,
                "tax_exclusive": 0,
                "taxes": [],
                "proration": False,
            }
            for k, (amount, quantity) in enumerate([(3333, 1), (3333, 3), (3334, 2)])
        ],
        schema_overrides={"taxes": TAXES_DTYPE, "product": pl.String, "product_staged": pl.Boolean},
    )
    return inv, lines


def test_a_paid_foreign_invoice_posts_in_usd_at_its_charges_rate() -> None:
    inv, lines = eur_invoice()
    settlements = pl.DataFrame(
        {"invoice": ["in_eur"], "paid": [10800], "settled": [11765], "settlement_currency": ["USD"]}
    )
    rates = pl.DataFrame(
        {"id": ["txr_vat"], "jurisdiction": ["GB"], "percentage": [20.0], "display_name": ["VAT"]}
    )
    [row] = plan_invoices(
        inv, lines, load_mapping(), tax_rates=rates, settlements=settlements
    ).iter_rows(named=True)
    assert row["error"] is None
    payload = json.loads(row["payload"])
    assert payload["currency"] == "USD" and payload["total"] == "117.65"  # the charge's bt
    assert payload["discount_amount"] == "10.89" and payload["tax_amount"] == "19.61"
    assert [ln["quantity"] for ln in payload["lines"]] == ["1", "3", "2"]  # stock as Stripe's
    # Sage's own total rule on the converted payload, exactly.
    extended = sum(
        (Decimal(ln["quantity"]) * Decimal(ln["unit_price"])).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP
        )
        for ln in payload["lines"]
    )
    total = extended - Decimal(payload["discount_amount"]) + Decimal(payload["tax_amount"])
    assert total == Decimal("117.65")
    assert payload["tax_lines"] == [{"tax_code": "VAT20", "amount": "19.61"}]


def test_an_unpaid_foreign_invoice_awaits_settlement_with_its_due_date() -> None:
    inv, lines = eur_invoice()
    inv = inv.with_columns(pl.lit("open").alias("status"))
    [row] = plan_invoices(inv, lines, load_mapping(), settlements=None).iter_rows(named=True)
    assert row["error"].startswith("waiting: awaiting settlement: EUR invoice in_eur")
    assert "(due 2026-06-10)" in row["error"]  # automatic collection: due when finalized
    assert wait_kind(row["error"]) == "settlement"
