"""``stripe-sage bench realtime``: how fast a Stripe event becomes a Sage document.

Starts a Prefect server (SQLite, its own home), both sandboxes on loopback, runs the initial
sync, then the webhook receiver and the real-time processor (``stripe-sage processor``) as
their own processes, the sandbox delivering signed webhooks as Stripe would. Then:

1. single events at 1/s: a charge is created in the Stripe sandbox each second and timed
   until Sage holds its cash receipt (p50, p95, max);
2. a burst of ``burst`` events, delivered with 30 % duplicates and shuffled: the time until
   the inbox is drained (every event processed: its documents posted, dead or waiting with
   a reason) and whether any Sage document exists twice;
3. throughout, a probe posts signed events to the receiver (about 50/s) and times its
   answers (ack p50/p99);
4. the processor's peak RSS (``VmHWM``) at the end;
5. what each Prefect mechanism costs per micro-batch (``devkit/bench/prefect_mechanisms.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.paging import sage_all
from devkit.sandbox.runner import free_port
from devkit.sandbox.stripe_app import sign_payload
from devkit.sandbox.stripe_business import BusinessConfig

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SECRET = "whsec_stripe_sage_sandbox"


def _wait(check: Any, timeout: float, what: str, every: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except httpx.HTTPError:
            pass
        time.sleep(every)
    raise RuntimeError(f"timed out waiting for {what}")


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


class AckProbe:
    """Signed ``balance.available`` events (stored by the receiver, routed to no stream by
    the processor) posted at ``rate``/s; the receiver's answer times."""

    def __init__(self, url: str, secret: str, rate: float = 50.0) -> None:
        self.url, self.secret, self.rate = url, secret, rate
        self.times: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        with httpx.Client(timeout=10) as client:
            while not self._stop.wait(1.0 / self.rate):
                n += 1
                body = json.dumps({
                    "id": f"evt_probe_{os.getpid()}_{n}", "object": "event",
                    "type": "balance.available", "created": int(time.time()),
                    "data": {"object": {"object": "balance", "available": []}},
                }).encode()  # fmt: skip
                t = time.perf_counter()
                try:
                    r = client.post(
                        self.url,
                        content=body,
                        headers={"Stripe-Signature": sign_payload(body, self.secret)},
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.times.append(time.perf_counter() - t)
                self.errors += 0 if ok else 1

    def __enter__(self) -> AckProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


@dataclass
class _Stack:
    """What a real-time bench runs against: both sandboxes, a Prefect server, the receiver
    (and, once started, the processor), each its own process, in ``tmp``."""

    tmp: Path
    pair: SandboxPair
    env: dict[str, str]
    hook: str
    secret: str
    receiver_port: int
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=out, stderr=out, cwd=ROOT)
        return self.procs[name]

    def clients(self) -> tuple[httpx.Client, httpx.Client]:
        pair = self.pair
        stripe = httpx.Client(
            base_url=pair.stripe_url, headers={"Authorization": f"Bearer {pair.stripe_key}"}
        )
        sage = httpx.Client(
            base_url=pair.sage_url, headers={"Authorization": f"Bearer {pair.sage_key}"}
        )
        return stripe, sage


