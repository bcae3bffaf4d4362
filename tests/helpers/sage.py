"""Fixtures and payload builders shared by the Sage Pro sandbox and client tests.

Imported explicitly by the test modules (``from tests.helpers.sage import ...``)
rather than through a conftest, so each test module says what it depends on. Fixture functions
are named ``<fixture>_fixture`` and registered under ``name=<fixture>``, so importing them does
not shadow the test parameters that use them.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from devkit.sandbox.sage_app import create_sage_app
from devkit.sandbox.sage_seed import SeedCustomer, SeedItem, SeedLine, SeedSalesOrder
from stripe_sage.sage.client import SageProClient

with warnings.catch_warnings():
    # Starlette 1.x prefers the httpx2 package for its test client; plain httpx still works.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from starlette.testclient import TestClient

API_KEY = "sage_test_K3y-do-not-leak-7f2c"
BASE_URL = "http://testserver"
START = datetime.datetime(2026, 3, 15, 12, 0, tzinfo=datetime.UTC)
FISCAL_YEARS = (2025, 2026)
CLOSED_THROUGH = datetime.date(2025, 12, 31)  # all of 2025 is closed, 2026 open

SEED_CUSTOMERS = (
    SeedCustomer("ACME", "Acme Corp", "ap@acme.example", "USD", "cus_acme"),
    SeedCustomer("EURO1", "Euro GmbH", "ap@euro.example", "EUR", "cus_euro"),
    SeedCustomer("GLOBEX", "Globex", None, "USD", "cus_globex"),
)
# The item master (v1.1): every line the tests post names one of these.
SEED_ITEMS = (
    SeedItem("WIDGET", "Widget", "stock", 1250, opening_quantity="100"),
    SeedItem("HOURS", "Consulting hours", "service"),
    SeedItem("X", "Anything", "service"),
)
SEED_ORDERS = (
    SeedSalesOrder(
        "SO0000001",
        "ACME",
        datetime.date(2026, 2, 1),
        "USD",
        [SeedLine("WIDGET", "Widget", "2", 1250)],
        reference="web-so-1",
    ),
)


class Clock:
    """An injectable, hand-advanced clock (``updated_at`` and ``updated_since`` tests)."""

    def __init__(self, now: datetime.datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **delta: float) -> datetime.datetime:
        self.now += datetime.timedelta(**delta)
        return self.now


class SleepRecorder:
    """Stands in for ``time.sleep``: records each requested delay, never sleeps."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture(name="clock")
def clock_fixture() -> Clock:
    return Clock()


@pytest.fixture(name="sage_db")
def sage_db_fixture(tmp_path: Path) -> Path:
    return tmp_path / "sagepro.sqlite"


AppFactory = Callable[..., FastAPI]


@pytest.fixture(name="make_sage_app")
def make_sage_app_fixture(sage_db: Path, clock: Clock) -> AppFactory:
    """``make_sage_app(**overrides)``: the sandbox on the test's SQLite file."""

    def make(**overrides: Any) -> FastAPI:
        db_path = overrides.pop("db_path", sage_db)
        kwargs: dict[str, Any] = {
            "api_key": API_KEY,
            "customers": SEED_CUSTOMERS,
            "sales_orders": SEED_ORDERS,
            "items": SEED_ITEMS,
            "fiscal_years": FISCAL_YEARS,
            "closed_through": CLOSED_THROUGH,
            "clock": clock,
        }
        kwargs.update(overrides)
        return create_sage_app(db_path, **kwargs)

    return make


@pytest.fixture(name="sage_app")
def sage_app_fixture(make_sage_app: AppFactory) -> FastAPI:
    return make_sage_app()


