"""Zero-touch defaults (docs/accounting.md §2): each everyday shape of a Stripe account
plans a document that posts, as pure functions over frames."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from stripe_sage.errors import ConfigurationError
from stripe_sage.mapping import default_mapping_text, load_mapping
from stripe_sage.plan.cash_receipts import plan_charges
from stripe_sage.plan.credit_memos import plan_refunds
from stripe_sage.plan.customers import plan_customers, plan_guest_customer
from stripe_sage.plan.documents import shorten
from stripe_sage.plan.outbox import plan_documents
from stripe_sage.store.staging import Staging
from tests.unit.test_transform import NO_PAYMENTS, bts, charges, payloads, periods, ts

pytestmark = pytest.mark.unit


def customers(*rows: dict[str, Any]) -> pl.DataFrame:
    base: dict[str, Any] = {
        "id": "cus_1",
        "name": "Ada Lovelace",
        "email": None,
        "phone": None,
        "address_line1": None,
        "address_line2": None,
        "city": None,
        "state": None,
        "postal_code": None,
        "country": "us",
        "currency": "USD",
        "sage_customer_id": None,
        "deleted": False,
        "charge_billing_name": None,
        "charge_billing_email": None,
    }
    return pl.DataFrame(
        [{**base, **r} for r in rows], schema={k: pl.String for k in base} | {"deleted": pl.Boolean}
    )


def refunds(*rows: dict[str, Any]) -> pl.DataFrame:
    base: dict[str, Any] = {
        "id": "re_1",
        "created": ts("2026-06-11T00:00:00"),
        "amount": 1000,
        "currency": "USD",
        "charge": "ch_1",
        "status": "succeeded",
        "reason": None,
        "balance_transaction": "txn_r1",
        "failure_balance_transaction": None,
    }
    return pl.DataFrame(
        [{**base, **r} for r in rows],
        schema_overrides={"reason": pl.String, "failure_balance_transaction": pl.String},
    )


def names(docs: pl.DataFrame) -> dict[str, str]:
    return {json.loads(p)["reference"]: json.loads(p)["name"] for p in docs["payload"]}


# -- guest checkout ------------------------------------------------------------------------
def test_guest_charge_posts_to_the_guest_customer_it_depends_on() -> None:
    docs = plan_charges(
        charges({"customer": None}), bts({}), NO_PAYMENTS, load_mapping(), periods()
    )
    assert docs["error"].null_count() == docs.height
    for p in payloads(docs, "invoice") + payloads(docs, "cash_receipt"):
        assert p["customer_id"] == "@xref:customer:guest:GUEST"
    for deps in docs["depends_on"].to_list():
        assert "customer:guest:GUEST" in deps


def test_guest_customer_is_created_or_linked_once_with_the_mapping_name() -> None:
    mapping = load_mapping()
    created = plan_guest_customer(mapping, in_sage=False)
    assert created["doc_key"].to_list() == ["customer:guest:GUEST"]
    body = json.loads(created["payload"][0])
    assert body["customer_id"] == "GUEST" and body["name"] == "Stripe guest checkout"
    assert body["currency"] == "USD" and body["status"] == "active"
    linked = plan_guest_customer(mapping, in_sage=True)
    assert linked["doc_type"].to_list() == ["customer_link"]
    assert linked["doc_key"].to_list() == ["customer_link:guest:GUEST"]
    assert json.loads(linked["payload"][0])["customer_id"] == "GUEST"


def test_guest_customer_id_is_a_setting_and_null_dead_letters_guest_charges() -> None:
    text = default_mapping_text().replace("guest_customer_id: GUEST", "guest_customer_id: WEB01")
    docs = plan_charges(
        charges({"customer": None}), bts({}), NO_PAYMENTS, load_mapping(text=text), periods()
    )
    assert payloads(docs, "cash_receipt")[0]["customer_id"] == "@xref:customer:guest:WEB01"
    off = load_mapping(
        text=default_mapping_text().replace("guest_customer_id: GUEST", "guest_customer_id: null")
    )
    docs = plan_charges(charges({"customer": None}), bts({}), NO_PAYMENTS, off, periods())
    assert all("guest_customer_id" in e for e in docs["error"])
    with pytest.raises(ConfigurationError, match="guest_customer_id"):
        load_mapping(
            text=default_mapping_text().replace(
                "guest_customer_id: GUEST", "guest_customer_id: guest-1"
            )
        )


def test_refund_of_a_guest_charge_credits_the_guest_customer() -> None:
    docs = plan_refunds(
        refunds({}), charges({"customer": None}), bts({"id": "txn_r1", "amount": -1000}),
        load_mapping(), periods(),
    )  # fmt: skip
    [memo] = payloads(docs, "credit_memo")
    assert memo["customer_id"] == "@xref:customer:guest:GUEST" and memo["amount"] == "10.00"
    assert docs["depends_on"].to_list() == [["customer:guest:GUEST"]]
    assert docs["error"].to_list() == [None]


# -- names ---------------------------------------------------------------------------------
def test_nameless_customers_take_the_fallbacks_in_the_mapping_order() -> None:
    docs = plan_customers(
        customers(
            {"id": "cus_a", "name": None, "charge_billing_name": "Grace Hopper", "email": "g@x.io"},
            {"id": "cus_b", "name": "  ", "email": "b@x.io", "charge_billing_email": "c@x.io"},
            {"id": "cus_c", "name": None, "charge_billing_email": "c@x.io"},
            {"id": "cus_d", "name": None},
            {"id": "cus_e", "name": "Named"},
        ),
        load_mapping(),
    )
    assert names(docs) == {
        "cus_a": "Grace Hopper",
        "cus_b": "b@x.io",
        "cus_c": "c@x.io",
        "cus_d": "Stripe cus_d",
        "cus_e": "Named",
    }
    assert docs["error"].null_count() == docs.height


def test_fallback_order_and_columns_come_from_the_mapping() -> None:
    text = default_mapping_text().replace(
        'fallbacks: [charge_billing_name, email, charge_billing_email, "Stripe {id}"]',
        'fallbacks: [email, "Customer {id}"]',
    )
    docs = plan_customers(
        customers({"id": "cus_a", "name": None, "charge_billing_name": "Grace", "email": "a@x"}),
        load_mapping(text=text),
    )
    assert names(docs) == {"cus_a": "a@x"}
    bad = default_mapping_text().replace("charge_billing_email,", "billing_nickname,")
    with pytest.raises(
        ConfigurationError,
        match=r"line \d+: customers.fields.name: unknown field 'billing_nickname'",
    ):
        load_mapping(text=bad)


def test_long_names_are_shortened_at_a_word_boundary() -> None:
    frame = pl.DataFrame(
        {
            "n": [
                "Internationale Handelsgesellschaft für Maschinenbau und Anlagen GmbH",
                "Acme, Widgets & Sons International Holdings",
                "X" * 45,
                "Exactly forty characters long, ok fine!!",
            ]
        }
    )
    out = frame.select(shorten(pl.col("n"), 40))["n"].to_list()
    assert out[0] == "Internationale Handelsgesellschaft für"
    assert out[1] == "Acme, Widgets & Sons International"
    assert out[2] == "X" * 40
    assert out[3] == "Exactly forty characters long, ok fine!!"
    assert all(len(s) <= 40 for s in out)
    docs = plan_customers(customers({"name": frame["n"][0]}), load_mapping())
    assert names(docs) == {"cus_1": out[0]} and docs["error"].to_list() == [None]


def test_deleted_customer_is_rebuilt_from_the_charge_and_made_inactive() -> None:
    # Stripe's stub: only id and deleted; the charge's billing details name it.
    docs = plan_customers(
        customers({"name": None, "country": None, "deleted": True, "charge_billing_name": "Ann"}),
        load_mapping(),
    )
    [body] = [json.loads(p) for p in docs["payload"]]
    assert body["name"] == "Ann" and body["status"] == "inactive"
    assert docs["error"].to_list() == [None]


# -- no money before it exists -------------------------------------------------------------
def test_uncaptured_or_released_authorizations_plan_nothing() -> None:
    docs = plan_charges(
        charges(
            {"id": "ch_auth", "captured": False, "balance_transaction": None},
            {"id": "ch_ok", "captured": True, "balance_transaction": "txn_1"},
        ),
        bts({}),
        NO_PAYMENTS,
        load_mapping(),
        periods(),
    )
    assert set(docs["stripe_id"]) == {"ch_ok"}
    # releasing an authorization "refunds" it without money: no credit memo either
    docs = plan_refunds(
        refunds({"balance_transaction": "txn_r1"}),
        charges({"captured": False, "balance_transaction": None}).cast(
            {"balance_transaction": pl.String}
        ),
        bts({"id": "txn_r1", "amount": -1000}),
        load_mapping(),
        periods(),
    )
    assert docs.is_empty()


def test_a_null_required_amount_is_a_planning_error_naming_record_and_field() -> None:
    # captured, succeeded, but Stripe gave no balance transaction: nothing with a null amount
    # may reach Sage, whatever else decides the document's state.
    no_bt = charges({"id": "ch_9", "balance_transaction": None})
    no_bt = no_bt.cast({"balance_transaction": pl.String})
    docs = plan_charges(no_bt, bts({}), NO_PAYMENTS, load_mapping(), periods())
    assert docs.height == 2
    for row in docs.iter_rows(named=True):
        assert row["error"] is not None
        assert "ch_9" in row["error"]
        assert row["error"].startswith("waiting:") or "would be null" in row["error"]


# -- unknown ERP orders --------------------------------------------------------------------
def test_unknown_erp_order_posts_the_receipt_on_account_and_flags_it() -> None:
    rows = charges(
        {"id": "ch_known", "erp_order_id": "SO0000042", "balance_transaction": "txn_1"},
        {"id": "ch_gone", "erp_order_id": "SO0009999", "balance_transaction": "txn_2"},
    )
    b = bts({"id": "txn_1"}, {"id": "txn_2", "amount": 2500})
    docs = plan_charges(rows, b, NO_PAYMENTS, load_mapping(), periods(), {"SO0000042"})
    assert docs["error"].null_count() == docs.height
    gone = docs.filter(pl.col("stripe_id") == "ch_gone")
    assert gone["doc_type"].to_list() == ["cash_receipt"]  # no invoice against a missing order
    receipt = json.loads(gone["payload"][0])
    assert receipt["apply_to"] == [] and receipt["amount"] == "25.00"
    assert receipt["memo"].startswith("UNLINKED SO SO0009999")
    assert "SO0009999" in gone["flag"][0]
    assert gone["depends_on"].to_list() == [["customer:cus_1"]]
    known = docs.filter(pl.col("stripe_id") == "ch_known")
    assert sorted(known["doc_type"]) == ["cash_receipt", "invoice"]
    assert known["flag"].null_count() == 2
    # not checked (no Sage lookup given): every order is taken as known
    docs = plan_charges(rows, b, NO_PAYMENTS, load_mapping(), periods())
    assert docs.filter(pl.col("doc_type") == "invoice").height == 2


def test_unknown_erp_order_reject_policy_is_a_planning_error() -> None:
    text = default_mapping_text().replace(
        "unknown_erp_order: on_account", "unknown_erp_order: reject"
    )
    docs = plan_charges(
        charges({"erp_order_id": "SO1"}), bts({}), NO_PAYMENTS, load_mapping(text=text),
        periods(), set(),
    )  # fmt: skip
    assert all("SO1: Sage has no such sales order" in e for e in docs["error"])


# -- old files and old mappings ------------------------------------------------------------
OLD_MAPPING = default_mapping_text()


def test_a_mapping_file_without_the_new_settings_still_loads() -> None:
    old = (
        OLD_MAPPING.replace("  guest_customer_id: GUEST\n", "  guest_customer_id: null\n")
        .replace("  guest_customer_name: Stripe guest checkout\n", "")
        .replace("  unknown_erp_order: on_account\n", "")
    )
    m = load_mapping(text=old)
    assert m.charges.guest_customer_id is None and m.charges.unknown_erp_order == "on_account"
    minimal = old.replace("  guest_customer_id: null\n", "")
    assert load_mapping(text=minimal).charges.guest_customer_id == "GUEST"


def test_an_old_duckdb_file_gains_the_new_charge_columns_filled_from_raw(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with Staging(path) as st:
        st.upsert_raw(
            "charges",
            [{"id": "ch_old", "created": 1_780_000_000, "captured": False,
              "billing_details": {"name": "Old Name", "email": "o@x.io"}}],
            source="list", run_id="r0",
        )  # fmt: skip
        # Make it look like a file from before the columns existed.
        for col in ("captured", "billing_name", "billing_email"):
            st.con.execute(f"ALTER TABLE staging.charges DROP COLUMN {col}")
    with Staging(path) as st:
        row = st.frame("SELECT id, captured, billing_name, billing_email FROM staging.charges")
        assert row.to_dicts() == [
            {
                "id": "ch_old",
                "captured": False,
                "billing_name": "Old Name",
                "billing_email": "o@x.io",
            }
        ]
        # rows are written by name, so new rows land in the right columns
        st.upsert_raw(
            "charges", [{"id": "ch_new", "created": 1_780_000_100, "captured": True, "amount": 5}],
            source="list", run_id="r1",
        )  # fmt: skip
        new = st.frame("SELECT amount, captured FROM staging.charges WHERE id = 'ch_new'")
        assert new.to_dicts() == [{"amount": 5, "captured": True}]


def test_planning_plans_the_guest_customer_once_and_names_from_charges(tmp_path: Path) -> None:
    with Staging(tmp_path / "s.duckdb") as st:
        st.upsert_raw(
            "customers", [{"id": "cus_nameless", "created": 1_780_000_000, "name": None}],
            source="list", run_id="r",
        )  # fmt: skip
        objs = [
            {"id": f"ch_g{i}", "created": 1_780_000_000 + i, "amount": 100, "currency": "usd",
             "customer": None, "status": "succeeded", "paid": True, "captured": True,
             "balance_transaction": f"txn_g{i}"}
            for i in range(3)
        ] + [
            {"id": "ch_n", "created": 1_780_000_010, "amount": 100, "currency": "usd",
             "customer": "cus_nameless", "status": "succeeded", "paid": True,
             "captured": True, "balance_transaction": "txn_n",
             "billing_details": {"name": "Card Holder"}},
        ]  # fmt: skip
        st.upsert_raw("charges", objs, source="list", run_id="r")
        st.upsert_raw(
            "balance_transactions",
            [{"id": o["balance_transaction"], "created": o["created"], "amount": 100,
              "currency": "usd", "fee": 0, "net": 100, "type": "charge"} for o in objs],
            source="list", run_id="r",
        )  # fmt: skip
        docs = plan_documents(st, load_mapping(), [])
        assert docs.filter(pl.col("doc_key").str.contains("guest")).height == 1
        [body] = payloads(docs.filter(pl.col("stripe_id") == "cus_nameless"), "customer")
        assert body["name"] == "Card Holder"
        assert docs.filter(pl.col("doc_type") == "cash_receipt").height == 4
        assert docs["error"].null_count() == docs.height
        # Once the outbox holds it (created), a later run neither creates nor links it again,
        # although Sage now has the id.
        st.con.execute(
            "INSERT INTO sage.outbox (doc_key, doc_type, stripe_id, status) "
            "VALUES ('customer:guest:GUEST', 'customer', 'guest:GUEST', 'posted')"
        )
        again = plan_documents(st, load_mapping(), [], customer_exists=lambda cid: True)
        assert again.filter(pl.col("doc_key").str.contains("guest")).is_empty()


def test_without_fallbacks_a_nameless_customer_is_a_planning_error_not_a_post() -> None:
    legacy = default_mapping_text().replace(
        'fallbacks: [charge_billing_name, email, charge_billing_email, "Stripe {id}"]',
        "fallbacks: []",
    )
    docs = plan_customers(
        customers(
            {"id": "cus_new", "name": None},
            {"id": "cus_linked", "name": None, "sage_customer_id": "E01"},
        ),
        load_mapping(text=legacy),
    )
    errors = dict(zip(docs["doc_key"], docs["error"], strict=True))
    assert errors["customer:cus_new"] == (
        "customer for cus_new: required field name would be null "
        "(its Stripe source has no value yet); not posted"
    )
    assert errors["customer_link:cus_linked"] is None  # a link sends Sage no name


def test_preview_shows_the_guest_customer_flags_and_uncaptured_charges(tmp_path: Path) -> None:
    from stripe_sage.plan.preview import preview, render_html, render_terminal

    with Staging(tmp_path / "p.duckdb") as st:
        base = {"amount": 100, "currency": "usd", "status": "succeeded", "paid": True}
        objs = [
            {**base, "id": "ch_guest", "created": 1_780_000_001, "customer": None,
             "captured": True, "balance_transaction": "txn_1"},
            {**base, "id": "ch_erp", "created": 1_780_000_002, "customer": "cus_1",
             "captured": True, "balance_transaction": "txn_2",
             "metadata": {"erp_order_id": "SO404"}},
            {**base, "id": "ch_auth", "created": 1_780_000_003, "customer": "cus_1",
             "captured": False, "balance_transaction": None},
        ]  # fmt: skip
        st.upsert_raw("charges", objs, source="list", run_id="r")
        st.upsert_raw(
            "balance_transactions",
            [{"id": f"txn_{i}", "created": 1_780_000_000, "amount": 100, "currency": "usd",
              "fee": 0, "net": 100, "type": "charge"} for i in (1, 2)],
            source="list", run_id="r",
        )  # fmt: skip
        items = preview(st, load_mapping(), "charges", 10, known_orders=set())
    text = render_terminal(items)
    assert "guest checkout: posted to the mapping's guest customer" in text
    assert '"customer_id": "GUEST"' in text and "Stripe guest checkout" in text
    assert "⚑ unlinked: Sage has no sales order SO404" in text
    assert "not captured: nothing is posted until it is" in text
    auth = next(i for i in items if i["stripe"]["id"] == "ch_auth")
    assert auth["documents"] == []
    assert "unlinked: Sage has no sales order SO404" in render_html(items, "charges", "default")
