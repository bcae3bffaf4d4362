"""The stage sequence, written once: extract → stage → itemise payouts → quality → plan →
load → write-back → report → snapshot.

The scheduled sync runs all of it; the webhook flow reads the inbox instead of listing the
streams; the backfill merges its windows itself and runs stage and quality; a dry run stops
after the plan; the benchmark's direct driver runs it without a Prefect flow run (each task's
plain function, ``task.fn``: no API server just to record task runs) and times each step
with its own clock.

What a caller gets back is the run's ``counts`` (also recorded in ``ops.runs``), with
``timings`` (seconds per stage) and ``peak_rss_mb`` (this process's peak at the end of each
stage) under the keys the benchmarks read: ``extract``, ``stage`` (itemising included),
``quality``, ``transform`` (the plan), ``load``, ``write_back`` and ``publish`` (the snapshot).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

from prefect.futures import wait as prefect_wait

from flows.lifecycle import FlowRun
from quality.runner import Engine
from stripe_sage.metrics import peak_rss_mb
from stripe_sage.runtime import RunContext
from stripe_sage.store.inbox import Inbox
from tasks.context import in_run
from tasks.inbox import drain_inbox, mark_processed
from tasks.reconcile import itemise_payouts, reconciliation_report
from tasks.sage import fiscal_periods, load, plan, write_back_task
from tasks.staging import copy_console_records, publish_snapshot, quality, stage
from tasks.stripe import extract_events, extract_stream

Stage = Literal["extract", "stage", "quality", "plan", "load", "write_back", "report", "snapshot"]
STAGES: tuple[Stage, ...] = (
    "extract",
    "stage",
    "quality",
    "plan",
    "load",
    "write_back",
    "report",
    "snapshot",
)
# Each step's key in ``timings`` and ``peak_rss_mb`` (the names the benchmarks have always
# read): itemising is timed as part of staging, the plan as "transform", the snapshot as
# "publish"; the report is not timed.
TIMING_KEYS = {
    "extract": "extract",
    "stage": "stage",
    "itemise": "stage",
    "quality": "quality",
    "transform": "transform",
    "load": "load",
    "write_back": "write_back",
    "publish": "publish",
}


class StageObserver(Protocol):
    """Told when a step starts and ends (with its rows, when it counts any): the terminal's
    progress display (``stripe-sage sync``, ``backfill``, ``replay``) is one."""

    def started(self, name: str) -> None: ...

    def ended(self, name: str, rows: int | None, seconds: float, failed: bool) -> None: ...


# Observers of this process's runs: the CLI registers its display around the flow it calls
# (flows run in the CLI's process), a server or a worker registers none.
_OBSERVERS: list[StageObserver] = []


@contextmanager
def observed(observer: StageObserver) -> Iterator[StageObserver]:
    _OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        _OBSERVERS.remove(observer)


@contextmanager
def progress(name: str) -> Iterator[dict[str, Any]]:
    """A step the observers hear about; the block may set the yielded row's ``rows``."""
    row: dict[str, Any] = {}
    for o in _OBSERVERS:
        o.started(name)
    t = time.perf_counter()
    failed = True
    try:
        yield row
        failed = False
    finally:
        rows = row.get("rows")
        for o in _OBSERVERS:
            o.ended(name, rows if isinstance(rows, int) else None, time.perf_counter() - t, failed)


class Clock(Protocol):
    """Times one step; the block fills the yielded row's ``rows`` (and, for the plan,
    ``enqueued`` and ``enqueue_seconds``)."""

    def stage(self, name: str) -> AbstractContextManager[dict[str, Any]]: ...


class FlowClock:
    """Seconds and peak RSS per step into ``counts["timings"]`` and ``counts["peak_rss_mb"]``.

    ``served``: the seconds the run has spent serving webhook events so far (a sync's
    ``SyncEventPump``); a step's time leaves them out, and ``timings["served_events"]`` holds
    them, so that a sync's extract or load does not look slower for the batches it served."""

    def __init__(self, counts: dict[str, Any], served: Callable[[], float] | None = None) -> None:
        self.timings: dict[str, float] = counts.setdefault("timings", {})
        self.peaks: dict[str, float] = counts.setdefault("peak_rss_mb", {})
        self.served = served or (lambda: 0.0)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        key = TIMING_KEYS.get(name)
        t = time.perf_counter()
        served_before = self.served()
        with progress(name) as row:
            yield row
        if key is not None:
            served = self.served() - served_before
            own = time.perf_counter() - t - served
            self.timings[key] = self.timings.get(key, 0.0) + own
            self.peaks[key] = peak_rss_mb()
            if served:
                self.timings["served_events"] = self.timings.get("served_events", 0.0) + served


