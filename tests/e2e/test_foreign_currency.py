"""Foreign currency, first class (issue 20, docs/accounting.md "Foreign currency, first
class"): a refund of a sale presented in EUR, GBP, JPY or KWD and settled in USD reverses the
sale at the charge's own rate, and a journal books the rate difference of the refund's day
between Stripe Clearing and Realized FX gain/loss — so clearing moves by exactly the refund's
balance transaction and a full refund leaves net sales where they were.

What Stripe implies is computed from the Stripe sandbox's lists over plain HTTP
(``fx_refund_shares``); what Sage holds is read back from the Sage sandbox over plain HTTP.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from stripe_sage.mapping import default_mapping_text, load_mapping
from stripe_sage.money import exponent
from stripe_sage.reconcile.report import clearing_check
from stripe_sage.store.staging import Staging
from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    Env,
    fx_payment_shares,
    fx_refund_shares,
    make_env,
    run_flow,
    sage_all,
    sage_counts,
    stripe_all,
    use_env,
)

pytestmark = pytest.mark.e2e

SEED, CHARGES = 11, 400
FX_PREFIX = "Realized FX on refund"


def minor(amount: str, currency: str) -> int:
    return int(Decimal(amount).scaleb(exponent(currency)))


@pytest.fixture(scope="module")
def fx_run(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness: None
) -> Iterator[tuple[Env, dict[str, Any]]]:
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("fx")
    # A second settlement currency: the account also holds a EUR balance (its own clearing
    # and bank accounts, its own payouts); the mapping settles in USD and EUR.
    env = make_env(tmp, charges=CHARGES, seed=SEED, monkeypatch=mp, eur_balance=True)
    mapping = yaml.safe_load(default_mapping_text())
    mapping["settlement_currencies"] = ["USD", "EUR"]
    (tmp / "mapping.yaml").write_text(yaml.safe_dump(mapping))
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        mp.setenv("MAPPING_FILE", str(tmp / "mapping.yaml"))
        result = run_flow(trigger="test")
        with env.stripe() as s:
            charges = stripe_all(s, "/v1/charges")
            refunds = stripe_all(s, "/v1/refunds")
            bts = stripe_all(s, "/v1/balance_transactions")
            invoices = stripe_all(s, "/v1/invoices")
            payments = stripe_all(s, "/v1/invoice_payments")
            payouts = stripe_all(s, "/v1/payouts")
            payout_items = {
                p["id"]: stripe_all(s, "/v1/balance_transactions", payout=p["id"])
                for p in payouts
                if p["currency"] == "eur" and p["status"] == "paid"
            }
        with env.sage() as c:
            sage = {
                n: sage_all(c, n)
                for n in ("creditmemos", "journalentries", "cashreceipts", "invoices")
            }
        yield (
            env,
            {
                "result": result,
                "charges": {c["id"]: c for c in charges},
                "refunds": {r["id"]: r for r in refunds},
                "bts": {b["id"]: b for b in bts},
                "shares": fx_refund_shares(charges, refunds, bts),
                # Invoices in a currency the account does not settle in (EUR it does).
                "fx_invoices": [i for i in invoices if i["currency"] not in ("usd", "eur")],
                # The first payment of each paid invoice: its rate books the invoice.
                "paid_by": {
                    p["invoice"]: p["payment"]["charge"]
                    for p in payments
                    if p["status"] == "paid" and p["is_default"]
                },
                "parts": fx_payment_shares(payments, charges, bts),
                "payouts": payouts,
                "eur_payout_items": payout_items,
                **sage,
            },
        )
    mp.undo()


def fx_journals(d: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Realized-FX journals by refund id (their reference is the refund's balance
    transaction: the refund id is its memo's, and a failed refund's reversing journal's)."""
    refund_of_bt = {r["balance_transaction"]: r["id"] for r in d["refunds"].values()}
    out: dict[str, list[dict[str, Any]]] = {}
    for j in d["journalentries"]:
        if j["description"].startswith(FX_PREFIX):
            out.setdefault(refund_of_bt[j["reference"]], []).append(j)
    return out


def test_the_business_refunds_foreign_sales_at_moving_rates(fx_run: Any) -> None:
    """The premise: foreign refunds that cost more, and less, than the sale brought in."""
    _, d = fx_run
    shares = d["shares"]
    assert len(shares) >= 5
    assert any(cost > share for share, cost in shares.values())  # losses
    assert any(cost < share for share, cost in shares.values())  # gains
    currencies = {d["charges"][d["refunds"][r]["charge"]]["currency"] for r in shares}
    assert {"jpy", "kwd"} & currencies  # zero- and three-decimal presentment too


