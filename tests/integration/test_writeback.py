"""Sage ids written back into Stripe metadata, against the Stripe sandbox and a real DuckDB
file: what was written is recorded (in batches), recorded before a micro-batch served between
two writes reads it, and recorded even when the write-back fails midway, so nothing written
is sent again and nothing unwritten is taken for written."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.stripe_business import BusinessConfig
from stripe_sage.errors import FatalError
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.extract import DAY, Extractor
from stripe_sage.stripe.writeback import write_back
from tests.helpers import loopback
from tests.helpers.business import END

pytestmark = pytest.mark.integration

CONFIG = BusinessConfig(seed=5, charges=60, end=END)
EVERY = 5  # writes recorded per statement here: a few batches over the business's customers


class World:
    def __init__(self, pair: SandboxPair, st: Staging) -> None:
        self.pair, self.st = pair, st
        self.reader = StripeReader(
            pair.stripe_key,
            api_base=pair.stripe_url,
            max_rps=1_000.0,
            sleep=lambda s: None,
            jitter=lambda: 0.0,
        )

    def recorded(self) -> dict[str, str]:
        """Stripe id → the value ``sage.writeback`` holds for its ``sage_customer_id``."""
        rows = self.st.con.execute(
            "SELECT stripe_id, value FROM sage.writeback WHERE field = 'sage_customer_id'"
        ).fetchall()
        return dict(rows)

    def in_stripe(self) -> dict[str, str]:
        """Stripe id → ``metadata.sage_customer_id`` as the Stripe sandbox holds it now."""
        found: dict[str, str] = {}
        with loopback.client(
            base_url=self.pair.stripe_url,
            headers={"Authorization": f"Bearer {self.pair.stripe_key}"},
        ) as http:
            after = None
            while True:
                params = {"limit": 100, **({"starting_after": after} if after else {})}
                page = http.get("/v1/customers", params=params).raise_for_status().json()
                for c in page["data"]:
                    if (c.get("metadata") or {}).get("sage_customer_id"):
                        found[c["id"]] = c["metadata"]["sage_customer_id"]
                if not page["has_more"]:
                    return found
                after = page["data"][-1]["id"]


@pytest.fixture()
def world(tmp_path: Path) -> Iterator[World]:
    """Customers extracted and staged, each given a Sage id as a posted customer would be:
    every one of them waits to be written back."""
    with (
        SandboxPair(CONFIG, sage_db=tmp_path / "sage.sqlite3") as pair,
        Staging(tmp_path / "stripe_sage.duckdb") as st,
    ):
        w = World(pair, st)
        Extractor(
            w.reader, st, run_id="extract", now=END, backfill_start=END - 400 * DAY
        ).extract_stream("customers")
        st.stage_all("extract")
        ids = [
            r[0]
            for r in st.con.execute(
                "SELECT id FROM staging.customers WHERE NOT deleted "
                "AND metadata->>'sage_customer_id' IS NULL ORDER BY id"
            ).fetchall()
        ]
        assert len(ids) > 3 * EVERY, len(ids)  # several batches of records
        st.mark_posted(
            pl.DataFrame(
                {
                    "doc_key": [f"customer:{i}" for i in ids],
                    "collection": ["customers"] * len(ids),
                    "stripe_id": ids,
                    "sage_id": [f"C{n:05d}" for n in range(len(ids))],
                    "matched_by": ["created"] * len(ids),
                    "xref_type": ["customer"] * len(ids),
                }
            ),
            "plan",
        )
        yield w


def test_every_write_is_recorded_once_in_batches_and_a_rerun_writes_nothing(
    world: World,
) -> None:
    wanted = {stripe_id: value for _, stripe_id, _, value in world.st.writeback_pending(10_000)}
    done = write_back(world.reader, world.st, "run-1", record_every=EVERY)
    assert done == {"sage_customer_id:written": len(wanted)}
    assert world.recorded() == wanted
    assert {k: v for k, v in world.in_stripe().items() if k in wanted} == wanted
    assert world.st.writeback_pending(10_000) == []
    assert write_back(world.reader, world.st, "run-2", record_every=EVERY) == {}


def test_what_a_batch_served_between_writes_reads_is_recorded_and_a_failure_keeps_it(
    world: World,
) -> None:
    """A micro-batch served between two writes sees every earlier write recorded (it tells
    our own writes' echoes by them). A failure there ends the write-back: what was written
    stays recorded, the rest stays pending and the next run writes only that."""
    pending = world.st.writeback_pending(10_000)
    fail_at = 2 * EVERY + 2
    seen: list[int] = []

    def between() -> None:
        recorded = world.recorded()
        written = [sid for _, sid, _, _ in pending[: len(seen)]]
        assert set(recorded) == set(written), (len(recorded), len(written))
        seen.append(len(recorded))
        if len(seen) > fail_at:
            raise RuntimeError("the served batch failed")

    with pytest.raises(RuntimeError, match="the served batch failed"):
        write_back(world.reader, world.st, "run-1", between=between, record_every=EVERY)
    assert seen == list(range(fail_at + 1))
    first = {sid: value for _, sid, _, value in pending[:fail_at]}
    assert world.recorded() == first
    assert {k: v for k, v in world.in_stripe().items() if k in dict(world.recorded())} == first

    rest = write_back(world.reader, world.st, "run-2", record_every=EVERY)
    assert rest == {"sage_customer_id:written": len(pending) - fail_at}
    assert world.recorded() == {sid: value for _, sid, _, value in pending}


def test_a_write_refused_midway_ends_the_write_back_with_every_earlier_write_recorded(
    world: World,
) -> None:
    """Stripe refuses one value (over its 500 characters): the write-back stops there with
    Stripe's error, every write before it is recorded (two batches of ``EVERY`` and the rest
    when it stopped), and the next run writes only what is left."""
    pending = world.st.writeback_pending(10_000)
    bad = 2 * EVERY + 2
    world.st.con.execute(
        "UPDATE sage.xref SET sage_id = ? WHERE stripe_id = ?", ["9" * 501, pending[bad][1]]
    ).fetchall()
    with pytest.raises(FatalError, match="up to 500 characters"):
        write_back(world.reader, world.st, "run-1", record_every=EVERY)
    first = {sid: value for _, sid, _, value in pending[:bad]}
    assert world.recorded() == first
    assert {k: v for k, v in world.in_stripe().items() if k in first} == first
    assert pending[bad][1] not in world.in_stripe()

    world.st.con.execute(
        "UPDATE sage.xref SET sage_id = ? WHERE stripe_id = ?", [pending[bad][3], pending[bad][1]]
    ).fetchall()
    rest = write_back(world.reader, world.st, "run-2", record_every=EVERY)
    assert rest == {"sage_customer_id:written": len(pending) - bad}
    assert world.recorded() == {sid: value for _, sid, _, value in pending}


def test_records_of_one_value_twice_keep_the_last(world: World) -> None:
    _, sid, field, _ = world.st.writeback_pending(1)[0]
    world.st.record_writebacks([(sid, field, "C1", "written"), (sid, field, "C2", "gone")], "r")
    rows = world.st.con.execute(
        "SELECT value, outcome, run_id FROM sage.writeback WHERE stripe_id = ?", [sid]
    ).fetchall()
    assert rows == [("C2", "gone", "r")]
