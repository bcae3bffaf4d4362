"""The sandboxes' business as the e2e tests use it: an environment (both sandboxes on loopback,
a DuckDB file, the product's settings), the product's environment variables for it, plain-HTTP
listings of both sides, and a run of the main flow. Expected documents are counted from the
Stripe side independently of the pipeline."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.paging import sage_all, stripe_all
from devkit.sandbox.stripe_business import BusinessConfig

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
        return httpx.Client(
            base_url=self.pair.stripe_url,
            headers={"Authorization": f"Bearer {self.pair.stripe_key}"},
        )

    def sage(self) -> httpx.Client:
        return httpx.Client(
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


def expected_documents(env: Env) -> Counter[str]:
    """What the Stripe business implies, from Stripe's own lists (docs/accounting.md)."""
    with env.stripe() as s:
        charges = stripe_all(s, "/v1/charges")
        paid_invoice_charges = {
            p["payment"]["charge"]
            for p in stripe_all(s, "/v1/invoice_payments")
            if p["status"] == "paid"
        }
        invoices = [i for i in stripe_all(s, "/v1/invoices") if i["status"] in ("open", "paid")]
        refunds = stripe_all(s, "/v1/refunds")
        customers = stripe_all(s, "/v1/customers")
        payouts = [
            p
            for p in stripe_all(s, "/v1/payouts")
            if p["automatic"] and p["status"] in ("paid", "failed")
        ]
        sessions = stripe_all(s, "/v1/checkout/sessions")
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
    return Counter(
        {
            "invoice": len(
                [
                    c
                    for c in succeeded
                    if c["id"] not in paid_invoice_charges and c["id"] not in unknown_order
                ]
            )
            + len(invoices),
            "cash_receipt": len(succeeded),
            "credit_memo": len(refunds),
            # refund failures, one journal per paid payout, a reversal per failed payout
            "journal_entry": len([r for r in refunds if r["status"] == "failed"])
            + len(payouts)
            + len([p for p in payouts if p["status"] == "failed"]),
            "customer": len(customers) + len(deleted) + int(guest),
            # A completed goods Checkout Session is a sales order; its invoice replaces the
            # standalone invoice its charge would have had (same count of invoices).
            "sales_order": len([x for x in sessions if is_goods_order(x)]),
        }
    )


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


def make_env(tmp: Path, charges: int, seed: int, monkeypatch: pytest.MonkeyPatch) -> Env:
    stripe_key = f"sk_test_{secrets.token_hex(12)}"
    sage_key = f"sage_{secrets.token_hex(12)}"
    webhook_secret = f"whsec_{secrets.token_hex(12)}"
    pair = SandboxPair(
        BusinessConfig(seed=seed, charges=charges, end=END),
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


def use_env(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in product_env(env).items():
        monkeypatch.setenv(key, value)


def run_flow(**kw: Any) -> dict[str, Any]:
    from flows.stripe_to_sage import stripe_to_sage

    return stripe_to_sage(**kw)
