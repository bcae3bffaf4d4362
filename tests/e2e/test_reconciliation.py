"""Payout reconciliation end to end: docs/accounting.md's invariants are the assertions."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest

from stripe_sage.mapping import default_mapping_text
from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    Env,
    make_env,
    run_flow,
    sage_all,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def recon_env(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("recon"), charges=300, seed=31, monkeypatch=mp)
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        # A payout's arrival falls in a closed period: its journal moves to the next one.
        with env.sage() as c:
            assert (
                c.post("/_sandbox/periods/close", json={"year": 2026, "period": 6}).status_code
                == 200
            )
        run_flow(trigger="test")
        yield env
    mp.undo()


@pytest.fixture()
def env(recon_env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    use_env(recon_env, monkeypatch, quality=ACCOUNTING_QUALITY)
    return recon_env


def journals(env: Env) -> list[dict]:
    with env.sage() as c:
        return sage_all(c, "journalentries")


def test_every_journal_balances(env: Env) -> None:
    entries = journals(env)
    assert len([j for j in entries if j["reference"].startswith("po_")]) > 10
    for j in entries:
        debit = sum(Decimal(line["debit"]) for line in j["lines"])
        credit = sum(Decimal(line["credit"]) for line in j["lines"])
        assert debit == credit, j["reference"]


def test_each_payout_nets_to_its_amount_and_its_bank_line(env: Env) -> None:
    by_ref = {j["reference"]: j for j in journals(env)}
    with env.stripe() as s:
        payouts = [p for p in stripe_all(s, "/v1/payouts") if p["status"] in ("paid", "failed")]
        assert any(p["status"] == "failed" for p in payouts)
        for p in payouts:
            bts = stripe_all(s, "/v1/balance_transactions", payout=p["id"])
            assert sum(b["amount"] for b in bts) - sum(b["fee"] for b in bts) == 0  # with own
            own = [b for b in bts if b["type"] == "payout"]
            assert len(own) == 1 and own[0]["amount"] == -p["amount"]
            assert sum(b["net"] for b in bts if b["type"] != "payout") == p["amount"]
            bank = [line for line in by_ref[p["id"]]["lines"] if line["account"] == "1000"]
            assert [Decimal(line["debit"]) for line in bank] == [Decimal(p["amount"]) / 100]
    con = duckdb.connect(str(env.db), read_only=True)
    statuses = dict(
        con.sql("SELECT recon_status, count(*) FROM ops.reconciliation GROUP BY 1").fetchall()
    )
    mismatches = con.sql(
        "SELECT count(*) FROM ops.reconciliation WHERE difference <> 0 "
        "OR (bank_line IS NOT NULL AND bank_line <> amount)"
    ).fetchall()[0][0]
    con.close()
    assert statuses.get("matched", 0) + statuses.get("failed", 0) == len(payouts)
    assert mismatches == 0


def test_failed_payout_is_reversed(env: Env) -> None:
    with env.stripe() as s:
        failed = [p for p in stripe_all(s, "/v1/payouts") if p["status"] == "failed"]
    by_ref = {j["reference"]: j for j in journals(env)}
    for p in failed:
        reversal = by_ref[p["failure_balance_transaction"]]
        bank = next(line for line in reversal["lines"] if line["account"] == "1000")
        assert Decimal(bank["credit"]) == Decimal(p["amount"]) / 100


def test_clearing_account_matches_stripe(env: Env) -> None:
    result = run_flow(trigger="test")  # a replay: posts nothing, reports again
    assert sum(result["load"]["posted"].values()) == 0
    [usd] = [c for c in result["reconciliation"]["clearing"] if c["currency"] == "USD"]
    assert usd["unexplained"] == 0
    # Sage itself: the clearing balance from the documents Sage holds.
    total = Decimal(0)
    with env.sage() as c:
        total += sum(
            Decimal(r["amount"])
            for r in sage_all(c, "cashreceipts")
            if r["deposit_account"] == "1050"
        )
        total -= sum(
            Decimal(m["amount"]) for m in sage_all(c, "creditmemos") if m["gl_account"] == "1050"
        )
    for j in journals(env):
        for line in j["lines"]:
            if line["account"] == "1050":
                total += Decimal(line["debit"]) - Decimal(line["credit"])
    assert total * 100 == usd["sage_clearing"]
    assert usd["sage_clearing"] - usd["stripe_unpaid_gross"] == usd["difference"]


def test_closed_period_payout_journal_moves_to_next_open_period(env: Env) -> None:
    june = [
        j
        for j in journals(env)
        if j["reference"].startswith("po_") and "orig 2026-06" in j["description"]
    ]
    assert june
    assert {j["entry_date"] for j in june} == {"2026-07-01"}


def test_a_mapping_file_without_a_category_takes_its_default_and_every_payout_posts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    """An older mapping file that lists fewer categories (here not even ``fee``) loads, takes
    the product's defaults for the rest, and blocks no payout (issue 21)."""
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(default_mapping_text().replace("  fee: merchant_fees\n", ""))
    env = make_env(tmp_path, charges=120, seed=41, monkeypatch=monkeypatch)
    with env.pair:
        use_env(env, monkeypatch, quality=ACCOUNTING_QUALITY)
        monkeypatch.setenv("MAPPING_FILE", str(mapping))
        run_flow(trigger="test")
        con = duckdb.connect(str(env.db), read_only=True)
        letters = con.sql(
            "SELECT doc_key, reason FROM ops.dead_letters WHERE doc_key LIKE 'journal_entry:po_%'"
        ).fetchall()
        fee_payouts = {
            r[0]
            for r in con.sql(
                "SELECT i.payout FROM staging.payout_items i JOIN staging.balance_transactions b "
                "ON b.id = i.balance_transaction WHERE b.reporting_category = 'fee'"
            ).fetchall()
        }
        con.close()
        assert fee_payouts and letters == []
        by_ref = {j["reference"]: j for j in journals(env)}
        for po in fee_payouts:  # the Billing fee went to Merchant Fees, its default account
            assert any(line["account"] == "6100" for line in by_ref[po]["lines"])


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_report_renders_the_figures(env: Env, tmp_path: Path) -> None:
    page = env.db.parent / "reconciliation.html"
    con = duckdb.connect(str(env.db), read_only=True)
    first = con.sql(
        "SELECT payout, amount, recon_status FROM ops.reconciliation "
        "WHERE recon_status = 'matched' LIMIT 1"
    ).fetchall()[0]
    n = con.sql("SELECT count(*) FROM ops.reconciliation").fetchall()[0][0]
    con.close()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser:  # rendered by a real headless browser: the DOM after layout, and a picture
        shot = tmp_path / "report.png"
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
        ]
        dom = subprocess.run(
            [browser, *flags, "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        subprocess.run(
            [browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
            capture_output=True,
            timeout=120,
        )
        assert shot.exists() and shot.stat().st_size > 10_000
    else:  # no browser on this machine: the same checks on the parsed page
        dom = page.read_text()
    parser = _Text()
    parser.feed(dom)
    text = " ".join(parser.text)
    assert {"svg", "rect", "table"} <= parser.tags
    assert f"{n} payouts" in text
    assert first[0] in text and f"{first[1] / 100:.2f}" in text and "matched" in text
