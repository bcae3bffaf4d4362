"""What the console shows, read from the analysts' published snapshot (read-only views over
Parquet; the console never opens the staging file, so it never waits on or blocks a run)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb

from stripe_sage.console.advice import likely_fix
from stripe_sage.reconcile.ar import AR_TIE_OUT_COLUMNS
from stripe_sage.store.snapshot import STREAM_BY_PREFIX, reason_class_sql

PAGE_ROWS = 200  # rows per page of the long tables (exceptions, a payout's transactions)
UNPOSTED_STATES = ("dead", "blocked", "waiting", "pending", "quarantined")
REASON_CLASS = reason_class_sql("reason")


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        f"{s}.{t}"
        for s, t in con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
        ).fetchall()
    }


class Snapshot:
    """One published snapshot, opened read-only per request (a publish in between swaps the
    file; the next request sees the new one)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def open(self) -> Iterator[duckdb.DuckDBPyConnection | None]:
        if not self.path.exists():
            yield None
            return
        con = duckdb.connect(str(self.path), read_only=True)
        try:
            yield con
        finally:
            con.close()


def _unposted(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The columns of ops.unposted (empty when the snapshot has none). Snapshots published
    since the console's benchmark keep the reason class, the payload and the staged Stripe
    object there (written once per run); older ones are read the slow way."""
    return {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'ops' AND table_name = 'unposted'"
        ).fetchall()
    }


def _reason_class(columns: set[str]) -> str:
    return "reason_class" if "reason_class" in columns else REASON_CLASS


def meta(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    rows = _rows(con, "SELECT run_id, published_at FROM meta.snapshot")
    return rows[0] if rows else {}


def last_runs(con: duckdb.DuckDBPyConnection, limit: int = 10) -> list[dict[str, Any]]:
    rows = _rows(
        con,
        "SELECT run_id, flow, trigger, prefect_run_id, started_at, ended_at, status, error, "
        "counts FROM ops.runs ORDER BY started_at DESC LIMIT ?",
        [limit],
    )
    for r in rows:
        counts = json.loads(r.pop("counts") or "{}")
        load = counts.get("load") or {}
        r["posted"] = sum((load.get("posted") or {}).values())
        r["dead"] = sum((load.get("dead") or {}).values())
        r["seconds"] = counts.get("seconds")
    return rows


def posted_today(con: duckdb.DuckDBPyConnection, today: dt.date) -> list[dict[str, Any]]:
    return _rows(
        con,
        "SELECT doc_type, count(*) AS n FROM sage.outbox WHERE status = 'posted' "
        "AND posted_at >= ?::DATE GROUP BY ALL ORDER BY n DESC",
        [today],
    )


def needs_a_person(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """Unposted documents and quarantined records, counted by state and by reason (ids taken
    out, so one cause is one line)."""
    columns = _unposted(con)
    if not columns:
        return []
    rows = _rows(
        con,
        f"SELECT state, {_reason_class(columns)} AS reason_class, count(*) AS n, "
        "any_value(reason) AS "
        "example FROM ops.unposted GROUP BY ALL ORDER BY n DESC, state",
    )
    for r in rows:
        r["fix"] = likely_fix(r["state"], r["example"])
    return rows


def state_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = dict.fromkeys(UNPOSTED_STATES, 0)
    for r in rows:
        out[r["state"]] = out.get(r["state"], 0) + r["n"]
    return out


def tie_outs(con: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    """The latest run's reconciliation: payouts by status, the Stripe Clearing check and the
    AR tie-out totals (per currency)."""
    rows = _rows(
        con,
        "SELECT json_extract(counts, '$.reconciliation') AS rec, ended_at FROM ops.runs "
        "WHERE json_extract(counts, '$.reconciliation') IS NOT NULL "
        "ORDER BY started_at DESC LIMIT 1",
    )
    if not rows:
        return {}
    rec = json.loads(rows[0]["rec"])
    return {
        "payouts": rec.get("payouts") or {},
        "clearing": rec.get("clearing") or [],
        "ar": rec.get("ar") or [],
        "at": rows[0]["ended_at"],
    }


def exceptions(
    con: duckdb.DuckDBPyConnection,
    *,
    state: str | None = None,
    reason_class: str | None = None,
    limit: int = PAGE_ROWS,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """One page of the unposted documents (and quarantined records) with their reason and
    likely fix, oldest first, and how many match in all."""
    columns = _unposted(con)
    if not columns:
        return [], 0
    reason_sql = _reason_class(columns)
    where, params = ["true"], []
    if state:
        where.append("state = ?")
        params.append(state)
    if reason_class:
        where.append(f"{reason_sql} = ?")
        params.append(reason_class)
    # The count and the page in one scan (the window runs over the filtered rows only).
    rows = _rows(
        con,
        f"SELECT doc_key, doc_type, stripe_id, state, reason, since, attempts, "
        f"{reason_sql} AS reason_class, count(*) OVER () AS total FROM ops.unposted "
        f"WHERE {' AND '.join(where)} ORDER BY since, doc_key LIMIT ? OFFSET ?",
        [*params, limit, offset],
    )
    total = rows[0]["total"] if rows else 0
    if not rows and offset:
        total = con.execute(
            f"SELECT count(*) FROM ops.unposted WHERE {' AND '.join(where)}", params
        ).fetchall()[0][0]
    for r in rows:
        r["fix"] = likely_fix(r["state"], r["reason"])
    return rows, int(total)


def keys_with_reason(
    con: duckdb.DuckDBPyConnection, reason_class: str, state: str = "dead"
) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            f"SELECT doc_key FROM ops.unposted WHERE state = ? "
            f"AND {_reason_class(_unposted(con))} = ? "
            "ORDER BY doc_key",
            [state, reason_class],
        ).fetchall()
    ]


def exception(con: duckdb.DuckDBPyConnection, doc_key: str) -> dict[str, Any] | None:
    """One unposted document: its reason, Sage's answer, the payload and the Stripe object."""
    columns = _unposted(con)
    if not columns:
        return None
    stored = "payload" in columns and "stripe_object" in columns
    extra = ", payload, depends_on, stripe_object" if stored else ""
    rows = _rows(
        con,
        f"SELECT doc_key, doc_type, stripe_id, state, reason, since, attempts, "
        f"{_reason_class(columns)} AS reason_class{extra} FROM ops.unposted WHERE doc_key = ?",
        [doc_key],
    )
    if not rows:
        return None
    doc = rows[0]
    doc["fix"] = likely_fix(doc["state"], doc["reason"])
    if stored:
        doc["payload"] = _pretty(doc["payload"])
        doc["depends_on"] = doc["depends_on"] or []
        doc["stripe_object"] = _pretty(doc["stripe_object"])
    else:  # an older snapshot: look the outbox row and the staged object up
        outbox = _rows(
            con, "SELECT payload, depends_on FROM sage.outbox WHERE doc_key = ?", [doc_key]
        )
        doc["payload"] = _pretty(outbox[0]["payload"]) if outbox else None
        doc["depends_on"] = (outbox[0]["depends_on"] or []) if outbox else []
        doc["stripe_object"] = stripe_object(con, doc["stripe_id"])
    letters = _rows(
        con,
        "SELECT http_status, error_code, error_field, occurrences, first_seen, last_seen, "
        "replayed, replayed_at FROM ops.dead_letters WHERE doc_key = ?",
        [doc_key],
    )
    doc["dead_letter"] = letters[0] if letters else None
    return doc


def stripe_object(con: duckdb.DuckDBPyConnection, stripe_id: str | None) -> str | None:
    """The staged Stripe row behind a document, as pretty JSON (None when not staged)."""
    if not stripe_id or "_" not in stripe_id:
        return None
    stream = STREAM_BY_PREFIX.get(stripe_id.split("_", 1)[0])
    if stream is None or f"staging.{stream}" not in _tables(con):
        return None
    rows = _rows(con, f"SELECT * FROM staging.{stream} WHERE id = ? LIMIT 1", [stripe_id])
    return json.dumps(rows[0], indent=2, default=str, ensure_ascii=False) if rows else None


def _pretty(payload: Any) -> str | None:
    if payload is None:
        return None
    try:
        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(payload)


# -- reconciliation ---------------------------------------------------------------------------
AR_COLUMNS = AR_TIE_OUT_COLUMNS  # ops.ar_tie_out, as the report writes it


def ar_customers(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The latest AR tie-out per customer (``ops.ar_tie_out``, minor units): unexplained
    differences first, then differences, then the largest open amounts."""
    if "ops.ar_tie_out" not in _tables(con):
        return []
    return _rows(
        con,
        f"SELECT {', '.join(AR_COLUMNS)} FROM ops.ar_tie_out ORDER BY abs(unexplained) DESC, "
        "abs(difference) DESC, stripe_open DESC, currency, customer",
    )


PAYOUT_COLUMNS = (
    "payout",
    "arrival_date",
    "currency",
    "status",
    "amount",
    "gross",
    "fees",
    "refunds",
    "disputes",
    "net",
    "journal_no",
    "recon_status",
    "difference",
)
TRANSACTION_COLUMNS = (
    "id",
    "created",
    "type",
    "reporting_category",
    "source",
    "currency",
    "amount",
    "fee",
    "net",
    "sage_documents",
)


def payouts(
    con: duckdb.DuckDBPyConnection, limit: int = 1000, payout: str | None = None
) -> list[dict[str, Any]]:
    """The latest reconciliation, one row per payout with its Stripe status, newest first
    (only ``payout`` when given)."""
    if "ops.reconciliation" not in _tables(con):
        return []
    return _rows(
        con,
        "SELECT r.payout, r.arrival_date, p.currency, p.status, r.amount, r.gross, r.fees, "
        "r.refunds, r.disputes, r.net, r.journal_no, r.recon_status, r.difference "
        "FROM ops.reconciliation r LEFT JOIN staging.payouts p ON p.id = r.payout "
        "WHERE ? IS NULL OR r.payout = ? ORDER BY r.arrival_date DESC, r.payout LIMIT ?",
        [payout, payout, limit],
    )


def payout_transactions(
    con: duckdb.DuckDBPyConnection,
    payout: str,
    limit: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """A payout's balance transactions (as Stripe itemised it) and the Sage documents behind
    each one's source: type, Sage number or, when not in Sage, its state."""
    # One join over the payout's own sources (not a lookup per transaction): the outbox is
    # the biggest table in the snapshot.
    # The page first (a window counts them all), then only its sources' documents.
    return _rows(
        con,
        "WITH b AS (SELECT b.id, b.created, b.type, b.reporting_category, b.source, b.currency, "
        "b.amount, b.fee, b.net, count(*) OVER () AS total FROM staging.payout_items i "
        "JOIN staging.balance_transactions b ON b.id = i.balance_transaction "
        "WHERE i.payout = ? ORDER BY b.created, b.id LIMIT ? OFFSET ?), "
        "d AS (SELECT stripe_id, string_agg(doc_type || ' ' || coalesce(sage_id, status), ', ' "
        "ORDER BY phase, doc_type) AS sage_documents FROM sage.outbox "
        "WHERE stripe_id IN (SELECT source FROM b) GROUP BY stripe_id) "
        "SELECT b.*, d.sage_documents FROM b LEFT JOIN d ON d.stripe_id = b.source "
        "ORDER BY b.created, b.id",
        [payout, limit, offset],
    )
