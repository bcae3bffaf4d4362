"""Checkout orders, the pure part (plan/orders.py): a session's lines, shipping, discount and
tax become a sales order and its invoice whose total is Stripe's to the cent; which charges
are linked to a session, which wait, and which post on their own."""

from __future__ import annotations

import datetime as dt
import json
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import polars as pl
import pytest

from stripe_sage.mapping import load_mapping
from stripe_sage.plan.cash_receipts import plan_charges
from stripe_sage.plan.orders import (
    OPEN_SESSION_SCHEMA,
    SESSION_LINK_SCHEMA,
    link_charges_to_sessions,
    plan_orders,
)

UTC = dt.UTC
T0 = dt.datetime(2026, 6, 1, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
def mapping() -> Any:
    return load_mapping()


def session(**over: Any) -> dict[str, Any]:
    row = {
        "id": "cs_test_a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6",
        "created": T0,
        "status": "complete",
        "payment_status": "paid",
        "mode": "payment",
        "payment_intent": "pi_0001",
        "customer": "cus_1",
        "currency": "USD",
        "amount_subtotal": 0,
        "amount_total": 0,
        "amount_discount": 0,
        "amount_shipping": 0,
        "shipping_tax": 0,
        "amount_tax": 0,
        "invoice": None,
        "invoice_creation": False,
    }
    return row | over


def line(session_id: str, position: int, **over: Any) -> dict[str, Any]:
    row = {
        "id": f"li_{position}",
        "session": session_id,
        "position": position,
        "description": f"Item {position}",
        "quantity": 1,
        "currency": "USD",
        "price": "price_x",
        "product": "prod_kit",
        "unit_amount": 0,
        "amount_subtotal": 0,
        "amount_discount": 0,
        "amount_tax": 0,
        "amount_total": 0,
        "tax_inclusive": True,
        "product_staged": True,
    }
    return row | over


def an_order() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Two items (one 3 × 7.99 with inclusive tax), shipping 4.99, 10% discount."""
    cs = session()["id"]
    items = [
        line(cs, 0, quantity=3, unit_amount=799, amount_subtotal=2397, product="prod_mug"),
        line(cs, 1, quantity=1, unit_amount=1500, amount_subtotal=1500, product="prod_kit"),
    ]
    discount = 389
    shares = [discount * it["amount_subtotal"] // 3897 for it in items]
    shares[-1] += discount - sum(shares)
    for it, off in zip(items, shares, strict=True):
        it["amount_discount"] = off
        it["amount_tax"] = round((it["amount_subtotal"] - off) * 8.25 / 108.25)
        it["amount_total"] = it["amount_subtotal"] - off
    shipping = 499
    total = sum(it["amount_total"] for it in items) + shipping
    row = session(
        amount_subtotal=3897,
        amount_total=total,
        amount_discount=discount,
        amount_shipping=shipping,
        amount_tax=sum(it["amount_tax"] for it in items),
    )
    return row, items


def docs_of(sessions: list[dict[str, Any]], items: list[dict[str, Any]], mapping: Any) -> dict:
    out = plan_orders(pl.DataFrame(sessions), pl.DataFrame(items), mapping)
    return {
        r["doc_key"]: r | {"payload": json.loads(r["payload"])} for r in out.iter_rows(named=True)
    }


def extension(ln: dict[str, Any]) -> Decimal:
    value = Decimal(ln["quantity"]) * Decimal(ln["unit_price"])
    return value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def test_a_goods_session_becomes_an_order_and_its_invoice_to_the_cent(mapping: Any) -> None:
    row, items = an_order()
    docs = docs_of([row], items, mapping)
    order = docs[f"sales_order:{row['id']}"]
    invoice = docs[f"invoice:{row['id']}"]
    assert order["error"] is None and invoice["error"] is None
    o, i = order["payload"], invoice["payload"]
    # Referenced by the payment intent (the session id is longer than Sage's 30).
    assert len(row["id"]) > 30 and o["reference"] == i["reference"] == row["payment_intent"]
    assert i["sales_order_no"] == f"@xref:sales_order:{row['id']}"
    # One line per Stripe line item, Stripe's quantities, then shipping; no negative line.
    assert [ln["quantity"] for ln in o["lines"]] == [str(it["quantity"]) for it in items] + ["1"]
    assert o["lines"][-1]["item"] == mapping.items.shipping_item
    assert all(Decimal(ln["unit_price"]) >= 0 for ln in o["lines"])
    assert o["lines"][0]["item"] == "@xref:item:prod_mug"
    # Each item line is net of its inclusive tax, exactly.
    for ln, it in zip(o["lines"], items, strict=False):
        assert extension(ln) == Decimal(it["amount_subtotal"] - it["amount_tax"]) / 100
    # The invoice: the order's lines, the session's discount as its discount_amount (no
    # discount line), the tax; lines - discount + tax = Stripe's total.
    assert i["lines"] == o["lines"]
    assert Decimal(i["discount_amount"]) == Decimal(row["amount_discount"]) / 100 > 0
    assert Decimal(i["tax_amount"]) == Decimal(row["amount_tax"]) / 100
    assert sum(map(extension, i["lines"])) - Decimal(i["discount_amount"]) + Decimal(
        i["tax_amount"]
    ) == Decimal(i["total"])
    assert Decimal(i["total"]) == Decimal(row["amount_total"]) / 100
    # Posted after the customer, the items and the order.
    assert set(order["depends_on"]) == {
        "customer:cus_1",
        "item:prod_mug",
        "item:prod_kit",
        f"item:default:{mapping.items.shipping_item}",
    }
    assert set(invoice["depends_on"]) == set(order["depends_on"]) | {f"sales_order:{row['id']}"}


def test_sessions_that_are_not_goods_orders_plan_nothing(mapping: Any) -> None:
    _, items = an_order()
    for other in (
        session(id="cs_inv", invoice_creation=True, invoice="in_1"),
        session(id="cs_open", status="open", payment_intent=None),
        session(id="cs_sub", mode="subscription"),
    ):
        assert docs_of([other], [{**it, "session": other["id"]} for it in items], mapping) == {}


def test_an_order_waits_for_its_line_items_and_products(mapping: Any) -> None:
    row, items = an_order()
    docs = docs_of([row, session(id="cs_bare", payment_intent="pi_2")], items, mapping)
    assert docs["sales_order:cs_bare"]["error"].startswith("waiting: the session's line items")
    unstaged = [{**items[0], "product_staged": False}, items[1]]
    docs = docs_of([row], unstaged, mapping)
    assert docs[f"invoice:{row['id']}"]["error"].startswith("waiting: product(s) prod_mug")


def test_an_order_whose_amounts_do_not_add_up_is_refused_with_the_numbers(mapping: Any) -> None:
    row, items = an_order()
    docs = docs_of([{**row, "amount_total": row["amount_total"] + 1}], items, mapping)
    error = docs[f"invoice:{row['id']}"]["error"]
    assert "differ from the session total" in error and str(row["amount_total"] + 1) in error


def charges_frame(*rows: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame(
        list(rows),
        schema={"id": pl.String, "payment_intent": pl.String, "created": pl.Datetime("us", "UTC")},
    )


def test_which_charges_wait_for_a_session(mapping: Any) -> None:
    charges = charges_frame(
        {"id": "ch_order", "payment_intent": "pi_order", "created": T0},
        {"id": "ch_inv", "payment_intent": "pi_inv", "created": T0},
        {"id": "ch_open", "payment_intent": "pi_open", "created": T0},
        {"id": "ch_asked", "payment_intent": "pi_asked", "created": T0},
        {"id": "ch_listed", "payment_intent": "pi_listed", "created": T0},
        {"id": "ch_late", "payment_intent": "pi_late", "created": T0 + dt.timedelta(hours=2)},
        {"id": "ch_nopi", "payment_intent": None, "created": T0 + dt.timedelta(hours=2)},
    )
    sessions = pl.DataFrame(
        [
            ("pi_order", "cs_order", "complete", True),
            ("pi_inv", "cs_inv", "complete", False),
            ("pi_open", "cs_open", "open", True),
        ],
        schema=SESSION_LINK_SCHEMA,
        orient="row",
    )
    looked_up = pl.DataFrame({"payment_intent": ["pi_asked"]})
    read_until = T0 + dt.timedelta(hours=1)
    out = link_charges_to_sessions(charges, sessions, looked_up, read_until, mapping)
    got = {r["id"]: (r["order_session"], r["session_wait"]) for r in out.iter_rows(named=True)}
    assert got["ch_order"] == ("cs_order", None)
    assert got["ch_inv"] == (None, None)  # posts through its Billing invoice
    assert got["ch_open"][0] is None and "cs_open" in got["ch_open"][1]
    assert got["ch_asked"] == (None, None)  # Stripe said no session names it
    assert got["ch_listed"] == (None, None)  # sessions listed past the charge: none names it
    assert got["ch_late"][0] is None and got["ch_late"][1].startswith("waiting: ")
    assert "pi_late" in got["ch_late"][1]
    assert got["ch_nopi"] == (None, None)
    # Sessions never listed at all: every charge with a payment intent waits.
    out = link_charges_to_sessions(charges, sessions.clear(), looked_up.clear(), None, mapping)
    assert out.filter(pl.col("payment_intent").is_not_null())["session_wait"].null_count() == 0
    # Orders turned off: nothing waits, nothing links.
    off = mapping.model_copy(
        update={"orders": mapping.orders.model_copy(update={"enabled": False})}
    )
    out = link_charges_to_sessions(charges, sessions, looked_up, None, off)
    assert out["order_session"].null_count() == out["session_wait"].null_count() == out.height


def test_a_charge_made_while_a_session_was_open_waits_until_its_completion_could_be_read(
    mapping: Any,
) -> None:
    """The race of docs/accounting.md §5: sessions were listed after the charge, but one
    was still open (no payment intent yet) and completes moments later. The charge waits
    until sessions are read the grace after it; a charge with no session open in the day
    before it, or made long after sessions were read past it, posts at once."""
    minute = dt.timedelta(minutes=1)
    charges = charges_frame(
        {"id": "ch_racing", "payment_intent": "pi_racing", "created": T0},
        {"id": "ch_alone", "payment_intent": "pi_alone", "created": T0 + dt.timedelta(days=3)},
        {"id": "ch_settled", "payment_intent": "pi_settled", "created": T0 - 30 * minute},
        {"id": "ch_asked", "payment_intent": "pi_asked", "created": T0},
    )
    open_sessions = pl.DataFrame(
        [("cs_open_1", T0 - 5 * minute), ("cs_open_0", T0 - 40 * minute)],
        schema=OPEN_SESSION_SCHEMA,
        orient="row",
    )
    no_sessions = pl.DataFrame(schema=SESSION_LINK_SCHEMA)
    looked_up = pl.DataFrame({"payment_intent": ["pi_asked"]})
    grace = mapping.orders.completion_grace_seconds
    assert grace > 60

    def waits(read_until: dt.datetime, over: Any = mapping) -> dict[str, str | None]:
        out = link_charges_to_sessions(
            charges, no_sessions, looked_up, read_until, over, open_sessions
        )
        assert out["order_session"].null_count() == out.height
        assert out["id"].to_list() == charges["id"].to_list()  # order kept
        return dict(zip(out["id"], out["session_wait"], strict=True))

    # Read one second after the racing charge: its session may complete with it.
    early = waits(T0 + dt.timedelta(seconds=1))
    assert early["ch_racing"] is not None and "cs_open_1" in early["ch_racing"]
    assert "pi_racing" in early["ch_racing"] and early["ch_racing"].startswith("waiting: ")
    assert early["ch_settled"] is None  # read 30 minutes after it: past the grace
    assert early["ch_asked"] is None  # Stripe was asked: no session names it
    assert early["ch_alone"] is not None and "not read up to" in early["ch_alone"]
    # Read the grace after it: the session's completion would have been read with it.
    late = waits(T0 + dt.timedelta(seconds=grace))
    assert late["ch_racing"] is None
    # With no grace the old rule: read up to the charge is enough.
    none = mapping.model_copy(
        update={"orders": mapping.orders.model_copy(update={"completion_grace_seconds": 0})}
    )
    assert waits(T0 + dt.timedelta(seconds=1), none)["ch_racing"] is None
    # A session opened more than a day before the charge had expired: it is not waited for.
    stale = charges.with_columns(pl.lit(T0 + dt.timedelta(days=1, hours=1)).alias("created"))
    out = link_charges_to_sessions(
        stale, no_sessions, looked_up, T0 + dt.timedelta(days=2), mapping, open_sessions
    )
    assert out["session_wait"].null_count() == out.height


def a_charge(**over: Any) -> dict[str, Any]:
    row = {
        "id": "ch_1",
        "created": T0,
        "amount": 4997,
        "amount_captured": 4997,
        "amount_refunded": 0,
        "currency": "USD",
        "customer": "cus_1",
        "status": "succeeded",
        "paid": True,
        "captured": True,
        "balance_transaction": "txn_1",
        "payment_intent": "pi_0001",
        "description": "Order payment",
        "erp_order_id": None,
        "card_brand": "visa",
        "billing_name": None,
        "billing_email": None,
        "order_session": None,
        "session_wait": None,
    }
    return row | over


def test_a_charge_that_paid_an_order_posts_only_its_receipt_applied_to_the_order(
    mapping: Any,
) -> None:
    bts = pl.DataFrame(
        {
            "id": ["txn_1"],
            "amount": [4997],
            "currency": ["USD"],
            "exchange_rate": [None],
        },
        schema_overrides={"exchange_rate": pl.Float64},
    )
    payments = pl.DataFrame(schema={"charge": pl.String, "invoice": pl.String, "status": pl.String})
    linked = plan_charges(pl.DataFrame([a_charge(order_session="cs_1")]), bts, payments, mapping)
    assert linked["doc_type"].to_list() == ["cash_receipt"]
    receipt = json.loads(linked["payload"][0])
    assert receipt["apply_to"] == [{"invoice_no": "@xref:invoice:cs_1", "amount": "49.97"}]
    assert "invoice:cs_1" in linked["depends_on"][0]
    waiting = plan_charges(
        pl.DataFrame([a_charge(session_wait="waiting: checkout sessions are not read")]),
        bts,
        payments,
        mapping,
    )
    assert waiting["doc_type"].to_list() == ["cash_receipt"]
    assert waiting["error"][0].startswith("waiting: checkout sessions")
    plain = plan_charges(pl.DataFrame([a_charge()]), bts, payments, mapping)
    assert sorted(plain["doc_type"].to_list()) == ["cash_receipt", "invoice"]
