"""After an invoice is posted (issue 19): credit notes, voids and write-offs reach Sage, and
per customer Sage's open AR equals Stripe's open ``amount_remaining`` (invariant 11).

The business is the sandbox's default (the one ``make demo`` serves): it holds credit notes
on open and paid invoices, voided and uncollectible invoices, invoices that used the
customer's credit balance and customers holding credit, refunds of invoice payments without
a credit note and a lost dispute on an invoice payment; between two runs Stripe collects a
written-off invoice. What Stripe implies is read from the
Stripe sandbox over HTTP, what Sage holds from the Sage sandbox over HTTP.
"""

from __future__ import annotations

import html
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
                "disputes": stripe_all(s, "/v1/disputes"),
                "invoice_payments": stripe_all(s, "/v1/invoice_payments"),
                "recovered": [written_off[0], collected.json()["id"]],
                # The second run is also the rerun of everything else: exactly once.
                "sage_counts": [first_run, sage_counts(env)],
            }
        with env.sage() as c:
            sage = {
                n: sage_all(c, n)
                for n in ("invoices", "creditmemos", "cashreceipts", "journalentries")
            }
        d = {**stripe, **{f"sage_{k}": v for k, v in sage.items()}}
        d["lost_invoice_disputes"] = lost_invoice_disputes(env, d)
        yield env, result, d


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
    # The page links each lost dispute on an invoice payment to its invoice (Stripe and Sage
    # numbers), its customer and the payout whose journal booked it, in one row.
    sage_no = {i["reference"]: i["invoice_no"] for i in d["sage_invoices"]}
    flat = " ".join(text.split()).split("Lost disputes on invoiced sales")[1]
    for lost in d["lost_invoice_disputes"]:
        inv, cus = lost["invoice"], lost["customer"]
        cells = [
            lost["dispute"]["id"],
            to_decimal_string(lost["dispute"]["amount"], "USD"),
            lost["dispute"]["reason"],
            lost["dispute"]["charge"],
            inv["id"],
            inv["number"],
            sage_no[inv["id"]],
            cus["id"],
            html.escape(cus["name"] or ""),
            lost["payout"],
        ]
        assert " ".join(" ".join(cells).split()) in flat  # fmt: skip


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


def lost_invoice_disputes(env: Env, d: dict[str, Any]) -> list[dict[str, Any]]:
    """Stripe's lost disputes on invoice payments, each with its invoice, customer and the
    payout that paid out its balance transaction (from Stripe's ``?payout=`` lists)."""
    invoice_of = {
        p["payment"]["charge"]: p["invoice"] for p in d["invoice_payments"] if p["status"] == "paid"
    }
    invoices = {i["id"]: i for i in d["invoices"]}
    customers = {c["id"]: c for c in d["customers"]}
    lost = [x for x in d["disputes"] if x["status"] == "lost" and x["charge"] in invoice_of]
    out = []
    with env.stripe() as s:
        payouts = stripe_all(s, "/v1/payouts")
        swept = {
            b["id"]: p for p in payouts for b in stripe_all(s, "/v1/balance_transactions",
                                                            payout=p["id"])
        }  # fmt: skip
    for x in lost:
        inv = invoices[invoice_of[x["charge"]]]
        [bt] = x["balance_transactions"]  # lost: the withdrawal (amount and fee) only
        out.append(
            {"dispute": x, "invoice": inv, "customer": customers[inv["customer"]],
             "bt": bt, "payout": swept[bt["id"]]["id"], "payout_amount": swept[bt["id"]]["amount"]}
        )  # fmt: skip
    assert out, "the default business has a lost dispute on an invoice payment"
    return out


