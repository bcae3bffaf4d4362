"""The outbox: every planned Sage document is a row before anything is posted; posting is
exactly once.

Why it is exactly once although Sage does not deduplicate:
1. a document is recorded (``sage.outbox``, status ``pending``) before any POST;
2. its ``attempts`` counter is committed *before* each POST, so after a crash between Sage's
   commit and ours the next run knows the outcome is uncertain and looks the document up by
   ``reference`` first (``check_first``);
3. within one attempt the client resolves uncertain answers (5xx, timeouts, dropped
   connections) by the same lookup before it resends;
4. once posted, the Sage number goes into ``sage.xref`` and the row is never posted again.

Failures end in exactly one of: posted; ``dead`` with a row in ``ops.dead_letters`` naming the
reason (Sage's code and field, or the planning error); ``pending`` with ``last_error`` when
Sage stayed unavailable after the client's retries (retried by the next run); or an
``AuthenticationError`` that stops the run at once.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from stripe_sage.errors import (
    AuthenticationError,
    NotFoundError,
    RetryableError,
    StripeSageError,
    ValidationError,
)
from stripe_sage.plan.documents import sage_customer_id
from stripe_sage.plan.item_codes import sage_item_code
from stripe_sage.sage.client import SageProClient
from stripe_sage.store.staging import Staging, now_utc

log = logging.getLogger(__name__)

KEY_FIELD = {
    "customers": "customer_id",
    "salesorders": "order_no",
    "invoices": "invoice_no",
    "cashreceipts": "receipt_no",
    "creditmemos": "memo_no",
    "journalentries": "entry_no",
    "items": "item",
}
XREF_TYPE = {
    "customer_link": "customer",
    "customer_update": "customer_update",
    "item_link": "item",
}
PLANNING_ERROR = "planning"
# A payload's reference to another document's Sage number (see resolve_placeholders).
XREF_PLACEHOLDER = re.compile(r'"@xref:([^"]+)"')
MAX_ID_SALT = 5


@dataclass
class LoadStats:
    enqueued: Counter[str] = field(default_factory=Counter)
    posted: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)
    waiting: Counter[str] = field(default_factory=Counter)  # planned again next run
    revived: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "enqueued": dict(self.enqueued),
            "posted": dict(self.posted),
            "dead": dict(self.dead),
            "deferred": dict(self.deferred),
            "waiting": dict(self.waiting),
            "revived": self.revived,
        }


@dataclass
class Outcome:
    doc_key: str
    status: str  # posted | dead | pending
    sage_id: str | None = None
    error: StripeSageError | None = None
    reason: str | None = None
    matched_by: str = "created"


def keys_in(keys: list[str]) -> str:
    """``(?, ?, …)``: an IN list of constants lets DuckDB find the keys through the outbox's
    primary-key index; ``IN (SELECT unnest(?))`` scans the whole outbox (2M rows at 1M
    charges), several times per batch of documents."""
    return "(" + ", ".join("?" * len(keys)) + ")"


def resolve_placeholders(value: Any, xref: dict[str, str]) -> Any:
    """Replace ``"@xref:<doc_key>"`` strings with the Sage number of that document."""
    if isinstance(value, str) and value.startswith("@xref:"):
        return xref[value[6:]]
    if isinstance(value, dict):
        return {k: resolve_placeholders(v, xref) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_placeholders(v, xref) for v in value]
    return value


class Loader:
    def __init__(
        self,
        staging: Staging,
        client: SageProClient,
        *,
        run_id: str,
        concurrency: int = 4,
        batch_size: int = 200,
        page_size: int = 5_000,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.st = staging
        self.client = client
        self.run_id = run_id
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.page_size = page_size  # outbox rows read at a time
        self.on_progress = on_progress
        self.stats = LoadStats()
        self._halt = threading.Event()

    # -- planning → outbox ----------------------------------------------------------------
    def enqueue(self, docs: pl.DataFrame) -> int:
        """Record newly planned documents; revive dead ones whose planning error is gone."""
        if docs.is_empty():
            return 0
        now = now_utc()
        docs = docs.unique(subset="doc_key", keep="last")
        waiting = docs.filter(pl.col("error").str.starts_with("waiting:").fill_null(False))
        for doc_type, n in waiting.group_by("doc_type").len().iter_rows():
            self.stats.waiting[doc_type] += n
        docs = docs.join(waiting.select("doc_key"), on="doc_key", how="anti")
        # Only the outbox rows of these keys: the whole outbox is millions of rows at scale.
        with self.st.registered("_enqueue_keys", docs.select("doc_key")):
            existing = self.st.frame(
                "SELECT o.doc_key, o.status, d.error_code AS error_kind FROM sage.outbox o "
                "LEFT JOIN ops.dead_letters d USING (doc_key) "
                "WHERE o.doc_key IN (SELECT doc_key FROM _enqueue_keys)"
            )
        fresh = docs.join(existing.select("doc_key"), on="doc_key", how="anti")
        revive = docs.filter(pl.col("error").is_null()).join(
            existing.filter(
                (pl.col("status") == "dead") & (pl.col("error_kind") == PLANNING_ERROR)
            ).select("doc_key"),
            on="doc_key",
            how="semi",
        )
        rows = (
            pl.concat([fresh, revive])
            .with_columns(
                pl.when(pl.col("error").is_null())
                .then(pl.lit("pending"))
                .otherwise(pl.lit("dead"))
                .alias("status"),
                pl.lit(None, pl.String).alias("sage_id"),
                pl.lit(0, pl.Int32).alias("attempts"),
                pl.col("error").alias("last_error"),
                pl.lit(now).alias("created_at"),
                pl.lit(now).alias("updated_at"),
                pl.lit(None, pl.Datetime("us", "UTC")).alias("posted_at"),
                pl.lit(self.run_id).alias("run_id"),
            )
            .select(
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
            )
        )
        if rows.is_empty():
            return 0
        with self.st.transaction() as con:
            con.register("_new_docs", rows.to_arrow())
            con.execute(
                "INSERT OR REPLACE INTO sage.outbox SELECT doc_key, doc_type, "
                "collection, stripe_id, phase, depends_on, CAST(payload AS JSON), "
                "status, sage_id, attempts, last_error, created_at, updated_at, "
                "posted_at, run_id FROM _new_docs"
            ).fetchall()
            con.unregister("_new_docs")
            if revive.height:
                con.execute(
                    "UPDATE ops.dead_letters SET replayed = true, replayed_at = ? "
                    "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                    [now, revive["doc_key"].to_list()],
                ).fetchall()
        for doc_type, n in (
            rows.filter(pl.col("status") == "pending").group_by("doc_type").len().iter_rows()
        ):
            self.stats.enqueued[doc_type] += n
        self.stats.revived += revive.height
        for row in rows.filter(pl.col("status") == "dead").iter_rows(named=True):
            self._dead_letter(
                row["doc_key"],
                row["doc_type"],
                row["stripe_id"],
                row["last_error"],
                payload=row["payload"],
                code=PLANNING_ERROR,
            )
            self.stats.dead[row["doc_type"]] += 1
        return rows.height

    # -- posting ---------------------------------------------------------------------------
    def _xref_for(self, rows: list[tuple[Any, ...]]) -> dict[str, str]:
        """The Sage numbers of what these outbox rows depend on or refer to."""
        wanted = {d for row in rows for d in row[5] or []}
        for row in rows:
            if isinstance(row[4], str) and "@xref:" in row[4]:
                wanted.update(XREF_PLACEHOLDER.findall(row[4]))
        if not wanted:
            return {}
        found = self.st.con.execute(
            "SELECT doc_type, stripe_id, sage_id FROM sage.xref "
            "WHERE doc_type || ':' || stripe_id IN (SELECT unnest(?::VARCHAR[]))",
            [sorted(wanted)],
        ).fetchall()
        return {f"{t}:{s}": sid for t, s, sid in found}

    def _xref(self) -> dict[str, str]:
        rows = self.st.con.execute("SELECT doc_type, stripe_id, sage_id FROM sage.xref").fetchall()
        return {f"{t}:{s}": sid for t, s, sid in rows}

    def _dead(self) -> dict[str, str]:
        """Why each dependency cannot be posted: dead-lettered, or its record quarantined."""
        rows = self.st.con.execute(
            "SELECT doc_type, stripe_id, doc_key, coalesce(last_error, 'dead-lettered') "
            "FROM sage.outbox WHERE status = 'dead'"
        ).fetchall()
        out: dict[str, str] = {}
        for doc_type, stripe_id, key, reason in rows:
            out[key] = f"{key} is dead-lettered ({reason})"
            # Dependents name a linked customer as "customer:<id>".
            out[f"{XREF_TYPE.get(doc_type, doc_type)}:{stripe_id}"] = out[key]
        for stream, object_id, check, reason in self.st.con.execute(
            'SELECT stream, id, "check", reason FROM staging.quarantine'
        ).fetchall():
            if stream == "customers":
                out.setdefault(
                    f"customer:{object_id}",
                    f"customer:{object_id} is quarantined ({check}: {reason})",
                )
        return out

    def pending_count(self) -> int:
        return int(
            self.st.con.execute(
                "SELECT count(*) FROM sage.outbox WHERE status = 'pending'"
            ).fetchall()[0][0]
        )

    def revive_unblocked(self) -> int:
        """Documents dead-lettered as ``blocked`` go back to pending once every document they
        wait for is in Sage (e.g. after a dead letter was corrected and replayed)."""
        xref = self._xref()
        rows = self.st.con.execute(
            "SELECT o.doc_key, o.depends_on FROM sage.outbox o JOIN ops.dead_letters d "
            "USING (doc_key) WHERE o.status = 'dead' AND d.error_code = 'blocked'"
        ).fetchall()
        ready = [k for k, deps in rows if all(d in xref for d in deps or [])]
        if ready:
            with self.st.transaction() as con:
                con.execute(
                    "UPDATE sage.outbox SET status = 'pending', last_error = NULL "
                    "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                    [ready],
                ).fetchall()
                con.execute(
                    "UPDATE ops.dead_letters SET replayed = true, replayed_at = ? "
                    "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                    [now_utc(), ready],
                ).fetchall()
            self.stats.revived += len(ready)
        return len(ready)

    def run(self) -> LoadStats:
        self.revive_unblocked()
        total = self.pending_count()
        done = 0
        phases = [
            r[0]
            for r in self.st.con.execute(
                "SELECT DISTINCT phase FROM sage.outbox WHERE status = 'pending' ORDER BY phase"
            ).fetchall()
        ]
        for phase in phases:
            dead = self._dead()
            after = ""
            # Keyset pages of the phase: memory stays at one page of payloads (and the Sage
            # numbers that page refers to) however large the outbox is.
            while rows := self.st.con.execute(
                "SELECT doc_key, doc_type, collection, stripe_id, payload, depends_on, attempts "
                "FROM sage.outbox WHERE status = 'pending' AND phase = ? AND doc_key > ? "
                "ORDER BY doc_key LIMIT ?",
                [phase, after, self.page_size],
            ).fetchall():
                after = rows[-1][0]
                xref = self._xref_for(rows)
                ready: list[tuple[Any, ...]] = []
                for row in rows:
                    doc_key, doc_type, _, stripe_id, _, deps, _ = row
                    blocked = [d for d in deps or [] if d in dead and d not in xref]
                    if blocked:
                        reason = f"blocked: {dead[blocked[0]]}"
                        self._mark_dead(doc_key, doc_type, stripe_id, reason, code="blocked")
                        done += 1
                        continue
                    if any(d not in xref for d in deps or []):
                        self.stats.deferred[doc_type] += 1  # its dependency is still pending
                        continue
                    ready.append(row)
                for i in range(0, len(ready), self.batch_size):
                    batch = ready[i : i + self.batch_size]
                    self._post_batch(batch, xref)
                    done += len(batch)
                    if self.on_progress:
                        self.on_progress(done, total)
        return self.stats

    def _post_batch(self, batch: list[tuple[Any, ...]], xref: dict[str, str]) -> None:
        keys = [r[0] for r in batch]
        # Committed before any POST: after a crash these documents are looked up first.
        self.st._exec(
            "UPDATE sage.outbox SET attempts = attempts + 1, updated_at = ? "
            f"WHERE doc_key IN {keys_in(keys)}",
            [now_utc(), *keys],
        )
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sage") as pool:
            outcomes = list(pool.map(lambda r: self._post_one(r, xref), batch))
        auth = next((o.error for o in outcomes if isinstance(o.error, AuthenticationError)), None)
        skipped = [o.doc_key for o in outcomes if o.status == "skipped"]
        if skipped:  # never sent: no lookup needed before their next attempt
            self.st._exec(
                "UPDATE sage.outbox SET attempts = attempts - 1 "
                f"WHERE doc_key IN {keys_in(skipped)}",
                skipped,
            )
        by_key = {r[0]: r for r in batch}
        posted = [o for o in outcomes if o.status == "posted"]
        self._mark_posted_many(
            [
                (
                    o.doc_key,
                    by_key[o.doc_key][1],
                    by_key[o.doc_key][2],
                    by_key[o.doc_key][3],
                    o.sage_id or "",
                    o.matched_by,
                )
                for o in posted
            ]
        )
        for o in outcomes:
            _, doc_type, _, stripe_id, payload, _, _ = by_key[o.doc_key]
            if o.status == "posted":
                self.stats.posted[doc_type] += 1
            elif o.status == "dead":
                err = o.error
                self._mark_dead(
                    o.doc_key,
                    doc_type,
                    stripe_id,
                    o.reason or str(err),
                    code=err.code if err else None,
                    http_status=err.http_status if err else None,
                    field=err.field if err else None,
                    payload=payload,
                )
            else:
                self.st._exec(
                    "UPDATE sage.outbox SET last_error = ?, updated_at = ? WHERE doc_key = ?",
                    [
                        o.reason or "not sent: the run stopped on an authentication error",
                        now_utc(),
                        o.doc_key,
                    ],
                )
                self.stats.deferred[doc_type] += 1
        if auth is not None:
            raise auth

    def _post_one(self, row: tuple[Any, ...], xref: dict[str, str]) -> Outcome:
        doc_key, doc_type, collection, stripe_id, payload, _, attempts = row
        if self._halt.is_set():
            return Outcome(doc_key, "skipped")
        try:
            body = resolve_placeholders(
                json.loads(payload) if isinstance(payload, str) else payload, xref
            )
            matched_by = body.pop("_matched_by", "created")
            if doc_type == "customer_link":
                self.client.get_customer(body["customer_id"])
                return Outcome(doc_key, "posted", body["customer_id"], matched_by=matched_by)
            if doc_type == "customer":
                return self._create_customer(doc_key, body, stripe_id)
            if doc_type == "customer_update":
                return self._update_customer(doc_key, body)
            if doc_type in ("item", "item_link"):
                return self._post_item(doc_key, doc_type, body, stripe_id, matched_by)
            if doc_type == "invoice" and body.get("sales_order_no") is None:
                body.pop("sales_order_no", None)
            doc = self.client.create(collection, body, check_first=attempts > 0)
            return Outcome(doc_key, "posted", str(doc[KEY_FIELD[collection]]))
        except AuthenticationError as exc:
            self._halt.set()  # no retry storm: the other workers stop before their next POST
            return Outcome(doc_key, "pending", error=exc, reason=str(exc))
        except NotFoundError as exc:
            if doc_type == "customer_link":
                return Outcome(
                    doc_key,
                    "dead",
                    error=exc,
                    reason=(
                        f"Stripe metadata.sage_customer_id names Sage customer "
                        f"{body['customer_id']}, which does not exist in Sage"
                    ),
                )
            return Outcome(doc_key, "dead", error=exc, reason=str(exc))
        except ValidationError as exc:
            return Outcome(doc_key, "dead", error=exc, reason=_reason(exc, doc_key))
        except RetryableError as exc:
            return Outcome(doc_key, "pending", error=exc, reason=str(exc))

    def _post_item(
        self, doc_key: str, doc_type: str, body: dict[str, Any], stripe_id: str, matched_by: str
    ) -> Outcome:
        """An item a product names (``item_link``: it must exist) or the product's own item:
        created unless Sage has it (then linked); when Sage holds the code for another
        product, the next salted code. Two runs racing create it once (see create_item)."""
        if doc_type == "item_link":
            try:
                found = self.client.get_item(body["item"])
            except NotFoundError:
                raise ValidationError(
                    f"Stripe product {stripe_id} metadata.sage_item names Sage item "
                    f"{body['item']}, which is not in Sage's item master",
                    code="unknown_item",
                    field="item",
                    system="sagepro",
                ) from None
            return Outcome(doc_key, "posted", str(found["item"]), matched_by=matched_by)
        for salt in range(MAX_ID_SALT):
            if salt:
                body = {**body, "item": sage_item_code(stripe_id, body["description"], salt)}
            try:
                item, created = self.client.create_item(body)
                return Outcome(
                    doc_key,
                    "posted",
                    str(item["item"]),
                    matched_by="created" if created else "linked",
                )
            except ValidationError as exc:
                # The code is another product's (reference differs), or the default item's
                # code clashes with nothing we can fix: only a product's item tries another.
                if exc.field != "item" or not stripe_id.startswith("prod_"):
                    raise
                log.warning("Sage item %s belongs to another product; trying another", body["item"])
        raise ValidationError(
            f"no free Sage item code for {stripe_id} after {MAX_ID_SALT} candidates",
            code="validation_error",
            field="item",
            system="sagepro",
        )

    def _update_customer(self, doc_key: str, body: dict[str, Any]) -> Outcome:
        """PUT only what differs from Sage's current record: an update that changes nothing
        is not sent, so Sage→Stripe and Stripe→Sage changes never ping-pong."""
        customer_id = body.pop("customer_id")
        current = self.client.get_customer(customer_id)
        changes = {k: v for k, v in body.items() if k != "reference" and current.get(k) != v}
        if changes:
            self.client.update_customer(customer_id, changes)
        return Outcome(
            doc_key, "posted", customer_id, matched_by="updated" if changes else "unchanged"
        )

    def _create_customer(self, doc_key: str, body: dict[str, Any], stripe_id: str) -> Outcome:
        """Deterministic id; on a clash with another customer, the next salted candidate."""
        prefix = body["customer_id"][0] if body["customer_id"][:1].isalpha() else ""
        for salt in range(MAX_ID_SALT):
            if salt:
                body = {**body, "customer_id": sage_customer_id(stripe_id, prefix, salt)}
            try:
                doc = self.client.create("customers", body, check_first=True)
                return Outcome(doc_key, "posted", str(doc["customer_id"]))
            except ValidationError as exc:
                if exc.field != "customer_id":
                    raise
                log.warning(
                    "Sage customer id %s is taken by another customer; trying another",
                    body["customer_id"],
                )
        raise ValidationError(
            f"no free Sage customer id for {stripe_id} after {MAX_ID_SALT} candidates",
            code="validation_error",
            field="customer_id",
            system="sagepro",
        )

    # -- bookkeeping -----------------------------------------------------------------------
    def _mark_posted_many(self, rows: list[tuple[str, str, str, str, str, str]]) -> None:
        """Record a batch of posted documents and their cross-references in one transaction."""
        if not rows:
            return
        now = now_utc()
        frame = pl.DataFrame(
            rows,
            schema=["doc_key", "doc_type", "collection", "stripe_id", "sage_id", "matched_by"],
            orient="row",
        ).with_columns(pl.col("doc_type").replace(XREF_TYPE).alias("xref_type"))
        with self.st.transaction() as con:
            con.register("_posted", frame.to_arrow())
            keys = [r[0] for r in rows]
            con.execute(
                "UPDATE sage.outbox o SET status = 'posted', sage_id = p.sage_id, "
                "posted_at = ?, updated_at = ?, last_error = NULL FROM _posted p "
                f"WHERE o.doc_key = p.doc_key AND o.doc_key IN {keys_in(keys)}",
                [now, now, *keys],
            ).fetchall()
            con.execute(
                "INSERT OR REPLACE INTO sage.xref SELECT stripe_id, xref_type, "
                "collection, sage_id, matched_by, ?, ? FROM _posted",
                [now, self.run_id],
            ).fetchall()
            con.unregister("_posted")

    def _mark_dead(
        self, doc_key: str, doc_type: str, stripe_id: str, reason: str, **details: Any
    ) -> None:
        """Outbox row dead + its dead letter (``details``: code, http_status, field, payload)."""
        self.st._exec(
            "UPDATE sage.outbox SET status = 'dead', last_error = ?, updated_at = ? "
            "WHERE doc_key = ?",
            [reason, now_utc(), doc_key],
        )
        self._dead_letter(doc_key, doc_type, stripe_id, reason, **details)
        self.stats.dead[doc_type] += 1

    def _dead_letter(
        self,
        doc_key: str,
        doc_type: str,
        stripe_id: str,
        reason: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        field: str | None = None,
        payload: Any = None,
    ) -> None:
        now = now_utc()
        body = payload if isinstance(payload, str) or payload is None else json.dumps(payload)
        self.st._exec(
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
                body,
                now,
                now,
                self.run_id,
            ],
        )


def _reason(exc: StripeSageError, doc_key: str) -> str:
    where = f" (field {exc.field})" if exc.field else ""
    return f"Sage rejected {doc_key}: {exc.code or 'error'}{where}: {exc.message}"
