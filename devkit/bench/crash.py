"""``stripe-sage bench crash``: ``kill -9`` of ``stripe-sage sync`` at random points, each
followed at once by the next run, on the embedded default and/or a Prefect server.

Per mode: both sandboxes (Sage paced at ``--sage-rate-limit`` so the load lasts long enough
to be hit), then ``--kills`` runs each killed in a stage chosen in turn among extract, plan
and load (shuffled per round), at a random moment inside it (uniform over the stage's
expected duration, learnt from the runs so far); then one run left to finish. Printed per
kill point: the stage the run was in when killed, and how long the next run waited for the
DuckDB writer slot. At the end: duplicates and missing documents in Sage, counted from Sage's
own lists against the outbox and against Stripe's succeeded charges.

Issue 16's requirement: no run waits on a dead run's slot longer than 90 s; 0 duplicates,
0 missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import httpx
import psutil

from devkit.bench import start_sandbox
from devkit.sandbox.paging import sage_all, stripe_all
from devkit.sandbox.runner import free_port
from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY

BIN = Path(sys.executable).parent
MAX_WAIT_S = 90.0
# Log lines (Prefect's task-run logs at INFO) that mark where a run is: the stage entered.
MARKERS = (
    ("DuckDB writer slot acquired", "extract"),
    ("Task run 'extract-events", "stage+quality"),
    ("Task run 'quality-", "plan"),
    ("Task run 'plan-", "load"),
    ("Task run 'load-", "write-back"),
    ("Task run 'publish-snapshot", "finishing"),
)
TARGETS = ("extract", "plan", "load")


class Run:
    """One ``stripe-sage sync`` process; its log lines read as they come."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(BIN / "stripe-sage"), "sync"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.log = log.open("w")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))
            self.log.write(line)
        self.log.close()

    def stage(self) -> str:
        """The stage entered last, by the markers seen so far."""
        current = "starting"
        for _, line in list(self.lines):
            for text, stage in MARKERS:
                if text in line:
                    current = stage
        return current

    def entered(self, stage: str) -> float | None:
        text = next(t for t, s in MARKERS if s == stage)
        return next((at for at, line in list(self.lines) if text in line), None)

    def slot_wait(self) -> float | None:
        for _, line in list(self.lines):
            if "DuckDB writer slot acquired after" in line:
                return float(line.split("acquired after")[1].split()[0])
        return None

    def reclaims(self) -> list[str]:
        return [
            line.strip() for _, line in list(self.lines) if "writer slot" in line and "gone" in line
        ]


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _start_prefect_server(home: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    port = free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///" + str(home / "prefect.db"),
        "PREFECT_UI_ENABLED": "false",
    }
    home.mkdir(parents=True, exist_ok=True)
    out = (home / "server.log").open("ab")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **env},
        stdout=out,
        stderr=out,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(env["PREFECT_API_URL"] + "/health", timeout=2).status_code == 200:
                return proc, env
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the Prefect server did not start")


def check_sage(sage_url: str, stripe_url: str, staging: Path) -> dict[str, Any]:
    """Duplicates: two Sage documents of a kind with one Stripe reference. Missing: outbox
    documents not dead (so due in Sage) that Sage lacks, outbox documents still pending, and
    succeeded Stripe charges with neither a cash receipt in Sage nor a dead letter."""
    with duckdb.connect(str(staging), read_only=True) as con:
        rows = con.execute(
            "SELECT collection, doc_type, status, payload->>'reference', stripe_id "
            "FROM sage.outbox WHERE doc_type <> 'customer_link'"
        ).fetchall()
    sage = httpx.Client(
        base_url=sage_url, headers={"Authorization": f"Bearer {SANDBOX_SAGE_KEY}"}, timeout=60
    )
    in_sage: dict[str, Counter[str]] = {}
    with sage:
        for collection in sorted({r[0] for r in rows}):
            in_sage[collection] = Counter(
                str(d["reference"]) for d in sage_all(sage, collection) if d.get("reference")
            )
    duplicates = {c: sum(n - 1 for n in refs.values() if n > 1) for c, refs in in_sage.items()}
    missing = [
        f"{doc_type}:{stripe_id}"
        for collection, doc_type, status, ref, stripe_id in rows
        if status != "dead" and ref and in_sage.get(collection, Counter())[ref] == 0
    ]
    pending = sum(1 for r in rows if r[2] == "pending")
    dead_receipts = {r[4] for r in rows if r[1] == "cash_receipt" and r[2] == "dead"}
    with httpx.Client(
        base_url=stripe_url, headers={"Authorization": f"Bearer {SANDBOX_STRIPE_KEY}"}, timeout=60
    ) as stripe:
        succeeded = [
            c["id"] for c in stripe_all(stripe, "/v1/charges") if c["status"] == "succeeded"
        ]
    receipts = in_sage.get("cashreceipts", Counter())
    charges_without_receipt = [c for c in succeeded if receipts[c] == 0 and c not in dead_receipts]
    return {
        "sage_documents": {c: sum(refs.values()) for c, refs in in_sage.items()},
        "duplicates": sum(duplicates.values()),
        "duplicates_by_collection": duplicates,
        "missing": len(missing) + len(charges_without_receipt),
        "missing_examples": (missing + charges_without_receipt)[:10],
        "outbox_pending": pending,
        "outbox_dead": sum(1 for r in rows if r[2] == "dead"),
    }


