"""Every table the product keeps, in one place: the staging file's schemas (``raw`` as
Stripe sent it, ``staging`` typed, ``sage`` outbox and links, ``ops`` run bookkeeping), the
webhook receiver's inbox, and the analysts' snapshot's own metadata (docs/architecture.md).

Tables are only ever added to, never renamed (their names and columns are contracts):
a file created by an older version gets new tables on open and new columns through the
``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` lines below.
"""

from __future__ import annotations

from stripe_sage.stripe.streams import Stream

SCHEMAS = ("raw", "staging", "sage", "ops")


def raw_table_ddl(stream: Stream) -> str:
    """A stream's documents as Stripe sent them.

    zstd for the documents: with DuckDB's default (it analyses dictionary and FSST per
    segment) a checkpoint took three times as long and the file was three times larger
    (30k charges: 0.78 s / 37 MB against 0.27 s / 11 MB; scans as fast). Tables created
    before keep their compression."""
    return f"""
        CREATE TABLE IF NOT EXISTS raw.{stream.name} (
            id VARCHAR PRIMARY KEY, created TIMESTAMPTZ,
            data JSON USING COMPRESSION zstd, source VARCHAR,
            api_version VARCHAR, extracted_at TIMESTAMPTZ, run_id VARCHAR)"""


def staging_table_ddl(stream: Stream) -> str:
    """A stream's typed columns (``stripe_sage/stripe/streams.py`` declares them)."""
    cols = ", ".join(f'"{c.name}" {c.sql_type}' for c in stream.columns)
    return f"""
        CREATE TABLE IF NOT EXISTS staging.{stream.name} (
            {cols}, run_id VARCHAR, staged_at TIMESTAMPTZ, PRIMARY KEY (id))"""


