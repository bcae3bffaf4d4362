"""Incremental extraction of Stripe into ``raw.*`` (the rules of docs/stripe.md, in code).

- First run of a stream: read by ``created`` in half-open windows ``[a, b)``, a checkpoint
  per window (``ops.sync_windows``), so a crashed backfill resumes where it stopped.
- Later runs: the ``created`` window since the stream's cursor (new objects), then
  ``/v1/events`` since the events cursor, re-fetching every changed object from its own
  endpoint so that old API-version payloads and missing expansions never leak in.
- An events cursor older than Stripe's 30-day retention falls back, loudly, to a full
  windowed re-read of the mutable streams.
- Balance transactions are immutable: re-read with a lookback and upserted by id.
- Cursors move only after the data they cover is committed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from stripe_sage.errors import NotFoundError
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import JSON, ListPage, StripeReader
from stripe_sage.stripe.streams import CHILD_STREAMS, LISTED_STREAMS, OBJECT_TO_STREAM, STREAMS

log = logging.getLogger(__name__)

DAY = 86_400
EVENT_RETENTION = 30 * DAY
# Objects per list request (Stripe's maximum).
PAGE_SIZE = 100
# Re-read a little before each cursor: objects land in Stripe's lists with a small delay.
OVERLAP = 300
# A backfill window of a sparse stream grows until it holds about this many objects (20 pages).
WINDOW_OBJECTS = 2_000
# Pages read but not yet written (back-pressure on the HTTP threads: memory stays bounded).
MAX_QUEUED_PAGES = 256
# Pages the writer commits in one transaction when they have piled up.
MAX_PAGES_PER_COMMIT = 128
# An idle writer thread ends (the next page starts another).
WRITER_IDLE_SECONDS = 2.0


@dataclass
class ExtractStats:
    stream: str
    mode: str = ""
    listed: int = 0
    windows: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class EventStats:
    events: int = 0
    changed: dict[str, int] = field(default_factory=dict)
    fallback: bool = False
    warnings: list[str] = field(default_factory=list)


# Metadata keys the product writes back to Stripe (see writeback.py).
# Streams re-fetched with their balance transaction expanded (``_refetch``).
EXPAND_BT = frozenset({"charges", "refunds"})
WRITEBACK_KEYS = frozenset({"sage_customer_id", "sage_invoice_no", "sage_order_no", "sage_item"})


def writeback_echo(event: JSON) -> dict[str, Any] | None:
    """The metadata values of an ``*.updated`` event that changed nothing but the keys our
    write-back sets (the echo of our own write), else None."""
    if not str(event.get("type", "")).endswith(".updated"):
        return None
    data = event.get("data") or {}
    previous = data.get("previous_attributes") or {}
    if set(previous) != {"metadata"}:
        return None
    now = (data.get("object") or {}).get("metadata") or {}
    before = previous.get("metadata") or {}
    keys = {k for k in set(now) | set(before) if now.get(k) != before.get(k)}
    if not keys or not keys <= WRITEBACK_KEYS:
        return None
    return {k: now.get(k) for k in keys}


def windows(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """Half-open windows ``[a, b)`` covering ``[start, end)``."""
    out, a = [], start
    while a < end:
        b = min(end, a + size)
        out.append((a, b))
        a = b
    return out


def window_pages(
    reader: StripeReader, stream: str, a: int, b: int, *, now: int
) -> Iterator[list[JSON]]:
    """The pages of one stream's objects created in ``[a, b)``, with the stream's expansions."""
    return reader.list_pages(*_window_list(stream, a, b, now))


def window_bodies(
    reader: StripeReader, stream: str, a: int, b: int, *, now: int
) -> Iterator[ListPage]:
    """``window_pages`` as Stripe sent them (for ``PageWriter.put_body``)."""
    return reader.list_bodies(*_window_list(stream, a, b, now))


def _window_list(stream: str, a: int, b: int, now: int) -> tuple[str, JSON]:
    s = STREAMS[stream]
    # Stripe's timestamps are whole seconds: the window reaching "now" includes this second.
    params: JSON = {"created": {"gte": a, "lt": b + 1 if b >= now else b}}
    if s.expand:
        params["expand"] = [f"data.{e}" for e in s.expand]
    return s.path, params


def invoice_lines(reader: StripeReader, invoices: Iterable[JSON]) -> list[JSON]:
    """Lines of each invoice: embedded ones, plus the rest paged from its lines endpoint."""
    out: list[JSON] = []
    for inv in invoices:
        lines_obj = inv.get("lines") or {}
        lines = list(lines_obj.get("data", []))
        if lines_obj.get("has_more"):
            lines = []
            for page in reader.list_pages(f"/v1/invoices/{inv['id']}/lines"):
                lines.extend(page)
        for position, line in enumerate(lines):
            out.append(
                {
                    **line,
                    "invoice": line.get("invoice") or inv["id"],
                    "_position": position,
                    "created": inv.get("created"),
                }
            )
    return out


def checkout_line_items(reader: StripeReader, sessions: Iterable[JSON]) -> list[JSON]:
    """Line items of each Checkout Session: the expanded ones, or all of them paged from
    ``/v1/checkout/sessions/{id}/line_items`` when there are more (or none came expanded)."""
    out: list[JSON] = []
    for cs in sessions:
        expanded = cs.get("line_items")
        items = list((expanded or {}).get("data", []))
        if expanded is None or expanded.get("has_more"):
            items = []
            for page in reader.list_pages(f"/v1/checkout/sessions/{cs['id']}/line_items"):
                items.extend(page)
        for position, item in enumerate(items):
            out.append(
                {**item, "_session": cs["id"], "_position": position, "created": cs.get("created")}
            )
    return out


def child_rows(reader: StripeReader, stream: str, objects: Iterable[JSON]) -> list[JSON]:
    """The child rows a page of ``stream`` carries (invoice lines, Checkout line items)."""
    if stream == "invoices":
        return invoice_lines(reader, objects)
    if stream == "checkout_sessions":
        return checkout_line_items(reader, objects)
    return []


def _exists(reader: Any, stream: str, start: int, before: int) -> bool:
    page = reader.request(
        "get", STREAMS[stream].path, {"created": {"gte": start, "lt": before}, "limit": 1}
    )
    return bool(page.get("data"))


def window_size(newest: list[JSON], now: int, base: int, min_objects: int) -> int:
    """The backfill grid's window: ``base`` doubled (at most 64×) until a window would hold
    ``min_objects`` at the density of the newest page. What a window costs is a partial last
    page, and what it buys is parallel reads of a large stream: at 10k charges a fixed 7-day
    grid made 700 requests where one cursor per stream makes 400. ``min_objects`` 0 keeps
    ``base``."""
    if min_objects <= 0 or not newest:
        return base
    span = max(1, now - min(int(o["created"]) for o in newest))
    size = base
    for _ in range(6):
        if size * len(newest) / span >= min_objects:
            break
        size *= 2
    return size


def backfill_windows(
    reader: Any, stream: str, start: int, now: int, size: int, *, min_objects: int = 0
) -> list[tuple[int, int]]:
    """Windows on a grid of multiples of the window size (so a resumed backfill finds its
    checkpoints), from the window of the oldest object, found by a binary search of
    ``limit=1`` probes, to now. A stream whose whole range fits in one page is one window
    (no probes: two requests in all). With ``min_objects``, the window grows for a sparse
    stream (:func:`window_size`). ``reader`` is anything with our reader's ``request``."""
    whole = reader.request(
        "get", STREAMS[stream].path, {"created": {"gte": start, "lt": now}, "limit": PAGE_SIZE}
    )
    data = whole.get("data") or []
    if not data:
        return []
    if not whole.get("has_more"):
        oldest_day = min(int(o["created"]) for o in data) // DAY * DAY
        return [(max(start, oldest_day), now)]
    size = window_size(data, now, size, min_objects)
    lo, hi = start // size, now // size + 1  # the oldest object is in [lo, hi) windows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _exists(reader, stream, start, mid * size):
            hi = mid
        else:
            lo = mid
    first = max(start, lo * size)
    grid = [first, *range((lo + 1) * size, now, size), now]
    return list(itertools.pairwise(grid))


