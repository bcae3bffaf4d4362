"""The run lifecycle, written once: every flow run gets a row in ``ops.runs`` when it starts,
and leaves it with a status — its own, ``completed`` by default, or ``failed`` with the error
when anything (a crash, a cancellation, Ctrl-C) ends it early. Nothing ends silently.

    with flow_run(settings, flow="stripe_to_sage", trigger=trigger) as run:
        ... run.context (the run's clients and staging file), run.counts ...
        run.finish("partial")  # optional: record a status of its own before the end

A run normally holds the DuckDB writer slot (``tasks/writer.py``) from start to end. The
backfill reads Stripe for a long time without touching the file: it opens the run with
``hold_writer=False`` and takes the slot only around what writes (``run.store()``,
``run.open()``), so other flows can run meanwhile.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import runtime

from stripe_sage.runtime import RunContext
from stripe_sage.settings import Settings
from stripe_sage.store.staging import Staging
from tasks.writer import open_run, writer_slot


@dataclass
class FlowRun:
    """One run's identity, what it recorded so far and, while it holds the writer, its
    clients and staging file."""

    settings: Settings
    flow: str
    run_id: str
    prefect_run_id: Any = None
    counts: dict[str, Any] = field(default_factory=dict)
    ctx: RunContext | None = None
    status: str | None = None
    # Prefixed to the error recorded if the run fails (what it was doing).
    failing: str = ""
    started: float = field(default_factory=time.perf_counter)

    @property
    def context(self) -> RunContext:
        if self.ctx is None:
            raise RuntimeError(f"{self.flow} run {self.run_id} holds no run context now")
        return self.ctx

    @contextmanager
    def store(self) -> Iterator[Staging]:
        """The staging file: the run's own while it holds the writer, else the writer slot and
        the file for just this block."""
        if self.ctx is not None:
            yield self.ctx.staging
            return
        with writer_slot() as slot, Staging(self.settings.staging_db) as st:
            self.counts["writer_slot"] = slot
            yield st

    @contextmanager
    def open(self, **options: Any) -> Iterator[RunContext]:
        """The writer slot and the run's clients for this block (``hold_writer=False`` runs)."""
        if self.ctx is not None:
            yield self.ctx
            return
        with open_run(self.settings, self.run_id, **options) as ctx:
            self.counts["writer_slot"] = ctx.writer_slot
            self.ctx = ctx
            try:
                yield ctx
            finally:
                self.ctx = None

    def finish(self, status: str, counts: dict[str, Any] | None = None) -> None:
        """Record the run's end now (the lifecycle then leaves the row as it is, unless the
        run fails afterwards)."""
        self.counts["seconds"] = round(time.perf_counter() - self.started, 3)
        with self.store() as st:
            st.finish_run(
                self.run_id, status=status, counts=self.counts if counts is None else counts
            )
        self.status = status


@contextmanager
def recorded(run: FlowRun, trigger: str) -> Iterator[FlowRun]:
    """``ops.runs`` for ``run``: started now, finished ``completed`` unless the run recorded a
    status of its own, ``failed`` (with the error, and re-raised) on any exception."""
    with run.store() as st:
        st.start_run(run.run_id, flow=run.flow, prefect_run_id=run.prefect_run_id, trigger=trigger)
    try:
        yield run
    except BaseException as exc:
        error = f"{run.failing}: {exc}" if run.failing else str(exc)
        with run.store() as st:
            st.finish_run(run.run_id, status="failed", counts=run.counts, error=error[:2000])
        raise
    if run.status is None:
        run.finish("completed")


@contextmanager
def flow_run(
    settings: Settings, *, flow: str, trigger: str, hold_writer: bool = True, **options: Any
) -> Iterator[FlowRun]:
    """A recorded run of ``flow`` under the current Prefect flow run (its id is the run id).
    ``options`` go to ``RunContext.open`` (``backfill_days``, ``window_days``)."""
    prefect_id = runtime.flow_run.id
    run_id = str(prefect_id or uuid.uuid4())
    run = FlowRun(settings, flow, run_id, prefect_id)
    if not hold_writer:
        with recorded(run, trigger):
            yield run
        return
    with run.open(**options), recorded(run, trigger):
        yield run
