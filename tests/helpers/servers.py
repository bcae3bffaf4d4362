"""Real servers for end-to-end tests: a Prefect server (SQLite or PostgreSQL) and its workers,
each a process on loopback with its own home, stopped by the fixture that started it."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox.runner import free_port
from tests.helpers import loopback

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Prefect databases migrated once per Prefect version, copied for each new server: migrating
# a fresh SQLite database is most of a server's start (~11 s to start, ~4 s from a copy).
CACHE = Path(tempfile.gettempdir()) / "stripe-sage-tests"
# A server started on such a copy neither migrates nor registers blocks again (~1.2 s of CPU
# a start): the copy is of this Prefect version, migrated, its blocks registered.
ON_A_MIGRATED_COPY = {
    "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
    "PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
}


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(args, env=env, stdout=out, stderr=out, cwd=ROOT)


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class PostgresDatabase:
    """A fresh database on the machine's PostgreSQL (loopback, trust auth), dropped after:
    a copy of a template a Prefect server of this version migrated (see ``CACHE``)."""

    def __init__(self) -> None:
        self.name = f"prefect_{uuid.uuid4().hex[:10]}"
        self.url = self.url_of(self.name)

    @staticmethod
    def url_of(name: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"

    @staticmethod
    def _psql(sql: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-tAc", sql],
            check=check,
            capture_output=True,
            timeout=60,
        )

    @classmethod
    def template(cls) -> str:
        """The migrated template for this Prefect version (the first call builds it)."""
        name = "prefect_template_" + re.sub(r"\W", "_", version("prefect"))
        if cls._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").stdout.strip():
            return name
        build = f"prefect_build_{uuid.uuid4().hex[:10]}"
        cls._psql(f"CREATE DATABASE {build}")
        with tempfile.TemporaryDirectory() as tmp:
            builder = Prefect(Path(tmp), database_url=cls.url_of(build), migrated=False)
            builder.start()
            builder.stop()
        if cls._psql(f"ALTER DATABASE {build} RENAME TO {name}", check=False).returncode:
            cls._psql(f"DROP DATABASE IF EXISTS {build} WITH (FORCE)")  # built by another run
        return name

    def create(self) -> None:
        self._psql(f"CREATE DATABASE {self.name} TEMPLATE {self.template()}")

    def drop(self) -> None:
        self._psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def _backup(src: Path, dst: Path) -> None:
    """Copy a SQLite database consistently (WAL included) through a temporary file, so a
    concurrent reader (another pytest worker) never sees half of it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}")
    source, target = sqlite3.connect(src), sqlite3.connect(tmp)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    os.replace(tmp, dst)


def migrated_prefect_db(target: Path) -> None:
    """Put a migrated Prefect SQLite database (blocks registered) at ``target``: a copy of
    one a server of this Prefect version built and left (the first call builds it)."""
    cached = CACHE / f"prefect-{version('prefect')}.db"
    if not cached.exists():
        with tempfile.TemporaryDirectory() as tmp:
            builder = Prefect(Path(tmp), migrated=False)
            builder.start()
            builder.stop()
            _backup(Path(tmp) / "prefect.db", cached)
    _backup(cached, target)


# Services the harness's server runs for nobody: no test reads its task runs (the task-run
# recorder builds them from every task's events: the largest part of the harness's CPU after
# the API itself), and no automation is installed on it (triggers and actions). The event
# persister stays: tests read the alerts' events.
HARNESS_SERVICES_OFF = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
}


@contextmanager
def prefect_test_harness(server_startup_timeout: int = 90) -> Iterator[None]:
    """Prefect's ``prefect_test_harness`` (a temporary API for flows run in this process),
    its SQLite database copied migrated instead of migrated at start-up (see ``CACHE``)."""
    import prefect.testing.utilities as utilities

    original = utilities.mkdtemp

    def seeded_mkdtemp() -> str:
        temp_dir = original()
        # The harness's database file (prefect/testing/utilities.py). If Prefect renames it,
        # the server starts on an empty database it does not migrate (ON_A_MIGRATED_COPY):
        # every e2e test then fails at its first API call, loudly, not silently slower.
        migrated_prefect_db(Path(temp_dir) / "prefect-test.db")
        return temp_dir

    utilities.mkdtemp = seeded_mkdtemp  # type: ignore[assignment]
    # The harness's server process takes this process's environment when it starts.
    server_env = {**ON_A_MIGRATED_COPY, **HARNESS_SERVICES_OFF}
    saved = {key: os.environ.get(key) for key in server_env}
    os.environ.update(server_env)
    try:
        with utilities.prefect_test_harness(server_startup_timeout=server_startup_timeout):
            utilities.mkdtemp = original
            _restore(saved)
            yield
    finally:
        utilities.mkdtemp = original
        _restore(saved)


def _restore(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class Prefect:
    """A Prefect server process on loopback with its own home; SQLite unless a database URL
    is given."""

    def __init__(self, home: Path, database_url: str | None = None, migrated: bool = True) -> None:
        self.home = home
        # Its database is a migrated copy (SQLite: copied at start if absent; PostgreSQL: the
        # caller's copy of the template); ``False`` for the server that builds one.
        self.migrated = migrated
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.database_url = database_url or "sqlite+aiosqlite:///" + str(home / "prefect.db")
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {
            **(ON_A_MIGRATED_COPY if self.migrated else {}),
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.url,
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            # Workers and the scheduler poll often: tests wait on them.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        }

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        sqlite = self.database_url.removeprefix("sqlite+aiosqlite:///")
        if self.migrated and sqlite != self.database_url and not Path(sqlite).exists():
            migrated_prefect_db(Path(sqlite))
        self.proc = spawn(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            {**os.environ, **self.env()},
            self.home / "server.log",
        )
        wait_for(self.healthy, 120, "the Prefect server")

    def healthy(self) -> bool:
        try:
            return loopback.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cli(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Run a ``prefect`` command against this server; its output."""
        done = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", *args],
            env={**os.environ, **self.env(), **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def start_worker(
        self, pool: str, env: dict[str, str], log: Path, *args: str
    ) -> subprocess.Popen[bytes]:
        proc = spawn(
            [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", *args],
            {**os.environ, **env, **self.env()},
            log,
        )
        self.workers.append(proc)
        return proc

    def api(self, method: str, path: str, **kw: Any) -> Any:
        response = loopback.request(method, self.url + path, timeout=30, **kw)
        response.raise_for_status()
        return response.json() if response.content else None

    def flow_runs(self, **flt: Any) -> list[dict[str, Any]]:
        return list(self.api("POST", "/flow_runs/filter", json={"limit": 200, **flt}))

    def stop(self) -> None:
        for worker in self.workers:
            stop(worker)
        stop(self.proc)