def _call(task: Any, *args: Any, **kwargs: Any) -> Any:
    """A task run inside a flow run; its plain function outside one (the benchmark)."""
    fn: Callable[..., Any] = task if in_run() else task.fn
    return fn(*args, **kwargs)


def _plain(task: Any, *args: Any, **kwargs: Any) -> Any:
    return task.fn(*args, **kwargs)


def _list_streams(
    ctx: RunContext,
    streams: tuple[str, ...],
    full_refresh: bool,
    since: int | None,
    serve: Callable[[], None],
) -> dict[str, dict[str, Any]]:
    """Every stream at once (each its own task run in a flow run, a thread outside one),
    serving events (``serve``) every half second while they are listed."""
    if in_run():
        futures = [extract_stream.submit(ctx.extractor, s, full_refresh, since) for s in streams]
        while prefect_wait(futures, timeout=0.5).not_done:
            serve()
        results = [f.result() for f in futures]
    else:
        with ThreadPoolExecutor(max(1, len(streams))) as pool:
            jobs = [
                pool.submit(extract_stream.fn, ctx.extractor, s, full_refresh, since)
                for s in streams
            ]
            while futures_wait(jobs, timeout=0.5).not_done:
                serve()
            results = [j.result() for j in jobs]
    return {r["stream"]: r for r in results}


class EventServer(Protocol):
    """Serves webhook events at a sync's yield points (flows/realtime_processor.py
    ``SyncEventPump``): called often, it runs a micro-batch when one is due."""

    served_seconds: float  # spent serving so far

    def __call__(self) -> None: ...

    def sync_checked(self) -> None: ...


def _no_events() -> None:
    return None


def run_status(loads: dict[str, Any]) -> str:
    """A run's status from its load: documents deferred to a later run, dead letters, or
    everything posted."""
    if any(loads.get("deferred", {}).values()):
        return "partial"
    if any(loads.get("dead", {}).values()):
        return "completed_with_dead_letters"
    return "completed"