OPS_DDL = """
CREATE TABLE IF NOT EXISTS ops.sync_state (
    stream VARCHAR PRIMARY KEY,
    created_cursor BIGINT,          -- objects created before this (unix s) are staged
    events_cursor BIGINT,           -- events created at/after this are still to be read
    backfill_done BOOLEAN DEFAULT false,
    updated_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS ops.sync_windows (
    stream VARCHAR, window_start BIGINT, window_end BIGINT, rows BIGINT,
    run_id VARCHAR, done_at TIMESTAMPTZ,
    PRIMARY KEY (stream, window_start, window_end)
);
CREATE TABLE IF NOT EXISTS ops.runs (
    run_id VARCHAR PRIMARY KEY,
    flow VARCHAR, prefect_run_id VARCHAR, trigger VARCHAR,
    started_at TIMESTAMPTZ, ended_at TIMESTAMPTZ, status VARCHAR,
    counts JSON, error VARCHAR
);
CREATE TABLE IF NOT EXISTS ops.dead_letters (
    doc_key VARCHAR PRIMARY KEY,
    doc_type VARCHAR, stripe_id VARCHAR, reason VARCHAR,
    http_status INTEGER, error_code VARCHAR, error_field VARCHAR,
    payload JSON, first_seen TIMESTAMPTZ, last_seen TIMESTAMPTZ,
    occurrences INTEGER DEFAULT 1, replayed BOOLEAN DEFAULT false, replayed_at TIMESTAMPTZ,
    run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS staging.quarantine (
    stream VARCHAR, id VARCHAR, "check" VARCHAR, reason VARCHAR, run_id VARCHAR,
    quarantined_at TIMESTAMPTZ,
    PRIMARY KEY (stream, id, "check")
);
CREATE TABLE IF NOT EXISTS staging.payout_items (
    payout VARCHAR, balance_transaction VARCHAR,   -- GET /v1/balance_transactions?payout=
    PRIMARY KEY (payout, balance_transaction)
);
CREATE TABLE IF NOT EXISTS sage.outbox (
    doc_key VARCHAR PRIMARY KEY,     -- '<doc_type>:<stripe id>'
    doc_type VARCHAR, collection VARCHAR, stripe_id VARCHAR, phase INTEGER,
    -- pending | posted | dead | waiting | blocked (see OUTBOX_STATES)
    depends_on VARCHAR[], payload JSON, status VARCHAR,
    sage_id VARCHAR, attempts INTEGER DEFAULT 0, last_error VARCHAR,
    created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ, posted_at TIMESTAMPTZ, run_id VARCHAR
);
-- The Stripe account's payout schedule (GET /v1/account, settings.payouts.schedule.interval):
-- 'manual' means no automatic payout itemises anything, so fees get daily journals.
CREATE TABLE IF NOT EXISTS ops.stripe_account (
    id VARCHAR PRIMARY KEY, payout_interval VARCHAR, read_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS ops.flags (
    doc_key VARCHAR PRIMARY KEY,     -- a document posted as planned that a person should see
    doc_type VARCHAR, stripe_id VARCHAR, flag VARCHAR, flagged_at TIMESTAMPTZ, run_id VARCHAR
);
-- Added later: files created before get the columns on open (never rename, only add).
-- waiting_since: when the document was first seen waiting; wait_kind: what it waits for
-- (its reason's class, e.g. balance_transaction), which sets how long it may wait.
ALTER TABLE sage.outbox ADD COLUMN IF NOT EXISTS waiting_since TIMESTAMPTZ;
ALTER TABLE sage.outbox ADD COLUMN IF NOT EXISTS wait_kind VARCHAR;
-- The finance console's records, copied from its own store (CONSOLE_STORE) by every run for
-- analysts (the console never writes this file): every action, and who may log in (never a
-- password hash).
CREATE TABLE IF NOT EXISTS ops.console_actions (
    id BIGINT PRIMARY KEY, asked_at TIMESTAMPTZ, "user" VARCHAR, action VARCHAR, target VARCHAR,
    doc_keys VARCHAR[], note VARCHAR, status VARCHAR, outcome VARCHAR, finished_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS ops.console_users (
    name VARCHAR PRIMARY KEY, role VARCHAR, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ
);
-- Every mapping file text the console saved (or found before its first save; a roll-back
-- is a version too): who, when, which file, what changed, and the text itself.
CREATE TABLE IF NOT EXISTS ops.console_mapping_versions (
    id BIGINT PRIMARY KEY, saved_at TIMESTAMPTZ, "user" VARCHAR, path VARCHAR,
    sha256 VARCHAR, note VARCHAR, text VARCHAR
);
CREATE TABLE IF NOT EXISTS sage.xref (
    stripe_id VARCHAR, doc_type VARCHAR, collection VARCHAR, sage_id VARCHAR,
    matched_by VARCHAR, created_at TIMESTAMPTZ, run_id VARCHAR,
    PRIMARY KEY (stripe_id, doc_type)
);
-- Customer master: field conflicts between Sage and Stripe and how each was decided.
CREATE TABLE IF NOT EXISTS ops.customer_conflicts (
    stripe_id VARCHAR, sage_id VARCHAR, fields VARCHAR[], sage_values JSON,
    stripe_values JSON, sage_updated_at TIMESTAMPTZ, stripe_changed_at TIMESTAMPTZ,
    winner VARCHAR, rule VARCHAR, decided_at TIMESTAMPTZ, run_id VARCHAR
);
-- Checkout: payment intents Stripe was asked about (GET /v1/checkout/sessions?payment_intent=)
-- and the session it named (null: none); their charges never wait for a session.
CREATE TABLE IF NOT EXISTS staging.checkout_lookups (
    payment_intent VARCHAR PRIMARY KEY, session VARCHAR, looked_up_at TIMESTAMPTZ,
    run_id VARCHAR
);
-- Write-back: each Sage id written to Stripe metadata, so none is sent twice.
CREATE TABLE IF NOT EXISTS sage.writeback (
    stripe_id VARCHAR, field VARCHAR, value VARCHAR, written_at TIMESTAMPTZ, outcome VARCHAR,
    run_id VARCHAR, PRIMARY KEY (stripe_id, field, value)
);
"""

# The webhook receiver's durable store (SQLite, WAL): every event as received, until a run
# has processed it.
INBOX_DDL = """
CREATE TABLE IF NOT EXISTS inbox (
    event_id TEXT PRIMARY KEY, type TEXT NOT NULL, object_type TEXT,
    object_id TEXT, created INTEGER, received_at TEXT NOT NULL,
    payload TEXT NOT NULL, processed_at TEXT, run_id TEXT, duplicates INTEGER
    DEFAULT 0);
CREATE INDEX IF NOT EXISTS inbox_unprocessed ON inbox (processed_at);
"""

# The analysts' snapshot says which run published it (its own small file, beside the copies).
SNAPSHOT_META_DDL = (
    "CREATE TABLE meta.snapshot AS SELECT ? AS run_id, ? AS published_at, ? AS directory"
)
