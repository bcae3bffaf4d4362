"""The sandboxes' business as the e2e tests use it: an environment (both sandboxes on loopback,
a DuckDB file, the product's settings), the product's environment variables for it, plain-HTTP
listings of both sides, and a run of the main flow. Expected documents are counted from the
Stripe side independently of the pipeline."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Final

import duckdb
import httpx
import pytest

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.paging import sage_all, stripe_all
from devkit.sandbox.stripe_business import BusinessConfig
from tests.helpers import loopback

__all__ = ["sage_all", "stripe_all"]  # re-exported: the tests list both sides through the devkit


END = 1_782_777_600  # 2026-06-30: a fixed business, so every run sees the same data
SAGE_COLLECTIONS = {
    "invoice": "invoices",
    "cash_receipt": "cashreceipts",
    "credit_memo": "creditmemos",
    "journal_entry": "journalentries",
    "customer": "customers",
}


@dataclass
class Env:
    pair: SandboxPair
    db: Path
    secrets: list[str]

    def stripe(self) -> httpx.Client:
        return loopback.client(
            base_url=self.pair.stripe_url,
            headers={"Authorization": f"Bearer {self.pair.stripe_key}"},
        )

    def sage(self) -> httpx.Client:
        return loopback.client(
            base_url=self.pair.sage_url, headers={"Authorization": f"Bearer {self.pair.sage_key}"}
        )


def is_plain(customer: dict[str, Any]) -> bool:
    """An ordinary Stripe customer: not deleted, named within Sage's 40 characters, not pushed
    to Sage by the shop (no metadata). Tests that need one customer pick one of these."""
    name = customer.get("name") or ""
    return (
        not customer.get("deleted")
        and bool(name)
        and len(name) <= 40
        and not customer.get("metadata")
    )


def plain_customer(client: httpx.Client) -> str:
    """The newest listed customer with a name within Sage's 40 characters (after a run every
    customer carries the Sage id written back into its metadata)."""
    return next(
        c["id"] for c in stripe_all(client, "/v1/customers") if c["name"] and len(c["name"]) <= 40
    )


def fx_refund_shares(
    charges: list[dict[str, Any]], refunds: list[dict[str, Any]], bts: list[dict[str, Any]]
) -> dict[str, tuple[int, int]]:
    """Refunds of sales presented in another currency than they settled in: refund id →
    (the sale's share it reverses at the charge's rate, what it cost: -bt.amount), in
    settlement minor units (docs/accounting.md, "Foreign currency, first class"). The shares
    of one charge's refunds are cumulative, so together they are its settled gross."""
    amount_of = {b["id"]: b["amount"] for b in bts}
    currency_of = {b["id"]: b["currency"] for b in bts}
    by_charge: dict[str, list[dict[str, Any]]] = {}
    for r in refunds:
        if r.get("balance_transaction"):
            by_charge.setdefault(r["charge"], []).append(r)
    out: dict[str, tuple[int, int]] = {}
    for ch in charges:
        bt = ch.get("balance_transaction")
        if ch["id"] not in by_charge or not bt or ch["currency"] == currency_of.get(bt):
            continue
        settled, sold = Decimal(amount_of[bt]), Decimal(ch["amount"])
        before = Decimal(0)
        for r in sorted(by_charge[ch["id"]], key=lambda r: (r["created"], r["id"])):
            upto = before + r["amount"]
            share = int((upto * settled / sold).to_integral_value(ROUND_HALF_UP)) - int(
                (before * settled / sold).to_integral_value(ROUND_HALF_UP)
            )
            before = upto
            out[r["id"]] = (share, -amount_of[r["balance_transaction"]])
    return out


