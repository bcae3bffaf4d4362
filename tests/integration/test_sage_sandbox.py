"""The Sage Pro sandbox enforces docs/sage_api.md: every rule, error code, fault and state."""

from __future__ import annotations

import concurrent.futures
import datetime
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.sage_seed import CHART_OF_ACCOUNTS, SeedCustomer, SeedLine, SeedSalesOrder
from tests.helpers.sage import (  # noqa: F401  (fixtures, used by name)
    API_KEY,
    AppFactory,
    Clock,
    TestClient,
    anon_fixture,
    api_fixture,
    assert_error,
    clock_fixture,
    credit_memo_payload,
    customer_payload,
    invoice_payload,
    journal_payload,
    make_sage_app_fixture,
    receipt_payload,
    sage_app_fixture,
    sage_db_fixture,
    sales_order_payload,
    sandbox_stats,
    set_faults,
)

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post_ok(api: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(path, json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


# --- transport: auth, error shape, routes, OpenAPI ---


def test_openapi_lists_every_api_path_and_the_sandbox_controls(anon: TestClient) -> None:
    spec = anon.get("/openapi.json").json()
    paths = set(spec["paths"])
    expected = {
        "/api/v1/customers",
        "/api/v1/customers/{customer_id}",
        "/api/v1/salesorders",
        "/api/v1/salesorders/{order_no}",
        "/api/v1/invoices",
        "/api/v1/invoices/{invoice_no}",
        "/api/v1/cashreceipts",
        "/api/v1/cashreceipts/{receipt_no}",
        "/api/v1/creditmemos",
        "/api/v1/creditmemos/{memo_no}",
        "/api/v1/journalentries",
        "/api/v1/journalentries/{entry_no}",
        "/api/v1/glaccounts",
        "/api/v1/fiscalperiods",
        "/_sandbox/reset",
        "/_sandbox/seed",
        "/_sandbox/periods/close",
        "/_sandbox/periods/open",
        "/_sandbox/faults",
        "/_sandbox/stats",
    }
    assert expected <= paths
    assert set(spec["paths"]["/api/v1/customers/{customer_id}"]) == {"get", "put"}
    post = spec["paths"]["/api/v1/invoices"]["post"]
    schema_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    invoice_in = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert {"customer_id", "invoice_date", "currency", "lines", "total"} <= set(
        invoice_in["required"]
    )
    assert post["security"] == [{"bearerAuth": []}]
    assert "ErrorBody" in spec["components"]["schemas"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/customers"),
        ("GET", "/api/v1/invoices/INV0000001"),
        ("POST", "/api/v1/journalentries"),
        ("GET", "/api/v1/glaccounts"),
        ("GET", "/api/v1/no-such-route"),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
    ids=["missing", "wrong", "no-scheme"],
)
def test_every_api_route_needs_the_bearer_key(
    anon: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    assert_error(anon.request(method, path, headers=headers, json={}), 401, "unauthorized", None)


@pytest.mark.parametrize(
    "content", [b"[1, 2]", b'"text"', b"42", b"null", b"{not json", b"", b"\xff\xfe"]
)
def test_a_body_that_is_not_a_json_object_is_bad_request(api: TestClient, content: bytes) -> None:
    response = api.post(
        "/api/v1/invoices", content=content, headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "bad_request", None)


def test_unknown_routes_and_records_are_not_found_in_the_error_shape(
    api: TestClient, anon: TestClient
) -> None:
    assert_error(api.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(anon.get("/elsewhere"), 404, "not_found")
    for path in (
        "/api/v1/invoices/INV9999999",
        "/api/v1/customers/NOBODY",
        "/api/v1/salesorders/SO9999999",
        "/api/v1/cashreceipts/RCP0000001",
        "/api/v1/creditmemos/CM00000001",
        "/api/v1/journalentries/JE00000001",
    ):
        assert_error(api.get(path), 404, "not_found")
    assert_error(api.delete("/api/v1/invoices"), 405, "method_not_allowed")


# --- customers ---


def test_create_customer_stores_every_field_and_stamps_updated_at(api: TestClient) -> None:
    created = post_ok(api, "/api/v1/customers", customer_payload("NEW1"))
    assert created["status"] == "active"
    assert created["updated_at"] == "2026-03-15T12:00:00.000000Z"
    fetched = api.get("/api/v1/customers/NEW1").json()
    assert fetched == created
    for key, value in customer_payload("NEW1").items():
        assert fetched[key] == value


@pytest.mark.parametrize("customer_id", ["acme2", "A-1", "ABCDEFGHIJK", "", "AB 1", "ÄB"])
def test_customer_id_must_be_1_to_10_upper_alnum(api: TestClient, customer_id: str) -> None:
    response = api.post("/api/v1/customers", json=customer_payload(customer_id))
    assert_error(response, 422, "validation_error", "customer_id")


def test_customer_id_of_exactly_10_chars_is_fine(api: TestClient) -> None:
    post_ok(api, "/api/v1/customers", customer_payload("ABCDEFGH10"))


def test_duplicate_customer_id_is_a_validation_error_on_customer_id(api: TestClient) -> None:
    assert_error(
        api.post("/api/v1/customers", json=customer_payload("ACME")),
        422,
        "validation_error",
        "customer_id",
    )


CUSTOMER_LIMITS = {
    "name": 40,
    "email": 60,
    "phone": 20,
    "address1": 40,
    "address2": 40,
    "city": 30,
    "state": 10,
    "postal_code": 10,
    "reference": 40,
}


def _value_of_length(field: str, length: int) -> str:
    if field == "email":
        return "a" * (length - len("@x.example")) + "@x.example"
    return "Z" * length


@pytest.mark.parametrize(("field", "limit"), CUSTOMER_LIMITS.items())
def test_customer_field_limits_reject_and_never_truncate(
    api: TestClient, field: str, limit: int
) -> None:
    too_long = _value_of_length(field, limit + 1)
    response = api.post("/api/v1/customers", json=customer_payload("LIM1", **{field: too_long}))
    assert_error(response, 422, "validation_error", field)
    assert api.get("/api/v1/customers/LIM1").status_code == 404

    at_limit = _value_of_length(field, limit)
    created = post_ok(api, "/api/v1/customers", customer_payload("LIM1", **{field: at_limit}))
    assert created[field] == at_limit


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("email", "not-an-address"),
        ("email", "a@b"),
        ("email", "two@@at.example"),
        ("country", "USA"),
        ("country", "us"),
        ("country", "ZZ"),
        ("currency", "usd"),
        ("currency", "XXX"),
        ("currency", "US"),
        ("status", "deleted"),
        ("name", ""),
        ("name", 42),
        ("unknown_field", "x"),
    ],
)
def test_customer_field_rules(api: TestClient, field: str, value: Any) -> None:
    response = api.post("/api/v1/customers", json=customer_payload("RULE1", **{field: value}))
    assert_error(response, 422, "validation_error", field)


@pytest.mark.parametrize("missing", ["customer_id", "name", "currency"])
def test_customer_required_fields(api: TestClient, missing: str) -> None:
    body = customer_payload("REQ1")
    del body[missing]
    assert_error(api.post("/api/v1/customers", json=body), 422, "validation_error", missing)


def test_put_merges_fields_and_moves_updated_at(api: TestClient, clock: Clock) -> None:
    post_ok(api, "/api/v1/customers", customer_payload("MRG1"))
    clock.advance(hours=1)
    response = api.put("/api/v1/customers/MRG1", json={"city": "Paris", "country": "FR"})
    assert response.status_code == 200, response.text
    merged = response.json()
    assert merged["city"] == "Paris" and merged["country"] == "FR"
    assert merged["name"] == "New Customer Ltd" and merged["email"] == "billing@new.example"
    assert merged["updated_at"] == "2026-03-15T13:00:00.000000Z"
    assert api.get("/api/v1/customers/MRG1").json() == merged


def test_put_can_clear_an_optional_field_but_not_a_required_one(api: TestClient) -> None:
    post_ok(api, "/api/v1/customers", customer_payload("MRG2"))
    cleared = api.put("/api/v1/customers/MRG2", json={"phone": None}).json()
    assert cleared["phone"] is None
    assert_error(
        api.put("/api/v1/customers/MRG2", json={"name": None}), 422, "validation_error", "name"
    )


def test_put_validates_and_refuses_a_missing_customer(api: TestClient) -> None:
    assert_error(api.put("/api/v1/customers/NOBODY", json={"city": "X"}), 404, "not_found")
    assert_error(
        api.put("/api/v1/customers/ACME", json={"name": "N" * 41}), 422, "validation_error", "name"
    )
    assert_error(
        api.put("/api/v1/customers/ACME", json={"customer_id": "OTHER"}),
        422,
        "validation_error",
        "customer_id",
    )
    assert api.get("/api/v1/customers/ACME").json()["name"] == "Acme Corp"


def test_updated_since_lists_only_changes_at_or_after_the_instant(
    api: TestClient, clock: Clock
) -> None:
    clock.advance(days=1)  # 2026-03-16T12:00Z
    post_ok(api, "/api/v1/customers", customer_payload("LATE1"))
    clock.advance(hours=2)  # 14:00Z
    api.put("/api/v1/customers/ACME", json={"phone": "+1 555 0199"})

    def ids(since: str) -> list[str]:
        response = api.get("/api/v1/customers", params={"updated_since": since})
        assert response.status_code == 200, response.text
        return [c["customer_id"] for c in response.json()["data"]]

    assert ids("2026-03-16T00:00:00Z") == ["ACME", "LATE1"]
    assert ids("2026-03-16T12:00:00+00:00") == ["ACME", "LATE1"]  # inclusive
    assert ids("2026-03-16T13:00:00Z") == ["ACME"]
    assert ids("2026-03-16T15:00:00+01:00") == ["ACME"]  # 14:00Z
    assert ids("2026-03-16T14:00:00.000001") == []  # naive = UTC
    assert set(ids("2020-01-01")) == {"ACME", "EURO1", "GLOBEX", "LATE1"}
    assert_error(
        api.get("/api/v1/customers", params={"updated_since": "yesterday"}),
        422,
        "validation_error",
        "updated_since",
    )


# --- money, dates, totals ---


@pytest.mark.parametrize(
    ("currency", "amount"),
    [
        ("USD", "12.3"),
        ("USD", "12"),
        ("USD", "12.345"),
        ("JPY", "1000.0"),
        ("JPY", "10.00"),
        ("KWD", "1.25"),
        ("KWD", "1.2500"),
        ("USD", 12.30),
        ("USD", "12,30"),
        ("USD", "1e3"),
    ],
)
def test_money_must_carry_exactly_the_currency_exponent(
    api: TestClient, currency: str, amount: Any
) -> None:
    body = receipt_payload(currency=currency, amount=amount)
    assert_error(api.post("/api/v1/cashreceipts", json=body), 422, "validation_error", "amount")


@pytest.mark.parametrize(
    ("currency", "amount"), [("USD", "12.30"), ("JPY", "1000"), ("KWD", "1.250")]
)
def test_money_with_the_right_exponent_is_accepted_verbatim(
    api: TestClient, currency: str, amount: str
) -> None:
    created = post_ok(
        api, "/api/v1/cashreceipts", receipt_payload(currency=currency, amount=amount)
    )
    assert created["amount"] == amount and created["currency"] == currency


@pytest.mark.parametrize("amount", ["0.00", "-5.00"])
def test_receipt_and_memo_amounts_must_be_positive(api: TestClient, amount: str) -> None:
    assert_error(
        api.post("/api/v1/cashreceipts", json=receipt_payload(amount=amount)),
        422,
        "validation_error",
        "amount",
    )
    assert_error(
        api.post("/api/v1/creditmemos", json=credit_memo_payload(amount=amount)),
        422,
        "validation_error",
        "amount",
    )


@pytest.mark.parametrize(
    ("override", "field"),
    [
        (
            {"currency": "EUR", "lines": [{"item": "X", "quantity": "1", "unit_price": "1.0"}]},
            "lines[0].unit_price",
        ),
        ({"tax_amount": "1.0"}, "tax_amount"),
        ({"tax_amount": "-1.00"}, "tax_amount"),
        ({"total": "26"}, "total"),
        ({"invoice_date": "2026-3-1"}, "invoice_date"),
        ({"invoice_date": "2026-02-30"}, "invoice_date"),
        ({"invoice_date": "03/01/2026"}, "invoice_date"),
        ({"due_date": "2026-02-01"}, "due_date"),
        ({"lines": []}, "lines"),
        ({"lines": [{"item": "X", "quantity": "0", "unit_price": "1.00"}]}, "lines[0].quantity"),
        ({"lines": [{"item": "X", "quantity": "-1", "unit_price": "1.00"}]}, "lines[0].quantity"),
        ({"lines": [{"item": "X", "quantity": 1, "unit_price": "1.00"}]}, "lines[0].quantity"),
        ({"lines": [{"item": "I" * 21, "quantity": "1", "unit_price": "1.00"}]}, "lines[0].item"),
        (
            {
                "lines": [
                    {"item": "X", "description": "D" * 61, "quantity": "1", "unit_price": "1.00"}
                ]
            },
            "lines[0].description",
        ),
        ({"reference": "r" * 31}, "reference"),
        ({"invoice_no": "INV0000042"}, "invoice_no"),
        ({"balance_due": "0.00"}, "balance_due"),
    ],
)
def test_invoice_field_rules(api: TestClient, override: dict[str, Any], field: str) -> None:
    response = api.post("/api/v1/invoices", json=invoice_payload(**override))
    assert_error(response, 422, "validation_error", field)
    assert api.get("/api/v1/invoices", params={"reference": "in_1"}).json()["data"] == []


def test_invoice_total_must_equal_lines_plus_tax_exactly(api: TestClient) -> None:
    assert_error(
        api.post("/api/v1/invoices", json=invoice_payload(total="26.01")),
        422,
        "validation_error",
        "total",
    )
    # A fractional quantity is fine when the product is exact in the currency.
    body = invoice_payload(
        lines=[{"item": "HOURS", "quantity": "1.5", "unit_price": "10.00"}],
        tax_amount="0.00",
        total="15.00",
    )
    created = post_ok(api, "/api/v1/invoices", body)
    assert created["balance_due"] == "15.00" and created["status"] == "open"
    assert created["invoice_no"] == "INV0000001"
    # v1.1: each line's extension is rounded half-up to the currency's exponent
    # (0.3333 x 10.00 = 3.333 → 3.33), and the total must equal Σ rounded extensions.
    rounded = invoice_payload(
        reference="in_rounded",
        lines=[{"item": "HOURS", "quantity": "0.3333", "unit_price": "10.00"}],
        tax_amount="0.00",
        total="3.33",
    )
    assert post_ok(api, "/api/v1/invoices", rounded)["total"] == "3.33"
    unrounded = invoice_payload(
        reference="in_unrounded",
        lines=[{"item": "HOURS", "quantity": "0.3333", "unit_price": "10.00"}],
        tax_amount="0.00",
        total="3.34",
    )
    assert_error(api.post("/api/v1/invoices", json=unrounded), 422, "validation_error", "total")


def test_v11_line_amounts(api: TestClient) -> None:
    """Unit prices with up to 4 extra decimals, extensions rounded half-up per line (not on
    the sum), negative invoice lines; sales-order lines may not be negative."""
    # 3 units for a net 100.00: unit 33.3333, extension 99.9999 → 100.00; the rounding is
    # per line and half-up: 0.5 x 0.0101 = 0.00505 → 0.01; a credit line of -5.00.
    body = invoice_payload(
        reference="in_v11",
        lines=[
            {"item": "X", "quantity": "3", "unit_price": "33.3333"},
            {"item": "X", "quantity": "3", "unit_price": "33.3333"},
            {"item": "X", "quantity": "0.5", "unit_price": "0.0101"},
            {"item": "X", "quantity": "1", "unit_price": "-5.00"},
        ],
        tax_amount="0.00",
        total="195.01",
    )
    assert post_ok(api, "/api/v1/invoices", body)["total"] == "195.01"
    jpy = invoice_payload(
        currency="JPY",
        reference="in_v11_jpy",
        lines=[{"item": "X", "quantity": "2", "unit_price": "1000.5"}],
        tax_amount="0",
        total="2001",
    )
    assert post_ok(api, "/api/v1/invoices", jpy)["total"] == "2001"
    too_fine = invoice_payload(
        reference="in_v11_fine",
        lines=[{"item": "X", "quantity": "1", "unit_price": "1.0000001"}],
        tax_amount="0.00",
        total="1.00",
    )
    assert_error(
        api.post("/api/v1/invoices", json=too_fine), 422, "validation_error", "lines[0].unit_price"
    )
    negative_order = {
        "customer_id": "ACME",
        "order_date": "2026-03-01",
        "currency": "USD",
        "lines": [{"item": "X", "quantity": "1", "unit_price": "-1.00"}],
    }
    assert_error(
        api.post("/api/v1/salesorders", json=negative_order),
        422,
        "validation_error",
        "lines[0].unit_price",
    )


def test_zero_and_three_decimal_invoices(api: TestClient) -> None:
    jpy = invoice_payload(
        currency="JPY",
        lines=[{"item": "X", "quantity": "3", "unit_price": "1000"}],
        tax_amount="300",
        total="3300",
    )
    assert post_ok(api, "/api/v1/invoices", jpy)["balance_due"] == "3300"
    kwd = invoice_payload(
        currency="KWD",
        reference="in_kwd",
        lines=[{"item": "X", "quantity": "2", "unit_price": "1.250"}],
        tax_amount="0.000",
        total="2.500",
    )
    assert post_ok(api, "/api/v1/invoices", kwd)["total"] == "2.500"


# --- links between documents ---


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/salesorders", sales_order_payload(customer_id="NOBODY")),
        ("/api/v1/invoices", invoice_payload(customer_id="NOBODY")),
        ("/api/v1/cashreceipts", receipt_payload(customer_id="NOBODY")),
        ("/api/v1/creditmemos", credit_memo_payload(customer_id="NOBODY")),
    ],
)
def test_unknown_customer(api: TestClient, path: str, body: dict[str, Any]) -> None:
    assert_error(api.post(path, json=body), 422, "unknown_customer", "customer_id")