def test_memo_reverses_the_sale_at_the_charges_rate_and_fx_takes_the_rest(fx_run: Any) -> None:
    _, d = fx_run
    clearing = load_mapping().accounts.clearing["USD"]
    fx_account = load_mapping().accounts.fx_gain_loss
    memos: dict[str, list[dict[str, Any]]] = {}
    for m in d["creditmemos"]:
        memos.setdefault(m["reference"], []).append(m)
    journals = fx_journals(d)
    for refund_id, (share, cost) in d["shares"].items():
        (memo,) = memos[refund_id]
        assert memo["currency"] == "USD"
        assert minor(memo["amount"], "USD") == share, refund_id
        if share == cost:
            assert refund_id not in journals
            continue
        (journal,) = journals[refund_id]
        moved = {line["account"]: line for line in journal["lines"]}
        assert set(moved) == {clearing, fx_account}
        fx_debit = minor(moved[fx_account]["debit"], "USD") - minor(
            moved[fx_account]["credit"], "USD"
        )
        assert fx_debit == cost - share  # Dr a loss, Cr a gain
        # Clearing moves by exactly the refund's balance transaction: the memo + the journal.
        clearing_credit = minor(moved[clearing]["credit"], "USD") - minor(
            moved[clearing]["debit"], "USD"
        )
        assert share + clearing_credit == cost


def test_a_full_refund_of_a_foreign_sale_leaves_net_sales_unchanged(fx_run: Any) -> None:
    _, d = fx_run
    receipts = {r["reference"]: r for r in d["cashreceipts"]}
    memos = {m["reference"]: m for m in d["creditmemos"]}
    full = [
        r
        for r in d["shares"]
        if d["refunds"][r]["amount"] == d["charges"][d["refunds"][r]["charge"]]["amount"]
    ]
    assert full
    for refund_id in full:
        charge = d["refunds"][refund_id]["charge"]
        # The sale in Sage was the receipt's amount; the memo takes exactly that back.
        assert memos[refund_id]["amount"] == receipts[charge]["amount"], refund_id


def test_no_dead_letters_and_a_rerun_posts_nothing_twice(fx_run: Any) -> None:
    env, d = fx_run
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        dead = con.execute("SELECT * FROM ops.dead_letters").fetchall()
    finally:
        con.close()
    assert dead == []
    assert d["result"]["status"] == "completed", d["result"]
    before = sage_counts(env)
    run_flow(trigger="test")
    assert sage_counts(env) == before
    assert sum(len(v) for v in fx_journals(d).values()) == len(
        [1 for share, cost in d["shares"].values() if share != cost]
    )


# -- foreign-currency invoices ---------------------------------------------------------------
def test_paid_foreign_invoices_post_once_at_the_settled_amount_and_are_paid(fx_run: Any) -> None:
    _, d = fx_run
    paid = [i for i in d["fx_invoices"] if i["status"] == "paid"]
    assert len({i["currency"] for i in paid}) >= 2  # EUR, GBP, JPY among them
    sage_invoices: dict[str, list[dict[str, Any]]] = {}
    for inv in d["invoices"]:
        sage_invoices.setdefault(inv["reference"], []).append(inv)
    receipts = {r["reference"]: r for r in d["cashreceipts"]}
    for inv in paid:
        (posted,) = sage_invoices[inv["id"]]
        charge = d["charges"][d["paid_by"][inv["id"]]]
        settled = d["bts"][charge["balance_transaction"]]
        assert posted["currency"] == settled["currency"].upper() == "USD"
        assert posted["balance_due"] == "0.00" and posted["status"] == "paid"
        parts = [c for c, (i, _, _) in d["parts"].items() if i == inv["id"]]
        if parts:  # paid in parts: see the test below
            continue
        assert minor(posted["total"], "USD") == settled["amount"], inv["id"]
        # The receipt of the charge that paid it is applied to it, in full.
        (applied,) = receipts[charge["id"]]["apply_to"]
        assert applied["invoice_no"] == posted["invoice_no"]
        assert applied["amount"] == posted["total"]


