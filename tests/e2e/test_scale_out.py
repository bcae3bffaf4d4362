"""Beyond one process: a Prefect server backed by PostgreSQL, two process workers on the
work pool, and the backfill fanned out to them as ``backfill-windows`` runs (each writing
Parquet), merged by one writer — with the same DuckDB contents as the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from tests.e2e.test_backfill import table_contents
from tests.e2e.test_operations import POOL, PREFECT_YAML, ops_env
from tests.helpers.business import ACCOUNTING_QUALITY, Env, make_env
from tests.helpers.servers import BIN, ROOT, PostgresDatabase, Prefect, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Env, Prefect, Path]]:
    tmp = tmp_path_factory.mktemp("scale")
    mp = pytest.MonkeyPatch()
    env = make_env(tmp, charges=300, seed=23, monkeypatch=mp)
    database = PostgresDatabase()
    database.create()
    prefect = Prefect(tmp / "prefect", database_url=database.url)
    try:
        prefect.start()
        with env.pair:
            yield env, prefect, tmp
    finally:
        prefect.stop()
        database.drop()
        mp.undo()


def test_postgres_server_two_workers_backfill_equals_single_process(
    cluster: tuple[Env, Prefect, Path],
) -> None:
    env, prefect, tmp = cluster
    assert "postgresql" in prefect.database_url
    prefect.cli("work-pool", "create", POOL, "--type", "process")
    prefect.cli("deploy", "--prefect-file", str(PREFECT_YAML), "--all")
    # No schedule should fire during the test: only the backfill runs. (What `prefect
    # deployment schedule pause --all` and `prefect deployment run` do, through the API: each
    # `prefect` command costs ~4 s of CPU to start.)
    deployments = prefect.api("POST", "/deployments/filter", json={})
    for d in deployments:
        for schedule in d["schedules"]:
            prefect.api(
                "PATCH",
                f"/deployments/{d['id']}/schedules/{schedule['id']}",
                json={"active": False},
            )

    fanned = tmp / "fanned" / "stripe_sage.duckdb"
    fanned.parent.mkdir()
    # Both backfills check their rows with the Polars engine (tests/helpers/business.py
    # ``ACCOUNTING_QUALITY``): this test is about the fan-out, not about quality.
    worker_env = ops_env(
        env,
        fanned,
        BACKFILL_DIR=str(tmp / "shared-backfill"),
        QUALITY_ENGINE=ACCOUNTING_QUALITY,
    )
    # Each worker runs at most 2 flow runs at a time: the parent backfill and its four groups
    # of windows cannot all land on the worker that polls first.
    workers = [
        prefect.start_worker(POOL, worker_env, tmp / f"worker-{i}.log", "--limit", "2")
        for i in range(2)
    ]
    backfill_id = next(d["id"] for d in deployments if d["name"] == "backfill")
    prefect.api(
        "POST",
        f"/deployments/{backfill_id}/create_flow_run",
        json={
            "parameters": {
                "fan_out": "deployments",
                "workers": 4,
                "window_days": 7,
                "then_sync": False,
            }
        },
    )

    def backfill_done() -> dict | None:
        runs = prefect.flow_runs(sort="EXPECTED_START_TIME_DESC")
        parents = [r for r in runs if r["parameters"].get("fan_out") == "deployments"]
        final = [r for r in parents if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED")]
        return final[0] if final else None

    run = wait_for(backfill_done, 420, "the fanned-out backfill")
    assert run["state_type"] == "COMPLETED", (tmp / "worker-0.log").read_text()[-3000:]

    window_runs = [
        r for r in prefect.flow_runs() if r["parent_task_run_id"] and "windows" in r["parameters"]
    ]
    assert len(window_runs) == 4 and all(r["state_type"] == "COMPLETED" for r in window_runs)
    with duckdb.connect(str(fanned), read_only=True) as con:
        counts = con.execute(
            "SELECT counts FROM ops.runs WHERE flow = 'backfill' AND status = 'completed'"
        ).fetchall()
    recorded = json.loads(counts[0][0])
    worker_pids = {w.pid for w in workers}
    # Both workers ran the backfill's flow runs (each run's parent process is its worker).
    hosts = {recorded["host"], *recorded["window_hosts"]}
    assert hosts == worker_pids, (recorded["host"], recorded["window_hosts"], worker_pids)

    # The single-process reference: the same backfill with threads, in one process.
    single = tmp / "single" / "stripe_sage.duckdb"
    single.parent.mkdir()
    done = subprocess.run(
        [
            str(BIN / "stripe-sage"),
            "backfill",
            "--fan-out",
            "threads",
            "--window-days",
            "7",
            "--no-sync",
        ],
        env={
            **os.environ,
            **prefect.env(),
            **ops_env(env, single, QUALITY_ENGINE=ACCOUNTING_QUALITY),
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    reference, result = table_contents(single), table_contents(fanned)
    for table in reference:
        assert reference[table], f"{table} is empty in the single-process run"
        assert result[table] == reference[table], table