def test_unknown_sales_order_and_invoice_numbers_name_the_field(api: TestClient) -> None:
    assert_error(
        api.post("/api/v1/invoices", json=invoice_payload(sales_order_no="SO0999999")),
        422,
        "validation_error",
        "sales_order_no",
    )
    body = receipt_payload(apply_to=[{"invoice_no": "INV0999999", "amount": "1.00"}])
    assert_error(
        api.post("/api/v1/cashreceipts", json=body),
        422,
        "validation_error",
        "apply_to[0].invoice_no",
    )
    assert_error(
        api.post("/api/v1/creditmemos", json=credit_memo_payload(invoice_no="INV0999999")),
        422,
        "validation_error",
        "invoice_no",
    )


def test_linked_documents_need_the_same_customer_and_currency(api: TestClient) -> None:
    # The seeded order SO0000001 belongs to ACME in USD.
    assert_error(
        api.post(
            "/api/v1/invoices",
            json=invoice_payload(customer_id="GLOBEX", sales_order_no="SO0000001"),
        ),
        422,
        "validation_error",
        "customer_id",
    )
    eur = invoice_payload(currency="EUR", sales_order_no="SO0000001", reference="in_eur")
    assert_error(api.post("/api/v1/invoices", json=eur), 422, "validation_error", "currency")

    invoice = post_ok(api, "/api/v1/invoices", invoice_payload())
    applied = [{"invoice_no": invoice["invoice_no"], "amount": "1.00"}]
    other_customer = receipt_payload(customer_id="GLOBEX", apply_to=applied)
    assert_error(
        api.post("/api/v1/cashreceipts", json=other_customer),
        422,
        "validation_error",
        "customer_id",
    )
    other_currency = receipt_payload(currency="EUR", apply_to=applied)
    assert_error(
        api.post("/api/v1/cashreceipts", json=other_currency), 422, "validation_error", "currency"
    )
    memo = credit_memo_payload(customer_id="GLOBEX", invoice_no=invoice["invoice_no"])
    assert_error(api.post("/api/v1/creditmemos", json=memo), 422, "validation_error", "customer_id")
    memo = credit_memo_payload(currency="EUR", invoice_no=invoice["invoice_no"])
    assert_error(api.post("/api/v1/creditmemos", json=memo), 422, "validation_error", "currency")
    assert api.get(f"/api/v1/invoices/{invoice['invoice_no']}").json()["balance_due"] == "26.00"


