"""The Sage Pro client against the sandbox: retry policy, error mapping, exactly-once, secrets."""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from devkit.sandbox.runner import ThreadedServer, free_port
from stripe_sage.errors import (
    AuthenticationError,
    FatalError,
    NotFoundError,
    RetryableError,
    ValidationError,
)
from stripe_sage.sage.client import SageProClient, parse_retry_after
from tests.helpers.sage import (  # noqa: F401  (fixtures, used by name)
    API_KEY,
    BASE_URL,
    AppFactory,
    Clock,
    SleepRecorder,
    TestClient,
    anon_fixture,
    clock_fixture,
    customer_payload,
    invoice_payload,
    journal_payload,
    make_sage_app_fixture,
    receipt_payload,
    sage_app_fixture,
    sage_client_fixture,
    sage_db_fixture,
    sandbox_stats,
    set_faults,
    sleeps_fixture,
)

pytestmark = pytest.mark.integration


def documents(anon: TestClient, collection: str, reference: str) -> list[dict[str, Any]]:
    """What the sandbox holds for a reference, read past the client (and its faults)."""
    response = anon.get(
        f"/api/v1/{collection}",
        params={"reference": reference},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


@pytest.fixture
def loopback(sage_app: FastAPI) -> Iterator[ThreadedServer]:
    """The same sandbox served by uvicorn on 127.0.0.1 (port 0: the OS picks)."""
    with ThreadedServer(sage_app, port=0) as server:
        yield server


# --- plain operation ---


def test_create_get_and_find_by_reference(sage_client: SageProClient) -> None:
    invoice = sage_client.create_invoice(invoice_payload())
    assert invoice["invoice_no"] == "INV0000001" and invoice["balance_due"] == "26.00"
    assert sage_client.get("invoices", "INV0000001") == invoice
    receipt = sage_client.create_cash_receipt(
        receipt_payload(apply_to=[{"invoice_no": "INV0000001", "amount": "26.00"}])
    )
    assert sage_client.find_by_reference("cashreceipts", "ch_1") == [receipt]
    assert sage_client.get("invoices", "INV0000001")["status"] == "paid"
    assert sage_client.find_by_reference("invoices", "in_nothing") == []
    memo = sage_client.create_credit_memo(
        {
            "customer_id": "ACME",
            "memo_date": "2026-03-03",
            "amount": "1.00",
            "currency": "USD",
            "reference": "re_1",
            "gl_account": "1050",
        }
    )
    assert memo["memo_no"] == "CM00000001"
    order = sage_client.create_sales_order(
        {
            "customer_id": "ACME",
            "order_date": "2026-03-01",
            "currency": "USD",
            "reference": "web-2",
            "lines": [{"item": "X", "quantity": "1", "unit_price": "1.00"}],
        }
    )
    assert order["order_no"] == "SO0000002"
    assert sage_client.create_journal_entry(journal_payload())["entry_no"] == "JE00000001"
    assert sage_client.stats.retries == 0 and sage_client.stats.recovered_by_lookup == 0


def test_customers_roundtrip_update_and_change_feed(
    sage_client: SageProClient, clock: Clock
) -> None:
    created = sage_client.create_customer(customer_payload("NEW1"))
    assert sage_client.get_customer("NEW1") == created
    clock.advance(hours=1)
    updated = sage_client.update_customer("NEW1", {"city": "Paris", "country": "FR"})
    assert updated["city"] == "Paris" and updated["name"] == created["name"]
    since = datetime.datetime(2026, 3, 15, 12, 30)  # naive: UTC
    assert [c["customer_id"] for c in sage_client.list_customers(updated_since=since)] == ["NEW1"]
    assert {c["customer_id"] for c in sage_client.list_customers()} == {
        "ACME",
        "EURO1",
        "GLOBEX",
        "NEW1",
    }
    with pytest.raises(NotFoundError) as missing:
        sage_client.update_customer("NOBODY", {"city": "X"})
    assert missing.value.http_status == 404 and missing.value.code == "not_found"
    with pytest.raises(NotFoundError):
        sage_client.get_customer("NOBODY")


def test_list_customers_walks_every_page(sage_client: SageProClient, anon: TestClient) -> None:
    many = [
        {"customer_id": f"BULK{i:04d}", "name": f"Bulk {i}", "currency": "USD"} for i in range(450)
    ]
    assert anon.post("/_sandbox/seed", json={"customers": many}).status_code == 200
    ids = [c["customer_id"] for c in sage_client.list_customers()]
    assert len(ids) == 453 and len(set(ids)) == 453
    assert sage_client.stats.attempts == 3  # 200 + 200 + 53


def test_reference_data(sage_client: SageProClient) -> None:
    accounts = [a["account"] for a in sage_client.gl_accounts()]
    assert accounts[:3] == ["1000", "1010", "1050"]  # the chart in account order
    assert accounts == sorted(accounts, key=int)
    periods = sage_client.fiscal_periods()
    assert len(periods) == 24 and periods[-1]["end"] == "2026-12-31"


# --- retry policy ---


def test_429_waits_exactly_retry_after_then_succeeds(
    sage_client: SageProClient, anon: TestClient, sleeps: SleepRecorder
) -> None:
    set_faults(anon, rate_429=1.0, retry_after=3, max_faults=2)
    created = sage_client.create_journal_entry(journal_payload())
    assert sleeps.delays == [3.0, 3.0]
    assert sage_client.stats.rate_limited == 2 and sage_client.stats.retries == 2
    assert sage_client.stats.recovered_by_lookup == 0  # a 429 is a definite "not done"
    assert sage_client.stats.attempts == 3
    assert documents(anon, "journalentries", "po_1") == [created]


def test_429_from_the_rate_budget(make_sage_app: AppFactory, sleeps: SleepRecorder) -> None:
    app = make_sage_app(rate_limit_rps=1)
    with TestClient(app) as http:
        client = SageProClient(BASE_URL, API_KEY, http_client=http, sleep=sleeps, jitter=lambda: 1)
        client.gl_accounts()
        with pytest.raises(RetryableError) as exhausted:
            SageProClient(
                BASE_URL, API_KEY, http_client=http, sleep=sleeps, max_attempts=2
            ).gl_accounts()
    assert exhausted.value.code == "rate_limited" and exhausted.value.retry_after == 1.0
    assert sleeps.delays == [1.0]


def test_503_is_retried_with_exponential_backoff(
    sage_client: SageProClient, anon: TestClient, sleeps: SleepRecorder
) -> None:
    set_faults(anon, rate_503=1.0, max_faults=3, only_methods=["GET"])
    assert sage_client.get("salesorders", "SO0000001")["status"] == "open"
    assert sleeps.delays == [0.25, 0.5, 1.0]  # base 0.25, doubling, jitter fixed at 1.0
    assert sage_client.stats.server_errors == 3 and sage_client.stats.attempts == 4
    assert sandbox_stats(anon)["faults"]["http_503"] == 3


def test_backoff_is_capped_and_jittered(sage_app: FastAPI, anon: TestClient) -> None:
    sleeps = SleepRecorder()
    jitters = iter([0.0, 1.0, 0.5, 0.0])
    set_faults(anon, rate_500=1.0, max_faults=4)
    with TestClient(sage_app) as http:
        client = SageProClient(
            BASE_URL,
            API_KEY,
            http_client=http,
            backoff_base=1.0,
            backoff_max=3.0,
            sleep=sleeps,
            jitter=lambda: next(jitters),
        )
        client.gl_accounts()
    # min(3, 1 * 2**(n-1)) * (0.5 + jitter / 2)
    assert sleeps.delays == [0.5, 2.0, 2.25, 1.5]


def test_gives_up_after_max_attempts_with_retryable_error(
    sage_app: FastAPI, anon: TestClient, sleeps: SleepRecorder
) -> None:
    set_faults(anon, rate_503=1.0)
    with TestClient(sage_app) as http:
        client = SageProClient(
            BASE_URL, API_KEY, http_client=http, max_attempts=3, sleep=sleeps, jitter=lambda: 1
        )
        with pytest.raises(RetryableError) as gave_up:
            client.get("invoices", "INV0000001")
    assert gave_up.value.http_status == 503 and gave_up.value.code == "unavailable"
    assert "3 attempts" in str(gave_up.value)
    assert client.stats.attempts == 3 and len(sleeps.delays) == 2
    assert sandbox_stats(anon)["faults"]["http_503"] == 3


def test_401_raises_authentication_error_after_one_request(
    sage_app: FastAPI, anon: TestClient, sleeps: SleepRecorder
) -> None:
    with TestClient(sage_app) as http:
        client = SageProClient(BASE_URL, "wrong-key", http_client=http, sleep=sleeps)
        with pytest.raises(AuthenticationError) as denied:
            client.create_journal_entry(journal_payload())
    assert denied.value.http_status == 401 and denied.value.code == "unauthorized"
    assert client.stats.attempts == 1 and sleeps.delays == []
    assert sandbox_stats(anon)["requests"] == 1


@pytest.mark.parametrize(
    ("collection", "payload", "code", "field"),
    [
        (
            "journalentries",
            journal_payload(
                lines=[{"account": "1000", "debit": "1.00"}, {"account": "1050", "credit": "2.00"}]
            ),
            "unbalanced",
            "lines",
        ),
        ("journalentries", journal_payload(entry_date="2025-11-30"), "period_closed", "entry_date"),
        (
            "journalentries",
            journal_payload(source_code="STRIPE"),
            "validation_error",
            "source_code",
        ),
        (
            "cashreceipts",
            receipt_payload(apply_to=[{"invoice_no": "INV0000001", "amount": "30.00"}]),
            "over_application",
            "apply_to[0].amount",
        ),
        ("invoices", invoice_payload(customer_id="NOBODY"), "unknown_customer", "customer_id"),
        ("creditmemos", {"reference": "re_1"}, "validation_error", "customer_id"),
    ],
)
def test_validation_errors_carry_code_and_field_and_are_not_retried(
    sage_client: SageProClient,
    sleeps: SleepRecorder,
    collection: str,
    payload: dict[str, Any],
    code: str,
    field: str,
) -> None:
    sage_client.create_invoice(invoice_payload())  # INV0000001 for the over-application case
    before = sage_client.stats.attempts
    with pytest.raises(ValidationError) as rejected:
        sage_client.create(collection, payload)
    assert (rejected.value.code, rejected.value.field) == (code, field)
    assert rejected.value.http_status == 422 and rejected.value.system == "sagepro"
    assert sage_client.stats.attempts == before + 1 and sleeps.delays == []


def test_bad_request_is_a_validation_error(sage_client: SageProClient) -> None:
    with pytest.raises(ValidationError) as bad:
        sage_client.update_customer("ACME", [1, 2])  # type: ignore[arg-type]
    assert bad.value.http_status == 400 and bad.value.code == "bad_request"


def test_retry_after_header_forms() -> None:
    now = datetime.datetime(2026, 3, 15, 12, 0, tzinfo=datetime.UTC)
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("Sun, 15 Mar 2026 12:00:07 GMT", now=now) == 7.0
    assert parse_retry_after("Sun, 15 Mar 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- exactly once ---


def test_commit_then_503_yields_exactly_one_document(
    sage_client: SageProClient, anon: TestClient
) -> None:
    set_faults(anon, commit_then_503_rate=1.0, only_methods=["POST"])
    created = sage_client.create_journal_entry(journal_payload())
    assert created["entry_no"] == "JE00000001"
    assert documents(anon, "journalentries", "po_1") == [created]
    assert sage_client.stats.recovered_by_lookup == 1
    assert sage_client.stats.attempts == 2  # the POST, then the lookup: no second POST
    assert sandbox_stats(anon)["faults"]["commit_then_503"] == 1


def test_commit_then_503_on_a_receipt_applies_it_once(
    sage_client: SageProClient, anon: TestClient
) -> None:
    invoice = sage_client.create_invoice(invoice_payload())
    set_faults(anon, commit_then_503_rate=1.0, only_methods=["POST"])
    sage_client.create_cash_receipt(
        receipt_payload(
            amount="10.00", apply_to=[{"invoice_no": invoice["invoice_no"], "amount": "10.00"}]
        )
    )
    assert len(documents(anon, "cashreceipts", "ch_1")) == 1
    assert sage_client.get("invoices", invoice["invoice_no"])["balance_due"] == "16.00"


def test_a_dropped_connection_is_resolved_by_lookup(
    sage_client: SageProClient, anon: TestClient
) -> None:
    set_faults(anon, drop_rate=1.0, only_methods=["POST"])
    created = sage_client.create_invoice(invoice_payload())
    assert documents(anon, "invoices", "in_1") == [created]
    assert sage_client.stats.transport_errors == 1 and sage_client.stats.recovered_by_lookup == 1


def test_a_503_before_commit_is_looked_up_then_posted_once(
    sage_client: SageProClient, anon: TestClient
) -> None:
    set_faults(anon, rate_503=1.0, max_faults=1, only_methods=["POST"])
    created = sage_client.create_invoice(invoice_payload())
    assert documents(anon, "invoices", "in_1") == [created]
    assert sage_client.stats.recovered_by_lookup == 0
    assert sage_client.stats.attempts == 3  # POST (503), lookup (none), POST (201)


def test_an_uncertain_customer_create_is_resolved_by_customer_id(
    sage_client: SageProClient, anon: TestClient
) -> None:
    set_faults(anon, commit_then_503_rate=1.0, only_methods=["POST"])
    created = sage_client.create_customer(customer_payload("ONCE1"))
    assert created["customer_id"] == "ONCE1"
    assert [c["customer_id"] for c in documents(anon, "customers", "cus_once1")] == ["ONCE1"]
    assert sage_client.stats.recovered_by_lookup == 1


def test_a_create_without_a_reference_is_refused_before_sending(
    sage_client: SageProClient,
) -> None:
    with pytest.raises(ValidationError) as refused:
        sage_client.create_journal_entry(journal_payload(reference=None))
    assert refused.value.code == "missing_reference" and refused.value.field == "reference"
    assert sage_client.stats.attempts == 0


def test_reference_unique_false_never_resends_an_uncertain_create(
    sage_client: SageProClient, anon: TestClient
) -> None:
    set_faults(anon, commit_then_503_rate=1.0, only_methods=["POST"])
    with pytest.raises(FatalError) as unknown:
        sage_client.create("journalentries", journal_payload(), reference_unique=False)
    assert unknown.value.code == "outcome_unknown"
    assert len(documents(anon, "journalentries", "po_1")) == 1
    # ... but a definite rejection (429) is still retried.
    set_faults(anon, rate_429=1.0, retry_after=1, max_faults=1)
    sage_client.create("journalentries", journal_payload(reference="po_2"), reference_unique=False)
    assert len(documents(anon, "journalentries", "po_2")) == 1


def test_check_first_returns_what_an_earlier_run_posted(
    sage_client: SageProClient, anon: TestClient
) -> None:
    earlier = sage_client.create_journal_entry(journal_payload())
    again = sage_client.create("journalentries", journal_payload(), check_first=True)
    assert again == earlier
    assert len(documents(anon, "journalentries", "po_1")) == 1
    fresh = sage_client.create(
        "journalentries", journal_payload(reference="po_9"), check_first=True
    )
    assert fresh["reference"] == "po_9"


# --- real loopback (uvicorn) ---


def test_over_loopback_a_read_timeout_after_commit_yields_one_document(
    loopback: ThreadedServer, sleeps: SleepRecorder
) -> None:
    with SageProClient(
        loopback.url, API_KEY, timeout=0.3, sleep=sleeps, jitter=lambda: 1
    ) as client:
        with httpx.Client(base_url=loopback.url) as control:
            set_faults(control, slow_rate=1.0, slow_seconds=1.0, only_methods=["POST"])
        created = client.create_journal_entry(journal_payload())
        assert client.stats.transport_errors == 1 and client.stats.recovered_by_lookup == 1
        assert client.find_by_reference("journalentries", "po_1") == [created]
        assert sleeps.delays == [0.25]


def test_over_loopback_a_dropped_connection_yields_one_document(
    loopback: ThreadedServer, sleeps: SleepRecorder
) -> None:
    with SageProClient(loopback.url, API_KEY, sleep=sleeps) as client:
        with httpx.Client(base_url=loopback.url) as control:
            set_faults(control, drop_rate=1.0, only_methods=["POST"])
        created = client.create_invoice(invoice_payload())
        assert client.find_by_reference("invoices", "in_1") == [created]
        assert client.stats.recovered_by_lookup == 1


def test_over_loopback_full_flow_with_retries(
    loopback: ThreadedServer, sleeps: SleepRecorder
) -> None:
    with SageProClient(loopback.url, API_KEY, sleep=sleeps) as client:
        with httpx.Client(base_url=loopback.url) as control:
            set_faults(control, seed=3, rate_429=0.2, retry_after=1, rate_503=0.2)
        invoices = [client.create_invoice(invoice_payload(reference=f"in_{i}")) for i in range(10)]
        assert len({inv["invoice_no"] for inv in invoices}) == 10
        for i in range(10):
            assert len(client.find_by_reference("invoices", f"in_{i}")) == 1
        assert client.stats.retries > 0


def test_a_refused_connection_is_retried_without_lookup(sleeps: SleepRecorder) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with (
        SageProClient(url, API_KEY, max_attempts=3, sleep=sleeps) as client,
        pytest.raises(RetryableError) as down,
    ):
        client.create_journal_entry(journal_payload())
    assert down.value.code == "unavailable"
    # The request never left, so no lookup was needed: exactly three POST attempts.
    assert client.stats.attempts == 3 and client.stats.transport_errors == 3


# --- secrets ---


def test_the_api_key_never_leaks(
    loopback: ThreadedServer,
    sage_app: FastAPI,
    anon: TestClient,
    sleeps: SleepRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    raised: list[Exception] = []

    def failing(call: Callable[[], object]) -> None:
        with pytest.raises(Exception) as info:
            call()
        assert isinstance(info.value, Exception)
        raised.append(info.value)

    with SageProClient(loopback.url, API_KEY, sleep=sleeps) as client:
        assert API_KEY not in repr(client) and API_KEY not in str(vars(client))
        set_faults(anon, rate_503=1.0, max_faults=2)
        client.create_journal_entry(journal_payload())
        for bad in (journal_payload(entry_date="2025-01-01"), journal_payload(reference=None)):
            failing(functools.partial(client.create_journal_entry, bad))
        set_faults(anon, rate_503=1.0)
        with SageProClient(loopback.url, API_KEY, max_attempts=2, sleep=sleeps) as impatient:
            failing(impatient.gl_accounts)
        anon.delete("/_sandbox/faults")
    with SageProClient(loopback.url, API_KEY + "x", sleep=sleeps) as wrong:
        failing(wrong.gl_accounts)
    assert [type(e) for e in raised] == [
        ValidationError,
        ValidationError,
        RetryableError,
        AuthenticationError,
    ]
    assert caplog.records, "the client and httpx log at DEBUG/INFO/WARNING"
    assert any(r.name == "stripe_sage.sage.client" for r in caplog.records)
    for exc in raised:
        assert API_KEY not in str(exc) and API_KEY not in repr(exc)
    assert API_KEY not in caplog.text
    assert API_KEY not in "".join(str(r.args) for r in caplog.records)


# --- items (v1.1) ---


def _item(code: str = "GADGET-1", **over: Any) -> dict[str, Any]:
    return {"item": code, "description": "Gadget", "type": "service", "reference": "prod_g", **over}


def test_items_create_get_list(sage_client: SageProClient) -> None:
    created, new = sage_client.create_item(_item())
    assert new and created["item"] == "GADGET-1" and created["on_hand"] == "0"
    assert sage_client.get_item("GADGET-1") == created
    assert [i["item"] for i in sage_client.list_items()] == ["WIDGET", "HOURS", "X", "GADGET-1"]
    assert list(sage_client.list_items(reference="prod_g")) == [created]
    with pytest.raises(NotFoundError):
        sage_client.get_item("NOPE")


def test_create_item_links_an_existing_code(sage_client: SageProClient, anon: TestClient) -> None:
    before = sandbox_stats(anon)["requests"]
    linked, new = sage_client.create_item(_item("WIDGET", reference=None))
    assert not new and linked["type"] == "stock" and linked["on_hand"] == "100"
    assert sandbox_stats(anon)["requests"] - before == 1  # one GET, no POST
    # Made from another product: not ours to link.
    sage_client.create_item(_item("MINE"))
    with pytest.raises(ValidationError) as caught:
        sage_client.create_item(_item("MINE", reference="prod_other"))
    assert caught.value.field == "item"


def test_create_item_race_resolves_to_the_item_that_won(
    sage_app: FastAPI, anon: TestClient, sleeps: SleepRecorder
) -> None:
    """Two runs both see no item, both POST: the loser's 422 on ``item`` resolves to the
    winner's item. The race is forced: the sandbox creates the item between our GET and POST."""

    class RacingHttp(httpx.Client):
        def send(self, request: httpx.Request, **kw: Any) -> httpx.Response:
            if request.method == "POST" and request.url.path == "/api/v1/items":
                other = anon.post(
                    "/api/v1/items", json=_item(), headers={"Authorization": f"Bearer {API_KEY}"}
                )
                assert other.status_code == 201, other.text
            return super().send(request, **kw)

    with (
        TestClient(sage_app) as http,
        RacingHttp(transport=http._transport, base_url=BASE_URL) as racing,
        SageProClient(BASE_URL, API_KEY, http_client=racing, sleep=sleeps) as client,
    ):
        item, new = client.create_item(_item())
    assert not new and item["item"] == "GADGET-1"
    assert len(documents(anon, "items", "prod_g")) == 1


def test_an_uncertain_item_create_is_resolved_by_code(
    sage_client: SageProClient, anon: TestClient
) -> None:
    set_faults(anon, commit_then_503_rate=1.0, only_methods=["POST"])
    item, new = sage_client.create_item(_item("ONCE-1", reference="prod_once"))
    assert new and item["item"] == "ONCE-1"
    assert len(documents(anon, "items", "prod_once")) == 1
    assert sage_client.stats.recovered_by_lookup == 1


def test_item_and_customer_calls_take_the_loaders_policy(
    sage_client: SageProClient, anon: TestClient, sleeps: SleepRecorder
) -> None:
    """``attempts``/``pause`` reach items and customer reads/updates as they reach creates:
    under the loader's policy a 429 comes back with its Retry-After and a 5xx is sent again
    at once — the posting thread never sleeps (it did, through the full backoff, before)."""
    set_faults(anon, rate_429=1.0, retry_after=3, max_faults=1)
    with pytest.raises(RetryableError) as held:
        sage_client.create_item(_item("PACED-1", reference="prod_paced"), attempts=3, pause=False)
    assert held.value.retry_after == 3.0 and sleeps.delays == []
    assert documents(anon, "items", "prod_paced") == []
    item, new = sage_client.create_item(
        _item("PACED-1", reference="prod_paced"), attempts=3, pause=False
    )
    assert new and item["item"] == "PACED-1"
    set_faults(anon, rate_503=1.0, max_faults=2, only_methods=["GET"])
    assert sage_client.get_item("PACED-1", attempts=3, pause=False) == item
    assert sleeps.delays == []
    set_faults(anon, rate_503=1.0, only_methods=["GET"])
    with pytest.raises(RetryableError):
        sage_client.get_item("PACED-1", attempts=2, pause=False)
    # Two exchanges for the read that succeeded at its third, two for the one that gave up.
    assert sleeps.delays == [] and sandbox_stats(anon)["faults"]["http_503"] == 4
    anon.delete("/_sandbox/faults")
    created = sage_client.create_customer(customer_payload("PACED"))
    set_faults(anon, rate_429=1.0, retry_after=2, max_faults=1, only_methods=["PUT"])
    with pytest.raises(RetryableError) as put_held:
        sage_client.update_customer("PACED", {"name": "Paced 2"}, attempts=3, pause=False)
    assert put_held.value.retry_after == 2.0 and sleeps.delays == []
    assert sage_client.get_customer("PACED", attempts=1, pause=False)["name"] == created["name"]
