"""Planning complete Billing invoices (issue 18): lines net of inclusive tax, discounts,
tax lines per Stripe tax rate coded by the mapping, proration credits, Stripe's total.

Each expectation is worked out by hand from the Stripe amounts in the test, and every payload
is also checked against Sage's own total rule (Σ quantity × unit_price rounded half-up −
discount_amount + tax_amount = total), computed here with ``Decimal``."""

from __future__ import annotations

import datetime as dt
import json
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import polars as pl
import pytest

from stripe_sage.errors import ConfigurationError
from stripe_sage.mapping import Mapping, default_mapping_text, load_mapping
from stripe_sage.plan.invoice_tax import TAXES_DTYPE
from stripe_sage.plan.invoices import plan_invoices

CA, IL, CHI, VAT = "txr_ca", "txr_il", "txr_chi", "txr_vat"
RATES = pl.DataFrame(
    {
        "id": [CA, IL, CHI, VAT],
        "jurisdiction": ["US - CA", "US - IL", "Chicago", "GB"],
        "percentage": [8.25, 6.25, 2.5, 20.0],
        "display_name": ["Sales Tax", "Sales Tax", "City Tax", "VAT"],
    }
)
Tax = tuple[str, int, int, bool]  # (rate, amount, taxable_amount, inclusive)


def taxes(items: list[Tax]) -> list[dict[str, Any]]:
    return [
        {"tax_rate": r, "amount": a, "taxable_amount": t, "inclusive": i} for r, a, t, i in items
    ]


def invoice(
    total: int, lines: list[dict[str, Any]], inv_taxes: list[Tax], discount: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One paid USD invoice with its lines, as staged (the issue-18 columns included)."""
    inclusive = sum(a for _, a, _, i in inv_taxes if i)
    inv = pl.DataFrame(
        {
            "id": ["in_1"],
            "customer": ["cus_1"],
            "status": ["paid"],
            "currency": ["USD"],
            "tax": [sum(a for _, a, _, _ in inv_taxes)],
            "tax_inclusive": [inclusive],
            "tax_exclusive": [sum(a for _, a, _, i in inv_taxes if not i)],
            "discount": [discount],
            "taxes": [taxes(inv_taxes)],
            "total": [total],
            "finalized_at": [None],
            "created": [dt.datetime(2026, 6, 10, 12, tzinfo=dt.UTC)],
        },
        schema_overrides={"finalized_at": pl.Datetime("us", "UTC"), "taxes": TAXES_DTYPE},
    )
    rows = []
    for k, ln in enumerate(lines):
        line_taxes: list[Tax] = ln.get("taxes", [])
        rows.append(
            {
                "id": f"il_{k}",
                "invoice": "in_1",
                "position": k,
                "amount": ln["amount"],
                "currency": "USD",
                "description": f"line {k}",
                "quantity": ln.get("quantity", 1),
                "product": None,
                "product_staged": None,
                "discount": ln.get("discount", 0),
                "tax_inclusive": sum(a for _, a, _, i in line_taxes if i),
                "tax_exclusive": sum(a for _, a, _, i in line_taxes if not i),
                "taxes": taxes(line_taxes),
                "proration": ln.get("proration", False),
            }
        )
    schema = {"taxes": TAXES_DTYPE, "product": pl.String(), "product_staged": pl.Boolean()}
    return inv, pl.DataFrame(rows, schema_overrides=schema)


def plan(
    inv: pl.DataFrame, lines: pl.DataFrame, mapping: Mapping | None = None, rates: Any = RATES
) -> dict[str, Any]:
    [row] = plan_invoices(inv, lines, mapping or load_mapping(), tax_rates=rates).iter_rows(
        named=True
    )
    return row


def cents(money: str) -> int:
    return int(Decimal(money) * 100)


def sage_total(payload: dict[str, Any]) -> int:
    """Sage's rule: Σ line extensions (rounded half-up) − discount_amount + tax_amount."""
    extended = sum(
        (Decimal(ln["quantity"]) * Decimal(ln["unit_price"])).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP
        )
        for ln in payload["lines"]
    )
    return cents(
        str(extended - Decimal(payload["discount_amount"]) + Decimal(payload["tax_amount"]))
    )


def test_inclusive_vat_lines_are_net_of_tax_and_the_total_is_stripes() -> None:
    # 3 x 10.00 with 20% VAT inside: tax 1000 x 20/120 = 166.67 → 167, net 833 over 3 units.
    inv, lines = invoice(
        2001,
        [
            {"amount": 1000, "quantity": 3, "taxes": [(VAT, 167, 833, True)]},
            {"amount": 1001, "taxes": [(VAT, 167, 834, True)]},
        ],
        [(VAT, 334, 1667, True)],
    )
    row = plan(inv, lines)
    assert row["error"] is None
    payload = json.loads(row["payload"])
    assert [ln["quantity"] for ln in payload["lines"]] == ["3", "1"]
    assert payload["lines"][0]["unit_price"] == "2.777"  # 3 x 2.777 = 8.331 → 8.33 (shortest)
    assert payload["lines"][1]["unit_price"] == "8.34"
    assert payload["tax_amount"] == "3.34" and payload["discount_amount"] == "0.00"
    assert payload["tax_lines"] == [{"tax_code": "VAT20", "amount": "3.34"}]
    assert payload["total"] == "20.01" and sage_total(payload) == 2001


