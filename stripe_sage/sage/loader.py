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

Every document ends a run in one state with a reason a person reads (``last_error``):
posted; ``dead`` with a row in ``ops.dead_letters`` naming the reason (Sage's code and field,
or the planning error); ``waiting`` for Stripe data that does not exist yet (a balance
transaction), planned again by each run, with ``waiting_since`` so that a wait longer than
its reason allows raises an alert; ``blocked`` by a dependency that is dead, quarantined,
blocked or missing (the reason names it; it goes back to pending once that is posted);
``pending`` when Sage stayed unavailable through every round of the retry budget (the next
run retries it); or an ``AuthenticationError`` stops the run at once.

Finish in one run: a transient failure (503, 429, timeout, commit-then-503) costs no sleep
in a posting thread (the client makes at most ``client_attempts`` paced exchanges per
call). A round (:meth:`Loader._pass`) keeps one queue: a settled document's dependents
join it at once, a document held by a ``Retry-After`` rejoins it when due; the loader gives
what is left further rounds in the same run, with backoff, until every document is settled
or ``retry_budget`` seconds are spent. An uncertain POST is looked up by reference before
it is sent again (rule 2), so rounds never post twice.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
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
from stripe_sage.plan.customers import sage_customer_id
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
WAITING_PREFIX = "waiting: "
# Between rounds of the retry budget, counted from the start of the round that failed. A
# round that posted something is followed at once: Sage is taking work and the client's
# pacer already spaces the requests; waiting only stretched the tail of a load.
ROUND_GAP = 0.0
ROUND_BACKOFF_BASE = 1.0
ROUND_BACKOFF_MAX = 15.0


def wait_kind(reason: str) -> str:
    """The class of a waiting reason: each class has its own allowed age (Settings
    ``waiting_alert_hours``)."""
    text = reason.lower()
    if "awaiting settlement" in text:
        return "settlement"
    if "balance transaction" in text:
        return "balance_transaction"
    if "invoice lines" in text:
        return "invoice_lines"
    if "charge" in text:
        return "charge"
    return "other"


def wait_kind_expr(reason: pl.Expr) -> pl.Expr:
    """:func:`wait_kind` as an expression (no Python call per planned document)."""
    text = reason.str.to_lowercase()
    return (
        pl.when(text.str.contains("awaiting settlement", literal=True))
        .then(pl.lit("settlement"))
        .when(text.str.contains("balance transaction", literal=True))
        .then(pl.lit("balance_transaction"))
        .when(text.str.contains("invoice lines", literal=True))
        .then(pl.lit("invoice_lines"))
        .when(text.str.contains("charge", literal=True))
        .then(pl.lit("charge"))
        .otherwise(pl.lit("other"))
    )


def describe(dep: str) -> str:
    """``customer:cus_1`` → ``customer cus_1``: how a reason names a document."""
    doc_type, _, stripe_id = dep.partition(":")
    return f"{doc_type} {stripe_id}" if stripe_id else dep


@dataclass
class LoadStats:
    enqueued: Counter[str] = field(default_factory=Counter)
    posted: Counter[str] = field(default_factory=Counter)
    dead: Counter[str] = field(default_factory=Counter)
    # Still pending when the run ends (Sage unavailable through the whole retry budget).
    deferred: Counter[str] = field(default_factory=Counter)
    waiting: Counter[str] = field(default_factory=Counter)  # planned again next run
    blocked: Counter[str] = field(default_factory=Counter)
    revived: int = 0
    rounds: int = 0  # passes over the pending documents (1 + retry rounds)
    retry_seconds: float = 0.0  # time spent in retry rounds (within the budget)
    # After the load: every unposted document by state, and the quarantined rows.
    states: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "enqueued": dict(self.enqueued),
            "posted": dict(self.posted),
            "dead": dict(self.dead),
            "deferred": dict(self.deferred),
            "waiting": dict(self.waiting),
            "blocked": dict(self.blocked),
            "revived": self.revived,
            "rounds": self.rounds,
            "retry_seconds": round(self.retry_seconds, 2),
            "remaining": sum(self.deferred.values()),
            "states": dict(self.states),
        }


