"""The real-time event processor: one long-lived flow run that turns what the webhook inbox
holds into Sage documents in micro-batches, seconds after the receiver stored the events.

Why a long-lived flow run with a task run per stage of each batch (measured on this 2-core
machine by ``stripe-sage bench realtime``, docs/benchmarks.md): a new flow run costs about
1.1 s before any work, an event-triggered deployment run adds the runner's poll and a new
process that imports everything again (Great Expectations alone ~5 s); a background task
(``task.delay()`` to a task worker) is ~0.25 s of dispatch per batch and cannot keep the
DuckDB writer between calls; a task run inside a running flow run costs ~7 ms. So the
processor keeps its imports, its Stripe and Sage clients and its DuckDB connection warm,
watches the inbox (a cheap SQLite count every ``PROCESSOR_POLL_SECONDS``) and runs, per
batch, only the stages the batch needs: re-fetch what the events name → stage → row-level
quality → plan → load → write-back, then marks the events processed. The plan covers only
what the batch staged and what depends on it (``stripe_sage/plan/scope.py``: planning every
unsettled row was the largest cost of a batch); the first batch and one at most every
``PROCESSOR_FULL_PLAN_SECONDS`` plan everything unsettled. Charges staged before Stripe
created their balance transaction are retrieved again with a backoff (1 s doubling to 60 s):
no event announces the transaction. The reconciliation report and the analysts' snapshot
are refreshed at most every ``PROCESSOR_REFRESH_SECONDS``, the dead-letter and waiting-age
alerts raised at most every ``PROCESSOR_ALERT_SECONDS``.

The DuckDB writer: the processor holds the writer slot (``tasks/writer.py``) while it runs and
hands it over between two batches to any process on this machine that waits for it (a
scheduled sync, a replay), then takes it back. Events that arrive meanwhile wait in the
inbox (the sync drains what was there when it started); nothing ever meets a lock error.

Exactly once: each batch is a recorded run (``ops.runs``, flow ``realtime_processor``, one run
id per batch); its events are marked processed only after its documents are posted,
dead-lettered or waiting with a reason, so a processor killed mid-batch leaves them for the
next batch, and the outbox posts nothing twice. A failed batch (Stripe or Sage down) is
retried with exponential backoff; documents Sage did not take are retried the same way.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from typing import Any

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from flows.lifecycle import FlowRun, recorded
from flows.stages import Stage, run_stages, run_status
from stripe_sage.realtime import Backoff, Refresh, batch_should_run
from stripe_sage.runtime import RunContext
from stripe_sage.settings import Settings
from stripe_sage.store.inbox import Inbox
from stripe_sage.stripe.webhooks import events_by_stream
from tasks.alerts import auth_error_in, emit_auth_failed
from tasks.context import run_logger
from tasks.inbox import mark_processed
from tasks.reconcile import reconciliation_report
from tasks.staging import publish_snapshot
from tasks.writer import WriterWaiters, emit_state_alerts, open_run

FLOW = "realtime_processor"
# Per batch: no report, no snapshot (the refresh does them), and no volume comparison.
BATCH_STAGES: tuple[Stage, ...] = ("extract", "stage", "quality", "plan", "load", "write_back")
SYNC_BATCH_STAGES: tuple[Stage, ...] = ("extract", "stage", "quality", "plan", "load")
INTERRUPTED = (
    "interrupted: the processor stopped mid-batch; the batch's events stayed unprocessed "
    "and were processed again by later batches"
)
# Set to stop the processor between two batches (SIGTERM/SIGINT, or a test).
STOP = threading.Event()


def stop_on_signals() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: STOP.set())


def process_batch(
    ctx: RunContext,
    inbox: Inbox,
    settings: Settings,
    *,
    retry_documents: bool = False,
    full_plan: bool = False,
    recheck_waits: bool = False,
    during_sync: SyncEventPump | None = None,
) -> dict[str, Any]:
    """One micro-batch under its own run id, recorded in ``ops.runs``; raises what failed
    it (recorded as ``failed``), its events then still unprocessed. Events that name no
    object of a stream (``balance.available``) and no documents to retry need no stage at
    all: they are only marked processed. The batch plans only what it staged and what
    depends on it, unless ``full_plan``; with ``recheck_waits`` it also retrieves again the
    charges whose balance transaction Stripe had not created yet. ``during_sync``: the
    batch is served by a sync's own run (:class:`SyncEventPump`)."""
    run_id = str(uuid.uuid4())
    rows = inbox.unprocessed(settings.processor_batch_events)
    changed, echoes = events_by_stream(rows)
    if rows and not changed and not echoes and not retry_documents and not recheck_waits:
        mark_processed.fn(inbox, [r["event_id"] for r in rows], run_id)
        return {"events": len(rows), "status": "completed", "run_id": run_id, "staged": {}}
    batch = ctx.for_batch(run_id, retry_budget=settings.processor_retry_budget)
    if during_sync is not None:
        batch.loader.only_run = run_id  # the sync's loader posts the sync's documents
    run = FlowRun(settings, FLOW, batch.run_id, runtime.flow_run.id, ctx=batch)
    try:
        with recorded(run, trigger="webhook"):
            counts = run_stages(
                batch,
                run,
                # During a sync, the sync's write-back writes the batch's values too.
                stages=SYNC_BATCH_STAGES if during_sync else BATCH_STAGES,
                inbox=inbox,
                plan_excludes_run=during_sync.unchecked_run if during_sync else None,
                inbox_limit=settings.processor_batch_events,
                previous_rows={},
                quality_engine="polars",  # no Data Docs with it
                task_runs=False,
                checkpoint=False,
                scoped_plan=not full_plan,
                recheck_waits=recheck_waits,
            )
    finally:
        batch.close_batch()
    counts["status"] = run.status or run_status(counts.get("load", {}))
    counts["run_id"] = batch.run_id
    counts["full_plan"] = full_plan
    return counts


