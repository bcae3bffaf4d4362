"""Planning after an invoice is posted (issue 19): credit notes, voids, write-offs."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import polars as pl
import pytest

from stripe_sage.mapping import load_mapping
from stripe_sage.plan.after_posting import plan_credit_notes, plan_invoice_closures
from stripe_sage.plan.invoice_tax import TAXES_DTYPE

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
RATE = "txr_ca"


def taxes(*amounts: int) -> list[dict[str, Any]]:
    return [
        {"tax_rate": f"{RATE}{k}", "amount": a, "taxable_amount": a * 10, "inclusive": False}
        for k, a in enumerate(amounts)
    ]


def rates(n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": [f"{RATE}{k}" for k in range(n)],
            "jurisdiction": ["US - CA"] * n,
            "percentage": [8.25] * n,
            "display_name": ["Sales Tax"] * n,
        }
    )


def payloads(docs: pl.DataFrame) -> dict[str, dict[str, Any]]:
    return {k: json.loads(p) for k, p in zip(docs["doc_key"], docs["payload"], strict=True)}


def invoices(rows: list[dict[str, Any]]) -> pl.DataFrame:
    base = {
        "customer": "cus_1",
        "currency": "USD",
        "number": None,
        "voided_at": T0,
        "marked_uncollectible_at": T0,
        "amount_paid": 0,
    }
    return pl.DataFrame([{**base, **r} for r in rows]).with_columns(
        pl.col("taxes").cast(TAXES_DTYPE)
    )


def test_void_reverses_the_open_balance_and_its_tax_in_proportion() -> None:
    mapping = load_mapping(None)
    inv = invoices(
        [
            {"id": "in_v", "status": "void", "total": 1000, "amount_remaining": 333,
             "taxes": taxes(61, 20)},
            {"id": "in_w", "status": "uncollectible", "total": 500, "amount_remaining": 500,
             "taxes": taxes(30)},
            {"id": "in_p", "status": "paid", "total": 500, "amount_remaining": 0,
             "taxes": taxes(30), "marked_uncollectible_at": None, "amount_paid": 500},
        ]
    )  # fmt: skip
    docs = plan_invoice_closures(inv, mapping, None, rates(2))
    p = payloads(docs)
    assert set(p) == {"credit_memo:void:in_v", "credit_memo:writeoff:in_w"}
    void = p["credit_memo:void:in_v"]
    assert void["amount"] == "3.33" and void["invoice_no"] == "@xref:invoice:in_v"
    assert void["reference"] == "in_v" and "expense_account" not in void
    # 81 x 333 / 1000 = 26.97 → 26 in all: 61 x .333 = 20 (+ remainder 0), 20 x .333 = 6
    assert void["tax_amount"] == "0.26"
    assert sum(Decimal(t["amount"]) for t in void["tax_lines"]) == Decimal("0.26")
    wo = p["credit_memo:writeoff:in_w"]
    assert wo["expense_account"] == mapping.accounts.bad_debt and wo["amount"] == "5.00"
    assert wo["tax_amount"] == "0.00"
    deps = dict(zip(docs["doc_key"], docs["depends_on"].to_list(), strict=True))
    assert "invoice:in_v" in deps["credit_memo:void:in_v"]
    assert docs["error"].is_null().all()


def test_credit_note_on_an_open_invoice_is_a_memo_against_it() -> None:
    mapping = load_mapping(None)
    notes = pl.DataFrame(
        [
            {"id": "cn_1", "status": "issued", "invoice": "in_1", "customer": "cus_1",
             "number": "AB-0001-CN-01", "currency": "USD", "total": 1082, "created": T0,
             "effective_at": T0, "taxes": taxes(82), "refunds": []},
            {"id": "cn_2", "status": "issued", "invoice": "in_2", "customer": "cus_1",
             "number": "AB-0002-CN-01", "currency": "USD", "total": 541, "created": T0,
             "effective_at": T0, "taxes": taxes(41), "refunds": ["re_9"]},
        ]
    ).with_columns(pl.col("taxes").cast(TAXES_DTYPE))  # fmt: skip
    p = payloads(plan_credit_notes(notes, mapping, None, rates(1)))
    on_open = p["credit_memo:cn_1"]
    assert on_open["invoice_no"] == "@xref:invoice:in_1"
    assert on_open["amount"] == "10.82" and on_open["tax_amount"] == "0.82"
    assert "gl_account" not in on_open  # Sage credits the invoice's receivable
    refunding = p["credit_memo:cn_2"]
    assert "invoice_no" not in refunding
    assert refunding["gl_account"] == mapping.accounts.clearing["USD"]
    assert refunding["tax_amount"] == "0.41"


def test_a_refund_a_credit_note_names_is_not_planned_again() -> None:
    from stripe_sage.plan.credit_memos import plan_refunds
    from tests.unit.test_defaults import refunds
    from tests.unit.test_transform import bts, charges, periods

    usd = {"amount": 5_000, "currency": "USD", "balance_transaction": "txn_1"}
    rows: list[dict[str, Any]] = [
        {"id": "re_a", "amount": 1_000, "balance_transaction": "txn_ra"},
        {"id": "re_b", "amount": 2_000, "balance_transaction": "txn_rb"},
    ]
    refund_bts = [
        {"id": "txn_1", "amount": 5_000},
        {"id": "txn_ra", "amount": -1_000},
        {"id": "txn_rb", "amount": -2_000},
    ]
    args = (refunds(*rows), charges(usd), bts(*refund_bts), load_mapping(), periods())
    alone = plan_refunds(*args)
    assert {"credit_memo:re_a", "credit_memo:re_b"} <= set(alone["doc_key"])
    docs = plan_refunds(*args, credited_refunds=["re_a"])
    assert "credit_memo:re_b" in set(docs["doc_key"])
    assert not any("re_a" in k for k in docs["doc_key"])


def test_a_refund_of_an_invoice_payment_without_a_credit_note_names_the_invoice() -> None:
    """ACCOUNTING.md "Stripe Billing, completely": a refund memo as for any refund (to Stripe
    Clearing, no ``invoice_no``: the invoice stays paid), its reason naming the invoice by
    its Stripe number, else its id; never cut off, however long what comes before it."""
    from stripe_sage.plan.credit_memos import plan_refunds, refunded_invoices
    from tests.unit.test_defaults import refunds
    from tests.unit.test_transform import bts, charges, periods

    mapping = load_mapping()
    sales = charges(
        {"id": "ch_inv", "balance_transaction": "txn_1"},
        {"id": "ch_new", "balance_transaction": "txn_2"},  # its invoice not staged yet
        {"id": "ch_plain", "balance_transaction": "txn_3"},
        {"id": "ch_fx", "balance_transaction": "txn_4", "currency": "KWD", "amount": 3_250},
        {"id": "ch_eur", "balance_transaction": "txn_5", "currency": "EUR", "amount": 925},
    )
    rows: list[dict[str, Any]] = [
        {"id": "re_inv", "charge": "ch_inv", "balance_transaction": "txn_r1",
         "reason": "duplicate"},
        {"id": "re_new", "charge": "ch_new", "balance_transaction": "txn_r2"},
        {"id": "re_plain", "charge": "ch_plain", "balance_transaction": "txn_r3"},
        {"id": "re_fx", "charge": "ch_fx", "balance_transaction": "txn_r4", "currency": "KWD",
         "amount": 3_250, "reason": "fraudulent"},
        {"id": "re_eur", "charge": "ch_eur", "balance_transaction": "txn_r5", "currency": "EUR",
         "amount": 925, "reason": "requested_by_customer"},
    ]  # fmt: skip
    moves = [
        {"id": f"txn_{k}", "amount": 1_000} for k in (1, 2, 3)
    ] + [
        {"id": "txn_4", "amount": 1_000_00, "exchange_rate": 30.769231},
        *({"id": f"txn_r{k}", "amount": -1_000} for k in (1, 2, 3)),
        {"id": "txn_r4", "amount": -1_000_00, "exchange_rate": 30.769231},
        {"id": "txn_5", "amount": 1_000, "exchange_rate": 1.081081},
        {"id": "txn_r5", "amount": -1_000, "exchange_rate": 1.081081},
    ]  # fmt: skip
    payments = pl.DataFrame(
        {
            "charge": ["ch_inv", "ch_new", "ch_fx", "ch_plain", "ch_eur"],
            "invoice": ["in_1", "in_2", "in_1PlongStripeInvoiceId00", "in_open", "in_eur"],
            "status": ["paid", "paid", "paid", "open", "paid"],  # open: it paid nothing
        }
    )
    staged = pl.DataFrame(
        {
            "id": ["in_1", "in_fx", "in_open", "in_eur"],
            "number": ["A1B2C3-0007", "X", "Y", "A1B2C3D4-0012"],
        }
    )
    paid = refunded_invoices(payments, staged)
    docs = plan_refunds(refunds(*rows), sales, bts(*moves), mapping, periods(), None, (), paid)
    p = payloads(docs)
    assert p["credit_memo:re_inv"]["reason"] == "Duplicate charge USD 10.00, invoice A1B2C3-0007"
    assert p["credit_memo:re_new"]["reason"] == "Stripe refund USD 10.00, invoice in_2"
    assert p["credit_memo:re_plain"]["reason"] == "Stripe refund USD 10.00"  # no invoice
    # A foreign sale keeps its presentment amount and rate when the name fits in Sage's 60 ...
    assert p["credit_memo:re_eur"]["reason"] == (
        "Customer request EUR 9.25 @1.081081, invoice A1B2C3D4-0012"
    )
    # ... and when it does not, what comes before the invoice's name gives way.
    assert p["credit_memo:re_fx"]["reason"] == (
        "Fraudulent charge KWD 3., invoice in_1PlongStripeInvoiceId00"
    )
    for key in ("credit_memo:re_inv", "credit_memo:re_new", "credit_memo:re_fx"):
        assert "invoice_no" not in p[key] and p[key]["gl_account"] == "1050"  # stays paid


def test_credit_balance_used_by_an_invoice_is_a_memo_from_customer_credit() -> None:
    from stripe_sage.plan.after_posting import plan_credit_balances

    mapping = load_mapping(None)
    base = {"customer": "cus_1", "currency": "USD", "number": "AB-0007", "created": T0,
            "finalized_at": T0, "total": 2000}  # fmt: skip
    inv = pl.DataFrame(
        [
            # Credit of 5.00 used: Stripe keeps credit negative, ending - starting = 500.
            {**base, "id": "in_c", "status": "open", "starting_balance": -500,
             "ending_balance": 0},
            # No balance, and a debt carried in (positive): no memo.
            {**base, "id": "in_n", "status": "paid", "starting_balance": 0, "ending_balance": 0},
            {**base, "id": "in_d", "status": "paid", "starting_balance": 300,
             "ending_balance": 0},
            # A foreign-currency invoice's credit: an error naming it, never a guess.
            {**base, "id": "in_f", "currency": "EUR", "status": "open",
             "starting_balance": -100, "ending_balance": 0},
        ]
    )  # fmt: skip
    docs = plan_credit_balances(inv, mapping)
    p = payloads(docs)
    assert set(p) == {"credit_memo:balance:in_c", "credit_memo:balance:in_f"}
    memo = p["credit_memo:balance:in_c"]
    assert memo["amount"] == "5.00" and memo["tax_amount"] == "0.00"
    assert memo["invoice_no"] == "@xref:invoice:in_c" and "gl_account" not in memo
    assert memo["expense_account"] == mapping.accounts.customer_credit
    assert memo["reference"] == "in_c-CB"  # the invoice id alone is its void memo's
    assert memo["memo_date"] == "2026-06-01"
    errors = dict(zip(docs["doc_key"], docs["error"], strict=True))
    assert errors["credit_memo:balance:in_c"] is None
    assert (
        "in_f" in errors["credit_memo:balance:in_f"] and "EUR" in errors["credit_memo:balance:in_f"]
    )


def test_a_written_off_invoice_collected_later_books_a_recovery_not_a_receipt() -> None:
    from stripe_sage.plan.cash_receipts import plan_charges
    from tests.unit.test_transform import bts, charges, periods

    mapping = load_mapping(None)
    written_off_at = T0 - dt.timedelta(days=3)
    # Stripe now shows the invoice paid, its write-off time still set: the write-off memo
    # posts for what the later payment paid, whichever run first sees it.
    inv = invoices(
        [{"id": "in_w", "status": "paid", "total": 700, "amount_remaining": 0, "amount_paid": 700,
          "taxes": taxes(30), "marked_uncollectible_at": written_off_at}]
    )  # fmt: skip
    memo = payloads(plan_invoice_closures(inv, mapping, None, rates(1)))[
        "credit_memo:writeoff:in_w"
    ]
    assert memo["amount"] == "7.00" and memo["expense_account"] == mapping.accounts.bad_debt
    payments = pl.DataFrame(
        [
            {"charge": "ch_late", "invoice": "in_w", "status": "paid"},
            {"charge": "ch_ok", "invoice": "in_o", "status": "paid"},
        ]
    )
    written_off = pl.DataFrame({"id": ["in_w"], "marked_uncollectible_at": [written_off_at]})
    docs = plan_charges(
        charges(
            {"id": "ch_late", "amount": 700, "balance_transaction": "txn_l", "created": T0},
            {"id": "ch_ok", "amount": 900, "balance_transaction": "txn_o", "created": T0},
        ),
        bts({"id": "txn_l", "amount": 700}, {"id": "txn_o", "amount": 900}),
        payments,
        mapping,
        periods(),
        None,
        written_off=written_off,
    )
    keys = set(docs["doc_key"])
    assert "cash_receipt:ch_late" not in keys and "cash_receipt:ch_ok" in keys
    p = payloads(docs)
    journal = p["journal_entry:recovery:ch_late"]
    assert journal["reference"] == "ch_late" and journal["entry_date"] == "2026-06-01"
    lines = {ln["account"]: (ln["debit"], ln["credit"]) for ln in journal["lines"]}
    assert lines == {
        mapping.accounts.clearing["USD"]: ("7.00", "0.00"),
        mapping.accounts.bad_debt: ("0.00", "7.00"),
    }
    deps = dict(zip(docs["doc_key"], docs["depends_on"].to_list(), strict=True))
    assert "credit_memo:writeoff:in_w" in deps["journal_entry:recovery:ch_late"]
    phase = dict(zip(docs["doc_key"], docs["phase"].to_list(), strict=True))
    assert phase["journal_entry:recovery:ch_late"] > phase["cash_receipt:ch_ok"]
