"""The webhook receiver over loopback, fed by the Stripe sandbox's signed deliveries."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.stripe_app import create_stripe_app, sign_payload
from devkit.sandbox.stripe_business import BusinessConfig
from stripe_sage.store.inbox import Inbox
from stripe_sage.stripe.webhooks import TRIGGER_EVENT, Notifier, create_receiver
from tests.helpers import loopback

pytestmark = pytest.mark.integration
SECRET = "whsec_receiver_test_secret"
OLD_SECRET = "whsec_previous_secret_rotating"
KEY = "sk_test_receiver"
END = 1_782_777_600


def wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[tuple[str, Inbox]]:
    inbox = Inbox(tmp_path / "inbox.sqlite3")
    with ThreadedServer(create_receiver(inbox, [SECRET, OLD_SECRET])) as srv:
        yield srv.url + "/stripe/webhook", inbox


def event(eid: str = "evt_1", etype: str = "charge.succeeded") -> bytes:
    return json.dumps(
        {
            "id": eid,
            "object": "event",
            "type": etype,
            "created": int(time.time()),
            "data": {"object": {"id": "ch_1", "object": "charge"}},
        }
    ).encode()


def post(url: str, body: bytes, signature: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return loopback.post(url, content=body, headers=headers)


def test_signed_event_is_stored_once(receiver: tuple[str, Inbox]) -> None:
    url, inbox = receiver
    body = event()
    first = post(url, body, sign_payload(body, SECRET))
    again = post(url, body, sign_payload(body, SECRET))
    assert first.status_code == again.status_code == 200
    assert first.json()["stored"] is True and again.json()["duplicate"] is True
    assert inbox.counts() == {"stored": 1, "unprocessed": 1, "duplicates_ignored": 1}
    assert inbox.unprocessed()[0]["object_id"] == "ch_1"


def test_secret_rotation_accepts_old_and_new(receiver: tuple[str, Inbox]) -> None:
    url, inbox = receiver
    body = event("evt_rot")
    t = int(time.time())
    both = sign_payload(body, OLD_SECRET, t) + "," + sign_payload(body, SECRET, t).split(",")[1]
    assert post(url, body, both).status_code == 200
    assert (
        post(url, event("evt_old"), sign_payload(event("evt_old"), OLD_SECRET)).status_code == 200
    )
    assert inbox.counts()["stored"] == 2


@pytest.mark.parametrize("case", ["tampered", "unsigned", "stale", "wrong_secret", "garbled"])
def test_bad_signatures_get_400_and_store_nothing(
    receiver: tuple[str, Inbox], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    url, inbox = receiver
    body = event()
    signature: str | None = {
        "tampered": sign_payload(body, SECRET),
        "unsigned": None,
        "stale": sign_payload(body, SECRET, int(time.time()) - 301),
        "wrong_secret": sign_payload(body, "whsec_someone_else"),
        "garbled": "t=abc,v1=zz",
    }[case]
    sent = body.replace(b"ch_1", b"ch_2") if case == "tampered" else body
    r = post(url, sent, signature)
    assert r.status_code == 400
    assert "signature" in r.json()["error"].lower()
    assert inbox.counts()["stored"] == 0
    assert SECRET not in caplog.text and SECRET not in r.text


def test_non_json_large_and_unknown_types_get_clear_answers(receiver: tuple[str, Inbox]) -> None:
    url, inbox = receiver
    junk = b"not json at all"
    r = post(url, junk, sign_payload(junk, SECRET))
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    big = b"{" + b" " * 600_000 + b"}"
    assert post(url, big, sign_payload(big, SECRET)).status_code == 413
    other = event("evt_x", "issuing_card.created")
    r = post(url, other, sign_payload(other, SECRET))
    assert r.status_code == 200 and r.json()["stored"] is False
    assert "not subscribed" in r.json()["reason"]
    assert inbox.counts()["stored"] == 0


def test_sandbox_deliveries_with_duplicates_and_shuffling_are_stored_once(
    receiver: tuple[str, Inbox],
) -> None:
    url, inbox = receiver
    app = create_stripe_app(
        BusinessConfig(seed=3, charges=100, end=END), api_key=KEY, rate_limit=None
    )
    with ThreadedServer(app) as srv, loopback.client(base_url=srv.url) as stripe_api:
        stripe_api.post(
            "/_sandbox/webhook_endpoints",
            json={"url": url, "secret": SECRET, "duplicate_rate": 0.3, "shuffle_window": 10},
        )
        stripe_api.post("/_sandbox/activity", json={"action": "live_step", "count": 150})
        stripe_api.post("/_sandbox/webhooks/flush")
        created = stripe_api.get("/_sandbox/info").json()["counts"]["events"]
        base = app.state.sandbox.world.b.events
        expected = created - len(base)
        wait_for(lambda: inbox.counts()["stored"] == expected)
        time.sleep(0.3)
    counts = inbox.counts()
    assert counts["stored"] == expected
    assert counts["duplicates_ignored"] > 0


def test_notifier_batches_a_burst_into_a_handful_of_prefect_events(tmp_path: Path) -> None:
    """A stand-in Prefect events endpoint records what the receiver posts."""
    received: list[list[dict[str, Any]]] = []

    async def events(request: Request) -> Response:
        received.append(await request.json())
        return Response(status_code=204)

    prefect = Starlette(routes=[Route("/api/events", events, methods=["POST"])])
    inbox = Inbox(tmp_path / "inbox.sqlite3")
    with ThreadedServer(prefect) as api:
        notifier = Notifier(inbox, api.url + "/api", batch_seconds=0.5)
        notifier.start()
        with ThreadedServer(create_receiver(inbox, [SECRET], notifier=notifier)) as srv:
            t0 = time.monotonic()
            for i in range(200):
                body = event(f"evt_{i}")
                assert (
                    post(srv.url + "/stripe/webhook", body, sign_payload(body, SECRET)).status_code
                    == 200
                )
            burst = time.monotonic() - t0
            time.sleep(1.2)
        notifier.stop()
    assert inbox.counts()["stored"] == 200
    assert 1 <= len(received) <= 2 + burst / 0.5
    assert all(e[0]["event"] == TRIGGER_EVENT for e in received)


def test_notifier_keeps_trying_while_prefect_is_down(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox.sqlite3")
    inbox.store(json.loads(event()), event())
    calls: list[int] = []

    def flaky(url: str, events: list[dict[str, Any]]) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused")

    notifier = Notifier(inbox, "http://127.0.0.1:9/api", batch_seconds=0.05, post=flaky)
    notifier.start()
    notifier.poke()
    wait_for(lambda: notifier.sent == 1)
    notifier.stop()
    assert notifier.failures == 2


def test_receiver_module_never_loads_duckdb() -> None:
    code = "import stripe_sage.stripe.webhooks, sys; print('duckdb' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"
