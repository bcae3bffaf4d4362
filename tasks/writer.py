"""The DuckDB single-writer rule, enforced by Prefect: every flow that writes the staging file
holds one slot of the global concurrency limit ``stripe-sage-duckdb-writer`` (limit 1) for as
long as it has the file open.

DuckDB lets one process write a file at a time. The file lock alone would make a second
process fail (or spin) when a webhook-triggered run and a scheduled run overlap; the limit
makes it queue in Prefect instead, visible in the UI (Concurrency → Global), across machines
and workers.

A run killed while it holds the slot (``kill -9``, OOM, power loss) never gives it back. Its
lease would expire, but only a Prefect server's repossessor expires leases: the embedded
default (``stripe-sage sync`` without ``PREFECT_API_URL``) starts a temporary server per process
that runs no services and keeps leases in that process's memory, so the slot stayed taken
for good (issue 16). So the holder also records itself in a file on its machine and keeps
that file locked (``flock``) while it holds the slot; the OS drops the lock the moment the
process dies. A waiter checks between acquisition attempts: a record whose lock is free names
a dead holder, whose slot it gives back: by its lease where the server knows it (a Prefect
server), by one decrement where the lease died with the holder's temporary server (embedded).
A holder on another machine is freed by its lease's expiry on the server (60 s, plus the
repossessor's 15 s loop). docs/architecture.md, "Concurrency".
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any
from uuid import UUID

from prefect import runtime
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import get_current_settings
from prefect.states import Crashed

from stripe_sage.runtime import RunContext
from stripe_sage.settings import Settings
from stripe_sage.store.staging import Staging
from tasks.alerts import (
    DEAD_LETTERS_ABOVE,
    WAITING_OVERDUE,
    auth_error_in,
    emit_auth_failed,
    emit_dead_letters,
    emit_suspense,
    emit_waiting_overdue,
)
from tasks.context import run_logger

WRITER_LIMIT = "stripe-sage-duckdb-writer"
# A slot's lease is renewed while the run holds it; a process that died (or could not reach
# the server to give it back) loses it after this, plus the server's 15 s repossessor loop.
LEASE_SECONDS = 60.0  # the server's minimum
# One acquisition attempt waits this long before the waiter looks for a dead holder again.
POLL_SECONDS = 5.0
# A taken slot nobody on this machine records (a holder killed between taking the slot and
# recording itself, or a slot left by a version without records) is given back after this
# long, on the embedded default only (there every holder runs on this machine).
UNRECORDED_GRACE_SECONDS = 20.0


class _QuietPolls(logging.Filter):
    """Each acquisition attempt that ends at POLL_SECONDS is logged by Prefect's service as
    an error ("failed to process item ... TimeoutError"); it is this module's polling."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            len(args) == 2
            and args[0] == "ConcurrencySlotAcquisitionWithLeaseService"
            and "TimeoutError" in repr(args[1])
        )


logging.getLogger("prefect._internal.concurrency").addFilter(_QuietPolls())


@dataclass(frozen=True)
class Holder:
    """Who holds the writer slot, as its record file says."""

    pid: int
    host: str
    started_at: str
    lease_id: str | None
    flow_run_id: str | None
    embedded: bool  # on a per-process temporary Prefect server: its lease died with it

    def describe(self) -> str:
        run = f"flow run {self.flow_run_id}, " if self.flow_run_id else ""
        return f"{run}pid {self.pid} on {self.host}, holding since {self.started_at}"


def _embedded() -> bool:
    return not get_current_settings().api.url