def test_a_lost_dispute_on_an_invoice_stays_in_its_payout_journal(world: Any) -> None:
    """ACCOUNTING.md: the payout journal books it (Chargebacks, Dispute Fees); the invoice
    stays paid in Sage as in Stripe (no memo, its receipt stands, its customer's AR is
    Stripe's); the report's rows link dispute, invoice and customer."""
    env, _, d = world
    sage_invoice = {i["reference"]: i for i in d["sage_invoices"]}
    journals = {j["reference"]: j for j in d["sage_journalentries"]}
    with env.stripe() as s:
        for lost in d["lost_invoice_disputes"]:
            dispute, inv, bt = lost["dispute"], lost["invoice"], lost["bt"]
            assert inv["status"] == "paid" and inv["amount_remaining"] == 0
            sage = sage_invoice[inv["id"]]
            assert minor(sage["balance_due"]) == 0 and minor(sage["total"]) == inv["total"]
            refs = {inv["id"], dispute["id"], dispute["charge"]}
            assert not [m for m in d["sage_creditmemos"] if m["reference"] in refs]
            [receipt] = [r for r in d["sage_cashreceipts"] if r["reference"] == dispute["charge"]]
            assert [a["invoice_no"] for a in receipt["apply_to"]] == [sage["invoice_no"]]
            # The payout's journal: Chargebacks and Dispute Fees for what Stripe took (with any
            # other dispute it swept up), the Bank line the payout to the cent, balanced.
            members = stripe_all(s, "/v1/balance_transactions", payout=lost["payout"])
            disputed = [
                b for b in members if b["reporting_category"] in ("dispute", "dispute_reversal")
            ]
            assert bt["id"] in {b["id"] for b in disputed}
            journal = journals[lost["payout"]]
            net: Counter[str] = Counter()
            for line in journal["lines"]:
                net[line["account"]] += minor(line["debit"]) - minor(line["credit"])
            assert sum(net.values()) == 0
            assert net["6110"] == -sum(b["amount"] for b in disputed)  # accounts.chargebacks
            assert net["6120"] == sum(b["fee"] for b in disputed)  # accounts.dispute_fees
            assert net["6110"] >= dispute["amount"] and net["6120"] >= bt["fee"] == 1500
            assert net["1000"] == lost["payout_amount"] > 0  # accounts.bank USD
    # The report's rows: dispute → invoice (Stripe and Sage numbers) → customer, and payout.
    from stripe_sage.reconcile.report import invoice_disputes

    with Staging(env.db, read_only=True) as st:
        rows = invoice_disputes(st).to_dicts()
    expected = [
        (x["dispute"]["id"], x["invoice"]["id"], x["invoice"]["number"],
         sage_invoice[x["invoice"]["id"]]["invoice_no"], x["customer"]["id"],
         x["customer"]["name"], x["payout"])
        for x in d["lost_invoice_disputes"]
    ]  # fmt: skip
    got = [
        (r["dispute"], r["invoice"], r["invoice_number"], r["sage_invoice_no"], r["customer"],
         r["customer_name"], r["payout"])
        for r in rows
    ]  # fmt: skip
    assert got == expected


def test_a_refund_of_an_invoice_payment_without_a_credit_note_names_the_invoice(
    world: Any,
) -> None:
    """A refund memo as for any refund (to Stripe Clearing, the invoice stays paid), its
    reason naming the invoice by its Stripe number."""
    _, _, d = world
    invoice_of = {
        p["payment"]["charge"]: p["invoice"] for p in d["invoice_payments"] if p["status"] == "paid"
    }
    number = {i["id"]: i["number"] for i in d["invoices"]}
    through_note = {x["refund"] for cn in d["credit_notes"] for x in cn["refunds"]}
    by_ref = {m["reference"]: m for m in d["sage_creditmemos"]}
    plain = [r for r in d["refunds"] if r["charge"] in invoice_of and r["id"] not in through_note]
    assert plain  # the default business has some
    for r in plain:
        memo = by_ref[r["id"]]
        assert memo["reason"].endswith(f", invoice {number[invoice_of[r['charge']]]}")
        assert memo["invoice_no"] is None and memo["gl_account"] == CLEARING
