"""The Stripe sandbox after an invoice is finalized (issue 19): credit notes, voids and
write-offs of open invoices, in Stripe's current shapes, read over the sandbox's HTTP API."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devkit.sandbox.stripe_app import create_stripe_app
from devkit.sandbox.stripe_business import BusinessConfig
from devkit.sandbox.stripe_state import StripeWorld

pytestmark = pytest.mark.unit

END = 1_782_777_600
KEY = "sk_test_after"


@pytest.fixture(scope="module")
def api() -> TestClient:
    world = StripeWorld(BusinessConfig(seed=7, charges=1500, end=END), clock=lambda: END)
    app = create_stripe_app(world=world, api_key=KEY, rate_limit=None)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


def list_all(api: TestClient, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        q = {"limit": 100, **params, **({"starting_after": after} if after else {})}
        page = api.get(path, params=q).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["data"][-1]["id"]


@pytest.fixture(scope="module")
def stripe(api: TestClient) -> dict[str, list[dict[str, Any]]]:
    return {
        "invoices": list_all(api, "/v1/invoices"),
        "credit_notes": list_all(api, "/v1/credit_notes"),
        "events": list_all(api, "/v1/events"),
        "refunds": list_all(api, "/v1/refunds"),
        "charges": list_all(api, "/v1/charges"),
        "customers": list_all(api, "/v1/customers"),
    }


def fixture_keys(name: str) -> set[str]:
    text = resources.files("devkit.sandbox").joinpath("data/stripe_fixtures3.json").read_text()
    return set(json.loads(text)["resources"][name])


def test_every_kind_is_present(stripe: dict[str, list[dict[str, Any]]]) -> None:
    statuses = {inv["status"] for inv in stripe["invoices"]}
    assert {"paid", "open", "void", "uncollectible"} <= statuses
    assert stripe["credit_notes"]


def test_credit_notes_have_stripes_shape_and_sum_to_their_lines(
    api: TestClient, stripe: dict[str, list[dict[str, Any]]]
) -> None:
    invoices = {inv["id"]: inv for inv in stripe["invoices"]}
    refunds = {r["id"]: r for r in stripe["refunds"]}
    charges = {c["id"]: c for c in stripe["charges"]}
    assert {cn["type"] for cn in stripe["credit_notes"]} == {"pre_payment", "post_payment"}
    for cn in stripe["credit_notes"]:
        assert cn["id"].startswith("cn_")
        assert set(cn) == fixture_keys("credit_note")
        lines = api.get(f"/v1/credit_notes/{cn['id']}/lines").json()["data"]
        assert lines == cn["lines"]["data"]
        for line in lines:
            assert set(line) == fixture_keys("credit_note_line_item")
        exclusive = sum(
            t["amount"] for ln in lines for t in ln["taxes"] if t["tax_behavior"] == "exclusive"
        )
        assert cn["total"] == sum(ln["amount"] - ln["discount_amount"] for ln in lines) + exclusive
        assert sum(t["amount"] for t in cn["total_taxes"]) == sum(
            t["amount"] for ln in lines for t in ln["taxes"]
        )
        inv = invoices[cn["invoice"]]
        assert cn["customer"] == inv["customer"]
        if cn["type"] == "pre_payment":
            assert cn["refunds"] == [] and cn["pre_payment_amount"] == cn["total"]
            # A pre-payment note reduces what is still owed on the open invoice.
            assert inv["status"] == "open"
            assert inv["amount_remaining"] == inv["amount_due"] - cn["total"]
            assert inv["pre_payment_credit_notes_amount"] == cn["total"]
        else:
            # A post-payment note names the refund that paid it back; the invoice stays paid.
            assert cn["type"] == "post_payment" and cn["post_payment_amount"] == cn["total"]
            [named] = cn["refunds"]
            refund = refunds[named["refund"]]
            assert named["amount_refunded"] == refund["amount"] == cn["total"]
            assert charges[refund["charge"]]["customer"] == inv["customer"]
            assert inv["status"] == "paid" and inv["amount_remaining"] == 0
            assert inv["post_payment_credit_notes_amount"] == cn["total"]
            # A full refund credits every line with its taxes; a partial one, a custom line.
            if cn["total"] == inv["total"]:
                assert sum(t["amount"] for t in cn["total_taxes"]) == sum(
                    t["amount"] for t in inv["total_taxes"]
                )
            else:
                assert [ln["type"] for ln in lines] == ["custom_line_item"]
        by_invoice = api.get("/v1/credit_notes", params={"invoice": inv["id"]}).json()["data"]
        assert [c["id"] for c in by_invoice] == [cn["id"]]


def test_voids_and_write_offs_have_their_events_and_transitions(
    stripe: dict[str, list[dict[str, Any]]],
) -> None:
    events: dict[str, set[str]] = {}
    for ev in stripe["events"]:
        obj = ev["data"]["object"]
        events.setdefault(ev["type"], set()).add(obj["id"])
        if ev["type"] == "invoice.voided":
            assert obj["status"] == "void"
        if ev["type"] == "invoice.marked_uncollectible":
            assert obj["status"] == "uncollectible"
    voided = {i["id"] for i in stripe["invoices"] if i["status"] == "void"}
    written_off = {i["id"] for i in stripe["invoices"] if i["status"] == "uncollectible"}
    assert voided == events["invoice.voided"]
    assert written_off == events["invoice.marked_uncollectible"]
    assert {c["id"] for c in stripe["credit_notes"]} == events["credit_note.created"]
    for inv in stripe["invoices"]:
        tr = inv["status_transitions"]
        assert (tr["voided_at"] is not None) == (inv["id"] in voided)
        assert (tr["marked_uncollectible_at"] is not None) == (inv["id"] in written_off)
        assert inv["amount_paid"] == (inv["amount_due"] if inv["status"] == "paid" else 0)


def test_status_filter_knows_the_new_statuses(
    api: TestClient, stripe: dict[str, list[dict[str, Any]]]
) -> None:
    for status in ("void", "uncollectible", "open"):
        listed = {i["id"] for i in list_all(api, "/v1/invoices", status=status)}
        assert listed == {i["id"] for i in stripe["invoices"] if i["status"] == status}


def test_credit_balances_have_stripes_shape_and_add_up(
    api: TestClient, stripe: dict[str, list[dict[str, Any]]]
) -> None:
    """Customer credit (issue 19): invoices that used it, the balance transactions behind
    them, and customers still holding some; credit is a negative balance (STRIPE.md)."""
    used = [i for i in stripe["invoices"] if i["ending_balance"] - i["starting_balance"] > 0]
    holding = [c for c in stripe["customers"] if c["balance"] < 0]
    assert used and holding
    for inv in used:
        credit = inv["ending_balance"] - inv["starting_balance"]
        assert inv["starting_balance"] == -credit and inv["ending_balance"] == 0
        assert inv["amount_due"] == inv["total"] - credit
        assert inv["amount_remaining"] == inv["amount_due"]  # open: nothing paid yet
        txns = list_all(api, f"/v1/customers/{inv['customer']}/balance_transactions")
        applied = [t for t in txns if t["invoice"] == inv["id"]]
        assert [(t["type"], t["amount"]) for t in applied] == [("applied_to_invoice", credit)]
    for cus in {i["customer"] for i in used} | {c["id"] for c in holding}:
        txns = list_all(api, f"/v1/customers/{cus}/balance_transactions")
        for t in txns:
            assert set(t) == fixture_keys("customer_balance_transaction")
            assert t["object"] == "customer_balance_transaction" and t["customer"] == cus
            one = api.get(f"/v1/customers/{cus}/balance_transactions/{t['id']}").json()
            assert one == t
        # Newest first; each ending_balance is the running sum; the last is the balance.
        oldest_first = txns[::-1]
        running = 0
        for t in oldest_first:
            running += t["amount"]
            assert t["ending_balance"] == running
        assert api.get(f"/v1/customers/{cus}").json()["balance"] == running
    other = stripe["customers"][0]["id"]
    stranger = list_all(api, f"/v1/customers/{holding[0]['id']}/balance_transactions")[0]["id"]
    if other != holding[0]["id"]:
        r = api.get(f"/v1/customers/{other}/balance_transactions/{stranger}")
        assert r.status_code == 404


# -- a lost dispute on an invoice payment ------------------------------------------------------
@pytest.fixture(scope="module")
def default_api() -> TestClient:
    """The default business (seed 7, 1,000 charges: the one ``make demo`` serves)."""
    world = StripeWorld(BusinessConfig(end=END), clock=lambda: END)
    app = create_stripe_app(world=world, api_key=KEY, rate_limit=None)
    return TestClient(app, headers={"Authorization": f"Bearer {KEY}"})


def test_a_lost_dispute_on_an_invoice_payment_lands_in_a_payout(default_api: TestClient) -> None:
    disputes = list_all(default_api, "/v1/disputes")
    payments = list_all(default_api, "/v1/invoice_payments")
    paid_by = {p["payment"]["charge"]: p["invoice"] for p in payments if p["status"] == "paid"}
    [lost] = [d for d in disputes if d["status"] == "lost" and d["charge"] in paid_by]
    assert set(lost) == fixture_keys("dispute")  # Stripe's current shape
    # Appended after every other dispute: no dispute's id moved.
    assert lost["created"] >= max(d["created"] for d in disputes)
    charge = default_api.get(f"/v1/charges/{lost['charge']}").json()
    assert charge["disputed"] and lost["amount"] == charge["amount"]
    invoice = default_api.get(f"/v1/invoices/{paid_by[lost['charge']]}").json()
    assert invoice["status"] == "paid" and invoice["amount_remaining"] == 0  # stays paid
    assert invoice["currency"] == "usd" and invoice["customer"] == charge["customer"]
    # One balance transaction: the amount withdrawn and the dispute fee, paid out.
    [bt] = lost["balance_transactions"]
    assert (bt["reporting_category"], bt["amount"], bt["fee"]) == ("dispute", -lost["amount"], 1500)
    payouts = [
        p
        for p in list_all(default_api, "/v1/payouts")
        if bt["id"] in {b["id"] for b in list_all(default_api, "/v1/balance_transactions",
                                                   payout=p["id"])}
    ]  # fmt: skip
    [payout] = payouts
    assert payout["automatic"] and payout["amount"] > 0
    swept = list_all(default_api, "/v1/balance_transactions", payout=payout["id"])
    assert sum(b["net"] for b in swept if b["type"] != "payout") == payout["amount"]
    events = [
        e["type"]
        for e in list_all(default_api, "/v1/events", type="charge.dispute.*")
        if e["data"]["object"]["id"] == lost["id"]
    ]
    assert sorted(events) == sorted(
        ["charge.dispute.created", "charge.dispute.funds_withdrawn", "charge.dispute.closed"]
    )


def test_the_lost_invoice_dispute_moves_nothing_else() -> None:
    """Drawn from its own rng and appended: without it the business is the same but for
    that one dispute, its balance transaction and the one payout that swept it up."""
    import numpy as np

    from devkit.sandbox.stripe_business import BT_DISPUTE, Business

    class Without(Business):
        def _lost_dispute_on_an_invoice(self) -> None:
            pass

    config = BusinessConfig(end=END)
    b, a = Business(config), Without(config)
    assert len(b.disputes) == len(a.disputes) + 1
    for col in ("dp_charge", "dp_status", "dp_closed_at", "dp_fee_returned"):
        assert np.array_equal(getattr(b, col)[:-1], getattr(a, col)), col
    for col in ("ch_amount", "ch_customer", "ch_failed", "rf_charge", "inv_charge"):
        assert np.array_equal(getattr(b, col), getattr(a, col)), col
    assert len(b.payouts) == len(a.payouts)
    changed = np.nonzero(b.po_amount != a.po_amount)[0]
    x = b.bt_of(BT_DISPUTE, len(b.disputes) - 1)
    assert changed.tolist() == [b.bt_payout[x]]
    assert int(a.po_amount[changed[0]] - b.po_amount[changed[0]]) == -(b.bt_amount[x] - b.bt_fee[x])
