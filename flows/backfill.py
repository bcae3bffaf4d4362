"""A large first load, fanned out by time window on Prefect's own engine.

``backfill`` plans every stream's windows, has them read into Parquet in parallel, then —
holding the DuckDB writer slot — merges the files into ``raw.*``, stages and validates them,
and (by default) hands over to ``stripe_to_sage`` to plan and load the Sage documents.

The fan-out (``fan_out``):
- ``dask``: the windows are tasks on a Dask cluster (``prefect-dask``): a local cluster of
  ``workers`` processes, or an existing one at ``dask_address`` (scheduler and workers on
  other machines; they need this package installed and a shared ``BACKFILL_DIR``).
- ``deployments``: the windows are dealt into ``workers`` groups, each a run of the
  ``backfill-windows`` deployment, picked up by whichever Prefect workers serve the pool
  (on any machine that shares ``BACKFILL_DIR``).
- ``threads``: one process (the single-process reference).

The account's Stripe rate (``STRIPE_MAX_RPS``) is divided among the processes that read at
the same time, so a fan-out never exceeds it.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from prefect import flow, runtime, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.lifecycle import flow_run
from flows.stages import progress, run_stages
from flows.stripe_to_sage import stripe_to_sage
from stripe_sage.runtime import stripe_reader
from stripe_sage.settings import Settings
from stripe_sage.stripe.backfill import (
    Window,
    chunk,
    extract_window,
    finish_streams,
    merge_windows,
    plan_windows,
    windows_done,
)
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.extract import DAY
from stripe_sage.stripe.streams import LISTED_STREAMS

FanOut = Literal["dask", "deployments", "threads"]
WINDOWS_DEPLOYMENT = "backfill-windows/backfill-windows"
THREADS_PER_PROCESS = 2


def _row_count(rows: int | dict[str, int]) -> int:
    """Rows a window group read: a count, or counts per stream (``reused``: windows an
    earlier attempt had written, not rows)."""
    if isinstance(rows, int):
        return rows
    return sum(n for stream, n in rows.items() if stream != "reused")


@functools.cache
def _shared_reader(max_rps: float) -> StripeReader:
    """One reader (one rate limiter) per process, shared by the window tasks it runs. A
    window process (a Dask worker, a ``backfill-windows`` run elsewhere) is an entry point of
    its own: its settings, key included, are resolved here, once, never sent as a parameter."""
    return stripe_reader(Settings(), max_rps)


@task(name="extract-windows", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def extract_windows_task(
    windows: list[dict[str, Any]], root: str, now: int, max_rps: float
) -> dict[str, Any]:
    """A group of windows → one Parquet file each (the API key comes from this process's
    settings, never from a task parameter). A retry skips the windows already written."""
    rows: dict[str, int] = {}
    reader = _shared_reader(max_rps)
    for window in windows:
        for stream, n in extract_window(reader, Window(**window), Path(root), now=now).items():
            rows[stream] = rows.get(stream, 0) + n
    return {"rows": rows, "windows": len(windows), "pid": os.getpid(), "parent_pid": os.getppid()}


@flow(
    name="backfill-windows",
    task_runner=ThreadPoolTaskRunner(max_workers=THREADS_PER_PROCESS),  # type: ignore[arg-type]
    log_prints=True,
)
def backfill_windows(
    windows: list[dict[str, Any]], root: str, now: int, max_rps: float, groups: int = 4
) -> list[dict[str, Any]]:
    """Read the given windows into Parquet under ``root`` (no DuckDB access), in ``groups``
    tasks (a task per window would spend more on bookkeeping than on reading)."""
    plan = [Window(**w) for w in windows]
    batches = [[w.as_dict() for w in g] for g in chunk(plan, groups)]
    futures = extract_windows_task.map(
        batches, root=unmapped(root), now=unmapped(now), max_rps=unmapped(max_rps)
    )
    results = [f.result() for f in futures]
    # Beside the Parquet files, for a parent on another machine (results are not persisted).
    manifest = Path(root) / "_runs" / f"{runtime.flow_run.id or uuid.uuid4()}.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(results))
    return results


def _dask_runner(workers: int, address: str | None) -> Any:
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": THREADS_PER_PROCESS,
            "processes": True,
            "dashboard_address": None,
        },
    )


def _fan_out(
    fan_out: FanOut,
    plan: list[Window],
    root: Path,
    now: int,
    rps: float,
    workers: int,
    dask_address: str | None,
) -> list[dict[str, Any]]:
    windows = [w.as_dict() for w in plan]
    if fan_out == "threads":
        return backfill_windows(windows, str(root), now, rps, groups=2 * THREADS_PER_PROCESS)
    if fan_out == "dask":
        per_process = rps / max(1, workers)
        runner = _dask_runner(workers, dask_address)
        return backfill_windows.with_options(task_runner=runner)(
            windows, str(root), now, per_process, groups=2 * workers * THREADS_PER_PROCESS
        )
    return _fan_out_to_deployments(chunk(plan, workers), root, now, rps)


def _fan_out_to_deployments(
    groups: list[list[Window]], root: Path, now: int, rps: float
) -> list[dict[str, Any]]:
    """One ``backfill-windows`` run per group, on whichever workers poll the pool; their
    results come back as manifests beside the Parquet (results are not persisted)."""
    runs: list[Any] = [
        run_deployment(
            WINDOWS_DEPLOYMENT,
            parameters={
                "windows": [w.as_dict() for w in g],
                "root": str(root),
                "now": now,
                "max_rps": rps / len(groups),
                "groups": 2 * THREADS_PER_PROCESS,
            },
            timeout=0,
            as_subflow=True,
        )
        for g in groups
    ]
    results: list[dict[str, Any]] = []
    pending = {r.id for r in runs}
    with get_client(sync_client=True) as client:
        while pending:
            for run_id in list(pending):
                fr = client.read_flow_run(run_id)
                if not (fr.state and fr.state.is_final()):
                    continue
                if not fr.state.is_completed():
                    raise RuntimeError(
                        f"backfill window run {fr.name} ended {fr.state.type.value}: "
                        f"{fr.state.message}"
                    )
                results.extend(json.loads((root / "_runs" / f"{run_id}.json").read_text()))
                pending.discard(run_id)
            if pending:
                time.sleep(1)
    return results


@flow(name="backfill", log_prints=True)
def backfill(
    streams: list[str] | None = None,
    days: int = 3 * 365,
    window_days: int = 7,
    fan_out: FanOut = "dask",
    workers: int = 2,
    dask_address: str | None = None,
    then_sync: bool = True,
    trigger: str = "manual",
) -> dict[str, Any]:
    """Backfill ``days`` of history split into ``window_days`` windows, fanned out."""
    logger = get_run_logger()
    settings = Settings()  # a flow run is an entry point: resolved once, passed down
    wanted = tuple(s for s in LISTED_STREAMS if not streams or s in streams)
    now = int(time.time())
    # The writer slot is taken only around what writes: the windows are read without it.
    with flow_run(settings, flow="backfill", trigger=trigger, hold_writer=False) as run:
        run_id, counts = run.run_id, run.counts
        # The parent process: under a Prefect worker, the worker that runs this flow run.
        counts.update({"fan_out": fan_out, "workers": workers, "host": os.getppid()})
        timings: dict[str, float] = counts.setdefault("timings", {})
        with run.store() as st:
            done = windows_done(st, wanted)

        t = time.perf_counter()
        reader = stripe_reader(settings)
        plan = plan_windows(
            reader,
            wanted,
            start=now - days * DAY,
            now=now,
            window_seconds=window_days * DAY,
            done=done,
        )
        root = (settings.backfill_dir or settings.staging_db.parent / "backfill") / run_id
        logger.info(
            "backfill %s: %d windows over %s, fan-out %s", run_id, len(plan), wanted, fan_out
        )
        # The files written so far stay under ``root`` for a look; nothing was merged.
        run.failing = "window extraction failed"
        with progress(f"extract ({len(plan)} windows)") as row:
            results = _fan_out(
                fan_out, plan, root, now, settings.stripe_max_rps, workers, dask_address
            )
            row["rows"] = sum(_row_count(r["rows"]) for r in results)
        run.failing = ""
        timings["extract"] = round(time.perf_counter() - t, 3)
        counts["windows"] = len(plan)
        counts["processes"] = sorted({r["pid"] for r in results})
        counts["window_hosts"] = sorted({r["parent_pid"] for r in results})

        t = time.perf_counter()
        with run.open(now=now, backfill_days=days, window_days=window_days) as ctx:
            previous = ctx.staging.row_counts()
            with progress("merge") as row:
                counts["merged"] = merge_windows(
                    ctx.staging, plan, root, run_id=run_id, now=now, api_version=reader.api_version
                )
                merged = counts["merged"]
                row["rows"] = sum(merged.values()) if isinstance(merged, dict) else None
            finish_streams(ctx.staging, wanted, now=now)
            timings["merge"] = round(time.perf_counter() - t, 3)
            run_stages(ctx, run, stages=("stage", "quality"), previous_rows=previous)
            timings.update({k: round(v, 3) for k, v in timings.items()})
            run.finish("completed")
    shutil.rmtree(root, ignore_errors=True)  # merged: the files have served their purpose
    logger.info(
        "backfill %s merged %s at %s",
        run_id,
        counts["merged"],
        dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
    )
    if then_sync:
        counts["sync"] = stripe_to_sage(streams=list(wanted), trigger="backfill")
    return counts