def holder_dir() -> Path:
    """Where this machine's holders of the slot record themselves: beside the embedded
    Prefect database (``PREFECT_HOME``), or per server URL for a Prefect server (each run may
    have a home of its own there)."""
    settings = get_current_settings()
    if not settings.api.url:
        return Path(settings.home)
    tag = hashlib.sha256(str(settings.api.url).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"stripe-sage-writer-{tag}"


class HolderRecord:
    """``stripe-sage-writer.json`` (who holds the slot) and ``stripe-sage-writer.lock``,
    locked by the holder for as long as it holds the slot. Every write of the record happens
    under the lock, so a waiter that gets the lock sees a record no live process owns."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or holder_dir()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record = self.dir / "stripe-sage-writer.json"
        self.lock_path = self.dir / "stripe-sage-writer.lock"
        self._held: IO[bytes] | None = None

    def _open_locked(self, blocking: bool) -> IO[bytes] | None:
        f = open(self.lock_path, "ab")  # noqa: SIM115 - kept open while locked
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            f.close()
            return None
        return f

    def read(self) -> Holder | None:
        try:
            return Holder(**json.loads(self.record.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def write(self, holder: Holder | None) -> None:
        if holder is None:
            self.record.unlink(missing_ok=True)
            return
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(holder)))
        os.replace(tmp, self.record)

    def take(self, holder: Holder) -> None:
        """Lock (waiting only on a waiter's brief check) and record ``holder``."""
        self._held = self._open_locked(blocking=True)
        self.write(holder)

    def clear(self) -> None:
        """Forget the record (before the slot is given back: a process killed in between
        leaves a taken slot with no record, which the grace period covers)."""
        if self._held is not None:
            self.write(None)

    def unlock(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    @contextmanager
    def no_live_holder(self) -> Iterator[bool]:
        """Yields True, holding the lock, when no live process on this machine holds it."""
        f = self._open_locked(blocking=False)
        try:
            yield f is not None
        finally:
            if f is not None:
                f.close()


class WriterWaiters:
    """Who on this machine is waiting for the writer slot: each waiter keeps a file
    ``stripe-sage-writer.want.<pid>`` locked (``flock``) while it waits. The real-time
    processor holds the slot for as long as it runs and hands it over between two batches
    when it sees a live waiter (a scheduled sync, a replay), then takes it back after it.
    A waiter that died leaves an unlocked file: not a live waiter, removed by the next look."""

    def __init__(self, directory: Path | None = None) -> None:
        self.dir = directory or holder_dir()
        self.dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        path = self.dir / f"stripe-sage-writer.want.{os.getpid()}"
        f = open(path, "ab")  # noqa: SIM115 - kept open (locked) while this process waits
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        finally:
            path.unlink(missing_ok=True)
            f.close()

    def others(self) -> int:
        """Live waiters other than this process."""
        live = 0
        for path in self.dir.glob("stripe-sage-writer.want.*"):
            if path.suffix == f".{os.getpid()}":
                continue
            try:
                f = open(path, "ab")  # noqa: SIM115 - closed below
            except OSError:
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                live += 1  # its owner holds the lock: alive and waiting
            else:
                path.unlink(missing_ok=True)  # its owner died while waiting
            finally:
                f.close()
        return live


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


def _slot_taken() -> bool:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(WRITER_LIMIT)
    return limit.active_slots >= limit.limit


def _give_back(holder: Holder | None) -> str:
    """Give back a dead holder's slot; say how. Runs under the record's lock, with the
    record already cleared, so two waiters never give back the same slot twice."""
    with get_client(sync_client=True) as client:
        if holder is not None and holder.lease_id is not None:
            try:
                # Known to this server: release it as its holder would have (idempotent, so
                # a repossessor or another waiter doing the same costs nothing).
                client.renew_concurrency_lease(UUID(holder.lease_id), LEASE_SECONDS)
            except PrefectHTTPStatusError:
                pass  # gone: repossessed already, or it died with its temporary server
            else:
                client.release_concurrency_slots_with_lease(UUID(holder.lease_id))
                return "released its lease"
        if (holder is None or holder.embedded) and _embedded():
            # Embedded: the lease lived in the dead process's temporary server, and nothing
            # else can free this slot: no repossessor, every holder runs here and records
            # itself under the lock held now.
            limit = client.read_global_concurrency_limit_by_name(WRITER_LIMIT)
            if limit.active_slots >= 1:
                client.release_concurrency_slots([WRITER_LIMIT], 1, occupancy_seconds=1.0)
                return "gave its slot back"
    return "its lease is gone already"


def _mark_run_crashed(holder: Holder) -> str:
    """The dead holder's flow run, if the server still shows it running, is marked Crashed
    (nobody else will: its process is gone), so the Prefect UI does not show it running for
    ever. Its flow run on a temporary server died with that server: nothing to mark."""
    if holder.flow_run_id is None or holder.embedded:
        return ""
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(holder.flow_run_id))
        except (ObjectNotFound, PrefectHTTPStatusError):
            return ""
        if run.state is None or run.state.is_final():
            return ""
        client.set_flow_run_state(
            run.id,
            Crashed(
                message=f"its process (pid {holder.pid} on {holder.host}) died holding the "
                "DuckDB writer slot; the slot was given back to the next run"
            ),
            force=True,
        )
    return "; its flow run is marked Crashed"


def reclaim_dead_holder(
    record: HolderRecord,
    unrecorded_since: float | None,
    grace: float = UNRECORDED_GRACE_SECONDS,
) -> float | None:
    """If the slot's holder on this machine is dead, give its slot back. Returns since when
    (monotonic) the slot has been taken with no record, for the grace period."""
    log = run_logger()
    with record.no_live_holder() as free:
        if not free:
            return None  # a live process here holds it: wait
        holder = record.read()
        if holder is not None:
            record.write(None)  # under the lock: nobody else gives this slot back
            how = _give_back(holder) + _mark_run_crashed(holder)
            log.warning("the DuckDB writer slot's holder is gone (%s): %s", holder.describe(), how)
            return None
        if not _embedded() or not _slot_taken():
            return None  # a holder on another machine: its lease expires on the server
        now = time.monotonic()
        if unrecorded_since is None:
            return now
        if now - unrecorded_since < grace:
            return unrecorded_since
        how = _give_back(None)
        log.warning(
            "the DuckDB writer slot was taken for %.0f s by no live process on this machine: %s",
            now - unrecorded_since,
            how,
        )
        return None


@contextmanager
def writer_slot(unrecorded_grace: float = UNRECORDED_GRACE_SECONDS) -> Iterator[dict[str, Any]]:
    """Hold the writer slot; yields what the wait was (recorded in ``ops.runs``). A test of
    the grace period may shorten it (``unrecorded_grace``)."""
    ensure_writer_limit()
    record = HolderRecord()
    asked = time.monotonic()
    unrecorded_since: float | None = None
    try:
        # Prefect records the lease it grants in the innermost ConcurrencyContext (for its
        # own clean-up); a context of our own makes that lease the only one in it.
        with ExitStack() as stack:
            leases = stack.enter_context(ConcurrencyContext())
            wanting = stack.enter_context(ExitStack())
            # Say so while waiting: the real-time processor hands the slot over between
            # two batches when someone waits for it.
            wanting.enter_context(WriterWaiters(record.dir).waiting())
            while True:
                # Before each attempt, so a dead holder costs the next run no wait at all.
                unrecorded_since = reclaim_dead_holder(record, unrecorded_since, unrecorded_grace)
                try:
                    # A Prefect API blip while the run holds the slot does not abort its
                    # work (DuckDB's own file lock still keeps a second writer out); the
                    # lease then lapses on its own.
                    stack.enter_context(
                        concurrency(
                            WRITER_LIMIT,
                            occupy=1,
                            timeout_seconds=POLL_SECONDS,
                            strict=True,
                            lease_duration=LEASE_SECONDS,
                            raise_on_lease_renewal_failure=False,
                        )
                    )
                    break
                except TimeoutError:
                    continue
            wanting.close()
            waited = round(time.monotonic() - asked, 3)
            acquired_at = dt.datetime.now(dt.UTC).isoformat()
            flow_run = runtime.flow_run.id
            record.take(
                Holder(
                    pid=os.getpid(),
                    host=socket.gethostname(),
                    started_at=acquired_at,
                    lease_id=str(leases.cleanup_lease_ids[-1])
                    if leases.cleanup_lease_ids
                    else None,
                    flow_run_id=str(flow_run) if flow_run else None,
                    embedded=_embedded(),
                )
            )
            run_logger().info("DuckDB writer slot acquired after %.1f s", waited)
            try:
                yield {"limit": WRITER_LIMIT, "waited_s": waited, "acquired_at": acquired_at}
            finally:
                record.clear()
    finally:
        record.unlock()


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
        emit_state_alerts(ctx.staging, settings, run_id=run_id, flow=flow)
        emit_suspense(ctx.staging.suspense_flags(run_id), run_id=run_id, flow=flow)


def emit_state_alerts(st: Staging, settings: Settings, *, run_id: str, flow: str) -> list[str]:
    """The alerts on the outbox's state: more open dead letters than the threshold, and
    documents waiting longer than their reason allows. A run raises them as it ends; the
    real-time processor, which never ends, every ``PROCESSOR_ALERT_SECONDS``. Returns the
    events emitted."""
    emitted = []
    states = st.state_counts()
    if emit_dead_letters(
        states.get("dead", 0),
        settings.dead_letter_alert_threshold,
        run_id=run_id,
        flow=flow,
        unposted=states,
    ):
        emitted.append(DEAD_LETTERS_ABOVE)
    overdue = st.overdue_waiting(settings.waiting_alert_hours)
    if emit_waiting_overdue(overdue, run_id=run_id, flow=flow):
        emitted.append(WAITING_OVERDUE)
    return emitted