def test_invoicing_a_sales_order_marks_it_invoiced(api: TestClient) -> None:
    assert api.get("/api/v1/salesorders/SO0000001").json()["status"] == "open"
    created = post_ok(api, "/api/v1/invoices", invoice_payload(sales_order_no="SO0000001"))
    assert created["sales_order_no"] == "SO0000001"
    assert api.get("/api/v1/salesorders/SO0000001").json()["status"] == "invoiced"


def test_new_sales_orders_do_not_clash_with_seeded_numbers(api: TestClient) -> None:
    created = post_ok(api, "/api/v1/salesorders", sales_order_payload())
    assert created["order_no"] == "SO0000002"
    assert created["status"] == "open"
    assert len(created["order_no"]) <= 10


def test_applications_reduce_balance_due_until_paid(api: TestClient) -> None:
    invoice = post_ok(api, "/api/v1/invoices", invoice_payload())
    number = invoice["invoice_no"]
    assert (invoice["balance_due"], invoice["status"]) == ("26.00", "open")

    receipt = receipt_payload(amount="10.00", apply_to=[{"invoice_no": number, "amount": "10.00"}])
    created = post_ok(api, "/api/v1/cashreceipts", receipt)
    assert created["receipt_no"] == "RCP0000001"
    after_receipt = api.get(f"/api/v1/invoices/{number}").json()
    assert (after_receipt["balance_due"], after_receipt["status"]) == ("16.00", "open")

    memo = post_ok(
        api, "/api/v1/creditmemos", credit_memo_payload(amount="16.00", invoice_no=number)
    )
    assert memo["memo_no"] == "CM00000001"
    paid = api.get(f"/api/v1/invoices/{number}").json()
    assert (paid["balance_due"], paid["status"]) == ("0.00", "paid")


