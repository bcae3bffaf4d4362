"""Real time: the Stripe sandbox delivers signed webhooks to the receiver (its own process),
which posts a Prefect event to a real Prefect server (started here); the served
``process-stripe-events`` deployment's trigger turns it into a run that posts to Sage.
No scheduled run is involved after the initial backfill."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox.runner import free_port
from tests.helpers.business import (
    Env,
    expected_documents,
    make_env,
    outbox,
    plain_customer,
    product_env,
    sage_all,
)
from tests.helpers.servers import BIN, ROOT, Prefect, spawn, wait_for

pytestmark = pytest.mark.e2e


class Realtime:
    def __init__(self, env: Env, prefect: Prefect, tmp: Path) -> None:
        self.env, self.prefect, self.tmp = env, prefect, tmp
        self.receiver_port = free_port()
        self.inbox = tmp / "inbox.sqlite3"
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def child_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.prefect.env(),
            **product_env(self.env, WEBHOOK_INBOX=str(self.inbox)),
        }

    def start_receiver(self) -> None:
        self.children["receiver"] = spawn(
            [str(BIN / "stripe-sage"), "webhooks", "--port", str(self.receiver_port)],
            self.child_env(),
            self.tmp / "receiver.log",
        )
        wait_for(lambda: self.receiver_health(), 60, "the webhook receiver")

    def receiver_health(self) -> dict[str, Any] | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.receiver_port}/healthz", timeout=2).json()
        except httpx.HTTPError:
            return None

    def start_runner(self) -> None:
        self.children["runner"] = spawn(
            [
                sys.executable,
                str(ROOT / "deployments" / "serve.py"),
                "--only",
                "process-stripe-events",
            ],
            self.child_env(),
            self.tmp / "runner.log",
        )

    def ensure_runner(self) -> None:
        if self.children["runner"].poll() is not None:
            self.start_runner()

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
                child.wait(timeout=30)


@pytest.fixture(scope="module")
def rt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Realtime]:
    tmp = tmp_path_factory.mktemp("realtime")
    mp = pytest.MonkeyPatch()
    env = make_env(tmp, charges=150, seed=53, monkeypatch=mp)
    prefect = Prefect(tmp / "prefect")
    prefect.start()
    realtime = Realtime(env, prefect, tmp)
    try:
        with env.pair:
            # The initial backfill, as a scheduled sync would have done it.
            subprocess.run(
                [str(BIN / "stripe-sage"), "sync"],
                env=realtime.child_env(),
                cwd=ROOT,
                check=True,
                capture_output=True,
                timeout=300,
            )
            realtime.start_receiver()
            realtime.start_runner()
            with env.stripe() as s:
                s.post(
                    "/_sandbox/webhook_endpoints",
                    json={
                        "url": f"http://127.0.0.1:{realtime.receiver_port}/stripe/webhook",
                        "secret": env.secrets[2],
                        "duplicate_rate": 0.3,
                        "shuffle_window": 20,
                        "retry_base": 0.2,
                    },
                )
            yield realtime
    finally:
        realtime.stop()
        prefect.stop()
        mp.undo()


def receipt_refs(env: Env) -> Counter[str]:
    with env.sage() as c:
        return Counter(r["reference"] for r in sage_all(c, "cashreceipts"))


def test_new_charge_becomes_a_sage_receipt_without_a_scheduled_run(rt: Realtime) -> None:
    with rt.env.stripe() as s:
        customer = plain_customer(s)
        t0 = time.monotonic()
        charge = s.post(
            "/_sandbox/activity", json={"action": "charge", "customer": customer, "amount": 4321}
        ).json()["id"]
        s.post("/_sandbox/webhooks/flush")
    wait_for(lambda: charge in receipt_refs(rt.env), 120, "the receipt of the new charge")
    print(f"\nevent-to-Sage-document latency: {time.monotonic() - t0:.1f} s")


def test_a_thousand_events_with_duplicates_and_shuffling_post_exactly_once(rt: Realtime) -> None:
    before = rt.receiver_health()["stored"]  # type: ignore[index]
    with rt.env.stripe() as s:
        while (
            s.get("/_sandbox/info").json()["counts"]["events"] - len(rt.env.pair.world.b.events)
            < 1000 + before
        ):
            s.post("/_sandbox/activity", json={"action": "live_step", "count": 50})
        s.post("/_sandbox/webhooks/flush")
        total = s.get("/_sandbox/info").json()["counts"]["events"] - len(rt.env.pair.world.b.events)
    # At least every event of the burst (runs meanwhile write Sage numbers back into Stripe
    # metadata, which makes *.updated events of their own).
    wait_for(
        lambda: (rt.receiver_health() or {}).get("stored", 0) >= total, 240, "every event stored"
    )
    health = rt.receiver_health() or {}
    assert health["duplicates_ignored"] > 100  # 30% of deliveries were duplicates
    wait_for(
        lambda: (rt.receiver_health() or {}).get("unprocessed") == 0,
        240,
        "the inbox to be drained by triggered runs",
    )
    expected = expected_documents(rt.env)
    box = outbox(rt.env)
    for doc_type, n in expected.items():
        unposted = box.get("dead", Counter())[doc_type] + box.get("blocked", Counter())[doc_type]
        assert box["posted"][doc_type] + unposted == n, doc_type
    for collection in ("invoices", "cashreceipts", "creditmemos"):
        with rt.env.sage() as c:
            refs = Counter(d["reference"] for d in sage_all(c, collection))
        assert [r for r, n in refs.items() if n > 1] == [], collection


def test_events_received_while_prefect_is_down_are_processed_when_it_returns(rt: Realtime) -> None:
    rt.prefect.stop()
    with rt.env.stripe() as s:
        customer = plain_customer(s)
        charge = s.post(
            "/_sandbox/activity", json={"action": "charge", "customer": customer, "amount": 1234}
        ).json()["id"]
        s.post("/_sandbox/webhooks/flush")
    wait_for(
        lambda: (rt.receiver_health() or {}).get("unprocessed", 0) > 0,
        60,
        "the event to wait in the inbox",
    )
    time.sleep(3)
    assert charge not in receipt_refs(rt.env)  # nothing ran: Prefect is down
    rt.prefect.start()
    rt.ensure_runner()
    wait_for(lambda: charge in receipt_refs(rt.env), 180, "the receipt after Prefect returned")


def test_receiver_never_opened_the_staging_database(rt: Realtime) -> None:
    pid = rt.children["receiver"].pid
    open_files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert str(rt.inbox) in " ".join(open_files)
    assert not [f for f in open_files if f.endswith(".duckdb") or ".duckdb." in f]
    assert "duckdb" not in maps  # the DuckDB library was never even loaded