def fx_payment_shares(
    payments: list[dict[str, Any]], charges: list[dict[str, Any]], bts: list[dict[str, Any]]
) -> dict[str, tuple[str, int, int]]:
    """Parts of foreign-currency invoices paid in parts: charge id → (invoice, its share of
    the invoice at the rate of the invoice's first payment, what Stripe settled for it), in
    settlement minor units (docs/accounting.md, "Foreign currency, first class"). Shares are
    cumulative over the invoice's payments in the order they were paid, so together they are
    the invoice's booked total; the first part's share is its own settled amount."""
    amount_of = {b["id"]: b["amount"] for b in bts}
    currency_of = {b["id"]: b["currency"] for b in bts}
    by_id = {c["id"]: c for c in charges}
    by_invoice: dict[str, list[dict[str, Any]]] = {}
    for p in payments:
        if p["status"] == "paid":
            by_invoice.setdefault(p["invoice"], []).append(p)
    out: dict[str, tuple[str, int, int]] = {}
    for invoice, parts in by_invoice.items():
        if len(parts) < 2:
            continue
        parts.sort(key=lambda p: (p["status_transitions"]["paid_at"], p["payment"]["charge"]))
        paying = [by_id[p["payment"]["charge"]] for p in parts]
        first = paying[0]
        if first["currency"] == currency_of[first["balance_transaction"]]:
            continue  # an invoice in its settlement currency: no rate to book
        rate = Decimal(amount_of[first["balance_transaction"]]) / Decimal(first["amount"])
        before = Decimal(0)
        for p, ch in zip(parts, paying, strict=True):
            upto = before + p["amount_paid"]
            share = int((upto * rate).to_integral_value(ROUND_HALF_UP)) - int(
                (before * rate).to_integral_value(ROUND_HALF_UP)
            )
            before = upto
            out[ch["id"]] = (invoice, share, amount_of[ch["balance_transaction"]])
    return out


def expected_documents(env: Env) -> Counter[str]:
    """What the Stripe business implies, from Stripe's own lists (docs/accounting.md)."""
    with env.stripe() as s:
        charges = stripe_all(s, "/v1/charges")
        invoice_payments = stripe_all(s, "/v1/invoice_payments")
        invoice_of_charge = {
            p["payment"]["charge"]: p["invoice"] for p in invoice_payments if p["status"] == "paid"
        }
        paid_invoice_charges = set(invoice_of_charge)
        # Issue 19: voided and written-off invoices post too, then a memo takes their open
        # balance off; each credit note is one memo.
        invoices = [i for i in stripe_all(s, "/v1/invoices") if i["status"] != "draft"]
        credit_notes = stripe_all(s, "/v1/credit_notes")
        refunds = stripe_all(s, "/v1/refunds")
        customers = stripe_all(s, "/v1/customers")
        # Automatic payouts get a journal each (itemised); manual ones too (not itemised).
        payouts = [p for p in stripe_all(s, "/v1/payouts") if p["status"] in ("paid", "failed")]
        # Top-ups and their reversals get a journal each.
        topups = [
            b
            for b in stripe_all(s, "/v1/balance_transactions")
            if b["reporting_category"] in ("topup", "topup_reversal")
        ]
        sessions = stripe_all(s, "/v1/checkout/sessions")
        bts = stripe_all(s, "/v1/balance_transactions")
    # A refund of a foreign sale at another rate than the sale's books the difference.
    fx_journals = [
        r for r, (share, cost) in fx_refund_shares(charges, refunds, bts).items() if share != cost
    ]
    # ... and so does a later part of a foreign invoice paid in parts, settled at another rate.
    fx_journals += [
        c
        for c, (_, share, settled) in fx_payment_shares(invoice_payments, charges, bts).items()
        if share != settled
    ]
    with env.sage() as c:
        orders = {o["order_no"] for o in sage_all(c, "salesorders")}
    # An authorization never captured moved no money and posts nothing (docs/accounting.md).
    succeeded = [c for c in charges if c["status"] == "succeeded" and c["captured"]]
    # A charge naming an ERP order Sage does not have posts its receipt on account, no invoice.
    unknown_order = {
        c["id"]
        for c in succeeded
        if c["metadata"].get("erp_order_id") and c["metadata"]["erp_order_id"] not in orders
    }
    # Customers deleted in Stripe (left out of the list) whose charges or invoices name them
    # are posted too (then made inactive); guest checkouts post to one guest customer.
    listed = {c["id"] for c in customers}
    named = {c["customer"] for c in charges} | {i["customer"] for i in invoices}
    deleted = {x for x in named if x and x not in listed}
    guest = any(c["customer"] is None for c in succeeded)
    unsettled = {i["id"] for i in invoices if i["currency"] != "usd" and i["status"] != "paid"}
    # Issue 19: a written-off invoice Stripe collected later keeps its write-off memo, and
    # the charge that collected it books a recovery journal instead of a receipt.
    written_off_at = {
        i["id"]: i["status_transitions"]["marked_uncollectible_at"]
        for i in invoices
        if i["status_transitions"].get("marked_uncollectible_at")
    }
    recoveries = [
        c
        for c in succeeded
        if invoice_of_charge.get(c["id"]) in written_off_at
        and c["created"] >= written_off_at[invoice_of_charge[c["id"]]]
    ]
    collected_write_offs = [
        i
        for i in invoices
        if i["status"] == "paid" and i["id"] in written_off_at and i["amount_paid"] > 0
    ]
    return Counter(
        {
            "invoice": len(
                [
                    c
                    for c in succeeded
                    if c["id"] not in paid_invoice_charges and c["id"] not in unknown_order
                ]
            )
            # a foreign-currency invoice posts once Stripe settled its payment
            + len([i for i in invoices if i["currency"] == "usd" or i["status"] == "paid"]),
            "cash_receipt": len(succeeded) - len(recoveries),
            # ... but not those of a foreign-currency invoice awaiting settlement: they wait
            # with it (docs/accounting.md §4)
            # a refund a credit note names posts through the note's memo only (issue 19)
            "credit_memo": len(refunds)
            - len({x["refund"] for n in credit_notes for x in n["refunds"]})
            + len([n for n in credit_notes if n["invoice"] not in unsettled])
            + len(
                [
                    i
                    for i in invoices
                    if i["status"] in ("void", "uncollectible")
                    and i["amount_remaining"] > 0
                    and i["id"] not in unsettled
                ]
            )
            + len(collected_write_offs)
            # the customer credit an invoice used (credit is a negative balance)
            + len(
                [
                    i
                    for i in invoices
                    if (i["ending_balance"] or 0) - (i["starting_balance"] or 0) > 0
                    and i["id"] not in unsettled
                ]
            ),
            # refund failures, FX on refunds, one journal per paid payout, a reversal per
            # failed payout
            "journal_entry": len([r for r in refunds if r["status"] == "failed"])
            + len(fx_journals)
            + len(payouts)
            + len([p for p in payouts if p["status"] == "failed"])
            + len(topups)
            + len(recoveries)
            + daily_journals(env),
            "customer": len(customers) + len(deleted) + int(guest),
            # A completed goods Checkout Session is a sales order; its invoice replaces the
            # standalone invoice its charge would have had (same count of invoices).
            "sales_order": len([x for x in sessions if is_goods_order(x)]),
        }
    )