def crash_mode(mode: str, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    data = Path(args.out).resolve() / f"crash-{mode}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    sandbox, stripe_port, sage_port = start_sandbox(
        args.charges,
        only=None,
        rate_limit=args.rate_limit,
        data=data,
        days=args.days,
        sage_rate_limit=args.sage_rate_limit or 50.0,
    )
    server: subprocess.Popen[bytes] | None = None
    env = {
        **os.environ,
        "STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}",
        "STRIPE_API_KEY": SANDBOX_STRIPE_KEY,
        "SAGEPRO_BASE_URL": f"http://127.0.0.1:{sage_port}",
        "SAGEPRO_API_KEY": SANDBOX_SAGE_KEY,
        "STAGING_DB": str(data / "stripe_sage.duckdb"),
        "WEBHOOK_INBOX": str(data / "inbox.sqlite3"),
        "STRIPE_MAX_RPS": str(args.client_rps),
        "PREFECT_HOME": str(data / "prefect"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # A loaded machine can take longer than Prefect's 20 s to start its temporary server.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PREFECT_API_URL", None)
    if mode == "server":
        server, server_env = _start_prefect_server(data / "prefect-server")
        env.update(server_env)
    # Expected seconds inside each target stage, learnt from the runs that pass through it.
    expected = {"extract": 1.0, "plan": 0.4, "load": 15.0}
    points: list[dict[str, Any]] = []
    orphans = 0
    order: list[str] = []
    try:
        previous: dict[str, Any] | None = None
        attempts = 0
        while len(points) < args.kills and attempts < args.kills * 3:
            attempts += 1
            if not order:
                order = list(TARGETS)
                rng.shuffle(order)
            target = order[0]
            run = Run(env, data / f"run-{attempts:02d}.log")
            # Wait for the target stage (or the run's end), then a random moment inside it.
            deadline = time.monotonic() + 900
            while run.entered(target) is None and run.proc.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if previous is not None:
                previous["next_wait_s"] = run.slot_wait()
                previous = None
            if run.proc.poll() is not None:
                points.append({"target": target, "stage": "finished", "killed": False})
                order.pop(0)
                continue
            time.sleep(rng.uniform(0, 0.9 * expected[target]))
            stage = run.stage()
            children = _children(run.proc.pid)
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait()
            run.reader.join(10)
            for child in children:  # the killed run's temporary Prefect server, orphaned
                if child.is_running():
                    orphans += 1
                    child.kill()
            point = {
                "target": target,
                "stage": stage,
                "killed": True,
                "at_s": round(time.monotonic() - run.started, 1),
                "reclaims": run.reclaims(),
            }
            points.append(point)
            previous = point
            order.pop(0)
            print(f"  [{mode}] kill {len(points)}: in {stage} (aimed at {target})", flush=True)
        # The last run is left to finish.
        final = Run(env, data / "run-final.log")
        rc = final.proc.wait(timeout=1800)
        final.reader.join(10)
        if previous is not None:
            previous["next_wait_s"] = final.slot_wait()
        checked = check_sage(
            f"http://127.0.0.1:{sage_port}",
            f"http://127.0.0.1:{stripe_port}",
            data / "stripe_sage.duckdb",
        )
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=30)
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    killed = [p for p in points if p["killed"]]
    waits = [p["next_wait_s"] for p in killed if p.get("next_wait_s") is not None]
    return {
        "mode": mode,
        "kills": len(killed),
        "stages_killed": dict(Counter(p["stage"] for p in killed)),
        "points": points,
        "max_next_wait_s": max(waits) if waits else None,
        "final_run_exit": rc,
        "final_run_wait_s": final.slot_wait(),
        "orphaned_prefect_servers": orphans,
        **checked,
        "ok": bool(
            len(killed) >= args.kills
            and len(waits) == len(killed)
            and max(waits) <= MAX_WAIT_S
            and checked["duplicates"] == 0
            and checked["missing"] == 0
        ),
    }


def bench_crash(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    modes = ["embedded", "server"] if args.prefect == "both" else [args.prefect]
    results = {mode: crash_mode(mode, args, rng) for mode in modes}
    for mode, r in results.items():
        print(f"\n== crash recovery, {mode} Prefect: {r['kills']} kills")
        print(f"  {'#':>3} {'killed in':<14} {'aimed at':<8} {'at s':>6} {'next wait s':>11}")
        for i, p in enumerate((p for p in r["points"] if p["killed"]), 1):
            wait = p.get("next_wait_s")
            print(
                f"  {i:>3} {p['stage']:<14} {p['target']:<8} {p['at_s']:>6} "
                f"{'-' if wait is None else f'{wait:.1f}':>11}"
            )
        print(
            f"  max wait {r['max_next_wait_s']} s (limit {MAX_WAIT_S:.0f}); final run exit "
            f"{r['final_run_exit']}; Sage duplicates {r['duplicates']}, missing {r['missing']} "
            f"(outbox pending {r['outbox_pending']}, dead {r['outbox_dead']}); orphaned "
            f"temporary Prefect servers {r['orphaned_prefect_servers']}; "
            f"{'OK' if r['ok'] else 'FAILED'}"
        )
    return {"charges": args.charges, "seed": args.seed, **results}


def cmd_crash(args: argparse.Namespace) -> int:
    result = bench_crash(args)
    out = Path(args.out) / f"bench_crash_{args.charges}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written to {out}")
    return 0 if all(r["ok"] for k, r in result.items() if isinstance(r, dict)) else 1
