"""Foreign-currency invoices converted at the paying charge's rate: every amount rounded
half-up, the remainder on the largest line, lines − discount + tax == the converted total."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import polars as pl
import pytest

from stripe_sage.plan.fx import COMPONENT_SCHEMA, SIGN, settle_invoice_amounts
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
