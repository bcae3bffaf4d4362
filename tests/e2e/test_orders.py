"""Checkout orders (issue 17, docs/accounting.md "Orders, items and stock"): each completed goods
Checkout Session of the Stripe sandbox's business becomes one Sage sales order with one line per
line item, invoiced once, its charge's receipt applied to that invoice; stock moves by the
quantities invoiced; the Sage numbers come back on the payment intent.

The module runs the main flow three times on one business: first without the
``checkout_sessions`` stream (every charge then waits: Stripe has not been asked whether a
session names its payment intent), then with every stream, then once more (nothing new).
What Stripe implies is read from the Stripe sandbox over plain HTTP, what Sage holds from the
Sage sandbox, independently of the pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stripe_sage.stripe.streams import LISTED_STREAMS
from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    Env,
    by_reference,
    is_goods_order,
    make_env,
    run_flow,
    sage_all,
    sage_counts,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e

SEED, CHARGES = 5, 300
BIN = Path(sys.executable).parent
WITHOUT_SESSIONS = [s for s in LISTED_STREAMS if s != "checkout_sessions"]


def cents(amount: int) -> Decimal:
    return Decimal(amount) / 100


def extension(line: dict[str, Any]) -> Decimal:
    """Sage v1.1: quantity × unit_price rounded half-up to the cent."""
    value = Decimal(line["quantity"]) * Decimal(line["unit_price"])
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def sage_side(env: Env) -> dict[str, list[dict[str, Any]]]:
    with env.sage() as c:
        return {
            name: sage_all(c, name) for name in ("salesorders", "invoices", "cashreceipts", "items")
        }


def outbox_rows(env: Env) -> list[tuple[str, str, str, str | None]]:
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        return con.sql("SELECT doc_key, stripe_id, status, last_error FROM sage.outbox").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness: None
) -> Iterator[dict[str, Any]]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("orders"), charges=CHARGES, seed=SEED, monkeypatch=mp)
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        with env.stripe() as s:
            sessions = stripe_all(s, "/v1/checkout/sessions")
            items = {
                x["id"]: stripe_all(s, f"/v1/checkout/sessions/{x['id']}/line_items")
                for x in sessions
            }
            charges = stripe_all(s, "/v1/charges")
            products = {p["id"]: p for p in stripe_all(s, "/v1/products")}
            invoices = [i for i in stripe_all(s, "/v1/invoices") if i["status"] in ("open", "paid")]
            invoice_lines = [
                ln for i in invoices for ln in stripe_all(s, f"/v1/invoices/{i['id']}/lines")
            ]
        with env.sage() as c:
            on_hand_before = {i["item"]: i["on_hand"] for i in sage_all(c, "items")}
        first = run_flow(trigger="test", streams=WITHOUT_SESSIONS)
        # QUALITY_ENGINE=polars: the same checks, no Data Docs.
        assert first["data_docs"] is None and first["quarantined"] is not None, first
        after_first = {"sage": sage_side(env), "outbox": outbox_rows(env)}
        second = run_flow(trigger="test")
        after_second = {"sage": sage_side(env), "counts": sage_counts(env)}
        third = run_flow(trigger="test")
        with env.stripe() as s:
            intents = {
                x["payment_intent"]: s.get(f"/v1/payment_intents/{x['payment_intent']}").json()
                for x in sessions
                if is_goods_order(x)
            }
            products_after = {p["id"]: p for p in stripe_all(s, "/v1/products")}
        yield {
            "env": env,
            "sessions": sessions,
            "items": items,
            "charges": charges,
            "products": products,
            "products_after": products_after,
            "invoice_lines": invoice_lines,
            "on_hand_before": on_hand_before,
            "first": first,
            "after_first": after_first,
            "second": second,
            "after_second": after_second,
            "third": third,
            "intents": intents,
            "sage": sage_side(env),
            "counts": sage_counts(env),
        }
    mp.undo()


def goods(d: dict[str, Any]) -> list[dict[str, Any]]:
    return [x for x in d["sessions"] if is_goods_order(x)]


def charge_of(d: dict[str, Any], pi: str) -> dict[str, Any]:
    (charge,) = [c for c in d["charges"] if c["payment_intent"] == pi]
    return charge


def test_the_business_holds_every_order_shape(runs: dict[str, Any]) -> None:
    """The premise: several items, quantities > 1, inclusive tax, shipping, a discount, and
    sessions created with invoice_creation."""
    orders = goods(runs)
    lines = [ln for x in orders for ln in runs["items"][x["id"]]]
    assert len(orders) >= 8
    assert any(len(runs["items"][x["id"]]) > 1 for x in orders)
    assert any(ln["quantity"] > 1 for ln in lines)
    assert any(ln["price"]["tax_behavior"] == "inclusive" and ln["amount_tax"] for ln in lines)
    assert any(x["total_details"]["amount_shipping"] for x in orders)
    assert any(x["total_details"]["amount_discount"] for x in orders)
    assert [x for x in runs["sessions"] if x["invoice_creation"]["enabled"]]
    # Each session's payment intent is one of the business's charges.
    for x in orders:
        assert charge_of(runs, x["payment_intent"])["status"] == "succeeded"


def test_a_charge_whose_session_is_not_staged_posts_nothing_until_it_is(
    runs: dict[str, Any],
) -> None:
    first = runs["after_first"]
    refs = by_reference(
        first["sage"]["invoices"] + first["sage"]["cashreceipts"] + first["sage"]["salesorders"]
    )
    rows = {doc_key: (status, reason) for doc_key, _, status, reason in first["outbox"]}
    for x in goods(runs):
        charge = charge_of(runs, x["payment_intent"])
        # Nothing in Sage names the charge or its payment intent ...
        assert charge["id"] not in refs and x["payment_intent"] not in refs, x["id"]
        # ... its receipt waits with a reason naming the payment intent, and no standalone
        # invoice was planned for it.
        status, reason = rows[f"cash_receipt:{charge['id']}"]
        assert status == "waiting" and x["payment_intent"] in (reason or ""), reason
        assert f"invoice:{charge['id']}" not in rows
    # The second run, with the sessions staged, posts each of them once (below), and leaves
    # no waiting document behind.
    assert runs["second"]["status"] == "completed", runs["second"]["status"]


def test_each_goods_session_is_one_order_invoiced_once_and_paid(runs: dict[str, Any]) -> None:
    sage = runs["sage"]
    orders = by_reference(sage["salesorders"])
    invoices = by_reference(sage["invoices"])
    receipts = by_reference(sage["cashreceipts"])
    shipping_item = "STRIPE-SHIPPING"
    for x in goods(runs):
        pi = x["payment_intent"]
        assert len(orders.get(pi, [])) == 1, x["id"]
        (order,) = orders[pi]
        stripe_items = runs["items"][x["id"]]
        item_lines = [ln for ln in order["lines"] if ln["item"] != shipping_item]
        assert [Decimal(ln["quantity"]) for ln in item_lines] == [
            Decimal(ln["quantity"]) for ln in stripe_items
        ]
        shipping = x["total_details"]["amount_shipping"]
        assert len(order["lines"]) == len(stripe_items) + (1 if shipping else 0)
        assert len(invoices.get(pi, [])) == 1, x["id"]
        (invoice,) = invoices[pi]
        assert invoice["sales_order_no"] == order["order_no"]
        assert invoice["customer_id"] == order["customer_id"]
        assert Decimal(invoice["total"]) == cents(x["amount_total"])
        assert Decimal(invoice["tax_amount"]) == cents(x["total_details"]["amount_tax"])
        # The discount is the invoice's discount_amount; its lines are the order's (a sales
        # order has no discount field, and neither document has a discount line).
        assert Decimal(invoice["discount_amount"]) == cents(x["total_details"]["amount_discount"])
        assert invoice["lines"] == order["lines"]
        assert sum(map(extension, invoice["lines"])) - Decimal(
            invoice["discount_amount"]
        ) + Decimal(invoice["tax_amount"]) == Decimal(invoice["total"])
        assert Decimal(invoice["balance_due"]) == 0 and invoice["status"] == "paid"
        assert order["status"] == "invoiced"
        # The charge posts its receipt once, applied to this invoice, and no sale of its own.
        charge = charge_of(runs, pi)
        assert charge["id"] not in invoices, charge["id"]
        (receipt,) = receipts[charge["id"]]
        assert [a["invoice_no"] for a in receipt["apply_to"]] == [invoice["invoice_no"]]


def test_invoice_creation_sessions_post_through_their_billing_invoice(
    runs: dict[str, Any],
) -> None:
    orders = by_reference(runs["sage"]["salesorders"])
    invoices = by_reference(runs["sage"]["invoices"])
    created = [x for x in runs["sessions"] if x["invoice_creation"]["enabled"]]
    assert created
    for x in created:
        assert x["payment_intent"] not in orders and x["payment_intent"] not in invoices
        assert len(invoices.get(x["invoice"], [])) == 1, x["invoice"]


def test_stock_falls_by_exactly_the_quantity_invoiced(runs: dict[str, Any]) -> None:
    """Expected from the Stripe side: each stock product's quantities in completed goods
    sessions and in finalized Billing invoices."""
    items = {i["item"]: i for i in runs["sage"]["items"]}
    sold: Counter[str] = Counter()
    for x in goods(runs):
        for ln in runs["items"][x["id"]]:
            sold[ln["price"]["product"]] += ln["quantity"]
    for ln in runs["invoice_lines"]:
        product = ln["pricing"]["price_details"]["product"]
        sold[product] += ln["quantity"]
    stock_products = [p for p in runs["products_after"].values() if p["type"] == "good"]
    assert stock_products and any(sold[p["id"]] for p in stock_products)
    for p in stock_products:
        code = p["metadata"]["sage_item"]
        assert items[code]["type"] == "stock", code
        before = Decimal(runs["on_hand_before"].get(code, "0"))
        assert Decimal(items[code]["on_hand"]) == before - sold[p["id"]], (code, sold[p["id"]])


def test_every_line_of_every_document_names_an_existing_item(runs: dict[str, Any]) -> None:
    items = {i["item"] for i in runs["sage"]["items"]}
    lines = [
        ln for doc in runs["sage"]["salesorders"] + runs["sage"]["invoices"] for ln in doc["lines"]
    ]
    assert lines and {ln["item"] for ln in lines} <= items
    assert "STRIPE-SHIPPING" in {ln["item"] for ln in lines}
    assert all(
        Decimal(ln["unit_price"]) >= 0 for doc in runs["sage"]["salesorders"] for ln in doc["lines"]
    )


def test_no_dead_letter_and_nothing_left_unposted(runs: dict[str, Any]) -> None:
    con = duckdb.connect(str(runs["env"].db), read_only=True)
    try:
        letters = con.sql("SELECT doc_key, reason FROM ops.dead_letters").fetchall()
        unposted = con.sql(
            # but a foreign-currency invoice awaiting settlement (docs/accounting.md §4)
            "SELECT doc_key, status, last_error FROM sage.outbox WHERE status <> 'posted' "
            "AND coalesce(wait_kind, '') <> 'settlement'"
        ).fetchall()
    finally:
        con.close()
    assert letters == []
    assert unposted == []


def test_exactly_once_on_rerun(runs: dict[str, Any]) -> None:
    assert sum(runs["third"]["load"]["posted"].values()) == 0
    assert runs["counts"] == runs["after_second"]["counts"]
    assert len(runs["sage"]["salesorders"]) == len(runs["after_second"]["sage"]["salesorders"])
    for collection in ("salesorders", "invoices", "cashreceipts"):
        refs = Counter(d["reference"] for d in runs["sage"][collection])
        assert [r for r, n in refs.items() if n > 1] == [], collection


def test_payment_intents_carry_the_sage_numbers(runs: dict[str, Any]) -> None:
    orders = by_reference(runs["sage"]["salesorders"])
    invoices = by_reference(runs["sage"]["invoices"])
    assert runs["intents"]
    for pi, intent in runs["intents"].items():
        assert intent["metadata"]["sage_order_no"] == orders[pi][0]["order_no"], pi
        assert intent["metadata"]["sage_invoice_no"] == invoices[pi][0]["invoice_no"], pi
    # Written once: the rerun wrote nothing back.
    assert not any(k.startswith("sage_") for k in runs["third"].get("write_back", {}))


def test_preview_shows_a_session_beside_its_order(runs: dict[str, Any], tmp_path: Path) -> None:
    x = goods(runs)[0]
    page = tmp_path / "sessions.html"
    out = subprocess.run(
        [
            str(BIN / "stripe-sage"),
            "mapping",
            "preview",
            "--stream",
            "checkout_sessions",
            "--id",
            x["id"],
            "--html",
            str(page),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STAGING_DB": str(runs["env"].db)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"id={x['id']}" in out.stdout
    assert "→ sales_order:" in out.stdout and "→ invoice:" in out.stdout
    assert f'"reference": "{x["payment_intent"]}"' in out.stdout
    for ln in runs["items"][x["id"]]:
        assert f"line item: {ln['quantity']} × {ln['description']}" in out.stdout
    assert x["id"] in page.read_text()
