"""Benchmarks anyone can rerun: ``stripe-sage bench sandbox|pipeline``. They print figures and
write them as JSON under ``bench-results/``; nothing here is a timed test.

The systems under measurement run in their own processes, so each RSS figure is that
process's own peak (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox.runner import free_port
from stripe_sage.metrics import peak_rss_mb
from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY

END = 1_782_777_600  # a fixed business end: reruns measure the same data


def start_sandbox(
    charges: int,
    *,
    only: str | None,
    rate_limit: float,
    data: Path,
    days: int,
    sage_rate_limit: float = 0.0,
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Both sandboxes (or ``only="stripe"``) in their own process, on free ports."""
    stripe_port, sage_port = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "stripe_sage.cli.main",
        "sandbox",
        "--charges",
        str(charges),
        "--days",
        str(days),
        "--end",
        "2026-06-30",
        "--stripe-port",
        str(stripe_port),
        "--sage-port",
        str(sage_port),
        "--rate-limit",
        str(rate_limit),
        "--sage-db",
        str(data / "bench_sage.sqlite3"),
    ]
    if sage_rate_limit and only != "stripe":
        cmd += ["--sage-rate-limit", str(sage_rate_limit)]
    if only:
        cmd += ["--only", only]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{stripe_port if only != 'sage' else sage_port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/openapi.json", timeout=1)
            return proc, stripe_port, sage_port
        except httpx.HTTPError:
            if proc.poll() is not None:
                raise RuntimeError("the sandbox exited during start-up") from None
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the sandbox did not start")


def bench_sandbox(args: argparse.Namespace) -> dict[str, Any]:
    """Objects/s served paging charges with limit=100, and the sandbox's peak RSS."""
    data = Path(args.out)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    proc, port, _ = start_sandbox(
        args.charges, only="stripe", rate_limit=0, data=data, days=args.days
    )
    startup = time.perf_counter() - t0
    result: dict[str, Any] = {"charges": args.charges, "startup_s": round(startup, 2)}
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            timeout=60,
            headers={"Authorization": f"Bearer {SANDBOX_STRIPE_KEY}"},
        ) as c:
            result["rss_after_start_mb"] = peak_rss_mb(proc.pid)
            for resource, expand in (("charges", None), ("charges", "data.balance_transaction")):
                n, pages, t = 0, 0, time.perf_counter()
                params: dict[str, Any] = {"limit": 100}
                if expand:
                    params["expand[]"] = expand
                limit_objects = args.max_objects or args.charges
                while n < limit_objects:
                    page = c.get(f"/v1/{resource}", params=params).json()
                    n += len(page["data"])
                    pages += 1
                    if not page["has_more"]:
                        break
                    params["starting_after"] = page["data"][-1]["id"]
                dt = time.perf_counter() - t
                key = resource + (f"+{expand}" if expand else "")
                result[key] = {
                    "objects": n,
                    "pages": pages,
                    "seconds": round(dt, 2),
                    "objects_per_s": round(n / dt),
                }
            for other in ("balance_transactions", "events", "refunds", "invoices", "payouts"):
                c.get(f"/v1/{other}", params={"limit": 100})
            result["peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return result


def _sandboxes_for_flows(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """Both sandboxes in their own process, fresh state, and this process's settings and
    local Prefect pointed at them (flows run in this process)."""
    data = Path(args.out)
    data.mkdir(parents=True, exist_ok=True)
    for name in ("bench_sage.sqlite3", "bench_stripe_sage.duckdb"):
        (data / name).unlink(missing_ok=True)
    proc, stripe_port, sage_port = start_sandbox(
        args.charges, only=None, rate_limit=args.rate_limit, data=data, days=args.days
    )
    os.environ.update(
        {
            "STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}",
            "STRIPE_API_KEY": SANDBOX_STRIPE_KEY,
            "SAGEPRO_BASE_URL": f"http://127.0.0.1:{sage_port}",
            "SAGEPRO_API_KEY": SANDBOX_SAGE_KEY,
            "STAGING_DB": str(data / "bench_stripe_sage.duckdb"),
            "STRIPE_MAX_RPS": str(args.client_rps),
            "SAGE_CONCURRENCY": str(args.sage_concurrency),
        }
    )
    from stripe_sage.cli.commands import prefect_defaults

    prefect_defaults()
    return proc


def bench_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """A full first run and a no-change run of the main flow, per stage."""
    proc = _sandboxes_for_flows(args)
    from flows.stripe_to_sage import stripe_to_sage

    out: dict[str, Any] = {
        "charges": args.charges,
        "stripe_rate_limit": args.rate_limit,
        "client_rps_per_endpoint": args.client_rps,
    }
    try:
        for label in ("first_run", "no_change_run"):
            t = time.perf_counter()
            r = stripe_to_sage(trigger="bench")
            out[label] = {
                "wall_s": round(time.perf_counter() - t, 2),
                "stages_s": {k: round(v, 2) for k, v in r["timings"].items()},
                "peak_rss_mb_after_stage": r["peak_rss_mb"],
                "extracted": {s: x["listed"] for s, x in r["extract"].items()},
                "posted": r["load"]["posted"],
                "dead": r["load"]["dead"],
                "status": r["status"],
            }
        out["sandbox_peak_rss_mb"] = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def bench_receiver(args: argparse.Namespace) -> dict[str, Any]:
    """Acknowledgement latency of the webhook receiver (its own process, durable inbox) under
    a steady ``--rate`` events/s for ``--seconds`` from a loopback load generator."""
    import json as _json
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    from devkit.sandbox.stripe_app import sign_payload

    data = Path(args.out)
    data.mkdir(parents=True, exist_ok=True)
    inbox = data / "bench_inbox.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(str(inbox) + suffix).unlink(missing_ok=True)
    port, secret = free_port(), "whsec_bench_receiver"
    env = {**os.environ, "WEBHOOK_INBOX": str(inbox), "STRIPE_WEBHOOK_SECRET": secret}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stripe_sage.cli.main", "webhooks", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/stripe/webhook"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError("receiver did not start") from None
                time.sleep(0.2)
        total = int(args.rate * args.seconds)
        latencies: list[float] = []
        errors = 0
        client = httpx.Client(timeout=10, limits=httpx.Limits(max_connections=32))

        def send(i: int, at: float) -> float | None:
            body = _json.dumps(
                {
                    "id": f"evt_bench_{i:08d}",
                    "object": "event",
                    "type": "charge.succeeded",
                    "created": int(time.time()),
                    "data": {"object": {"id": f"ch_bench_{i}", "object": "charge"}},
                }
            ).encode()
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = time.perf_counter()
            r = client.post(
                url,
                content=body,
                headers={
                    "Stripe-Signature": sign_payload(body, secret),
                    "Content-Type": "application/json",
                },
            )
            return time.perf_counter() - t if r.status_code == 200 else None

        start = time.monotonic() + 0.5
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(send, i, start + i / args.rate) for i in range(total)]
            for f in futures:
                v = f.result()
                if v is None:
                    errors += 1
                else:
                    latencies.append(v)
        elapsed = time.monotonic() - start
        client.close()
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        stored = int(httpx.get(f"http://127.0.0.1:{port}/healthz").json()["stored"])
        return {
            "rate_per_s": args.rate,
            "seconds": args.seconds,
            "sent": total,
            "acknowledged": len(latencies),
            "errors": errors,
            "stored": stored,
            "achieved_rate_per_s": round(total / elapsed, 1),
            "ack_p50_ms": round(q[49] * 1000, 2),
            "ack_p99_ms": round(q[98] * 1000, 2),
            "ack_max_ms": round(max(latencies) * 1000, 2),
            "receiver_peak_rss_mb": peak_rss_mb(proc.pid),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bench_reconcile(args: argparse.Namespace) -> dict[str, Any]:
    """The ``reconcile_payouts`` flow on a business with about ``--days`` daily payouts:
    extract payouts and balance transactions, itemise every payout, post its journal,
    report."""
    proc = _sandboxes_for_flows(args)
    from flows.reconcile_payouts import reconcile_payouts

    try:
        t = time.perf_counter()
        r = reconcile_payouts(trigger="bench")
        wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "charges": args.charges,
        "days": args.days,
        "wall_s": round(wall, 2),
        "payouts_itemised": r["payouts_itemised"],
        "posted": r["load"]["posted"],
        "dead": r["load"]["dead"],
        "reconciliation": r["reconciliation"]["payouts"],
        "clearing": r["reconciliation"]["clearing"],
        "peak_rss_mb": peak_rss_mb(),
    }


def _realtime(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.bench.realtime import bench_during_sync, bench_realtime

    if args.during_sync:
        return bench_during_sync(charges=args.during_sync)
    return bench_realtime(
        events=args.events,
        burst=args.burst,
        mechanisms=not args.no_mechanisms,
    )


def _backfill(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.bench.backfill import bench_backfill

    return bench_backfill(args)


def _console(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.bench.console import bench_console

    return bench_console(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "crash":
        from devkit.bench.crash import cmd_crash

        return cmd_crash(args)
    if args.what in ("compare", "scale"):
        from devkit.bench import compare as bench_compare

        return (
            bench_compare.bench_compare if args.what == "compare" else bench_compare.bench_scale
        )(args)
    fn = {
        "sandbox": bench_sandbox,
        "pipeline": bench_pipeline,
        "receiver": bench_receiver,
        "realtime": _realtime,
        "reconcile": bench_reconcile,
        "backfill": _backfill,
        "console": _console,
    }[args.what]
    result = fn(args)
    text = json.dumps(result, indent=2)
    print(text)
    out = Path(args.out) / f"bench_{args.what}_{args.charges}.json"
    out.write_text(text)
    print(f"written to {out}")
    return 0
