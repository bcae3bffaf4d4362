"""The main job end to end: real Prefect flows, both sandboxes on loopback, a real DuckDB file.

Expected documents are counted from the Stripe side independently of the pipeline (plain
HTTP listing of the sandbox), then compared with what the Sage sandbox holds.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from tests.helpers.business import (
    Env,
    expected_documents,
    make_env,
    outbox,
    plain_customer,
    run_flow,
    sage_all,
    sage_counts,
    settlement_waits,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def main_env(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("main"), charges=240, seed=15, monkeypatch=mp)
    with env.pair:
        yield env
    mp.undo()


@pytest.fixture()
def env(main_env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    use_env(main_env, monkeypatch)
    return main_env


# The module's tests build on each other in order: first run, second run, new activity.
def test_first_run_posts_exactly_what_the_business_implies(env: Env) -> None:
    result = run_flow(trigger="test")
    # The default engine: Great Expectations, its Data Docs beside the staging file.
    assert result["data_docs"] and Path(result["data_docs"]).is_file(), result["data_docs"]
    expected = expected_documents(env)
    box = outbox(env)
    posted = box.get("posted", Counter())
    # Zero touch: the business's everyday shapes (guest checkouts, nameless and long-named
    # customers, deleted customers, authorizations, unknown ERP orders) all post at once.
    # The one wait it may hold: a foreign-currency invoice whose payment failed awaits
    # settlement (docs/accounting.md §4), a state with a reason, not a dead letter.
    assert set(box) <= {"posted", "waiting"}, {s: dict(n) for s, n in box.items()}
    assert sum(box.get("waiting", Counter()).values()) == settlement_waits(env)

    for doc_type, n in expected.items():
        assert posted[doc_type] == n, doc_type
    # Sage holds exactly the posted documents (customers: plus the ones seeded beforehand).
    held = sage_counts(env)
    for doc_type in ("invoice", "cash_receipt", "credit_memo", "journal_entry"):
        assert held[doc_type] == posted[doc_type], doc_type
    # Names over Sage's 40 characters post shortened at a word boundary (the default
    # `on_overflow: shorten`): nothing is dead (docs/accounting.md §2).
    with env.stripe() as s:
        long_names = {
            c["id"]: c["name"] for c in stripe_all(s, "/v1/customers") if len(c["name"] or "") > 40
        }
    assert long_names, "the generated business has names over 40 characters"
    with env.sage() as c:
        in_sage = {x["reference"]: x["name"] for x in sage_all(c, "customers")}
    shortened = {cid: in_sage[cid] for cid in long_names if cid in in_sage}
    assert shortened, "long-named customers are created in Sage"
    for cid, name in shortened.items():
        full = long_names[cid]
        assert 0 < len(name) <= 40 and full.startswith(name), (cid, full, name)
        assert " " not in full[:41] or full[len(name)] in " ,;:-/&.", (cid, full, name)
    con = duckdb.connect(str(env.db), read_only=True)
    letters = con.sql("SELECT doc_key, doc_type, reason FROM ops.dead_letters").fetchall()
    runs = con.sql("SELECT status, counts FROM ops.runs").fetchall()
    con.close()
    assert letters == []
    assert result["status"] == "completed"
    assert runs[0][0] == "completed"
    assert json.loads(runs[0][1])["staged"]["charges"] == 240
    # The run-summary artifact shows every document per state and the quarantined records.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        summary = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["run-summary"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(result["run_id"])]),
            )
        )
    assert len(summary) == 1
    rows = {r["doc_type"]: r for r in json.loads(str(summary[0].data))}
    assert rows["cash_receipt"]["posted"] == posted["cash_receipt"]
    assert "quarantined" in rows["(quarantined records)"]


def test_second_run_posts_nothing(env: Env) -> None:
    before = sage_counts(env)
    result = run_flow(trigger="test")
    assert sum(result["load"]["posted"].values()) == 0
    assert sum(result["load"]["enqueued"].values()) == 0
    # The first run wrote Sage numbers into Stripe metadata; those *.updated events are our
    # own echo: merged, not re-fetched one by one.
    assert result["events"]["events"] > 0
    assert sum(result["events"]["changed"].values()) == 0
    assert sage_counts(env) == before


def test_every_line_names_an_item_made_once_and_stock_moves(env: Env) -> None:
    """After two runs (the tests above): Sage's item master holds the shop's items, one item
    per Stripe product without ``metadata.sage_item`` (created once, its code written back)
    and the default item; every line of every document names an item of the master; a stock
    item's on_hand fell by exactly the quantity invoiced."""
    from devkit.sandbox.sage_seed import SHOP_ITEMS  # the items Sage held beforehand

    with env.sage() as c:
        items = {i["item"]: i for i in sage_all(c, "items")}
        invoices = sage_all(c, "invoices")
        orders = sage_all(c, "salesorders")
    with env.stripe() as s:
        products = stripe_all(s, "/v1/products")
    seeded = {i.item: i for i in SHOP_ITEMS}
    named = {p["id"] for p in products if p["metadata"].get("sage_item") in seeded}
    made = [i for i in items.values() if i["item"] not in seeded]
    # One per product that named no item, plus the default items (plain charges' sale,
    # Checkout orders' shipping); none twice.
    assert sorted(i["reference"] for i in made if i["reference"]) == sorted(
        p["id"] for p in products if p["id"] not in named
    )
    assert sorted(i["item"] for i in made if not i["reference"]) == [
        "STRIPE-SALE",
        "STRIPE-SHIPPING",
    ]
    for p in products:  # each product's code is in its metadata (written back, or the shop's)
        code = p["metadata"].get("sage_item")
        assert code in items, p["id"]
        if p["id"] not in named:
            assert items[code]["reference"] == p["id"]
    lines = [ln for doc in invoices + orders for ln in doc["lines"]]
    assert lines and all(ln["item"] in items for ln in lines)
    assert {ln["item"] for ln in lines} > {"STRIPE-SALE"}  # Billing lines name product items
    stock = [code for code, i in items.items() if i["type"] == "stock"]
    assert "ONBOARDING" in stock
    for code in stock:
        invoiced = sum(
            (
                Decimal(ln["quantity"])
                for inv in invoices
                for ln in inv["lines"]
                if ln["item"] == code
            ),
            Decimal(0),
        )
        opening = Decimal(seeded[code].opening_quantity or 0) if code in seeded else Decimal(0)
        assert Decimal(items[code]["on_hand"]) == opening - invoiced, code
    assert any(ln["item"] == "ONBOARDING" for inv in invoices for ln in inv["lines"])
    con = duckdb.connect(str(env.db), read_only=True)
    posted = con.sql(
        "SELECT doc_type, count(*) FROM sage.outbox WHERE collection = 'items' "
        "AND status = 'posted' GROUP BY ALL"
    ).fetchall()
    con.close()
    assert dict(posted) == {"item": len(made), "item_link": len(named)}


