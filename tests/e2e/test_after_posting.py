"""After an invoice is posted (issue 19): credit notes, voids and write-offs reach Sage, and
per customer Sage's open AR equals Stripe's open ``amount_remaining`` (invariant 11).

The business is the sandbox's default (the one ``make demo`` serves): it holds credit notes
on open and paid invoices, voided and uncollectible invoices, invoices that used the
customer's credit balance and customers holding credit; between two runs Stripe collects a
written-off invoice. What Stripe implies is read from the
Stripe sandbox over HTTP, what Sage holds from the Sage sandbox over HTTP.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stripe_sage.cli.main import main
from stripe_sage.mapping import load_mapping
from stripe_sage.money import to_decimal_string
from stripe_sage.reconcile.ar import ar_tie_out
from stripe_sage.store.staging import Staging
from tests.helpers.business import (
    Env,
    expected_documents,
    outbox,
    run_flow,
    sage_all,
    sage_counts,
    settlement_waits,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e

CLEARING = "1050"  # accounts.clearing USD


@pytest.fixture(scope="module")
def world(
    default_business: tuple[Env, dict[str, Any]],
) -> Iterator[tuple[Env, dict[str, Any], dict[str, Any]]]:
    env, result = default_business  # after its first run (tests/e2e/conftest.py)
    with pytest.MonkeyPatch.context() as mp:
        use_env(env, mp)
        first_run = sage_counts(env)  # after the shared first run
        # Stripe collects a written-off invoice after it was posted (written off) in Sage: the
        # next run books a recovery journal (issue 19).
        with env.stripe() as s:
            written_off = [
                i["id"] for i in stripe_all(s, "/v1/invoices") if i["status"] == "uncollectible"
            ]
            collected = s.post(
                "/_sandbox/activity", json={"action": "pay_invoice", "invoice": written_off[0]}
            )
            collected.raise_for_status()
        result = run_flow(trigger="test")
        with env.stripe() as s:
            stripe = {
                "invoices": stripe_all(s, "/v1/invoices"),
                "credit_notes": stripe_all(s, "/v1/credit_notes"),
                "charges": stripe_all(s, "/v1/charges"),
                "refunds": stripe_all(s, "/v1/refunds"),
                "customers": stripe_all(s, "/v1/customers"),
                "recovered": [written_off[0], collected.json()["id"]],
                # The second run is also the rerun of everything else: exactly once.
                "sage_counts": [first_run, sage_counts(env)],
            }
        with env.sage() as c:
            sage = {
                n: sage_all(c, n)
                for n in ("invoices", "creditmemos", "cashreceipts", "journalentries")
            }
        yield env, result, {**stripe, **{f"sage_{k}": v for k, v in sage.items()}}


def minor(amount: str) -> int:
    return int((Decimal(amount) * 100).to_integral_value())


def test_the_business_has_every_kind(world: Any) -> None:
    _, _, d = world
    statuses = Counter(i["status"] for i in d["invoices"])
    # The written-off invoice Stripe collected between the runs was uncollectible before.
    written_off = [i for i in d["invoices"] if i["status_transitions"]["marked_uncollectible_at"]]
    assert statuses["void"] >= 1 and written_off and d["recovered"]
    assert d["credit_notes"]


def test_open_ar_per_customer_ties_out(world: Any) -> None:
    _, result, d = world
    assert result["status"] == "completed"
    # Which Stripe customer each Sage invoice's reference belongs to.
    owner = {i["id"]: i["customer"] for i in d["invoices"]}
    owner |= {c["id"]: c["customer"] for c in d["charges"]}
    sage_open: Counter[str] = Counter()
    for inv in d["sage_invoices"]:
        due = minor(inv["balance_due"])
        if due:
            sage_open[owner[inv["reference"]]] += due
    stripe_open: Counter[str] = Counter()
    for inv in d["invoices"]:
        if inv["status"] == "open" and inv["currency"] == "usd":
            stripe_open[inv["customer"]] += inv["amount_remaining"]
    assert +stripe_open  # some AR is open, or the check proves nothing
    assert dict(+sage_open) == dict(+stripe_open)


def test_void_and_uncollectible_leave_nothing_open(world: Any) -> None:
    _, _, d = world
    closed = {i["id"] for i in d["invoices"] if i["status"] in ("void", "uncollectible")}
    in_sage = {i["reference"]: i for i in d["sage_invoices"] if i["reference"] in closed}
    assert set(in_sage) == closed  # each still posted (its number was issued) ...
    assert all(minor(i["balance_due"]) == 0 for i in in_sage.values())  # ... and closed
    written_off = {i["id"] for i in d["invoices"] if i["status"] == "uncollectible"}
    written_off.add(d["recovered"][0])  # collected later: its write-off stays
    bad_debt = [m for m in d["sage_creditmemos"] if m["reference"] in written_off]
    assert len(bad_debt) == len(written_off)
    assert {m.get("expense_account") for m in bad_debt} == {"6300"}  # accounts.bad_debt


def test_every_credit_note_is_one_memo_against_its_invoice(world: Any) -> None:
    _, _, d = world
    sage_no = {i["reference"]: i["invoice_no"] for i in d["sage_invoices"]}
    memos = Counter(m["reference"] for m in d["sage_creditmemos"])
    by_ref = {m["reference"]: m for m in d["sage_creditmemos"]}
    kinds = Counter(cn["type"] for cn in d["credit_notes"])
    assert kinds["pre_payment"] and kinds["post_payment"]  # on open and on paid invoices
    for cn in d["credit_notes"]:
        assert memos[cn["id"]] == 1
        memo = by_ref[cn["id"]]
        assert minor(memo["amount"]) == cn["total"]
        if cn["type"] == "pre_payment":
            assert memo["invoice_no"] == sage_no[cn["invoice"]]
        else:  # refunds a paid invoice: to Stripe Clearing, the invoice stays paid
            assert memo["invoice_no"] is None and memo["gl_account"] == CLEARING
            assert "refunds invoice" in memo["reason"]
        tax = sum(t["amount"] for t in cn["total_taxes"])
        assert minor(memo.get("tax_amount") or "0") == tax


def test_no_refund_twice_and_no_dead_letter(world: Any) -> None:
    env, _, d = world
    memos = Counter(m["reference"] for m in d["sage_creditmemos"])
    # A refund a credit note names posts through the note's memo only, never a second time.
    through = {x["refund"]: cn["id"] for cn in d["credit_notes"] for x in cn["refunds"]}
    assert through
    for r in d["refunds"]:
        assert memos[through.get(r["id"], r["id"])] == 1
        assert r["id"] not in through or memos[r["id"]] == 0
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        letters = con.sql("SELECT doc_key, reason FROM ops.dead_letters").fetchall()
    finally:
        con.close()
    assert letters == []


def test_documents_as_expected_and_exactly_once_on_rerun(world: Any) -> None:
    env, _, _ = world
    box = outbox(env)
    # Posted, but for foreign-currency invoices awaiting settlement (docs/accounting.md §4).
    assert set(box) <= {"posted", "waiting"}, {s: dict(n) for s, n in box.items()}
    assert sum(box.get("waiting", {}).values()) == settlement_waits(env)
    expected = expected_documents(env)
    for doc_type, n in expected.items():
        assert box["posted"][doc_type] == n, doc_type
    first, second = world[2]["sage_counts"]
    for doc_type in ("invoice", "cash_receipt", "credit_memo", "journal_entry"):
        assert second[doc_type] == box["posted"][doc_type], doc_type
    # The second run (after Stripe collected the written-off invoice) posted its recovery
    # journal and nothing else: every other document exactly once.
    assert second - first == Counter({"journal_entry": 1})
    assert first - second == Counter()


def test_the_report_ties_ar_out_per_customer_and_renders_it(
    world: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env, _, d = world
    page = tmp_path / "reconciliation.html"
    assert main(["reconcile", "--html", str(page)]) == 0  # nothing unexplained
    out = capsys.readouterr().out
    [line] = [x for x in out.splitlines() if x.startswith("AR tie-out USD")]
    assert "unexplained 0.00" in line
    # The report's Sage side is what Sage itself holds, per customer.
    owner = {i["id"]: i["customer"] for i in d["invoices"]}
    owner |= {c["id"]: c["customer"] for c in d["charges"]}
    sage_open: Counter[str] = Counter()
    for inv in d["sage_invoices"]:
        if minor(inv["balance_due"]):
            sage_open[owner[inv["reference"]]] += minor(inv["balance_due"])
    with Staging(env.db, read_only=True) as st:
        [usd] = ar_tie_out(st, load_mapping(None))
    assert usd["unexplained"] == 0 and usd["difference"] == 0
    assert usd["sage_open"] == sum(sage_open.values()) > 0
    assert dict(+Counter({r["customer"]: r["sage_open"] for r in usd["rows"]})) == dict(+sage_open)
    text = rendered_text(page, tmp_path)
    summary = text.split("Sage open AR against Stripe")[1].split()
    # currency, customers, Sage open, Stripe open, difference, explained, unexplained
    row = summary[summary.index("USD") : summary.index("USD") + 7]
    assert row == ["USD", str(usd["customers"]), *[to_decimal_string(usd[k], "USD") for k in
                   ("sage_open", "stripe_open")], "0.00", "0.00", "0.00"]  # fmt: skip


def rendered_text(page: Path, tmp_path: Path) -> str:
    """The page's text after a real headless Chromium laid it out (the parsed file where the
    machine has no Chromium, as tests/e2e/test_reconciliation.py does)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    dom = page.read_text()
    if browser:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
    return re.sub(r"<[^>]+>", " ", dom)


