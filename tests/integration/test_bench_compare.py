"""The benchmark runs end to end (a smoke test, never timed), and the Sage client's pacing
keeps it under the sandbox's rate limit."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI

from stripe_sage.sage.client import RequestPacer, SageProClient
from tests.helpers.sage import (
    API_KEY,
    BASE_URL,
    AppFactory,
    clock_fixture,
    make_sage_app_fixture,
    sage_db_fixture,
)

pytestmark = pytest.mark.integration
__all__ = ["clock_fixture", "make_sage_app_fixture", "sage_db_fixture"]

CHARGES = 120  # small: a smoke test of every contender and stage, never timed
STAGES = ("extract", "stage", "itemise", "quality", "transform", "plan", "load")


def test_bench_compare_smoke(tmp_path: Path) -> None:
    """``bench compare`` at a small size: floor, dlt and ours read the same objects, every
    stage of ours is there with a positive time, and the JSON and chart are written."""
    out = tmp_path / "bench"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "stripe_sage.cli.main",
            "bench",
            "compare",
            "--charges",
            str(CHARGES),
            "--through",
            "load",
            "--rate-limit",
            "0",
            "--client-rps",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ours / floor" in run.stdout and "dlt / ours" in run.stdout
    report = json.loads((out / f"compare_{CHARGES}_load.json").read_text())
    assert (out / f"compare_{CHARGES}_load.png").stat().st_size > 0
    results = report["contenders"]
    assert set(results) == {"floor", "dlt", "ours"}
    for name, r in results.items():
        assert r["stages"], name
        for s in r["stages"]:
            assert s["seconds"] > 0, (name, s)
        assert r["process_peak_rss_mb"] > 0
    ours = {s["stage"]: s for s in results["ours"]["stages"]}
    assert tuple(ours) == STAGES
    for name in ("extract", "stage", "quality", "transform", "plan", "load"):
        assert ours[name]["rows"] > 0, name
    assert {s["stage"] for s in results["dlt"]["stages"]} == {"extract", "normalize", "load_duckdb"}
    # The same objects, stream by stream, whoever read them.
    objects = results["floor"]["objects"]
    assert sum(objects.values()) > CHARGES
    assert results["dlt"]["objects"] == objects
    assert results["ours"]["objects"] == objects
    summary = report["summary"]
    assert summary["counts_agree"] is True
    assert summary["ours_vs_floor"] > 0 and summary["dlt_vs_ours"] > 0
    # The generated business holds a few records Sage rejects by design (dead letters).
    assert summary["sage_load"]["posted"] > summary["sage_load"]["dead"]
    assert "sk_test" not in run.stdout and "sage_test" not in run.stdout


def test_pacer_spaces_requests_evenly_across_threads() -> None:
    now = [0.0]
    slept: list[float] = []
    pacer = RequestPacer(10, clock=lambda: now[0], sleep=slept.append)
    for _ in range(5):
        pacer.acquire()
    assert slept == pytest.approx([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError):
        RequestPacer(0)


def test_paced_client_stays_under_the_sage_rate_limit(make_sage_app: AppFactory) -> None:
    """Four threads through a client paced at the sandbox's limit: no 429, at the limit."""
    from starlette.testclient import TestClient

    rps, n = 40.0, 60
    app: FastAPI = make_sage_app(rate_limit_rps=rps)
    with TestClient(app) as http:
        client = SageProClient(BASE_URL, API_KEY, http_client=http, max_rps=rps)
        done = iter(range(n))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if next(done, None) is None:
                        return
                client.gl_accounts()

        # Start after the server's bucket has refilled from the app's start-up.
        time.sleep(1.0)
        t = time.monotonic()
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - t
    assert client.stats.rate_limited == 0
    assert client.stats.attempts == n
    assert (n - 1) / rps * 0.95 <= elapsed