class PageWriter:
    """The one thread that writes what the HTTP threads read: fetching never waits on a
    DuckDB commit, and pages that queue up meanwhile share one transaction.

    Items are written in the order they were queued: a page, or a call (a checkpoint or a
    cursor move) that runs in the transaction of the pages queued before it, so a window is
    never marked done before its pages are committed. A failed commit is raised to every
    later ``put``/``flush``: the run fails, nothing after it is written, and its rolled-back
    checkpoints make the next run read those windows again.
    """

    _STOP = object()

    def __init__(self, staging: Staging, lock: threading.Lock, *, run_id: str, api_version: str):
        self.staging, self.lock = staging, lock
        self.run_id, self.api_version = run_id, api_version
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=MAX_QUEUED_PAGES)
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()

    def put_page(self, stream: str, objects: list[JSON], source: str) -> None:
        self._put(("page", stream, objects, source))

    def put_body(self, stream: str, body: bytes, source: str) -> None:
        """A list page as Stripe sent it: DuckDB splits it (``Staging.upsert_pages``)."""
        self._put(("body", stream, body, source))

    def put_call(self, fn: Callable[[], None]) -> None:
        self._put(("call", fn))

    def flush(self) -> None:
        """Wait until everything queued so far is committed (raises the writer's error)."""
        done = threading.Event()
        self._put(("barrier", done))
        done.wait()
        self._raise()

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Everything queued inside the block is committed on leaving it, also when the block
        fails (pages read before an HTTP error are kept; the block's error is the one raised)."""
        try:
            yield
        except BaseException:
            try:
                self.flush()
            except Exception:
                log.exception("writing the pages read before the failure failed too")
            raise
        self.flush()

    def close(self) -> None:
        with self._state:
            thread, self._thread = self._thread, None
            if thread is not None:
                self.queue.put(self._STOP)
        if thread is not None:
            thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _put(self, item: Any) -> None:
        # Under the state lock, so the writer cannot stop between our check and the put.
        with self._state:
            self._raise()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="x-writer", daemon=True)
                self._thread.start()
            self.queue.put(item)

    def _loop(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=WRITER_IDLE_SECONDS)
            except queue.Empty:
                with self._state:  # no put can slip in while we decide
                    if self.queue.empty():
                        self._thread = None
                        return
                continue
            batch = [first]
            while len(batch) < MAX_PAGES_PER_COMMIT:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                if self.error is None:
                    self._commit([i for i in batch if i is not self._STOP])
            except BaseException as exc:  # handed to the threads that wait on us
                self.error = exc
            for item in batch:
                if isinstance(item, tuple) and item[0] == "barrier":
                    item[1].set()
            if any(i is self._STOP for i in batch):
                return

    def _commit(self, items: list[Any]) -> None:
        if not any(item[0] in ("page", "body", "call") for item in items):
            return
        with self.lock, self.staging.transaction():
            # Pages of one stream are merged into one write; a stream's pages of another
            # kind or source first write what is pending, so the last version still wins.
            pending: dict[tuple[str, str, str], list[Any]] = {}
            for item in items:
                if item[0] in ("page", "body"):
                    kind, stream, content, source = item
                    key = (stream, source, kind)
                    if key not in pending and any(k[0] == stream for k in pending):
                        self._write_pages(pending)
                    if kind == "page":
                        pending.setdefault(key, []).extend(content)
                    else:
                        pending.setdefault(key, []).append(content)
                elif item[0] == "call":
                    self._write_pages(pending)
                    item[1]()
            self._write_pages(pending)

    def _write_pages(self, pending: dict[tuple[str, str, str], list[Any]]) -> None:
        kw = {"run_id": self.run_id, "api_version": self.api_version}
        for (stream, source, kind), content in pending.items():
            if kind == "page":
                self.staging.upsert_raw(stream, content, source=source, **kw)
            else:
                self.staging.upsert_pages(stream, content, source=source, **kw)
        pending.clear()


