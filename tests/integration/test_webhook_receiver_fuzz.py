"""The webhook receiver under bad requests, over loopback: every one gets a 4xx with a reason
(never a 500), stores nothing, and what the inbox does hold is readable by the processor.

Signed bodies are signed with the endpoint's real secret, so they pass the signature check
and reach the event checks: a correctly signed body is not necessarily a Stripe event."""

from __future__ import annotations

import copy
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.stripe_app import sign_payload
from stripe_sage.store.inbox import Inbox
from stripe_sage.stripe.webhooks import create_receiver, events_by_stream
from tests.helpers import loopback

pytestmark = pytest.mark.integration
SECRET = "whsec_fuzz_secret"


@pytest.fixture()
def receiver(tmp_path: Path) -> Iterator[tuple[str, Inbox, httpx.Client]]:
    inbox = Inbox(tmp_path / "inbox.sqlite3")
    with ThreadedServer(create_receiver(inbox, [SECRET])) as srv, loopback.client() as client:
        yield srv.url + "/stripe/webhook", inbox, client


def valid_event(n: int = 1) -> dict[str, Any]:
    return {
        "id": f"evt_fuzz_{n}",
        "object": "event",
        "type": "charge.succeeded",
        "created": int(time.time()),
        "data": {"object": {"id": f"ch_fuzz_{n}", "object": "charge", "amount": 100}},
    }


def send(client: httpx.Client, url: str, body: bytes, signed: bool = True) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if signed:
        headers["Stripe-Signature"] = sign_payload(body, SECRET)
    return client.post(url, content=body, headers=headers)


def refused_with_reason(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    reason = r.json()["error"]
    assert isinstance(reason, str) and reason
    return reason


HUGE = "x" * 100_000


def _mutated(change: str) -> Any:
    e = valid_event()
    if change == "array":
        return [1, 2, 3]
    if change == "string":
        return "evt_1"
    if change == "null":
        return None
    if change == "number":
        return 12
    if change == "data_list":
        e["data"] = [e["data"]["object"]]
    elif change == "object_list":
        e["data"]["object"] = [1]
    elif change == "data_missing":
        del e["data"]
    elif change == "id_number":
        e["id"] = 12345
    elif change == "id_huge":
        e["id"] = "evt_" + HUGE
    elif change == "id_empty":
        e["id"] = ""
    elif change == "type_null":
        e["type"] = None
    elif change == "type_list":
        e["type"] = ["charge.succeeded"]
    elif change == "created_string":
        e["created"] = "yesterday"
    elif change == "created_bool":
        e["created"] = True
    elif change == "created_huge":
        e["created"] = 10**30
    elif change == "created_float":
        e["created"] = 1.5
    elif change == "object_id_number":
        e["data"]["object"]["id"] = 7
    elif change == "object_id_huge":
        e["data"]["object"]["id"] = "ch_" + HUGE
    elif change == "object_type_dict":
        e["data"]["object"]["object"] = {"a": 1}
    return e


CHANGES = [
    "array", "string", "null", "number", "data_list", "object_list", "data_missing",
    "id_number", "id_huge", "id_empty", "type_null", "type_list", "created_string",
    "created_bool", "created_huge", "created_float", "object_id_number", "object_id_huge",
    "object_type_dict",
]  # fmt: skip


@pytest.mark.parametrize("change", CHANGES)
def test_signed_body_that_is_not_a_stripe_event_gets_400_with_reason(
    receiver: tuple[str, Inbox, httpx.Client], change: str
) -> None:
    url, inbox, client = receiver
    r = send(client, url, json.dumps(_mutated(change)).encode())
    assert r.status_code == 400
    assert refused_with_reason(r).startswith("not a Stripe event")
    assert inbox.counts()["stored"] == 0


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\x00garbage", b"[" * 200_000 + b"]" * 200_000, b"", b"{", b"1e999999", b"NaN"],
    ids=["not_utf8", "deeply_nested", "empty", "truncated", "huge_number", "nan"],
)
def test_signed_bytes_that_are_not_json_get_400(
    receiver: tuple[str, Inbox, httpx.Client], body: bytes
) -> None:
    url, inbox, client = receiver
    r = send(client, url, body)
    refused_with_reason(r)
    assert inbox.counts()["stored"] == 0


def test_bad_content_length_gets_400(receiver: tuple[str, Inbox, httpx.Client]) -> None:
    """A hand-written request: HTTP clients will not send a Content-Length that lies."""
    url, inbox, _ = receiver
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /stripe/webhook HTTP/1.1\r\nHost: x\r\nStripe-Signature: t=1,v1=a\r\n"
            b"Content-Length: 99999999999\r\nConnection: close\r\n\r\n{}"
        )
        answer = sock.recv(4096).decode(errors="replace")
    status = int(answer.split(" ", 2)[1])
    assert 400 <= status < 500, answer
    assert inbox.counts()["stored"] == 0


def _random_value(rng: random.Random) -> Any:
    kind = rng.randrange(9)
    return [
        None,
        rng.choice([True, False]),
        rng.randint(-(2**70), 2**70),
        rng.random() * 1e12,
        "".join(rng.choice("evt_ch\x00é\u2028\"'\\{}[]") for _ in range(rng.randrange(40))),
        "evt_" + "9" * rng.randrange(1, 400),
        [rng.randrange(10) for _ in range(rng.randrange(4))],
        {"object": rng.choice(["charge", "refund", 3, None])},
        "charge.succeeded",
    ][kind]


def _mutate_at_random(rng: random.Random, n: int) -> dict[str, Any]:
    e = copy.deepcopy(valid_event(n))
    for _ in range(rng.randrange(1, 4)):
        path = rng.choice(
            [("id",), ("type",), ("created",), ("data",), ("data", "object"),
             ("data", "object", "id"), ("data", "object", "object"), ("extra",)]
        )  # fmt: skip
        target: Any = e
        for key in path[:-1]:
            target = target.get(key) if isinstance(target, dict) else None
        if isinstance(target, dict):
            if rng.random() < 0.15:
                target.pop(path[-1], None)
            else:
                target[path[-1]] = _random_value(rng)
    return e


def test_random_signed_and_unsigned_bodies_never_get_a_5xx(
    receiver: tuple[str, Inbox, httpx.Client],
) -> None:
    url, inbox, client = receiver
    rng = random.Random(20261206)
    accepted: set[str] = set()
    for n in range(300):
        event = _mutate_at_random(rng, n)
        body = json.dumps(event).encode()
        signed = rng.random() < 0.85
        if not signed and rng.random() < 0.5:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        r = send(client, url, body, signed=signed)
        assert r.status_code < 500, (r.status_code, body[:200])
        if r.status_code >= 400:
            refused_with_reason(r)
        elif r.json().get("stored"):
            accepted.add(event["id"])
    # Some mutations keep a valid event (an extra key, a changed amount): those are stored.
    rows = inbox.unprocessed()
    assert {r["event_id"] for r in rows} == accepted
    assert 0 < len(accepted) < 300
    # What was stored is something the processor can route without failing.
    changed, _ = events_by_stream(rows)
    assert all(isinstance(i, str) for ids in changed.values() for i in ids)