# A batch is one task run of the processor's flow run (visible in the UI with its logs).
process_batch_task = task(name="process-batch", cache_policy=NO_CACHE)(process_batch)


class SyncEventPump:
    """Webhook events served by a sync's own run while it holds the DuckDB writer.

    The processor hands the writer to a sync and gets it back when the sync ends: a 10k-charge
    first sync holds it for minutes, and events would wait that long. So the sync serves them
    itself: at its yield points (``flows/stages.py``: while its streams are listed, between
    two stages, between two steps of its load's rounds, between two write-backs) it calls
    the pump, which runs a micro-batch of what the inbox holds (``process_batch``, the
    processor's own) at most every ``SYNC_SERVE_SECONDS``, on the sync's warm connection and
    clients, under the extractor's write lock (the sync's page writer waits meanwhile).

    What keeps the two apart: the batch stages, checks and plans under its own run id; until
    the sync's quality has checked the sync's rows, none of them enters a batch's plan (and a
    batch that would need a full plan plans nothing: the sync's plan covers it); the batch's
    loader posts only what the batch planned (the sync's loader posts the rest, the batch's
    leftovers included); the sync drains no events itself (the pump serves them all, those
    waiting when it started first); the sync's write-back writes the batch's values. A
    failed batch leaves its events unprocessed and is retried after a backoff; the sync goes
    on. Between the end of a batch and the start of the next, the sync has at least
    ``SYNC_SERVE_SECONDS`` of its own."""

    def __init__(self, ctx: RunContext, inbox: Inbox, settings: Settings) -> None:
        self.ctx, self.inbox, self.settings = ctx, inbox, settings
        self.every = settings.sync_serve_seconds
        self.unchecked_run: str | None = ctx.run_id
        self.backoff = Backoff(initial=1.0, cap=30.0)
        self.next_look = 0.0
        self.busy = False
        self.stats: dict[str, int] = dict.fromkeys(("batches", "events", "failed_batches"), 0)
        self.served_seconds = 0.0  # the sync's step timings leave this out (flows/stages.py)

    def sync_checked(self) -> None:
        """The sync's quality ran: its rows may enter a batch's plan."""
        self.unchecked_run = None

    def __call__(self) -> None:
        now = time.monotonic()
        if self.busy or not self.every or now < self.next_look or not self.backoff.ready(now):
            return
        self.next_look = now + self.every
        if not self.inbox.waiting():
            return
        self.busy = True  # a batch's own loader never serves events
        started = time.perf_counter()
        try:
            with self.ctx.extractor.write_lock:
                counts = process_batch(self.ctx, self.inbox, self.settings, during_sync=self)
        except Exception as exc:
            self.stats["failed_batches"] += 1
            wait = self.backoff.failed(time.monotonic())
            run_logger().warning(
                "event batch served during the sync failed (%s: %s); its events wait, next "
                "attempt in %.1f s", type(exc).__name__, str(exc)[:300], wait,
            )  # fmt: skip
            return
        finally:
            self.busy = False
            self.served_seconds += time.perf_counter() - started
            # The sync's own share: at least SYNC_SERVE_SECONDS between the end of a batch
            # and the start of the next.
            self.next_look = time.monotonic() + self.every
        self.backoff.succeeded()
        self.stats["batches"] += 1
        self.stats["events"] += int(counts.get("events") or 0)


