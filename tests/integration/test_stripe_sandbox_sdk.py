"""The official stripe-python SDK against the Stripe sandbox served on loopback.

The sandbox must behave like Stripe wherever the SDK (or the pipeline through it) can notice:
list paging, ``created`` filters, expansions, filters, errors and idempotent writes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import stripe

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.stripe_app import create_stripe_app
from devkit.sandbox.stripe_business import BusinessConfig
from tests.helpers import loopback

pytestmark = pytest.mark.integration

END = 1_782_777_600  # fixed: the same business on every run
KEY = "sk_test_sandbox_sdk"
CHARGES = 2000


def make_client(url: str, key: str = KEY) -> stripe.StripeClient:
    return stripe.StripeClient(key, base_addresses={"api": url}, max_network_retries=0)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadedServer]:
    app = create_stripe_app(
        BusinessConfig(seed=11, charges=CHARGES, end=END), api_key=KEY, rate_limit=None
    )
    with ThreadedServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ThreadedServer) -> stripe.StripeClient:
    return make_client(server.url)


def dicts(items: Any) -> list[dict[str, Any]]:
    return [x.to_dict() for x in items]


@pytest.fixture(scope="module")
def all_charges(client: stripe.StripeClient) -> list[dict[str, Any]]:
    return dicts(client.v1.charges.list(params={"limit": 100}).auto_paging_iter())


@pytest.fixture(scope="module")
def raw(server: ThreadedServer) -> Iterator[httpx.Client]:
    with loopback.client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def raw_list(raw: httpx.Client, resource: str, **params: Any) -> list[dict[str, Any]]:
    """Ground truth without the SDK (its object model is slow): page with plain HTTP."""
    out: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 100, **params}
    while True:
        r = raw.get(f"/v1/{resource}", params=query)
        r.raise_for_status()
        body = r.json()
        out += body["data"]
        if not body["has_more"]:
            return out
        query["starting_after"] = body["data"][-1]["id"]


@pytest.fixture(scope="module")
def all_events(raw: httpx.Client) -> list[dict[str, Any]]:
    return raw_list(raw, "events")


def list_all(client: stripe.StripeClient, resource: str, **params: Any) -> list[dict[str, Any]]:
    service = getattr(client.v1, resource)
    return dicts(service.list(params={"limit": 100, **params}).auto_paging_iter())


# -- paging and created filters ------------------------------------------------------------


def test_auto_paging_returns_every_charge_once_newest_first(
    all_charges: list[dict[str, Any]],
    server: ThreadedServer,
) -> None:
    assert len(all_charges) == CHARGES
    ids = [c["id"] for c in all_charges]
    assert len(set(ids)) == CHARGES
    created = [c["created"] for c in all_charges]
    assert created == sorted(created, reverse=True)
    info = loopback.get(f"{server.url}/_sandbox/info").json()
    assert info["counts"]["charges"] == CHARGES
    assert all(c["object"] == "charge" for c in all_charges)
    # Since 2022-11-15 refunds are not embedded unless expanded.
    assert all("refunds" not in c for c in all_charges)


def test_small_pages_agree_with_large_pages(
    client: stripe.StripeClient,
    all_charges: list[dict[str, Any]],
) -> None:
    page = client.v1.charges.list(params={"limit": 7})
    assert page.has_more is True
    assert [c.id for c in page.data] == [c["id"] for c in all_charges[:7]]
    nxt = client.v1.charges.list(params={"limit": 7, "starting_after": page.data[-1].id})
    assert [c.id for c in nxt.data] == [c["id"] for c in all_charges[7:14]]
    last = client.v1.charges.list(params={"limit": 5, "starting_after": all_charges[-3]["id"]})
    assert [c.id for c in last.data] == [c["id"] for c in all_charges[-2:]]
    assert last.has_more is False


@pytest.mark.parametrize(
    ("op", "keep"),
    [
        ("gte", lambda c, t: c >= t),
        ("gt", lambda c, t: c > t),
        ("lt", lambda c, t: c < t),
        ("lte", lambda c, t: c <= t),
    ],
)
def test_created_filters_match_brute_force(
    client: stripe.StripeClient,
    all_charges: list[dict[str, Any]],
    op: str,
    keep: Any,
) -> None:
    # Pivot on existing timestamps, so the inclusive/exclusive boundary really matters; near
    # the end of the range each filter keeps a couple of hundred charges (the SDK is slow).
    pivots = (150, 151) if op.startswith("g") else (CHARGES - 150, CHARGES - 151)
    for k in pivots:
        pivot = all_charges[k]["created"]
        got = list_all(client, "charges", created={op: pivot})
        want = [c["id"] for c in all_charges if keep(c["created"], pivot)]
        assert 100 < len(want) < 300
        assert [c["id"] for c in got] == want, (op, pivot)


def test_created_window_combines_bounds(
    client: stripe.StripeClient,
    all_charges: list[dict[str, Any]],
) -> None:
    a, b = all_charges[1200]["created"], all_charges[1000]["created"]
    got = list_all(client, "charges", created={"gte": a, "lt": b})
    assert [c["id"] for c in got] == [c["id"] for c in all_charges[1001:1201]]
    got = list_all(client, "charges", created={"gt": a, "lte": b}, limit=33)
    assert [c["id"] for c in got] == [c["id"] for c in all_charges[1000:1200]]


def test_half_open_windows_partition_the_charges(
    raw: httpx.Client,
    all_charges: list[dict[str, Any]],
) -> None:
    lo, hi = all_charges[-1]["created"], all_charges[0]["created"] + 1
    edges = [lo + (hi - lo) * k // 4 for k in range(5)]
    seen: list[str] = []
    for a, b in itertools.pairwise(edges):
        seen += [c["id"] for c in raw_list(raw, "charges", **{"created[gte]": a, "created[lt]": b})]
    assert sorted(seen) == sorted(c["id"] for c in all_charges)


def test_ending_before_pages_backwards(
    client: stripe.StripeClient,
    all_charges: list[dict[str, Any]],
) -> None:
    k = 250
    cursor = all_charges[k]["id"]
    page = client.v1.charges.list(params={"limit": 10, "ending_before": cursor})
    # The ten objects immediately newer than the cursor, still newest first.
    assert [c.id for c in page.data] == [c["id"] for c in all_charges[k - 10 : k]]
    assert page.has_more is True
    # The SDK pages backwards to the newest object, yielding oldest first.
    back = [
        c.id
        for c in client.v1.charges.list(
            params={"limit": 100, "ending_before": cursor}
        ).auto_paging_iter()
    ]
    assert back == [c["id"] for c in reversed(all_charges[:k])]
    top = client.v1.charges.list(params={"limit": 10, "ending_before": all_charges[3]["id"]})
    assert [c.id for c in top.data] == [c["id"] for c in all_charges[:3]]
    assert top.has_more is False


# -- expansions ------------------------------------------------------------------------------


def test_list_expansions_give_objects(client: stripe.StripeClient) -> None:
    page = client.v1.charges.list(
        params={"limit": 100, "expand": ["data.balance_transaction", "data.refunds"]}
    )
    assert len(page.data) == 100
    for ch in (c.to_dict() for c in page.data):
        assert ch["refunds"]["object"] == "list"
        assert all(
            r["object"] == "refund" and r["charge"] == ch["id"] for r in ch["refunds"]["data"]
        )
        if ch["status"] == "succeeded" and ch["captured"]:
            bt = ch["balance_transaction"]
            assert isinstance(bt, dict) and bt["object"] == "balance_transaction"
            assert bt["source"] == ch["id"]
        else:  # failed, or an authorization never captured: no money moved
            assert ch["balance_transaction"] is None


def test_expanded_refunds_match_refund_list(
    client: stripe.StripeClient,
    raw: httpx.Client,
) -> None:
    refunds = raw_list(raw, "refunds")
    assert refunds
    for rf in refunds[:: max(1, len(refunds) // 10)]:
        ch = client.v1.charges.retrieve(rf["charge"], params={"expand": ["refunds"]}).to_dict()
        assert rf["id"] in [r["id"] for r in ch["refunds"]["data"]]
        by_filter = list_all(client, "refunds", charge=rf["charge"])
        assert sorted(r["id"] for r in by_filter) == sorted(r["id"] for r in ch["refunds"]["data"])


def test_retrieve_with_expand(
    client: stripe.StripeClient,
    all_charges: list[dict[str, Any]],
) -> None:
    ch_id = next(c["id"] for c in all_charges if c["status"] == "succeeded" and c["captured"])
    plain = client.v1.charges.retrieve(ch_id).to_dict()
    assert isinstance(plain["balance_transaction"], str)
    ch = client.v1.charges.retrieve(ch_id, params={"expand": ["balance_transaction"]}).to_dict()
    bt = ch["balance_transaction"]
    assert isinstance(bt, dict) and bt["id"] == plain["balance_transaction"]
    assert bt["amount"] - bt["fee"] == bt["net"]
    assert {k: v for k, v in ch.items() if k != "balance_transaction"} == {
        k: v for k, v in plain.items() if k != "balance_transaction"
    }


def test_raw_expand_forms_both_accepted(server: ThreadedServer) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    bodies = []
    for key in ("expand[]", "expand[0]"):
        r = loopback.get(
            f"{server.url}/v1/charges",
            params={"limit": 20, key: "data.balance_transaction"},
            headers=headers,
        )
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert any(isinstance(c["balance_transaction"], dict) for c in data)
        assert all(not isinstance(c["balance_transaction"], str) for c in data)
        bodies.append(data)
    assert bodies[0] == bodies[1]
    two = loopback.get(
        f"{server.url}/v1/charges",
        headers=headers,
        params=[
            ("limit", "5"),
            ("expand[]", "data.balance_transaction"),
            ("expand[]", "data.refunds"),
        ],
    )
    assert two.status_code == 200
    assert all("refunds" in c for c in two.json()["data"])
    # A list expansion must carry the data. prefix, as on Stripe.
    bad = loopback.get(
        f"{server.url}/v1/charges", headers=headers, params={"expand[]": "balance_transaction"}
    )
    assert bad.status_code == 400


# -- filters -------------------------------------------------------------------------------


def test_charges_by_customer(
    client: stripe.StripeClient,
    all_charges: list[dict[str, Any]],
) -> None:
    for cust in {c["customer"] for c in all_charges[::400] if c["customer"]}:
        got = list_all(client, "charges", customer=cust)
        want = [c["id"] for c in all_charges if c["customer"] == cust]
        assert want and [c["id"] for c in got] == want


def test_invoices_by_customer_and_status(client: stripe.StripeClient, raw: httpx.Client) -> None:
    invoices = raw_list(raw, "invoices")
    assert len(invoices) == CHARGES // 10
    open_ = list_all(client, "invoices", status="open")
    assert open_
    assert [i["id"] for i in open_] == [i["id"] for i in invoices if i["status"] == "open"]
    paid = raw_list(raw, "invoices", status="paid")
    assert [i["id"] for i in paid] == [i["id"] for i in invoices if i["status"] == "paid"]
    for cust in sorted({i["customer"] for i in invoices[::25]}):
        got = list_all(client, "invoices", customer=cust)
        assert [i["id"] for i in got] == [i["id"] for i in invoices if i["customer"] == cust]


def test_balance_transactions_by_payout_and_type(
    client: stripe.StripeClient,
    raw: httpx.Client,
) -> None:
    payouts = list_all(client, "payouts")
    assert len(payouts) >= 20
    sample = payouts[:: max(1, len(payouts) // 4)] + [p for p in payouts if p["status"] == "failed"]
    for po in sample:
        bts = list_all(client, "balance_transactions", payout=po["id"])
        own = [b for b in bts if b["type"] == "payout"]
        assert [b["id"] for b in own] == [po["balance_transaction"]]
        assert sum(b["net"] for b in bts if b["type"] != "payout") == po["amount"]
        assert sum(b["net"] for b in bts) == 0
    every = raw_list(raw, "balance_transactions")
    for btype in ("payout", "refund", "adjustment", "stripe_fee", "payout_failure"):
        got = list_all(client, "balance_transactions", type=btype)
        assert got, btype
        assert [b["id"] for b in got] == [b["id"] for b in every if b["type"] == btype]


def test_disputes_by_charge(client: stripe.StripeClient) -> None:
    disputes = list_all(client, "disputes")
    assert disputes
    for d in disputes[:5]:
        got = list_all(client, "disputes", charge=d["charge"])
        assert [x["id"] for x in got] == [d["id"]]
    undisputed = client.v1.charges.list(params={"limit": 100}).data
    ch = next(c for c in undisputed if not c.disputed)
    assert list_all(client, "disputes", charge=ch.id) == []


def test_events_types_and_wildcard(
    client: stripe.StripeClient,
    all_events: list[dict[str, Any]],
) -> None:
    wanted = ["charge.refunded", "payout.failed", "charge.dispute.closed"]
    got = list_all(client, "events", types=wanted)  # sent as types[0]=..&types[1]=..
    want = [e["id"] for e in all_events if e["type"] in wanted]
    assert len(want) > 50
    assert [e["id"] for e in got] == want
    assert {e["type"] for e in got} == set(wanted)
    # The wildcard, combined with a created window to keep the page count down.
    since = all_events[300]["created"]
    star = list_all(client, "events", type="charge.*", created={"gte": since})
    want_star = [
        e["id"] for e in all_events if e["type"].startswith("charge.") and e["created"] >= since
    ]
    assert [e["id"] for e in star] == want_star
    assert {"charge.succeeded", "charge.refunded"} <= {e["type"] for e in star}
    assert len({e["type"] for e in star}) < len({e["type"] for e in all_events[:300]})
    exact = list_all(client, "events", type="payout.failed")
    assert len(exact) == 1
    assert exact[0]["data"]["object"]["status"] == "failed"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.events.list(params={"types": [f"x.{n}" for n in range(21)]})


def test_invoice_line_paging(client: stripe.StripeClient, raw: httpx.Client) -> None:
    invoices = raw_list(raw, "invoices")
    big = [i for i in invoices if i["lines"]["has_more"]]
    assert big
    for inv in big[:3]:
        assert len(inv["lines"]["data"]) == 10
        lines = dicts(
            client.v1.invoices.line_items.list(inv["id"], params={"limit": 4}).auto_paging_iter()
        )
        assert len(lines) > 10
        assert len({x["id"] for x in lines}) == len(lines)
        assert [x["id"] for x in lines[:10]] == [x["id"] for x in inv["lines"]["data"]]
        assert sum(x["amount"] for x in lines) == inv["subtotal"]
        assert all(x["invoice"] == inv["id"] for x in lines)


def test_invoice_payments_link_charges(
    client: stripe.StripeClient,
    raw: httpx.Client,
    all_charges: list[dict[str, Any]],
) -> None:
    charges = {c["id"]: c for c in all_charges}
    invoices = raw_list(raw, "invoices")
    # Issue 20: a foreign-currency invoice paid in two parts lists two payments.
    in_parts = {p["invoice"] for p in raw_list(raw, "invoice_payments") if not p["is_default"]}
    assert in_parts
    sample = (
        invoices[::20]
        + [i for i in invoices if i["status"] == "open"][:2]
        + [i for i in invoices if i["id"] in in_parts]
    )
    for inv in sample:
        pays = dicts(client.v1.invoice_payments.list(params={"invoice": inv["id"]}).data)
        assert len(pays) == (2 if inv["id"] in in_parts else 1)
        assert {pay["invoice"] for pay in pays} == {inv["id"]}
        paying = [charges[pay["payment"]["charge"]] for pay in pays]
        assert sum(ch["amount"] for ch in paying) == inv["total"]
        assert {ch["customer"] for ch in paying} == {inv["customer"]}
        assert {ch["currency"] for ch in paying} == {inv["currency"]}
        for pay, ch in zip(pays, paying, strict=True):
            assert (ch["status"] == "succeeded") == (inv["status"] == "paid")
            # a voided or written-off invoice's payment stays as it was (never paid)
            assert pay["status"] == (inv["status"] if inv["status"] in ("open", "paid") else "open")


# -- errors --------------------------------------------------------------------------------


def test_bad_api_key(server: ThreadedServer) -> None:
    with pytest.raises(stripe.AuthenticationError) as exc:
        make_client(server.url, key="sk_test_wrong").v1.charges.list()
    assert exc.value.http_status == 401


def test_unknown_id_is_404_resource_missing(
    client: stripe.StripeClient, all_charges: list[dict[str, Any]]
) -> None:
    real = all_charges[0]["id"]
    forged = real[:-1] + ("A" if real[-1] != "A" else "B")
    for bad in ("ch_doesnotexist", forged):
        with pytest.raises(stripe.InvalidRequestError) as exc:
            client.v1.charges.retrieve(bad)
        assert exc.value.http_status == 404
        assert exc.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.customers.retrieve(real)  # a charge id is not a customer id
    assert exc.value.http_status == 404


def test_unknown_parameter_is_400(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as exc:
        bad: Any = {"colour": "blue"}
        client.v1.charges.list(params=bad)
    assert exc.value.http_status == 400
    assert exc.value.code == "parameter_unknown"
    assert exc.value.param == "colour"


@pytest.mark.parametrize("limit", [0, 101])
def test_limit_out_of_range_is_400(client: stripe.StripeClient, limit: int) -> None:
    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.charges.list(params={"limit": limit})
    assert exc.value.http_status == 400


def test_over_budget_is_429_with_reason() -> None:
    app = create_stripe_app(BusinessConfig(seed=3, charges=50, end=END), api_key=KEY, rate_limit=2)
    with ThreadedServer(app) as srv:
        client = make_client(srv.url)
        ok, limited = 0, []
        for _ in range(10):
            try:
                client.v1.charges.list(params={"limit": 1})
                ok += 1
            except stripe.RateLimitError as exc:
                limited.append(exc)
        assert 1 <= ok < 10
        assert limited
        err = limited[0]
        assert err.http_status == 429
        assert err.headers is not None
        assert err.headers.get("Stripe-Rate-Limited-Reason")
        # The budget is per endpoint family: customers still answer.
        client.v1.customers.list(params={"limit": 1})
        time.sleep(0.6)  # the bucket refills (2 tokens/s)
        client.v1.charges.list(params={"limit": 1})


# -- writes --------------------------------------------------------------------------------


def test_update_metadata_and_idempotent_replay() -> None:
    # Its own sandbox: writes add events, which the shared module server must not see.
    app = create_stripe_app(
        BusinessConfig(seed=5, charges=100, end=END), api_key=KEY, rate_limit=None
    )
    with ThreadedServer(app) as srv:
        client = make_client(srv.url)
        cust = client.v1.customers.list(params={"limit": 1}).data[0].id
        first = client.v1.customers.update(
            cust,
            params={"metadata": {"sage_customer_id": "C1"}},
            options={"idempotency_key": "key-one"},
        ).to_dict()
        assert first["metadata"]["sage_customer_id"] == "C1"
        assert client.v1.customers.retrieve(cust).to_dict()["metadata"]["sage_customer_id"] == "C1"

        second = client.v1.customers.update(
            cust,
            params={"metadata": {"sage_customer_id": "C2"}},
            options={"idempotency_key": "key-two"},
        ).to_dict()
        assert second["metadata"]["sage_customer_id"] == "C2"
        # Replaying key-one returns the stored response, and changes nothing.
        replay = client.v1.customers.update(
            cust,
            params={"metadata": {"sage_customer_id": "C1"}},
            options={"idempotency_key": "key-one"},
        ).to_dict()
        assert replay == first
        assert client.v1.customers.retrieve(cust).to_dict()["metadata"]["sage_customer_id"] == "C2"
        updates = list_all(client, "events", type="customer.updated")
        assert len(updates) == 2
        assert updates[0]["data"]["object"]["metadata"]["sage_customer_id"] == "C2"
        assert updates[0]["data"]["previous_attributes"]["metadata"]["sage_customer_id"] == "C1"
        # The same key with other parameters is refused.
        with pytest.raises(stripe.IdempotencyError):
            client.v1.customers.update(
                cust,
                params={"metadata": {"sage_customer_id": "C3"}},
                options={"idempotency_key": "key-one"},
            )
        # An empty value unsets the key, as on Stripe.
        cleared = client.v1.customers.update(cust, params={"metadata": {"sage_customer_id": ""}})
        assert "sage_customer_id" not in cleared.to_dict()["metadata"]