@dataclass
class Outcome:
    doc_key: str
    status: str  # posted | dead | pending | skipped
    sage_id: str | None = None
    error: StripeSageError | None = None
    reason: str | None = None
    matched_by: str = "created"
    sent: bool = True  # False: nothing this attempt did can have reached Sage's books
    # True: this attempt's lookup found no such document in Sage and nothing sent after it
    # can have been acted on: the next attempt needs no lookup, whatever came before.
    absent: bool = False
    finished: int = 0  # when the attempt ended, in the order of the run's attempts


@dataclass
class _Job:
    """One document of a round to send: its outbox row and the Sage numbers it refers to."""

    row: tuple[Any, ...]  # doc_key, doc_type, collection, stripe_id, payload, depends_on, attempts
    xref: dict[str, str]
    posted_before: int = 0  # documents the round had posted when this one was sent


@dataclass
class _Round:
    """What one round (:meth:`Loader._pass`) keeps in memory besides the page it reads."""

    ready: deque[_Job] = field(default_factory=deque)
    held: list[tuple[float, int, _Job]] = field(default_factory=list)  # heap by due time
    parked: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)  # by dependency
    inflight: dict[Future[Outcome], _Job] = field(default_factory=dict)
    released: list[tuple[Any, ...]] = field(default_factory=list)  # to classify again
    posted: int = 0
    order: Iterator[int] = field(default_factory=itertools.count)
    # The phase being read (-1: not started, None: every phase read) and the keyset.
    phase: int | None = -1
    phases: list[int] = field(default_factory=list)
    after: str = ""
    # Bookkeeping not written yet (Loader._flush): posted rows, reasons, unsent attempts.
    posted_rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    unsent: Counter[str] = field(default_factory=Counter)


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
        retry_budget: float = 300.0,
        client_attempts: int = 3,
        client_pause: bool = False,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.st = staging
        self.client = client
        self.run_id = run_id
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.page_size = page_size  # outbox rows read at a time
        self.on_progress = on_progress
        # SAGE_RETRY_BUDGET: seconds of further rounds for documents Sage did not take.
        self.retry_budget = retry_budget
        # Exchanges per document per round, sent without a sleep between them (the client's
        # pacer spaces them): a posting thread never sleeps through a backoff; a 429 ends the
        # document's round (its Retry-After is honoured between rounds).
        self.client_attempts = client_attempts
        self.client_pause = client_pause
        # A document refused with a Retry-After is not sent again before then (the others
        # go on): doc_key → clock time.
        self._not_before: dict[str, float] = {}
        self._attempted = 0  # documents sent to Sage in the current round
        # Documents of the current round that failed without a Retry-After (5xx, timeouts):
        # only those say Sage may be down; a round lost to 429s waits for their Retry-After.
        self._unheld = 0
        # Documents a lookup found absent from Sage since their last uncertain attempt.
        self._absent: set[str] = set()
        self._sleep, self._clock = sleep, clock
        self.stats = LoadStats()
        self._halt = threading.Event()
        # A micro-batch served during a sync posts only what it planned (the sync's loader
        # posts the rest, the batch's leftovers included).
        self.only_run: str | None = None
        self._finish_order = itertools.count(1)
        # Called between two steps of a round (nothing of this loader touches DuckDB in the
        # meantime; its threads only talk to Sage): a sync serves webhook events there.
        self.interleave: Callable[[], None] | None = None

    # -- planning → outbox ----------------------------------------------------------------
    def enqueue(self, docs: pl.DataFrame) -> int:
        """Record newly planned documents; revive dead ones whose planning error is gone;
        record what waits (``waiting: …`` planning errors) as ``waiting`` with its reason
        and the time it started waiting, and take a waiting document's new plan when it
        comes. Returns the rows written, not counting documents that were already waiting
        and still are."""
        if docs.is_empty():
            return 0
        now = now_utc()
        docs = docs.unique(subset="doc_key", keep="last")
        is_wait = pl.col("error").str.starts_with(WAITING_PREFIX).fill_null(False)
        # Only the outbox rows of these keys: the whole outbox is millions of rows at scale.
        existing = self.st.outbox_states(docs)
        fresh = docs.join(existing.select("doc_key"), on="doc_key", how="anti")
        dead_planning = existing.filter(
            (pl.col("old_status") == "dead") & (pl.col("error_kind") == PLANNING_ERROR)
        )
        revive = docs.filter(pl.col("error").is_null() | is_wait).join(
            dead_planning.select("doc_key"), on="doc_key", how="semi"
        )
        # A waiting document takes its new plan, whatever it is (posted, dead or waiting).
        rewait = docs.join(
            existing.filter(pl.col("old_status") == "waiting").select("doc_key"),
            on="doc_key",
            how="semi",
        )
        rows = (
            pl.concat([fresh, revive, rewait])
            .join(existing.select("doc_key", "old_status", "old_since"), on="doc_key", how="left")
            .with_columns(
                pl.when(is_wait)
                .then(pl.lit("waiting"))
                .when(pl.col("error").is_null())
                .then(pl.lit("pending"))
                .otherwise(pl.lit("dead"))
                .alias("status"),
                pl.lit(None, pl.String).alias("sage_id"),
                pl.lit(0, pl.Int32).alias("attempts"),
                pl.when(is_wait)
                .then(pl.col("error").str.strip_prefix(WAITING_PREFIX))
                .otherwise(pl.col("error"))
                .alias("last_error"),
                pl.lit(now).alias("created_at"),
                pl.lit(now).alias("updated_at"),
                pl.lit(None, pl.Datetime("us", "UTC")).alias("posted_at"),
                pl.lit(self.run_id).alias("run_id"),
                # The wait's age runs from when it was first seen, across runs.
                pl.coalesce(
                    pl.col("old_since").cast(pl.Datetime("us", "UTC")),
                    pl.when(is_wait).then(pl.lit(now)),
                ).alias("waiting_since"),
                pl.when(is_wait).then(wait_kind_expr(pl.col("error"))).alias("wait_kind"),
            )
        )
        if rows.is_empty():
            return 0
        self.st.write_planned(rows, revive["doc_key"].to_list(), now)
        for status, counter in (("pending", self.stats.enqueued), ("waiting", self.stats.waiting)):
            for doc_type, n in (
                rows.filter(pl.col("status") == status).group_by("doc_type").len().iter_rows()
            ):
                counter[doc_type] += n
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
        still = (pl.col("old_status") == "waiting") & (pl.col("status") == "waiting")
        return rows.height - int(rows.select(still.fill_null(False).sum()).item())

    # -- posting ---------------------------------------------------------------------------
    def _xref_for(self, rows: list[tuple[Any, ...]]) -> dict[str, str]:
        """The Sage numbers of what these outbox rows depend on or refer to."""
        wanted = {d for row in rows for d in row[5] or []}
        for row in rows:
            if isinstance(row[4], str) and "@xref:" in row[4]:
                wanted.update(XREF_PLACEHOLDER.findall(row[4]))
        if not wanted:
            return {}
        return self.st.sage_numbers(sorted(wanted))

    def _states(self, keys: set[str]) -> dict[str, tuple[str, str, str | None]]:
        """The unposted documents among ``keys`` (dependencies not in Sage) as ``(status,
        reason, wait_kind)``, by doc key and by the key dependents name them with (a linked
        customer is ``customer:<id>``); customers whose Stripe record is quarantined, as
        dead with the quarantine's reason. Only these keys are read: on a first run the
        whole outbox is pending (millions of rows at scale)."""
        if not keys:
            return {}
        wanted = set(keys)
        for key in keys:  # "customer:<id>" may be the customer_link document
            kind, _, stripe_id = key.partition(":")
            wanted.update(f"{t}:{stripe_id}" for t, x in XREF_TYPE.items() if x == kind)
        rows = self.st.unposted_documents(sorted(wanted))
        out: dict[str, tuple[str, str, str | None]] = {}
        for doc_type, stripe_id, key, status, reason, kind in rows:
            text = reason or {"dead": "dead-lettered", "pending": "not posted yet"}.get(
                status, status
            )
            out[key] = (status, text, kind)
            out.setdefault(f"{XREF_TYPE.get(doc_type, doc_type)}:{stripe_id}", out[key])
        customers = sorted(k.partition(":")[2] for k in keys if k.startswith("customer:"))
        for object_id, check, reason in self.st.quarantined_checks("customers", customers):
            out.setdefault(
                f"customer:{object_id}",
                ("dead", f"its Stripe record is quarantined ({check}: {reason})", None),
            )
        return out

    @staticmethod
    def verdict(
        unmet: list[str], states: dict[str, tuple[str, str, str | None]]
    ) -> tuple[str, str, str | None]:
        """Why a document whose dependencies ``unmet`` are not in Sage is not posted:
        ``(blocked | waiting | pending, reason, wait_kind)``. Blocked wins over waiting,
        waiting over pending (a dependency Sage has not taken yet: next round)."""
        found: dict[str, tuple[str, str, str | None]] = {}
        for dep in unmet:
            status, reason, kind = states.get(
                dep,
                (
                    "missing",
                    "no Sage document is planned for it (not staged, or deleted in Stripe)",
                    None,
                ),
            )
            if status in ("dead", "blocked", "missing"):
                return "blocked", f"blocked by {describe(dep)}: {reason}", None
            found.setdefault(status, (status, f"{describe(dep)}: {reason}", kind))
        if "waiting" in found:
            _, reason, kind = found["waiting"]
            return "waiting", f"waiting for {reason}", kind
        _, reason, kind = found.get("pending", ("pending", "?", None))
        return "pending", f"waits for {reason}", kind

    def pending_count(self) -> int:
        return self.st.pending_count(self.only_run)

    def revive_unblocked(self) -> int:
        """Blocked documents go back to pending once nothing blocks them any more (what they
        wait for was corrected and replayed, or planned at last); they are checked again
        when posted. Files from before the ``blocked`` state kept them as dead letters with
        code ``blocked``: those are checked again too."""
        rows = self.st.blocked_documents()
        # The Sage numbers of what they depend on (not the whole xref: millions at scale).
        xref = self._xref_for([(k, None, None, None, None, deps) for k, deps, _ in rows])
        states = self._states({d for _, deps, _ in rows for d in deps or [] if d not in xref})
        ready: list[str] = []
        grew = True
        while grew:  # a receipt blocked by a blocked invoice goes back with it
            grew = False
            for k, deps, status in rows:
                if k in ready:
                    continue
                unmet = [d for d in deps or [] if d not in xref]
                if status == "dead" or self.verdict(unmet, states)[0] != "blocked":
                    ready.append(k)
                    states[k] = ("pending", "not posted yet", None)
                    grew = True
        if ready:
            self.st.unblock(ready)
            self.stats.revived += len(ready)
        return len(ready)

    def run(self) -> LoadStats:
        """Post every pending document: a first pass, then further rounds for what Sage did
        not take (transient failures), with backoff, until none is left or the retry budget
        is spent. What is still pending then is counted in ``deferred`` and says why."""
        self.revive_unblocked()
        total = self.pending_count()
        started = self._clock()
        deadline = started + self.retry_budget
        done = [0]
        idle = 0  # rounds in a row that posted nothing (Sage down): the backoff grows
        while True:
            self.stats.rounds += 1
            round_started = self._clock()
            posted_before = sum(self.stats.posted.values())
            requests_before = self.client.stats.attempts
            self._attempted = self._unheld = 0
            self._pass(done, total)
            remaining = self.pending_count()
            log.debug(
                "round %d: %d sent (%d requests), %d posted, %.2f s, %d pending, %d held",
                self.stats.rounds,
                self._attempted,
                self.client.stats.attempts - requests_before,
                sum(self.stats.posted.values()) - posted_before,
                self._clock() - round_started,
                remaining,
                len(self._not_before),
            )
            if not remaining or self._halt.is_set():
                break
            if self._attempted == 0:
                pending = self.st.pending_keys()
                self._not_before = {k: t for k, t in self._not_before.items() if k in pending}
            if self._attempted == 0 and not self._not_before:
                break  # nothing was sendable and nothing waits on Sage: rounds cannot help
            if self._attempted == 0:
                # Everything left is held by a Retry-After: until the first one is due.
                wait = min(self._not_before.values()) - self._clock()
            elif sum(self.stats.posted.values()) > posted_before:
                idle = 0
                wait = self._round_backoff(idle) - (self._clock() - round_started)
            elif self._unheld == 0:
                # Nothing posted, but only 429s refused (not an outage): the next round
                # starts when the first held document is due, without growing the backoff.
                wait = min(self._not_before.values(), default=self._clock()) - self._clock()
            else:
                idle += 1
                # From the start of the round: a long round has waited already.
                wait = self._round_backoff(idle) - (self._clock() - round_started)
            if self._clock() + max(wait, 0.0) >= deadline:
                break
            log.info(
                "round %d left %d documents pending (Sage transient failures); next round in "
                "%.1f s",
                self.stats.rounds,
                remaining,
                max(wait, 0.0),
            )
            if wait > 0:
                self._wait(wait)
        if self.stats.rounds > 1:
            self.stats.retry_seconds = self._clock() - started
        self.stats.deferred = Counter(self.st.pending_by_type(self.only_run))
        if self.stats.deferred and not self._halt.is_set():
            self.st.note_deferred(
                f"deferred: not taken by Sage within the retry budget "
                f"({self.retry_budget:.0f} s, {self.stats.rounds} rounds); the next run "
                "retries it. Last answer: ",
                self.only_run,
            )
        self.stats.states = self.st.state_counts()
        return self.stats

    def _wait(self, seconds: float) -> None:
        """Sleep between rounds; in short steps when a sync serves events meanwhile."""
        if self.interleave is None:
            self._sleep(seconds)
            return
        end = self._clock() + seconds
        while (left := end - self._clock()) > 0:
            self.interleave()
            self._sleep(min(left, 0.5))

    def _round_backoff(self, idle: int) -> float:
        """Seconds between round starts: short while rounds make progress (scattered
        transient failures), doubling while Sage takes nothing (an outage)."""
        if idle == 0:
            return ROUND_GAP
        return float(min(ROUND_BACKOFF_MAX, ROUND_BACKOFF_BASE * 2 ** (idle - 1)))

    def _pass(self, done: list[int], total: int) -> None:
        """One round: every pending document once, phase by phase, posted by
        ``concurrency`` threads from one queue that the round keeps filling.

        Within the round, the dependents of a document that is settled are released at
        once, to the front of the queue (a chain customer → invoice → receipt needs no
        round per link); a document held by a ``Retry-After`` is sent again when it is due,
        if the round still has other work; one that failed without a hold (5xx, timeouts)
        is sent again only when Sage has posted something since it was sent — else Sage may
        be down, and it waits for the next round, after :meth:`run`'s backoff.

        Bookkeeping is batched (every ``batch_size`` outcomes, before dependents are
        released, and at the end): only the ``attempts`` increment has to be committed
        before a POST (rule 2), and a posted document not recorded yet is found by its
        lookup after a crash."""
        rnd = _Round()
        auth: AuthenticationError | None = None
        try:
            with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sage") as pool:
                while True:
                    if self.interleave is not None:
                        self.interleave()
                    halted = self._halt.is_set()
                    self._refill(rnd, done)
                    now = self._clock()
                    while rnd.held and rnd.held[0][0] <= now:
                        rnd.ready.appendleft(heapq.heappop(rnd.held)[2])
                    if rnd.released and (
                        len(rnd.ready) < self.concurrency * 4
                        or len(rnd.released) >= self.batch_size
                        or not rnd.inflight
                    ):
                        released, rnd.released = rnd.released, []
                        self._classify(released, rnd, done, front=True)
                    if rnd.ready and not halted and len(rnd.inflight) < self.concurrency * 2:
                        self._dispatch(pool, rnd)
                    if not rnd.inflight:
                        if rnd.released or (rnd.ready and not halted):
                            continue
                        if rnd.phase is None or halted:
                            break  # the documents still held wait for the next round (run)
                        continue
                    # Until a document finishes, or a held one is due.
                    due = rnd.held[0][0] - self._clock() if rnd.held else None
                    if self.interleave is not None:  # back within half a second to serve
                        due = 0.5 if due is None else min(due, 0.5)
                    finished, _ = futures_wait(
                        list(rnd.inflight),
                        timeout=None if due is None else max(due, 0.0),
                        return_when=FIRST_COMPLETED,
                    )
                    if finished:
                        # In the order they ended: "Sage posted something since this one was
                        # sent" must not count posts that ended after it failed (a busy main
                        # thread collects several at once).
                        jobs = sorted(
                            ((rnd.inflight.pop(f), f.result()) for f in finished),
                            key=lambda jo: jo[1].finished,
                        )
                        auth = self._record(rnd, jobs, done) or auth
                        if len(rnd.posted_rows) + len(rnd.notes) >= self.batch_size:
                            self._flush(rnd)
                        if self.on_progress:
                            self.on_progress(min(done[0], total), total)
        finally:
            self._flush(rnd)
        if auth is not None:
            raise auth

    def _refill(self, rnd: _Round, done: list[int]) -> None:
        """Read keyset pages of the current phase while the queue runs low (memory stays at
        about one page of payloads however large the outbox is); the next phase only once
        this one's documents have left the queue (what is held or failed waits apart)."""
        while rnd.phase is not None and len(rnd.ready) < self.batch_size:
            if rnd.phase < 0:
                rnd.phases = self.st.pending_phases(self.only_run)
            else:
                rows = self.st.pending_page(rnd.phase, rnd.after, self.page_size, self.only_run)
                if rows:
                    rnd.after = rows[-1][0]
                    self._classify(rows, rnd, done, front=False)
                    continue
                if rnd.ready or rnd.inflight or rnd.released:
                    return
            rnd.phase = rnd.phases.pop(0) if rnd.phases else None
            rnd.after = ""

    def _classify(
        self, rows: list[tuple[Any, ...]], rnd: _Round, done: list[int], *, front: bool
    ) -> None:
        """Queue what can be sent (``front``: released dependents, before the page's
        documents), hold what Sage asked to wait, park what waits for a document still
        pending (released when that one is settled), and settle what is blocked or waits
        for Stripe."""
        self._flush(rnd)  # what posted so far is in sage.xref, and no longer pending
        xref = self._xref_for(rows)
        states = self._states({d for r in rows for d in r[5] or [] if d not in xref})
        for row in rows:
            doc_key, doc_type, _, stripe_id, _, deps, _ = row
            unmet = [d for d in deps or [] if d not in xref]
            if not unmet:
                job = _Job(row, xref)
                due = self._not_before.get(doc_key, 0.0)
                if due > self._clock():  # Sage asked to wait (Retry-After)
                    heapq.heappush(rnd.held, (due, next(rnd.order), job))
                elif front:
                    rnd.ready.appendleft(job)
                else:
                    rnd.ready.append(job)
                continue
            state, reason, kind = self.verdict(unmet, states)
            if state == "blocked":
                self._mark_blocked(doc_key, doc_type, stripe_id, reason)
                done[0] += 1
            elif state == "waiting":
                self._mark_waiting(doc_key, doc_type, reason, kind)
                done[0] += 1
            else:  # a dependency is still pending: this round if it is settled, else the next
                first = next(d for d in unmet if states.get(d, ("",))[0] == "pending")
                rnd.parked.setdefault(first, []).append(row)
                rnd.notes[doc_key] = reason

    def _dispatch(self, pool: ThreadPoolExecutor, rnd: _Round) -> None:
        """Send the next queued documents, keeping at most four per thread in flight (a
        short pool queue keeps released dependents and due retries near the front)."""
        jobs: list[_Job] = []
        while rnd.ready and len(rnd.inflight) + len(jobs) < self.concurrency * 4:
            jobs.append(rnd.ready.popleft())
        keys = [j.row[0] for j in jobs]
        # Committed before any POST: after a crash these documents are looked up first.
        self.st.count_attempts(keys)
        self._attempted += len(jobs)
        for job in jobs:
            self._not_before.pop(job.row[0], None)
            job.posted_before = rnd.posted
            # A document Sage was seen not to hold (a lookup found nothing, and nothing sent
            # since can have been acted on) needs no lookup first, whatever its attempts.
            row = (*job.row[:6], 0) if job.row[0] in self._absent else job.row
            rnd.inflight[pool.submit(self._post_in_order, row, job.xref)] = job

    def _record(
        self, rnd: _Round, finished: list[tuple[_Job, Outcome]], done: list[int]
    ) -> AuthenticationError | None:
        """Note the outcomes of finished documents (written by :meth:`_flush`; a dead
        letter at once), queue the ones to send again in this round, and release the
        dependents of the settled ones. Returns an authentication error to raise once
        nothing is in flight."""
        auth: AuthenticationError | None = None
        for job, o in finished:
            doc_key, doc_type, collection, stripe_id, payload, _, attempts = job.row
            done[0] += 1
            if isinstance(o.error, AuthenticationError):
                auth = o.error
            # Never sent, or refused with a 429 before anything was done: no lookup is
            # needed before its next attempt (earlier uncertain attempts still count).
            sent = o.status != "skipped" and o.sent
            if not sent:
                rnd.unsent[doc_key] += 1
            if o.status in ("posted", "dead"):
                if o.status == "posted":
                    rnd.notes.pop(doc_key, None)
                    rnd.posted_rows.append(
                        (doc_key, doc_type, collection, stripe_id, o.sage_id or "", o.matched_by)
                    )
                    self.stats.posted[doc_type] += 1
                    rnd.posted += 1
                else:
                    err = o.error
                    self._mark_dead(
                        doc_key,
                        doc_type,
                        stripe_id,
                        o.reason or str(err),
                        code=err.code if err else None,
                        http_status=err.http_status if err else None,
                        field=err.field if err else None,
                        payload=payload,
                    )
                self._absent.discard(doc_key)
                for name in dict.fromkeys(
                    (doc_key, f"{XREF_TYPE.get(doc_type, doc_type)}:{stripe_id}")
                ):
                    rnd.released.extend(rnd.parked.pop(name, []))
                continue
            rnd.notes[doc_key] = o.reason or "not sent: the run stopped on an authentication error"
            if not isinstance(o.error, RetryableError):
                continue  # skipped: the run stops
            if o.absent:
                self._absent.add(doc_key)
            elif o.sent:
                self._absent.discard(doc_key)
            again = _Job((*job.row[:6], attempts + (1 if sent else 0)), job.xref)
            due = self._not_before.get(doc_key)
            if due is not None:
                heapq.heappush(rnd.held, (due, next(rnd.order), again))
                continue
            self._unheld += 1
            if rnd.posted > job.posted_before:
                rnd.ready.append(again)  # Sage is taking work: once more in this round
        return auth

    def _flush(self, rnd: _Round) -> None:
        """Write what :meth:`_record` noted: the reasons of unposted documents, the
        ``attempts`` of documents never sent given back, then the posted documents and
        their cross-references (in one transaction)."""
        now = now_utc()
        self.st.set_reasons(rnd.notes, now)
        rnd.notes = {}
        self.st.give_back_attempts(rnd.unsent)
        rnd.unsent = Counter()
        posted, rnd.posted_rows = rnd.posted_rows, []
        self._mark_posted_many(posted)

    def _post_in_order(self, row: tuple[Any, ...], xref: dict[str, str]) -> Outcome:
        """:meth:`_post_one`, its outcome stamped with when it ended (``Outcome.finished``)."""
        outcome = self._post_one(row, xref)
        outcome.finished = next(self._finish_order)  # atomic under the GIL
        return outcome

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
                self.client.get_customer(body["customer_id"], **self._policy())
                return Outcome(doc_key, "posted", body["customer_id"], matched_by=matched_by)
            if doc_type == "customer":
                return self._create_customer(doc_key, body, stripe_id)
            if doc_type == "customer_update":
                return self._update_customer(doc_key, body)
            if doc_type in ("item", "item_link"):
                return self._post_item(doc_key, doc_type, body, stripe_id, matched_by)
            if doc_type == "invoice" and body.get("sales_order_no") is None:
                body.pop("sales_order_no", None)
            doc = self.client.create(
                collection,
                body,
                check_first=attempts > 0,
                attempts=self.client_attempts,
                pause=self.client_pause,
            )
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
            if exc.retry_after:
                self._not_before[doc_key] = self._clock() + exc.retry_after
            # Only definite refusals (429s): this attempt needs no lookup before the next.
            return Outcome(
                doc_key,
                "pending",
                error=exc,
                reason=str(exc),
                sent=exc.maybe_done,
                absent=exc.absent,
            )

    def _policy(self) -> dict[str, Any]:
        """The exchanges of one document's round, for every kind of call (items, links and
        updates too): a posting thread never sleeps through a backoff or a Retry-After."""
        return {"attempts": self.client_attempts, "pause": self.client_pause}

    def _post_item(
        self, doc_key: str, doc_type: str, body: dict[str, Any], stripe_id: str, matched_by: str
    ) -> Outcome:
        """An item a product names (``item_link``: it must exist) or the product's own item:
        created unless Sage has it (then linked); when Sage holds the code for another
        product, the next salted code. Two runs racing create it once (see create_item)."""
        if doc_type == "item_link":
            try:
                found = self.client.get_item(body["item"], **self._policy())
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
                item, created = self.client.create_item(body, **self._policy())
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
        current = self.client.get_customer(customer_id, **self._policy())
        changes = {k: v for k, v in body.items() if k != "reference" and current.get(k) != v}
        if changes:
            self.client.update_customer(customer_id, changes, **self._policy())
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
                doc = self.client.create(
                    "customers",
                    body,
                    check_first=True,
                    attempts=self.client_attempts,
                    pause=self.client_pause,
                )
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
        frame = pl.DataFrame(
            rows,
            schema=["doc_key", "doc_type", "collection", "stripe_id", "sage_id", "matched_by"],
            orient="row",
        ).with_columns(pl.col("doc_type").replace(XREF_TYPE).alias("xref_type"))
        self.st.mark_posted(frame, self.run_id)

    def _mark_blocked(self, doc_key: str, doc_type: str, stripe_id: str, reason: str) -> None:
        """Outbox row blocked, with a dead letter of code ``blocked`` (replay releases it
        with what blocks it; ``revive_unblocked`` once that is posted)."""
        self.st.mark_blocked(doc_key, reason)
        self._dead_letter(doc_key, doc_type, stripe_id, reason, code="blocked")
        self.stats.blocked[doc_type] += 1

    def _mark_waiting(self, doc_key: str, doc_type: str, reason: str, kind: str | None) -> None:
        """Outbox row waiting on a dependency that waits (planned again by the next run)."""
        self.st.mark_waiting(doc_key, reason, kind or wait_kind(reason))
        self.stats.waiting[doc_type] += 1

    def _mark_dead(
        self, doc_key: str, doc_type: str, stripe_id: str, reason: str, **details: Any
    ) -> None:
        """Outbox row dead + its dead letter (``details``: code, http_status, field, payload)."""
        self.st.mark_dead(doc_key, reason)
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
        body = payload if isinstance(payload, str) or payload is None else json.dumps(payload)
        self.st.record_dead_letter(
            doc_key,
            doc_type,
            stripe_id,
            reason,
            run_id=self.run_id,
            code=code,
            http_status=http_status,
            field=field,
            payload=body,
        )


def _reason(exc: StripeSageError, doc_key: str) -> str:
    where = f" (field {exc.field})" if exc.field else ""
    return f"Sage rejected {doc_key}: {exc.code or 'error'}{where}: {exc.message}"
