"""Updates made through the API are visible everywhere the object appears (found in review)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.stripe_app import create_stripe_app
from devkit.sandbox.stripe_business import BusinessConfig

pytestmark = pytest.mark.integration
KEY = "sk_test_updates"
END = 1_782_777_600


@pytest.fixture()
def api() -> Iterator[httpx.Client]:
    app = create_stripe_app(
        BusinessConfig(seed=5, charges=200, end=END),
        api_key=KEY,
        rate_limit=None,
        clock=lambda: END + 3600,
    )
    with (
        ThreadedServer(app) as srv,
        httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}) as client,
    ):
        yield client


def test_given_updated_customer_when_expanded_from_a_charge_then_shows_the_update(
    api: httpx.Client,
) -> None:
    charge = api.get("/v1/charges", params={"limit": 1}).json()["data"][0]
    cus = charge["customer"]
    r = api.post(
        f"/v1/customers/{cus}",
        data={"metadata[sage_customer_id]": "C9", "email": "new@example.com"},
    )
    assert r.status_code == 200
    direct = api.get(f"/v1/customers/{cus}").json()
    expanded = api.get(f"/v1/charges/{charge['id']}", params={"expand[]": "customer"}).json()
    listed = api.get("/v1/charges", params={"limit": 1, "expand[]": "data.customer"}).json()
    assert direct["metadata"]["sage_customer_id"] == "C9"
    assert expanded["customer"] == direct
    assert listed["data"][0]["customer"]["email"] == "new@example.com"


def test_given_deleted_customer_then_tombstone_only_and_left_out_of_lists(
    api: httpx.Client,
) -> None:
    before = [c["id"] for c in api.get("/v1/customers", params={"limit": 100}).json()["data"]]
    first = before[0]
    api.post(f"/v1/customers/{first}", data={"email": "x@example.com"})
    assert api.delete(f"/v1/customers/{first}").json()["deleted"] is True
    assert api.get(f"/v1/customers/{first}").json() == {
        "id": first,
        "object": "customer",
        "deleted": True,
    }
    ids = [c["id"] for c in api.get("/v1/customers", params={"limit": 100}).json()["data"]]
    assert first not in ids
    assert ids == before[1:]


def test_given_no_endpoints_then_events_have_no_pending_webhooks(api: httpx.Client) -> None:
    events = api.get("/v1/events", params={"limit": 5}).json()["data"]
    assert [e["pending_webhooks"] for e in events] == [0] * 5
