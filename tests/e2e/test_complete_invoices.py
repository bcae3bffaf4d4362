"""Complete Billing invoices end to end (issue 18; docs/accounting.md §3,
invariant 12): coupons, inclusive VAT, two exclusive rates and proration lines reach Sage with
``discount_amount``, ``tax_lines`` per Stripe tax rate and Stripe's ``total`` to the cent.

Expected values come from the Stripe sandbox's own listings (plain HTTP, expanded the way an
outside client such as Airbyte reads them), never from the pipeline; the mapping's tax codes
are read from the default mapping file the run uses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stripe_sage.mapping import load_mapping
from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    Env,
    is_goods_order,
    make_env,
    outbox,
    read_only,
    run_flow,
    run_twice_under_sage_faults,
    sage_all,
    settlement_waits,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def billing_env(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("billing"), charges=300, seed=18, monkeypatch=mp)
    with env.pair:
        yield env
    mp.undo()


@pytest.fixture()
def env(billing_env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    use_env(billing_env, monkeypatch, quality=ACCOUNTING_QUALITY)
    return billing_env


def cents(money: str) -> int:
    return int(Decimal(money) * 100)


def stripe_invoices(env: Env) -> dict[str, dict[str, Any]]:
    """Finalized invoices with every line, read as an outside client reads them: discounts
    expanded (real Stripe accepts it; Airbyte's Stripe source asks for it)."""
    with env.stripe() as s:
        invoices = stripe_all(
            s, "/v1/invoices", **{"expand[]": ["data.discounts", "data.lines.data.discounts"]}
        )
        out = {}
        for inv in invoices:
            # A foreign-currency invoice posts converted to the settlement currency, once
            # Stripe settled its payment: tests/e2e/test_foreign_currency.py checks those.
            if inv["status"] not in ("open", "paid") or inv["currency"] != "usd":
                continue
            if inv["lines"]["has_more"]:
                inv["lines"]["data"] = stripe_all(s, f"/v1/invoices/{inv['id']}/lines")
            out[inv["id"]] = inv
        rates = {r["id"]: r for r in stripe_all(s, "/v1/tax_rates")}
    for inv in out.values():
        inv["_rates"] = rates
    return out


def expected_code(rate: dict[str, Any]) -> str:
    """The Sage tax code the default mapping gives a Stripe tax rate (by id, then by
    jurisdiction and percentage, then the default)."""
    tax = load_mapping().tax
    if rate["id"] in tax.codes:
        return tax.codes[rate["id"]]
    for j in tax.by_jurisdiction:
        if j.jurisdiction == rate["jurisdiction"] and j.percentage == Decimal(
            str(rate["percentage"])
        ):
            return j.code
    assert tax.default_code is not None, rate
    return tax.default_code


def test_complete_invoices_post_to_the_cent(env: Env) -> None:
    run_flow(trigger="test")
    box = outbox(env)
    con = read_only(env.db)
    try:
        dead = con.execute("SELECT count(*) FROM ops.dead_letters").fetchone()
    finally:
        con.close()
    assert dead == (0,)
    # Everything posted but foreign-currency invoices whose payment Stripe never settled.
    assert set(box) <= {"posted", "waiting"}, {s: dict(n) for s, n in box.items()}
    assert sum(box.get("waiting", {}).values()) == settlement_waits(env)

    stripe = stripe_invoices(env)
    with env.sage() as c:
        sage = {i["reference"]: i for i in sage_all(c, "invoices") if i["reference"] in stripe}
    assert set(sage) == set(stripe)

    # The business holds every shape this issue is about (its counts are in the report).
    lines = [ln for inv in stripe.values() for ln in inv["lines"]["data"]]
    assert any(inv["discounts"] for inv in stripe.values())
    assert {type(d) for inv in stripe.values() for d in inv["discounts"]} == {dict}  # expanded
    assert any(
        t["tax_behavior"] == "inclusive" for inv in stripe.values() for t in inv["total_taxes"]
    )
    assert any(len(inv["total_taxes"]) >= 2 for inv in stripe.values())
    assert any(ln["amount"] < 0 for ln in lines)

    total_tax = total_discount = 0
    for inv_id, inv in stripe.items():
        doc = sage[inv_id]
        tax = sum(t["amount"] for t in inv["total_taxes"])
        discount = sum(d["amount"] for d in inv["total_discount_amounts"])
        assert cents(doc["total"]) == inv["total"], inv_id
        assert cents(doc["tax_amount"]) == tax, inv_id
        assert cents(doc["discount_amount"]) == discount, inv_id
        # one tax line per Stripe rate, with the mapping's code, in Stripe's order
        want = [
            (expected_code(inv["_rates"][t["tax_rate_details"]["tax_rate"]]), t["amount"])
            for t in inv["total_taxes"]
        ]
        got = [(t["tax_code"], cents(t["amount"])) for t in doc["tax_lines"] or []]
        assert got == want, inv_id
        # every line, proration credits as negative lines, each net of its inclusive tax
        assert len(doc["lines"]) == len(inv["lines"]["data"]), inv_id
        for sage_line, line in zip(doc["lines"], inv["lines"]["data"], strict=True):
            inclusive = sum(t["amount"] for t in line["taxes"] if t["tax_behavior"] == "inclusive")
            extension = (
                Decimal(sage_line["quantity"]) * Decimal(sage_line["unit_price"])
            ).quantize(Decimal("0.01"), rounding="ROUND_HALF_UP")
            assert cents(str(extension)) == line["amount"] - inclusive, (inv_id, line["id"])
            assert Decimal(sage_line["quantity"]) == line["quantity"]
        total_tax += tax
        total_discount += discount
    # invariant 12, in total
    assert sum(cents(d["tax_amount"]) for d in sage.values()) == total_tax > 0
    assert sum(cents(d["discount_amount"]) for d in sage.values()) == total_discount > 0


def test_rerun_posts_nothing_twice(env: Env) -> None:
    with env.sage() as c:
        before = len(sage_all(c, "invoices"))
    run_flow(trigger="test")
    with env.sage() as c:
        invoices = sage_all(c, "invoices")
    assert len(invoices) == before
    references = [i["reference"] for i in invoices]
    assert len(references) == len(set(references))


def test_analysts_see_subscriptions_and_mrr(env: Env) -> None:
    with env.stripe() as s:
        subs = stripe_all(s, "/v1/subscriptions")
    snapshot = env.db.parent / "snapshot" / "analytics.duckdb"
    con = duckdb.connect(str(snapshot), read_only=True)
    try:
        items = con.sql(
            "SELECT subscription, item, price, quantity, current_period_end, mrr "
            "FROM billing.subscription_items"
        ).fetchall()
        mrr = dict(con.sql("SELECT customer, mrr FROM billing.mrr_by_customer").fetchall())
    finally:
        con.close()
    want_items = {(s["id"], i["id"]) for s in subs for i in s["items"]["data"]}
    assert {(r[0], r[1]) for r in items} == want_items
    want_mrr: dict[str, int] = {}
    for sub in subs:
        for item in sub["items"]["data"]:
            price = item["price"]
            per_month = Decimal(price["unit_amount"] * item["quantity"])
            if price["recurring"]["interval"] == "year":
                per_month /= 12
            live = sub["status"] in ("active", "trialing", "past_due")
            amount = int(per_month.quantize(Decimal(1), rounding="ROUND_HALF_UP")) if live else 0
            want_mrr[sub["customer"]] = want_mrr.get(sub["customer"], 0) + amount
    assert mrr == want_mrr
    assert all(r[4] is not None and r[3] >= 1 for r in items)


def test_under_the_fault_mix_complete_invoices_and_orders_post_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    """One business under the Sage fault mix: its Billing invoices (here) and its Checkout
    orders (``_orders_posted_once``) each post exactly once."""
    env = make_env(tmp_path, charges=150, seed=19, monkeypatch=monkeypatch)
    with env.pair:
        use_env(env, monkeypatch, quality=ACCOUNTING_QUALITY)
        first, second, injected = run_twice_under_sage_faults(
            env, seed=18, commit_then_503_rate=0.1
        )
        assert injected["commit_then_503"] > 0 and injected["http_503"] > 0
        assert sum(first["load"]["deferred"].values()) == 0, first["load"]
        assert sum(second["load"]["posted"].values()) == 0
        box = outbox(env)
        assert set(box) <= {"posted", "waiting"}
        assert sum(box.get("waiting", {}).values()) == settlement_waits(env)
        stripe = stripe_invoices(env)
        with env.sage() as c:
            invoices = sage_all(c, "invoices")
        mine = [i for i in invoices if i["reference"] in stripe]
        assert sorted(i["reference"] for i in mine) == sorted(stripe)  # each once
        for doc in mine:
            inv = stripe[doc["reference"]]
            assert cents(doc["total"]) == inv["total"]
            assert cents(doc["tax_amount"]) == sum(t["amount"] for t in inv["total_taxes"])
            assert cents(doc["discount_amount"]) == sum(
                d["amount"] for d in inv["total_discount_amounts"]
            )
        _orders_posted_once(env)
        _every_document_once(env)


def _every_document_once(env: Env) -> None:
    """Nothing twice in Sage, whatever the document: each reference once per collection
    (a commit answered 503 and posted again would show as a second one), and the business
    holds the after-posting shapes too (credit memos, write-off and payout journals)."""
    with env.sage() as c:
        held = {
            name: sage_all(c, name)
            for name in ("invoices", "cashreceipts", "creditmemos", "journalentries", "salesorders")
        }
    for name, docs in held.items():
        refs = Counter(d["reference"] for d in docs if d.get("reference"))
        assert [r for r, n in refs.items() if n > 1] == [], name
    assert held["creditmemos"] and held["journalentries"]


def _orders_posted_once(env: Env) -> None:
    """Each goods Checkout Session: one sales order, one invoice of it (total and discount
    Stripe's), and its charge's one receipt applied to that invoice; nothing else in Sage
    names the session's payment intent or its charge."""
    with env.stripe() as s:
        sessions = [x for x in stripe_all(s, "/v1/checkout/sessions") if is_goods_order(x)]
        charge_of = {c["payment_intent"]: c for c in stripe_all(s, "/v1/charges")}
    with env.sage() as c:
        orders, invoices, receipts = (
            sage_all(c, name) for name in ("salesorders", "invoices", "cashreceipts")
        )
    assert sessions
    for x in sessions:
        pi, charge = x["payment_intent"], charge_of[x["payment_intent"]]["id"]
        [order] = [o for o in orders if o["reference"] == pi]
        [invoice] = [i for i in invoices if i["reference"] == pi]
        assert invoice["sales_order_no"] == order["order_no"] and order["status"] == "invoiced"
        assert cents(invoice["total"]) == x["amount_total"], x["id"]
        assert cents(invoice["discount_amount"]) == x["total_details"]["amount_discount"]
        assert not [i for i in invoices if i["reference"] == charge]  # no standalone sale
        [receipt] = [r for r in receipts if r["reference"] == charge]
        assert [a["invoice_no"] for a in receipt["apply_to"]] == [invoice["invoice_no"]]
        assert cents(invoice["balance_due"]) == 0
