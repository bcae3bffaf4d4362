"""The webhook receiver's inbox: a small SQLite file in WAL mode with ``synchronous=FULL``,
so an event is on disk before Stripe hears 200 (``stripe_sage/stripe/webhooks.py``). Duplicate
event ids are stored once; flows drain it. It never opens the DuckDB staging file, which a
running flow may hold. Its table is declared with the others in ``store/schema.py``.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stripe_sage.store.schema import INBOX_DDL


class Inbox:
    """The receiver's own durable store (SQLite, WAL); flows drain it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(INBOX_DDL)  # stripe_sage/store/schema.py
        con.commit()

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.execute("PRAGMA synchronous=FULL")  # on disk before we answer 200
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    def store(self, event: dict[str, Any], payload: bytes) -> bool:
        """True when new; a duplicate id only bumps a counter."""
        obj = event.get("data", {}).get("object", {}) or {}
        con = self._con()
        cur = con.execute(
            "INSERT OR IGNORE INTO inbox (event_id, type, object_type, object_id, created, "
            "received_at, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                event["id"],
                event["type"],
                obj.get("object"),
                obj.get("id"),
                event.get("created"),
                dt.datetime.now(dt.UTC).isoformat(),
                payload.decode(),
            ),
        )
        if cur.rowcount == 0:
            con.execute(
                "UPDATE inbox SET duplicates = duplicates + 1 WHERE event_id = ?", (event["id"],)
            )
            return False
        return True

    def unprocessed(self, limit: int = 10_000) -> list[dict[str, Any]]:
        """The oldest ``limit`` unprocessed events in order of arrival (a burst is drained
        batch by batch in the order Stripe delivered it; within a batch, events are applied
        in order of ``created``: ``events_by_stream``)."""
        rows = (
            self._con()
            .execute(
                "SELECT event_id, type, object_type, object_id, created, payload FROM inbox "
                "WHERE processed_at IS NULL ORDER BY rowid LIMIT ?",
                (limit,),
            )
            .fetchall()
        )
        return [
            dict(
                zip(
                    ("event_id", "type", "object_type", "object_id", "created", "payload"),
                    r,
                    strict=True,
                )
            )
            for r in rows
        ]

    def waiting(self) -> int:
        """How many events wait (cheap: the real-time processor asks many times a second)."""
        row = self._con().execute("SELECT count(*) FROM inbox WHERE processed_at IS NULL")
        return int(row.fetchone()[0])

    def mark_processed(self, event_ids: Sequence[str], run_id: str) -> None:
        con = self._con()
        now = dt.datetime.now(dt.UTC).isoformat()
        con.execute("BEGIN")
        con.executemany(
            "UPDATE inbox SET processed_at = ?, run_id = ? WHERE event_id = ?",
            [(now, run_id, e) for e in event_ids],
        )
        con.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        total, pending, dupes = (
            self._con()
            .execute(
                "SELECT count(*), count(*) FILTER (WHERE processed_at IS NULL), "
                "coalesce(sum(duplicates), 0) FROM inbox"
            )
            .fetchone()
        )
        return {"stored": total, "unprocessed": pending, "duplicates_ignored": dupes}