def refresh(ctx: RunContext, run_id: str) -> None:
    """The whole-run epilogue, for everything the batches since the last one changed."""
    data_dir = ctx.settings.staging_db.parent
    ctx.staging.checkpoint()  # the batches left their WAL: fold it into the file here
    reconciliation_report(ctx.staging, ctx.mapping, run_id, data_dir / "reconciliation.html")
    publish_snapshot(ctx.staging, data_dir / "snapshot", run_id)


def _hold(
    settings: Settings,
    inbox: Inbox,
    session: str,
    deadline: float | None,
    stats: dict[str, Any],
    alerts: Refresh,
    full_plan: Refresh,
) -> None:
    """Hold the writer and process batches until stopped, past ``deadline``, or someone on
    this machine waits for the writer (then hand it over)."""
    log = run_logger()
    waiters = WriterWaiters()
    backoff = Backoff(initial=0.5, cap=30.0)
    pending_refresh = Refresh(every=settings.processor_refresh_seconds, last=time.monotonic())
    # Charges that succeeded before Stripe created their balance transaction: no event says
    # when it appears, so they are retrieved again after 1 s, 2 s, 4 s ... (at most a
    # minute apart) for as long as any waits; their receipts wait meanwhile, never dead.
    bt_waits = Backoff(initial=1.0, cap=60.0)
    retry_documents = False
    last_run = session
    with open_run(settings, session) as ctx:
        log.info("real-time processor holds the DuckDB writer; watching %s", inbox.path)
        # A processor killed mid-batch left that batch "running"; its events were never
        # marked processed, so the next batches process them again.
        if n := ctx.staging.fail_interrupted_runs(FLOW, INTERRUPTED):
            log.warning("%d batch(es) of a processor that stopped mid-batch marked failed", n)
        waiting_bts = bool(ctx.staging.charges_without_balance_transaction(1))
        while not STOP.is_set() and (deadline is None or time.monotonic() < deadline):
            if waiters.others():
                log.info("handing the DuckDB writer over to a waiting run; events wait")
                stats["handovers"] += 1
                break
            now = time.monotonic()
            recheck = waiting_bts and bt_waits.ready(now)
            if batch_should_run(inbox.waiting(), retry_documents or recheck, backoff, now):
                try:
                    counts = process_batch_task(
                        ctx,
                        inbox,
                        settings,
                        retry_documents=retry_documents,
                        full_plan=full_plan.due(now),
                        recheck_waits=recheck,
                    )
                except Exception as exc:
                    stats["failed_batches"] += 1
                    wait = backoff.failed(time.monotonic())
                    if (auth := auth_error_in(exc)) is not None:
                        emit_auth_failed(auth, run_id=session, flow=FLOW)
                    log.warning(
                        "batch failed (%s: %s); its events wait, next attempt in %.1f s",
                        type(exc).__name__, str(exc)[:300], wait,
                    )  # fmt: skip
                    continue
                stats["batches"] += 1
                stats["events"] += int(counts.get("events") or 0)
                if counts.get("full_plan"):
                    full_plan.ran(time.monotonic())
                    full_plan.touched()  # due again in PROCESSOR_FULL_PLAN_SECONDS
                last_run = counts["run_id"]
                waiting_bts = bool(ctx.staging.charges_without_balance_transaction(1))
                if not waiting_bts:
                    bt_waits.succeeded()
                elif recheck or bt_waits.failures == 0:
                    bt_waits.failed(time.monotonic())  # the next look, later each time
                if counts.get("staged") != {}:
                    pending_refresh.touched()
                # Documents Sage did not take (down, 429s past the batch's budget): try again
                # after a backoff, also when no new event arrives.
                retry_documents = counts["status"] == "partial"
                if retry_documents:
                    backoff.failed(time.monotonic())
                else:
                    backoff.succeeded()
                continue
            if alerts.due(now):
                try:
                    if emitted := emit_state_alerts(
                        ctx.staging, settings, run_id=last_run, flow=FLOW
                    ):
                        log.warning("alerts raised: %s", ", ".join(emitted))
                    stats["alert_checks"] += 1
                except Exception as exc:  # the next interval tries again; batches go on
                    log.warning("alert check failed: %s", str(exc)[:300])
                alerts.ran(time.monotonic())
                alerts.touched()
                continue
            if pending_refresh.due(now):
                try:
                    refresh(ctx, last_run)
                    stats["refreshes"] += 1
                except Exception as exc:  # the next refresh tries again; batches go on
                    log.warning("refresh failed: %s", str(exc)[:300])
                pending_refresh.ran(time.monotonic())
                continue
            STOP.wait(settings.processor_poll_seconds)
        if pending_refresh.changed:
            refresh(ctx, last_run)  # leave the report and snapshot current
            stats["refreshes"] += 1