def run_stages(
    ctx: RunContext,
    run: FlowRun,
    *,
    stages: Collection[Stage] = STAGES,
    streams: tuple[str, ...] | None = None,
    full_refresh: bool = False,
    since: int | None = None,
    inbox: Inbox | None = None,
    inbox_limit: int = 20_000,
    previous_rows: dict[str, int] | None = None,
    dry_run: bool = False,
    clock: Clock | None = None,
    quality_engine: Engine | None = None,
    data_docs: bool | None = None,
    task_runs: bool = True,
    checkpoint: bool = True,
    scoped_plan: bool = False,
    recheck_waits: bool = False,
    plan_excludes_run: str | None = None,
    events: EventServer | None = None,
) -> dict[str, Any]:
    """Run ``stages`` of the sequence, in its order, recording into ``run.counts``.

    Extract lists ``streams`` (and the events since the cursor) when given, then re-fetches
    what the unprocessed events of ``inbox`` name (the ``inbox_limit`` oldest); those events
    are marked processed only after the write-back, so a crashed run leaves them for the
    next one. Quality compares volumes with ``previous_rows`` (by default the row counts
    before the extract; ``{}``: no comparison). A ``dry_run`` plans without enqueuing and
    ends the run there (``dry_run``); a run through the load records its status
    (``run_status``) before the snapshot, so the snapshot holds the run's own row in
    ``ops.runs``. ``quality_engine`` and ``data_docs``: how quality runs (by default the
    run's ``QUALITY_ENGINE``, with Data Docs under Great Expectations only; the real-time
    processor's micro-batches: Polars, no Data Docs; ``quality.runner.validate_stream``).
    ``task_runs=False`` calls each stage's plain function even inside a run: the processor
    makes a whole micro-batch one task run (a task run costs ~7 ms idle, far more on a busy
    Prefect server; eight of them per batch were a large part of a batch of one event).
    ``checkpoint=False``: staging leaves the WAL for the caller to checkpoint.
    ``scoped_plan``: plan only what this run staged and what depends on it (a micro-batch;
    ``stripe_sage/plan/scope.py``), not every unsettled row. ``recheck_waits``: the
    extract retrieves again the charges staged before their balance transaction existed.
    ``plan_excludes_run``: a sync whose rows quality has not checked yet (plan/outbox.py);
    ``events``: serves webhook events at the run's yield points (a sync holding the writer).
    """
    call = _call if task_runs else _plain
    engine: Engine = quality_engine or ctx.settings.quality_engine
    with_docs = engine == "gx" if data_docs is None else data_docs
    serve: Callable[[], None] = events if events is not None else _no_events
    counts = run.counts
    clock = clock or FlowClock(
        counts, served=(lambda: events.served_seconds) if events is not None else None
    )
    settings = ctx.settings
    st = ctx.staging
    run_id = run.run_id
    data_dir = Path(settings.staging_db).parent
    inbox_ids: list[str] = []
    if previous_rows is None and "quality" in stages:
        previous_rows = st.row_counts()

    serve()  # what waited while this run started
    if "extract" in stages:
        with clock.stage("extract") as row:
            if streams is not None:
                counts["extract"] = _list_streams(ctx, streams, full_refresh, since, serve)
                serve()
                counts["events"] = call(extract_events, ctx.extractor, streams)
                row["rows"] = sum(x["listed"] for x in counts["extract"].values())
            if inbox is not None:
                inbox_ids = call(drain_inbox, ctx.extractor, inbox, inbox_limit, recheck_waits)
                if streams is None:
                    counts["events"] = len(inbox_ids)
        serve()

    if "stage" in stages:
        with clock.stage("stage") as row:
            counts["staged"] = call(stage, st, run_id, checkpoint)
            # Customers deleted in Stripe are in no list, only named by charges or invoices:
            # retrieved by id once those are staged (a first run's extract has nothing staged
            # to look at), then staged too (docs/accounting.md §2).
            if ctx.extractor.fetch_referenced_customers():
                for table, n in call(stage, st, run_id, checkpoint).items():
                    counts["staged"][table] = counts["staged"].get(table, 0) + n
            row["rows"] = sum(counts["staged"].values())
        with clock.stage("itemise") as row:
            counts["payouts_itemised"] = row["rows"] = call(itemise_payouts, ctx.reader, st, run_id)
        serve()

    if "quality" in stages:
        with clock.stage("quality") as row:
            docs = data_dir / "data_docs" if with_docs else None
            q = call(quality, st, run_id, previous_rows or {}, docs, engine, events)
            counts["quarantined"] = q.quarantined
            counts["data_docs"] = q.docs_path
            row["rows"] = sum(q.rows.values())
        if events is not None:
            events.sync_checked()
        serve()

    if "plan" in stages:
        with clock.stage("transform") as row:
            periods = call(fiscal_periods, ctx.sage)
            # Planned slice by slice into the outbox: a 1M-charge first run is ~2M payloads,
            # never all in memory at once; the loader reads them back in pages.
            planned = call(
                plan,
                st,
                ctx.loader,
                ctx.mapping,
                periods,
                ctx.sage,
                run_id,
                dry_run,
                scoped_plan,
                plan_excludes_run,
                events,
            )
            counts["planned"] = planned["planned"]
            row["rows"] = sum(planned["planned"].values())
            row["enqueued"] = planned["enqueued"]
            row["enqueue_seconds"] = planned["enqueue_seconds"]
            if planned["superseded"]:  # waits another document replaced: in the run history
                counts["superseded_waits"] = planned["superseded"]
        if dry_run:
            counts["dry_run"] = True
            counts["planned_errors"] = planned["planned_errors"]
            run.finish("dry_run")
            return counts

    if "load" in stages:
        serve()
        with clock.stage("load") as row:
            ctx.loader.interleave = events
            try:
                counts["load"] = call(load, ctx.loader)
            finally:
                ctx.loader.interleave = None
            counts["sage_client"] = ctx.sage.stats.as_dict()
            row["rows"] = sum(counts["load"]["posted"].values()) + sum(
                counts["load"]["dead"].values()
            )

    if "write_back" in stages:
        with clock.stage("write_back"):
            counts["write_back"] = call(write_back_task, ctx.reader, st, run_id, events)
            counts["stripe_client"] = dict(ctx.reader.stats)
        counts["totals"] = st.outbox_totals()
    if inbox is not None:
        counts["inbox"] = call(mark_processed, inbox, inbox_ids, run_id)

    if "report" in stages:
        serve()
        counts["reconciliation"] = call(
            reconciliation_report, st, ctx.mapping, run_id, data_dir / "reconciliation.html"
        )

    if "load" in stages:
        run.finish(run_status(counts["load"]))
    if "snapshot" in stages:
        serve()
        counts["console"] = _call(copy_console_records, st, settings.console_store)
        # After the run's row is recorded, so the snapshot holds it.
        with clock.stage("publish"):
            counts["snapshot"] = call(publish_snapshot, st, data_dir / "snapshot", run_id)
    return counts
