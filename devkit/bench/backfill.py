"""``stripe-sage bench backfill``: the windowed backfill in one process (threads) against the
same backfill fanned out to a 2-worker Dask cluster, on one generated business; then the
analysts' snapshot publish on the result.

Each fan-out runs as its own ``stripe-sage backfill --no-sync`` process with a fresh DuckDB
file; wall time is that process's, peak RSS is the highest sum over its process tree (the
Dask scheduler and workers included), sampled every 0.2 s, and the flow's own stage timings
come from ``ops.runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import psutil

from devkit.bench import END
from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY


class TreeSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak_mb = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stopped.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += p.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak_mb = max(self.peak_mb, total / 2**20)
            time.sleep(self.every)


def run_backfill(fan_out: str, env: dict[str, str], args: argparse.Namespace, log: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "stripe_sage.cli.main",
        "backfill",
        "--fan-out",
        fan_out,
        "--workers",
        str(args.workers),
        # The business ends on a fixed day (bench.END), before today; customers may predate
        # its first charge by a long way: a wide margin, so every run reads the same objects.
        "--days",
        str(int((time.time() - END) / 86_400) + args.days + 3 * 365),
        "--no-sync",
    ]
    t = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stopped.set()
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"backfill --fan-out {fan_out} failed ({rc}); see {log}")
    with duckdb.connect(env["STAGING_DB"], read_only=True) as con:
        counts = json.loads(
            con.execute("SELECT counts FROM ops.runs WHERE flow = 'backfill'").fetchall()[0][0]
        )
        objects = con.execute(
            "SELECT sum(n) FROM ("
            + " UNION ALL ".join(f"SELECT count(*) AS n FROM raw.{t}" for t in counts["merged"])
            + ")"
        ).fetchall()[0][0]
    return {
        "fan_out": fan_out,
        "wall_s": round(wall, 2),
        "peak_rss_tree_mb": round(sampler.peak_mb, 1),
        "stages_s": counts["timings"],
        "windows": counts["windows"],
        "processes": len(counts["processes"]),
        "objects": int(objects),
        "objects_per_s": round(int(objects) / wall, 1),
    }


def time_publish(db: Path, out: Path) -> dict[str, Any]:
    from stripe_sage.store.snapshot import publish
    from stripe_sage.store.staging import Staging

    with Staging(db) as st:
        t = time.perf_counter()
        path = publish(st, out, "bench")
        seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in path.parent.rglob("*") if f.is_file())
    return {"publish_s": round(seconds, 2), "snapshot_mb": round(size / 2**20, 1)}


def bench_backfill(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.bench import start_sandbox

    data = Path(args.out)
    data.mkdir(parents=True, exist_ok=True)
    proc, stripe_port, sage_port = start_sandbox(
        args.charges, only=None, rate_limit=args.rate_limit, data=data, days=args.days
    )
    report: dict[str, Any] = {
        "charges": args.charges,
        "days": args.days,
        "stripe_rate_limit": args.rate_limit,
        "client_rps_per_endpoint": args.client_rps,
        "runs": [],
    }
    try:
        for fan_out in args.fan_outs.split(","):
            db = data / f"backfill_{fan_out}.duckdb"
            for stale in data.glob(f"backfill_{fan_out}.duckdb*"):
                stale.unlink()
            env = {
                **os.environ,
                "STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}",
                "STRIPE_API_KEY": SANDBOX_STRIPE_KEY,
                "SAGEPRO_BASE_URL": f"http://127.0.0.1:{sage_port}",
                "SAGEPRO_API_KEY": SANDBOX_SAGE_KEY,
                "STAGING_DB": str(db),
                "STRIPE_MAX_RPS": str(args.client_rps),
                "PREFECT_HOME": str(Path(".prefect").resolve()),
                "PREFECT_LOGGING_LEVEL": "WARNING",
            }
            result = run_backfill(fan_out, env, args, data / f"backfill_{fan_out}.log")
            result.update(time_publish(db, data / f"snapshot_{fan_out}"))
            report["runs"].append(result)
            print(json.dumps(result), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"\nbackfill of {args.charges:,} charges over {args.days} days")
    print(f"{'fan-out':<10}{'wall s':>9}{'objects/s':>11}{'peak RSS MiB':>14}  stages (s)")
    for r in report["runs"]:
        print(
            f"{r['fan_out']:<10}{r['wall_s']:>9}{r['objects_per_s']:>11}"
            f"{r['peak_rss_tree_mb']:>14}  {r['stages_s']}  publish {r['publish_s']} s"
        )
    return report
