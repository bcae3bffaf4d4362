"""A micro-batch's scoped plan (stripe_sage/plan/scope.py) against the full plan, for the
dependencies of the document kinds of issues 19-21: a row whose documents read another row
staged by a later batch.

The business is the Stripe sandbox's (seed 7, 1,000 charges: foreign-currency invoices paid
in parts, written-off and credit-balance invoices, refunds of invoice payments), read over
HTTP once per module with the product's extractor and staged; Stripe collects a written-off
invoice first (a live ``pay_invoice``). Each test starts from a copy of that staging file
and holds some rows back: their raw rows are the batch's (run id ``batch``), their staged
copies are not there yet. The earlier run plans everything into the outbox; the batch then
stages what was held back (``Staging.stage_all``, as a run does) and is planned in its
scope. The scoped plan must hold every document the full plan over the same staging plans
anew or differently from what the outbox holds, exactly as the full plan plans it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.paging import stripe_all
from devkit.sandbox.stripe_business import BusinessConfig
from stripe_sage.mapping import Mapping, load_mapping
from stripe_sage.plan.after_posting import BALANCE_PREFIX, WRITE_OFF_PREFIX
from stripe_sage.plan.outbox import plan_documents, plan_into_outbox, plan_slices
from stripe_sage.sage.client import SageProClient
from stripe_sage.sage.loader import Loader
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.extract import DAY, Extractor
from stripe_sage.stripe.streams import LISTED_STREAMS
from tests.helpers import loopback

pytestmark = pytest.mark.integration

END = 1_782_777_600  # 2026-06-30 00:00 UTC: a fixed business
NOW = END + 3600
RUN, BATCH = "extract-1", "batch"


@dataclass
class World:
    pair: SandboxPair
    template: Path
    periods: list[dict[str, object]]
    recovered: str  # the written-off invoice Stripe collected


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("plan_scope")
    with SandboxPair(
        BusinessConfig(seed=7, charges=1_000, end=END),
        sage_db=tmp / "sage.sqlite3",
        clock=lambda: NOW,
    ) as pair:
        headers = {"Authorization": f"Bearer {pair.stripe_key}"}
        with loopback.client(base_url=pair.stripe_url, headers=headers) as s:
            written_off = [
                i["id"] for i in stripe_all(s, "/v1/invoices") if i["status"] == "uncollectible"
            ]
            assert written_off, "the business has a written-off invoice"
            s.post(
                "/_sandbox/activity", json={"action": "pay_invoice", "invoice": written_off[0]}
            ).raise_for_status()
        template = tmp / "template.duckdb"
        with Staging(template) as st:
            reader = StripeReader(pair.stripe_key, api_base=pair.stripe_url, max_rps=1e6)
            ex = Extractor(
                reader,
                st,
                run_id=RUN,
                now=NOW,
                backfill_start=NOW - 3 * 365 * DAY,
                window_seconds=30 * DAY,
            )
            for stream in LISTED_STREAMS:
                ex.extract_stream(stream)
            st.stage_all(RUN)
            ex.fetch_referenced_customers()
            st.stage_all(RUN)
        with SageProClient(pair.sage_url, pair.sage_key) as client:
            periods = client.fiscal_periods()
        yield World(pair, template, periods, written_off[0])


@dataclass
class Held:
    batch: dict[str, list[str]]  # stream → ids the batch stages
    later: dict[str, list[str]] = field(default_factory=dict)  # ... and ids no batch stages


@dataclass
class Batch:
    st: Staging
    full: pl.DataFrame
    scoped: pl.DataFrame

    def keys(self) -> set[str]:
        return set(self.scoped["doc_key"])


def one(st: Staging, sql: str, params: list[Any] | None = None) -> tuple[Any, ...]:
    row = st.con.execute(sql, params or []).fetchone()
    assert row is not None, sql
    return tuple(row)


@contextlib.contextmanager
def held_back_then_staged(
    world: World, tmp_path: Path, hold: Callable[[Staging], Held]
) -> Iterator[Batch]:
    """The earlier run plans the staging without the rows ``hold`` names (chosen from the
    whole staging) into the outbox; then the batch stages those it reads (``batch``), the
    others (``later``) stay unstaged."""
    path = tmp_path / "stripe_sage.duckdb"
    shutil.copy(world.template, path)
    mapping: Mapping = load_mapping()
    with Staging(path) as st:
        held = hold(st)
        for stream, ids in [*held.batch.items(), *held.later.items()]:
            assert all(ids), (stream, ids)
            st.con.execute(f"DELETE FROM staging.{stream} WHERE id IN (SELECT unnest(?))", [ids])
        for stream, ids in held.batch.items():
            # What the batch reads: the raw rows are that run's, not staged yet.
            st.con.execute(
                f"UPDATE raw.{stream} SET run_id = ? WHERE id IN (SELECT unnest(?))", [BATCH, ids]
            )
        with SageProClient(world.pair.sage_url, world.pair.sage_key) as client:
            loader = Loader(st, client, run_id="before")
            plan_into_outbox(st, mapping, world.periods, loader.enqueue)
        staged = st.stage_all(BATCH)
        assert {k: v for k, v in staged.items() if v} == {k: len(v) for k, v in held.batch.items()}
        full = plan_documents(st, mapping, world.periods).sort("doc_key")
        scoped = plan_documents(st, mapping, world.periods, scope_run_id=BATCH).sort("doc_key")
        batch = Batch(st, full, scoped)
        assert_scoped_plans_what_changed(batch)
        yield batch


def assert_scoped_plans_what_changed(batch: Batch) -> None:
    """Every document the full plan plans anew, or differently from the outbox's waiting
    row, is in the scoped plan, and the scoped plan is the full plan's for its keys."""
    keys = batch.keys()
    assert batch.full.filter(pl.col("doc_key").is_in(list(keys))).equals(batch.scoped)
    waiting = {
        k: (json.loads(p) if p else None, (e or "").removeprefix("waiting: "))
        for k, p, e in batch.st.con.execute(
            "SELECT doc_key, CAST(payload AS VARCHAR), last_error FROM sage.outbox "
            "WHERE status = 'waiting'"
        ).fetchall()
    }
    changed = {
        key
        for key, payload, error in batch.full.select("doc_key", "payload", "error").iter_rows()
        if waiting.get(key)
        != (json.loads(payload) if payload else None, (error or "").removeprefix("waiting: "))
    }
    assert changed - keys == set(), "the scoped plan misses what the batch changed"