@contextmanager
def _stack(charges: int, initial_sync: bool) -> Iterator[_Stack]:
    """Start everything (the initial sync first, when asked), stop it all on leaving."""
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
    pair = SandboxPair(
        BusinessConfig(seed=71, charges=charges, end=1_782_777_600), sage_db=tmp / "sage.sqlite3"
    )
    receiver_port = free_port()
    stack = _Stack(
        tmp,
        pair,
        {**os.environ, **prefect_env},
        f"http://127.0.0.1:{receiver_port}/stripe/webhook",
        os.environ.get("STRIPE_WEBHOOK_SECRET", SECRET),
        receiver_port,
    )
    try:
        stack.spawn(
            "server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        )
        _wait(lambda: httpx.get(api + "/health", timeout=2).status_code == 200, 120, "Prefect")
        pair.start()
        stack.env.update(
            STRIPE_API_BASE=pair.stripe_url,
            SAGEPRO_BASE_URL=pair.sage_url,
            STAGING_DB=str(tmp / "staging_db.duckdb"),
            WEBHOOK_INBOX=str(tmp / "inbox.sqlite3"),
            STRIPE_MAX_RPS="200",
        )
        if initial_sync:
            subprocess.run(
                [str(BIN / "stripe-sage"), "sync"],
                env=stack.env, cwd=ROOT, check=True, capture_output=True, timeout=600,
            )  # fmt: skip
        stack.spawn(
            "receiver", [str(BIN / "stripe-sage"), "webhooks", "--port", str(receiver_port)]
        )
        health = f"http://127.0.0.1:{receiver_port}/healthz"
        _wait(lambda: httpx.get(health).status_code == 200, 60, "the receiver", 0.2)
        yield stack
    finally:
        for p in reversed(list(stack.procs.values())):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        pair.stop()


def _ack_figures(probe: AckProbe) -> dict[str, Any]:
    acks = probe.times
    return {
        "requests": len(acks),
        "errors": probe.errors,
        "p50_ms": round(statistics.median(acks) * 1000, 1),
        "p99_ms": round(_quantile(acks, 0.99) * 1000, 1),
    }


def bench_realtime(
    events: int = 20,
    charges: int = 200,
    burst: int = 1000,
    mechanisms: bool = True,
) -> dict[str, Any]:
    with _stack(charges, initial_sync=True) as stack:
        result: dict[str, Any] = {"work_dir": str(stack.tmp)}
        processor = stack.spawn("processor", [str(BIN / "stripe-sage"), "processor"])
        stripe, sage = stack.clients()
        hook, secret = stack.hook, stack.secret
        stripe.post("/_sandbox/webhook_endpoints", json={"url": hook, "secret": secret})
        customer = stripe.get("/v1/customers", params={"limit": 1}).json()["data"][0]["id"]

        def receipt(charge: str) -> bool:
            r = sage.get("/api/v1/cashreceipts", params={"reference": charge})
            return bool(r.json()["data"])

        latencies: list[float] = []
        with AckProbe(hook, secret) as probe:
            # The first one also waits for the processor's flow run to start: not counted.
            for i in range(events + 1):
                t0 = time.monotonic()
                charge = stripe.post(
                    "/_sandbox/activity",
                    json={"action": "charge", "customer": customer, "amount": 1000 + i},
                ).json()["id"]
                _wait(lambda charge=charge: receipt(charge), 300, f"the receipt of {charge}")
                if i:
                    latencies.append(time.monotonic() - t0)
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))  # 1 event a second
            result["single_events"] = _latency_figures(latencies)
            if burst:
                result["burst"] = _burst(
                    stripe, sage, hook, secret, Path(stack.env["WEBHOOK_INBOX"]), burst
                )
        result["receiver_ack"] = _ack_figures(probe)
        result["processor_peak_rss_mb"] = _peak_rss_mb(processor.pid)
        if mechanisms:
            from devkit.bench.prefect_mechanisms import measure

            result["prefect_mechanisms"] = measure(stack.env)
        return result


def _latency_figures(latencies: list[float]) -> dict[str, Any]:
    return {
        "events": len(latencies),
        "p50_s": round(statistics.median(latencies), 3),
        "p95_s": round(_quantile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3),
    }


