"""The main job: Stripe → DuckDB → quality → Polars → Sage Pro, exactly once, with run history."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, runtime
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from stripe_sage.metrics import peak_rss_mb
from stripe_sage.settings import Settings
from stripe_sage.stripe.streams import LISTED_STREAMS
from stripe_sage.stripe.webhooks import Inbox
from tasks.inbox import drain_inbox, mark_processed
from tasks.reconcile import itemise_payouts, reconciliation_report
from tasks.sage import fiscal_periods, load, plan, write_back_task
from tasks.staging import publish_snapshot, quality, stage
from tasks.stripe import extract_events, extract_stream
from tasks.writer import open_run


def _status(loads: dict[str, Any]) -> str:
    if any(loads.get("deferred", {}).values()):
        return "partial"
    if any(loads.get("dead", {}).values()):
        return "completed_with_dead_letters"
    return "completed"


@flow(name="stripe_to_sage", log_prints=True)
def stripe_to_sage(
    streams: list[str] | None = None,
    full_refresh: bool = False,
    since: dt.datetime | None = None,
    dry_run: bool = False,
    trigger: str = "manual",
    backfill_days: int = 3 * 365,
    window_days: int = 7,
) -> dict[str, Any]:
    """Extract every stream incrementally, stage, validate, plan, load, record the run.

    ``since`` re-reads objects created since then (a windowed re-read); ``dry_run`` plans
    the Sage documents and reports them without posting anything.
    """
    logger = get_run_logger()
    settings = Settings()
    wanted = tuple(s for s in LISTED_STREAMS if not streams or s in streams)
    prefect_id = runtime.flow_run.id
    run_id = str(prefect_id or uuid.uuid4())
    timings: dict[str, float] = {}
    peak_mb: dict[str, float] = {}  # peak RSS of this process at the end of each stage
    counts: dict[str, Any] = {"timings": timings, "peak_rss_mb": peak_mb}
    with open_run(settings, run_id, backfill_days=backfill_days, window_days=window_days) as ctx:
        st = ctx.staging
        counts["writer_slot"] = ctx.writer_slot
        st.start_run(run_id, flow="stripe_to_sage", prefect_run_id=prefect_id, trigger=trigger)
        try:
            previous = st.row_counts()
            t = time.perf_counter()
            since_ts = int(since.timestamp()) if since else None
            futures = [
                extract_stream.submit(ctx.extractor, s, full_refresh or since is not None, since_ts)
                for s in wanted
            ]
            counts["extract"] = {f.result()["stream"]: f.result() for f in futures}
            counts["events"] = extract_events(ctx.extractor, wanted)
            # The scheduled sync drains the webhook inbox too: nothing waits on a trigger.
            inbox = Inbox(settings.webhook_inbox) if settings.webhook_inbox.exists() else None
            inbox_ids = drain_inbox(ctx.extractor, inbox) if inbox else []
            timings["extract"] = time.perf_counter() - t
            peak_mb["extract"] = peak_rss_mb()

            t = time.perf_counter()
            counts["staged"] = stage(st, run_id)
            counts["payouts_itemised"] = itemise_payouts(ctx.reader, st, run_id)
            timings["stage"] = time.perf_counter() - t
            peak_mb["stage"] = peak_rss_mb()

            t = time.perf_counter()
            docs_dir = Path(settings.staging_db).parent / "data_docs"
            q = quality(st, run_id, previous, docs_dir)
            counts["quarantined"] = q.quarantined
            counts["data_docs"] = q.docs_path
            timings["quality"] = time.perf_counter() - t
            peak_mb["quality"] = peak_rss_mb()

            t = time.perf_counter()
            periods = fiscal_periods(ctx.sage)
            # Planned slice by slice into the outbox: a 1M-charge first run is ~2M payloads,
            # never all in memory at once; the loader reads them back in pages.
            planned = plan(st, ctx.loader, ctx.mapping, periods, ctx.sage, run_id, dry_run)
            timings["transform"] = time.perf_counter() - t
            peak_mb["transform"] = peak_rss_mb()
            counts["planned"] = planned["planned"]
            if dry_run:
                counts["dry_run"] = True
                counts["planned_errors"] = planned["planned_errors"]
                st.finish_run(run_id, status="dry_run", counts=counts)
                return counts

            t = time.perf_counter()
            counts["load"] = load(ctx.loader)
            counts["sage_client"] = ctx.sage.stats.as_dict()
            timings["load"] = time.perf_counter() - t
            peak_mb["load"] = peak_rss_mb()

            t = time.perf_counter()
            counts["write_back"] = write_back_task(ctx.reader, st, run_id)
            counts["stripe_client"] = dict(ctx.reader.stats)
            timings["write_back"] = time.perf_counter() - t
            counts["totals"] = st.outbox_totals()
            if inbox is not None:
                counts["inbox"] = mark_processed(inbox, inbox_ids, run_id)
            counts["reconciliation"] = reconciliation_report(
                st, ctx.mapping, run_id, Path(settings.staging_db).parent / "reconciliation.html"
            )
            status = _status(counts["load"])
            st.finish_run(run_id, status=status, counts=counts)
            # Published last, so the snapshot holds this run's own row in ops.runs.
            t = time.perf_counter()
            counts["snapshot"] = publish_snapshot(
                st, Path(settings.staging_db).parent / "snapshot", run_id
            )
            timings["publish"] = time.perf_counter() - t
            create_table_artifact(
                key="run-summary",
                description=f"stripe_to_sage run {run_id}: {status}",
                table=[{"doc_type": d, **s} for d, s in counts["totals"].items()],
            )
            logger.info(
                "run %s %s: posted %s, dead %s, deferred %s",
                run_id,
                status,
                counts["load"]["posted"],
                counts["load"]["dead"],
                counts["load"]["deferred"],
            )
            counts["status"] = status
            counts["run_id"] = run_id
            return counts
        except BaseException as exc:
            st.finish_run(run_id, status="failed", counts=counts, error=str(exc)[:2000])
            raise