@pytest.fixture(name="api")
def api_fixture(sage_app: FastAPI) -> Iterator[TestClient]:
    """In-process HTTP client carrying the bearer token."""
    with TestClient(sage_app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        yield client


@pytest.fixture(name="anon")
def anon_fixture(sage_app: FastAPI) -> Iterator[TestClient]:
    """In-process HTTP client without credentials (sandbox controls, 401 checks)."""
    with TestClient(sage_app) as client:
        yield client


@pytest.fixture(name="sleeps")
def sleeps_fixture() -> SleepRecorder:
    return SleepRecorder()


@pytest.fixture(name="sage_client")
def sage_client_fixture(sage_app: FastAPI, sleeps: SleepRecorder) -> Iterator[SageProClient]:
    """The real client over the in-process sandbox; jitter fixed at 1.0 (multiplier 1)."""
    with (
        TestClient(sage_app) as http,
        SageProClient(
            BASE_URL, API_KEY, http_client=http, sleep=sleeps, jitter=lambda: 1.0
        ) as client,
    ):
        yield client


def set_faults(http: httpx.Client, **config: Any) -> None:
    response = http.post("/_sandbox/faults", json=config)
    assert response.status_code == 200, response.text


def sandbox_stats(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/_sandbox/stats")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_error(
    response: httpx.Response, status: int, code: str, field: object = ...
) -> dict[str, Any]:
    """The contract's error shape, with the expected status, code and (optionally) field."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"code", "message", "field"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    if field is not ...:
        assert error["field"] == field, error
    return error


# --- payload builders: a valid document, with overrides ---


def customer_payload(customer_id: str = "NEW1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": customer_id,
        "name": "New Customer Ltd",
        "email": "billing@new.example",
        "phone": "+1 555 0100",
        "address1": "1 Main Street",
        "city": "Springfield",
        "state": "IL",
        "postal_code": "62701",
        "country": "US",
        "currency": "USD",
        "reference": f"cus_{customer_id.lower()}",
    }
    body.update(over)
    return body


def sales_order_payload(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": "ACME",
        "order_date": "2026-03-01",
        "currency": "USD",
        "reference": "web-so-9",
        "lines": [
            {"item": "WIDGET", "description": "Widget", "quantity": "1", "unit_price": "9.99"}
        ],
    }
    body.update(over)
    return body


def invoice_payload(**over: Any) -> dict[str, Any]:
    """ACME, USD: 2 x 12.50 + 1.00 tax = 26.00."""
    body: dict[str, Any] = {
        "customer_id": "ACME",
        "invoice_date": "2026-03-01",
        "due_date": "2026-03-31",
        "currency": "USD",
        "reference": "in_1",
        "lines": [
            {"item": "WIDGET", "description": "Widget", "quantity": "2", "unit_price": "12.50"}
        ],
        "tax_amount": "1.00",
        "total": "26.00",
    }
    body.update(over)
    return body


def receipt_payload(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": "ACME",
        "receipt_date": "2026-03-02",
        "amount": "26.00",
        "currency": "USD",
        "payment_method": "card",
        "reference": "ch_1",
        "deposit_account": "1050",
        "memo": "Stripe charge ch_1",
    }
    body.update(over)
    return body


def credit_memo_payload(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": "ACME",
        "memo_date": "2026-03-03",
        "amount": "5.00",
        "currency": "USD",
        "reference": "re_1",
        "reason": "requested_by_customer",
        "gl_account": "1050",
    }
    body.update(over)
    return body


def journal_payload(**over: Any) -> dict[str, Any]:
    """A payout journal: Bank 97.10 / Fees 2.90 against Clearing 100.00."""
    body: dict[str, Any] = {
        "entry_date": "2026-03-05",
        "source_code": "ST",
        "description": "Stripe payout po_1",
        "reference": "po_1",
        "currency": "USD",
        "lines": [
            {"account": "1000", "debit": "97.10", "credit": "0.00", "description": "Bank"},
            {"account": "6100", "debit": "2.90", "credit": "0.00", "description": "Fees"},
            {"account": "1050", "debit": "0.00", "credit": "100.00", "description": "Clearing"},
        ],
    }
    body.update(over)
    return body
