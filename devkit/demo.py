"""``stripe-sage demo``: the README's first command — both sandboxes on loopback, the main flow
three times on a generated business (first run, a run that posts nothing, new activity)."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from stripe_sage.cli.commands import prefect_defaults, print_run

DEMO_DIR = Path("data")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def cmd_demo(args: argparse.Namespace) -> int:
    prefect_defaults()
    from devkit.cli import _business
    from devkit.sandbox.launch import SandboxPair
    from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY

    data = Path(args.data_dir)
    if data.exists() and not args.keep:
        for name in (
            "stripe_sage.duckdb",
            "stripe_sage.duckdb.wal",
            "sage_sandbox.sqlite3",
            "sage_sandbox.sqlite3-wal",
            "sage_sandbox.sqlite3-shm",
        ):
            (data / name).unlink(missing_ok=True)
        shutil.rmtree(data / "data_docs", ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    stripe_port = 12111 if _port_free(12111) else 0
    sage_port = 12112 if _port_free(12112) else 0
    pair = SandboxPair(
        _business(args),
        sage_db=data / "sage_sandbox.sqlite3",
        stripe_port=stripe_port,
        sage_port=sage_port,
        stripe_rate_limit=args.rate_limit or None,
    )
    with pair:
        os.environ.update(
            {
                "STRIPE_API_BASE": pair.stripe_url,
                "STRIPE_API_KEY": SANDBOX_STRIPE_KEY,
                "SAGEPRO_BASE_URL": pair.sage_url,
                "SAGEPRO_API_KEY": SANDBOX_SAGE_KEY,
                "STAGING_DB": str(data / "stripe_sage.duckdb"),
            }
        )
        from flows.stripe_to_sage import stripe_to_sage

        w = pair.world
        print(
            f"Stripe sandbox {pair.stripe_url}: {w.count('customers')} customers, "
            f"{w.count('charges')} charges, {w.count('refunds')} refunds, "
            f"{w.count('invoices')} invoices, {w.count('payouts')} payouts, "
            f"{w.count('events')} events"
        )
        print(f"Sage Pro sandbox {pair.sage_url} (state in {data / 'sage_sandbox.sqlite3'})")
        first = stripe_to_sage(trigger="demo")
        print_run("first run (backfill)", first)
        print_payout_shapes(data / "stripe_sage.duckdb")
        second = stripe_to_sage(trigger="demo")
        print_run("second run (nothing changed: posts nothing)", second)
        # New activity after the first runs: a charge, a late refund, an invoice paid late.
        new_charge = w.create_charge(customer=_chargeable(w), amount=4_200, currency="usd")
        w.refund_charge(_refundable(w), None)
        opened = w.open_invoices()
        if opened:
            w.pay_invoice(opened[0])
        third = stripe_to_sage(trigger="demo")
        print_run(
            f"third run (new charge {w.make_id('charges', new_charge)}, a late refund, "
            "an invoice paid late)",
            third,
        )
    db = data / "stripe_sage.duckdb"
    snap = data / "snapshot" / "analytics.duckdb"
    print(f"""
Where to look
  staging DB   {db} (written by flow runs only)
  analysts     {snap} (read-only snapshot, refreshed by each run), e.g.
               .venv/bin/python -c "import duckdb; print(duckdb.connect('{snap}',
               read_only=True).sql('select doc_type, status, count(*) from sage.outbox
               group by all'))"
  payouts      {data / "reconciliation.html"}; .venv/bin/stripe-sage reconcile
  dead letters ops.dead_letters (reason, Sage error code and field)
  run history  ops.runs; quality report {first.get("data_docs") or "-"}
  Prefect UI   make serve (these runs, the deployments and their schedules), then open
               http://127.0.0.1:4200; make ui also starts the sandboxes and opens it""")
    return 0


def print_payout_shapes(db: Path) -> None:
    """Every payout shape (issue 21): manual payouts, top-ups, Connect lines, suspense."""
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        row = con.execute(
            """
            SELECT
              (SELECT count(*) FROM staging.payouts WHERE NOT automatic) AS manual_payouts,
              (SELECT count(*) FROM sage.outbox WHERE doc_type = 'journal_entry'
                 AND stripe_id LIKE 'po_%' AND status = 'posted'
                 AND stripe_id IN (SELECT id FROM staging.payouts WHERE NOT automatic))
                 AS manual_journals,
              (SELECT count(*) FROM sage.outbox WHERE status = 'posted'
                 AND split_part(stripe_id, ':', 1) IN ('topup', 'topup_reversal')) AS topups,
              (SELECT count(*) FROM sage.outbox WHERE status = 'posted'
                 AND stripe_id LIKE 'stripe_day:%') AS daily_journals,
              (SELECT count(*) FROM staging.balance_transactions WHERE reporting_category IN
                 ('platform_earning', 'platform_earning_refund', 'transfer',
                  'transfer_reversal')) AS connect_transactions,
              (SELECT count(*) FROM ops.flags WHERE flag LIKE 'suspense:%') AS suspense
            """
        ).fetchall()[0]
    names = (
        "manual payouts",
        "manual payout journals",
        "top-up journals",
        "daily fee journals",
        "Connect transactions",
        "journals with suspense lines",
    )
    print("  payout shapes: " + ", ".join(f"{n} {k}" for k, n in zip(names, row, strict=True)))


def _refundable(w: Any) -> int:
    """The newest base charge that can still be refunded (for the demo's late refund): not
    declined, captured (an authorization moved no money), not refunded or disputed yet."""
    for i in range(len(w.b.charges) - 1, -1, -1):
        ch = w.charge(i)
        if not ch.failed and not ch.auth and not w.refunds_of_charge(i) and w.b.ch_dispute[i] < 0:
            return i
    raise RuntimeError("no refundable charge")


def _chargeable(w: Any) -> int:
    """The first customer Stripe can still charge (the business deletes a few)."""
    return next(k for k in range(w.count("customers")) if not w.is_deleted(k))