def test_gl_account_is_optional_on_a_memo_against_an_invoice(api: TestClient) -> None:
    """SAGEPRO_API.md: with ``invoice_no`` the invoice's receivable is credited, so
    ``gl_account`` may be left out; without ``invoice_no`` it is required."""
    number = post_ok(api, "/api/v1/invoices", invoice_payload())["invoice_no"]
    against = credit_memo_payload(amount="6.00", invoice_no=number)
    del against["gl_account"]
    memo = post_ok(api, "/api/v1/creditmemos", against)
    assert memo["gl_account"] is None
    assert api.get(f"/api/v1/invoices/{number}").json()["balance_due"] == "20.00"
    on_its_own = credit_memo_payload()
    del on_its_own["gl_account"]
    assert_error(
        api.post("/api/v1/creditmemos", json=on_its_own), 422, "validation_error", "gl_account"
    )
    assert len(api.get("/api/v1/creditmemos").json()["data"]) == 1


def test_over_application_is_refused_and_changes_nothing(api: TestClient) -> None:
    number = post_ok(api, "/api/v1/invoices", invoice_payload())["invoice_no"]
    more_than_balance = receipt_payload(
        amount="30.00", apply_to=[{"invoice_no": number, "amount": "26.01"}]
    )
    assert_error(
        api.post("/api/v1/cashreceipts", json=more_than_balance),
        422,
        "over_application",
        "apply_to[0].amount",
    )
    twice = receipt_payload(
        amount="30.00",
        apply_to=[
            {"invoice_no": number, "amount": "20.00"},
            {"invoice_no": number, "amount": "7.00"},
        ],
    )
    assert_error(
        api.post("/api/v1/cashreceipts", json=twice), 422, "over_application", "apply_to[1].amount"
    )
    second = post_ok(api, "/api/v1/invoices", invoice_payload(reference="in_2"))["invoice_no"]
    more_than_amount = receipt_payload(
        amount="30.00",
        apply_to=[
            {"invoice_no": number, "amount": "20.00"},
            {"invoice_no": second, "amount": "20.00"},
        ],
    )
    assert_error(
        api.post("/api/v1/cashreceipts", json=more_than_amount), 422, "over_application", "apply_to"
    )
    memo = credit_memo_payload(amount="26.01", invoice_no=number)
    assert_error(api.post("/api/v1/creditmemos", json=memo), 422, "over_application", "amount")

    assert api.get(f"/api/v1/invoices/{number}").json()["balance_due"] == "26.00"
    assert api.get("/api/v1/cashreceipts").json()["data"] == []
    assert api.get("/api/v1/creditmemos").json()["data"] == []


