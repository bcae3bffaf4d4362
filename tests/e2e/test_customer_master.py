"""Unified customer master, both ways, against both sandboxes and through real flows."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
import stripe

from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    Env,
    is_plain,
    make_env,
    run_flow,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cm(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("customers"), charges=160, seed=61, monkeypatch=mp)
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        w = env.pair.world
        plain = [
            k
            for k in range(w.count("customers"))
            if is_plain(w.render("customers", k)) and w.render("customers", k)["email"]
        ]
        env.by_email = w.make_id("customers", plain[0])  # type: ignore[attr-defined]
        env.ambiguous = w.make_id("customers", plain[1])  # type: ignore[attr-defined]
        emails = {k: w.render("customers", k)["email"] for k in plain[:2]}
        with env.sage() as c:
            # Sage already knows one customer's email (unique), and another's twice.
            for cid, email in (
                ("CRM0001", emails[plain[0]]),
                ("CRM0002", emails[plain[1]]),
                ("CRM0003", emails[plain[1]]),
            ):
                r = c.post(
                    "/api/v1/customers",
                    json={
                        "customer_id": cid,
                        "name": f"CRM {cid}",
                        "email": email,
                        "currency": "USD",
                    },
                )
                assert r.status_code == 201, r.text
        run_flow(trigger="test")
        yield env
    mp.undo()


@pytest.fixture()
def env(cm: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    use_env(cm, monkeypatch, quality=ACCOUNTING_QUALITY)
    return cm


def xref(env: Env) -> dict[str, tuple[str, str]]:
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        rows = con.sql(
            "SELECT stripe_id, sage_id, matched_by FROM sage.xref WHERE doc_type = 'customer'"
        ).fetchall()
    finally:
        con.close()
    return {s: (sid, how) for s, sid, how in rows}


def live_xref(env: Env) -> dict[str, tuple[str, str]]:
    """``xref`` less the customers deleted in Stripe (the business deletes a few after their
    charges: posted, then inactive) and the guest customer: the ones Stripe still has."""
    with env.stripe() as s:
        listed = {c["id"] for c in stripe_all(s, "/v1/customers")}
    return {k: v for k, v in xref(env).items() if k in listed}


def letters(env: Env) -> dict[str, str]:
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        return dict(con.sql("SELECT doc_key, reason FROM ops.dead_letters").fetchall())
    finally:
        con.close()


def sdk(env: Env) -> stripe.StripeClient:
    return stripe.StripeClient(env.secrets[0], base_addresses={"api": env.pair.stripe_url})


def test_matching_by_metadata_xref_and_unique_email(env: Env) -> None:
    links = xref(env)
    how = {m for _, m in links.values()}
    assert {"metadata", "email", "created"} <= how
    assert links[env.by_email] == ("CRM0001", "email")  # type: ignore[attr-defined]
    with env.stripe() as s:
        for c in stripe_all(s, "/v1/customers"):
            if c["metadata"].get("sage_customer_id", "").startswith("E") and c["id"] in links:
                assert links[c["id"]][0] == c["metadata"]["sage_customer_id"]
    before = dict(links)
    run_flow(trigger="test")  # the cross-reference: nobody is matched or created again
    assert {k: v[0] for k, v in xref(env).items()} == {k: v[0] for k, v in before.items()}


def test_ambiguous_email_is_dead_lettered_naming_both_candidates(env: Env) -> None:
    reason = letters(env)[f"customer:{env.ambiguous}"]  # type: ignore[attr-defined]
    assert "ambiguous email" in reason and "CRM0002" in reason and "CRM0003" in reason
    assert env.ambiguous not in xref(env)  # type: ignore[attr-defined]


def test_sage_ids_are_written_back_and_visible_through_the_sdk(env: Env) -> None:
    client = sdk(env)
    links = live_xref(env)
    created = [s for s, (_, how) in links.items() if how in ("created", "email")][:5]
    for stripe_id in created:
        customer = client.v1.customers.retrieve(stripe_id)
        assert customer.metadata is not None, stripe_id
        assert customer.metadata["sage_customer_id"] == links[stripe_id][0]
    con = duckdb.connect(str(env.db), read_only=True)
    invoiced = con.sql(
        "SELECT stripe_id, sage_id FROM sage.xref WHERE doc_type = 'invoice' "
        "AND stripe_id LIKE 'ch_%' LIMIT 5"
    ).fetchall()
    con.close()
    assert invoiced
    for charge_id, invoice_no in invoiced:
        assert client.v1.charges.retrieve(charge_id).metadata["sage_invoice_no"] == invoice_no


def test_sage_change_reaches_stripe_and_does_not_come_back(env: Env) -> None:
    from flows.sync_customers_from_sage import sync_customers_from_sage

    stripe_id, (sage_id, _) = next((s, v) for s, v in live_xref(env).items() if v[1] == "created")
    with env.sage() as c:
        assert (
            c.put(f"/api/v1/customers/{sage_id}", json={"phone": "+44 20 7946 0000"}).status_code
            == 200
        )
        stamp = c.get(f"/api/v1/customers/{sage_id}").json()["updated_at"]
    counts = sync_customers_from_sage(trigger="test")
    assert counts["updated_in_stripe"] >= 1
    assert sdk(env).v1.customers.retrieve(stripe_id).phone == "+44 20 7946 0000"
    run_flow(trigger="test")  # the customer.updated echo is read back from Stripe ...
    with env.sage() as c:  # ... and changes nothing in Sage
        assert c.get(f"/api/v1/customers/{sage_id}").json()["updated_at"] == stamp
    again = sync_customers_from_sage(trigger="test")
    assert again["updated_in_stripe"] == 0


def test_conflict_follows_the_rule_and_is_recorded(env: Env) -> None:
    from flows.sync_customers_from_sage import sync_customers_from_sage

    stripe_id, (sage_id, _) = [(s, v) for s, v in live_xref(env).items() if v[1] == "created"][1]
    with env.stripe() as s:  # Stripe changes first; the sync reads it but posts nothing yet
        s.post(f"/v1/customers/{stripe_id}", data={"name": "Changed In Stripe"})
    run_flow(trigger="test", dry_run=True)
    with env.sage() as c:  # then Sage changes: the most recent change
        c.put(f"/api/v1/customers/{sage_id}", json={"name": "Changed In Sage"})
    sync_customers_from_sage(trigger="test")
    con = duckdb.connect(str(env.db), read_only=True)
    conflicts = con.sql(
        "SELECT stripe_id, sage_id, fields, winner, rule FROM ops.customer_conflicts"
    ).fetchall()
    con.close()
    assert (stripe_id, sage_id, ["name"], "sage", "latest_wins") in conflicts
    assert sdk(env).v1.customers.retrieve(stripe_id).name == "Changed In Sage"
    run_flow(trigger="test")  # Stripe → Sage: the winner's value is already there
    with env.sage() as c:
        assert c.get(f"/api/v1/customers/{sage_id}").json()["name"] == "Changed In Sage"


def test_deleted_stripe_customer_deactivates_the_sage_one(env: Env) -> None:
    stripe_id, (sage_id, _) = [(s, v) for s, v in live_xref(env).items() if v[1] == "created"][2]
    with env.stripe() as s:
        assert s.delete(f"/v1/customers/{stripe_id}").json()["deleted"] is True
    run_flow(trigger="test")
    with env.sage() as c:
        customer = c.get(f"/api/v1/customers/{sage_id}").json()
    assert customer["status"] == "inactive"  # deactivated, never deleted


def preview(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [str(BIN / "stripe-sage"), "mapping", "preview", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STAGING_DB": str(env.db)},
    )


def test_preview_shows_the_payload_of_a_jpy_charge(env: Env, tmp_path: Path) -> None:
    con = duckdb.connect(str(env.db), read_only=True)
    charge, amount, bt = con.sql(
        "SELECT c.id, c.amount, b.amount FROM staging.charges c JOIN "
        "staging.balance_transactions b ON b.id = c.balance_transaction "
        "WHERE c.currency = 'JPY' AND c.status = 'succeeded' LIMIT 1"
    ).fetchall()[0]
    con.close()
    page = tmp_path / "preview.html"
    out = preview(env, "--id", charge, "--html", str(page))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"JPY {amount} @" in out.stdout  # zero decimals, presentment in the memo
    assert f'"amount": "{bt // 100}.{bt % 100:02d}"' in out.stdout  # settled USD
    assert charge in page.read_text()


def test_preview_shows_each_product_beside_its_item(env: Env, tmp_path: Path) -> None:
    page = tmp_path / "products.html"
    out = preview(env, "--stream", "products", "--html", str(page))
    assert out.returncode == 0, out.stdout + out.stderr
    # A product naming a Sage item links it; one naming none gets a code of its own.
    assert "id=prod_pro" in out.stdout and '→ item_link: {"item": "PRO-MONTHLY"' in out.stdout
    seat = out.stdout.split("id=prod_seat", 1)[1].split("\n")[1]
    # (item_link once the written-back code has been read back from Stripe)
    assert seat.startswith(
        ('    → item: {"item": "TEAM-SEAT-', '    → item_link: {"item": "TEAM-SEAT-')
    )
    assert "prod_kit" in page.read_text()


def test_preview_rejects_an_unknown_field_with_the_line_number(env: Env, tmp_path: Path) -> None:
    from stripe_sage.mapping import default_mapping_text

    text = default_mapping_text().replace("from: card_brand", "from: card_colour")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "card_colour" in t)
    out = preview(env, "--mapping", str(bad))
    assert out.returncode == 2
    assert f"line {line}" in out.stdout and "unknown field 'card_colour'" in out.stdout
