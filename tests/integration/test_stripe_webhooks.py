"""Signed webhook delivery from the Stripe sandbox to a receiver on loopback.

A tiny Starlette receiver records every raw body and its headers; the sandbox (its lifespan
running, so the delivery task is alive) signs and posts events as Stripe does: verifiable
with ``stripe.Webhook.construct_event``, at least once, in no guaranteed order, retried.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.stripe_app import create_stripe_app
from devkit.sandbox.stripe_business import BusinessConfig

pytestmark = pytest.mark.integration

END = 1_782_777_600
KEY = "sk_test_sandbox_webhooks"
SECRET = "whsec_test_sandbox_secret"


@dataclass
class Delivery:
    body: bytes
    headers: dict[str, str]
    status: int


@dataclass
class Receiver:
    """Records deliveries; answers 500 to the first ``fail_first`` attempts of each event."""

    fail_first: int = 0
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            event_id = json.loads(body)["id"] if body else ""
            with self.lock:
                self.attempts[event_id] += 1
                status = 500 if self.attempts[event_id] <= self.fail_first else 200
                self.deliveries.append(Delivery(body, dict(request.headers), status))
            return Response(status_code=status)

        return Starlette(routes=[Route("/hook", hook, methods=["POST"])])

    def ok(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.status == 200]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@dataclass
class Env:
    sandbox: httpx.Client
    client: stripe.StripeClient
    receiver: Receiver
    hook_url: str

    def register(self, **options: Any) -> None:
        r = self.sandbox.post(
            "/_sandbox/webhook_endpoints", json={"url": self.hook_url, "secret": SECRET, **options}
        )
        assert r.status_code == 200, r.text

    def activity(self, **body: Any) -> dict[str, Any]:
        r = self.sandbox.post("/_sandbox/activity", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    def events_after(self, newest_before: str | None) -> list[dict[str, Any]]:
        """Every event newer than ``newest_before`` (oldest first), via the SDK."""
        params: dict[str, Any] = {"limit": 100}
        if newest_before:
            params["ending_before"] = newest_before
        page = self.client.v1.events.list(params=params)  # type: ignore[arg-type]
        return [e.to_dict() for e in page.auto_paging_iter()]

    def newest_event(self) -> str:
        return self.client.v1.events.list(params={"limit": 1}).data[0].id


def make_env(fail_first: int = 0) -> Iterator[Env]:
    receiver = Receiver(fail_first=fail_first)
    app = create_stripe_app(
        BusinessConfig(seed=9, charges=100, end=END), api_key=KEY, rate_limit=None
    )
    with (
        ThreadedServer(receiver.app()) as hook_srv,
        ThreadedServer(app) as srv,
        httpx.Client(base_url=srv.url, timeout=10) as sandbox,
    ):
        client = stripe.StripeClient(KEY, base_addresses={"api": srv.url}, max_network_retries=0)
        yield Env(sandbox, client, receiver, f"{hook_srv.url}/hook")


@pytest.fixture
def env() -> Iterator[Env]:
    yield from make_env()


@pytest.fixture
def flaky_env() -> Iterator[Env]:
    yield from make_env(fail_first=1)


def verified(d: Delivery, secret: str = SECRET) -> dict[str, Any]:
    event = stripe.Webhook.construct_event(d.body, d.headers["stripe-signature"], secret)
    return event.to_dict()


def test_deliveries_are_signed_and_match_the_api(env: Env) -> None:
    before = env.newest_event()
    env.register()
    charge = env.activity(action="charge", amount=4321, currency="eur")["id"]
    refund = env.activity(action="refund", charge=charge, amount=1000)["id"]
    wait_for(lambda: len(env.receiver.ok()) >= 3)
    time.sleep(0.2)  # nothing more should arrive
    deliveries = env.receiver.ok()
    assert len(deliveries) == 3
    events = [verified(d) for d in deliveries]
    by_type = {e["type"]: e for e in events}
    assert set(by_type) == {"charge.succeeded", "charge.refunded", "refund.created"}
    assert by_type["charge.succeeded"]["data"]["object"]["id"] == charge
    assert by_type["charge.succeeded"]["data"]["object"]["amount"] == 4321
    assert by_type["charge.refunded"]["data"]["object"]["amount_refunded"] == 1000
    assert by_type["refund.created"]["data"]["object"]["id"] == refund
    # The same events, with the same ids, are listed by /v1/events.
    listed = {e["id"]: e for e in env.events_after(before)}
    assert set(listed) == {e["id"] for e in events}
    for e in events:
        assert listed[e["id"]]["type"] == e["type"]
    for d in deliveries:
        assert d.headers["content-type"].startswith("application/json")
        t, _, _ = d.headers["stripe-signature"].partition(",")
        assert abs(int(t.removeprefix("t=")) - time.time()) < 60


def test_wrong_secret_or_tampered_body_is_rejected(env: Env) -> None:
    env.register()
    env.activity(action="charge")
    wait_for(lambda: len(env.receiver.ok()) >= 1)
    d = env.receiver.ok()[0]
    assert verified(d)["type"] == "charge.succeeded"
    with pytest.raises(stripe.SignatureVerificationError):
        verified(d, secret="whsec_not_the_secret")
    tampered = Delivery(
        d.body.replace(b'"charge.succeeded"', b'"charge.refunded"'), d.headers, d.status
    )
    assert tampered.body != d.body
    with pytest.raises(stripe.SignatureVerificationError):
        verified(tampered)


def test_duplicates_arrive_with_the_same_id(env: Env) -> None:
    env.register(duplicate_rate=1.0)
    for amount in (1000, 2000, 3000):
        env.activity(action="charge", amount=amount)
    wait_for(lambda: len(env.receiver.ok()) >= 6)
    time.sleep(0.2)
    ids = Counter(verified(d)["id"] for d in env.receiver.ok())
    assert len(ids) == 3
    assert set(ids.values()) == {2}


def test_shuffled_delivery_is_complete(env: Env) -> None:
    before = env.newest_event()
    env.register(shuffle_window=5)
    created = env.activity(action="live_step", count=17)["ids"]
    assert created
    env.activity(action="charge", amount=777)
    emitted = [e["id"] for e in env.events_after(before)]
    assert len(emitted) >= 18
    # No flush needed: a partly filled shuffle window is sent once the queue runs dry.
    wait_for(lambda: len(env.receiver.ok()) >= len(emitted))
    time.sleep(0.2)
    received = [verified(d)["id"] for d in env.receiver.ok()]
    assert sorted(received) == sorted(emitted)  # complete, and each exactly once
    assert received != emitted  # ... and not in the order they happened


def test_failed_delivery_is_retried(flaky_env: Env) -> None:
    env = flaky_env
    env.register(retry_base=0.05)
    charge = env.activity(action="charge")["id"]
    env.activity(action="refund", charge=charge)
    wait_for(lambda: len(env.receiver.ok()) >= 3)
    with env.receiver.lock:
        attempts = dict(env.receiver.attempts)
    assert len(attempts) == 3
    assert set(attempts.values()) == {2}  # one 500, then a successful retry
    failed = [d for d in env.receiver.deliveries if d.status == 500]
    assert sorted(verified(d)["id"] for d in failed) == sorted(
        verified(d)["id"] for d in env.receiver.ok()
    )
    info = env.sandbox.get("/_sandbox/info").json()["webhook_endpoints"][0]
    assert info["failed_attempts"] == 3
    assert info["delivered"] == 3


def test_live_mode_creates_charges_and_events(env: Env) -> None:
    env.register()
    before_event = env.newest_event()
    before = [c.id for c in env.client.v1.charges.list(params={"limit": 100}).auto_paging_iter()]
    assert len(before) == 100
    r = env.sandbox.post("/_sandbox/live", json={"rate": 20})
    assert r.json()["live_rate"] == 20
    time.sleep(1.0)
    env.sandbox.post("/_sandbox/live", json={"rate": 0})
    time.sleep(0.2)  # a step in flight finishes
    after = [
        c.to_dict() for c in env.client.v1.charges.list(params={"limit": 100}).auto_paging_iter()
    ]
    new = after[: len(after) - len(before)]
    assert [c["id"] for c in after[len(new) :]] == before  # old charges unchanged, at the end
    assert len(new) >= 5
    assert all(c["created"] >= END for c in new)
    assert [c["created"] for c in new] == sorted((c["created"] for c in new), reverse=True)
    events = env.events_after(before_event)
    succeeded = {e["data"]["object"]["id"] for e in events if e["type"] == "charge.succeeded"}
    assert {c["id"] for c in new} <= succeeded
    # Each new charge can be retrieved, and its balance transaction exists.
    for c in new[:3]:
        ch = env.client.v1.charges.retrieve(c["id"], params={"expand": ["balance_transaction"]})
        bt = ch.to_dict()["balance_transaction"]
        assert isinstance(bt, dict) and bt["source"] == c["id"]
    # Nothing more happens once the rate is 0.
    time.sleep(0.3)
    assert env.client.v1.charges.list(params={"limit": 1}).data[0].id == new[0]["id"]
    # ... and the live events were delivered, signed, to the endpoint.
    wait_for(lambda: len(env.receiver.ok()) >= len(events))
    assert {verified(d)["id"] for d in env.receiver.ok()} == {e["id"] for e in events}