def test_unknown_gl_accounts_on_receipts_and_memos(api: TestClient) -> None:
    assert_error(
        api.post("/api/v1/cashreceipts", json=receipt_payload(deposit_account="9999")),
        422,
        "unknown_account",
        "deposit_account",
    )
    assert_error(
        api.post("/api/v1/creditmemos", json=credit_memo_payload(gl_account="9999")),
        422,
        "unknown_account",
        "gl_account",
    )


# --- journal entries ---


def test_a_balanced_journal_posts(api: TestClient) -> None:
    created = post_ok(api, "/api/v1/journalentries", journal_payload())
    assert created["entry_no"] == "JE00000001"
    assert [line["credit"] for line in created["lines"]] == ["0.00", "0.00", "100.00"]
    assert api.get("/api/v1/journalentries/JE00000001").json() == created


def test_unbalanced_journal(api: TestClient) -> None:
    body = journal_payload()
    body["lines"][0]["debit"] = "97.11"
    assert_error(api.post("/api/v1/journalentries", json=body), 422, "unbalanced", "lines")


def test_unknown_account_in_a_journal_line(api: TestClient) -> None:
    body = journal_payload()
    body["lines"][1]["account"] = "6199"
    assert_error(
        api.post("/api/v1/journalentries", json=body), 422, "unknown_account", "lines[1].account"
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"account": "1000", "debit": "1.00", "credit": "1.00"}, "lines[0]"),
        ({"account": "1000", "debit": "0.00", "credit": "0.00"}, "lines[0]"),
        ({"account": "1000"}, "lines[0]"),
        ({"account": "1000", "debit": "1.0"}, "lines[0].debit"),
        ({"account": "1000", "debit": "-1.00"}, "lines[0].debit"),
        ({"account": "1000", "debit": "1.00", "description": "d" * 61}, "lines[0].description"),
    ],
)
def test_journal_line_rules(api: TestClient, line: dict[str, Any], field: str) -> None:
    body = journal_payload(lines=[line, {"account": "1050", "credit": "1.00"}])
    assert_error(api.post("/api/v1/journalentries", json=body), 422, "validation_error", field)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"lines": [{"account": "1000", "debit": "1.00"}]}, "lines"),
        ({"source_code": "STR"}, "source_code"),
        ({"source_code": "s"}, "source_code"),
        ({"description": "x" * 61}, "description"),
        ({"reference": "po_" + "x" * 28}, "reference"),
        ({"currency": "usd"}, "currency"),
    ],
)
def test_journal_entry_rules(api: TestClient, override: dict[str, Any], field: str) -> None:
    assert_error(
        api.post("/api/v1/journalentries", json=journal_payload(**override)),
        422,
        "validation_error",
        field,
    )


