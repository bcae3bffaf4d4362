"""The console's own store (SQLite, WAL), beside the webhook inbox and never the staging
file: users with their hashed passwords and roles, sessions, failed logins (for throttling),
and every action a person took (who, when, what, with what outcome)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stripe_sage.console.passwords import hash_password, verify_password

ROLES = ("admin", "auditor")

CONSOLE_DDL = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
-- Only a hash of the session token is kept: a copy of this file logs nobody in.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL,
    created_at TEXT NOT NULL, expires_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS login_failures (
    user TEXT NOT NULL, at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS login_failures_user ON login_failures (user, at);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, user TEXT NOT NULL,
    action TEXT NOT NULL, target TEXT NOT NULL, doc_keys TEXT NOT NULL, note TEXT,
    status TEXT NOT NULL, outcome TEXT, finished_at TEXT);
CREATE INDEX IF NOT EXISTS actions_at ON actions (at);
-- Every mapping file text the console wrote (and the one it found before its first save):
-- who, when, what changed; a roll-back writes an earlier text again as a new version.
CREATE TABLE IF NOT EXISTS mapping_versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, user TEXT NOT NULL,
    path TEXT NOT NULL, sha256 TEXT NOT NULL, text TEXT NOT NULL, note TEXT NOT NULL);
-- A reviewed change waiting for its save: the exact text the diff showed, never re-sent
-- through the browser (a form would turn its line ends into CRLF).
CREATE TABLE IF NOT EXISTS mapping_drafts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, user TEXT NOT NULL,
    base_sha256 TEXT NOT NULL, text TEXT NOT NULL, note TEXT NOT NULL);
"""

# Five wrong passwords for one user within the window lock that user's logins for the rest
# of the window: slow enough to stop guessing, short enough not to lock finance out for long.
MAX_FAILURES = 5
FAILURE_WINDOW = dt.timedelta(minutes=15)


# Who records an action: the console process that runs it (``interrupt_orphans``).
def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    user: str
    role: str
    csrf: str


class Throttled(Exception):
    """Too many wrong passwords for this user just now."""


