"""``stripe-sage bench console``: the finance console's page times on a generated business.

One run of the main flow (under a mapping that holds sales naming an unknown ERP order, so
the exception pages have rows) publishes the snapshot; the console is then served by uvicorn
on loopback and each page is fetched ``--repeat`` times over HTTP after a login. Printed per
page: median and p95 milliseconds (the target is < 300 ms per page).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

from devkit.sandbox.runner import ThreadedServer

PAGES = (
    "/",
    "/exceptions",
    "/exceptions?state=dead",
    "/exceptions/{doc_key}",
    "/reconciliation",
    "/reconciliation/{payout}",
    "/reconciliation.csv",
    "/actions",
)


def bench_console(args: argparse.Namespace) -> dict[str, Any]:
    from devkit.bench import _sandboxes_for_flows
    from stripe_sage.mapping import default_mapping_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strict = out / "bench_console_mapping.yaml"
    strict.write_text(
        default_mapping_text().replace("unknown_erp_order: on_account", "unknown_erp_order: reject")
    )
    os.environ["MAPPING_FILE"] = str(strict)
    proc = _sandboxes_for_flows(args)
    try:
        from flows.stripe_to_sage import stripe_to_sage

        t = time.perf_counter()
        run = stripe_to_sage(trigger="bench")
        sync_s = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {
        "charges": args.charges,
        "sync_s": round(sync_s, 1),
        "posted": sum(run["load"]["posted"].values()),
        "dead": sum(run["load"]["dead"].values()),
        "pages_ms": time_pages(Path(os.environ["STAGING_DB"]).parent, repeat=args.repeat),
    }


def time_pages(data_dir: Path, *, repeat: int = 20) -> dict[str, dict[str, float]]:
    """Serve the console over ``data_dir``'s snapshot and time each page (milliseconds)."""
    from stripe_sage.console.app import ConsoleConfig, create_console
    from stripe_sage.console.store import ConsoleStore

    snapshot = data_dir / "snapshot" / "analytics.duckdb"
    store_path = data_dir / "bench_console.sqlite3"
    store_path.unlink(missing_ok=True)
    store = ConsoleStore(store_path)
    store.set_password("bench", "bench-password-1")
    with duckdb.connect(str(snapshot), read_only=True) as con:
        doc_key = con.sql("SELECT min(doc_key) FROM ops.unposted WHERE state = 'dead'").fetchall()
        payout = con.sql("SELECT min(payout) FROM ops.reconciliation").fetchall()
    app = create_console(ConsoleConfig(store=store, snapshot=snapshot, env={}))
    results: dict[str, dict[str, float]] = {}
    with ThreadedServer(app) as srv, httpx.Client(base_url=srv.url) as client:
        login = client.get("/login").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', login)
        assert csrf, "no CSRF token on the login page"
        client.post(
            "/login", data={"user": "bench", "password": "bench-password-1", "csrf": csrf[1]}
        )
        for template in PAGES:
            path = template.format(doc_key=doc_key[0][0], payout=payout[0][0])
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                r = client.get(path)
                times.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
            times.sort()
            results[template] = {
                "median": round(statistics.median(times), 1),
                "p95": round(times[max(0, int(len(times) * 0.95) - 1)], 1),
                "bytes": len(r.content),
            }
            print(
                f"  {template:<28} median {results[template]['median']:>7.1f} ms  "
                f"p95 {results[template]['p95']:>7.1f} ms",
                flush=True,
            )
    return results
