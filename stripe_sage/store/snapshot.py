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
    "ops.ar_tie_out",
    "ops.customer_conflicts",
    "ops.sync_state",
    "ops.console_actions",
    "ops.console_users",
    "ops.console_mapping_versions",
)
SNAPSHOT_DB = "analytics.duckdb"
# "What is not in Sage and why", written once per run (not a view over the outbox, the
# snapshot's biggest table): every unposted document with its state, reason and reason
# class (ids and numbers taken out: the console's counts by reason and "replay all like
# this"), its payload, and the staged Stripe object behind it as JSON (the console shows
# it beside the payload; found by id in the staged table here, not by a scan per page view);
# and every quarantined Stripe record.
UNPOSTED_SQL = """
WITH u AS (
    SELECT doc_key, doc_type, stripe_id, status AS state, last_error AS reason,
        coalesce(waiting_since, created_at) AS since, attempts, payload, depends_on
    FROM sage.outbox WHERE status <> 'posted'
    UNION ALL
    SELECT stream || ':' || id, stream, id, 'quarantined', "check" || ': ' || reason,
        quarantined_at, 0, NULL, NULL
    FROM staging.quarantine)
SELECT u.*, {reason_class} AS reason_class, o.stripe_object
FROM u LEFT JOIN ({objects}) o ON o.id = u.stripe_id"""


# The Stripe object behind a document, by its id's prefix (staging.<stream> in the snapshot).
STREAM_BY_PREFIX = {
    "ch": "charges",
    "re": "refunds",
    "cus": "customers",
    "in": "invoices",
    "po": "payouts",
    "txn": "balance_transactions",
    "dp": "disputes",
    "prod": "products",
    "cn": "credit_notes",
}


def reason_class_sql(column: str) -> str:
    """A DuckDB expression: the reason with its ids and numbers taken out, so that documents
    failing for the same cause group together (counts by reason, "replay all like this")."""
    ids = r"\b(ch|cus|re|in|po|txn|pi|py|dp|prod|ii|il|sub|cn|cs)_[A-Za-z0-9]+"
    return (
        "regexp_replace(regexp_replace(regexp_replace("
        f"coalesce({column}, '(no reason recorded)'), '{ids}', '<id>', 'g'), "
        r"'\b[A-Z]{2,}[0-9]{3,}\b', '<no>', 'g'), '[0-9]+(\.[0-9]+)?', '<n>', 'g')"
    )


def _unposted_sql(tables: list[str]) -> str:
    objects = [
        f"SELECT s.id, CAST(to_json(s) AS VARCHAR) AS stripe_object FROM staging.{stream} s "
        "WHERE s.id IN (SELECT stripe_id FROM u)"
        for stream in STREAM_BY_PREFIX.values()
        if f"staging.{stream}" in tables
    ]
    union = " UNION ALL ".join(objects) or "SELECT NULL AS id, NULL AS stripe_object"
    return UNPOSTED_SQL.format(reason_class=reason_class_sql("u.reason"), objects=union)


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
    unposted = {"sage.outbox", "staging.quarantine"} <= set(tables)
    if unposted:
        st._exec(
            f"COPY ({_unposted_sql(tables)}) TO '{partial / 'ops.unposted.parquet'}' "
            "(FORMAT parquet)"
        )
    partial.rename(directory)
    db_tmp = root / f".{directory.name}.duckdb"
    con = duckdb.connect(str(db_tmp))
    try:
        for schema in sorted({t.split(".")[0] for t in tables}):
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        for table in tables:
            path = (directory / f"{table}.parquet").resolve()
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
        if unposted:
            con.execute("CREATE SCHEMA IF NOT EXISTS ops")
            path = (directory / "ops.unposted.parquet").resolve()
            con.execute(f"CREATE VIEW ops.unposted AS SELECT * FROM read_parquet('{path}')")
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