class ConsoleStore:
    def __init__(self, path: Path | str, *, session_minutes: float = 480) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.session_ttl = dt.timedelta(minutes=session_minutes)
        self._local = threading.local()
        con = self._con()
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(CONSOLE_DDL)
        columns = {r[1] for r in con.execute("PRAGMA table_info(actions)")}
        if "owner" not in columns:  # a store from before owners were recorded
            con.execute("ALTER TABLE actions ADD COLUMN owner TEXT")

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
        return con

    # -- users ------------------------------------------------------------------------------
    def set_password(self, user: str, password: str, role: str = "admin") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {role!r}")
        if not user or not password:
            raise ValueError("a user name and a password are needed")
        now = _now().isoformat()
        self._con().execute(
            "INSERT INTO users (name, role, password_hash, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET role = excluded.role, "
            "password_hash = excluded.password_hash, updated_at = excluded.updated_at",
            (user, role, hash_password(password), now, now),
        )
        # A new password ends the user's sessions everywhere.
        self._con().execute("DELETE FROM sessions WHERE user = ?", (user,))

    def export(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every action, and every user without the password hash: what a run copies into
        ``ops.console_actions`` and ``ops.console_users`` for analysts."""
        actions = self._rows("SELECT * FROM actions ORDER BY id", ())
        cur = self._con().execute(
            "SELECT name, role, created_at, updated_at FROM users ORDER BY name"
        )
        users = [
            dict(zip(("name", "role", "created_at", "updated_at"), r, strict=True)) for r in cur
        ]
        return actions, users

    def users(self) -> list[tuple[str, str]]:
        return list(self._con().execute("SELECT name, role FROM users ORDER BY name"))

    # -- login and sessions -----------------------------------------------------------------
    def login(self, user: str, password: str) -> str | None:
        """A new session token for the right password, None for a wrong one; raises
        ``Throttled`` (without checking the password) after too many recent failures."""
        con = self._con()
        since = (_now() - FAILURE_WINDOW).isoformat()
        failures = con.execute(
            "SELECT count(*) FROM login_failures WHERE user = ? AND at > ?", (user, since)
        ).fetchone()[0]
        if failures >= MAX_FAILURES:
            raise Throttled(user)
        row = con.execute("SELECT password_hash FROM users WHERE name = ?", (user,)).fetchone()
        # Unknown users are hashed against a dummy so that timing does not tell who exists.
        stored = row[0] if row else hash_password(secrets.token_hex(8))
        if row is None or not verify_password(password, stored):
            con.execute("INSERT INTO login_failures VALUES (?, ?)", (user, _now().isoformat()))
            return None
        con.execute("DELETE FROM login_failures WHERE user = ?", (user,))
        token = secrets.token_urlsafe(32)
        now = _now()
        con.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
            (
                _token_hash(token),
                user,
                secrets.token_urlsafe(32),
                now.isoformat(),
                (now + self.session_ttl).isoformat(),
            ),
        )
        return token

    def session(self, token: str | None) -> Session | None:
        """The live session of this token (its expiry slides forward on use), or None."""
        if not token:
            return None
        con = self._con()
        now = _now()
        row = con.execute(
            "SELECT s.user, u.role, s.csrf, s.expires_at FROM sessions s JOIN users u "
            "ON u.name = s.user WHERE s.token_hash = ?",
            (_token_hash(token),),
        ).fetchone()
        if row is None:
            return None
        if dt.datetime.fromisoformat(row[3]) <= now:
            con.execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))
            return None
        con.execute(
            "UPDATE sessions SET expires_at = ? WHERE token_hash = ?",
            ((now + self.session_ttl).isoformat(), _token_hash(token)),
        )
        return Session(row[0], row[1], row[2])

    def logout(self, token: str | None) -> None:
        if token:
            self._con().execute("DELETE FROM sessions WHERE token_hash = ?", (_token_hash(token),))

    # -- actions ----------------------------------------------------------------------------
    def record(
        self,
        user: str,
        action: str,
        target: str,
        doc_keys: list[str],
        note: str | None = None,
        status: str = "started",
    ) -> int:
        cur = self._con().execute(
            "INSERT INTO actions (at, user, action, target, doc_keys, note, status, owner) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _now().isoformat(),
                user,
                action,
                target,
                json.dumps(doc_keys),
                note,
                status,
                _owner(),
            ),
        )
        return int(cur.lastrowid or 0)

    def interrupt_orphans(self) -> list[int]:
        """Actions still ``started`` whose console process is gone (stopped or killed while
        its replay ran, so nobody will record the outcome) become ``interrupted``, with what
        a person should do; returns their ids. A started action of a live console on this
        machine, or of one on another machine, is left alone."""
        host = socket.gethostname()
        gone = []
        for action_id, owner in (
            self._con().execute("SELECT id, owner FROM actions WHERE status = 'started'").fetchall()
        ):
            owner_host, _, pid = (owner or "").rpartition(":")
            if owner and (owner_host != host or _alive(int(pid))):
                continue
            gone.append(int(action_id))
            self.finish(
                int(action_id),
                "interrupted",
                "the console stopped while this ran, so its outcome was not recorded: the "
                "documents' states (Unposted, Runs) show what Sage took; replay what is "
                "still unposted",
            )
        return gone

    def finish(self, action_id: int, status: str, outcome: str) -> None:
        self._con().execute(
            "UPDATE actions SET status = ?, outcome = ?, finished_at = ? WHERE id = ?",
            (status, outcome[:4000], _now().isoformat(), action_id),
        )

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        cur = self._con().execute(sql, params)
        names = [d[0] for d in cur.description]
        return [
            {**dict(zip(names, r, strict=True)), "doc_keys": json.loads(r[names.index("doc_keys")])}
            for r in cur.fetchall()
        ]

    def actions(self, limit: int = 200, doc_key: str | None = None) -> list[dict[str, Any]]:
        """The latest actions, newest first (only those on ``doc_key`` when given)."""
        if doc_key:
            return self._rows(
                "SELECT a.* FROM actions a WHERE EXISTS (SELECT 1 FROM json_each(a.doc_keys) k "
                "WHERE k.value = ?) ORDER BY a.id DESC LIMIT ?",
                (doc_key, limit),
            )
        return self._rows("SELECT * FROM actions ORDER BY id DESC LIMIT ?", (limit,))

    def action(self, action_id: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM actions WHERE id = ?", (action_id,))
        return rows[0] if rows else None

    def resolved(self) -> dict[str, dict[str, Any]]:
        """Documents a person resolved with a note: the latest resolution per document."""
        out: dict[str, dict[str, Any]] = {}
        for a in self._rows("SELECT * FROM actions WHERE action = 'resolve' ORDER BY id", ()):
            for key in a["doc_keys"]:
                out[key] = a
        return out

    # -- mapping versions -------------------------------------------------------------------
    def add_mapping_version(self, user: str, path: str, text: str, note: str) -> int:
        cur = self._con().execute(
            "INSERT INTO mapping_versions (at, user, path, sha256, text, note) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                _now().isoformat(),
                user,
                path,
                hashlib.sha256(text.encode()).hexdigest(),
                text,
                note,
            ),
        )
        return int(cur.lastrowid or 0)

    def export_mapping_versions(self) -> list[dict[str, Any]]:
        """Every mapping version with its text (copied to ``ops.console_mapping_versions``)."""
        names = ("id", "at", "user", "path", "sha256", "note", "text")
        cur = self._con().execute(f"SELECT {', '.join(names)} FROM mapping_versions ORDER BY id")
        return [dict(zip(names, r, strict=True)) for r in cur]

    def mapping_versions(self, path: str) -> list[dict[str, Any]]:
        """The versions of the file at ``path``, newest first (without their text)."""
        cur = self._con().execute(
            "SELECT id, at, user, sha256, note FROM mapping_versions WHERE path = ? "
            "ORDER BY id DESC",
            (path,),
        )
        return [dict(zip(("id", "at", "user", "sha256", "note"), r, strict=True)) for r in cur]

    def mapping_version(self, version_id: int) -> dict[str, Any] | None:
        cur = self._con().execute(
            "SELECT id, at, user, path, sha256, text, note FROM mapping_versions WHERE id = ?",
            (version_id,),
        )
        row = cur.fetchone()
        names = ("id", "at", "user", "path", "sha256", "text", "note")
        return dict(zip(names, row, strict=True)) if row else None

    def add_mapping_draft(self, user: str, base_sha: str, text: str, note: str) -> int:
        con = self._con()
        # Drafts are a step between review and save: a day is plenty.
        con.execute(
            "DELETE FROM mapping_drafts WHERE at < ?",
            ((_now() - dt.timedelta(days=1)).isoformat(),),
        )
        cur = con.execute(
            "INSERT INTO mapping_drafts (at, user, base_sha256, text, note) VALUES (?, ?, ?, ?, ?)",
            (_now().isoformat(), user, base_sha, text, note),
        )
        return int(cur.lastrowid or 0)

    def mapping_draft(self, draft_id: int, user: str) -> dict[str, Any] | None:
        """A draft of this user's (another user's draft is theirs to save)."""
        row = (
            self._con()
            .execute(
                "SELECT base_sha256, text, note FROM mapping_drafts WHERE id = ? AND user = ?",
                (draft_id, user),
            )
            .fetchone()
        )
        return dict(zip(("base_sha256", "text", "note"), row, strict=True)) if row else None

    def drop_mapping_draft(self, draft_id: int) -> None:
        self._con().execute("DELETE FROM mapping_drafts WHERE id = ?", (draft_id,))