def test_percent_coupon_with_exclusive_tax() -> None:
    # 20% off 12.50 and 7.50 (2.50 + 1.50), then 8.25% of the 16.00 left: 1.32.
    inv, lines = invoice(
        1732,
        [
            {"amount": 1250, "discount": 250, "taxes": [(CA, 83, 1000, False)]},
            {"amount": 750, "discount": 150, "taxes": [(CA, 49, 600, False)]},
        ],
        [(CA, 132, 1600, False)],
        discount=400,
    )
    row = plan(inv, lines)
    assert row["error"] is None
    payload = json.loads(row["payload"])
    assert [ln["unit_price"] for ln in payload["lines"]] == ["12.50", "7.50"]  # before discount
    assert payload["discount_amount"] == "4.00"
    assert payload["tax_lines"] == [{"tax_code": "CA", "amount": "1.32"}]
    assert payload["total"] == "17.32" and sage_total(payload) == 1732


def test_two_exclusive_rates_make_two_tax_lines_in_stripes_order() -> None:
    inv, lines = invoice(
        2175,
        [{"amount": 2000, "taxes": [(IL, 125, 2000, False), (CHI, 50, 2000, False)]}],
        [(IL, 125, 2000, False), (CHI, 50, 2000, False)],
    )
    payload = json.loads(plan(inv, lines)["payload"])
    assert payload["tax_lines"] == [
        {"tax_code": "IL", "amount": "1.25"},
        {"tax_code": "CHICAGO", "amount": "0.50"},
    ]
    assert payload["tax_amount"] == "1.75" and sage_total(payload) == 2175


def test_proration_credit_is_a_negative_line() -> None:
    inv, lines = invoice(
        1000,
        [{"amount": -500, "proration": True}, {"amount": 1500, "proration": True}],
        [],
    )
    row = plan(inv, lines)
    payload = json.loads(row["payload"])
    assert row["error"] is None
    assert [ln["unit_price"] for ln in payload["lines"]] == ["-5.00", "15.00"]
    assert payload["tax_lines"] is None and payload["tax_amount"] == "0.00"
    assert sage_total(payload) == 1000


def test_a_rate_without_a_code_is_a_reason_not_a_guess() -> None:
    inv, lines = invoice(
        1100,
        [{"amount": 1000, "taxes": [("txr_x", 100, 1000, False)]}],
        [("txr_x", 100, 1000, False)],
    )
    rates = pl.concat(
        [
            RATES,
            pl.DataFrame(
                {
                    "id": ["txr_x"],
                    "jurisdiction": ["FR"],
                    "percentage": [10.0],
                    "display_name": ["TVA"],
                }
            ),
        ]
    )
    row = plan(inv, lines, rates=rates)
    assert row["error"] == (
        "tax rate txr_x (TVA, FR, 10.0%) has no Sage tax code: add it to the mapping's "
        "tax.codes or tax.by_jurisdiction, or set tax.default_code"
    )
    # A rate not staged yet waits for it (its jurisdiction could still code it) ...
    assert plan(inv, lines)["error"].startswith("waiting: tax rate txr_x is not staged")
    # ... a default code codes both; a code by the rate's id comes first.
    text = default_mapping_text().replace("default_code: null", "default_code: SALESTAX")
    with_default = load_mapping(text=text)
    assert json.loads(plan(inv, lines, with_default, rates)["payload"])["tax_lines"] == [
        {"tax_code": "SALESTAX", "amount": "1.00"}
    ]
    by_id = load_mapping(text=text.replace("codes: {}", "codes: {txr_x: EXEMPT}"))
    assert json.loads(plan(inv, lines, by_id)["payload"])["tax_lines"][0]["tax_code"] == "EXEMPT"


def test_totals_that_do_not_add_up_are_a_reason() -> None:
    inv, lines = invoice(1800, [{"amount": 2000, "discount": 300}], [], discount=300)
    row = plan(inv, lines)
    assert row["error"] == (
        "lines net of inclusive tax (2000) − discounts (300) + tax (0) differ from the "
        "invoice total (1800)"
    )


def test_mapping_files_without_a_tax_section_still_load() -> None:
    text = default_mapping_text()
    start = text.index("\ntax:\n")
    end = text.index("\n# Balance-transaction")
    old = load_mapping(text=text[:start] + text[end:])
    assert old.tax.codes == {} and old.tax.by_jurisdiction == [] and old.tax.default_code is None
    # an untaxed invoice plans as before; a taxed one names its rate
    inv, lines = invoice(1000, [{"amount": 1000}], [])
    assert plan(inv, lines, old)["error"] is None
    taxed, taxed_lines = invoice(
        1083, [{"amount": 1000, "taxes": [(CA, 83, 1000, False)]}], [(CA, 83, 1000, False)]
    )
    assert (
        "tax rate txr_ca (Sales Tax, US - CA, 8.25%) has no Sage tax code"
        in (plan(taxed, taxed_lines, old)["error"])
    )


def test_tax_codes_are_validated_like_the_rest_of_the_mapping() -> None:
    text = default_mapping_text().replace("code: CHICAGO", "code: chicago city")
    with pytest.raises(ConfigurationError, match=r"line \d+: tax.by_jurisdiction.2.code"):
        load_mapping(text=text)
