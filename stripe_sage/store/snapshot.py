"""The analysts' published snapshot: Parquet files plus a read-only DuckDB file of views.

DuckDB allows one writer process, and while a run writes the staging file nobody else can
open it. So each run ends by exporting the analyst tables to Parquet in a directory of its
own and writing a small DuckDB file of views over them (same schema.table names), which
replaces ``analytics.duckdb`` atomically (``os.replace``). A query therefore never waits on a
lock and never sees a half-finished run: a connection opened before a publish keeps reading
the snapshot it opened; the next connection sees the new one. The last few snapshot
directories are kept so that such readers find their files.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import duckdb

from stripe_sage.store.schema import SNAPSHOT_META_DDL
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.streams import STREAMS

EXTRA_TABLES = (
    "staging.quarantine",
    "staging.payout_items",
    "sage.outbox",
    "sage.xref",
    "ops.runs",
    "ops.dead_letters",
    "ops.flags",
    "ops.reconciliation",
    "ops.customer_conflicts",
    "ops.sync_state",
    "ops.console_actions",
    "ops.console_users",
)
SNAPSHOT_DB = "analytics.duckdb"
UNPOSTED_VIEW = """
CREATE VIEW ops.unposted AS
SELECT doc_key, doc_type, stripe_id, status AS state, last_error AS reason,
    coalesce(waiting_since, created_at) AS since, attempts
FROM sage.outbox WHERE status <> 'posted'
UNION ALL
SELECT stream || ':' || id, stream, id, 'quarantined', "check" || ': ' || reason,
    quarantined_at, 0
FROM staging.quarantine"""

# Subscriptions for analysts (issue 18, docs/accounting.md §3 "Stripe Billing, completely"): one row
# per subscription item with its status, price, quantity and current period end, and the
# monthly recurring revenue per customer. MRR in minor units of the price's currency: a
# live subscription's (active, trialing, past_due) unit_amount x quantity, brought to one
# month (a year is 12 months, a week 52/12 of one, a day 365/12 of one) and rounded half-up.
SUBSCRIPTION_ITEMS_VIEW = """
CREATE VIEW billing.subscription_items AS
SELECT s.id AS subscription, s.customer, s.status, i.id AS item, i.price, i.product,
    i.quantity, i.unit_amount, coalesce(i.currency, s.currency) AS currency,
    i."interval", i.interval_count, i.current_period_end,
    CASE WHEN s.status IN ('active', 'trialing', 'past_due') THEN
        CAST(round(i.unit_amount * i.quantity * CASE i."interval"
            WHEN 'month' THEN 1.0 WHEN 'year' THEN 1.0 / 12 WHEN 'week' THEN 52.0 / 12
            WHEN 'day' THEN 365.0 / 12 END / coalesce(nullif(i.interval_count, 0), 1)) AS BIGINT)
    ELSE 0 END AS mrr
FROM staging.subscriptions s, unnest(s.items) AS u(i)"""
MRR_VIEW = """
CREATE VIEW billing.mrr_by_customer AS
SELECT customer, currency,
    count(DISTINCT subscription) FILTER (WHERE mrr > 0) AS live_subscriptions,
    sum(mrr) AS mrr
FROM billing.subscription_items GROUP BY customer, currency"""


def analyst_tables(st: Staging) -> list[str]:
    present = {
        f"{s}.{t}"
        for s, t in st.con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
    }
    wanted = [f"staging.{s}" for s in STREAMS] + list(EXTRA_TABLES)
    return [t for t in wanted if t in present]


def publish(st: Staging, root: Path, run_id: str, *, keep: int = 3) -> Path:
    """Export, write the views file beside, swap it in; returns the snapshot DB path."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    directory = root / f"{stamp}-{run_id[:8]}"
    partial = root / f".{directory.name}.partial"
    partial.mkdir()
    tables = analyst_tables(st)
    for table in tables:
        st._exec(f"COPY {table} TO '{partial / (table + '.parquet')}' (FORMAT parquet)")
    partial.rename(directory)
    db_tmp = root / f".{directory.name}.duckdb"
    con = duckdb.connect(str(db_tmp))
    try:
        for schema in sorted({t.split(".")[0] for t in tables}):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        for table in tables:
            path = (directory / f"{table}.parquet").resolve()
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
        if {"sage.outbox", "staging.quarantine"} <= set(tables):
            # One place for "what is not in Sage and why": every unposted document with its
            # state and reason, and every quarantined Stripe record.
            con.execute("CREATE SCHEMA IF NOT EXISTS ops")
            con.execute(UNPOSTED_VIEW)
        if "staging.subscriptions" in tables:
            con.execute("CREATE SCHEMA IF NOT EXISTS billing")
            con.execute(SUBSCRIPTION_ITEMS_VIEW)
            con.execute(MRR_VIEW)
        con.execute("CREATE SCHEMA IF NOT EXISTS meta")
        con.execute(
            SNAPSHOT_META_DDL,
            [run_id, dt.datetime.now(dt.UTC), str(directory)],
        )
    finally:
        con.close()
    target = root / SNAPSHOT_DB
    os.replace(db_tmp, target)  # atomic: readers see the old snapshot or the new one
    snapshots = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for old in snapshots[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target
