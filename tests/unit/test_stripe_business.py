"""Invariants of the generated Stripe business (``Business`` + ``StripeWorld``), no I/O.

A fixed ``end`` and a fixed clock make every rendered object deterministic, so these checks
are exact: they are the hard cases the pipeline depends on (fees, FX, payouts that net to
zero, a payout that fails after it was paid, refunds days after their charge, ...).
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

import numpy as np
import pytest

from devkit.sandbox.stripe_business import DAY, Business, BusinessConfig
from devkit.sandbox.stripe_state import RESOURCES, StripeWorld

pytestmark = pytest.mark.unit

END = 1_782_777_600  # 2026-06-30T00:00:00Z: fixed so the business is the same on every run
CHARGES = 3000
EXPONENT = {"usd": 2, "eur": 2, "gbp": 2, "jpy": 0, "kwd": 3}


def make_world(seed: int = 7, charges: int = CHARGES) -> StripeWorld:
    # The clock only matters for "as of now" rendering; pin it just after the business ends.
    return StripeWorld(BusinessConfig(seed=seed, charges=charges, end=END), clock=lambda: END)


def render_all(w: StripeWorld, resource: str) -> list[dict[str, Any]]:
    return [w.render(resource, i) for i in range(w.count(resource))]


def world_digest(w: StripeWorld) -> str:
    h = hashlib.sha256()
    for resource in RESOURCES:
        for i in range(w.count(resource)):
            h.update(json.dumps(w.render(resource, i), sort_keys=True).encode())
            h.update(b"\n")
    # Invoice lines are paged from their invoice rather than indexed: include every one.
    for j in range(w.count("invoices")):
        h.update(json.dumps(w._invoice_lines(j), sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world() -> StripeWorld:
    return make_world()


@pytest.fixture(scope="module")
def data(world: StripeWorld) -> dict[str, list[dict[str, Any]]]:
    return {
        r: render_all(world, r)
        for r in (
            "customers",
            "charges",
            "refunds",
            "disputes",
            "invoices",
            "payouts",
            "balance_transactions",
            "events",
        )
    }


# Four whole businesses are rendered byte for byte: determinism does not need the large one.
DIGEST_CHARGES = 600


def test_same_config_same_bytes_other_seed_differs() -> None:
    a, b = make_world(charges=DIGEST_CHARGES), make_world(charges=DIGEST_CHARGES)
    assert a.b is not b.b
    digest = world_digest(a)
    assert digest == world_digest(b)
    assert world_digest(make_world(seed=8, charges=DIGEST_CHARGES)) != digest
    # Same seed, other end: a different business too (ids are the same, times are not).
    other_end = StripeWorld(
        BusinessConfig(seed=7, charges=DIGEST_CHARGES, end=END + DAY), clock=lambda: END + DAY
    )
    assert world_digest(other_end) != digest


def test_business_rejects_too_few_charges() -> None:
    with pytest.raises(ValueError):
        Business(BusinessConfig(seed=1, charges=5, end=END))


def test_ids_round_trip(world: StripeWorld) -> None:
    for resource in ("charges", "refunds", "balance_transactions", "events", "payouts"):
        n = world.count(resource)
        for i in (0, 1, n // 2, n - 1):
            obj_id = world.make_id(resource, i)
            assert world.parse_id(resource, obj_id) == i
        assert world.parse_id(resource, world.make_id(resource, 0)[:-1] + "z") is None
    assert world.parse_id("charges", world.make_id("refunds", 0)) is None


def test_balance_transaction_amounts(data: dict[str, list[dict[str, Any]]]) -> None:
    bts = data["balance_transactions"]
    assert len(bts) > CHARGES  # charges, refunds, disputes, payouts, fees...
    for bt in bts:
        assert bt["amount"] - bt["fee"] == bt["net"], bt["id"]
        assert sum(f["amount"] for f in bt["fee_details"]) == bt["fee"], bt["id"]
    charge_bts = [bt for bt in bts if bt["type"] == "charge"]
    assert all(bt["fee"] > 0 for bt in charge_bts)


def test_payouts_net_exactly(world: StripeWorld, data: dict[str, list[dict[str, Any]]]) -> None:
    bts = data["balance_transactions"]
    payouts = data["payouts"]
    assert len(payouts) >= 20
    for p, po in enumerate(payouts):
        members = [bts[x] for x in world.b.payout_bts(p)]
        own = [m for m in members if m["type"] == "payout"]
        assert [m["id"] for m in own] == [po["balance_transaction"]]
        assert own[0]["amount"] == -po["amount"]
        others = [m for m in members if m["type"] != "payout"]
        assert others, po["id"]
        assert sum(m["net"] for m in others) == po["amount"], po["id"]
        assert sum(m["net"] for m in members) == 0, po["id"]
    # Every balance transaction except the still-unpaid tail belongs to some payout.
    assigned = {int(x) for p in range(len(payouts)) for x in world.b.payout_bts(p)}
    last_payout = max(po["created"] for po in payouts)
    unassigned = [bt for x, bt in enumerate(bts) if x not in assigned]
    assert all(bt["available_on"] > last_payout - 6 * 3600 for bt in unassigned)


def test_exactly_one_payout_fails_with_a_failure_bt(
    data: dict[str, list[dict[str, Any]]],
) -> None:
    bts = {bt["id"]: bt for bt in data["balance_transactions"]}
    failed = [po for po in data["payouts"] if po["status"] == "failed"]
    assert len(failed) == 1
    po = failed[0]
    fbt = bts[po["failure_balance_transaction"]]
    assert fbt["type"] == "payout_failure"
    assert fbt["amount"] == po["amount"] > 0
    assert fbt["source"] == po["id"]
    assert po["failure_code"]
    assert all(
        p["failure_balance_transaction"] is None for p in data["payouts"] if p["status"] != "failed"
    )
    assert {p["status"] for p in data["payouts"]} >= {"paid", "failed"}


def test_currencies_and_fx(data: dict[str, list[dict[str, Any]]]) -> None:
    charges = data["charges"]
    bts = {bt["id"]: bt for bt in data["balance_transactions"]}
    assert {c["currency"] for c in charges} == set(EXPONENT)
    assert {bt["currency"] for bt in bts.values()} == {"usd"}
    for c in charges:
        if c["status"] == "failed" or not c["captured"]:
            assert c["balance_transaction"] is None
            continue
        bt = bts[c["balance_transaction"]]
        assert bt["source"] == c["id"]
        if c["currency"] == "usd":
            assert bt["exchange_rate"] is None
            assert bt["amount"] == c["amount"]
        else:
            rate = bt["exchange_rate"]
            assert isinstance(rate, float) and rate > 0, c["id"]
            # Settlement in cents: the presentment amount scaled by its own exponent.
            expected = c["amount"] * rate * 10 ** (2 - EXPONENT[c["currency"]])
            assert abs(bt["amount"] - expected) <= 1, (c["id"], bt["amount"], expected)
            # International card fee is itemised for non-USD cards.
            assert len(bt["fee_details"]) == 2


def test_zero_and_three_decimal_amounts_are_plausible(
    data: dict[str, list[dict[str, Any]]],
) -> None:
    usd_value: dict[str, list[float]] = collections.defaultdict(list)
    for c in data["charges"]:
        major = c["amount"] / 10 ** EXPONENT[c["currency"]]
        rate = {"usd": 1.0, "eur": 1.08, "gbp": 1.27, "jpy": 0.0067, "kwd": 3.25}[c["currency"]]
        usd_value[c["currency"]].append(major * rate)
    for code, values in usd_value.items():
        med = float(np.median(values))
        # Every currency's median charge is worth about the same in dollars (tens of USD).
        # JPY written in hundredths would be 100 times too large; KWD in hundredths (not
        # thousandths) 10 times too small: either falls outside this band.
        assert 10 <= med <= 150, (code, med)
        assert min(values) >= 0.5 and max(values) <= 6000, code
    jpy = [c["amount"] for c in data["charges"] if c["currency"] == "jpy"]
    assert all(isinstance(a, int) for a in jpy)
    assert 1_000 <= float(np.median(jpy)) <= 30_000  # whole yen, not sen
    kwd = [c["amount"] for c in data["charges"] if c["currency"] == "kwd"]
    assert 3_000 <= float(np.median(kwd)) <= 50_000  # fils: a few KWD to tens of KWD
    # Not all KWD amounts are multiples of 10: the third decimal really is used.
    assert any(a % 10 for a in kwd)


def test_refund_event_is_days_after_its_charge(
    world: StripeWorld,
    data: dict[str, list[dict[str, Any]]],
) -> None:
    charges = {c["id"]: c for c in data["charges"]}
    refunds = data["refunds"]
    events = data["events"]
    # A released authorization is "refunded" too, with no refund object (no money moved).
    refunded_events = [
        e for e in events if e["type"] == "charge.refunded" and e["data"]["object"]["captured"]
    ]
    assert len(refunded_events) == len(refunds) > 0
    late = 0
    created = world.b.charges.created
    for ev in refunded_events:
        obj = ev["data"]["object"]
        ch = charges[obj["id"]]
        assert ev["created"] > ch["created"]
        assert obj["amount_refunded"] > 0  # the object as of the refund, not as of the charge
        if ev["created"] - ch["created"] >= DAY:
            late += 1
            # A created-window read around the event does not see the charge at all.
            lo = int(np.searchsorted(created, ev["created"] - DAY // 2, "left"))
            hi = int(np.searchsorted(created, ev["created"] + 1, "left"))
            window_ids = {world.make_id("charges", i) for i in range(lo, hi)}
            assert ch["id"] not in window_ids
    assert late >= len(refunded_events) // 2


def test_refund_kinds(data: dict[str, list[dict[str, Any]]]) -> None:
    charges = {c["id"]: c for c in data["charges"]}
    bts = {bt["id"]: bt for bt in data["balance_transactions"]}
    kinds: collections.Counter[str] = collections.Counter()
    for r in data["refunds"]:
        ch = charges[r["charge"]]
        assert ch["status"] == "succeeded"
        assert r["created"] > ch["created"]
        assert 0 < r["amount"] <= ch["amount"]
        if r["status"] == "failed":
            kinds["failed"] += 1
            fbt = bts[r["failure_balance_transaction"]]
            assert fbt["type"] == "refund_failure"
            assert fbt["amount"] == -bts[r["balance_transaction"]]["amount"] > 0
        else:
            assert r["status"] == "succeeded"
            kinds["full" if r["amount"] == ch["amount"] else "partial"] += 1
            assert ch["amount_refunded"] >= r["amount"]
        assert bts[r["balance_transaction"]]["type"] == "refund"
    assert kinds["full"] and kinds["partial"] and kinds["failed"], kinds
    full_refunded = [c for c in data["charges"] if c["refunded"] and c["captured"]]
    assert full_refunded and all(c["amount_refunded"] == c["amount"] for c in full_refunded)


def test_disputes_won_and_lost_with_fee(data: dict[str, list[dict[str, Any]]]) -> None:
    disputes = data["disputes"]
    charges = {c["id"]: c for c in data["charges"]}
    statuses = collections.Counter(d["status"] for d in disputes)
    assert statuses["won"] and statuses["lost"], statuses
    for d in disputes:
        assert charges[d["charge"]]["disputed"] is True
        withdrawal = d["balance_transactions"][0]
        assert withdrawal["reporting_category"] == "dispute"
        assert withdrawal["fee"] == 1500
        assert [f["description"] for f in withdrawal["fee_details"]] == ["Dispute fee"]
        assert withdrawal["amount"] < 0
        if d["status"] == "won":
            assert len(d["balance_transactions"]) == 2
            reversal = d["balance_transactions"][1]
            assert reversal["reporting_category"] == "dispute_reversal"
            assert reversal["amount"] == -withdrawal["amount"]
            assert reversal["fee"] in (0, -1500)
        else:
            assert len(d["balance_transactions"]) == 1


def test_invoices(data: dict[str, list[dict[str, Any]]], world: StripeWorld) -> None:
    invoices = data["invoices"]
    charges = {c["id"]: c for c in data["charges"]}
    assert any(len(world._invoice_lines(j)) > 10 for j in range(len(invoices)))
    assert any(inv["lines"]["has_more"] for inv in invoices)
    taxed = [inv for inv in invoices if inv["total_taxes"]]
    assert taxed
    for inv in invoices:
        # Stripe's arithmetic (issue 18): discounts come off the subtotal, exclusive tax is
        # added, inclusive tax is already inside the line amounts.
        discount = sum(d["amount"] for d in inv["total_discount_amounts"])
        exclusive = sum(t["amount"] for t in inv["total_taxes"] if t["tax_behavior"] == "exclusive")
        inclusive = sum(t["amount"] for t in inv["total_taxes"] if t["tax_behavior"] == "inclusive")
        assert inv["total"] == inv["subtotal"] - discount + exclusive
        # Less the customer credit it used (issue 19; credit is a negative balance).
        used = inv["ending_balance"] - inv["starting_balance"]
        assert inv["amount_due"] == inv["total"] - used
        assert inv["total_excluding_tax"] == inv["subtotal"] - discount - inclusive
    assert all(sum(t["amount"] for t in inv["total_taxes"]) > 0 for inv in taxed)
    open_ = [inv for inv in invoices if inv["status"] == "open"]
    assert open_
    for j, inv in enumerate(invoices):
        lines = world._invoice_lines(j)
        assert sum(line["amount"] for line in lines) == inv["subtotal"]
        assert inv["lines"]["data"] == lines[:10]
        paying = charges[world.make_id("charges", int(world.b.inv_charge[j]))]
        if inv["status"] != "paid":  # open, or (issue 19) voided or written off
            assert paying["status"] == "failed"
            credited = inv["pre_payment_credit_notes_amount"]
            assert inv["amount_paid"] == 0
            used = inv["ending_balance"] - inv["starting_balance"]  # customer credit
            assert inv["amount_remaining"] == inv["total"] - credited - used
        else:
            assert paying["status"] == "succeeded"
            # An invoice paid in parts (issue 20): its payments add up to its total.
            parts = [
                charges[world.make_id("charges", int(world.b.ip_charge[p]))]
                for p in np.nonzero(world.b.ip_invoice == j)[0]
            ]
            assert inv["amount_paid"] == inv["total"] == sum(c["amount"] for c in parts)
    assert {inv["parent"] is None for inv in invoices} == {True, False}


def test_a_foreign_invoice_is_paid_in_two_parts_at_moving_rates(
    data: dict[str, list[dict[str, Any]]], world: StripeWorld
) -> None:
    """Issue 20: a paid EUR/GBP/JPY invoice whose two invoice_payments are charges of the
    same customer, in its currency, at rates that differ; it is paid from the second."""
    charges = {c["id"]: c for c in data["charges"]}
    bts = {b["id"]: b for b in data["balance_transactions"]}
    payments = render_all(world, "invoice_payments")
    assert [p["created"] for p in payments] == sorted(p["created"] for p in payments)
    by_invoice: dict[str, list[dict[str, Any]]] = {}
    for p in payments:
        by_invoice.setdefault(p["invoice"], []).append(p)
    split = {i: ps for i, ps in by_invoice.items() if len(ps) > 1}
    assert split
    invoices = {inv["id"]: inv for inv in data["invoices"]}
    for inv_id, ps in split.items():
        inv = invoices[inv_id]
        assert inv["currency"] != "usd" and inv["status"] == "paid"
        assert [p["is_default"] for p in ps] == [True, False]
        paid = [charges[p["payment"]["charge"]] for p in ps]
        assert {c["customer"] for c in paid} == {inv["customer"]}
        assert {c["currency"] for c in paid} == {inv["currency"]}
        assert sum(p["amount_paid"] for p in ps) == inv["total"] == inv["amount_paid"]
        assert inv["status_transitions"]["paid_at"] == paid[1]["created"] > paid[0]["created"]
        rates = [bts[c["balance_transaction"]]["exchange_rate"] for c in paid]
        assert rates[0] != rates[1]


def test_some_charges_carry_erp_order_ids(data: dict[str, list[dict[str, Any]]]) -> None:
    with_order = [c for c in data["charges"] if "erp_order_id" in c["metadata"]]
    assert len(with_order) >= CHARGES // 25
    assert all(c["metadata"]["erp_order_id"].startswith("SO") for c in with_order)
    assert len({c["metadata"]["erp_order_id"] for c in with_order}) == len(with_order)
    assert all(c["currency"] == "usd" for c in with_order)
    # The eCommerce platform that pushed the order also stamped its customer with a Sage id
    # (all but the few orders that never reached Sage).
    customers = {c["id"]: c for c in data["customers"]}
    seeded = [c for c in with_order if not c["metadata"]["erp_order_id"].startswith("SO9")]
    assert all(customers[c["customer"]]["metadata"].get("sage_customer_id") for c in seeded)


def test_customer_edge_cases(data: dict[str, list[dict[str, Any]]]) -> None:
    customers = [c for c in data["customers"] if not c.get("deleted")]
    emails = collections.Counter(c["email"] for c in customers if c["email"])
    assert any(c["email"] is None for c in customers)
    assert any(n == 2 for n in emails.values())
    assert any(len(c["name"] or "") > 40 for c in customers)
    assert any(not (c["name"] or "").isascii() for c in customers)
    assert any(c["metadata"].get("sage_customer_id") for c in customers)


def test_events_sorted_and_match_their_objects(data: dict[str, list[dict[str, Any]]]) -> None:
    events = data["events"]
    created = [e["created"] for e in events]
    assert created == sorted(created)
    assert len({e["id"] for e in events}) == len(events)
    assert max(created) <= END
    prefix = {
        "customer": "cus_",
        "charge": "ch_",
        "invoice": "in_",
        "refund": "re_",
        "payout": "po_",
        "dispute": "du_",
        "subscription": "sub_",
        "credit_note": "cn_",
        "checkout.session": "cs_test_",
    }
    for e in events:
        obj = e["data"]["object"]
        assert obj["id"].startswith(prefix[obj["object"]]), e["type"]
    types = {e["type"] for e in events}
    assert {
        "charge.succeeded",
        "charge.failed",
        "charge.refunded",
        "refund.failed",
        "payout.paid",
        "payout.failed",
        "invoice.payment_failed",
        "charge.dispute.closed",
    } <= types


def test_products_are_the_catalog_invoice_lines_sell(world: StripeWorld) -> None:
    """Issue 17: products in Stripe's current shape, some naming a Sage item (which the Sage
    sandbox seeds), the rest not; every product an invoice line names is one of them."""
    from devkit.sandbox.sage_seed import SHOP_ITEMS

    products = render_all(world, "products")
    assert set(products[0]) == set(world.tpl["product"])  # the fixture's shape, nothing else
    ids = [p["id"] for p in products]
    assert len(set(ids)) == len(ids) and all(world.parse_id("products", i) is not None for i in ids)
    created = [p["created"] for p in products]
    assert created == sorted(created) and created[0] >= world.config.start
    seeded = {i.item for i in SHOP_ITEMS}
    naming = [p for p in products if p["metadata"].get("sage_item")]
    assert naming and all(p["metadata"]["sage_item"] in seeded for p in naming)
    assert len(naming) < len(products)
    assert any(p["type"] == "good" for p in products)
    sold = {
        line["pricing"]["price_details"]["product"]
        for j in range(min(200, world.count("invoices")))
        for line in world._invoice_lines(j)
    }
    assert sold and sold <= set(ids)


# -- the everyday shapes of a real account (docs/accounting.md "Zero-touch defaults") -------
def charges_of(data: dict[str, list[dict[str, Any]]], customer: str) -> list[dict[str, Any]]:
    return [c for c in data["charges"] if c["customer"] == customer]


def test_guest_checkouts_have_no_customer_and_some_are_refunded(
    data: dict[str, list[dict[str, Any]]],
) -> None:
    guests = [c for c in data["charges"] if c["customer"] is None]
    assert 3 <= len(guests) <= CHARGES * 6 // 1000
    for c in guests:
        assert c["status"] == "succeeded" and c["captured"] and c["balance_transaction"]
        assert c["billing_details"]["name"] and c["billing_details"]["email"]
        assert c["receipt_email"] == c["billing_details"]["email"]
        assert "erp_order_id" not in c["metadata"]
    ids = {c["id"] for c in guests}
    refunded = {r["charge"] for r in data["refunds"] if r["charge"] in ids}
    assert 1 <= len(refunded) < len(guests)
    # Their events show them the same way.
    succeeded = [
        e["data"]["object"]
        for e in data["events"]
        if e["type"] == "charge.succeeded" and e["data"]["object"]["id"] in ids
    ]
    assert len(succeeded) == len(guests)
    assert all(o["customer"] is None for o in succeeded)


def test_nameless_customers_three_ways(data: dict[str, list[dict[str, Any]]]) -> None:
    nameless = [c for c in data["customers"] if not c.get("deleted") and c["name"] is None]
    kinds: collections.Counter[str] = collections.Counter()
    for cust in nameless:
        assert not cust["metadata"].get("sage_customer_id")
        charges = charges_of(data, cust["id"])
        assert charges, cust["id"]
        billing = {c["billing_details"]["name"] for c in charges}
        if billing != {None}:
            assert None not in billing
            kinds["billing name"] += 1
        elif cust["email"]:
            kinds["email only"] += 1
        else:
            assert {c["billing_details"]["email"] for c in charges} == {None}
            kinds["nothing"] += 1
    assert set(kinds) == {"billing name", "email only", "nothing"}, kinds
    assert sum(kinds.values()) <= len(data["customers"]) * 6 // 100


def test_long_names_without_a_word_boundary(data: dict[str, list[dict[str, Any]]]) -> None:
    names = [c["name"] for c in data["customers"] if not c.get("deleted") and c["name"]]
    unbroken = [n for n in names if len(n) > 40 and " " not in n]
    spaced = [n for n in names if len(n) > 40 and " " in n]
    assert unbroken and spaced
    assert all(n.isalpha() for n in unbroken)  # nothing at all to cut at


def test_deleted_customers_keep_their_charges(
    world: StripeWorld, data: dict[str, list[dict[str, Any]]]
) -> None:
    stubs = [c for c in data["customers"] if c.get("deleted")]
    assert len(stubs) >= 2
    events = data["events"]
    for stub in stubs:
        assert stub == {"id": stub["id"], "object": "customer", "deleted": True}
        charges = charges_of(data, stub["id"])
        assert charges and all(c["status"] in ("succeeded", "failed") for c in charges)
        deleted = [
            e
            for e in events
            if e["type"] == "customer.deleted" and e["data"]["object"]["id"] == stub["id"]
        ]
        assert len(deleted) == 1
        before = deleted[0]["data"]["object"]
        assert before["deleted"] is True and before["created"]  # the customer as it was
        assert max(c["created"] for c in charges) < deleted[0]["created"] <= END
        # Before its deletion the customer rendered whole, as its customer.created event shows.
        k = world.parse_id("customers", stub["id"])
        assert k is not None
        assert "email" in world.render("customers", k, as_of=deleted[0]["created"] - 1)
        # No subscription or Billing invoice of a deleted customer.
        assert not [i for i in data["invoices"] if i["customer"] == stub["id"]]


def test_authorizations_never_captured(data: dict[str, list[dict[str, Any]]]) -> None:
    uncaptured = [c for c in data["charges"] if c["status"] == "succeeded" and not c["captured"]]
    by_state: collections.Counter[str] = collections.Counter()
    refunds = {r["charge"] for r in data["refunds"]}
    disputes = {d["charge"] for d in data["disputes"]}
    bt_sources = {bt["source"] for bt in data["balance_transactions"]}
    events: dict[str, list[str]] = collections.defaultdict(list)
    for e in data["events"]:
        if e["data"]["object"]["object"] == "charge":
            events[e["data"]["object"]["id"]].append(e["type"])
    for c in uncaptured:
        assert c["paid"] is True and c["amount_captured"] == 0
        assert c["balance_transaction"] is None and c["id"] not in bt_sources
        assert c["id"] not in refunds and c["id"] not in disputes
        assert c["payment_method_details"]["card"]["capture_before"] == c["created"] + 7 * DAY
        if c["refunded"]:
            assert c["amount_refunded"] == c["amount"]
            if "charge.expired" in events[c["id"]]:
                by_state["expired"] += 1
                assert events[c["id"]] == ["charge.succeeded", "charge.expired"]
            else:
                by_state["released"] += 1
                assert events[c["id"]] == ["charge.succeeded", "charge.refunded"]
        else:
            by_state["pending"] += 1
            assert c["amount_refunded"] == 0
            assert c["created"] + 7 * DAY > END  # not lapsed yet
            assert events[c["id"]] == ["charge.succeeded"]
    assert set(by_state) == {"pending", "expired", "released"}, by_state
    assert len(uncaptured) <= CHARGES * 7 // 1000


def test_erp_orders_sage_never_got(
    world: StripeWorld, data: dict[str, list[dict[str, Any]]]
) -> None:
    from devkit.sandbox.seed_link import sage_seed_for

    _, orders = sage_seed_for(world)
    seeded = {o.order_no for o in orders}
    named = {
        c["metadata"]["erp_order_id"] for c in data["charges"] if "erp_order_id" in c["metadata"]
    }
    unknown = named - seeded
    assert 2 <= len(unknown) <= CHARGES * 4 // 1000
    assert seeded <= named


@pytest.mark.parametrize("charges", [20, 240, 20_000])
def test_everyday_shapes_scale_with_the_business(charges: int) -> None:
    b = Business(BusinessConfig(seed=3, charges=charges, end=END))
    counts = {
        "guest": int(b.ch_guest.sum()),
        "erp_unknown": int(b.ch_erp_unknown.sum()),
        "auth_pending": int((b.ch_auth == 1).sum()),
        "auth_expired": int((b.ch_auth == 2).sum()),
        "auth_released": int((b.ch_auth == 3).sum()),
        "deleted": int((b.cu_deleted_at > 0).sum()),
    }
    for kind in range(1, 5):
        counts[f"name kind {kind}"] = int((b.cu_name_kind == kind).sum())
    assert all(n >= 1 for n in counts.values()), counts
    special = sum(v for k, v in counts.items() if not k.startswith(("name", "deleted")))
    if charges >= 1000:
        assert special <= charges * 15 // 1000, counts  # a few per 1000 charges
        assert counts["guest"] == charges * 5 // 1000
    # The shapes never overlap one another, Billing or the seeded ERP orders.
    marked = b.ch_guest.astype(int) + b.ch_erp_unknown + (b.ch_auth > 0)
    assert marked.max() == 1
    assert not (marked.astype(bool) & (b.ch_is_invoice | b.ch_is_erp | b.ch_failed)).any()
