"""Zero touch (issue 16, docs/accounting.md "Zero-touch defaults"): on the Stripe sandbox's
default business, which holds every everyday shape of a real account (guest checkouts and
their refunds, nameless customers, names over Sage's 40 characters, customers deleted in
Stripe with charges, authorizations never captured, ERP orders Sage never got), the first run
of the main flow posts every document, and none twice, without a single dead letter.

What Stripe implies is read from the Stripe sandbox over plain HTTP; what Sage holds is read
back from the Sage sandbox over plain HTTP; neither from the pipeline's own tables, except the
flags it raises for a person (``ops.flags``) and its dead letters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import duckdb
import pytest

from stripe_sage.mapping import load_mapping
from tests.helpers.business import Env, fx_refund_shares, sage_all, stripe_all, use_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def first_run(
    default_business: tuple[Env, dict[str, Any]],
) -> Iterator[tuple[Env, dict[str, Any], dict[str, list[dict[str, Any]]]]]:
    env, result = default_business  # after its first run (tests/e2e/conftest.py)
    with pytest.MonkeyPatch.context() as mp:
        use_env(env, mp)
        with env.stripe() as s:
            stripe = {
                "charges": stripe_all(s, "/v1/charges"),
                "refunds": stripe_all(s, "/v1/refunds"),
                "credit_notes": stripe_all(s, "/v1/credit_notes"),
                "customers": stripe_all(s, "/v1/customers"),
                "deleted": [
                    e["data"]["object"]
                    for e in stripe_all(s, "/v1/events", type="customer.deleted")
                ],
            }
        with env.sage() as c:
            sage = {
                name: sage_all(c, name)
                for name in ("customers", "invoices", "cashreceipts", "creditmemos", "salesorders")
            }
        yield env, result, {**stripe, **{f"sage_{k}": v for k, v in sage.items()}}


def by_reference(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc.get("reference") or "", []).append(doc)
    return out


def test_the_default_business_holds_every_everyday_shape(first_run: Any) -> None:
    """The premise: without these shapes the rest proves nothing."""
    _, _, d = first_run
    charges = d["charges"]
    assert [c for c in charges if c["customer"] is None and c["status"] == "succeeded"]
    guest_ids = {c["id"] for c in charges if c["customer"] is None}
    assert [r for r in d["refunds"] if r["charge"] in guest_ids]
    nameless = [c for c in d["customers"] if not c["name"]]
    assert any(c["email"] for c in nameless) and any(not c["email"] for c in nameless)
    assert [c for c in d["customers"] if len(c["name"] or "") > 40 and " " not in c["name"]]
    assert [c for c in d["customers"] if len(c["name"] or "") > 40 and " " in c["name"]]
    deleted = {c["id"] for c in d["deleted"]}
    assert deleted and [c for c in charges if c["customer"] in deleted]
    uncaptured = [c for c in charges if c["status"] == "succeeded" and not c["captured"]]
    assert {c["refunded"] for c in uncaptured} == {True, False}  # open, and expired/released
    orders = {o["order_no"] for o in d["sage_salesorders"]}
    named = {c["metadata"]["erp_order_id"] for c in charges if "erp_order_id" in c["metadata"]}
    assert named - orders and named & orders


def test_first_run_has_no_dead_letter_and_completes(first_run: Any) -> None:
    env, result, _ = first_run
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        letters = con.sql("SELECT doc_key, reason FROM ops.dead_letters").fetchall()
        # A foreign-currency invoice whose payment failed awaits settlement: a wait with a
        # reason and a due date (docs/accounting.md §4), the one thing allowed unposted.
        unposted = con.sql(
            "SELECT doc_key, status FROM sage.outbox WHERE status <> 'posted' "
            "AND coalesce(wait_kind, '') <> 'settlement'"
        ).fetchall()
    finally:
        con.close()
    assert letters == []
    # An authorization never captured plans nothing (no outbox row): nothing is left unposted.
    assert unposted == []
    assert result["status"] == "completed", result["status"]


def test_every_captured_charge_has_one_receipt_and_uncaptured_none(first_run: Any) -> None:
    _, _, d = first_run
    receipts = by_reference(d["sage_cashreceipts"])
    invoices = by_reference(d["sage_invoices"])
    memos = by_reference(d["sage_creditmemos"])
    captured = [c for c in d["charges"] if c["status"] == "succeeded" and c["captured"]]
    uncaptured = [c for c in d["charges"] if c["status"] == "succeeded" and not c["captured"]]
    assert captured and uncaptured
    missing = [c["id"] for c in captured if len(receipts.get(c["id"], [])) != 1]
    assert missing == [], f"{len(missing)} captured charges without exactly one receipt"
    # An authorization never captured moved no money: nothing in Sage names it.
    for c in uncaptured:
        assert c["id"] not in receipts and c["id"] not in invoices and c["id"] not in memos


def test_every_refund_has_one_credit_memo(first_run: Any) -> None:
    _, _, d = first_run
    memos = by_reference(d["sage_creditmemos"])
    assert d["refunds"]
    # A refund a credit note names posts through the note's memo only (issue 19).
    through = {x["refund"]: cn["id"] for cn in d["credit_notes"] for x in cn["refunds"]}
    missing = [
        r["id"]
        for r in d["refunds"]
        if len(memos.get(through.get(r["id"], r["id"]), [])) != 1
        or (r["id"] in through and r["id"] in memos)
    ]
    assert missing == [], f"{len(missing)} refunds without exactly one credit memo"


def test_guest_checkouts_post_to_one_guest_customer(first_run: Any) -> None:
    _, _, d = first_run
    guest_id = load_mapping().charges.guest_customer_id
    assert guest_id, "the default mapping names a guest customer"
    assert [c["customer_id"] for c in d["sage_customers"]].count(guest_id) == 1
    receipts = by_reference(d["sage_cashreceipts"])
    memos = by_reference(d["sage_creditmemos"])
    guests = {c["id"] for c in d["charges"] if c["customer"] is None and c["captured"]}
    assert guests
    assert {receipts[g][0]["customer_id"] for g in guests} == {guest_id}
    guest_refunds = [r for r in d["refunds"] if r["charge"] in guests]
    assert guest_refunds
    assert {memos[r["id"]][0]["customer_id"] for r in guest_refunds} == {guest_id}


def test_every_customer_has_a_usable_sage_name(first_run: Any) -> None:
    _, _, d = first_run
    sage = {c["reference"]: c for c in d["sage_customers"] if c.get("reference")}
    # The nameless and the long-named customers: each in Sage, with a name Sage accepts.
    hard = [c for c in d["customers"] if not c["name"] or len(c["name"]) > 40]
    assert hard
    for c in hard:
        if c["metadata"].get("sage_customer_id"):
            continue  # the shop pushed it to Sage itself, already shortened
        got = sage.get(c["id"])
        assert got is not None, c["id"]
        assert got["name"].strip() and len(got["name"]) <= 40, got


def test_deleted_customers_are_posted_then_inactive(first_run: Any) -> None:
    _, _, d = first_run
    sage = {c["reference"]: c for c in d["sage_customers"] if c.get("reference")}
    receipts = by_reference(d["sage_cashreceipts"])
    deleted = {c["id"] for c in d["deleted"]}
    assert deleted
    for cid in deleted:
        assert cid in sage, f"deleted customer {cid} has no Sage customer"
        assert sage[cid]["status"] == "inactive", sage[cid]
        theirs = [c for c in d["charges"] if c["customer"] == cid and c["status"] == "succeeded"]
        for c in theirs:
            assert [r["customer_id"] for r in receipts[c["id"]]] == [sage[cid]["customer_id"]]


def test_unknown_erp_orders_post_on_account_and_are_flagged(first_run: Any) -> None:
    env, _, d = first_run
    orders = {o["order_no"] for o in d["sage_salesorders"]}
    unknown = [
        c
        for c in d["charges"]
        if c["status"] == "succeeded"
        and c["metadata"].get("erp_order_id")
        and c["metadata"]["erp_order_id"] not in orders
    ]
    assert unknown
    receipts = by_reference(d["sage_cashreceipts"])
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        flagged = Counter(r[0] for r in con.sql("SELECT stripe_id FROM ops.flags").fetchall())
    finally:
        con.close()
    for c in unknown:
        (receipt,) = receipts[c["id"]]
        assert not receipt.get("apply_to"), receipt  # on account: applied to nothing
        assert flagged[c["id"]] >= 1, f"{c['id']} ({c['metadata']['erp_order_id']}) not flagged"


def test_a_full_refund_of_a_eur_sale_leaves_net_sales_unchanged_and_books_the_fx(
    first_run: Any,
) -> None:
    """Issue 20 on the default business (EUR sales settle in USD here): a EUR sale refunded in
    full at a later rate — its memo takes back exactly what its receipt brought in (net sales
    unchanged), and the refund's FX journal moves the difference to what the refund cost
    between Stripe Clearing and Realized FX gain/loss (7500)."""
    env, _, d = first_run
    with env.stripe() as s:
        bts = stripe_all(s, "/v1/balance_transactions")
    with env.sage() as c:
        journals = by_reference(sage_all(c, "journalentries"))
    charges = {c["id"]: c for c in d["charges"]}
    shares = fx_refund_shares(d["charges"], d["refunds"], bts)
    full_eur = [
        r
        for r in d["refunds"]
        if r["id"] in shares
        and charges[r["charge"]]["currency"] == "eur"
        and r["amount"] == charges[r["charge"]]["amount"]
        and shares[r["id"]][0] != shares[r["id"]][1]  # refunded at another rate than sold
    ]
    assert full_eur, "the default business refunds a EUR sale in full at a moved rate"
    receipts, memos = by_reference(d["sage_cashreceipts"]), by_reference(d["sage_creditmemos"])
    for r in full_eur:
        (receipt,) = receipts[r["charge"]]
        (memo,) = memos[r["id"]]
        assert memo["amount"] == receipt["amount"], r["id"]
        share, cost = shares[r["id"]]
        (journal,) = journals[r["balance_transaction"]]
        fx = [ln for ln in journal["lines"] if ln["account"] == "7500"]
        booked = sum(Decimal(ln["debit"]) - Decimal(ln["credit"]) for ln in fx)
        assert booked == Decimal(cost - share) / 100, (r["id"], share, cost, journal["lines"])