@flow(name=FLOW, log_prints=True)
def realtime_processor(run_for: float | None = None) -> dict[str, Any]:
    """Process webhook events in micro-batches until stopped (SIGTERM, Ctrl-C) or, with
    ``run_for``, for that many seconds (a bench, a test, a deployment's keep-alive)."""
    stop_on_signals()
    settings = Settings()  # a flow run is an entry point: resolved once, passed down
    inbox = Inbox(settings.webhook_inbox)
    session = str(runtime.flow_run.id or uuid.uuid4())
    deadline = None if run_for is None else time.monotonic() + run_for
    stats: dict[str, Any] = dict.fromkeys(
        ("batches", "events", "failed_batches", "handovers", "refreshes", "alert_checks"), 0
    )
    waiters = WriterWaiters()
    # The dead-letter and waiting-age alerts a run raises as it ends, at most once an
    # interval (across hand-overs of the writer).
    alerts = Refresh(every=settings.processor_alert_seconds, changed=True)
    # The first batch plans everything unsettled (what changed while no processor ran),
    # then one at most every PROCESSOR_FULL_PLAN_SECONDS.
    full_plan = Refresh(every=settings.processor_full_plan_seconds, changed=True)
    while not STOP.is_set() and (deadline is None or time.monotonic() < deadline):
        _hold(settings, inbox, session, deadline, stats, alerts, full_plan)
        # Handed over: let the waiters take the slot first, then queue behind them.
        while waiters.others() and not STOP.is_set():
            STOP.wait(0.2)
        # Whoever held the writer meanwhile (a sync) planned everything unsettled, and
        # served the events: the next full plan is due an interval from now, not at once
        # (at 10k charges a full plan is seconds the events after the sync would wait).
        full_plan.ran(time.monotonic())
        full_plan.touched()
    logging.getLogger(__name__).info("real-time processor stopped: %s", stats)
    return stats
