"""DuckDB staging: the tables analysts rely on (docs/architecture.md); the only code writing them.

One ``Staging`` object owns one DuckDB connection, used from one thread: extract threads hand
pages over, this writes them. Cursors move in the same transaction as the data they cover.
Secrets never reach any table (nothing here receives them).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import re
import time
from collections.abc import Collection, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import orjson
import polars as pl
import pyarrow as pa

from stripe_sage.errors import ConfigurationError
from stripe_sage.store.schema import OPS_DDL, SCHEMAS, raw_table_ddl, staging_table_ddl
from stripe_sage.stripe.streams import STREAM_ORDER, STREAMS

# What ``sage.outbox.status`` says of a document; ``last_error`` is the reason a person reads
# for every state but ``posted``.
OUTBOX_STATES = {
    "pending": "planned, not posted yet (or deferred by a transient Sage failure: retried)",
    "posted": "in Sage (its number in sage_id and sage.xref)",
    "dead": "Sage rejected it or it could not be planned (ops.dead_letters)",
    "waiting": "waits for Stripe data that does not exist yet; planned again by each run",
    "blocked": "depends on a dead, quarantined or missing document (named in the reason)",
}
UNPOSTED_STATES = ("dead", "waiting", "blocked", "pending")
# The due date an "awaiting settlement" reason names: a foreign-currency invoice is expected
# to wait until then (plan_invoices writes it).
SETTLEMENT_DUE = re.compile(r"\bdue (\d{4}-\d{2}-\d{2})\b")
STAGE_SLICE = 4_000
# The documents the planner must not plan again: everything in the outbox but what waits and
# what died of a planning error (both are planned again by every run).
SETTLED_DOCUMENTS = (
    "SELECT o.doc_key FROM sage.outbox o LEFT JOIN ops.dead_letters d USING (doc_key) "
    "WHERE o.status <> 'waiting' AND (o.status <> 'dead' "
    "OR coalesce(d.error_code, '') <> 'planning')"
)
# The columns a planned document is written with (``Staging.write_planned``).
OUTBOX_WRITE_COLUMNS = (
    "doc_key",
    "doc_type",
    "collection",
    "stripe_id",
    "phase",
    "depends_on",
    "payload",
    "status",
    "sage_id",
    "attempts",
    "last_error",
    "created_at",
    "updated_at",
    "posted_at",
    "run_id",
    "waiting_since",
    "wait_kind",
)


def keys_in(keys: Sequence[str]) -> str:
    """``(?, ?, …)``: an IN list of constants lets DuckDB find the keys through the outbox's
    primary-key index; ``IN (SELECT unnest(?))`` scans the whole outbox (2M rows at 1M
    charges), several times per batch of documents."""
    return "(" + ", ".join("?" * len(keys)) + ")"


def not_quarantined(stream: str, alias: str = "s") -> str:
    """SQL condition: the row ``alias`` of ``staging.<stream>`` is not quarantined (the
    planner reads no quarantined row)."""
    return (
        f"NOT EXISTS (SELECT 1 FROM staging.quarantine q WHERE q.stream = '{stream}' "
        f"AND q.id = {alias}.id)"
    )


def _connect(
    path: Path, read_only: bool, config: dict[str, Any], wait_seconds: float = 120.0
) -> duckdb.DuckDBPyConnection:
    """DuckDB allows one writer process: wait for another run to finish with the file rather
    than fail (flow runs triggered by webhooks and by the schedule take turns)."""
    deadline = time.monotonic() + wait_seconds
    delay = 0.2
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=config)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


_JSON_ACCESS = re.compile(r"data->(>?)'([^']*)'")


@functools.cache
def stage_query(stream: str, source: str, staged_at: str = "?") -> str:
    """The ``SELECT`` typing rows of ``source`` (columns ``id``, ``data`` as JSON, ``run_id``)
    into ``staging.<stream>``'s columns, ``run_id`` and ``staged_at`` (a parameter).

    The streams declare each column as SQL over ``data`` (``data->>'path'`` and friends);
    evaluated as written, every column would parse the whole document again (a charge is
    a few KB and has dozens of columns). So each ``data->>'p'`` / ``data->'p'`` becomes an
    element of one ``json_extract_string`` / ``json_extract`` over a list of paths, which
    parses each document once."""
    paths: dict[str, dict[str, int]] = {"s": {}, "j": {}}

    def one_parse(m: re.Match[str]) -> str:
        kind = "s" if m.group(1) else "j"
        path = m.group(2) if m.group(2).startswith(("$", "/")) else f"$.{m.group(2)}"
        index = paths[kind].setdefault(path, len(paths[kind]) + 1)
        return f"_{kind}[{index}]"

    exprs = ", ".join(
        f'{_JSON_ACCESS.sub(one_parse, c.expr)} AS "{c.name}"' for c in STREAMS[stream].columns
    )
    parsed = "".join(
        f", {fn}(data, [{', '.join(repr(p) for p in paths[kind])}]) AS _{kind}"
        for kind, fn in (("s", "json_extract_string"), ("j", "json_extract"))
        if paths[kind]
    )
    return f"""
        SELECT {exprs}, run_id, {staged_at}::TIMESTAMPTZ AS staged_at
        FROM (SELECT id, data, run_id{parsed} FROM ({source}))"""


def raw_json(obj: dict[str, Any]) -> str:
    """An object as stored in ``raw.*.data`` (one serialisation for every path that writes it,
    so the same object is the same text however it was read)."""
    return orjson.dumps(obj).decode()


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# The outbox rows of one planning run, or of every run when ``$run_id`` is NULL (a micro-batch
# served during a sync posts only its own: flows/realtime_processor.py SyncEventPump).
_OF_RUN = "($run_id IS NULL OR run_id = $run_id)"


class Staging:
    """The staging database. ``with Staging(path) as st: ...``."""

    def __init__(
        self, path: Path | str, *, read_only: bool = False, memory_limit: str = "1GB"
    ) -> None:
        self.path = Path(path)
        if self.path.stem.lower() in SCHEMAS:
            # DuckDB names the database after the file: "staging.duckdb" would make
            # staging.charges ambiguous (catalog or schema?).
            raise ConfigurationError(
                f"the staging DB file may not be named {self.path.name!r}: DuckDB would confuse "
                f"it with the {self.path.stem!r} schema; choose e.g. stripe_sage.duckdb"
            )
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # DuckDB's default buffer pool is 80% of RAM; a sync needs far less, and the rest of
        # the process (extract pages, Polars frames) shares the machine. With the default
        # 16 MB WAL, an extract checkpoints every few thousand objects, and each checkpoint
        # writes the tables' primary-key indexes again: a third of the writer's time at 30k
        # charges. The WAL is durable either way; closing the database checkpoints.
        config = {
            "memory_limit": memory_limit,
            "preserve_insertion_order": False,
            "checkpoint_threshold": "1GB",
        }
        self.con = _connect(self.path, read_only, config)
        self._exec("SET TimeZone = 'UTC'")
        if not read_only:
            self.migrate()

    def _exec(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        """Run a statement to completion (DuckDB 2 keeps a result pending until fetched)."""
        self.con.execute(sql, params or []).fetchall()

    def close(self) -> None:
        self.con.close()

    def checkpoint(self) -> None:
        """Write the WAL into the database file."""
        self._exec("CHECKPOINT")

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ----------------------------------------------------------------------------
    def migrate(self) -> None:
        for schema in SCHEMAS:
            self._exec(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        for stream in STREAMS.values():
            self._exec(raw_table_ddl(stream))
            self._exec(staging_table_ddl(stream))
            self._add_new_columns(stream.name)
        self._exec(OPS_DDL)

    def _add_new_columns(self, stream: str) -> None:
        """Columns a stream gained since this file was made (e.g. ``charges.captured``):
        added at the end of the table (rows are written by name) and filled from the raw
        documents already stored, so old rows read as if they had been staged today."""
        have = {
            r[0]
            for r in self.con.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = 'staging' AND table_name = ?",
                [stream],
            ).fetchall()
        }
        new = [c for c in STREAMS[stream].columns if c.name not in have]
        if not new:
            return
        for c in new:
            self._exec(
                f'ALTER TABLE staging.{stream} ADD COLUMN IF NOT EXISTS "{c.name}" {c.sql_type}'
            )
        # One pass over the raw documents fills them all (their SQL reads ``data``).
        sets = ", ".join(f'"{c.name}" = {c.expr}' for c in new)
        self._exec(
            f"UPDATE staging.{stream} SET {sets} FROM raw.{stream} r "
            f"WHERE r.id = staging.{stream}.id"
        )

    # -- raw -------------------------------------------------------------------------------
    def upsert_raw(
        self,
        stream: str,
        objects: Sequence[dict[str, Any]],
        *,
        source: str,
        run_id: str,
        api_version: str | None = None,
    ) -> int:
        """Insert or replace objects by id (latest version wins) and type them into
        ``staging.<stream>`` in the same statement batch, so that staging keeps pace with
        extraction instead of re-reading everything afterwards. Returns rows written."""
        if not objects:
            return 0
        seen: dict[str, dict[str, Any]] = {}
        for obj in objects:  # one batch may hold an object twice: keep the last
            seen[obj["id"]] = obj
        table = pa.table(
            {
                "id": pa.array(list(seen), pa.string()),
                "created": pa.array([o.get("created") for o in seen.values()], pa.int64()),
                "data": pa.array([raw_json(o) for o in seen.values()], pa.string()),
            }
        )
        with self.registered("_raw_batch", table):
            return self._upsert_rows(
                stream,
                "SELECT id, created, CAST(data AS JSON) AS data FROM _raw_batch",
                source=source,
                run_id=run_id,
                api_version=api_version,
            )

    def upsert_pages(
        self,
        stream: str,
        bodies: Sequence[bytes],
        *,
        source: str,
        run_id: str,
        api_version: str | None = None,
    ) -> int:
        """``upsert_raw`` for list pages as Stripe sent them (``{"data": [...], ...}``): DuckDB
        splits them into objects, keeps each id's last version (pages in order) and types
        them. The extract writer thread builds no Python object per row, so it holds the GIL
        the HTTP threads need only to hand over the bodies. Returns rows written."""
        if not bodies:
            return 0
        table = pa.table(
            {
                "seq": pa.array(range(len(bodies)), pa.int32()),
                "body": pa.array(bodies, pa.binary()).cast(pa.string()),
            }
        )
        with self.registered("_raw_pages", table):
            # One parse of each object for its id and created; json_extract writes each
            # object back minified, as orjson (raw_json) does.
            return self._upsert_rows(
                stream,
                """
                SELECT k[1] AS id, CAST(k[2] AS BIGINT) AS created, data FROM (
                    SELECT seq, pos, data, json_extract_string(data, ['$.id', '$.created']) AS k
                    FROM (
                        SELECT seq, unnest(objs) AS data, generate_subscripts(objs, 1) AS pos
                        FROM (SELECT seq, json_extract(body, '$.data[*]') AS objs FROM _raw_pages)
                    )
                )
                QUALIFY row_number() OVER (PARTITION BY id ORDER BY seq DESC, pos DESC) = 1""",
                source=source,
                run_id=run_id,
                api_version=api_version,
            )

    def _upsert_rows(
        self, stream: str, rows_sql: str, *, source: str, run_id: str, api_version: str | None
    ) -> int:
        """Write ``rows_sql``'s rows (``id``, ``created`` in epoch seconds, ``data`` JSON, one
        row per id) into ``raw.<stream>`` and, typed, into ``staging.<stream>``. The rows are
        materialised once, so each document is parsed once for raw and once for staging."""
        now = now_utc()
        self._exec(
            f"CREATE OR REPLACE TEMP TABLE _raw_rows AS SELECT *, ?::VARCHAR AS run_id "
            f"FROM ({rows_sql})",
            [run_id],
        )
        try:
            self._exec(
                f"""
                INSERT OR REPLACE INTO raw.{stream}
                SELECT id, to_timestamp(created), data, ?, ?, ?, run_id FROM _raw_rows""",
                [source, api_version, now],
            )
            batch = "SELECT id, data, run_id FROM _raw_rows"
            self._exec(
                f"INSERT OR REPLACE INTO staging.{stream} BY NAME {stage_query(stream, batch)}",
                [now],
            )
            (n,) = self.con.execute("SELECT count(*) FROM _raw_rows").fetchone() or (0,)
        finally:
            self._exec("DROP TABLE IF EXISTS _raw_rows")
        return int(n)

    def merge_raw_parquet(
        self,
        stream: str,
        files: Sequence[str],
        *,
        api_version: str | None,
        extracted_at: dt.datetime,
        run_id: str,
    ) -> int:
        """Backfill window files (Parquet: ``id``, ``created``, ``data``) into ``raw.<stream>``
        as listed objects, one row per id; returns the rows of ``raw.<stream>`` this run has
        written. Not staged here (``stage`` catches up); run it inside ``transaction()`` with
        the windows' checkpoints."""
        self._exec(
            f"""
            INSERT OR REPLACE INTO raw.{stream}
            SELECT id, to_timestamp(created), CAST(data AS JSON), 'list', ?, ?, ?
            FROM read_parquet(?)
            QUALIFY row_number() OVER (PARTITION BY id) = 1""",
            [api_version, extracted_at, run_id, list(files)],
        )
        rows = self.con.execute(
            f"SELECT count(*) FROM raw.{stream} WHERE run_id = ?", [run_id]
        ).fetchall()
        return int(rows[0][0])

    def tombstone(self, stream: str, object_id: str, *, run_id: str) -> None:
        """A deleted object: keep the row, flag it (``*.deleted`` events never vanish rows)."""
        self._exec(
            f"""
            UPDATE raw.{stream}
            SET data = json_merge_patch(data, '{{"deleted": true}}'), run_id = ?,
                source = 'event', extracted_at = ?
            WHERE id = ?""",
            [run_id, now_utc(), object_id],
        )

    # -- what extraction asks of the raw tables ------------------------------------------------
    def merge_patches(self, stream: str, patches: pa.Table, *, run_id: str) -> None:
        """JSON merge patches (``patches``: ``id``, ``patch`` as JSON text) into the stored
        objects of ``raw.<stream>``, as changes this run saw in events, in one transaction."""
        with self.transaction(), self.registered("_echo", patches):
            self._exec(
                f"UPDATE raw.{stream} r SET data = json_merge_patch(r.data, e.patch), "
                "run_id = ?, source = 'event', extracted_at = now() FROM _echo e "
                "WHERE r.id = e.id",
                [run_id],
            )

    def written_back(self, stripe_ids: Sequence[str]) -> set[tuple[str, str, str]]:
        """``(stripe_id, field, value)`` our write-back recorded for these objects."""
        if not stripe_ids:
            return set()
        exists = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'sage' "
            "AND table_name = 'writeback'"
        ).fetchall()[0][0]
        if not exists:
            return set()
        rows = self.con.execute(
            "SELECT stripe_id, field, value FROM sage.writeback "
            "WHERE stripe_id IN (SELECT unnest(?::VARCHAR[]))",
            [list(stripe_ids)],
        ).fetchall()
        return {(r[0], r[1], r[2]) for r in rows}

    def listed_by(self, run_id: str, stream: str, ids: Collection[str]) -> set[str]:
        """Those of ``ids`` that run ``run_id`` read from a list of ``stream``."""
        rows = self.con.execute(
            f"SELECT id FROM raw.{stream} WHERE run_id = ? AND source = 'list' "
            "AND id IN (SELECT unnest(?::VARCHAR[]))",
            [run_id, list(ids)],
        ).fetchall()
        return {r[0] for r in rows}

    def customers_missing_for(self, run_id: str) -> list[str]:
        """Customers that charges or invoices written by this run name but raw has not."""
        return self._ids(
            "SELECT DISTINCT c FROM (SELECT data->>'customer' AS c FROM raw.charges WHERE "
            "run_id = ?1 UNION SELECT data->>'customer' FROM raw.invoices WHERE run_id = ?1) "
            "WHERE c IS NOT NULL AND c NOT IN (SELECT id FROM raw.customers)",
            [run_id],
        )

    def customers_referenced_unlisted(self) -> list[str]:
        """Customers that staged charges or invoices name but raw has not, by id."""
        return self._ids(
            "SELECT DISTINCT customer FROM (SELECT customer FROM staging.charges "
            "UNION ALL SELECT customer FROM staging.invoices) "
            "WHERE customer IS NOT NULL AND customer NOT IN "
            "(SELECT id FROM raw.customers) ORDER BY 1"
        )

    def unknown_customers_first_named(self, ids: Sequence[str]) -> dict[str, int | None]:
        """Those of ``ids`` raw has no customer for → when a staged charge or invoice first
        named them (epoch seconds; None if none does)."""
        rows = self.con.execute(
            "WITH wanted AS (SELECT unnest(?::VARCHAR[]) AS id) "
            "SELECT w.id, CAST(epoch(min(x.created)) AS BIGINT) FROM wanted w "
            "LEFT JOIN (SELECT customer, created FROM staging.charges UNION ALL "
            "SELECT customer, created FROM staging.invoices) x ON x.customer = w.id "
            "WHERE w.id NOT IN (SELECT id FROM raw.customers) GROUP BY w.id",
            [list(ids)],
        ).fetchall()
        return dict(rows)

    def balance_transactions_missing_for(self, run_id: str) -> list[str]:
        """Balance transactions that charges, refunds or payouts written by this run name
        but raw has not."""
        return self._ids(
            "SELECT DISTINCT t FROM ("
            "SELECT data->>'balance_transaction' AS t FROM raw.charges WHERE run_id = ?1 "
            "UNION SELECT data->>'balance_transaction' FROM raw.refunds WHERE run_id = ?1 "
            "UNION SELECT data->>'failure_balance_transaction' FROM raw.refunds "
            "WHERE run_id = ?1 "
            "UNION SELECT data->>'balance_transaction' FROM raw.payouts WHERE run_id = ?1 "
            "UNION SELECT data->>'failure_balance_transaction' FROM raw.payouts "
            "WHERE run_id = ?1) "
            "WHERE t IS NOT NULL AND t NOT IN (SELECT id FROM raw.balance_transactions)",
            [run_id],
        )

    def payment_intents_without_session(self, run_id: str) -> list[str]:
        """Payment intents of charges written by this run that no stored Checkout Session
        names and Stripe was never asked about (``staging.checkout_lookups``), by id."""
        return self._ids(
            "SELECT DISTINCT data->>'payment_intent' AS pi FROM raw.charges "
            "WHERE run_id = ? AND data->>'payment_intent' IS NOT NULL "
            "AND data->>'payment_intent' NOT IN (SELECT payment_intent FROM "
            "staging.checkout_lookups) AND data->>'payment_intent' NOT IN ("
            "SELECT data->>'payment_intent' FROM raw.checkout_sessions "
            "WHERE data->>'payment_intent' IS NOT NULL) ORDER BY 1",
            [run_id],
        )

    def live_customers_not_read_by(self, run_id: str) -> list[str]:
        """Customers not deleted as far as raw knows that run ``run_id`` did not read."""
        return self._ids(
            "SELECT id FROM raw.customers WHERE run_id <> ? AND "
            "coalesce(CAST(data->>'deleted' AS BOOLEAN), false) = false",
            [run_id],
        )

    def _ids(self, sql: str, params: Sequence[Any] | None = None) -> list[str]:
        """The first column of a query's rows."""
        return [r[0] for r in self.con.execute(sql, params or []).fetchall()]

    # -- staging ---------------------------------------------------------------------------
    def stage(self, stream: str, run_id: str) -> int:
        """Type the raw rows this run wrote that staging has not caught up with yet, and
        return how many rows of ``staging.<stream>`` this run touched.

        Pages written through ``upsert_raw`` are staged as they land; what is left are rows
        merged in bulk (backfill windows) or changed in place (tombstones, write-back echoes):
        a raw row of this run whose staged copy is missing, from another run, or older.
        One streaming pass in batches (linear, and bounded in memory: one statement over a
        large backfill would hold every parsed document at once)."""
        staged_at = now_utc()
        # A relation's Arrow reader streams; the writes go through the main connection
        # while a cursor (its own connection to the same database) reads.
        reader_con = self.con.cursor()
        try:
            behind = f"""
                SELECT r.id, r.data, r.run_id FROM raw.{stream} r
                LEFT JOIN staging.{stream} s ON s.id = r.id
                WHERE r.run_id = $run_id AND (s.id IS NULL OR s.run_id IS DISTINCT FROM r.run_id
                                              OR s.staged_at < r.extracted_at)"""
            todo = reader_con.sql(
                stage_query(stream, behind, staged_at="$staged_at"),
                params={"staged_at": staged_at, "run_id": run_id},
            )
            with todo.to_arrow_reader(batch_size=STAGE_SLICE) as batches:
                for batch in batches:
                    self.con.register("_stage_batch", pa.Table.from_batches([batch]))
                    try:
                        self._exec(
                            f"INSERT OR REPLACE INTO staging.{stream} BY NAME "
                            "SELECT * FROM _stage_batch"
                        )
                    finally:
                        self.con.unregister("_stage_batch")
        finally:
            reader_con.close()
        rows = self.con.execute(
            f"SELECT count(*) FROM staging.{stream} WHERE run_id = ?", [run_id]
        ).fetchall()
        return int(rows[0][0])

    @contextlib.contextmanager
    def registered(self, name: str, frame: pl.DataFrame | pa.Table) -> Iterator[None]:
        """``frame`` readable as the view ``name`` in this connection's SQL, for the block."""
        self.con.register(name, frame.to_arrow() if isinstance(frame, pl.DataFrame) else frame)
        try:
            yield
        finally:
            self.con.unregister(name)

    def frame(self, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        return self.con.sql(sql, params=list(params or [])).pl()

    def changed_slices(self, stream: str, run_id: str, size: int) -> Iterator[pl.DataFrame]:
        """The rows of ``staging.<stream>`` this run changed, ``size`` at a time: one scan,
        streamed through a cursor (its own connection), so the main connection stays free
        and memory holds one slice, not the table. Slices come in no particular order."""
        reader_con = self.con.cursor()
        try:
            changed = reader_con.sql(
                f"SELECT * FROM staging.{stream} WHERE run_id = $run_id", params={"run_id": run_id}
            )
            with changed.to_arrow_reader(batch_size=size) as batches:
                for batch in batches:
                    if batch.num_rows:
                        yield pl.from_arrow(pa.Table.from_batches([batch]))  # type: ignore[misc]
        finally:
            reader_con.close()

    def table(self, stream: str) -> pl.DataFrame:
        return self.frame(f"SELECT * FROM staging.{stream}")

    def stage_all(
        self, run_id: str, streams: Sequence[str] = STREAM_ORDER, *, checkpoint: bool = True
    ) -> dict[str, int]:
        """Stage every stream's changed raw rows, then fold the WAL into the file (unless
        ``checkpoint=False``: the real-time processor checkpoints in its periodic refresh,
        not after every micro-batch of a few rows)."""
        # One look at which streams this run wrote raw rows to: a micro-batch of one event
        # writes two or three of fifteen, and staging each costs two statements.
        written = self.streams_written(run_id, streams)
        staged = {s: self.stage(s, run_id) if s in written else 0 for s in streams}
        # Extraction leaves up to 1 GB of WAL (the checkpoint threshold): fold it into the
        # database file once here, where the run pays for it, not at some later commit.
        if checkpoint:
            self.checkpoint()
        return staged

    def streams_written(self, run_id: str, streams: Sequence[str]) -> set[str]:
        """The streams among ``streams`` whose raw table has rows of run ``run_id``."""
        if not streams:
            return set()
        sql = " UNION ALL ".join(
            f"SELECT '{s}' WHERE EXISTS (SELECT 1 FROM raw.{s} WHERE run_id = $run_id)"
            for s in streams
        )
        return {r[0] for r in self.con.execute(sql, {"run_id": run_id}).fetchall()}

    def set_payout_interval(self, account_id: str, interval: str | None) -> None:
        """The Stripe account's payout schedule as last read (``ops.stripe_account``)."""
        self._exec(
            "INSERT OR REPLACE INTO ops.stripe_account VALUES (?, ?, ?)",
            [account_id, interval, now_utc()],
        )

    def charges_without_balance_transaction(self, limit: int = 500) -> list[str]:
        """Succeeded, captured charges staged before Stripe created their balance
        transaction (their receipts wait for it), oldest id first."""
        rows = self.con.execute(
            "SELECT id FROM staging.charges WHERE balance_transaction IS NULL "
            "AND status = 'succeeded' AND coalesce(captured, true) ORDER BY id LIMIT ?",
            [limit],
        ).fetchall()
        return [r[0] for r in rows]

    def payouts_manual_only(self) -> bool:
        """Whether the account is paid out only manually (its schedule's interval is
        ``manual``), as last read from Stripe."""
        rows = self.con.execute(
            "SELECT payout_interval FROM ops.stripe_account ORDER BY read_at DESC LIMIT 1"
        ).fetchall()
        return bool(rows) and rows[0][0] == "manual"

    def unitemised_payouts(self) -> list[str]:
        """Paid (or paid-then-failed) automatic payouts whose transactions are not stored
        yet (``staging.payout_items``), oldest first."""
        return self._ids(
            "SELECT p.id FROM staging.payouts p WHERE p.automatic "
            "AND p.status IN ('paid', 'failed') "
            "AND NOT EXISTS (SELECT 1 FROM staging.payout_items i WHERE i.payout = p.id) "
            "ORDER BY p.created"
        )

    def record_payout_items(self, payout: str, balance_transactions: Sequence[str]) -> None:
        """The balance transactions Stripe lists for a payout (``staging.payout_items``)."""
        if balance_transactions:
            self._exec(
                "INSERT OR IGNORE INTO staging.payout_items SELECT ?, unnest(?::VARCHAR[])",
                [payout, list(balance_transactions)],
            )

    def replace_reconciliation(self, report: pl.DataFrame) -> None:
        """``ops.reconciliation``: the latest report's rows (its columns as they come)."""
        with self.transaction(), self.registered("_recon", report):
            self._exec("CREATE OR REPLACE TABLE ops.reconciliation AS SELECT * FROM _recon")

    def replace_ar_tie_out(self, rows: pl.DataFrame) -> None:
        """``ops.ar_tie_out``: the latest AR tie-out's rows per customer."""
        with self.transaction(), self.registered("_ar", rows):
            self._exec("CREATE OR REPLACE TABLE ops.ar_tie_out AS SELECT * FROM _ar")

    def posted_clearing_balance(self, account: str, currency: str) -> Decimal:
        """What the posted documents put on the Sage account ``account`` in ``currency``:
        receipts deposited there, less credit memos drawn on it, plus journal lines on it
        (a DECIMAL(18, 3) sum, as Sage keeps it)."""
        rows = self.con.execute(
            """
            SELECT coalesce(sum(CASE
                WHEN doc_type = 'cash_receipt' AND payload->>'deposit_account' = ?1
                    THEN CAST(payload->>'amount' AS DECIMAL(18, 3))
                WHEN doc_type = 'credit_memo' AND payload->>'gl_account' = ?1
                    THEN -CAST(payload->>'amount' AS DECIMAL(18, 3))
                ELSE 0 END), 0)
              + coalesce((SELECT sum(CAST(l->>'debit' AS DECIMAL(18, 3))
                                     - CAST(l->>'credit' AS DECIMAL(18, 3)))
                          FROM sage.outbox o2, unnest(CAST(o2.payload->'lines' AS JSON[])) t(l)
                          WHERE o2.status = 'posted' AND o2.doc_type = 'journal_entry'
                            AND l->>'account' = ?1 AND o2.payload->>'currency' = ?2), 0)
            FROM sage.outbox WHERE status = 'posted' AND payload->>'currency' = ?2
            """,
            [account, currency],
        ).fetchall()
        return Decimal(rows[0][0])

    def suspense_flags(self, run_id: str) -> list[dict[str, Any]]:
        """Journals this run flagged for posting to suspense (unknown reporting categories)."""
        rows = self.con.execute(
            "SELECT doc_key, flag FROM ops.flags WHERE run_id = ? AND flag LIKE 'suspense:%' "
            "ORDER BY doc_key",
            [run_id],
        ).fetchall()
        return [{"doc_key": k, "flag": f} for k, f in rows]

    def row_counts(self) -> dict[str, int]:
        """Rows per staged stream (quality compares a run's counts with these)."""
        return {s: self.count(f"staging.{s}") for s in STREAMS}

    def outbox_totals(self) -> dict[str, dict[str, int]]:
        """Sage documents per type and status, for the run summary and the demo."""
        rows = self.con.execute(
            "SELECT doc_type, status, count(*) FROM sage.outbox GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        out: dict[str, dict[str, int]] = {}
        for doc_type, status, n in rows:
            out.setdefault(doc_type, {})[status] = int(n)
        return out

    def unposted(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every document not in Sage with its state and reason (``state``: only those),
        oldest first: what ``dead-letters list``, the reconciliation and the snapshot show."""
        states = [state] if state else list(UNPOSTED_STATES)
        cols = (
            "doc_key",
            "doc_type",
            "stripe_id",
            "status",
            "reason",
            "since",
            "attempts",
            "wait_kind",
        )
        rows = self.con.execute(
            "SELECT doc_key, doc_type, stripe_id, status, "
            "coalesce(last_error, CASE status WHEN 'pending' THEN 'not posted yet' END), "
            "coalesce(waiting_since, created_at), attempts, wait_kind FROM sage.outbox "
            "WHERE status IN (SELECT unnest(?::VARCHAR[])) ORDER BY 6, doc_key",
            [states],
        ).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def overdue_waiting(
        self, hours: dict[str, float], now: dt.datetime | None = None
    ) -> list[dict[str, Any]]:
        """Waiting documents older than their reason's allowed age (``hours`` by
        ``wait_kind``, ``default`` for the rest), oldest first. A foreign-currency invoice
        awaiting settlement (kind ``settlement``) is only overdue once its due date, named in
        its reason, has passed by that allowance: until then waiting is its normal state."""
        now = now or now_utc()
        default = hours.get("default", 24.0)
        out = []
        for row in self.unposted("waiting"):
            limit = hours.get(row["wait_kind"] or "", default)
            since = row["since"]
            due = SETTLEMENT_DUE.search(row["reason"] or "")
            if row["wait_kind"] == "settlement" and due:
                since = dt.datetime.fromisoformat(due.group(1)).replace(tzinfo=dt.UTC)
            age = (now - since).total_seconds() / 3600 if since else 0.0
            if age >= limit:
                out.append({**row, "age_hours": round(age, 2), "limit_hours": limit})
        return out

    # -- the outbox, as the loader reads it -------------------------------------------------
    def pending_count(self, run_id: str | None = None) -> int:
        """Documents still to post (``pending``); with ``run_id``, only those that run
        planned (a micro-batch served during a sync posts its own, not the sync's)."""
        row = self.con.execute(
            f"SELECT count(*) FROM sage.outbox WHERE status = 'pending' AND {_OF_RUN}",
            {"run_id": run_id},
        ).fetchall()
        return int(row[0][0])

    def pending_by_type(self, run_id: str | None = None) -> dict[str, int]:
        """Pending documents per document type (what a run leaves deferred), of run
        ``run_id`` only when given."""
        rows = self.con.execute(
            f"SELECT doc_type, count(*) FROM sage.outbox WHERE status = 'pending' AND {_OF_RUN} "
            "GROUP BY ALL",
            {"run_id": run_id},
        ).fetchall()
        return {str(t): int(n) for t, n in rows}

    def pending_keys(self) -> set[str]:
        return {
            r[0]
            for r in self.con.execute(
                "SELECT doc_key FROM sage.outbox WHERE status = 'pending'"
            ).fetchall()
        }

    def pending_phases(self, run_id: str | None = None) -> list[int]:
        """The phases that still have pending documents, in posting order (of run
        ``run_id`` only, when given)."""
        return [
            int(r[0])
            for r in self.con.execute(
                "SELECT DISTINCT phase FROM sage.outbox WHERE status = 'pending' "
                f"AND {_OF_RUN} ORDER BY phase",
                {"run_id": run_id},
            ).fetchall()
        ]

    def pending_page(
        self, phase: int, after: str, limit: int, run_id: str | None = None
    ) -> list[tuple[Any, ...]]:
        """One keyset page of a phase's pending documents after ``after`` (by ``doc_key``):
        ``(doc_key, doc_type, collection, stripe_id, payload, depends_on, attempts)``; of
        run ``run_id`` only, when given."""
        return self.con.execute(
            "SELECT doc_key, doc_type, collection, stripe_id, payload, depends_on, attempts "
            "FROM sage.outbox WHERE status = 'pending' AND phase = $phase AND doc_key > $after "
            f"AND {_OF_RUN} ORDER BY doc_key LIMIT $limit",
            {"phase": phase, "after": after, "limit": limit, "run_id": run_id},
        ).fetchall()

    def sage_numbers(self, refs: list[str]) -> dict[str, str]:
        """The Sage numbers of posted documents named ``<doc_type>:<stripe id>`` (as in
        ``depends_on`` and payload placeholders), from ``sage.xref``."""
        if not refs:
            return {}
        found = self.con.execute(
            "SELECT doc_type, stripe_id, sage_id FROM sage.xref "
            "WHERE doc_type || ':' || stripe_id IN (SELECT unnest(?::VARCHAR[]))",
            [sorted(refs)],
        ).fetchall()
        return {f"{t}:{s}": sid for t, s, sid in found}

    # -- the outbox, as the planner reads and flags it ------------------------------------
    def settled_among(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` the planner must not plan again (``SETTLED_DOCUMENTS``)."""
        rows = self.con.execute(
            f"SELECT doc_key FROM ({SETTLED_DOCUMENTS}) "
            "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
            [list(keys)],
        ).fetchall()
        return {r[0] for r in rows}

    def guest_charge_staged(self) -> bool:
        """Whether some succeeded, unquarantined charge has no Stripe customer."""
        rows = self.con.execute(
            "SELECT EXISTS (SELECT 1 FROM staging.charges s WHERE s.customer IS NULL "
            "AND s.status = 'succeeded' AND NOT EXISTS (SELECT 1 FROM staging.quarantine q "
            "WHERE q.stream = 'charges' AND q.id = s.id))"
        ).fetchall()
        return bool(rows[0][0])

    def write_flags(self, flagged: pl.DataFrame) -> None:
        """``ops.flags`` rows (by column name), replacing a document's earlier flag."""
        with self.registered("_flags", flagged):
            self._exec("INSERT OR REPLACE INTO ops.flags BY NAME SELECT * FROM _flags")

    # -- the outbox, as the loader writes it -----------------------------------------------
    # Keys are passed as an IN list of constants (``keys_in``): DuckDB then finds them through
    # the outbox's primary-key index, where ``IN (SELECT unnest(?))`` scans the whole outbox.
    def outbox_states(self, frame_of_keys: pl.DataFrame) -> pl.DataFrame:
        """The outbox rows of ``frame_of_keys``'s ``doc_key`` column as they are now:
        ``doc_key, old_status, error_kind`` (its dead letter's code), ``old_since``."""
        with self.registered("_enqueue_keys", frame_of_keys.select("doc_key")):
            return self.frame(
                "SELECT o.doc_key, o.status AS old_status, d.error_code AS error_kind, "
                "o.waiting_since AS old_since FROM sage.outbox o "
                "LEFT JOIN ops.dead_letters d USING (doc_key) "
                "WHERE o.doc_key IN (SELECT doc_key FROM _enqueue_keys)"
            )

    def write_planned(self, rows: pl.DataFrame, revived: Sequence[str], now: dt.datetime) -> None:
        """Planned documents into ``sage.outbox`` (replacing their rows) and the dead letters
        of the ``revived`` ones marked replayed, in one transaction. ``rows`` has the
        outbox's columns; ``payload`` is JSON text."""
        cols = ", ".join(OUTBOX_WRITE_COLUMNS)
        with self.transaction(), self.registered("_new_docs", rows.select(OUTBOX_WRITE_COLUMNS)):
            self._exec(
                f"INSERT OR REPLACE INTO sage.outbox ({cols}) SELECT "
                + cols.replace("payload", "CAST(payload AS JSON)")
                + " FROM _new_docs"
            )
            if revived:
                self._exec(
                    "UPDATE ops.dead_letters SET replayed = true, replayed_at = ? "
                    "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                    [now, list(revived)],
                )

    def drop_waits_replaced(self, waiting_prefix: str, replacement_prefix: str) -> list[str]:
        """Delete the ``waiting`` outbox rows ``<waiting_prefix><id>`` whose record is now
        planned as ``<replacement_prefix><id>`` (in the outbox in any state): they never
        reached Sage and will never be planned again, so they would wait for ever. Returns
        their doc keys."""
        gone = self.con.execute(
            "DELETE FROM sage.outbox o WHERE o.status = 'waiting' "
            "AND starts_with(o.doc_key, $old) AND EXISTS (SELECT 1 FROM sage.outbox r "
            "WHERE r.doc_key = $new || substr(o.doc_key, length($old) + 1)) RETURNING o.doc_key",
            {"old": waiting_prefix, "new": replacement_prefix},
        ).fetchall()
        return [k for (k,) in gone]

    def unposted_documents(self, keys: Sequence[str]) -> list[tuple[str, str, str, str, Any, Any]]:
        """``(doc_type, stripe_id, doc_key, status, last_error, wait_kind)`` of those of
        ``keys`` not in Sage."""
        if not keys:
            return []
        return self.con.execute(
            "SELECT doc_type, stripe_id, doc_key, status, last_error, wait_kind "
            f"FROM sage.outbox WHERE doc_key IN {keys_in(keys)} AND status <> 'posted'",
            list(keys),
        ).fetchall()

    def quarantined_checks(self, stream: str, ids: Sequence[str]) -> list[tuple[str, str, str]]:
        """``(id, check, reason)`` of the quarantined rows of ``stream`` among ``ids``."""
        if not ids:
            return []
        return self.con.execute(
            'SELECT id, "check", reason FROM staging.quarantine '
            f"WHERE stream = ? AND id IN {keys_in(ids)}",
            [stream, *ids],
        ).fetchall()

    def blocked_documents(self) -> list[tuple[str, list[str] | None, str]]:
        """``(doc_key, depends_on, status)`` of blocked documents, and of dead letters of code
        ``blocked`` (files from before the ``blocked`` state)."""
        return self.con.execute(
            "SELECT o.doc_key, o.depends_on, o.status FROM sage.outbox o "
            "LEFT JOIN ops.dead_letters d USING (doc_key) WHERE o.status = 'blocked' "
            "OR (o.status = 'dead' AND d.error_code = 'blocked')"
        ).fetchall()

    def unblock(self, keys: Sequence[str]) -> None:
        """These blocked documents back to ``pending`` (reason cleared) and their dead
        letters marked replayed, in one transaction."""
        with self.transaction():
            self._exec(
                "UPDATE sage.outbox SET status = 'pending', last_error = NULL "
                "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [list(keys)],
            )
            self._exec(
                "UPDATE ops.dead_letters SET replayed = true, replayed_at = ? "
                "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [now_utc(), list(keys)],
            )

    def note_deferred(self, prefix: str, run_id: str | None = None) -> None:
        """Prefix the reason of every pending document (of run ``run_id``, when given) with
        ``prefix`` (the retry budget ran out: the next run retries them)."""
        self._exec(
            "UPDATE sage.outbox SET last_error = $prefix || coalesce(last_error, 'not sent') "
            f"WHERE status = 'pending' AND {_OF_RUN}",
            {"prefix": prefix, "run_id": run_id},
        )

    def count_attempts(self, keys: Sequence[str]) -> None:
        """One more attempt for each of these documents, committed before they are sent."""
        if not keys:
            return
        self._exec(
            "UPDATE sage.outbox SET attempts = attempts + 1, updated_at = ? "
            f"WHERE doc_key IN {keys_in(keys)}",
            [now_utc(), *keys],
        )

    def set_reasons(self, reasons: dict[str, str], now: dt.datetime) -> None:
        """``last_error`` of these documents (doc key → the reason a person reads)."""
        if not reasons:
            return
        keys = list(reasons)
        notes = pl.DataFrame({"doc_key": keys, "last_error": list(reasons.values())})
        with self.registered("_notes", notes):
            self._exec(
                "UPDATE sage.outbox o SET last_error = n.last_error, updated_at = ? "
                f"FROM _notes n WHERE o.doc_key = n.doc_key AND o.doc_key IN {keys_in(keys)}",
                [now, *keys],
            )

    def give_back_attempts(self, unsent: dict[str, int]) -> None:
        """Attempts counted for documents that were never sent, taken back (doc key → n)."""
        if not unsent:
            return
        keys = list(unsent)
        with self.registered(
            "_unsent", pl.DataFrame({"doc_key": keys, "n": list(unsent.values())})
        ):
            self._exec(
                "UPDATE sage.outbox o SET attempts = o.attempts - u.n FROM _unsent u "
                f"WHERE o.doc_key = u.doc_key AND o.doc_key IN {keys_in(keys)}",
                keys,
            )

    def mark_posted(self, posted: pl.DataFrame, run_id: str) -> None:
        """Posted documents (``doc_key, collection, stripe_id, sage_id, matched_by`` and
        ``xref_type``, the type their cross-reference is kept under) ``posted`` in the outbox
        with their Sage numbers in ``sage.xref``, in one transaction."""
        if posted.is_empty():
            return
        now = now_utc()
        keys = posted["doc_key"].to_list()
        with self.transaction(), self.registered("_posted", posted):
            self._exec(
                "UPDATE sage.outbox o SET status = 'posted', sage_id = p.sage_id, "
                "posted_at = ?, updated_at = ?, last_error = NULL FROM _posted p "
                f"WHERE o.doc_key = p.doc_key AND o.doc_key IN {keys_in(keys)}",
                [now, now, *keys],
            )
            self._exec(
                "INSERT OR REPLACE INTO sage.xref SELECT stripe_id, xref_type, "
                "collection, sage_id, matched_by, ?, ? FROM _posted",
                [now, run_id],
            )

    def mark_blocked(self, doc_key: str, reason: str) -> None:
        self._exec(
            "UPDATE sage.outbox SET status = 'blocked', last_error = ?, updated_at = ? "
            "WHERE doc_key = ?",
            [reason, now_utc(), doc_key],
        )

    def mark_waiting(self, doc_key: str, reason: str, wait_kind: str | None) -> None:
        """``waiting`` since the first time it was seen waiting."""
        now = now_utc()
        self._exec(
            "UPDATE sage.outbox SET status = 'waiting', last_error = ?, updated_at = ?, "
            "waiting_since = coalesce(waiting_since, ?), wait_kind = ? WHERE doc_key = ?",
            [reason, now, now, wait_kind, doc_key],
        )

    def mark_dead(self, doc_key: str, reason: str) -> None:
        self._exec(
            "UPDATE sage.outbox SET status = 'dead', last_error = ?, updated_at = ? "
            "WHERE doc_key = ?",
            [reason, now_utc(), doc_key],
        )

    def record_dead_letter(
        self,
        doc_key: str,
        doc_type: str,
        stripe_id: str,
        reason: str,
        *,
        run_id: str,
        code: str | None = None,
        http_status: int | None = None,
        field: str | None = None,
        payload: str | None = None,
    ) -> None:
        """The dead letter of a document (``ops.dead_letters``): a new one, or the same one
        seen again (``occurrences`` + 1, no longer replayed). ``payload``: JSON text."""
        now = now_utc()
        self._exec(
            """
            INSERT INTO ops.dead_letters (doc_key, doc_type, stripe_id, reason, http_status,
                error_code, error_field, payload, first_seen, last_seen, occurrences, replayed,
                replayed_at, run_id)
            VALUES (?, ?, ?, ?, ?, ?, ?, CAST(? AS JSON), ?, ?, 1, false, NULL, ?)
            ON CONFLICT (doc_key) DO UPDATE SET reason = excluded.reason,
                http_status = excluded.http_status, error_code = excluded.error_code,
                error_field = excluded.error_field, payload = excluded.payload,
                last_seen = excluded.last_seen, occurrences = ops.dead_letters.occurrences + 1,
                replayed = false, run_id = excluded.run_id""",
            [
                doc_key,
                doc_type,
                stripe_id,
                reason,
                http_status,
                code,
                field,
                payload,
                now,
                now,
                run_id,
            ],
        )

    # -- write-back of Sage ids into Stripe -----------------------------------------------
    def writeback_pending(self, limit: int) -> list[tuple[str, str, str, str]]:
        """(path, stripe id, metadata field, value) still to write into Stripe, oldest first:
        Sage ids Stripe's metadata does not show yet and no earlier write-back recorded."""
        rows = self.con.execute(
            """
            WITH wanted AS (
                SELECT '/v1/customers' AS path, x.stripe_id, 'sage_customer_id' AS field,
                       x.sage_id AS value, x.created_at,
                       c.metadata->>'sage_customer_id' AS current
                FROM sage.xref x JOIN staging.customers c ON c.id = x.stripe_id
                WHERE x.doc_type = 'customer' AND NOT c.deleted
                UNION ALL
                SELECT '/v1/charges', x.stripe_id,
                       CASE x.doc_type WHEN 'invoice' THEN 'sage_invoice_no'
                            ELSE 'sage_order_no' END,
                       x.sage_id, x.created_at,
                       ch.metadata->>(CASE x.doc_type WHEN 'invoice' THEN 'sage_invoice_no'
                                      ELSE 'sage_order_no' END)
                FROM sage.xref x JOIN staging.charges ch ON ch.id = x.stripe_id
                WHERE x.doc_type IN ('invoice', 'sales_order')
                UNION ALL
                -- A Checkout order: its Sage numbers on the payment intent (acknowledgement).
                -- Payment intents are not staged: what was written is in sage.writeback.
                SELECT '/v1/payment_intents', cs.payment_intent,
                       CASE x.doc_type WHEN 'invoice' THEN 'sage_invoice_no'
                            ELSE 'sage_order_no' END,
                       x.sage_id, x.created_at, NULL
                FROM sage.xref x JOIN staging.checkout_sessions cs ON cs.id = x.stripe_id
                WHERE x.doc_type IN ('invoice', 'sales_order') AND cs.payment_intent IS NOT NULL
                UNION ALL
                SELECT '/v1/products', x.stripe_id, 'sage_item', x.sage_id, x.created_at,
                       p.metadata->>'sage_item'
                FROM sage.xref x JOIN staging.products p ON p.id = x.stripe_id
                WHERE x.doc_type = 'item')
            SELECT path, stripe_id, field, value FROM wanted w
            WHERE current IS DISTINCT FROM value AND NOT EXISTS (
                SELECT 1 FROM sage.writeback b WHERE b.stripe_id = w.stripe_id
                  AND b.field = w.field AND b.value = w.value)
            ORDER BY created_at, stripe_id LIMIT ?""",
            [limit],
        ).fetchall()
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def record_writebacks(self, written: Sequence[tuple[str, str, str, str]], run_id: str) -> None:
        """Metadata values written into Stripe, each (stripe id, field, value, outcome:
        written, or gone when the object was deleted meanwhile), so they are not sent again
        (``sage.writeback``). One statement for many: DuckDB's cost per statement (~3 ms)
        was most of a write-back's time."""
        latest = {(sid, field): (sid, field, value, out) for sid, field, value, out in written}
        if not latest:
            return
        at = now_utc()
        rows = [(sid, field, value, at, out, run_id) for sid, field, value, out in latest.values()]
        self._exec(
            "INSERT OR REPLACE INTO sage.writeback VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(rows)),
            [v for row in rows for v in row],
        )

    # -- the customer master (Sage → Stripe) -----------------------------------------------
    def stripe_customers_by_sage_id(self) -> dict[str, str]:
        """Sage customer id → the Stripe customer it was made from or linked to."""
        return dict(
            self.con.execute(
                "SELECT sage_id, stripe_id FROM sage.xref WHERE doc_type = 'customer'"
            ).fetchall()
        )

    def record_customer_conflict(
        self,
        stripe_id: str,
        sage_id: str,
        *,
        fields: list[str],
        sage_values: str,
        stripe_values: str,
        sage_updated_at: dt.datetime | None,
        stripe_changed_at: dt.datetime,
        winner: str,
        rule: str,
        run_id: str,
    ) -> None:
        """A customer changed on both sides and how it was decided (``ops.customer_conflicts``;
        ``*_values`` as JSON text)."""
        self._exec(
            "INSERT INTO ops.customer_conflicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                stripe_id,
                sage_id,
                fields,
                sage_values,
                stripe_values,
                sage_updated_at,
                stripe_changed_at,
                winner,
                rule,
                now_utc(),
                run_id,
            ],
        )

    def customer_last_sent(
        self, stripe_id: str
    ) -> tuple[dt.datetime, str | None, str | None, str | None, str | None] | None:
        """For a staged Stripe customer: when it was last extracted, its name, email and
        phone now, and the payload last posted to Sage for it (a customer, link or update;
        None if nothing was); None when it is not staged."""
        rows = self.con.execute(
            "SELECT r.extracted_at, c.name, c.email, c.phone, (SELECT CAST(o.payload AS VARCHAR) "
            "FROM sage.outbox o WHERE o.status = 'posted' AND (o.stripe_id = r.id OR o.stripe_id "
            "LIKE r.id || ':%') AND o.doc_type IN ('customer', 'customer_link', "
            "'customer_update') ORDER BY o.posted_at DESC LIMIT 1) FROM raw.customers r "
            "JOIN staging.customers c USING (id) WHERE r.id = ?",
            [stripe_id],
        ).fetchall()
        return rows[0] if rows else None

    # -- dead-letter replay -----------------------------------------------------------------
    def replayable_dead_letters(
        self,
        *,
        doc_keys: Sequence[str] | None = None,
        doc_type: str | None = None,
        error_code: str | None = None,
    ) -> list[str]:
        """Dead, unreplayed documents matching every given filter, by key (documents dead
        as ``blocked`` are never chosen on their own: they wait for what blocks them)."""
        where = ["o.status = 'dead'", "NOT d.replayed", "coalesce(d.error_code, '') <> 'blocked'"]
        params: list[object] = []
        if doc_keys:
            where.append("o.doc_key IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(doc_keys))
        if doc_type:
            where.append("o.doc_type = ?")
            params.append(doc_type)
        if error_code:
            where.append("d.error_code = ?")
            params.append(error_code)
        return [
            r[0]
            for r in self.con.execute(
                "SELECT o.doc_key FROM sage.outbox o JOIN ops.dead_letters d USING (doc_key) "
                f"WHERE {' AND '.join(where)} ORDER BY o.doc_key",
                params,
            ).fetchall()
        ]

    def build_plan_scope(self, scope_sql: str, run_id: str) -> bool:
        """Run the planner's scope statement (plan/scope.py: it fills a temporary table of
        this connection) for run ``run_id``; False, and nothing filled, when the run staged
        tax rates (every document may depend on them: only a full plan is right)."""
        tax = self.con.execute(
            "SELECT count(*) FROM staging.tax_rates WHERE run_id = ?", [run_id]
        ).fetchall()
        if tax[0][0]:
            return False
        self.con.execute(scope_sql, {"run_id": run_id})
        return True

    def drop_from_scope(self, scope_table: str, run_id: str) -> None:
        """Take out of the planner's scope table every id whose staged row run ``run_id``
        wrote (a sync in progress: quality has not checked its rows yet)."""
        written = " UNION ALL ".join(
            f"SELECT id FROM staging.{s} WHERE run_id = $run_id" for s in STREAMS
        )
        self.con.execute(f"DELETE FROM {scope_table} WHERE id IN ({written})", {"run_id": run_id})

    def dead_among(self, keys: Sequence[str]) -> list[str]:
        """Those of ``keys`` whose documents are dead (e.g. dead again after a replay)."""
        if not keys:
            return []
        return [
            r[0]
            for r in self.con.execute(
                "SELECT doc_key FROM sage.outbox WHERE status = 'dead' "
                "AND doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [list(keys)],
            ).fetchall()
        ]

    def blocked_dependencies(self) -> dict[str, list[str]]:
        """Documents held back by what they depend on (``blocked``, or dead letters of code
        ``blocked`` from older files) → their dependencies."""
        return dict(
            self.con.execute(
                "SELECT o.doc_key, o.depends_on FROM sage.outbox o JOIN ops.dead_letters d "
                "USING (doc_key) WHERE o.status IN ('dead', 'blocked') "
                "AND d.error_code = 'blocked'"
            ).fetchall()
        )

    def release_for_replay(self, keys: Sequence[str]) -> None:
        """Delete the outbox rows of these dead or blocked documents (the planner plans them
        again) and mark their dead letters replayed, in one transaction."""
        with self.transaction():
            self._exec(
                "DELETE FROM sage.outbox WHERE status IN ('dead', 'blocked') "
                "AND doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [list(keys)],
            )
            self._exec(
                "UPDATE ops.dead_letters SET replayed = true, replayed_at = ? "
                "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [now_utc(), list(keys)],
            )

    def replace_console_records(
        self, actions: list[dict[str, Any]], users: list[dict[str, Any]]
    ) -> None:
        """The console store's actions and users, as of now (``ops.console_*``)."""
        action_cols = (
            "id",
            "at",
            "user",
            "action",
            "target",
            "doc_keys",
            "note",
            "status",
            "outcome",
            "finished_at",
        )
        with self.transaction() as con:
            con.execute("DELETE FROM ops.console_actions").fetchall()
            con.execute("DELETE FROM ops.console_users").fetchall()
            if actions:
                con.executemany(
                    "INSERT INTO ops.console_actions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [[a[c] for c in action_cols] for a in actions],
                )
            if users:
                con.executemany(
                    "INSERT INTO ops.console_users VALUES (?, ?, ?, ?)",
                    [[u["name"], u["role"], u["created_at"], u["updated_at"]] for u in users],
                )

    def replace_console_mapping_versions(self, versions: list[dict[str, Any]]) -> None:
        """The console store's mapping versions, as of now (``ops.console_mapping_versions``)."""
        cols = ("id", "at", "user", "path", "sha256", "note", "text")
        with self.transaction() as con:
            con.execute("DELETE FROM ops.console_mapping_versions").fetchall()
            if versions:
                con.executemany(
                    "INSERT INTO ops.console_mapping_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [[v[c] for c in cols] for v in versions],
                )

    def state_counts(self) -> dict[str, int]:
        """Unposted documents per state, plus quarantined rows (none of them silent)."""
        rows = self.con.execute(
            "SELECT status, count(*) FROM sage.outbox WHERE status <> 'posted' GROUP BY ALL"
        ).fetchall()
        out = {s: 0 for s in UNPOSTED_STATES}
        out.update({str(s): int(n) for s, n in rows})
        out["quarantined"] = self.count("staging.quarantine")
        return out

    def count(self, table: str) -> int:
        return int(self.con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])

    def count_where(self, table: str, condition: str) -> int:
        return int(
            self.con.execute(f"SELECT count(*) FROM {table} WHERE {condition}").fetchall()[0][0]
        )

    # -- quarantine ------------------------------------------------------------------------
    def requarantine_changed(self, stream: str, run_id: str, failures: pl.DataFrame) -> None:
        """Rows this run changed were re-validated: they leave quarantine unless they failed
        again (``failures``). The ids are read in DuckDB, never listed in Python."""
        with self.transaction():
            self._exec(
                f"DELETE FROM staging.quarantine WHERE stream = ? AND id IN ("
                f"SELECT id FROM staging.{stream} WHERE run_id = ?)",
                [stream, run_id],
            )
            if failures.height:
                f = (
                    failures.select("stream", "id", "check", "reason", "run_id")
                    .with_columns(pl.lit(now_utc()).alias("quarantined_at"))
                    .unique(subset=["stream", "id", "check"], keep="last")
                )
                with self.registered("_q", f):
                    self._exec("INSERT OR REPLACE INTO staging.quarantine SELECT * FROM _q")

    def quarantined_ids(self, stream: str) -> set[str]:
        rows = self.con.execute(
            "SELECT DISTINCT id FROM staging.quarantine WHERE stream = ?", [stream]
        ).fetchall()
        return {r[0] for r in rows}

    # -- sync state ------------------------------------------------------------------------
    def sync_state(self, stream: str) -> dict[str, Any] | None:
        rows = self.con.execute(
            "SELECT created_cursor, events_cursor, backfill_done "
            "FROM ops.sync_state WHERE stream = ?",
            [stream],
        ).fetchall()
        if not rows:
            return None
        row = rows[0]
        return {"created_cursor": row[0], "events_cursor": row[1], "backfill_done": row[2]}

    def set_sync_state(
        self,
        stream: str,
        *,
        created_cursor: int | None = None,
        events_cursor: int | None = None,
        backfill_done: bool | None = None,
    ) -> None:
        current = self.sync_state(stream) or {}
        values = {
            "created_cursor": created_cursor
            if created_cursor is not None
            else current.get("created_cursor"),
            "events_cursor": events_cursor
            if events_cursor is not None
            else current.get("events_cursor"),
            "backfill_done": backfill_done
            if backfill_done is not None
            else current.get("backfill_done", False),
        }
        self._exec(
            "INSERT OR REPLACE INTO ops.sync_state VALUES (?, ?, ?, ?, ?)",
            [
                stream,
                values["created_cursor"],
                values["events_cursor"],
                values["backfill_done"],
                now_utc(),
            ],
        )

    def record_checkout_lookups(self, rows: Sequence[tuple[str, str | None]], run_id: str) -> None:
        """(payment intent, session or None) pairs Stripe answered for."""
        if not rows:
            return
        frame = pl.DataFrame(
            {"payment_intent": [r[0] for r in rows], "session": [r[1] for r in rows]},
            schema={"payment_intent": pl.String, "session": pl.String},
        )
        with self.registered("_lookups", frame):
            self._exec(
                "INSERT OR REPLACE INTO staging.checkout_lookups "
                "SELECT payment_intent, session, ?, ? FROM _lookups",
                [now_utc(), run_id],
            )

    def windows_done(self, stream: str) -> set[tuple[int, int]]:
        rows = self.con.execute(
            "SELECT window_start, window_end FROM ops.sync_windows WHERE stream = ?", [stream]
        ).fetchall()
        return {(int(a), int(b)) for a, b in rows}

    def mark_window(self, stream: str, start: int, end: int, rows: int, run_id: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO ops.sync_windows VALUES (?, ?, ?, ?, ?, ?)",
            [stream, start, end, rows, run_id, now_utc()],
        )

    # -- runs ------------------------------------------------------------------------------
    def start_run(
        self, run_id: str, *, flow: str, prefect_run_id: str | None, trigger: str
    ) -> None:
        self._exec(
            "INSERT OR REPLACE INTO ops.runs VALUES (?, ?, ?, ?, ?, NULL, 'running', '{}', NULL)",
            [run_id, flow, prefect_run_id, trigger, now_utc()],
        )

    def finish_run(
        self, run_id: str, *, status: str, counts: dict[str, Any], error: str | None = None
    ) -> None:
        self._exec(
            "UPDATE ops.runs SET ended_at = ?, status = ?, counts = ?, error = ? WHERE run_id = ?",
            [now_utc(), status, json.dumps(counts, default=str), error, run_id],
        )

    def fail_interrupted_runs(self, flow: str, error: str) -> int:
        """Runs of ``flow`` still ``running`` although their process is gone (killed
        mid-run): ``failed`` with ``error``, so no run stays silently unfinished. Call it
        only while holding the writer, when no run of ``flow`` can be alive."""
        rows = self.con.execute(
            "UPDATE ops.runs SET ended_at = ?, status = 'failed', error = ? "
            "WHERE flow = ? AND status = 'running' RETURNING run_id",
            [now_utc(), error, flow],
        ).fetchall()
        return len(rows)

    def transaction(self) -> _Tx:
        return _Tx(self.con)


class _Tx:
    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        self.con.execute("BEGIN").fetchall()
        return self.con

    def __exit__(self, et: type[BaseException] | None, *rest: object) -> None:
        self.con.execute("ROLLBACK" if et else "COMMIT").fetchall()
