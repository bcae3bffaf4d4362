"""Zero-touch defaults through the real main flow against both sandboxes (docs/accounting.md
§2): a nameless customer, a name over Sage's 40 characters, a customer deleted in Stripe
before the first run ever listed it, and a charge naming an ERP order Sage never got — made
with the Stripe sandbox's activity API — all post in the first run, with no dead letter.

(Guest checkouts and uncaptured authorizations need the sandbox's generated business to hold
them; ``tests/e2e/test_zero_touch.py`` covers them on that business.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    make_env,
    run_flow,
    sage_all,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
LONG = "Internationale Handelsgesellschaft für Maschinenbau und Anlagen GmbH"
UNKNOWN_ORDER = "SO9999999"


@pytest.fixture(scope="module")
def zt(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Any]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("zero_touch"), charges=60, seed=29, monkeypatch=mp)
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        made: dict[str, str] = {}
        with env.stripe() as s:

            def act(**body: Any) -> str:
                r = s.post("/_sandbox/activity", json=body)
                assert r.status_code == 200, r.text
                return str(r.json()["id"])

            made["nameless"] = act(action="customer", name="", email="no.name@example.com")
            made["long"] = act(action="customer", name=LONG, email="hq@example.com")
            made["doomed"] = act(action="customer", name="Doomed Traders", email="d@example.com")
            made["plain"] = act(action="customer", name="Plain Buyer", email="p@example.com")
            for key in ("nameless", "long", "doomed"):
                made[f"ch_{key}"] = act(action="charge", customer=made[key], amount=1500)
            made["ch_erp"] = act(
                action="charge",
                customer=made["plain"],
                amount=4200,
                metadata={"erp_order_id": UNKNOWN_ORDER},
            )
            # Deleted before any run listed it: Stripe's list leaves it out from now on.
            act(action="delete_customer", customer=made["doomed"])
            assert made["doomed"] not in {c["id"] for c in stripe_all(s, "/v1/customers")}
            stub = s.get(f"/v1/customers/{made['doomed']}").json()
            assert stub == {"id": made["doomed"], "object": "customer", "deleted": True}
        result = run_flow(trigger="test")
        with env.sage() as c:
            sage = {name: sage_all(c, name) for name in ("customers", "invoices", "cashreceipts")}
        yield env, made, result, sage
    mp.undo()


def _by_reference(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d.get("reference") or "", []).append(d)
    return out


def test_first_run_completes_without_a_dead_letter(zt: Any) -> None:
    env, _, result, _ = zt
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        letters = con.sql("SELECT doc_key, reason FROM ops.dead_letters").fetchall()
    finally:
        con.close()
    assert letters == []
    assert result["status"] == "completed", result["status"]


def test_nameless_and_long_names_post_with_a_name_sage_accepts(zt: Any) -> None:
    env, made, _, sage = zt
    customers = _by_reference(sage["customers"])
    receipts = _by_reference(sage["cashreceipts"])
    [nameless] = customers[made["nameless"]]
    assert nameless["name"] == "no.name@example.com"  # no billing name either: the email
    [long] = customers[made["long"]]
    assert long["name"] == "Internationale Handelsgesellschaft für"
    for key in ("nameless", "long"):
        [receipt] = receipts[made[f"ch_{key}"]]
        assert receipt["customer_id"] == customers[made[key]][0]["customer_id"]
    # The full name stays where a person finds it: staging and the preview.
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        staged = con.execute(
            "SELECT name FROM staging.customers WHERE id = ?", [made["long"]]
        ).fetchall()
    finally:
        con.close()
    assert staged == [(LONG,)]
    ids = ["--id", made["long"], "--id", made["nameless"]]
    out = subprocess.run(
        [str(BIN / "stripe-sage"), "mapping", "preview", "--stream", "customers", *ids],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STAGING_DB": str(env.db)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"shortened to fit Sage; Stripe: {LONG!r}" in out.stdout
    assert "no name in Stripe" in out.stdout


def test_customer_deleted_before_it_was_listed_posts_inactive(zt: Any) -> None:
    _, made, _, sage = zt
    customers = _by_reference(sage["customers"])
    [doomed] = customers[made["doomed"]]
    assert doomed["status"] == "inactive"
    assert doomed["name"] == "Doomed Traders"  # rebuilt from the charge's billing details
    [receipt] = _by_reference(sage["cashreceipts"])[made["ch_doomed"]]
    assert receipt["customer_id"] == doomed["customer_id"]


def test_unknown_erp_order_posts_the_receipt_on_account_and_flags_it(zt: Any) -> None:
    env, made, _, sage = zt
    charge = made["ch_erp"]
    [receipt] = _by_reference(sage["cashreceipts"])[charge]
    assert not receipt.get("apply_to") and receipt["amount"] == "42.00"
    assert receipt["memo"].startswith(f"UNLINKED SO {UNKNOWN_ORDER}")
    assert charge not in _by_reference(sage["invoices"])  # nothing against a missing order
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        flags = con.execute("SELECT stripe_id, flag FROM ops.flags").fetchall()
    finally:
        con.close()
    assert [(s, f) for s, f in flags if s == charge and UNKNOWN_ORDER in f]
    # Charges of the generated business naming orders Sage has still invoice those orders.
    known = [
        i for i in sage["invoices"] if i.get("sales_order_no") and i["reference"].startswith("ch_")
    ]
    assert known, "the generated business has ERP charges whose orders Sage has"