def test_credit_balance_used_by_an_invoice_is_one_memo_from_customer_credit(world: Any) -> None:
    _, _, d = world
    sage_no = {i["reference"]: i["invoice_no"] for i in d["sage_invoices"]}
    memos = Counter(m["reference"] for m in d["sage_creditmemos"])
    by_ref = {m["reference"]: m for m in d["sage_creditmemos"]}
    used = [i for i in d["invoices"] if i["ending_balance"] - i["starting_balance"] > 0]
    assert used
    for inv in used:
        ref = f"{inv['id']}-CB"
        assert memos[ref] == 1
        memo = by_ref[ref]
        assert minor(memo["amount"]) == inv["ending_balance"] - inv["starting_balance"]
        assert memo["invoice_no"] == sage_no[inv["id"]] and memo["expense_account"] == "2400"
    # Credit customers still hold is listed beside the tie-out (negative: credit).
    holding = sum(c["balance"] for c in d["customers"] if c["balance"] < 0)
    assert holding < 0
    env = world[0]
    with Staging(env.db, read_only=True) as st:
        [usd] = ar_tie_out(st, load_mapping(None))
    assert usd["credit_balances"] == holding


def test_a_written_off_invoice_collected_later_is_a_recovery_journal(world: Any) -> None:
    _, _, d = world
    invoice, charge = d["recovered"]
    [inv] = [i for i in d["invoices"] if i["id"] == invoice]
    assert inv["status"] == "paid" and inv["status_transitions"]["marked_uncollectible_at"]
    [write_off] = [m for m in d["sage_creditmemos"] if m["reference"] == invoice]
    assert write_off["expense_account"] == "6300" and minor(write_off["amount"]) == inv["total"]
    assert not [r for r in d["sage_cashreceipts"] if r["reference"] == charge]
    [journal] = [j for j in d["sage_journalentries"] if j["reference"] == charge]
    [ch] = [c for c in d["charges"] if c["id"] == charge]
    lines = {ln["account"]: (minor(ln["debit"]), minor(ln["credit"])) for ln in journal["lines"]}
    assert lines == {CLEARING: (ch["amount"], 0), "6300": (0, ch["amount"])}
