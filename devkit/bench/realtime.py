"""``stripe-sage bench realtime``: event-to-Sage-document latency for single events.

Starts a Prefect server (SQLite, its own home), both sandboxes on loopback, the webhook
receiver and the served ``process-stripe-events`` deployment as their own processes, runs
the initial sync, then creates one charge at a time in the Stripe sandbox and times how
long until Sage holds its cash receipt.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.runner import free_port
from devkit.sandbox.stripe_business import BusinessConfig

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def bench_realtime(events: int = 10, charges: int = 200) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="stripe-sage-realtime-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    prefect_env = {
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_API_DATABASE_CONNECTION_URL": "sqlite+aiosqlite:///" + str(tmp / "prefect.db"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(args: list[str], env: dict[str, str], log: str) -> None:
        out = open(tmp / log, "ab")  # noqa: SIM115 - lives with the process
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=out, cwd=ROOT))

    pair = SandboxPair(
        BusinessConfig(seed=71, charges=charges, end=1_782_777_600), sage_db=tmp / "sage.sqlite3"
    )
    try:
        spawn(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            {**os.environ, **prefect_env},
            "server.log",
        )
        _wait(lambda: httpx.get(api + "/health", timeout=2).status_code == 200, 120, "Prefect")
        pair.start()
        receiver_port = free_port()
        env = {
            **os.environ,
            **prefect_env,
            "STRIPE_API_BASE": pair.stripe_url,
            "SAGEPRO_BASE_URL": pair.sage_url,
            "STAGING_DB": str(tmp / "staging_db.duckdb"),
            "WEBHOOK_INBOX": str(tmp / "inbox.sqlite3"),
            "STRIPE_MAX_RPS": "200",
        }
        subprocess.run(
            [str(BIN / "stripe-sage"), "sync"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=600,
        )
        spawn(
            [str(BIN / "stripe-sage"), "webhooks", "--port", str(receiver_port)],
            env,
            "receiver.log",
        )
        spawn(
            [
                sys.executable,
                str(ROOT / "deployments" / "serve.py"),
                "--only",
                "process-stripe-events",
            ],
            env,
            "runner.log",
        )
        _wait(
            lambda: httpx.get(f"http://127.0.0.1:{receiver_port}/healthz").status_code == 200,
            60,
            "the receiver",
        )
        stripe = httpx.Client(
            base_url=pair.stripe_url, headers={"Authorization": f"Bearer {pair.stripe_key}"}
        )
        sage = httpx.Client(
            base_url=pair.sage_url, headers={"Authorization": f"Bearer {pair.sage_key}"}
        )
        stripe.post(
            "/_sandbox/webhook_endpoints",
            json={
                "url": f"http://127.0.0.1:{receiver_port}/stripe/webhook",
                "secret": env.get("STRIPE_WEBHOOK_SECRET", "whsec_stripe_sage_sandbox"),
            },
        )
        customer = stripe.get("/v1/customers", params={"limit": 1}).json()["data"][0]["id"]
        latencies = []
        for i in range(events + 1):  # the first one also warms the runner up: not counted
            t0 = time.monotonic()
            charge = stripe.post(
                "/_sandbox/activity",
                json={"action": "charge", "customer": customer, "amount": 1000 + i},
            ).json()["id"]
            _wait(
                lambda charge=charge: sage.get(
                    "/api/v1/cashreceipts", params={"reference": charge}
                ).json()["data"],
                300,
                f"the receipt of {charge}",
            )
            if i:
                latencies.append(time.monotonic() - t0)
        q = (
            statistics.quantiles(latencies, n=20, method="inclusive")
            if len(latencies) > 1
            else latencies * 19
        )
        return {
            "single_events": len(latencies),
            "p50_s": round(statistics.median(latencies), 2),
            "p95_s": round(q[18], 2),
            "min_s": round(min(latencies), 2),
            "max_s": round(max(latencies), 2),
            "work_dir": str(tmp),
        }
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        pair.stop()
