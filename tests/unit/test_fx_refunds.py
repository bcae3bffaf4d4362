"""Refunds of foreign-currency sales (docs/accounting.md, "Foreign currency, first class"):
the memo reverses the sale at the charge's rate, a journal books the rate difference between
Stripe Clearing and Realized FX gain/loss; clearing moves by exactly the refund's bt.amount."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import polars as pl
import pytest

from stripe_sage.mapping import load_mapping
from stripe_sage.plan.credit_memos import plan_refunds
from tests.unit.test_defaults import refunds
from tests.unit.test_transform import bts, charges, payloads, periods, ts

pytestmark = pytest.mark.unit

# EUR 500.00 sold at 1.08 → USD 540.00 settled; refunds settle at later rates.
EUR_CHARGE = {"amount": 50_000, "currency": "EUR", "balance_transaction": "txn_1"}
EUR_SETTLED = {"id": "txn_1", "amount": 54_000, "exchange_rate": 1.08}


def clearing_movement(docs: pl.DataFrame, account: str = "1050") -> Decimal:
    """How the documents move Stripe Clearing (debit positive)."""
    total = Decimal(0)
    for memo in payloads(docs, "credit_memo"):
        if memo["gl_account"] == account:
            total -= Decimal(memo["amount"])
    for journal in payloads(docs, "journal_entry"):
        for line in journal["lines"]:
            if line["account"] == account:
                total += Decimal(line["debit"]) - Decimal(line["credit"])
    return total


def account_total(docs: pl.DataFrame, account: str) -> Decimal:
    return sum(
        (
            Decimal(line["debit"]) - Decimal(line["credit"])
            for journal in payloads(docs, "journal_entry")
            for line in journal["lines"]
            if line["account"] == account
        ),
        Decimal(0),
    )


def plan(refund_rows: list[dict[str, Any]], refund_bts: list[dict[str, Any]]) -> pl.DataFrame:
    return plan_refunds(
        refunds(*refund_rows),
        charges(EUR_CHARGE),
        bts(EUR_SETTLED, *refund_bts),
        load_mapping(),
        periods(),
    )


def test_full_refund_at_a_higher_rate_reverses_the_sale_and_books_the_loss() -> None:
    docs = plan(
        [{"amount": 50_000, "currency": "EUR"}],
        [{"id": "txn_r1", "amount": -55_000, "exchange_rate": 1.10}],
    )
    assert docs["error"].to_list() == [None, None]
    [memo] = payloads(docs, "credit_memo")
    assert memo["amount"] == "540.00"  # the sale, exactly: net sales back where they were
    [journal] = payloads(docs, "journal_entry")
    assert journal["reference"] == "txn_r1"  # the refund id is the memo's
    assert account_total(docs, "7500") == Decimal("10.00")  # a loss: Dr FX gain/loss
    assert clearing_movement(docs) == Decimal("-550.00")  # exactly the refund's bt.amount
    assert docs.filter(pl.col("doc_type") == "journal_entry")["doc_key"].to_list() == [
        "journal_entry:refund_fx:re_1"
    ]


def test_refund_at_a_lower_rate_books_a_gain() -> None:
    docs = plan(
        [{"amount": 50_000, "currency": "EUR"}],
        [{"id": "txn_r1", "amount": -53_000, "exchange_rate": 1.06}],
    )
    assert account_total(docs, "7500") == Decimal("-10.00")  # Cr FX gain/loss
    assert clearing_movement(docs) == Decimal("-530.00")


def test_partial_refunds_add_up_to_the_sale_and_the_last_takes_the_remainder() -> None:
    # 3 refunds of a third each: cumulative rounding (180.00, 180.01), the last the rest.
    rows = [
        {"id": "re_1", "amount": 16_667, "created": ts("2026-06-11T00:00:00")},
        {"id": "re_2", "amount": 16_667, "created": ts("2026-06-12T00:00:00"),
         "balance_transaction": "txn_r2"},
        {"id": "re_3", "amount": 16_666, "created": ts("2026-06-13T00:00:00"),
         "balance_transaction": "txn_r3"},
    ]  # fmt: skip
    rows = [{"currency": "EUR", **r} for r in rows]
    refund_bts = [
        {"id": "txn_r1", "amount": -18_200},
        {"id": "txn_r2", "amount": -18_100},
        {"id": "txn_r3", "amount": -17_900},
    ]
    docs = plan(rows, refund_bts)
    memos = {m["reference"]: Decimal(m["amount"]) for m in payloads(docs, "credit_memo")}
    assert sum(memos.values()) == Decimal("540.00")
    assert memos == {
        "re_1": Decimal("180.00"),
        "re_2": Decimal("180.01"),
        "re_3": Decimal("179.99"),
    }
    assert clearing_movement(docs) == Decimal("-542.00")
    # Planned one at a time (the earlier ones already posted), the shares are the same.
    alone = plan_refunds(
        refunds(rows[2]),
        charges(EUR_CHARGE),
        bts(EUR_SETTLED, *refund_bts),
        load_mapping(),
        periods(),
        charge_refunds=refunds(*rows),
    )
    [memo] = payloads(alone, "credit_memo")
    assert memo["amount"] == "179.99"


def test_same_currency_refund_has_no_fx_journal() -> None:
    docs = plan_refunds(
        refunds({}), charges({}), bts({}, {"id": "txn_r1", "amount": -1000}), load_mapping(),
        periods(),
    )  # fmt: skip
    assert docs["doc_type"].to_list() == ["credit_memo"]
    assert payloads(docs, "credit_memo")[0]["amount"] == "10.00"


def test_failed_fx_refund_reverses_the_memo_and_the_fx_difference() -> None:
    docs = plan(
        [{"amount": 50_000, "currency": "EUR", "status": "failed",
          "failure_balance_transaction": "txn_f1"}],
        [{"id": "txn_r1", "amount": -55_000},
         {"id": "txn_f1", "amount": 55_000, "created": ts("2026-06-12T00:00:00")}],
    )  # fmt: skip
    keys = sorted(docs["doc_key"].to_list())
    assert keys == [
        "credit_memo:re_1",
        "journal_entry:refund_failure:re_1",
        "journal_entry:refund_fx:re_1",
    ]
    assert clearing_movement(docs) == Decimal("0.00")  # the money came back
    assert account_total(docs, "7500") == Decimal("0.00")
    # Sales Returns: the memo debits it 540.00 (Sage posts a memo's expense side), the
    # failure journal credits it back.
    memo_debit = sum(Decimal(m["amount"]) for m in payloads(docs, "credit_memo"))
    assert memo_debit + account_total(docs, "4900") == Decimal("0.00")
    for journal in payloads(docs, "journal_entry"):
        debit = sum(Decimal(line["debit"]) for line in journal["lines"])
        assert debit == sum(Decimal(line["credit"]) for line in journal["lines"])


def test_fx_refund_waits_for_its_charges_balance_transaction() -> None:
    docs = plan_refunds(
        refunds({"amount": 50_000, "currency": "EUR"}),
        charges(EUR_CHARGE),
        bts({"id": "txn_r1", "amount": -55_000}),  # the charge's own bt is not staged
        load_mapping(),
        periods(),
    )
    [error] = docs["error"].to_list()
    assert error is not None and error.startswith("waiting:") and "ch_1" in error
