"""The DuckDB single-writer rule, enforced by Prefect: every flow that writes the staging file
holds one slot of the global concurrency limit ``stripe-sage-duckdb-writer`` (limit 1) for as
long as it has the file open.

DuckDB lets one process write a file at a time. The file lock alone would make a second
process fail (or spin) when a webhook-triggered run and a scheduled run overlap; the limit
makes it queue in Prefect instead, visible in the UI (Concurrency → Global), across machines
and workers, with a lease so that a crashed run's slot frees itself.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prefect import runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from stripe_sage.runtime import RunContext
from stripe_sage.settings import Settings
from tasks.alerts import auth_error_in, emit_auth_failed, emit_dead_letters, emit_waiting_overdue
from tasks.context import run_logger

WRITER_LIMIT = "stripe-sage-duckdb-writer"
# A slot's lease is renewed while the run holds it; a process that died (or could not reach
# the server to give it back) loses it after this, plus the server's 15 s repossessor loop.
LEASE_SECONDS = 60.0  # the server's minimum


def ensure_writer_limit() -> None:
    """Create the limit (1 slot) if the Prefect server does not have it yet."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(WRITER_LIMIT)
        except ObjectNotFound:
            with suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=WRITER_LIMIT, limit=1, active=True)
                )


@contextmanager
def writer_slot() -> Iterator[dict[str, Any]]:
    """Hold the writer slot; yields what the wait was (recorded in ``ops.runs``)."""
    ensure_writer_limit()
    asked = time.monotonic()
    # A Prefect API blip while the run holds the slot does not abort its work (DuckDB's own
    # file lock still keeps a second writer out); the lease then lapses on its own.
    with concurrency(
        WRITER_LIMIT,
        occupy=1,
        strict=True,
        lease_duration=LEASE_SECONDS,
        raise_on_lease_renewal_failure=False,
    ):
        waited = round(time.monotonic() - asked, 3)
        if waited > 1:
            run_logger().info(
                "waited %.1f s for the DuckDB writer slot (another run held it)", waited
            )
        yield {
            "limit": WRITER_LIMIT,
            "waited_s": waited,
            "acquired_at": dt.datetime.now(dt.UTC).isoformat(),
        }


@contextmanager
def open_run(settings: Settings, run_id: str, **options: Any) -> Iterator[RunContext]:
    """The writer slot, then the run's clients and the staging file (closed before the slot
    is given back). On the way out it raises the alerts' events: a refused key, or more open
    dead letters than the threshold."""
    flow = str(runtime.flow_run.flow_name or "")
    with writer_slot() as slot, RunContext.open(settings, run_id, **options) as ctx:
        ctx.writer_slot = slot
        try:
            yield ctx
        except BaseException as exc:
            if (auth := auth_error_in(exc)) is not None:
                emit_auth_failed(auth, run_id=run_id, flow=flow)
            raise
        dead = ctx.staging.con.execute(
            "SELECT count(*) FROM sage.outbox WHERE status = 'dead'"
        ).fetchall()[0][0]
        emit_dead_letters(int(dead), settings.dead_letter_alert_threshold, run_id=run_id, flow=flow)
        overdue = ctx.staging.overdue_waiting(settings.waiting_alert_hours)
        emit_waiting_overdue(overdue, run_id=run_id, flow=flow)