# Categories whose gross a document of its own posts (docs/accounting.md section 6).
OWN_DOCUMENT = {
    "charge",
    "payment",
    "refund",
    "refund_failure",
    "topup",
    "topup_reversal",
    "payout",
    "payout_reversal",
}


def swept_by_manual_payouts(
    s: httpx.Client, bts: list[dict[str, Any]], payouts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """On an account with automatic payouts, the transactions its manual (or instant)
    payouts took: those no automatic payout lists, available when a manual payout was made
    (a payout takes the available balance)."""
    listed = {
        b["id"]
        for p in payouts
        if p["automatic"] and p["status"] in ("paid", "failed")
        for b in stripe_all(s, "/v1/balance_transactions", payout=p["id"])
    }
    manual = [p["created"] for p in payouts if not p["automatic"]]
    return [
        b
        for b in bts
        if manual
        and b["id"] not in listed
        and b["reporting_category"] != "payout"
        and b["available_on"] <= max(manual)
    ]


def daily_journals(env: Env) -> int:
    """One journal per ended UTC day with a fee or a category no document posts, of the
    transactions no automatic payout recognises: on an account paid out only manually all of
    them, else those manual payouts took (counted from Stripe's transactions)."""
    with env.stripe() as s:
        schedule = s.get("/v1/account").json()["settings"]["payouts"]["schedule"]
        bts = stripe_all(s, "/v1/balance_transactions")
        if schedule["interval"] != "manual":
            bts = swept_by_manual_payouts(s, bts, stripe_all(s, "/v1/payouts"))
    today = time.time() // 86_400
    days: dict[int, int] = {}
    for b in bts:
        day = b["created"] // 86_400
        if day < today:
            moved = b["fee"] + (0 if b["reporting_category"] in OWN_DOCUMENT else b["amount"])
            days[day] = days.get(day, 0) | int(bool(b["fee"]) or moved != 0)
    return sum(days.values())


def by_reference(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Sage documents grouped by their ``reference`` (a Stripe id)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        out.setdefault(doc.get("reference") or "", []).append(doc)
    return out


def is_goods_order(session: dict[str, Any]) -> bool:
    """A Checkout Session that becomes a Sage sales order (docs/accounting.md)."""
    return (
        session["mode"] == "payment"
        and session["status"] == "complete"
        and not session["invoice_creation"]["enabled"]
    )


def read_only(db: Path, wait: float = 120) -> duckdb.DuckDBPyConnection:
    """The staging file, read-only, once no run holds it (a triggered run may be finishing)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(str(db), read_only=True)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def settlement_waits(env: Env) -> int:
    """Documents waiting for Stripe to settle a foreign-currency invoice's payment."""
    con = read_only(env.db)
    try:
        row = con.execute(
            "SELECT count(*) FROM sage.outbox WHERE status = 'waiting' AND wait_kind = 'settlement'"
        ).fetchone()
    finally:
        con.close()
    return int(row[0]) if row else 0


def outbox(env: Env) -> dict[str, Counter[str]]:
    con = read_only(env.db)
    try:
        rows = con.sql(
            "SELECT replace(doc_type, 'customer_link', 'customer'), status, count(*) "
            "FROM sage.outbox GROUP BY ALL"
        ).fetchall()
    finally:
        con.close()
    out: dict[str, Counter[str]] = {}
    for doc_type, status, n in rows:
        out.setdefault(status, Counter())[doc_type] += n
    return out


def sage_counts(env: Env) -> Counter[str]:
    with env.sage() as c:
        docs = c.get("/_sandbox/stats").json()["documents"]
    return Counter({t: docs.get(col, 0) for t, col in SAGE_COLLECTIONS.items()})


def make_env(
    tmp: Path,
    charges: int,
    seed: int,
    monkeypatch: pytest.MonkeyPatch,
    *,
    manual_payouts: bool = False,
    interim_manual_payouts: bool = False,
    eur_balance: bool = False,
) -> Env:
    stripe_key = f"sk_test_{secrets.token_hex(12)}"
    sage_key = f"sage_{secrets.token_hex(12)}"
    webhook_secret = f"whsec_{secrets.token_hex(12)}"
    pair = SandboxPair(
        BusinessConfig(
            seed=seed,
            charges=charges,
            end=END,
            manual_payouts=manual_payouts,
            interim_manual_payouts=interim_manual_payouts,
            eur_balance=eur_balance,
        ),
        sage_db=tmp / "sage.sqlite3",
        stripe_key=stripe_key,
        sage_key=sage_key,
    )
    db = tmp / "stripe_sage.duckdb"
    return Env(pair, db, [stripe_key, sage_key, webhook_secret])


def product_env(env: Env, db: Path | None = None, **extra: str) -> dict[str, str]:
    """The product's settings pointing at this environment's sandboxes and DuckDB file."""
    return {
        "STRIPE_API_KEY": env.secrets[0],
        "SAGEPRO_API_KEY": env.secrets[1],
        "STRIPE_WEBHOOK_SECRET": env.secrets[2],
        "STRIPE_API_BASE": env.pair.stripe_url,
        "SAGEPRO_BASE_URL": env.pair.sage_url,
        "STAGING_DB": str(db or env.db),
        "STRIPE_MAX_RPS": "200",
        **extra,
    }


# Great Expectations costs about half of an in-process e2e module's CPU, most of a flow run's
# (docs/benchmarks.md, "The test suite's time"). It runs where quality is the subject and
# over every everyday shape once: the main flow (with its Data Docs), the failure paths and
# quarantine, the default business, the deployed sync of test_operations and the scheduled
# sync whose quarantine the real-time processor's must equal. The modules whose subject is
# something else (one accounting family, payouts, the console, backfills and the scale-out,
# the operations' own syncs, the checkout race) check their rows with the Polars engine: a
# product setting whose outcomes tests/unit/test_quality_engines.py proves equal to GX's.
ACCOUNTING_QUALITY: Final = "polars"


def use_env(env: Env, monkeypatch: pytest.MonkeyPatch, *, quality: str = "gx") -> None:
    """The product's settings for this environment in this process; ``quality``: the
    syncs' engine (``QUALITY_ENGINE``)."""
    for key, value in product_env(env, QUALITY_ENGINE=quality).items():
        monkeypatch.setenv(key, value)


def run_flow(**kw: Any) -> dict[str, Any]:
    from flows.stripe_to_sage import stripe_to_sage

    return stripe_to_sage(**kw)


def run_twice_under_sage_faults(
    env: Env, *, seed: int, commit_then_503_rate: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """The main flow under the Sage fault mix (20 % 503, 10 % 429, commits answered 503),
    then once more without faults: (first result, second result, faults injected)."""
    with env.sage() as c:
        c.post(
            "/_sandbox/faults",
            json={
                "seed": seed,
                "rate_503": 0.2,
                "rate_429": 0.1,
                "retry_after": 0.05,
                "commit_then_503_rate": commit_then_503_rate,
            },
        ).raise_for_status()
    first = run_flow(trigger="test")
    with env.sage() as c:
        injected = c.get("/_sandbox/stats").json()["faults"]
        c.delete("/_sandbox/faults")
    return first, run_flow(trigger="test"), injected