# --- fiscal periods ---


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/api/v1/invoices",
            invoice_payload(invoice_date="2025-12-31", due_date=None),
            "invoice_date",
        ),
        ("/api/v1/cashreceipts", receipt_payload(receipt_date="2025-06-30"), "receipt_date"),
        ("/api/v1/creditmemos", credit_memo_payload(memo_date="2025-01-01"), "memo_date"),
        ("/api/v1/journalentries", journal_payload(entry_date="2025-12-15"), "entry_date"),
        ("/api/v1/journalentries", journal_payload(entry_date="2031-01-15"), "entry_date"),
    ],
)
def test_dated_documents_in_a_closed_period_are_refused(
    api: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    assert_error(api.post(path, json=body), 422, "period_closed", field)


def test_sandbox_opens_and_closes_periods(api: TestClient, anon: TestClient) -> None:
    late = journal_payload(entry_date="2025-12-15")
    assert_error(api.post("/api/v1/journalentries", json=late), 422, "period_closed")
    opened = anon.post("/_sandbox/periods/open", json={"year": 2025, "period": 12})
    assert opened.json() == {
        "year": 2025,
        "period": 12,
        "start": "2025-12-01",
        "end": "2025-12-31",
        "status": "open",
    }
    post_ok(api, "/api/v1/journalentries", late)
    anon.post("/_sandbox/periods/close", json={"year": 2026, "period": 3})
    assert_error(
        api.post("/api/v1/journalentries", json=journal_payload()),
        422,
        "period_closed",
        "entry_date",
    )
    assert_error(
        anon.post("/_sandbox/periods/close", json={"year": 2040, "period": 1}), 404, "not_found"
    )
    assert_error(
        anon.post("/_sandbox/periods/close", json={"year": 2026, "period": 13}),
        422,
        "validation_error",
        "period",
    )


def test_reference_data(api: TestClient) -> None:
    accounts = api.get("/api/v1/glaccounts").json()
    assert accounts["next_cursor"] is None
    assert [(a["account"], a["description"], a["type"]) for a in accounts["data"]] == [
        tuple(row) for row in CHART_OF_ACCOUNTS
    ]
    periods = api.get("/api/v1/fiscalperiods").json()["data"]
    assert len(periods) == 24
    assert periods[0] == {
        "year": 2025,
        "period": 1,
        "start": "2025-01-01",
        "end": "2025-01-31",
        "status": "closed",
    }
    assert periods[13]["end"] == "2026-02-28" and periods[13]["status"] == "open"
    assert {p["status"] for p in periods if p["year"] == 2025} == {"closed"}
    assert {p["status"] for p in periods if p["year"] == 2026} == {"open"}
    page = api.get("/api/v1/fiscalperiods", params={"limit": 20}).json()
    rest = api.get("/api/v1/fiscalperiods", params={"limit": 20, "cursor": page["next_cursor"]})
    assert page["data"] + rest.json()["data"] == periods


def test_default_fiscal_years_follow_the_clock(make_sage_app: AppFactory, tmp_path: Path) -> None:
    app = make_sage_app(db_path=tmp_path / "other.sqlite", fiscal_years=None, closed_through=None)
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        periods = http.get("/api/v1/fiscalperiods", params={"limit": 200}).json()["data"]
    assert sorted({p["year"] for p in periods}) == [2024, 2025, 2026, 2027]
    assert {p["status"] for p in periods} == {"open"}


# --- lists ---


def test_no_deduplication_and_lookup_by_reference(api: TestClient) -> None:
    first = post_ok(api, "/api/v1/journalentries", journal_payload())
    second = post_ok(api, "/api/v1/journalentries", journal_payload())
    assert first["entry_no"] != second["entry_no"]
    found = api.get("/api/v1/journalentries", params={"reference": "po_1"}).json()
    assert [d["entry_no"] for d in found["data"]] == [first["entry_no"], second["entry_no"]]
    none = api.get("/api/v1/journalentries", params={"reference": "po_2"}).json()
    assert none == {"data": [], "next_cursor": None}
    assert [
        c["customer_id"]
        for c in api.get("/api/v1/customers", params={"reference": "cus_euro"}).json()["data"]
    ] == ["EURO1"]


def test_cursor_paging_walks_every_document_once(api: TestClient) -> None:
    numbers = [
        post_ok(api, "/api/v1/journalentries", journal_payload(reference=f"po_{i}"))["entry_no"]
        for i in range(7)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/api/v1/journalentries", params=params).json()
        pages += 1
        seen += [d["entry_no"] for d in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == numbers and pages == 3
    default = api.get("/api/v1/journalentries").json()
    assert len(default["data"]) == 7 and default["next_cursor"] is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 201}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
    ],
)
def test_list_parameter_errors(api: TestClient, params: dict[str, Any], field: str) -> None:
    assert_error(api.get("/api/v1/invoices", params=params), 422, "validation_error", field)


def test_a_cursor_of_another_list_is_refused(api: TestClient) -> None:
    for i in range(3):
        post_ok(api, "/api/v1/journalentries", journal_payload(reference=f"po_{i}"))
    cursor = api.get("/api/v1/journalentries", params={"limit": 1}).json()["next_cursor"]
    assert cursor
    assert_error(
        api.get("/api/v1/invoices", params={"cursor": cursor}), 422, "validation_error", "cursor"
    )


# --- state ---


