"""Stripe products → Sage items: item codes and the planning of items and the lines naming them."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import polars as pl
import pytest

from stripe_sage.mapping import default_mapping_text, load_mapping
from stripe_sage.plan.cash_receipts import plan_charges
from stripe_sage.plan.invoices import plan_invoices
from stripe_sage.plan.items import plan_default_item, plan_items, sage_item_code
from tests.unit.test_transform import NO_PAYMENTS, bts, charges, periods

pytestmark = pytest.mark.unit
CODE = re.compile(r"^[A-Z0-9_-]{1,20}$")


# -- codes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "Team seat",
        "Annual maintenance and priority support for the enterprise deployment tier",
        "Zoë Ångström — Øvergård",
        "山田 太郎",
        "",
        None,
        "---",
        "A" * 200,
        "api overage, per 1,000 calls",
    ],
)
def test_item_codes_keep_the_charset_and_length(name: str | None) -> None:
    code = sage_item_code("prod_QXg1hqf4jFNsqG", name)
    assert CODE.match(code), code
    assert code == sage_item_code("prod_QXg1hqf4jFNsqG", name)  # deterministic
    assert "--" not in code and not code.startswith("-")


def test_item_codes_read_like_the_product() -> None:
    assert sage_item_code("prod_seat", "Team seat").startswith("TEAM-SEAT-")
    assert sage_item_code("prod_x", "山田 太郎").startswith("ITEM-")


def test_item_codes_never_collide() -> None:
    # Same name, many products: all distinct; salted candidates differ from the first.
    codes = {sage_item_code(f"prod_{i:06d}", "T-shirt") for i in range(20_000)}
    assert len(codes) == 20_000
    salted = {sage_item_code("prod_1", "T-shirt", salt) for salt in range(5)}
    assert len(salted) == 5


# -- planning ------------------------------------------------------------------------------
def products(*rows: dict[str, Any]) -> pl.DataFrame:
    base = {
        "id": "prod_1",
        "name": "Team seat",
        "product_type": "service",
        "sage_item": None,
        "active": True,
    }
    return pl.DataFrame([{**base, **r} for r in rows])


def docs_by_key(docs: pl.DataFrame) -> dict[str, dict[str, Any]]:
    return {
        k: {"doc_type": t, "payload": json.loads(p), "error": e, "phase": ph}
        for k, t, p, e, ph in docs.select(
            "doc_key", "doc_type", "payload", "error", "phase"
        ).iter_rows()
    }


def test_products_become_items_or_links() -> None:
    docs = plan_items(
        products(
            {"id": "prod_1"},
            {"id": "prod_2", "sage_item": "PRO-MONTHLY"},
            {"id": "prod_3", "name": "Kit", "product_type": "good"},
            {"id": "prod_4", "name": "X" * 70},
            {"id": "prod_5", "sage_item": "not a code"},
        ),
        load_mapping(),
    )
    got = docs_by_key(docs)
    assert got["item:prod_1"]["doc_type"] == "item"
    assert got["item:prod_1"]["payload"] == {
        "item": sage_item_code("prod_1", "Team seat"),
        "description": "Team seat",
        "type": "service",
        "reference": "prod_1",
        "_matched_by": "created",
    }
    assert got["item:prod_1"]["phase"] == 0  # before every document
    assert got["item_link:prod_2"]["payload"]["item"] == "PRO-MONTHLY"
    assert got["item:prod_3"]["payload"]["type"] == "stock"  # default mapping: goods are stock
    assert got["item:prod_4"]["payload"]["description"] == "X" * 60
    assert "prod_5" not in {k.split(":")[1] for k, v in got.items() if v["error"] is None}
    assert "not a Sage item code" in got["item_link:prod_5"]["error"]


def test_item_type_is_a_mapping_setting() -> None:
    text = default_mapping_text().replace(
        "type: {from: product_type, value_map: {good: stock, service: service}, default: service}",
        "type: {const: stock}",
    )
    docs = plan_items(products({}), load_mapping(text=text))
    assert json.loads(docs["payload"][0])["type"] == "stock"
    bad = default_mapping_text().replace(
        "type: {from: product_type, value_map: {good: stock, service: service}, default: service}",
        "type: {const: kit}",
    )
    docs = plan_items(products({}), load_mapping(text=bad))
    assert "stock or service" in docs["error"][0]


def test_default_item_is_planned_under_its_code() -> None:
    [row] = plan_default_item(load_mapping()).iter_rows(named=True)
    assert row["doc_key"] == "item:default:STRIPE-SALE" and row["collection"] == "items"
    assert json.loads(row["payload"]) == {
        "item": "STRIPE-SALE",
        "description": "Stripe sale",
        "type": "service",
    }


def test_charge_lines_name_the_default_item_and_wait_for_it() -> None:
    docs = plan_charges(charges({}), bts({}), NO_PAYMENTS, load_mapping(), periods())
    invoice = docs.filter(pl.col("doc_type") == "invoice")
    assert json.loads(invoice["payload"][0])["lines"][0]["item"] == "STRIPE-SALE"
    assert "item:default:STRIPE-SALE" in invoice["depends_on"][0].to_list()


def invoice_rows() -> tuple[pl.DataFrame, pl.DataFrame]:
    inv = pl.DataFrame(
        {
            "id": ["in_1"],
            "customer": ["cus_1"],
            "status": ["paid"],
            "currency": ["USD"],
            "tax": [0],
            "total": [3000],
            "finalized_at": [None],
            "created": [dt.datetime(2026, 6, 10, 12, tzinfo=dt.UTC)],
        },
        schema_overrides={"finalized_at": pl.Datetime("us", "UTC")},
    )
    lines = pl.DataFrame(
        {
            "id": ["il_1", "il_2", "il_3"],
            "invoice": ["in_1"] * 3,
            "position": [0, 1, 2],
            "amount": [1000, 1500, 500],
            "currency": ["USD"] * 3,
            "description": ["a", "b", "c"],
            "quantity": [1, 3, 1],
            "unit_amount": [1000, 500, 500],
            "product": ["prod_a", "prod_b", None],
            "product_staged": [True, True, None],
        }
    )
    return inv, lines


def test_billing_lines_name_their_products_items() -> None:
    inv, lines = invoice_rows()
    docs = plan_invoices(inv, lines, load_mapping(), periods())
    payload = json.loads(docs["payload"][0])
    assert [ln["item"] for ln in payload["lines"]] == [
        "@xref:item:prod_a",
        "@xref:item:prod_b",
        "STRIPE-SALE",
    ]
    assert docs["depends_on"][0].to_list() == [
        "customer:cus_1",
        "item:prod_a",
        "item:prod_b",
        "item:default:STRIPE-SALE",
    ]
    assert docs["error"][0] is None


def test_a_line_whose_product_is_not_staged_waits() -> None:
    inv, lines = invoice_rows()
    lines = lines.with_columns(pl.Series("product_staged", [True, False, None]))
    docs = plan_invoices(inv, lines, load_mapping(), periods())
    assert docs["error"][0] == "waiting: product(s) prod_b of the lines are not staged"