def test_new_activity_is_picked_up_by_the_next_run(env: Env) -> None:
    with env.stripe() as s:
        customer = next(
            c
            for c in stripe_all(s, "/v1/customers")
            if c["name"] and len(c["name"]) <= 40 and c["email"]
        )
        old = next(
            c
            for c in stripe_all(s, "/v1/charges")
            if c["status"] == "succeeded"
            and c["captured"]
            and not c["refunded"]
            and not c["disputed"]
            and c["amount_refunded"] == 0
        )
        # An open invoice in the settlement currency (a foreign one awaits settlement: see
        # tests/e2e/test_foreign_currency.py), neither voided nor credited.
        opened = [
            i
            for i in s.get("/_sandbox/open_invoices").json()["data"]
            if s.get(f"/v1/invoices/{i}").json()["currency"] == "usd"
        ]
        assert opened, "the business has an invoice whose payment failed"
        jpy = s.post(
            "/_sandbox/activity",
            json={
                "action": "charge",
                "customer": customer["id"],
                "amount": 5000,
                "currency": "jpy",
            },
        ).json()["id"]
        kwd = s.post(
            "/_sandbox/activity",
            json={
                "action": "charge",
                "customer": customer["id"],
                "amount": 1250,
                "currency": "kwd",
            },
        ).json()["id"]
        refund = s.post(
            "/_sandbox/activity", json={"action": "refund", "charge": old["id"], "amount": 100}
        ).json()["id"]
        paid_by = s.post(
            "/_sandbox/activity", json={"action": "pay_invoice", "invoice": opened[0]}
        ).json()["id"]
        bts = {
            c: s.get(f"/v1/charges/{c}", params={"expand[]": "balance_transaction"}).json()[
                "balance_transaction"
            ]
            for c in (jpy, kwd)
        }
    before = sage_counts(env)
    result = run_flow(trigger="test")
    after = sage_counts(env)
    assert after - before == Counter({"invoice": 2, "cash_receipt": 3, "credit_memo": 1})
    assert result["events"]["changed"].get("invoices") == 1  # the invoice paid later
    with env.sage() as c:
        receipts = {r["reference"]: r for r in sage_all(c, "cashreceipts")}
        memos = {m["reference"]: m for m in sage_all(c, "creditmemos")}
        invoices = {i["reference"]: i for i in sage_all(c, "invoices")}
    # Zero- and three-decimal presentment currencies: settled in USD cents, memo exact.
    assert receipts[jpy]["amount"] == f"{bts[jpy]['amount'] / 100:.2f}"
    assert "JPY 5000 @" in receipts[jpy]["memo"]
    assert receipts[kwd]["amount"] == f"{bts[kwd]['amount'] / 100:.2f}"
    assert "KWD 1.250 @" in receipts[kwd]["memo"]
    assert memos[refund]["amount"] == "1.00"
    # The invoice paid later: its Sage invoice now has nothing due, paid by the new receipt.
    assert invoices[opened[0]]["balance_due"] == "0.00"
    assert invoices[opened[0]]["status"] == "paid"
    assert receipts[paid_by]["apply_to"][0]["invoice_no"] == invoices[opened[0]]["invoice_no"]