def test_an_invoice_paid_in_parts_at_moving_rates_is_paid_and_books_the_fx(fx_run: Any) -> None:
    """Booked at its first payment's rate; each later part receipts its share of it and a
    journal books what Stripe settled beyond that share to Realized FX gain/loss."""
    _, d = fx_run
    assert any(share != settled for _, share, settled in d["parts"].values())
    clearing = load_mapping().accounts.clearing["USD"]
    fx_account = load_mapping().accounts.fx_gain_loss
    sage_invoices = {inv["reference"]: inv for inv in d["invoices"]}
    receipts = {r["reference"]: r for r in d["cashreceipts"]}
    journals: dict[str, list[dict[str, Any]]] = {}
    for j in d["journalentries"]:
        journals.setdefault(j["reference"], []).append(j)
    booked: dict[str, int] = {}
    for charge_id, (invoice, share, settled) in d["parts"].items():
        booked[invoice] = booked.get(invoice, 0) + share
        posted = sage_invoices[invoice]
        receipt = receipts[charge_id]
        assert minor(receipt["amount"], "USD") == share, charge_id
        assert receipt["apply_to"] == [
            {"invoice_no": posted["invoice_no"], "amount": receipt["amount"]}
        ]
        fx = [
            j
            for j in journals.get(d["charges"][charge_id]["balance_transaction"], [])
            if j["description"].startswith("Realized FX on payment")
        ]
        if share == settled:
            assert not fx
            continue
        (journal,) = fx
        moved = {line["account"]: line for line in journal["lines"]}
        assert set(moved) == {clearing, fx_account}
        gain = minor(moved[fx_account]["credit"], "USD") - minor(moved[fx_account]["debit"], "USD")
        assert gain == settled - share
        # Clearing moves by exactly the charge's balance transaction: receipt + journal.
        assert (
            share + minor(moved[clearing]["debit"], "USD") - minor(moved[clearing]["credit"], "USD")
            == settled
        )
    for invoice, total in booked.items():
        posted = sage_invoices[invoice]
        assert minor(posted["total"], "USD") == total
        assert posted["balance_due"] == "0.00" and posted["status"] == "paid"


def test_an_unpaid_foreign_invoice_waits_for_settlement_and_the_run_completes(
    fx_run: Any,
) -> None:
    env, d = fx_run
    open_ = [i for i in d["fx_invoices"] if i["status"] == "open"]
    assert open_, "the business holds a foreign-currency invoice whose payment failed"
    posted = {inv["reference"] for inv in d["invoices"]}
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        for inv in open_:
            assert inv["id"] not in posted
            row = con.execute(
                "SELECT status, wait_kind, last_error FROM sage.outbox WHERE doc_key = ?",
                ["invoice:" + inv["id"]],
            ).fetchone()
            assert row is not None and row[0] == "waiting" and row[1] == "settlement", row
            assert "awaiting settlement" in row[2] and inv["currency"].upper() in row[2]
    finally:
        con.close()
    assert d["result"]["status"] == "completed", d["result"]


# -- a second settlement currency -------------------------------------------------------------
def test_a_eur_balance_posts_in_eur_and_its_clearing_ties_out(fx_run: Any) -> None:
    """Sales settled in EUR post in EUR to the EUR clearing account, unconverted; EUR payouts
    move EUR clearing to the EUR bank; the clearing check holds per currency."""
    env, d = fx_run
    accounts = load_mapping().accounts
    eur_clearing, eur_bank = accounts.clearing["EUR"], accounts.bank["EUR"]
    assert eur_bank != accounts.bank["USD"]
    eur_sales = [
        c
        for c in d["charges"].values()
        if c.get("balance_transaction") and d["bts"][c["balance_transaction"]]["currency"] == "eur"
    ]
    assert eur_sales
    receipts = {r["reference"]: r for r in d["cashreceipts"]}
    for c in eur_sales:
        bt = d["bts"][c["balance_transaction"]]
        assert bt["exchange_rate"] is None and c["currency"] == "eur"
        receipt = receipts[c["id"]]
        assert receipt["currency"] == "EUR" and receipt["deposit_account"] == eur_clearing
        assert minor(receipt["amount"], "EUR") == bt["amount"] == c["amount"]
    eur_refunds = [
        r for r in d["refunds"].values() if d["bts"][r["balance_transaction"]]["currency"] == "eur"
    ]
    assert eur_refunds
    memos = {m["reference"]: m for m in d["creditmemos"]}
    for r in eur_refunds:
        assert memos[r["id"]]["currency"] == "EUR" and memos[r["id"]]["gl_account"] == eur_clearing
        assert minor(memos[r["id"]]["amount"], "EUR") == r["amount"]
        assert r["id"] not in fx_journals(d)
    # Each paid EUR payout: one EUR journal, its bank line the payout, the rest EUR clearing
    # and fees (Stripe itemises it in EUR only).
    journals = {j["reference"]: j for j in d["journalentries"]}
    assert d["eur_payout_items"]
    for payout_id, items in d["eur_payout_items"].items():
        payout = next(p for p in d["payouts"] if p["id"] == payout_id)
        assert {b["currency"] for b in items} == {"eur"}
        journal = journals[payout_id]
        assert journal["currency"] == "EUR"
        bank = [line for line in journal["lines"] if line["account"] == eur_bank]
        assert [minor(line["debit"], "EUR") for line in bank] == [payout["amount"]]
        assert {line["account"] for line in journal["lines"]} <= {
            eur_bank,
            eur_clearing,
            accounts.merchant_fees,
            accounts.chargebacks,
            accounts.dispute_fees,
        }
    # The clearing check, per settlement currency: nothing unexplained in either.
    clearing = {c["currency"]: c for c in d["result"]["reconciliation"]["clearing"]}
    assert {"USD", "EUR"} <= set(clearing)
    for c in clearing.values():
        assert c["unexplained"] == 0, c
    con = duckdb.connect(str(env.db), read_only=True)
    try:
        statuses = dict(
            con.execute(
                "SELECT recon_status, count(*) FROM ops.reconciliation WHERE currency = 'EUR' "
                "GROUP BY ALL"
            ).fetchall()
        )
    finally:
        con.close()
    # Paid ones matched; the last days' payouts still in transit.
    assert statuses["matched"] == len(d["eur_payout_items"])
    assert set(statuses) <= {"matched", "pending"}


