"""Operations against a real Prefect server: deployments registered from prefect.yaml run by a
process worker on a schedule, overlapping writers take turns on the DuckDB writer slot, and
the alert automations notify a webhook on a failed run, a refused key and dead letters."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from devkit.sandbox.runner import free_port
from tests.helpers import loopback
from tests.helpers.business import ACCOUNTING_QUALITY, Env, make_env, product_env
from tests.helpers.servers import BIN, ROOT, Prefect, migrated_prefect_db, wait_for

pytestmark = pytest.mark.e2e

PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
POOL = "stripe-sage"


def ops_env(env: Env, db: Path, **extra: str) -> dict[str, str]:
    """Settings for a run in its own process: its DuckDB file and a webhook inbox beside it."""
    return product_env(env, db, WEBHOOK_INBOX=str(db.parent / "inbox.sqlite3"), **extra)


class Ops:
    def __init__(self, env: Env, prefect: Prefect, tmp: Path) -> None:
        self.env, self.prefect, self.tmp = env, prefect, tmp
        self.last_log = tmp / "no-sync-yet.log"

    def sync(self, db: Path, **extra: str) -> subprocess.Popen[bytes]:
        """``stripe-sage sync`` in its own process, as a scheduled or webhook run would be.
        Its quality runs on the Polars engine (tests/helpers/business.py
        ``ACCOUNTING_QUALITY``): the deployed run of the first test keeps Great Expectations."""
        self.last_log = self.tmp / f"sync-{os.urandom(3).hex()}.log"
        log = open(self.last_log, "ab")  # noqa: SIM115
        extra = {"QUALITY_ENGINE": ACCOUNTING_QUALITY, **extra}
        return subprocess.Popen(
            [str(BIN / "stripe-sage"), "sync"],
            env={**os.environ, **self.prefect.env(), **ops_env(self.env, db, **extra)},
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    tmp = tmp_path_factory.mktemp("ops")
    mp = pytest.MonkeyPatch()
    env = make_env(tmp, charges=120, seed=31, monkeypatch=mp)
    prefect = Prefect(tmp / "prefect")
    prefect.start()
    try:
        with env.pair:
            yield Ops(env, prefect, tmp)
    finally:
        prefect.stop()
        mp.undo()


def runs_of(db: Path, flow: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT run_id, trigger, status, counts, ended_at FROM ops.runs WHERE flow = ? "
            "ORDER BY started_at",
            [flow],
        ).fetchall()
    return [
        {"run_id": r[0], "trigger": r[1], "status": r[2], "counts": json.loads(r[3]), "ended": r[4]}
        for r in rows
    ]


def test_deployments_register_from_prefect_yaml_and_a_scheduled_run_fires(ops: Ops) -> None:
    # The checked-in file, with the main sync's schedule shortened to 20 s for the test,
    # anchored at the deploy's start (by default the anchor is when the server got the
    # deployment: the first run would come 20 s after the deploy ended, not after it began).
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    ops.prefect.cli("work-pool", "create", POOL, "--type", "process")
    anchor = dt.datetime.now(dt.UTC).isoformat()
    for d in spec["deployments"]:
        if d["name"] == "stripe-to-sage":
            d["schedules"] = [{"interval": 20, "anchor_date": anchor}]
    keepalive = next(d for d in spec["deployments"] if d["name"] == "realtime-processor")
    assert keepalive["schedules"] == [{"interval": 60}]
    assert keepalive["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"
    keepalive["schedules"] = []  # this test's worker runs the scheduled sync only
    test_yaml = ops.tmp / "prefect.yaml"
    test_yaml.write_text(yaml.safe_dump(spec))
    ops.prefect.cli("deploy", "--prefect-file", str(test_yaml), "--all")

    deployments = {d["name"]: d for d in ops.prefect.api("POST", "/deployments/filter", json={})}
    assert set(deployments) == {
        "stripe-to-sage",
        "reconcile-payouts",
        "sync-customers-from-sage",
        "realtime-processor",
        "process-stripe-events",
        "replay-dead-letters",
        "backfill",
        "backfill-windows",
    }
    for d in deployments.values():
        assert d["work_pool_name"] == POOL
        assert "stripe-sage" in d["tags"]
    crons = {
        name: [s["schedule"].get("cron") for s in d["schedules"]] for name, d in deployments.items()
    }
    assert crons["reconcile-payouts"] == ["30 6 * * *"]
    assert crons["sync-customers-from-sage"] == ["5 * * * *"]
    assert deployments["stripe-to-sage"]["schedules"][0]["schedule"]["interval"] == 20
    assert deployments["stripe-to-sage"]["parameters"] == {"trigger": "schedule"}
    limit = deployments["realtime-processor"]["global_concurrency_limit"]
    assert limit["limit"] == 1
    # The real-time processor replaced the event-triggered runs: no trigger any more.
    automations = ops.prefect.api("POST", "/automations/filter", json={})
    assert not [a for a in automations if a["name"] == "stripe webhook received"]

    db = ops.tmp / "scheduled" / "stripe_sage.duckdb"
    db.parent.mkdir()
    worker = ops.prefect.start_worker(POOL, ops_env(ops.env, db), ops.tmp / "worker.log")
    sync_id = deployments["stripe-to-sage"]["id"]

    def completed_scheduled_run() -> dict[str, Any] | None:
        runs = ops.prefect.flow_runs(
            flow_runs={
                "deployment_id": {"any_": [sync_id]},
                "state": {"type": {"any_": ["COMPLETED"]}},
            }
        )
        return next((r for r in runs if r["auto_scheduled"]), None)

    run = wait_for(completed_scheduled_run, 240, "a scheduled stripe-to-sage run to complete")
    worker.terminate()
    worker.wait(30)
    recorded = {r["run_id"]: r for r in runs_of(db, "stripe_to_sage")}
    assert recorded[run["id"]]["trigger"] == "schedule"
    assert recorded[run["id"]]["status"] in ("completed", "completed_with_dead_letters")
    assert sum(recorded[run["id"]]["counts"]["load"]["posted"].values()) > 0
    # The deployed run checked its rows with Great Expectations (the default engine).
    docs = recorded[run["id"]]["counts"]["data_docs"]
    assert docs and Path(docs).is_file(), docs


def _interval(run: dict[str, Any]) -> tuple[dt.datetime, dt.datetime]:
    start = dt.datetime.fromisoformat(run["counts"]["writer_slot"]["acquired_at"])
    return start, run["ended"]


def test_two_overlapping_writer_runs_take_turns_on_the_writer_slot(ops: Ops) -> None:
    db = ops.tmp / "overlap" / "stripe_sage.duckdb"
    db.parent.mkdir()
    first, second = ops.sync(db), ops.sync(db)
    assert first.wait(300) == 0 and second.wait(300) == 0
    runs = runs_of(db, "stripe_to_sage")
    assert len(runs) == 2 and {r["status"] for r in runs} <= {
        "completed",
        "completed_with_dead_letters",
    }
    (a_start, a_end), (b_start, b_end) = sorted(_interval(r) for r in runs)
    # One held the slot from open to finish; the other got it only after that, and had asked
    # for it while the first held it: it waited its turn (how long depends on how far apart
    # the two processes started, so no fixed figure).
    assert a_end <= b_start, (a_start, a_end, b_start, b_end)
    waited = max(runs, key=lambda r: _interval(r)[0])["counts"]["writer_slot"]["waited_s"]
    asked = b_start - dt.timedelta(seconds=waited)
    assert waited > 0 and asked < a_end, (asked, a_end, waited)
    # Both ran the whole pipeline: the second found everything posted by the first.
    later = max(runs, key=lambda r: r["ended"])
    assert sum(later["counts"]["load"]["posted"].values()) == 0
    limits = ops.prefect.api("POST", "/v2/concurrency_limits/filter", json={})
    slot = next(x for x in limits if x["name"] == "stripe-sage-duckdb-writer")
    assert slot["limit"] == 1 and slot["active_slots"] == 0


class Inbox(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        Inbox.received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def alert_hook() -> Iterator[str]:
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Inbox)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Inbox.received = []
    yield f"http://127.0.0.1:{port}/alerts"
    server.shutdown()


def install_alerts(ops: Ops, webhook_url: str) -> subprocess.CompletedProcess[str]:
    """``stripe-sage alerts install`` against the module's Prefect server."""
    done = subprocess.run(
        [str(BIN / "stripe-sage"), "alerts", "install", "--webhook-url", webhook_url],
        env={**os.environ, **ops.prefect.env()},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_alerts_fire_on_a_failed_run_a_refused_key_and_dead_letters(
    ops: Ops, alert_hook: str
) -> None:
    install_alerts(ops, alert_hook)
    names = {a["name"] for a in ops.prefect.api("POST", "/automations/filter", json={})}
    assert {
        "stripe-sage: run failed",
        "stripe-sage: authentication failed",
        "stripe-sage: dead letters above threshold",
    } <= names

    db = ops.tmp / "alerts" / "stripe_sage.duckdb"
    db.parent.mkdir()
    wrong_key = "sage_wrong_" + os.urandom(6).hex()
    assert ops.sync(db, SAGEPRO_API_KEY=wrong_key).wait(300) != 0

    def subjects() -> list[str]:
        return [m.get("subject", "") for m in Inbox.received]

    wait_for(
        lambda: (
            any("refused the API key" in s for s in subjects())
            and any(
                "stripe_to_sage" in m.get("body", "") and "Failed" in m.get("subject", "")
                for m in Inbox.received
            )
        ),
        120,
        "the failed-run and refused-key alerts",
    )
    refused = next(m for m in Inbox.received if "refused the API key" in m["subject"])
    assert refused["subject"].startswith("stripe-sage: sagepro refused")
    # A good run that ends with dead letters above the threshold (0 here) raises the third.
    # The defaults leave an everyday business nothing dead (docs/accounting.md §2), so the
    # test makes one: a sale naming an ERP order Sage does not have, under a mapping that
    # rejects such sales instead of posting them on account.
    from stripe_sage.mapping import default_mapping_text

    with ops.env.stripe() as s:
        s.post(
            "/_sandbox/activity",
            json={
                "action": "charge",
                "customer": ops.env.pair.world.make_id("customers", 1),
                "amount": 5100,
                "metadata": {"erp_order_id": "SO7777001"},
            },
        ).raise_for_status()
    strict = ops.tmp / "alerts" / "reject_unknown_orders.yaml"
    text = default_mapping_text()
    assert "unknown_erp_order: on_account" in text
    strict.write_text(text.replace("unknown_erp_order: on_account", "unknown_erp_order: reject"))
    assert ops.sync(db, DEAD_LETTER_ALERT_THRESHOLD="0", MAPPING_FILE=str(strict)).wait(300) == 0
    dead = wait_for(
        lambda: next((m for m in Inbox.received if "open dead letters" in m["subject"]), None),
        120,
        "the dead-letter alert",
    )
    with duckdb.connect(str(db), read_only=True) as con:
        count = con.execute("SELECT count(*) FROM sage.outbox WHERE status = 'dead'").fetchall()
        quarantined = con.execute("SELECT count(*) FROM staging.quarantine").fetchall()[0][0]
    assert count[0][0] >= 2  # the sale's invoice and receipt
    assert dead["subject"] == f"stripe-sage: {count[0][0]} open dead letters"
    # The other unposted states ride along: the alert tells the whole of what is not in Sage.
    assert f"{quarantined} quarantined records" in dead["body"], dead["body"]
    assert "blocked by them" in dead["body"] and "waiting" in dead["body"]
    # No alert carries a secret (the wrong key included).
    text = json.dumps(Inbox.received)
    for secret in [*ops.env.secrets, wrong_key]:
        assert secret not in text


def test_a_charge_without_its_balance_transaction_waits_with_its_reason_and_alerts(
    ops: Ops, alert_hook: str
) -> None:
    """A succeeded charge Stripe has not settled yet (no balance transaction): its documents
    wait (never a POST with null money), the run is completed, ``dead-letters list --state
    waiting`` names what they wait for, the waiting alert fires through the Prefect
    automation once the wait is older than allowed (0 h here), and once Stripe settles it
    the next run posts it exactly once."""
    done = install_alerts(ops, alert_hook)
    assert "stripe-sage: documents waiting too long" in done.stdout
    w = ops.env.pair.world
    customer = w.make_id("customers", 1)
    with ops.env.stripe() as s:
        charge = s.post(
            "/_sandbox/activity",
            json={"action": "charge", "customer": customer, "amount": 4321},
        ).json()["id"]
        bt = s.get(f"/v1/charges/{charge}").json()["balance_transaction"]
    assert bt, "the sandbox settles a new charge at once: the test would prove nothing"
    index = w.parse_id("charges", charge)
    assert index is not None
    w.update_object("charges", index, {"balance_transaction": None})

    db = ops.tmp / "waiting" / "stripe_sage.duckdb"
    db.parent.mkdir()
    hours = json.dumps({"balance_transaction": 0, "default": 24})
    assert ops.sync(db, WAITING_ALERT_HOURS=hours).wait(300) == 0
    # What the sync printed: the waiting documents, and a clearing check that the waiting
    # receipt explains to the cent.
    printed = ops.last_log.read_text()
    # The terminal's progress, a line per finished step with its rows (then the summary).
    for step in ("extract", "stage", "quality", "transform", "load"):
        assert re.search(rf"^✓ {step}\s+[\d,]+ rows", printed, re.M), (step, printed)
    assert re.search(r"^✓ publish ", printed, re.M), printed
    assert re.search(r"^  waiting     \{.*'cash_receipt': 1", printed, re.M), printed
    assert re.search(
        r"^  clearing    USD \S+: difference -\d+, unexplained 0, unposted [1-9]", printed, re.M
    ), printed
    with duckdb.connect(str(db), read_only=True) as con:
        box = dict(
            con.execute(
                "SELECT doc_key, status FROM sage.outbox WHERE stripe_id = ?", [charge]
            ).fetchall()
        )
        run = con.execute(
            "SELECT status, counts FROM ops.runs ORDER BY started_at DESC LIMIT 1"
        ).fetchall()[0]
    assert box == {f"invoice:{charge}": "waiting", f"cash_receipt:{charge}": "waiting"}
    assert run[0] in ("completed", "completed_with_dead_letters")
    counts = json.loads(run[1])
    assert counts["load"]["waiting"] == {"invoice": 1, "cash_receipt": 1}
    assert counts["load"]["states"]["waiting"] == 2
    assert counts["totals"]["invoice"]["waiting"] == 1
    # The reconciliation's clearing check explains the missing cash by the waiting receipt.
    clearing = {c["currency"]: c for c in counts["reconciliation"]["clearing"]}
    assert clearing["USD"]["unposted_by_state"].get("waiting", 0) >= 1, clearing
    # The analysts' snapshot lists it with its reason.
    with duckdb.connect(str(db.parent / "snapshot" / "analytics.duckdb"), read_only=True) as con:
        unposted = con.execute(
            "SELECT doc_key, state, reason FROM ops.unposted WHERE stripe_id = ?", [charge]
        ).fetchall()
    assert {(k, st) for k, st, _ in unposted} == {
        (f"invoice:{charge}", "waiting"),
        (f"cash_receipt:{charge}", "waiting"),
    }
    assert all(charge in reason for _, _, reason in unposted)

    listed = subprocess.run(
        [str(BIN / "stripe-sage"), "dead-letters", "list", "--state", "waiting", "--db", str(db)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    lines = [ln for ln in listed.stdout.splitlines() if ln.startswith("waiting ")]
    assert len(lines) == 2, listed.stdout
    for line in lines:
        assert f"waiting for the balance transaction of {charge}" in line, line
    alert = wait_for(
        lambda: next((m for m in Inbox.received if "waiting too long" in m["subject"]), None),
        120,
        "the waiting alert",
    )
    assert alert["subject"] == "stripe-sage: 2 documents waiting too long"
    assert charge in alert["body"] and "balance transaction" in alert["body"]

    # Stripe settles the charge: the next run posts both documents, once.
    w.update_object("charges", index, {"balance_transaction": bt})
    assert ops.sync(db).wait(300) == 0
    with duckdb.connect(str(db), read_only=True) as con:
        after = dict(
            con.execute(
                "SELECT doc_key, status FROM sage.outbox WHERE stripe_id = ?", [charge]
            ).fetchall()
        )
    assert set(after.values()) == {"posted"}, after
    with ops.env.sage() as c:
        found = c.get("/api/v1/cashreceipts", params={"reference": charge}).json()["data"]
    assert len(found) == 1 and found[0]["reference"] == charge


def test_serve_starts_everything_and_ctrl_c_stops_it_cleanly(tmp_path: Path) -> None:
    import signal

    import psutil

    port, hook_port = free_port(), free_port()
    # A home the server ran in before (its database migrated): what serve starts is tested
    # here, not Prefect's first migration (tests/helpers/servers.py builds that).
    migrated_prefect_db(tmp_path / "prefect" / "prefect.db")
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "STAGING_DB": str(tmp_path / "stripe_sage.duckdb"),
        "WEBHOOK_INBOX": str(tmp_path / "inbox.sqlite3"),
        "CONSOLE_STORE": str(tmp_path / "console.sqlite3"),
        "CONSOLE_PORT": str(free_port()),
    }
    env.pop("PREFECT_API_URL", None)
    serve = subprocess.Popen(
        [str(BIN / "stripe-sage"), "serve", "--port", str(port), "--webhook-port", str(hook_port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        import httpx

        def deployments() -> set[str]:
            try:
                r = loopback.post(api + "/deployments/filter", json={}, timeout=5)
                return {d["name"] for d in r.json()} if r.status_code == 200 else set()
            except httpx.HTTPError:
                return set()

        names = wait_for(lambda: len(deployments()) == 8 and deployments(), 180, "8 deployments")
        assert "stripe-to-sage" in names and "realtime-processor" in names
        found = loopback.post(api + "/automations/filter", json={}).json()
        automations = {a["name"] for a in found}
        assert "stripe-sage: run failed" in automations
        health = wait_for(
            lambda: _get_json(f"http://127.0.0.1:{hook_port}/healthz"), 60, "the receiver"
        )
        assert health["unprocessed"] == 0
        children = psutil.Process(serve.pid).children(recursive=True)
        assert len(children) >= 3  # server, runner, receiver (and their own children)
    finally:
        serve.send_signal(signal.SIGINT)
        out, _ = serve.communicate(timeout=120)
    text = out.decode()
    assert serve.returncode == 0, text
    for name in (
        "console",
        "webhook-receiver",
        "realtime-processor",
        "deployments",
        "prefect-server",
    ):
        assert f"stopped {name}" in text
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def _get_json(url: str) -> dict[str, Any] | None:
    import httpx

    try:
        return loopback.get(url, timeout=2).json()
    except httpx.HTTPError:
        return None
