"""The Sage Pro sandbox's v1.1 invoice and credit-memo fields (docs/sage_api.md): an
invoice's ``discount_amount`` and ``tax_lines`` and the total rule Σ extensions − discount +
tax; a credit memo's ``tax_amount``, ``tax_lines`` and ``expense_account``; the tax-code table
(``GET /api/v1/taxcodes``) the tax lines are checked against."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from devkit.sandbox.sage_seed import TAX_CODES
from tests.helpers.sage import (  # noqa: F401  (fixtures, used by name)
    TestClient,
    anon_fixture,
    api_fixture,
    assert_error,
    clock_fixture,
    credit_memo_payload,
    invoice_payload,
    make_sage_app_fixture,
    sage_app_fixture,
    sage_db_fixture,
)

pytestmark = pytest.mark.integration


def post_ok(api: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(path, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def discounted(**over: Any) -> dict[str, Any]:
    """3 x 10.00 = 30.00, less 6.00 discount, plus 1.98 (CA) tax = 25.98."""
    body = invoice_payload(
        reference="in_disc",
        lines=[{"item": "WIDGET", "quantity": "3", "unit_price": "10.00"}],
        discount_amount="6.00",
        tax_amount="1.98",
        tax_lines=[{"tax_code": "CA", "amount": "1.98"}],
        total="25.98",
    )
    body.update(over)
    return body


def test_taxcodes_list_the_seeded_table(api: TestClient) -> None:
    body = api.get("/api/v1/taxcodes", params={"limit": 200}).json()
    codes = {row["tax_code"]: row for row in body["data"]}
    assert set(codes) == {code for code, *_ in TAX_CODES}
    accounts = {row["account"] for row in api.get("/api/v1/glaccounts?limit=200").json()["data"]}
    # every code's tax posts to an account of the chart
    assert {row["liability_account"] for row in codes.values()} <= accounts
    assert all(len(code) <= 10 for code in codes)


def test_invoice_discount_and_tax_lines_make_the_total(api: TestClient) -> None:
    created = post_ok(api, "/api/v1/invoices", discounted())
    assert created["discount_amount"] == "6.00"
    assert created["tax_lines"] == [{"tax_code": "CA", "amount": "1.98"}]
    assert created["total"] == created["balance_due"] == "25.98"
    fetched = api.get(f"/api/v1/invoices/{created['invoice_no']}").json()
    assert fetched["discount_amount"] == "6.00" and fetched["tax_lines"] == created["tax_lines"]
    # Without the discount the same total is wrong: the rule subtracts it.
    assert_error(
        api.post("/api/v1/invoices", json=discounted(discount_amount="0.00")),
        422,
        "validation_error",
        "total",
    )


def test_two_tax_codes_and_a_credit_line(api: TestClient) -> None:
    body = invoice_payload(
        reference="in_two",
        lines=[
            {"item": "WIDGET", "quantity": "1", "unit_price": "40.00"},
            {"item": "WIDGET", "quantity": "3", "unit_price": "-3.3333"},  # -9.9999 → -10.00
        ],
        tax_amount="2.63",
        tax_lines=[{"tax_code": "IL", "amount": "1.88"}, {"tax_code": "CHICAGO", "amount": "0.75"}],
        total="32.63",
    )
    created = post_ok(api, "/api/v1/invoices", body)
    assert [t["tax_code"] for t in created["tax_lines"]] == ["IL", "CHICAGO"]
    assert created["total"] == "32.63"


def test_no_tax_lines_is_one_lump_tax_amount(api: TestClient) -> None:
    created = post_ok(api, "/api/v1/invoices", invoice_payload(reference="in_lump"))
    assert created["tax_lines"] == [] and created["discount_amount"] == "0.00"


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"discount_amount": "-1.00"}, "discount_amount"),
        ({"discount_amount": "6.0"}, "discount_amount"),
        ({"tax_lines": [{"tax_code": "NOPE", "amount": "1.98"}]}, "tax_lines[0].tax_code"),
        ({"tax_lines": [{"tax_code": "X" * 11, "amount": "1.98"}]}, "tax_lines[0].tax_code"),
        ({"tax_lines": [{"tax_code": "CA", "amount": "1.97"}]}, "tax_lines"),
        (
            {
                "tax_lines": [
                    {"tax_code": "CA", "amount": "2.98"},
                    {"tax_code": "IL", "amount": "-1.00"},
                ]
            },
            "tax_lines[1].amount",
        ),
        ({"tax_lines": [{"tax_code": "CA", "amount": "1.98", "account": "2200"}]}, None),
        ({"discount_amount": "31.00", "total": "-0.02"}, "total"),
    ],
)
def test_invoice_v11_field_rules(api: TestClient, override: dict[str, Any], field: str) -> None:
    response = api.post("/api/v1/invoices", json=discounted(**override))
    error = assert_error(response, 422, "validation_error")
    if field is not None:
        assert error["field"] == field, error
    else:
        assert "account" in (error["field"] or "")
    assert api.get("/api/v1/invoices", params={"reference": "in_disc"}).json()["data"] == []


def test_credit_memo_v11_tax_and_expense_account(api: TestClient) -> None:
    memo = post_ok(
        api,
        "/api/v1/creditmemos",
        credit_memo_payload(
            reference="cn_tax",
            amount="10.83",
            tax_amount="0.83",
            tax_lines=[{"tax_code": "CA", "amount": "0.83"}],
            expense_account="4900",
        ),
    )
    assert memo["tax_amount"] == "0.83" and memo["tax_lines"][0]["tax_code"] == "CA"
    assert memo["expense_account"] == "4900"
    plain = post_ok(api, "/api/v1/creditmemos", credit_memo_payload(reference="re_plain"))
    # defaults: no tax, the company's Sales Returns account
    assert plain["tax_amount"] == "0.00" and plain["expense_account"] == "4900"
    assert plain["tax_lines"] == []


@pytest.mark.parametrize(
    ("override", "code", "field"),
    [
        ({"tax_amount": "5.01"}, "validation_error", "tax_amount"),  # more than the amount
        ({"tax_amount": "-0.01"}, "validation_error", "tax_amount"),
        (
            {"tax_amount": "1.00", "tax_lines": [{"tax_code": "CA", "amount": "0.99"}]},
            "validation_error",
            "tax_lines",
        ),
        (
            {"tax_amount": "1.00", "tax_lines": [{"tax_code": "ZZ", "amount": "1.00"}]},
            "validation_error",
            "tax_lines[0].tax_code",
        ),
        ({"expense_account": "9999"}, "unknown_account", "expense_account"),
    ],
)
def test_credit_memo_v11_field_rules(
    api: TestClient, override: dict[str, Any], code: str, field: str
) -> None:
    response = api.post(
        "/api/v1/creditmemos", json=credit_memo_payload(reference="re_bad", **override)
    )
    assert_error(response, 422, code, field)
    assert api.get("/api/v1/creditmemos", params={"reference": "re_bad"}).json()["data"] == []