def test_the_later_part_of_a_foreign_invoice_posts_when_the_first_parts_transaction_comes(
    world: World, tmp_path: Path
) -> None:
    """An invoice in another currency paid in two parts: the second part's receipt is its
    share at the rate of the first payment, the rest Realized FX (issue 20). The first
    part's balance transaction comes late: the second part waits for it, and the batch that
    stages it plans the second part's receipt and FX journal too."""
    chosen: dict[str, str] = {}

    def hold(st: Staging) -> Held:
        invoice, first, second, bt = one(
            st,
            "WITH parts AS (SELECT p.invoice, p.charge, c.balance_transaction, "
            "row_number() OVER (PARTITION BY p.invoice ORDER BY p.paid_at, c.created) AS n "
            "FROM staging.invoice_payments p JOIN staging.charges c ON c.id = p.charge "
            "JOIN staging.invoices i ON i.id = p.invoice "
            "WHERE p.status = 'paid' AND i.currency NOT IN ('USD', 'usd')) "
            "SELECT a.invoice, a.charge, b.charge, a.balance_transaction FROM parts a "
            "JOIN parts b ON b.invoice = a.invoice AND b.n = 2 WHERE a.n = 1 "
            "ORDER BY a.invoice LIMIT 1",
        )
        chosen.update(invoice=invoice, first=first, second=second)
        return Held({"balance_transactions": [bt]})

    with held_back_then_staged(world, tmp_path, hold) as batch:
        second = chosen["second"]
        waits = dict(
            batch.st.con.execute(
                "SELECT doc_key, last_error FROM sage.outbox WHERE status = 'waiting'"
            ).fetchall()
        )
        # The second part waited for the first part's rate.
        assert chosen["first"] in (waits.get(f"cash_receipt:{second}") or ""), waits
        assert {
            f"invoice:{chosen['invoice']}",
            f"cash_receipt:{chosen['first']}",
            f"cash_receipt:{second}",
            f"journal_entry:payment_fx:{second}",
        } <= batch.keys()
        assert batch.scoped.filter(pl.col("error").is_not_null()).is_empty()