def test_documents_survive_recreating_the_app_on_the_same_file(
    make_sage_app: AppFactory, sage_db: Path
) -> None:
    first = make_sage_app()
    with TestClient(first, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        invoice = post_ok(http, "/api/v1/invoices", invoice_payload())
        post_ok(http, "/api/v1/customers", customer_payload("KEEP1"))
        http.put("/api/v1/customers/ACME", json={"city": "Reno"})
    first.state.store.close()

    again = make_sage_app()  # same file, same seeds
    with TestClient(again, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        assert http.get(f"/api/v1/invoices/{invoice['invoice_no']}").json() == invoice
        assert http.get("/api/v1/customers/KEEP1").status_code == 200
        assert http.get("/api/v1/customers/ACME").json()["city"] == "Reno"  # not re-seeded
        customers = http.get("/api/v1/customers").json()["data"]
        assert sorted(c["customer_id"] for c in customers) == ["ACME", "EURO1", "GLOBEX", "KEEP1"]
        assert len(http.get("/api/v1/salesorders").json()["data"]) == 1
        assert post_ok(http, "/api/v1/invoices", invoice_payload())["invoice_no"] == "INV0000002"
    assert sage_db.exists()


def test_reset_wipes_documents_and_reseeds(api: TestClient, anon: TestClient) -> None:
    post_ok(api, "/api/v1/invoices", invoice_payload(sales_order_no="SO0000001"))
    api.put("/api/v1/customers/ACME", json={"city": "Reno"})
    anon.post("/_sandbox/periods/open", json={"year": 2025, "period": 1})
    set_faults(anon, rate_503=1.0, only_methods=["POST"])

    stats = anon.post("/_sandbox/reset").json()
    assert stats["documents"] == {
        "customers": 3,
        "salesorders": 1,
        "invoices": 0,
        "cashreceipts": 0,
        "creditmemos": 0,
        "journalentries": 0,
        "items": 3,
    }
    assert api.get("/api/v1/items/WIDGET").json()["on_hand"] == "100"
    assert api.get("/api/v1/customers/ACME").json()["city"] is None
    assert api.get("/api/v1/salesorders/SO0000001").json()["status"] == "open"
    assert api.get("/api/v1/fiscalperiods").json()["data"][0]["status"] == "closed"
    assert post_ok(api, "/api/v1/invoices", invoice_payload())["invoice_no"] == "INV0000001"


def test_sandbox_seed_adds_absent_records(anon: TestClient, api: TestClient) -> None:
    body = {
        "customers": [
            {"customer_id": "SEED1", "name": "Seeded", "email": None, "currency": "GBP"},
            {"customer_id": "ACME", "name": "Ignored", "currency": "USD"},
        ],
        "sales_orders": [
            {
                "order_no": "WEB-77",
                "customer_id": "SEED1",
                "order_date": "2026-03-01",
                "currency": "GBP",
                "lines": [{"item": "X", "quantity": "1", "unit_price_minor": 1999}],
            }
        ],
    }
    stats = anon.post("/_sandbox/seed", json=body).json()
    assert stats["documents"]["customers"] == 4
    assert api.get("/api/v1/customers/ACME").json()["name"] == "Acme Corp"
    order = api.get("/api/v1/salesorders/WEB-77").json()
    assert order["lines"][0]["unit_price"] == "19.99"
    bad = {"customers": [{"customer_id": "bad id", "name": "X", "currency": "USD"}]}
    assert_error(anon.post("/_sandbox/seed", json=bad), 422, "validation_error")


def test_seeding_refuses_invalid_seed_customers(make_sage_app: AppFactory) -> None:
    with pytest.raises(ValueError, match="LONG1"):
        make_sage_app(customers=[SeedCustomer("LONG1", "N" * 41, None, "USD")])


def test_concurrent_applications_never_overdraw_an_invoice(make_sage_app: AppFactory) -> None:
    """Under uvicorn with many threads posting at once, balance checks stay atomic."""
    app = make_sage_app()
    with (
        ThreadedServer(app, port=0) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as http,
    ):
        number = post_ok(http, "/api/v1/invoices", invoice_payload())["invoice_no"]

        def pay(i: int) -> int:
            body = receipt_payload(
                amount="5.00",
                reference=f"ch_{i}",
                apply_to=[{"invoice_no": number, "amount": "5.00"}],
            )
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as own:
                return own.post("/api/v1/cashreceipts", json=body).status_code

        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            statuses = list(pool.map(pay, range(10)))
        assert sorted(statuses) == [201] * 5 + [422] * 5
        assert http.get(f"/api/v1/invoices/{number}").json()["balance_due"] == "1.00"
        receipts = http.get("/api/v1/cashreceipts").json()["data"]
        assert len({r["receipt_no"] for r in receipts}) == 5


# --- rate limit and faults ---


def test_rate_limit_answers_429_with_retry_after(make_sage_app: AppFactory) -> None:
    app = make_sage_app(rate_limit_rps=1)
    with TestClient(app, headers=AUTH) as http:
        assert http.get("/api/v1/glaccounts").status_code == 200
        limited = http.get("/api/v1/glaccounts")
        assert_error(limited, 429, "rate_limited", None)
        assert limited.headers["Retry-After"] == "1"
        assert http.get("/_sandbox/stats").json()["rate_limited"] == 1
        assert http.get("/openapi.json").status_code == 200  # not budgeted


def test_fault_429_carries_retry_after(api: TestClient, anon: TestClient) -> None:
    set_faults(anon, rate_429=1.0, retry_after=2)
    limited = api.get("/api/v1/glaccounts")
    assert_error(limited, 429, "rate_limited")
    assert limited.headers["Retry-After"] == "2"
    set_faults(anon, rate_429=1.0, retry_after=0.5)
    assert api.get("/api/v1/glaccounts").headers["Retry-After"] == "0.5"
    assert sandbox_stats(anon)["faults"]["http_429"] == 2


@pytest.mark.parametrize(("kind", "status"), [("rate_500", 500), ("rate_503", 503)])
def test_fault_5xx_before_processing(
    api: TestClient, anon: TestClient, kind: str, status: int
) -> None:
    set_faults(anon, **{kind: 1.0})
    assert_error(api.post("/api/v1/journalentries", json=journal_payload()), status, "unavailable")
    stats = sandbox_stats(anon)
    assert stats["faults"][f"http_{status}"] == 1
    assert stats["documents"]["journalentries"] == 0  # not processed


def test_fault_slow_delays_the_response(api: TestClient, anon: TestClient) -> None:
    set_faults(anon, slow_rate=1.0, slow_seconds=0.2)
    started = time.monotonic()
    assert api.get("/api/v1/glaccounts").status_code == 200
    assert time.monotonic() - started >= 0.2
    assert sandbox_stats(anon)["faults"]["slow"] == 1


def test_fault_drop_cuts_the_connection_after_processing(api: TestClient, anon: TestClient) -> None:
    set_faults(anon, drop_rate=1.0, only_methods=["POST"])
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/api/v1/journalentries", json=journal_payload())
    stats = sandbox_stats(anon)
    assert stats["faults"]["drop"] == 1
    assert stats["documents"]["journalentries"] == 1


def test_fault_drop_under_uvicorn_is_a_transport_error(make_sage_app: AppFactory) -> None:
    app = make_sage_app()
    with (
        ThreadedServer(app, port=0) as server,
        httpx.Client(base_url=server.url, timeout=5) as http,
    ):
        set_faults(http, drop_rate=1.0, only_methods=["GET"])
        with pytest.raises(httpx.RemoteProtocolError):
            http.get("/api/v1/glaccounts", headers=AUTH)
        assert sandbox_stats(http)["faults"]["drop"] == 1


def test_fault_commit_then_503_commits_the_document(api: TestClient, anon: TestClient) -> None:
    set_faults(anon, commit_then_503_rate=1.0, only_methods=["POST"])
    assert_error(api.post("/api/v1/journalentries", json=journal_payload()), 503, "unavailable")
    found = api.get("/api/v1/journalentries", params={"reference": "po_1"}).json()["data"]
    assert len(found) == 1
    assert sandbox_stats(anon)["faults"]["commit_then_503"] == 1


def test_faults_are_deterministic_capped_and_switchable(api: TestClient, anon: TestClient) -> None:
    def statuses() -> list[int]:
        return [api.get("/api/v1/glaccounts").status_code for _ in range(30)]

    set_faults(anon, seed=7, rate_503=0.5)
    first = statuses()
    set_faults(anon, seed=7, rate_503=0.5)
    assert statuses() == first
    assert 0 < first.count(503) < 30

    set_faults(anon, rate_500=1.0, max_faults=2)
    assert statuses()[:3] == [500, 500, 200]

    set_faults(anon, rate_503=1.0, only_methods=["POST"])
    assert api.get("/api/v1/glaccounts").status_code == 200
    assert anon.get("/_sandbox/stats").status_code == 200  # controls never fault

    assert anon.delete("/_sandbox/faults").json()["rate_503"] == 0
    assert api.post("/api/v1/journalentries", json=journal_payload()).status_code == 201
    set_faults(anon, rate_503=1.0)
    set_faults(anon)  # all zeros: off
    assert statuses() == [200] * 30


def test_fault_config_is_validated(anon: TestClient) -> None:
    assert_error(
        anon.post("/_sandbox/faults", json={"rate_503": 1.5}), 422, "validation_error", "rate_503"
    )
    assert_error(
        anon.post("/_sandbox/faults", json={"rate_503": 0.6, "rate_500": 0.6}),
        422,
        "validation_error",
    )
    assert_error(
        anon.post("/_sandbox/faults", json={"rate_999": 1}), 422, "validation_error", "rate_999"
    )


# --- items (v1.1) ---


def item_payload(item: str = "GADGET-1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "item": item,
        "description": "Gadget",
        "type": "stock",
        "unit_price": "19.99",
        "opening_quantity": "10",
        "reference": "prod_gadget",
    }
    body.update(over)
    return body


def test_items_create_get_list(api: TestClient) -> None:
    created = post_ok(api, "/api/v1/items", item_payload())
    assert created == {
        "item": "GADGET-1",
        "description": "Gadget",
        "type": "stock",
        "unit_price": "19.99",
        "on_hand": "10",
        "reference": "prod_gadget",
    }
    assert api.get("/api/v1/items/GADGET-1").json() == created
    service = post_ok(
        api,
        "/api/v1/items",
        item_payload("SVC_2", type="service", opening_quantity=None, reference="prod_svc"),
    )
    assert service["on_hand"] == "0"
    listed = api.get("/api/v1/items", params={"reference": "prod_gadget"}).json()["data"]
    assert listed == [created]
    codes = [i["item"] for i in api.get("/api/v1/items").json()["data"]]
    assert codes == ["WIDGET", "HOURS", "X", "GADGET-1", "SVC_2"]
    assert_error(api.get("/api/v1/items/NOPE"), 404, "not_found")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"item": "lower"}, "item"),
        ({"item": "A" * 21}, "item"),
        ({"item": ""}, "item"),
        ({"item": "HAS SPACE"}, "item"),
        ({"item": "WIDGET"}, "item"),  # unique
        ({"description": "D" * 61}, "description"),
        ({"description": None}, "description"),
        ({"type": "kit"}, "type"),
        ({"reference": "r" * 41}, "reference"),
        ({"unit_price": "1.5"}, "unit_price"),
        ({"type": "service"}, "opening_quantity"),  # a service holds no stock
        ({"on_hand": "5"}, "on_hand"),  # read-only
    ],
)
def test_item_field_rules(api: TestClient, override: dict[str, Any], field: str) -> None:
    body = item_payload(**override)
    body = {k: v for k, v in body.items() if v is not None or k == "description"}
    assert_error(api.post("/api/v1/items", json=body), 422, "validation_error", field)
    assert api.get("/api/v1/items/GADGET-1").status_code == 404