def test_an_fx_journal_sage_refused_is_named_by_the_clearing_check(
    fx_run: Any, tmp_path: Path
) -> None:
    """A foreign sale's receipt (or refund's memo) posted without its Realized FX journal
    leaves clearing short by the journal's amount: the clearing check names the journal,
    with that amount, and leaves nothing unexplained. Sage refusing the journals is played
    on a copy of the run's staging file (their outbox rows dead, as the loader leaves a
    document Sage refused)."""
    env, _ = fx_run
    db = tmp_path / "stripe_sage.duckdb"
    shutil.copy(env.db, db)
    with Staging(db) as st:
        refused = [
            key
            for (key,) in st.con.execute(
                "SELECT min(doc_key) FROM sage.outbox WHERE status = 'posted' AND ("
                "doc_key LIKE 'journal_entry:payment_fx:%' OR doc_key LIKE "
                "'journal_entry:refund_fx:%') GROUP BY split_part(doc_key, ':', 2) ORDER BY 1"
            ).fetchall()
        ]
        assert [k.split(":")[1] for k in refused] == ["payment_fx", "refund_fx"]
        st.con.execute(
            "UPDATE sage.outbox SET status = 'dead', last_error = 'validation_error: refused' "
            "WHERE doc_key IN (SELECT unnest(?))",
            [refused],
        )
        [usd] = [c for c in clearing_check(st, load_mapping()) if c["currency"] == "USD"]
    named = {d["doc_key"]: d for d in usd["unposted_documents"]}
    assert set(refused) <= set(named)
    # Each journal explains what it would have put on clearing (its clearing line).
    journals = {j["reference"]: j for j in fx_run[1]["journalentries"]}
    clearing = load_mapping().accounts.clearing["USD"]
    with Staging(db, read_only=True) as st:
        refs = dict(
            st.con.execute(
                "SELECT doc_key, payload->>'reference' FROM sage.outbox "
                "WHERE doc_key IN (SELECT unnest(?))",
                [refused],
            ).fetchall()
        )
    expected = sum(
        minor(line["debit"], "USD") - minor(line["credit"], "USD")
        for key in refused
        for line in journals[refs[key]]["lines"]
        if line["account"] == clearing
    )
    assert expected != 0
    assert sum(named[k]["amount"] for k in refused) == expected
    assert usd["difference"] == -expected and usd["unexplained"] == 0, usd
    assert all(named[k]["doc_status"] == "dead" for k in refused)


def test_the_run_reports_the_realized_fx_total_it_posted(fx_run: Any) -> None:
    """The realized FX gain/loss of the run's report is Σ of the FX lines Sage holds."""
    _, d = fx_run
    account = load_mapping().accounts.fx_gain_loss
    held = sum(
        minor(line["credit"], "USD") - minor(line["debit"], "USD")
        for j in d["journalentries"]
        for line in j["lines"]
        if line["account"] == account
    )
    [usd] = [f for f in d["result"]["reconciliation"]["realized_fx"] if f["currency"] == "USD"]
    assert usd["net"] == held == usd["gain"] - usd["loss"]
    assert usd["gain"] > 0 and usd["loss"] > 0
    assert usd["journals"] == len(
        [j for j in d["journalentries"] if any(line["account"] == account for line in j["lines"])]
    )
