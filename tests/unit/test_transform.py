"""Pure functions: money rendering, the mapping file, the Polars planners."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_series_equal

from stripe_sage.errors import ConfigurationError
from stripe_sage.mapping import default_mapping_text, load_mapping
from stripe_sage.money import UnknownCurrencyError, from_decimal_string, to_decimal_string
from stripe_sage.plan.cash_receipts import plan_charges
from stripe_sage.plan.credit_memos import plan_refunds
from stripe_sage.plan.customers import plan_customers, sage_customer_id
from stripe_sage.plan.documents import money_string, periods_frame

pytestmark = pytest.mark.unit
UTC = dt.UTC


# -- money ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("minor", "currency", "text"),
    [
        (1000, "JPY", "1000"),
        (1250, "KWD", "1.250"),
        (1234, "usd", "12.34"),
        (5, "EUR", "0.05"),
        (-1250, "KWD", "-1.250"),
        (0, "USD", "0.00"),
        (7, "BHD", "0.007"),
        (100, "ISK", "1.00"),
    ],
)
def test_minor_units_render_by_the_exponent_table(minor: int, currency: str, text: str) -> None:
    assert to_decimal_string(minor, currency) == text
    assert from_decimal_string(text, currency) == minor
    frame = pl.DataFrame({"a": [minor], "c": [currency]})
    assert frame.select(money_string(pl.col("a"), pl.col("c")))[0, 0] == text


def test_unknown_currency_is_an_error_not_a_guess() -> None:
    with pytest.raises(UnknownCurrencyError, match="XYZ"):
        to_decimal_string(100, "XYZ")
    with pytest.raises(ValueError, match="exactly 2 decimals"):
        from_decimal_string("12.3", "USD")


def test_polars_money_matches_python_money_for_many_values() -> None:
    values = list(range(-2005, 2005, 7))
    for cur in ("USD", "JPY", "KWD"):
        frame = pl.DataFrame({"a": values, "c": [cur] * len(values)})
        got = frame.select(money_string(pl.col("a"), pl.col("c")).alias("s"))["s"]
        assert_series_equal(got, pl.Series("s", [to_decimal_string(v, cur) for v in values]))


# -- mapping ---------------------------------------------------------------------------------
def test_default_mapping_loads() -> None:
    m = load_mapping()
    assert m.accounts.clearing["USD"] == "1050"
    assert m.customers.fields["name"].max_length == 40


def test_mapping_with_unknown_field_names_the_line() -> None:
    text = default_mapping_text().replace("from: card_brand", "from: card_brnd")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "card_brnd" in t)
    with pytest.raises(ConfigurationError, match=rf"line {line}: .*unknown field 'card_brnd'"):
        load_mapping(text=text)


def test_mapping_with_bad_value_names_the_line() -> None:
    text = default_mapping_text().replace(
        "closed_period_policy: next_open", "closed_period_policy: sometimes"
    )
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "sometimes" in t)
    with pytest.raises(ConfigurationError, match=rf"line {line}: closed_period_policy"):
        load_mapping(text=text)


def test_rule_needs_exactly_one_source() -> None:
    text = default_mapping_text().replace(
        "currency: {const: USD}", "currency: {const: USD, from: currency}"
    )
    with pytest.raises(ConfigurationError, match="exactly one of"):
        load_mapping(text=text)


# -- builders --------------------------------------------------------------------------------
def ts(day: str) -> dt.datetime:
    return dt.datetime.fromisoformat(day).replace(tzinfo=UTC)


def charges(*rows: dict[str, Any]) -> pl.DataFrame:
    base = {
        "id": "ch_1",
        "created": ts("2026-06-10T12:00:00"),
        "amount": 1000,
        "currency": "USD",
        "customer": "cus_1",
        "status": "succeeded",
        "paid": True,
        "balance_transaction": "txn_1",
        "erp_order_id": None,
        "card_brand": "visa",
        "description": "Order payment",
    }
    return pl.DataFrame([{**base, **r} for r in rows])


def bts(*rows: dict[str, Any]) -> pl.DataFrame:
    base = {
        "id": "txn_1",
        "amount": 1000,
        "currency": "USD",
        "exchange_rate": None,
        "created": ts("2026-06-10T12:00:00"),
    }
    return pl.DataFrame(
        [{**base, **r} for r in rows], schema_overrides={"exchange_rate": pl.Float64}
    )


NO_PAYMENTS = pl.DataFrame(schema={"charge": pl.String, "invoice": pl.String, "status": pl.String})


def periods(closed: tuple[int, ...] = ()) -> pl.DataFrame:
    rows = []
    for m in range(1, 13):
        end = (dt.date(2026, m % 12 + 1, 1) if m < 12 else dt.date(2027, 1, 1)) - dt.timedelta(1)
        rows.append(
            {
                "year": 2026,
                "period": m,
                "start": f"2026-{m:02d}-01",
                "end": end.isoformat(),
                "status": "closed" if m in closed else "open",
            }
        )
    return periods_frame(rows)


def payloads(docs: pl.DataFrame, doc_type: str) -> list[dict[str, Any]]:
    return [json.loads(p) for p in docs.filter(pl.col("doc_type") == doc_type)["payload"]]


# -- planners --------------------------------------------------------------------------------
def test_charge_becomes_invoice_and_receipt_in_settlement_currency() -> None:
    docs = plan_charges(
        charges({"id": "ch_1", "amount": 5000, "currency": "JPY"}),
        bts({"id": "txn_1", "amount": 3350, "exchange_rate": 0.0067}),
        NO_PAYMENTS,
        load_mapping(),
        periods(),
    )
    [invoice] = payloads(docs, "invoice")
    [receipt] = payloads(docs, "cash_receipt")
    assert invoice["total"] == receipt["amount"] == "33.50"
    assert invoice["currency"] == receipt["currency"] == "USD"
    assert receipt["apply_to"] == [{"invoice_no": "@xref:invoice:ch_1", "amount": "33.50"}]
    assert receipt["deposit_account"] == "1050"
    assert "JPY 5000 @0.0067" in receipt["memo"]
    assert receipt["payment_method"] == "VISA"
    assert docs.filter(pl.col("doc_type") == "cash_receipt")["depends_on"].to_list() == [
        ["customer:cus_1", "invoice:ch_1"]
    ]
    assert docs["error"].null_count() == docs.height


def test_charge_paying_a_billing_invoice_makes_only_a_receipt_applied_to_it() -> None:
    paid = pl.DataFrame({"charge": ["ch_1"], "invoice": ["in_9"], "status": ["paid"]})
    docs = plan_charges(charges({}), bts({}), paid, load_mapping(), periods())
    assert docs["doc_type"].to_list() == ["cash_receipt"]
    assert payloads(docs, "cash_receipt")[0]["apply_to"][0]["invoice_no"] == "@xref:invoice:in_9"


def test_erp_charge_invoices_the_existing_sales_order() -> None:
    docs = plan_charges(
        charges({"erp_order_id": "SO0000042"}), bts({}), NO_PAYMENTS, load_mapping(), periods()
    )
    assert payloads(docs, "invoice")[0]["sales_order_no"] == "SO0000042"


def test_sales_order_setting_plans_order_then_invoice_of_it() -> None:
    text = default_mapping_text().replace(
        "document: invoice ", "document: sales_order_and_invoice "
    )
    docs = plan_charges(charges({}), bts({}), NO_PAYMENTS, load_mapping(text=text), periods())
    assert sorted(docs["doc_type"].to_list()) == ["cash_receipt", "invoice", "sales_order"]
    assert payloads(docs, "invoice")[0]["sales_order_no"] == "@xref:sales_order:ch_1"
    inv_deps = docs.filter(pl.col("doc_type") == "invoice")["depends_on"][0].to_list()
    assert "sales_order:ch_1" in inv_deps


def test_missing_balance_transaction_waits_instead_of_posting() -> None:
    docs = plan_charges(
        charges({"balance_transaction": "txn_x"}), bts({}), NO_PAYMENTS, load_mapping(), periods()
    )
    assert all(e.startswith("waiting: balance transaction txn_x") for e in docs["error"])


def test_closed_period_next_open_redates_with_original_date_in_memo() -> None:
    docs = plan_charges(charges({}), bts({}), NO_PAYMENTS, load_mapping(), periods(closed=(6,)))
    [receipt] = payloads(docs, "cash_receipt")
    assert receipt["receipt_date"] == "2026-07-01"
    assert "orig 2026-06-10" in receipt["memo"] and len(receipt["memo"]) <= 60
    assert payloads(docs, "invoice")[0]["invoice_date"] == "2026-07-01"


def test_closed_period_dead_letter_policy_names_the_period() -> None:
    text = default_mapping_text().replace(
        "closed_period_policy: next_open", "closed_period_policy: dead_letter"
    )
    docs = plan_charges(
        charges({}), bts({}), NO_PAYMENTS, load_mapping(text=text), periods(closed=(6,))
    )
    assert all("closed fiscal period 2026-06" in e for e in docs["error"])


def test_time_zone_decides_the_document_date() -> None:
    text = default_mapping_text().replace("timezone: UTC", "timezone: America/Los_Angeles")
    docs = plan_charges(
        charges({"created": ts("2026-06-10T03:00:00")}),
        bts({}),
        NO_PAYMENTS,
        load_mapping(text=text),
        periods(),
    )
    assert payloads(docs, "cash_receipt")[0]["receipt_date"] == "2026-06-09"


def test_customer_name_over_40_is_shortened_or_rejected_naming_the_field() -> None:
    customers = pl.DataFrame(
        {
            "id": ["cus_a", "cus_b", "cus_c"],
            "name": ["A" * 41, "Short", "Linked"],
            "email": ["a@x.io", None, None],
            "phone": [None] * 3,
            "address_line1": [None] * 3,
            "address_line2": [None] * 3,
            "city": [None] * 3,
            "state": [None] * 3,
            "postal_code": [None] * 3,
            "country": ["us", None, None],
            "currency": ["USD"] * 3,
            "sage_customer_id": [None, None, "E0000001"],
            "deleted": [False, False, True],
        },
        schema_overrides={
            "phone": pl.String,
            "address_line1": pl.String,
            "address_line2": pl.String,
            "city": pl.String,
            "state": pl.String,
            "postal_code": pl.String,
        },
    )
    # The default shortens (one 41-character word: cut at 40) ...
    shortened = plan_customers(customers, load_mapping())
    a = shortened.filter(pl.col("doc_key") == "customer:cus_a").row(0, named=True)
    assert a["error"] is None and json.loads(a["payload"])["name"] == "A" * 40
    # ... and a mapping that says reject dead-letters the record naming the field.
    text = default_mapping_text().replace("on_overflow: shorten", "on_overflow: reject")
    docs = plan_customers(customers, load_mapping(text=text))
    by_key = {r["doc_key"]: r for r in docs.iter_rows(named=True)}
    assert "name is 41 characters" in by_key["customer:cus_a"]["error"]
    b = json.loads(by_key["customer:cus_b"]["payload"])
    assert b["customer_id"] == sage_customer_id("cus_b") and b["status"] == "active"
    assert by_key["customer_link:cus_c"]["error"] is None
    assert json.loads(by_key["customer_link:cus_c"]["payload"])["customer_id"] == "E0000001"
    assert json.loads(by_key["customer:cus_a"]["payload"])["country"] == "US"


def test_generated_customer_ids_fit_sage_and_do_not_collide() -> None:
    ids = {sage_customer_id(f"cus_{i:08d}") for i in range(20_000)}
    assert len(ids) == 20_000
    assert all(len(i) <= 10 and i.isalnum() and i.upper() == i for i in ids)
    assert sage_customer_id("cus_1", salt=1) != sage_customer_id("cus_1")


def test_refund_becomes_credit_memo_and_failed_refund_a_reversing_journal() -> None:
    refunds = pl.DataFrame(
        {
            "id": ["re_1", "re_2"],
            "created": [ts("2026-06-11T00:00:00")] * 2,
            "amount": [300, 1000],
            "currency": ["USD", "USD"],
            "charge": ["ch_1", "ch_1"],
            "status": ["succeeded", "failed"],
            "reason": ["duplicate", None],
            "balance_transaction": ["txn_r1", "txn_r2"],
            "failure_balance_transaction": [None, "txn_f2"],
        }
    )
    b = bts(
        {"id": "txn_r1", "amount": -300},
        {"id": "txn_r2", "amount": -1000},
        {"id": "txn_f2", "amount": 1000, "created": ts("2026-06-12T00:00:00")},
    )
    docs = plan_refunds(refunds, charges({}), b, load_mapping(), periods())
    memos = {p["reference"]: p for p in payloads(docs, "credit_memo")}
    assert memos["re_1"]["amount"] == "3.00" and memos["re_1"]["gl_account"] == "1050"
    assert memos["re_1"]["reason"].startswith("Duplicate charge")
    [journal] = payloads(docs, "journal_entry")
    debit = sum(float(line["debit"]) for line in journal["lines"])
    credit = sum(float(line["credit"]) for line in journal["lines"])
    assert debit == credit == 10.0
    assert journal["entry_date"] == "2026-06-12" and journal["source_code"] == "ST"
    assert docs.filter(pl.col("doc_type") == "journal_entry")["doc_key"][0] == (
        "journal_entry:refund_failure:re_2"
    )
