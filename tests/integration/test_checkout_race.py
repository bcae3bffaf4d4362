"""The Checkout race (issue 17, docs/accounting.md §5): a run reads a charge and its
Checkout Session while the session is still open — Stripe completes it a moment after the
payment — so the session names no payment intent yet. The charge must not post as a
standalone sale (its order would then be a second sale when the completion is read): it
waits, naming the open session, and a run that reads sessions the grace after it posts the
order, its invoice, and the charge's receipt applied to that invoice, once.

The Stripe sandbox runs on a clock the test moves: at the charge's own second it shows the
charge and the session open (``SESSION_COMPLETES_AFTER``); each run is the main flow's stage
sequence with that clock's time as its ``now``. Sage's side is read over HTTP.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from pydantic import SecretStr

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.paging import sage_all, stripe_all
from devkit.sandbox.stripe_business import SESSION_COMPLETES_AFTER, BusinessConfig
from flows.lifecycle import FlowRun, recorded
from flows.stages import Stage, run_stages
from stripe_sage.mapping import load_mapping
from stripe_sage.runtime import RunContext
from stripe_sage.settings import Settings
from stripe_sage.stripe.streams import LISTED_STREAMS
from tests.helpers import loopback
from tests.helpers.business import ACCOUNTING_QUALITY, by_reference, is_goods_order

pytestmark = pytest.mark.integration

END = 1_782_777_600  # 2026-06-30 00:00 UTC
THROUGH_LOAD: tuple[Stage, ...] = ("extract", "stage", "quality", "plan", "load")


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[tuple[SandboxPair, Clock, Settings]]:
    clock = Clock(END + 3600)
    with SandboxPair(
        BusinessConfig(seed=5, charges=150, end=END),
        sage_db=tmp_path / "sage.sqlite3",
        clock=clock,
    ) as pair:
        settings = Settings(
            stripe_api_key=SecretStr(pair.stripe_key),
            stripe_api_base=pair.stripe_url,
            sagepro_base_url=pair.sage_url,
            sagepro_api_key=SecretStr(pair.sage_key),
            staging_db=tmp_path / "stripe_sage.duckdb",
            stripe_max_rps=1e6,
            webhook_inbox=tmp_path / "no_inbox.sqlite3",
        )
        yield pair, clock, settings


def run_at(settings: Settings, now: int) -> dict[str, Any]:
    """The main flow's stages through the load, with ``now`` as the run's time."""
    run_id = str(uuid.uuid4())
    with (
        RunContext.open(settings, run_id, now=now) as ctx,
        recorded(FlowRun(settings, "test", run_id, ctx=ctx), trigger="test") as run,
    ):
        counts = run_stages(
            ctx,
            run,
            stages=THROUGH_LOAD,
            streams=LISTED_STREAMS,
            quality_engine=ACCOUNTING_QUALITY,  # this test is about the race, not quality
        )
        if run.status is None:
            run.finish("test")
    return counts


def sage_side(pair: SandboxPair) -> dict[str, dict[str, list[dict[str, Any]]]]:
    headers = {"Authorization": f"Bearer {pair.sage_key}"}
    with loopback.client(base_url=pair.sage_url, headers=headers) as c:
        return {
            name: by_reference(sage_all(c, name))
            for name in ("salesorders", "invoices", "cashreceipts")
        }


def outbox_row(settings: Settings, doc_key: str) -> tuple[str, str | None] | None:
    con = duckdb.connect(str(settings.staging_db), read_only=True)
    try:
        row = con.execute(
            "SELECT status, last_error FROM sage.outbox WHERE doc_key = ?", [doc_key]
        ).fetchone()
    finally:
        con.close()
    return None if row is None else (row[0], row[1])


def test_a_charge_read_before_its_session_completes_waits_then_posts_with_its_order(
    world: tuple[SandboxPair, Clock, Settings],
) -> None:
    pair, clock, settings = world
    grace = load_mapping(settings.mapping_file).orders.completion_grace_seconds
    headers = {"Authorization": f"Bearer {pair.stripe_key}"}
    with loopback.client(base_url=pair.stripe_url, headers=headers) as s:
        sessions = [x for x in stripe_all(s, "/v1/checkout/sessions") if is_goods_order(x)]
        assert sessions, "the business has goods Checkout Sessions"
        paid = {
            x["payment_intent"]: s.get(
                "/v1/charges", params={"payment_intent": x["payment_intent"]}
            ).json()["data"][0]
            for x in sessions
        }
        # The latest order: at its charge's second every other session is complete.
        pi, charge = max(paid.items(), key=lambda kv: kv[1]["created"])
        session = next(x for x in sessions if x["payment_intent"] == pi)
        paid_at = int(charge["created"])
        clock.t = paid_at
        seen = s.get(f"/v1/checkout/sessions/{session['id']}").json()
        assert (seen["status"], seen["payment_intent"]) == ("open", None)
        assert s.get(f"/v1/charges/{charge['id']}").json()["status"] == "succeeded"

    # Run 1 at the charge's second: charge read, session open, completion not yet emitted.
    run_at(settings, paid_at)
    sage = sage_side(pair)
    assert charge["id"] not in sage["invoices"], "the order's payment posted as its own sale"
    assert charge["id"] not in sage["cashreceipts"]
    assert pi not in sage["salesorders"]
    waiting = outbox_row(settings, f"cash_receipt:{charge['id']}")
    assert waiting is not None and waiting[0] == "waiting", waiting
    assert session["id"] in (waiting[1] or ""), waiting

    # Run 2 the grace after the charge: the completion is read, the order posts with it.
    clock.t = paid_at + SESSION_COMPLETES_AFTER + grace
    run_at(settings, int(clock.t))
    sage = sage_side(pair)
    assert len(sage["salesorders"].get(pi, [])) == 1
    (invoice,) = sage["invoices"][pi]
    assert charge["id"] not in sage["invoices"]
    (receipt,) = sage["cashreceipts"][charge["id"]]
    assert [a["invoice_no"] for a in receipt["apply_to"]] == [invoice["invoice_no"]]
    assert invoice["status"] == "paid"
    posted = outbox_row(settings, f"cash_receipt:{charge['id']}")
    assert posted is not None and posted[0] == "posted", posted

    # Once more: nothing posts twice.
    run_at(settings, int(clock.t) + 60)
    again = sage_side(pair)
    for name in ("salesorders", "invoices", "cashreceipts"):
        assert {k: len(v) for k, v in again[name].items()} == {
            k: len(v) for k, v in sage[name].items()
        }, name