class Extractor:
    """Extracts streams into one staging database. Thread-safe: HTTP threads read, one
    ``PageWriter`` thread writes; other DuckDB access holds ``write_lock``."""

    def __init__(
        self,
        reader: StripeReader,
        staging: Staging,
        *,
        run_id: str,
        now: int,
        backfill_start: int,
        window_seconds: int = 7 * DAY,
        window_objects: int = 0,
        workers: int = 4,
        lock: threading.Lock | None = None,
    ) -> None:
        self.reader = reader
        self.staging = staging
        self.run_id = run_id
        self.now = now
        self.backfill_start = backfill_start
        self.window_seconds = window_seconds
        self.window_objects = window_objects  # grow windows for sparse streams (0: fixed)
        self.workers = workers
        # DuckDB allows concurrent writers in one process, but our small transactions are
        # cheaper serialized than retried on conflict.
        self.write_lock = lock or threading.Lock()
        self.writer = PageWriter(
            staging, self.write_lock, run_id=run_id, api_version=reader.api_version
        )

    # -- writing ---------------------------------------------------------------------------
    def _write(self, stream: str, page: list[JSON] | ListPage, source: str) -> int:
        """Queue one page (and its child rows: an invoice page's lines, a Checkout Session
        page's line items) for the writer thread. A listed page goes as Stripe sent it: only
        a page with children is parsed here, for them."""
        lines: list[JSON] = []
        child = CHILD_STREAMS.get(stream)
        if child is not None:
            # Children past the expanded ones are paged from Stripe here, in the HTTP thread.
            objects = page.objects() if isinstance(page, ListPage) else page
            lines = child_rows(self.reader, stream, objects)
        if isinstance(page, ListPage):
            self.writer.put_body(stream, page.body, source)
            ids = page.ids
        else:
            self.writer.put_page(stream, page, source)
            ids = [o["id"] for o in page]
        if lines and child is not None:
            self.writer.put_page(child, lines, source)
        return len(set(ids))

    # -- listed streams --------------------------------------------------------------------
    def _read_window(self, stream: str, a: int, b: int, *, checkpoint: bool = False) -> int:
        """Write a window page by page (memory stays at a few pages); with ``checkpoint``,
        record the window as done once its last page is committed."""
        n = 0
        for page in window_bodies(self.reader, stream, a, b, now=self.now):
            n += self._write(stream, page, "list")
        if checkpoint:
            rows = n

            def mark_done() -> None:  # runs in the transaction of the window's last page
                self.staging.mark_window(stream, a, b, rows, self.run_id)
                if (self.staging.sync_state(stream) or {}).get("events_cursor") is None:
                    # From the first committed window on, updates to what the backfill has
                    # read are caught by the event read that follows it (even after a crash).
                    self.staging.set_sync_state(stream, events_cursor=self.now - OVERLAP)

            self.writer.put_call(mark_done)
        return n

    def extract_stream(
        self, stream: str, *, full_refresh: bool = False, since: int | None = None
    ) -> ExtractStats:
        """List one stream: its backfill windows on the first run, else what is new."""
        s = STREAMS[stream]
        stats = ExtractStats(stream)
        with self.write_lock:
            state = self.staging.sync_state(stream) or {}
        if full_refresh or not state.get("backfill_done"):
            stats.mode = "backfill"
            start = since if since is not None else self.backfill_start
            with self.write_lock:
                done = set() if full_refresh else self.staging.windows_done(stream)
            todo = [w for w in self.backfill_windows(stream, start, done) if w not in done]

            def one(w: tuple[int, int]) -> int:
                return self._read_window(stream, *w, checkpoint=True)

            # Cursors move only after the data they cover is committed.
            with (
                self.writer.committing(),
                ThreadPoolExecutor(self.workers, thread_name_prefix=f"x-{stream}") as pool,
            ):
                for n in pool.map(one, todo):
                    stats.listed += n
                    stats.windows += 1
            with self.write_lock:
                if (self.staging.sync_state(stream) or {}).get("events_cursor") is None:
                    self.staging.set_sync_state(stream, events_cursor=self.now - OVERLAP)
                self.staging.set_sync_state(stream, created_cursor=self.now, backfill_done=True)
            return stats
        stats.mode = "incremental"
        cursor = int(state["created_cursor"])
        back = max(OVERLAP, s.lookback_seconds)
        with self.writer.committing():
            stats.listed = self._read_window(stream, cursor - back, self.now)
        with self.write_lock:
            self.staging.set_sync_state(stream, created_cursor=self.now)
        return stats

    def backfill_windows(
        self, stream: str, start: int, done: Collection[tuple[int, int]] = ()
    ) -> list[tuple[int, int]]:
        if done:
            # A resumed backfill keeps the grid its done windows are on (the density of the
            # newest page may have changed since).
            size = max(b - a for a, b in done)
            return backfill_windows(self.reader, stream, start, self.now, size)
        return backfill_windows(
            self.reader, stream, start, self.now, self.window_seconds,
            min_objects=self.window_objects,
        )  # fmt: skip

    # -- events ----------------------------------------------------------------------------
    def extract_events(self, *, streams: Iterable[str] = LISTED_STREAMS) -> EventStats:
        """Re-fetch every object an event says changed since the events cursor."""
        wanted = {s for s in streams if STREAMS[s].mode == "events"}
        stats = EventStats()
        cursors = [
            st["events_cursor"]
            for s in wanted
            if (st := self.staging.sync_state(s)) and st.get("events_cursor") is not None
        ]
        if not cursors:
            return stats
        since = min(cursors)
        if self.now - since > EVENT_RETENTION - DAY:
            msg = (
                f"events cursor is {(self.now - since) / DAY:.1f} days old, beyond Stripe's "
                "30-day event retention: re-reading every mutable stream by windows"
            )
            log.warning(msg)
            stats.fallback = True
            stats.warnings.append(msg)
            for stream in sorted(wanted):
                self.extract_stream(stream, full_refresh=True)
                if stream == "customers":
                    self._tombstone_unlisted_customers()
                self.staging.set_sync_state(stream, events_cursor=self.now - OVERLAP)
            if "customers" in wanted:
                self.fetch_referenced_customers()
            return stats
        changed: dict[str, dict[str, str]] = {}  # stream → id → last event type
        echoes: dict[str, dict[str, dict[str, Any]]] = {}
        for page in self.reader.list_pages("/v1/events", {"created": {"gte": since}}):
            for event in page:
                stats.events += 1
                obj = event.get("data", {}).get("object", {})
                patch = writeback_echo(event)
                if patch is not None:
                    stream = OBJECT_TO_STREAM.get(obj.get("object", ""), "")
                    if stream not in STREAMS:
                        # e.g. payment_intent.updated from our acknowledgement write-back:
                        # no stream keeps payment intents, nothing to merge it into.
                        continue
                    merged = echoes.setdefault(stream, {}).setdefault(obj["id"], {})
                    for key, value in patch.items():
                        merged.setdefault(key, value)  # newest first: keep the latest value
                    continue
                stream = OBJECT_TO_STREAM.get(obj.get("object", ""), "")
                if stream in wanted and obj.get("id"):
                    changed.setdefault(stream, {})[obj["id"]] = event["type"]
                if obj.get("object") == "invoice" and event["type"] in (
                    "invoice.paid",
                    "invoice.payment_succeeded",
                ):
                    # invoice_payment objects have no events of their own.
                    changed.setdefault("invoice_payments", {})["invoice:" + obj["id"]] = event[
                        "type"
                    ]
        self.claim_echoes(echoes, changed)
        stats.changed = self.refetch_changed(changed)
        self.apply_echoes(echoes, changed)
        if "customers" in wanted:
            self.fetch_referenced_customers()
        for stream in wanted:
            self.staging.set_sync_state(stream, events_cursor=self.now - OVERLAP)
        return stats

    def claim_echoes(
        self, echoes: dict[str, dict[str, dict[str, Any]]], changed: dict[str, dict[str, str]]
    ) -> None:
        """Keep as echoes only the values our write-back recorded in ``sage.writeback``; the
        same keys set by someone else (e.g. finance choosing a Sage customer for an ambiguous
        email) are real changes and are re-fetched."""
        ids = [i for patches in echoes.values() for i in patches]
        ours = self.staging.written_back(ids)
        for stream, patches in echoes.items():
            for object_id in list(patches):
                if not all((object_id, k, v) in ours for k, v in patches[object_id].items()):
                    del patches[object_id]
                    changed.setdefault(stream, {})[object_id] = f"{stream}.updated"

    def apply_echoes(
        self, echoes: dict[str, dict[str, dict[str, Any]]], changed: dict[str, dict[str, str]]
    ) -> int:
        """Our own metadata write-backs coming back as ``*.updated`` events: merge the values
        into the stored object instead of re-fetching it (an object that also changed
        otherwise was re-fetched whole)."""
        n = 0
        for stream, patches in echoes.items():
            rows = [
                (i, json.dumps({"metadata": p}))
                for i, p in patches.items()
                if i not in changed.get(stream, {})
            ]
            if not rows:
                continue
            frame = pa.table({"id": [r[0] for r in rows], "patch": [r[1] for r in rows]})
            with self.write_lock:
                self.staging.merge_patches(stream, frame, run_id=self.run_id)
            n += len(rows)
        return n

    def refetch_changed(
        self, changed: dict[str, dict[str, str]], source: str = "event"
    ) -> dict[str, int]:
        """Re-fetch each changed object from its own endpoint (objects this run already listed
        are current and skipped). ``changed``: stream → object id → event type."""
        fresh = self._fresh_ids(changed)
        counts = {}
        for stream, ids in changed.items():
            todo = [i for i in ids if i not in fresh.get(stream, set())]
            counts[stream] = len(todo)
            if todo:
                self._refetch(stream, todo, ids, source)
        return counts

    def fetch_missing_customers(self, source: str = "webhook") -> int:
        """Customers that objects re-fetched in this run point at but staging never saw (a
        webhook for a brand-new customer's first charge may arrive before its own)."""
        missing = self.staging.customers_missing_for(self.run_id)
        if missing:
            self._refetch("customers", missing, {}, source)
        return len(missing)

    def fetch_referenced_customers(self, source: str = "list") -> int:
        """Customers that staged charges or invoices point at but no list returned. Stripe's
        customer list leaves deleted customers out, so without this a charge of a deleted
        customer waits forever for its customer. Each is retrieved by id; Stripe answers a
        deleted one with a stub (``{"id", "object": "customer", "deleted": true}``), staged
        as a deleted customer: the mapping's name fallbacks rebuild its name from the
        charge's billing details, and it posts inactive (docs/accounting.md §2)."""
        with self.write_lock:
            missing = self.staging.customers_referenced_unlisted()
        if missing:
            log.info("%d customers referenced by charges or invoices were never listed "
                     "(deleted in Stripe?): retrieving them by id", len(missing))  # fmt: skip
            self._refetch("customers", missing, {}, source)
        return len(missing)

    def _unknown_customer_stubs(self, stubs: list[JSON]) -> list[JSON]:
        """Deleted-customer stubs raw has no row for, dated by the first charge or invoice
        that names them (a stub has no ``created``; staging requires one)."""
        ids = [o["id"] for o in stubs]
        with self.write_lock:
            first = self.staging.unknown_customers_first_named(ids)
        return [
            {**o, "deleted": True, "created": first[o["id"]] or self.now}
            for o in stubs
            if o["id"] in first
        ]

    def fetch_missing_balance_transactions(self, source: str = "webhook") -> int:
        """Balance transactions that objects re-fetched in this run point at but staging never
        saw: a new charge's amounts and fees live there (receipts wait for them)."""
        missing = self.staging.balance_transactions_missing_for(self.run_id)
        if missing:
            self._refetch("balance_transactions", missing, {}, source)
        return len(missing)

    def fetch_checkout_sessions_of_charges(self, source: str = "webhook") -> int:
        """The Checkout Session of each charge re-fetched in this run whose payment intent no
        staged session names: asked of Stripe (``GET /v1/checkout/sessions?payment_intent=``)
        and staged when there is one. Each answer is recorded in ``staging.checkout_lookups``:
        a charge whose payment intent Stripe has answered for never waits for a session
        (docs/accounting.md "Orders, items and stock"). Returns the sessions found."""
        with self.write_lock:
            wanted = self.staging.payment_intents_without_session(self.run_id)
        if not wanted:
            return 0
        stream = STREAMS["checkout_sessions"]
        expand = [f"data.{e}" for e in stream.expand]

        def lookup(pi: str) -> list[JSON]:
            found: list[JSON] = []
            for page in self.reader.list_pages(
                stream.path, {"payment_intent": pi, "expand": expand}
            ):
                found.extend(page)
            return found

        with ThreadPoolExecutor(self.workers, thread_name_prefix="x-cs-pi") as pool:
            answers = list(pool.map(lookup, wanted))
        sessions = [cs for found in answers for cs in found]
        if sessions:
            with self.writer.committing():
                self._write("checkout_sessions", sessions, source)
        rows = [
            (pi, found[0]["id"] if found else None)
            for pi, found in zip(wanted, answers, strict=True)
        ]
        with self.write_lock:
            self.staging.record_checkout_lookups(rows, self.run_id)
        return len(sessions)

    def _tombstone_unlisted_customers(self) -> None:
        """Stripe's customer list leaves deleted customers out: a customer the full re-read
        did not list is fetched on its own, and becomes a tombstone if Stripe says deleted."""
        missing = self.staging.live_customers_not_read_by(self.run_id)
        if missing:
            self._refetch("customers", missing, {})

    def _fresh_ids(self, changed: dict[str, dict[str, str]]) -> dict[str, set[str]]:
        """Objects this run already listed are current: no need to fetch them again."""
        out: dict[str, set[str]] = {}
        for stream, ids in changed.items():
            out[stream] = self.staging.listed_by(self.run_id, stream, ids)
        return out

    def refetch_charges_waiting_for_balance_transactions(self, source: str = "webhook") -> int:
        """Charges that succeeded before Stripe created their balance transaction (staged
        with none, their receipt waiting for it): retrieved again, the balance transaction
        expanded. The real-time processor asks, with a backoff, while receipts wait so:
        Stripe sends no event when the balance transaction appears. Returns how many."""
        waiting = self.staging.charges_without_balance_transaction()
        if waiting:
            self._refetch("charges", waiting, {}, source)
        return len(waiting)

    def _refetch(
        self, stream: str, ids: list[str], types: dict[str, str], source: str = "event"
    ) -> None:
        s = STREAMS[stream]
        # A charge or refund comes with its balance transaction expanded: the receipt needs
        # it, and one request is quicker than two (fetch_missing_balance_transactions then
        # finds nothing to fetch).
        expand = (*s.expand, "balance_transaction") if stream in EXPAND_BT else s.expand

        def fetch(object_id: str) -> list[JSON]:
            if stream == "invoice_payments":
                invoice = object_id.split(":", 1)[1]
                out: list[JSON] = []
                for page in self.reader.list_pages(s.path, {"invoice": invoice}):
                    out.extend(page)
                return out
            try:
                obj = self.reader.retrieve(s.path, object_id, expand)
            except NotFoundError:
                if stream != "customers":
                    raise
                # Stripe answers a deleted customer with a stub, so 404 means it never
                # existed in this account: its charges wait, blocked, naming it.
                log.warning("customer %s named by a charge or invoice does not exist", object_id)
                return []
            if types.get(object_id, "").endswith(".deleted") or obj.get("deleted"):
                obj = {**obj, "deleted": True}
            return [obj]

        with ThreadPoolExecutor(self.workers, thread_name_prefix=f"ev-{stream}") as pool:
            results = [obj for objs in pool.map(fetch, ids) for obj in objs]
        bts = [
            o["balance_transaction"]
            for o in results
            if isinstance(o.get("balance_transaction"), dict)
        ]
        results = [
            {**o, "balance_transaction": o["balance_transaction"]["id"]}
            if isinstance(o.get("balance_transaction"), dict)
            else o
            for o in results
        ]
        if bts:
            with self.writer.committing():
                self._write("balance_transactions", bts, source)
        deleted = [o for o in results if o.get("deleted") and "created" not in o]
        whole = [o for o in results if not (o.get("deleted") and "created" not in o)]
        if stream == "customers" and deleted:
            # A deleted customer staging never saw (its charge came first) is staged from
            # Stripe's stub; one staging has is flagged in place (its fields kept).
            stubs = self._unknown_customer_stubs(deleted)
            whole += stubs
            known = {o["id"] for o in stubs}
            deleted = [o for o in deleted if o["id"] not in known]
        with self.writer.committing():
            self._write(stream, whole, source)
        for obj in deleted:
            with self.write_lock:
                self.staging.tombstone(stream, obj["id"], run_id=self.run_id)