def test_an_invoice_staged_after_the_charges_and_refunds_of_its_payments(
    world: World, tmp_path: Path
) -> None:
    """Webhook events come in any order: the invoice arrives in a later batch than a payment
    of it. A charge that paid a written-off invoice books a recovery journal, not a receipt
    (issue 19); a refund of an invoice payment names the invoice's number in its memo. Both
    wait here for their balance transactions; the batch staging the invoice re-plans them
    as the full plan does (the recovery journal, the memo naming the number), and plans the
    invoice's own write-off and credit-balance memos."""
    chosen: dict[str, str] = {}

    def hold(st: Staging) -> Held:
        charge, charge_bt = one(
            st,
            "SELECT c.id, c.balance_transaction FROM staging.charges c "
            "JOIN staging.invoice_payments p ON p.charge = c.id "
            "WHERE p.invoice = ? AND p.status = 'paid'",
            [world.recovered],
        )
        refund, refund_bt, refunded, number = one(
            st,
            "SELECT r.id, r.balance_transaction, p.invoice, i.number FROM staging.refunds r "
            "JOIN staging.invoice_payments p ON p.charge = r.charge AND p.status = 'paid' "
            "JOIN staging.invoices i ON i.id = p.invoice WHERE i.number IS NOT NULL "
            "AND r.balance_transaction IS NOT NULL "
            "AND r.id NOT IN (SELECT unnest(refunds) FROM staging.credit_notes) "
            "ORDER BY r.id LIMIT 1",
        )
        (credited,) = one(
            st,
            "SELECT id FROM staging.invoices WHERE ending_balance - starting_balance > 0 "
            "AND status IN ('open', 'paid') ORDER BY id LIMIT 1",
        )
        chosen.update(charge=charge, refund=refund, number=number, credited=credited)
        return Held(
            {"invoices": [world.recovered, refunded, credited]},
            later={"balance_transactions": [charge_bt, refund_bt]},
        )

    with held_back_then_staged(world, tmp_path, hold) as batch:
        keys = batch.keys()
        assert {
            f"journal_entry:recovery:{chosen['charge']}",
            f"credit_memo:{WRITE_OFF_PREFIX}{world.recovered}",
            f"credit_memo:{chosen['refund']}",
            f"credit_memo:{BALANCE_PREFIX}{chosen['credited']}",
        } <= keys
        assert f"cash_receipt:{chosen['charge']}" not in keys
        memo = batch.scoped.filter(pl.col("doc_key") == f"credit_memo:{chosen['refund']}")
        assert chosen["number"] in json.loads(memo["payload"][0])["reason"]

        # Before the invoice came, the charge's receipt waited for its balance transaction;
        # the recovery journal replaces it, so that wait must not last for ever.
        receipt, recovery = (
            f"cash_receipt:{chosen['charge']}",
            f"journal_entry:recovery:{chosen['charge']}",
        )
        status = "SELECT status FROM sage.outbox WHERE doc_key = ?"
        assert batch.st.con.execute(status, [receipt]).fetchall() == [("waiting",)]
        with SageProClient(world.pair.sage_url, world.pair.sage_key) as client:
            loader = Loader(batch.st, client, run_id=BATCH)
            totals = plan_into_outbox(
                batch.st, load_mapping(), world.periods, loader.enqueue, scope_run_id=BATCH
            )
        assert totals.superseded == [receipt]
        assert batch.st.con.execute(status, [receipt]).fetchall() == []
        assert batch.st.con.execute(status, [recovery]).fetchall() == [("waiting",)]
        # ... and is not planned again.
        assert receipt not in set(
            plan_documents(batch.st, load_mapping(), world.periods)["doc_key"]
        )


def test_a_batch_served_during_a_sync_plans_none_of_the_syncs_unchecked_rows(
    world: World, tmp_path: Path
) -> None:
    """A sync serving webhook events (flows/realtime_processor.py ``SyncEventPump``) before
    its quality has checked its own rows: the batch's scope leaves those rows out (their
    documents are the sync's to plan, once checked), and keeps the batch's own."""
    path = tmp_path / "stripe_sage.duckdb"
    shutil.copy(world.template, path)
    mapping = load_mapping()
    with Staging(path) as st:
        refund, charge = one(
            st,
            "SELECT r.id, r.charge FROM staging.refunds r JOIN staging.charges c "
            "ON c.id = r.charge WHERE r.balance_transaction IS NOT NULL ORDER BY r.id LIMIT 1",
        )
        # The batch re-fetched the refund; everything else is the sync's, unchecked.
        st.con.execute("UPDATE staging.refunds SET run_id = ? WHERE id = ?", [BATCH, refund])

        def planned(**kw: Any) -> set[str]:
            frames = list(plan_slices(st, mapping, world.periods, scope_run_id=BATCH, **kw))
            # Stripe rows only: the mapping's own documents (the default item, the guest
            # customer: ``default:…``, ``guest:…``) are no row of any run.
            return {s for f in frames for s in f["stripe_id"].to_list() if ":" not in s}

        normal = planned()
        served = planned(scope_excludes_run=RUN)
        # Tax rates staged by the batch: a scoped plan is not possible, and a full one
        # would take in the sync's unchecked rows: the batch plans nothing.
        st.con.execute("UPDATE staging.tax_rates SET run_id = ? WHERE rowid = 0", [BATCH])
        assert st.count("staging.tax_rates WHERE run_id = 'batch'") == 1
        with_tax = planned(scope_excludes_run=RUN)
    assert {refund, charge} <= normal  # the refund's charge is in a batch's scope
    assert refund in served
    assert served <= {refund}, served - {refund}
    assert with_tax == set()