def test_lines_must_name_an_item_of_the_master(api: TestClient) -> None:
    lines = [
        {"item": "WIDGET", "quantity": "1", "unit_price": "12.50"},
        {"item": "UNKNOWN", "quantity": "1", "unit_price": "1.00"},
    ]
    assert_error(
        api.post("/api/v1/invoices", json=invoice_payload(lines=lines, total="14.50")),
        422,
        "validation_error",
        "lines[1].item",
    )
    assert_error(
        api.post("/api/v1/salesorders", json=sales_order_payload(lines=lines)),
        422,
        "validation_error",
        "lines[1].item",
    )
    assert api.get("/api/v1/invoices").json()["data"] == []
    assert api.get("/api/v1/items/WIDGET").json()["on_hand"] == "100"  # nothing moved


def test_invoicing_a_stock_item_reduces_on_hand(api: TestClient) -> None:
    # An order does not move stock; its invoice does, once; a service item holds none.
    order = post_ok(
        api,
        "/api/v1/salesorders",
        sales_order_payload(lines=[{"item": "WIDGET", "quantity": "3", "unit_price": "12.50"}]),
    )
    assert api.get("/api/v1/items/WIDGET").json()["on_hand"] == "100"
    lines = [
        {"item": "WIDGET", "quantity": "3", "unit_price": "12.50"},
        {"item": "HOURS", "quantity": "2", "unit_price": "10.00"},
        {"item": "WIDGET", "quantity": "1.5", "unit_price": "10.00"},
    ]
    body = invoice_payload(
        lines=lines, sales_order_no=order["order_no"], tax_amount="0.00", total="72.50"
    )
    post_ok(api, "/api/v1/invoices", body)
    assert api.get("/api/v1/items/WIDGET").json()["on_hand"] == "95.5"
    assert api.get("/api/v1/items/HOURS").json()["on_hand"] == "0"
    # A refused invoice moves nothing.
    assert_error(
        api.post("/api/v1/invoices", json={**body, "total": "1.00"}), 422, "validation_error"
    )
    assert api.get("/api/v1/items/WIDGET").json()["on_hand"] == "95.5"


def test_seeded_orders_need_their_items(make_sage_app: AppFactory) -> None:
    orders = [
        SeedSalesOrder(
            "SO0000009", "ACME", datetime.date(2026, 2, 1), "USD", [SeedLine("GHOST", None, "1", 1)]
        )
    ]
    with pytest.raises(ValueError, match="no item GHOST"):
        make_sage_app(sales_orders=orders)
