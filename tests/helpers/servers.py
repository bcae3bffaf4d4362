"""Real servers for end-to-end tests: a Prefect server (SQLite or PostgreSQL) and its workers,
each a process on loopback with its own home, stopped by the fixture that started it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox.runner import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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
    """A fresh database on the machine's PostgreSQL (loopback, trust auth), dropped after."""

    def __init__(self) -> None:
        self.name = f"prefect_{uuid.uuid4().hex[:10]}"
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{self.name}"

    def _psql(self, sql: str) -> None:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", sql],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def create(self) -> None:
        self._psql(f"CREATE DATABASE {self.name}")

    def drop(self) -> None:
        self._psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class Prefect:
    """A Prefect server process on loopback with its own home; SQLite unless a database URL
    is given."""

    def __init__(self, home: Path, database_url: str | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.database_url = database_url or "sqlite+aiosqlite:///" + str(home / "prefect.db")
        self.proc: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def env(self) -> dict[str, str]:
        return {
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
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
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
        response = httpx.request(method, self.url + path, timeout=30, **kw)
        response.raise_for_status()
        return response.json() if response.content else None

    def flow_runs(self, **flt: Any) -> list[dict[str, Any]]:
        return list(self.api("POST", "/flow_runs/filter", json={"limit": 200, **flt}))

    def stop(self) -> None:
        for worker in self.workers:
            stop(worker)
        stop(self.proc)
