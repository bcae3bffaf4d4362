"""The loader's round rules, against the Sage sandbox's fault injection over loopback HTTP.

A round posts every pending document once, phase by phase, from one queue that it keeps
filling (``Loader._pass``):
- a document refused with a ``Retry-After`` is held that long, then sent again in the same
  round (while the round has other work), and the documents that depend on it follow it in
  that round: a chain costs one ``Retry-After``, not one round per link;
- a document that failed without a hold (5xx, timeouts) before Sage posted anything else
  waits for the next round (Sage may be down: the rounds' backoff decides);
- a lookup that found nothing settles an uncertain attempt: the next one sends no lookup.

The business, the fixtures and the helpers are test_load's (one extraction per module).
What Sage holds is read back with plain HTTP, independently of the loader.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from devkit.sandbox.paging import sage_all
from stripe_sage.sage.loader import Loader
from tests.integration.test_load import (
    Env,
    assert_exactly_once,
    env,
    extracted,
    outbox,
    plan,
    statuses,
)

pytestmark = pytest.mark.integration
__all__ = ["env", "extracted"]  # the fixtures, shared with test_load


def set_faults(env: Env, **faults: Any) -> None:
    with env.http() as http:
        http.post("/_sandbox/faults", json=faults).raise_for_status()


def dependents_of(env: Env, doc_key: str) -> list[str]:
    return [
        r[0]
        for r in env.st.con.execute(
            "SELECT doc_key FROM sage.outbox WHERE list_contains(depends_on, ?)", [doc_key]
        ).fetchall()
    ]


def first_pending(env: Env, doc_type: str) -> str:
    """The first document of ``doc_type`` a round with one thread sends (pages go by key)."""
    return str(
        env.st.con.execute(
            "SELECT min(doc_key) FROM sage.outbox WHERE status = 'pending' AND doc_type = ?",
            [doc_type],
        ).fetchall()[0][0]
    )


def test_a_document_held_by_retry_after_is_sent_again_in_its_round_with_its_dependents(
    env: Env,
) -> None:
    """The first POST (the first Sage customer: phase 0, one thread, pages by key) is refused
    with a 429 and ``Retry-After: 0.2``; the client is paced at 100 requests a second, so the
    round still has more than a second of work when the customer is due. The customer, its
    invoices and their receipts all post in that one round."""
    with env.client() as client:
        docs = plan(env, client)
    seeded = env.stats()["documents"]
    with env.client(max_rps=100.0) as client:
        loader = Loader(env.st, client, run_id="rounds-1", concurrency=1)
        loader.enqueue(docs)
        held = first_pending(env, "customer")
        chain = dependents_of(env, held)
        chain += [d for k in chain for d in dependents_of(env, k)]
        assert any(k.startswith("invoice:") for k in chain), chain
        assert any(k.startswith("cash_receipt:") for k in chain), chain
        set_faults(env, rate_429=1.0, retry_after=0.2, max_faults=1, only_methods=["POST"], seed=1)
        stats = loader.run()
    assert env.stats()["faults"]["http_429"] == 1
    assert stats.rounds == 1, stats.as_dict()
    rows = outbox(env.st)
    assert rows[held]["status"] == "posted"
    assert {k: rows[k]["status"] for k in chain} == dict.fromkeys(chain, "posted")
    assert statuses(env.st)["pending"] == 0
    assert_exactly_once(env, seeded)


def test_a_failure_without_a_hold_before_anything_posted_waits_for_the_next_round(
    env: Env,
) -> None:
    """The first three POSTs answer 503 (nothing committed): the first customer spends its
    three exchanges (POST, lookup + POST, lookup + POST) before Sage has posted anything in
    the round, so it is not sent again in that round (Sage may be down); the round posts
    the rest, and the next round, at once (the first posted), posts the customer and what
    depends on it, after one lookup that finds nothing."""
    with env.client() as client:
        docs = plan(env, client)
    seeded = env.stats()["documents"]
    slept: list[float] = []
    with env.client() as client:
        loader = Loader(env.st, client, run_id="rounds-2", concurrency=1, sleep=slept.append)
        loader.enqueue(docs)
        failed = first_pending(env, "customer")
        chain = dependents_of(env, failed)
        assert chain
        set_faults(env, rate_503=1.0, max_faults=3, only_methods=["POST"], seed=1)
        stats = loader.run()
        recovered = client.stats.recovered_by_lookup
    assert env.stats()["faults"]["http_503"] == 3
    assert stats.rounds == 2, stats.as_dict()
    assert slept == []  # the first round posted: the next one follows at once
    rows = outbox(env.st)
    assert rows[failed]["status"] == "posted" and rows[failed]["attempts"] == 2
    assert {k: rows[k]["status"] for k in chain} == dict.fromkeys(chain, "posted")
    assert recovered == 0  # the 503s committed nothing: every lookup found nothing
    assert statuses(env.st)["pending"] == 0
    assert_exactly_once(env, seeded)


def test_after_a_lookup_finds_nothing_a_429_does_not_cost_another_lookup(env: Env) -> None:
    """One invoice alone in the outbox (its customer and items posted before). Its POST
    answers 503 (uncertain), the lookup finds nothing, the next POST answers 429: Sage does
    not hold it, so after the ``Retry-After`` it is sent without a lookup — four requests in
    all (POST, GET, POST, POST), one invoice in Sage."""
    with env.client() as client:
        docs = plan(env, client)
    invoices = docs.filter((pl.col("doc_type") == "invoice") & pl.col("error").is_null())
    target = str(invoices["doc_key"].sort()[0])
    later = dependents_of_frame(docs, target)
    with env.client() as client:
        first = Loader(env.st, client, run_id="rounds-3a", concurrency=4)
        first.enqueue(docs.filter(~pl.col("doc_key").is_in([target, *later])))
        first.run()
    assert statuses(env.st)["pending"] == 0 and target not in outbox(env.st)
    before = len(sage_all(env.http(), "invoices"))
    # Seed 2: the first POST draws a 503, the second a 429 (then no more faults).
    set_faults(
        env,
        rate_429=0.5,
        rate_503=0.5,
        retry_after=0.05,
        max_faults=2,
        only_methods=["POST"],
        seed=2,
    )
    with env.client() as client:
        loader = Loader(env.st, client, run_id="rounds-3b", concurrency=1)
        loader.enqueue(docs.filter(pl.col("doc_key") == target))
        stats = loader.run()
        requests = client.stats.attempts
    faults = env.stats()["faults"]
    assert (faults["http_503"], faults["http_429"]) == (1, 1), faults
    assert requests == 4, requests
    assert outbox(env.st)[target]["status"] == "posted"
    assert stats.rounds == 2  # alone in its round: the next one after the Retry-After
    with env.http() as http:
        found = sage_all(http, "invoices")
    assert len(found) == before + 1
    assert [d for d in found if d.get("reference") == target.partition(":")[2]] != []


def dependents_of_frame(docs: pl.DataFrame, doc_key: str) -> list[str]:
    """Planned documents that depend, directly or not, on ``doc_key``."""
    found: list[str] = []
    wanted = {doc_key}
    while wanted:
        step = docs.filter(
            pl.col("depends_on").list.eval(pl.element().is_in(list(wanted))).list.any()
        )["doc_key"].to_list()
        wanted = set(step) - set(found)
        found += list(wanted)
    return found


def test_a_batch_served_during_a_sync_posts_only_what_it_planned(env: Env) -> None:
    """A micro-batch a sync serves (flows/realtime_processor.py ``SyncEventPump``) loads with
    ``only_run``: it posts its own documents (a customer, what depends on it, and what they
    depend on), not the sync's; its document that waits for one of the sync's stays pending
    for the sync's loader, after at most one more round, and only it is reported deferred."""
    with env.client() as client:
        docs = plan(env, client)
    with env.client() as client:
        Loader(env.st, client, run_id="sync", concurrency=2).enqueue(docs)
        deps = {
            k: list(d or [])
            for k, d in env.st.con.execute("SELECT doc_key, depends_on FROM sage.outbox").fetchall()
        }
        customers = [
            k
            for (k,) in env.st.con.execute(
                "SELECT doc_key FROM sage.outbox WHERE doc_type = 'customer' ORDER BY doc_key"
            ).fetchall()
        ]
        for customer in customers:  # the first whose documents need nothing outside the outbox
            mine = {customer}
            for _ in range(3):  # its invoices, their receipts
                mine |= {d for k in list(mine) for d in dependents_of(env, k)}
            while grown := {d for k in mine for d in deps.get(k, [])} - mine:  # what they need
                mine |= grown
            if mine <= set(deps) and any(k.startswith("cash_receipt:") for k in mine):
                break
        else:
            raise AssertionError("no customer whose documents the outbox holds entirely")
        other = next(
            k
            for k in sorted(deps)
            if k.startswith("invoice:")
            and k not in mine
            and set(deps[k]) <= set(deps)
            and any(d not in mine for d in deps[k])
        )
        env.st.con.execute(
            "UPDATE sage.outbox SET run_id = 'batch' WHERE doc_key IN (SELECT unnest(?))",
            [sorted(mine | {other})],
        )
        batch = Loader(env.st, client, run_id="batch", concurrency=2)
        batch.only_run = "batch"
        stats = batch.run()
    rows = outbox(env.st)
    assert {k: rows[k]["status"] for k in mine} == dict.fromkeys(mine, "posted")
    assert rows[other]["status"] == "pending"  # it needs a document of the sync's
    rest = {k: r["status"] for k, r in rows.items() if k not in mine}
    assert set(rest.values()) == {"pending"}, rest
    assert sum(stats.deferred.values()) == 1 and stats.rounds <= 2, stats.as_dict()
    noted = dict(env.st.con.execute("SELECT doc_key, last_error FROM sage.outbox").fetchall())
    assert (noted[other] or "").startswith("deferred")
    assert not any((noted[k] or "").startswith("deferred") for k in rest if k != other)