def bench_during_sync(charges: int = 10_000) -> dict[str, Any]:
    """Single events at 1/s while the first scheduled sync of a ``charges`` business runs
    (the processor hands it the writer; the sync serves the events meanwhile): each timed
    from the charge's creation until Sage holds its cash receipt, for the events created
    while the sync ran; the sync's own duration and what it served."""
    with _stack(charges, initial_sync=False) as stack:
        result: dict[str, Any] = {"work_dir": str(stack.tmp), "charges": charges}
        stripe, sage = stack.clients()
        hook, secret = stack.hook, stack.secret
        stripe.post("/_sandbox/webhook_endpoints", json={"url": hook, "secret": secret})
        # A customer of its own, posted by the processor before the sync starts: the timed
        # charges' receipts then depend on nothing the sync itself still has to post.
        customer = stripe.post(
            "/v1/customers", data={"name": "Realtime Bench", "email": "bench@example.com"}
        ).json()["id"]
        processor = stack.spawn("processor", [str(BIN / "stripe-sage"), "processor"])
        _wait(
            lambda: stripe.get(f"/v1/customers/{customer}").json()["metadata"].get(
                "sage_customer_id"
            ),
            300, "the bench's customer in Sage", 0.2,
        )  # fmt: skip
        found: dict[str, float] = {}
        created: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set() or len(found) < len(created):
                for charge in [c for c in list(created) if c not in found]:
                    try:
                        r = sage.get("/api/v1/cashreceipts", params={"reference": charge})
                        if r.json()["data"]:
                            found[charge] = time.monotonic()
                    except httpx.HTTPError:
                        pass
                time.sleep(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        with AckProbe(hook, secret) as probe:
            started = time.monotonic()
            sync = subprocess.Popen(
                [str(BIN / "stripe-sage"), "sync"],
                env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            poller.start()
            i = 0
            while sync.poll() is None:
                t0 = time.monotonic()
                charge = stripe.post(
                    "/_sandbox/activity",
                    json={"action": "charge", "customer": customer, "amount": 2000 + i},
                ).json()["id"]
                created[charge] = t0
                i += 1
                time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))  # 1 event a second
            out = sync.communicate()[0].decode()
            sync_s = time.monotonic() - started
            stop.set()
            poller.join(300)
        missing = [c for c in created if c not in found]
        latencies = [found[c] - t for c, t in created.items() if c in found]
        result["sync"] = {
            "exit_code": sync.returncode,
            "seconds": round(sync_s, 1),
            "served": next((ln.strip() for ln in out.splitlines() if "served" in ln), None),
        }
        slowest = sorted(
            (
                (round(t - started, 1), round(found[c] - t, 2))
                for c, t in created.items()
                if c in found
            ),
            key=lambda x: -x[1],
        )[:10]
        result["events_during_sync"] = {
            **_latency_figures(latencies),
            "missing": len(missing),
            "slowest": [{"created_at_s": a, "latency_s": b} for a, b in slowest],
        }
        result["receiver_ack"] = _ack_figures(probe)
        result["processor_peak_rss_mb"] = _peak_rss_mb(processor.pid)
        (stack.tmp / "sync.out").write_text(out)
        return result


def _inbox(path: Path, sql: str, *args: Any) -> Any:
    """A read of the receiver's inbox (SQLite in WAL mode: readers never block it)."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchone()
    finally:
        con.close()


def _burst(
    stripe: httpx.Client, sage: httpx.Client, hook: str, secret: str, inbox: Path, n: int
) -> dict[str, Any]:
    """``n`` new events delivered with 30 % duplicates, shuffled in windows of 50; timed from
    the first event created to the last one processed (``processed_at``: its documents
    posted, dead or waiting with a reason)."""
    collections = ("invoices", "cashreceipts", "creditmemos", "customers")
    before = {c: len(sage_all(sage, c)) for c in collections}
    not_probe = "event_id NOT LIKE 'evt_probe%'"
    (stored_before,) = _inbox(inbox, f"SELECT count(*) FROM inbox WHERE {not_probe}")
    stripe.delete("/_sandbox/webhook_endpoints")
    stripe.post(
        "/_sandbox/webhook_endpoints",
        json={"url": hook, "secret": secret, "duplicate_rate": 0.3, "shuffle_window": 50},
    )
    events_before = stripe.get("/_sandbox/info").json()["counts"]["events"]
    started = time.time()
    while stripe.get("/_sandbox/info").json()["counts"]["events"] - events_before < n:
        stripe.post("/_sandbox/activity", json={"action": "live_step", "count": 50})
    stripe.post("/_sandbox/webhooks/flush")
    created = stripe.get("/_sandbox/info").json()["counts"]["events"] - events_before
    _wait(
        lambda: _inbox(inbox, f"SELECT count(*) FROM inbox WHERE {not_probe}")[0]
        >= stored_before + created,
        600, "every event of the burst stored", 0.1,
    )  # fmt: skip
    _wait(
        lambda: _inbox(
            inbox, f"SELECT count(*) = 0 FROM inbox WHERE {not_probe} AND processed_at IS NULL"
        )[0],
        600, "the burst to be drained", 0.1,
    )  # fmt: skip
    last, dupes = _inbox(
        inbox,
        f"SELECT max(processed_at), sum(duplicates) FROM (SELECT * FROM inbox "
        f"WHERE {not_probe} ORDER BY rowid DESC LIMIT ?)",
        created,
    )
    drained = dt.datetime.fromisoformat(last).timestamp() - started
    after = {c: Counter(d.get("reference") for d in sage_all(sage, c)) for c in collections}
    twice = {c: sum(1 for r, k in refs.items() if r and k > 1) for c, refs in after.items()}
    return {
        "events_created": created,
        "duplicate_deliveries_ignored": int(dupes or 0),
        "time_to_last_document_s": round(drained, 2),
        "new_sage_documents": {c: sum(after[c].values()) - before[c] for c in collections},
        "documents_posted_twice": twice,
    }