def test_no_secret_in_tables_logs_or_output(
    env: Env, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    run_flow(trigger="test")
    out, err = capfd.readouterr()
    con = duckdb.connect(str(env.db), read_only=True)
    tables = con.sql(
        "SELECT table_schema, table_name, column_name FROM information_schema.columns "
        "WHERE data_type IN ('VARCHAR', 'JSON') OR data_type LIKE 'VARCHAR%'"
    ).fetchall()
    hits = []
    for secret in env.secrets:
        for schema, table, column in tables:
            n = con.execute(
                f'SELECT count(*) FROM {schema}.{table} WHERE CAST("{column}" AS VARCHAR) LIKE ?',
                [f"%{secret}%"],
            ).fetchall()[0][0]
            if n:
                hits.append((secret[:6], schema, table, column))
        assert secret not in out + err
        assert secret not in caplog.text
    con.close()
    raw = env.db.read_bytes()
    assert not any(s.encode() in raw for s in env.secrets)
    assert hits == []


def test_prefect_logs_hold_no_secret(env: Env) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    async def logs() -> list[str]:
        async with get_client() as client:
            return [log.message for log in await client.read_logs(LogFilter(), limit=200)]

    import asyncio

    messages = asyncio.run(logs())
    assert messages, "the flows logged through Prefect"
    assert not [m for m in messages for s in env.secrets if s in m]


def test_analysts_query_a_consistent_snapshot_while_a_sync_runs(env: Env) -> None:
    """A query loop runs throughout a sync: it never waits on a lock or errors, and every
    answer is internally consistent (each posted document has its cross-reference)."""
    import threading

    snapshot = env.db.parent / "snapshot" / "analytics.duckdb"
    assert snapshot.exists()
    errors: list[str] = []
    answers: list[tuple[int, int, str]] = []
    stop = threading.Event()

    def analyst() -> None:
        # An analyst's pace, not a spin: a tight loop took a core from the sync it watches.
        while not stop.wait(0.02):
            try:
                con = duckdb.connect(str(snapshot), read_only=True)
                posted = con.execute(
                    "SELECT count(*) FROM sage.outbox WHERE status = 'posted'"
                ).fetchall()[0][0]
                xrefs = con.execute("SELECT count(*) FROM sage.xref").fetchall()[0][0]
                run = con.execute("SELECT run_id FROM meta.snapshot").fetchall()[0][0]
                con.close()
                answers.append((posted, xrefs, run))
            except Exception as exc:  # any failure is what this test is about
                errors.append(repr(exc))

    with env.stripe() as s:
        customer = plain_customer(s)
        s.post("/_sandbox/activity", json={"action": "charge", "customer": customer, "amount": 777})
    reader = threading.Thread(target=analyst)
    reader.start()
    try:
        result = run_flow(trigger="test")
    finally:
        stop.set()
        reader.join(timeout=30)
    assert errors == []
    assert len(answers) > 10
    assert all(posted == xrefs for posted, xrefs, _ in answers)
    assert result["run_id"] in {run for _, _, run in answers}  # the newest run was published
    assert len({run for _, _, run in answers}) >= 2  # readers saw the swap happen
