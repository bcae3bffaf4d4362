"""Every object the Stripe sandbox serves has the shape of Stripe's own example.

``../shared/stripe/fixtures3.json`` (``resources``) holds Stripe's example object for each
resource, from Stripe's public OpenAPI repository. A served object must carry every top-level
key of the example, and wherever the example's value is not null the served value must have
the same JSON type, one level into the nested objects the example fills (two for
``charge.payment_method_details.card``). A served null is allowed only for the fields listed
in ``NULLABLE`` below, each documented as nullable in Stripe's API reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.stripe_app import create_stripe_app
from devkit.sandbox.stripe_business import BusinessConfig

pytestmark = pytest.mark.integration

END = 1_782_777_600
KEY = "sk_test_sandbox_shapes"
# ../shared beside the checkout (as CI lays it out); the packaged copy is the same file.
_SHARED = Path(__file__).resolve().parents[3] / "shared" / "stripe" / "fixtures3.json"
FIXTURES = (
    _SHARED
    if _SHARED.exists()
    else (
        Path(__file__).resolve().parents[2]
        / "devkit"
        / "sandbox"
        / "data"
        / "stripe_fixtures3.json"
    )
)
SAMPLES = 20
MAX_DEPTH = 2  # 0: top-level keys; 1: keys of nested objects; 2: e.g. p_m_details.card.*

# Fields Stripe documents as nullable ("Nullable" in the API reference) where the example has
# a value but a real object can be null. Keep this short: anything else null is a bug.
NULLABLE: dict[str, set[str]] = {
    "charge": {
        "balance_transaction",  # null on a failed or an uncaptured charge
        "billing_details.name",  # a card without a cardholder name
        "shipping",
        "transfer_data",
        "source",  # no shipping, no Connect, no legacy source
        "review",  # no Radar review opened
        "payment_method_details.card.wallet",  # not a wallet payment
    },
    "refund": set(),
    "invoice": {
        "parent",  # a one-off invoice has no subscription parent
        "parent.quote_details",  # ... and one from a subscription has no quote
        "customer_shipping",
        "shipping_cost",
        "shipping_details",  # nothing shipped
        "due_date",  # charge_automatically invoices have no due date
        "from_invoice",
        "last_finalization_error",  # not a revision, finalized cleanly
        "next_payment_attempt",  # null once paid
    },
    "line_item": {
        # Exactly one of the two details is set, according to parent.type.
        "parent.invoice_item_details",
        "parent.subscription_item_details",
    },
    "credit_note": {
        # A pre-payment note on an open invoice: no refund, no balance transaction, no
        # shipping, nothing out of band, not voided (issue 19).
        "customer_balance_transaction",
        "shipping_cost",
        "out_of_band_amount",
        "voided_at",
        "customer_account",
        "memo",
    },
    "credit_note_line_item": {"unit_amount", "unit_amount_decimal"},
    "payout": set(),
    "balance_transaction": {"exchange_rate", "source"},  # USD charge; stripe_fee has no source
    "customer": {"discount", "shipping"},
    "dispute": set(),
    "event": set(),
    "subscription": {
        # An active, never-cancelled subscription without trial, pause or pending change.
        "cancel_at",
        "canceled_at",
        "ended_at",
        "trial_start",
        "trial_end",
        "pause_collection",
        "pending_update",
        "next_pending_invoice_item_invoice",
        "transfer_data",
    },
    "invoice_payment": set(),
    "tax_rate": {"flat_amount"},  # a percentage rate has no flat amount
    "discount": {"end"},  # a coupon of duration "once" has no end
    "checkout.session": {
        # Stripe documents each as nullable: no recovery set up, the default payment method
        # configuration, nothing shipped, no URL once complete, no adaptive pricing.
        "after_expiration",
        "payment_method_configuration_details",
        "shipping_address_collection",
        "shipping_cost",
        "url",
        "collected_information",
        "currency_conversion",
        "customer_details.email",  # a buyer whose customer has no email
    },
    "item": {
        # A one-time price with a fixed amount, bought in a fixed quantity.
        "price.recurring",
        "price.transform_quantity",
        "price.custom_unit_amount",
        "adjustable_quantity",
    },
    "payment_intent": {
        # A succeeded intent: never cancelled, no error, nothing to do or process, no
        # Connect transfer, nothing shipped, the default payment method configuration.
        "canceled_at",
        "last_payment_error",
        "next_action",
        "processing",
        "transfer_data",
        "shipping",
        "payment_method_configuration_details",
    },
}
# Fields Stripe documents as floats where the example happens to show a whole number.
FLOATS: dict[str, set[str]] = {"tax_rate": {"percentage", "effective_percentage"}}
# Don't descend into these: an event's data.object is another resource (checked separately).
OPAQUE = {"event": {"data.object"}}


def json_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number" if isinstance(value, float) else "int"
    names: dict[type, str] = {dict: "dict", list: "list", str: "str"}
    return names[type(value)]


def shape_problems(
    resource: str, example: dict[str, Any], served: dict[str, Any], path: str = "", depth: int = 0
) -> list[str]:
    problems = []
    for key, ex in example.items():
        where = f"{path}{key}"
        if key not in served:
            problems.append(f"{where}: missing")
            continue
        if ex is None:
            continue
        got = served[key]
        want_t, got_t = json_type(ex), json_type(got)
        if got_t is None:
            if where not in NULLABLE[resource]:
                problems.append(f"{where}: null, example has {want_t}")
            continue
        # A float in the example (e.g. exchange_rate) may be served as an integer value.
        floats = want_t == "int" and got_t == "number" and where in FLOATS.get(resource, set())
        if want_t != got_t and not (want_t == "number" and got_t == "int") and not floats:
            problems.append(f"{where}: {got_t}, example has {want_t}")
            continue
        if (
            want_t == "dict"
            and ex
            and depth < MAX_DEPTH
            and where not in OPAQUE.get(resource, set())
        ):
            problems += shape_problems(resource, ex, got, f"{where}.", depth + 1)
    return problems


def spread(items: list[Any], n: int = SAMPLES) -> list[Any]:
    if len(items) <= n:
        return list(items)
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


@pytest.fixture(scope="module")
def examples() -> dict[str, dict[str, Any]]:
    return json.loads(FIXTURES.read_text())["resources"]


@pytest.fixture(scope="module")
def raw() -> Iterator[httpx.Client]:
    app = create_stripe_app(
        BusinessConfig(seed=21, charges=2000, end=END), api_key=KEY, rate_limit=None
    )
    with (
        ThreadedServer(app) as srv,
        httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}) as client,
    ):
        yield client


def get(raw: httpx.Client, path: str, **params: Any) -> dict[str, Any]:
    r = raw.get(path, params=params)
    assert r.status_code == 200, (path, r.text)
    return r.json()


def list_all(raw: httpx.Client, resource: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        body = get(raw, f"/v1/{resource}", **params)
        out += body["data"]
        if not body["has_more"]:
            return out
        params["starting_after"] = body["data"][-1]["id"]


def first(items: list[dict[str, Any]], pred: Any) -> list[dict[str, Any]]:
    """The first item matching, as a list: a sample of a rare but important case."""
    hit = next((x for x in items if pred(x)), None)
    assert hit is not None, "the business should contain this case"
    return [hit]


def check(
    resource: str, examples: dict[str, dict[str, Any]], objects: list[dict[str, Any]]
) -> None:
    example = examples[resource]
    assert objects
    bad = {}
    for obj in objects:
        assert obj.get("object") == example["object"], obj.get("id")
        problems = shape_problems(resource, example, obj)
        if problems:
            bad[obj["id"]] = problems
    assert not bad, json.dumps(bad, indent=1)[:4000]


def test_shape_checker_catches_problems(examples: dict[str, dict[str, Any]]) -> None:
    ex = examples["payout"]
    good = dict(ex)
    assert shape_problems("payout", ex, good) == []
    assert shape_problems("payout", ex, {k: v for k, v in ex.items() if k != "amount"}) == [
        "amount: missing"
    ]
    assert shape_problems("payout", ex, {**ex, "amount": "1100"}) == [
        "amount: str, example has int"
    ]
    assert shape_problems("payout", ex, {**ex, "automatic": 1}) == [
        "automatic: int, example has bool"
    ]
    assert shape_problems("payout", ex, {**ex, "trace_id": {"value": None}}) == [
        "trace_id.status: missing"
    ]
    assert (
        shape_problems(
            "balance_transaction",
            examples["balance_transaction"],
            {**examples["balance_transaction"], "source": None},
        )
        == []
    )
    assert shape_problems("payout", ex, {**ex, "balance_transaction": None}) == [
        "balance_transaction: null, example has str"
    ]


def test_charges(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    charges = list_all(raw, "charges")
    ids = [c["id"] for c in spread(charges)]
    ids += [c["id"] for c in first(charges, lambda c: c["status"] == "failed")]
    ids += [c["id"] for c in first(charges, lambda c: c["amount_refunded"] > 0)]
    ids += [c["id"] for c in first(charges, lambda c: c["disputed"])]
    ids += [c["id"] for c in first(charges, lambda c: c["currency"] == "jpy")]
    # The everyday shapes of a real account: a guest checkout, a cardholder without a name,
    # an authorization still open, one lapsed or released, an ERP order Sage never got.
    ids += [c["id"] for c in first(charges, lambda c: c["customer"] is None)]
    ids += [c["id"] for c in first(charges, lambda c: c["billing_details"]["name"] is None)]
    ids += [c["id"] for c in first(charges, lambda c: not c["captured"] and not c["refunded"])]
    ids += [c["id"] for c in first(charges, lambda c: not c["captured"] and c["refunded"])]
    ids += [
        c["id"]
        for c in first(charges, lambda c: c["metadata"].get("erp_order_id", "").startswith("SO9"))
    ]
    # Stripe's example shows refunds expanded (a list), so retrieve them that way.
    served = [get(raw, f"/v1/charges/{i}", **{"expand[]": "refunds"}) for i in ids]
    check("charge", examples, served)
    assert any(c["refunds"]["data"] for c in served)


def test_refunds(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    refunds = list_all(raw, "refunds")
    check("refund", examples, spread(refunds) + first(refunds, lambda r: r["status"] == "failed"))


def test_invoices(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    invoices = list_all(raw, "invoices")
    sample = spread(invoices) + first(invoices, lambda i: i["status"] == "open")
    sample += first(invoices, lambda i: i["parent"] is None)
    sample += first(invoices, lambda i: i["parent"] is not None)
    sample += first(invoices, lambda i: i["lines"]["has_more"])
    check("invoice", examples, sample)


def test_invoice_lines(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    invoices = list_all(raw, "invoices")
    one_off = [i for i in invoices if i["parent"] is None][:3]
    from_sub = [i for i in invoices if i["parent"] is not None][:3]
    long = [i for i in invoices if i["lines"]["has_more"]][:1]
    lines: list[dict[str, Any]] = []
    for inv in one_off + from_sub + long:
        body = get(raw, f"/v1/invoices/{inv['id']}/lines", limit=100)
        assert not body["has_more"]
        lines += body["data"]
    assert len(lines) >= SAMPLES
    check("line_item", examples, lines)
    types = {line["parent"]["type"] for line in lines}
    assert types == {"invoice_item_details", "subscription_item_details"}
    for line in lines:
        assert line["parent"][line["parent"]["type"]] is not None


def test_payouts(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    payouts = list_all(raw, "payouts")
    sample = spread(payouts) + first(payouts, lambda p: p["status"] == "failed")
    sample += first(payouts, lambda p: p["status"] == "in_transit")
    check("payout", examples, sample)


def test_balance_transactions(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    bts = list_all(raw, "balance_transactions")
    sample = spread(bts)
    for btype in (
        "charge",
        "refund",
        "refund_failure",
        "adjustment",
        "payout",
        "payout_failure",
        "stripe_fee",
    ):
        sample += first(bts, lambda b, t=btype: b["type"] == t)
    check("balance_transaction", examples, sample)


def test_customers(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    customers = list_all(raw, "customers")
    sample = spread(customers) + first(customers, lambda c: c["email"] is None)
    sample += first(customers, lambda c: c["name"] is None and c["email"] is None)
    sample += first(customers, lambda c: len(c["name"] or "") > 40 and " " not in c["name"])
    check("customer", examples, sample)


def test_deleted_customers_are_stripes_stub(
    raw: httpx.Client, examples: dict[str, dict[str, Any]]
) -> None:
    """A customer deleted in Stripe: left out of the list, its id answers the deleted stub
    (retrieved, or expanded from a charge that still names it), its events show it whole."""
    listed = {c["id"] for c in list_all(raw, "customers")}
    deleted = [
        e["data"]["object"]["id"]
        for e in list_all(raw, "events")
        if e["type"] == "customer.deleted"
    ]
    assert len(deleted) >= 2
    charges = list_all(raw, "charges")
    stub_shape = {k: type(v) for k, v in examples["deleted_customer"].items()}
    for cid in deleted:
        assert cid not in listed
        stub = get(raw, f"/v1/customers/{cid}")
        assert {k: type(v) for k, v in stub.items()} == stub_shape
        assert stub == {"id": cid, "object": "customer", "deleted": True}
        theirs = [c for c in charges if c["customer"] == cid]
        assert theirs, "a deleted customer's charges still name it"
        expanded = get(raw, f"/v1/charges/{theirs[0]['id']}", **{"expand[]": "customer"})
        assert expanded["customer"] == stub
        assert get(raw, "/v1/charges", customer=cid, limit=100)["data"]
        # Stripe refuses to update or delete it again.
        assert raw.post(f"/v1/customers/{cid}", data={"name": "x"}).status_code == 404
        assert raw.delete(f"/v1/customers/{cid}").status_code == 404


def test_disputes(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    check("dispute", examples, list_all(raw, "disputes"))


def test_subscriptions(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    check("subscription", examples, spread(list_all(raw, "subscriptions")))


def test_invoice_payments(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    pays = list_all(raw, "invoice_payments")
    check("invoice_payment", examples, spread(pays) + first(pays, lambda p: p["status"] == "open"))


def test_events(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    events = list_all(raw, "events")
    per_type: dict[str, dict[str, Any]] = {}
    for e in events:
        per_type.setdefault(e["type"], e)
    check("event", examples, spread(events) + list(per_type.values()))


def test_event_payloads_have_their_resource_shape(
    raw: httpx.Client,
    examples: dict[str, dict[str, Any]],
) -> None:
    events = list_all(raw, "events")
    per_type: dict[str, dict[str, Any]] = {}
    for e in events:
        per_type.setdefault(e["type"], e)
    assert len(per_type) >= 15
    for etype, event in per_type.items():
        obj = event["data"]["object"]
        resource = obj["object"]
        example = dict(examples[resource])
        if resource == "charge":
            example.pop("refunds")  # events carry charges unexpanded (API >= 2022-11-15)
        problems = shape_problems(resource, example, obj)
        assert not problems, (etype, problems)


# Every expansion real Stripe accepts on an invoice list (issue 18: Airbyte's Stripe source
# asks for data.discounts; a refusal reads zero invoices).
INVOICE_EXPANSIONS = (
    "data.customer",
    "data.discounts",
    "data.total_discount_amounts.discount",
    "data.lines.data.discounts",
    "data.lines.data.discount_amounts.discount",
    "data.default_payment_method",
    "data.default_source",
    "data.account_tax_ids",
    "data.application",
    "data.on_behalf_of",
    "data.test_clock",
    "data.latest_revision",
    "data.from_invoice.invoice",
)


def test_tax_rates(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    rates = list_all(raw, "tax_rates")
    check("tax_rate", examples, rates)
    assert {r["inclusive"] for r in rates} == {True, False}
    named = {
        t["tax_rate_details"]["tax_rate"]
        for i in list_all(raw, "invoices")
        for t in i["total_taxes"]
    }
    assert named <= {r["id"] for r in rates}  # every rate an invoice names is listed
    assert get(raw, f"/v1/tax_rates/{rates[0]['id']}")["id"] == rates[0]["id"]
    inclusive = get(raw, "/v1/tax_rates", inclusive="true")["data"]
    assert inclusive and all(r["inclusive"] for r in inclusive)


def test_invoices_accept_every_expansion_stripe_accepts(
    raw: httpx.Client, examples: dict[str, dict[str, Any]]
) -> None:
    body = get(raw, "/v1/invoices", limit=100, **{"expand[]": list(INVOICE_EXPANSIONS)})
    discounted = [i for i in body["data"] if i["discounts"]]
    assert discounted
    for inv in discounted:
        [discount] = inv["discounts"]
        check("discount", examples, [discount])
        assert discount["invoice"] == inv["id"]
        assert inv["total_discount_amounts"][0]["discount"]["id"] == discount["id"]
        for line in inv["lines"]["data"]:
            assert [d["id"] for d in line["discounts"]] == [discount["id"]]
            assert line["discount_amounts"][0]["discount"]["id"] == discount["id"]
    # the same on one invoice and on its lines endpoint
    one = discounted[0]["id"]
    got = get(raw, f"/v1/invoices/{one}", **{"expand[]": "discounts"})
    assert isinstance(got["discounts"][0], dict)
    lines = get(raw, f"/v1/invoices/{one}/lines", **{"expand[]": "data.discounts"})
    assert isinstance(lines["data"][0]["discounts"][0], dict)
    # an expansion Stripe refuses is still refused
    r = raw.get("/v1/invoices", params={"expand[]": "data.number"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "expand"


def test_complete_invoice_lines(raw: httpx.Client, examples: dict[str, dict[str, Any]]) -> None:
    """Lines with discounts, inclusive and exclusive taxes and prorations keep the shape."""
    invoices = list_all(raw, "invoices")
    picks = first(
        invoices, lambda i: any(t["tax_behavior"] == "inclusive" for t in i["total_taxes"])
    )
    picks += first(invoices, lambda i: len(i["total_taxes"]) >= 2)
    picks += first(invoices, lambda i: bool(i["total_discount_amounts"]))
    picks += first(invoices, lambda i: any(ln["amount"] < 0 for ln in i["lines"]["data"]))
    lines = [ln for inv in picks for ln in inv["lines"]["data"]]
    check("line_item", examples, lines)
    assert any(
        ln["parent"]["subscription_item_details"]["proration"]
        for ln in lines
        if ln["parent"]["type"] == "subscription_item_details"
    )


def test_checkout_sessions_their_items_and_payment_intents(
    raw: httpx.Client, examples: dict[str, dict[str, Any]]
) -> None:
    """Issue 17: Checkout Sessions (listed with their line items expanded), the items, and the
    payment intents the acknowledgement writes to, in Stripe's current shapes."""
    sessions = list_all(raw, "checkout/sessions")
    sample = spread(sessions) + first(sessions, lambda s: s["invoice_creation"]["enabled"])
    sample += first(sessions, lambda s: s["shipping_cost"] is not None)
    sample += first(sessions, lambda s: s["total_details"]["amount_discount"] > 0)
    check("checkout.session", examples, sample)
    expanded = get(raw, "/v1/checkout/sessions", limit=5, **{"expand[]": "data.line_items"})
    items = [it for s in expanded["data"] for it in s["line_items"]["data"]]
    items += [
        it for s in sample for it in get(raw, f"/v1/checkout/sessions/{s['id']}/line_items")["data"]
    ]
    # taxes and discounts are Stripe's includable fields of an item (not in its example)
    check(
        "item",
        examples,
        [{k: v for k, v in it.items() if k not in ("taxes", "discounts")} for it in items],
    )
    assert any(it["taxes"] for it in items) and any(it["quantity"] > 1 for it in items)
    intents = [get(raw, f"/v1/payment_intents/{s['payment_intent']}") for s in sample]
    check("payment_intent", examples, intents)
