"""Payout journal lines (pure): the clearing method of docs/accounting.md."""

from __future__ import annotations

from typing import Any

import pytest

from stripe_sage.mapping import load_mapping
from stripe_sage.reconcile.report import payout_lines

pytestmark = pytest.mark.unit
MAPPING = load_mapping()


def bt(category: str, amount: int, fee: int = 0, n: int = 0) -> dict[str, Any]:
    return {
        "balance_transaction": f"txn_{category}{n}",
        "reporting_category": category,
        "amount": amount,
        "fee": fee,
        "net": amount - fee,
    }


def payout(members: list[dict[str, Any]], amount: int | None = None) -> dict[str, Any]:
    return {
        "id": "po_1",
        "currency": "USD",
        "amount": sum(m["net"] for m in members) if amount is None else amount,
    }


def test_charges_refunds_and_fees() -> None:
    members = [bt("charge", 10_000, 320), bt("charge", 5_000, 175, 1), bt("refund", -2_000)]
    lines, error = payout_lines(payout(members), members, MAPPING)
    assert error is None
    assert dict(lines) == {"1000": 12_505, "6100": 495, "1050": -13_000}
    assert sum(v for _, v in lines) == 0


def test_dispute_lost_and_won_with_fee_returned() -> None:
    members = [
        bt("charge", 10_000, 320),
        bt("dispute", -4_000, 1_500),
        bt("dispute_reversal", 4_000, -1_500, 1),
    ]
    lines, error = payout_lines(payout(members), members, MAPPING)
    assert error is None
    # chargebacks and dispute fees cancel out once the dispute is won back
    assert dict(lines) == {"1000": 9_680, "6100": 320, "1050": -10_000}


def test_dispute_withdrawal_is_not_hidden_as_a_fee() -> None:
    members = [bt("charge", 10_000, 320), bt("dispute", -4_000, 1_500)]
    lines, _ = payout_lines(payout(members), members, MAPPING)
    assert dict(lines) == {
        "1000": 4_180,
        "6100": 320,
        "6110": 4_000,
        "6120": 1_500,
        "1050": -10_000,
    }


def test_billing_fee_and_refund_failure() -> None:
    members = [
        bt("charge", 10_000, 320),
        bt("fee", -2_500),
        bt("refund", -1_000, 0, 1),
        bt("refund_failure", 1_000, 0, 2),
    ]
    lines, _ = payout_lines(payout(members), members, MAPPING)
    assert dict(lines) == {"1000": 7_180, "6100": 2_820, "1050": -10_000}


def test_unmapped_category_posts_to_suspense_and_the_payout_still_balances() -> None:
    # An unknown category no longer blocks the payout (issue 21): suspense, flagged there.
    members = [bt("charge", 10_000, 320), bt("brand_new_category", -700)]
    lines, error = payout_lines(payout(members), members, MAPPING)
    assert error is None
    assert dict(lines) == {"1000": 8_980, "6100": 320, "9990": 700, "1050": -10_000}


def test_unexplained_remainder_is_an_error() -> None:
    members = [bt("charge", 10_000, 320)]
    lines, error = payout_lines(payout(members, amount=9_000), members, MAPPING)
    assert lines == [] and error is not None and "unexplained remainder -680" in error
