"""Loading planned documents into the Sage sandbox through the outbox, over real loopback HTTP.

The documents are planned by the real pipeline (``Staging.stage_all`` + ``plan_documents``
with Sage's own
fiscal periods) from a business extracted once per module; every test starts from a copy
of that staging file and a freshly reset Sage sandbox. What Sage holds is read back with plain
HTTP, independently of the client under test.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from devkit.sandbox.launch import SandboxPair
from devkit.sandbox.paging import sage_all
from devkit.sandbox.stripe_business import BusinessConfig
from quality.validate import validate_all
from stripe_sage.errors import AuthenticationError
from stripe_sage.mapping import Mapping, default_mapping_text, load_mapping
from stripe_sage.plan.outbox import plan_documents, plan_into_outbox, plan_slices
from stripe_sage.sage.client import COLLECTIONS, SageProClient
from stripe_sage.sage.loader import Loader
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.extract import DAY, Extractor
from tasks.sage import sage_lookups
from tests.helpers import loopback

pytestmark = pytest.mark.integration

END = 1_782_777_600  # 2026-06-30 00:00 UTC: a fixed business, the same data on every run
# Sixty days, so that the documents fall in two fiscal periods (May and June 2026).
CONFIG = BusinessConfig(seed=4, charges=80, end=END, days=60)
RUN = "extract-1"
# What the planners read (invoice lines come with the invoices).
STREAMS_TO_LOAD = (
    "customers",
    "products",  # Billing lines name their products' items
    "tax_rates",  # ... and their tax rates the Sage tax codes (issue 18)
    "checkout_sessions",  # a charge paid through Checkout posts with its order (issue 17)
    "charges",
    "refunds",
    "invoices",
    "invoice_payments",
    "balance_transactions",
)


@dataclass
class Env:
    pair: SandboxPair
    st: Staging

    def client(self, **kw: Any) -> SageProClient:
        kw.setdefault("sleep", lambda s: None)
        kw.setdefault("jitter", lambda: 0.0)
        return SageProClient(self.pair.sage_url, kw.pop("api_key", self.pair.sage_key), **kw)

    def http(self) -> httpx.Client:
        return loopback.client(
            base_url=self.pair.sage_url, headers={"Authorization": f"Bearer {self.pair.sage_key}"}
        )

    def stats(self) -> dict[str, Any]:
        with self.http() as http:
            response = http.get("/_sandbox/stats")
            response.raise_for_status()
            return dict(response.json())


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxPair, Path]]:
    """Both sandboxes, and a staging file holding the whole business, extracted and staged."""
    tmp = tmp_path_factory.mktemp("load")
    with SandboxPair(CONFIG, sage_db=tmp / "sage.sqlite3") as pair:
        path = tmp / "template.duckdb"
        now = int(time.time())
        with Staging(path) as st:
            reader = StripeReader(pair.stripe_key, api_base=pair.stripe_url, max_rps=1_000.0)
            ex = Extractor(
                reader,
                st,
                run_id=RUN,
                now=now,
                backfill_start=now - 3 * 365 * DAY,
                window_seconds=30 * DAY,
            )
            for stream in STREAMS_TO_LOAD:
                ex.extract_stream(stream)
            st.stage_all(RUN)
            # As a run does: customers that charges name but no list returned (deleted in
            # Stripe) are retrieved by id, then staged too.
            assert ex.fetch_referenced_customers() >= 1
            st.stage_all(RUN)
        yield pair, path


@pytest.fixture()
def env(extracted: tuple[SandboxPair, Path], tmp_path: Path) -> Iterator[Env]:
    pair, template = extracted
    loopback.post(f"{pair.sage_url}/_sandbox/reset").raise_for_status()
    shutil.copy(template, tmp_path / "stripe_sage.duckdb")
    with Staging(tmp_path / "stripe_sage.duckdb") as st:
        yield Env(pair, st)
    loopback.delete(f"{pair.sage_url}/_sandbox/faults").raise_for_status()


def plan(env: Env, client: SageProClient, mapping: Mapping | None = None) -> pl.DataFrame:
    return plan_documents(
        env.st, mapping or load_mapping(), client.fiscal_periods(), **sage_lookups(client)
    )


def outbox(st: Staging) -> dict[str, dict[str, Any]]:
    cols = ("doc_key", "doc_type", "collection", "status", "sage_id", "attempts", "payload")
    rows = st.con.execute(f"SELECT {', '.join(cols)} FROM sage.outbox").fetchall()
    return {r[0]: dict(zip(cols, r, strict=True)) for r in rows}


def statuses(st: Staging) -> Counter[str]:
    return Counter(r["status"] for r in outbox(st).values())


def dead_letters(st: Staging) -> dict[str, dict[str, Any]]:
    cols = ("doc_key", "reason", "http_status", "error_code", "error_field")
    rows = st.con.execute(f"SELECT {', '.join(cols)} FROM ops.dead_letters").fetchall()
    return {r[0]: dict(zip(cols, r, strict=True)) for r in rows}


def load_once(
    env: Env, client: SageProClient, run_id: str = "load-1", mapping: Mapping | None = None
) -> Loader:
    loader = Loader(env.st, client, run_id=run_id, concurrency=4)
    assert loader.enqueue(plan(env, client, mapping)) > 100
    loader.run()
    return loader


# -- 9. a crash between Sage's commit and ours -----------------------------------------------
def test_given_crash_after_sage_commit_when_loader_reruns_then_no_new_documents_same_ids(
    env: Env,
) -> None:
    with env.client() as client:
        load_once(env, client)
    before = outbox(env.st)
    posted = {k: r["sage_id"] for k, r in before.items() if r["status"] == "posted"}
    assert len(posted) > 100 and statuses(env.st)["pending"] == 0
    documents = env.stats()["documents"]
    # The crash: Sage committed every document, our outbox never recorded it.
    env.st.con.execute(
        "UPDATE sage.outbox SET status = 'pending', sage_id = NULL, "
        "posted_at = NULL WHERE status = 'posted'"
    ).fetchall()
    env.st.con.execute("DELETE FROM sage.xref").fetchall()
    assert (
        env.st.con.execute(
            "SELECT min(attempts) FROM sage.outbox WHERE status = 'pending'"
        ).fetchall()[0][0]
        >= 1
    )

    with env.client() as client:
        loader = Loader(env.st, client, run_id="load-2", concurrency=4)
        assert loader.enqueue(plan(env, client)) == 0  # a re-run plans nothing new
        stats = loader.run()
        recovered = client.stats.recovered_by_lookup

    assert env.stats()["documents"] == documents
    after = outbox(env.st)
    assert {k: r["sage_id"] for k, r in after.items() if r["status"] == "posted"} == posted
    assert {k for k, r in after.items() if r["status"] == "dead"} == {
        k for k, r in before.items() if r["status"] == "dead"
    }
    assert sum(stats.posted.values()) == len(posted)
    # Links and items are looked up by code before any POST (found: linked), not recovered.
    assert recovered == len(
        [k for k in posted if not k.startswith(("customer_link:", "item:", "item_link:"))]
    )
    assert env.st.count("sage.xref") == len(posted)


# -- 10. Sage misbehaving --------------------------------------------------------------------
def test_given_sage_faults_when_loaded_then_every_document_exists_exactly_once(env: Env) -> None:
    with env.client() as client:
        docs = plan(env, client)
    seeded = env.stats()["documents"]
    with env.http() as http:
        http.post(
            "/_sandbox/faults",
            json={
                "seed": 20260630,
                "rate_503": 0.2,
                "rate_429": 0.1,
                "retry_after": 0.01,
                "commit_then_503_rate": 0.1,
            },
        ).raise_for_status()

    with env.client() as client:
        loader = Loader(env.st, client, run_id="load-1", concurrency=4)
        loader.enqueue(docs)
        loader.run()
        client_stats = client.stats
    faults = env.stats()["faults"]
    with env.http() as http:
        http.delete("/_sandbox/faults").raise_for_status()
    if statuses(env.st)["pending"]:
        with env.client() as client:
            Loader(env.st, client, run_id="load-2", concurrency=4).run()

    assert faults["http_503"] > 0 and faults["http_429"] > 0 and faults["commit_then_503"] > 0
    assert client_stats.rate_limited > 0 and client_stats.server_errors > 0
    assert client_stats.recovered_by_lookup > 0
    rows = outbox(env.st)
    assert statuses(env.st)["pending"] == 0
    # Faults never dead-letter: only planning errors and what they block end dead.
    assert {d["error_code"] for d in dead_letters(env.st).values()} <= {"planning", "blocked"}
    assert_exactly_once(env, seeded)
    sage_ids = [
        r["sage_id"]
        for r in rows.values()
        if r["status"] == "posted" and r["doc_type"] != "customer_link"
    ]
    assert len(sage_ids) == len(set(sage_ids))


def test_given_outbox_larger_than_a_page_when_loaded_then_every_page_posts_once(env: Env) -> None:
    """The loader reads the outbox in keyset pages (memory stays at one page): with pages of
    37 rows, every document still posts exactly once, dependents after what they need."""
    with env.client() as client:
        docs = plan(env, client)
    seeded = env.stats()["documents"]
    with env.client() as client:
        loader = Loader(env.st, client, run_id="load-1", concurrency=4, batch_size=10, page_size=37)
        queued = loader.enqueue(docs)
        loader.run()
    assert queued > 3 * 37
    rows = outbox(env.st)
    assert statuses(env.st)["pending"] == 0
    posted = Counter(
        r["collection"]
        for r in rows.values()
        if r["status"] == "posted" and r["doc_type"] not in ("customer_link", "item_link")
    )
    assert sum(posted.values()) > 3 * 37
    documents = env.stats()["documents"]
    for collection in COLLECTIONS:
        assert documents[collection] == seeded[collection] + posted[collection], collection


# -- 11. a revoked Sage key ------------------------------------------------------------------
def test_given_wrong_sage_key_when_loading_then_authentication_error_and_rows_stay_pending(
    env: Env,
) -> None:
    with env.client() as client:
        docs = plan(env, client)
    before = env.stats()

    with env.client(api_key="sage_wrong_key_0000") as client:
        loader = Loader(env.st, client, run_id="load-1", concurrency=4)
        loader.enqueue(docs)
        pending = statuses(env.st)["pending"]
        with pytest.raises(AuthenticationError) as failure:
            loader.run()
        assert client.stats.retries == 0

    assert failure.value.http_status == 401
    assert "sage_wrong_key_0000" not in str(failure.value)
    assert statuses(env.st)["pending"] == pending
    assert env.st.count("sage.xref") == 0
    assert env.stats()["documents"] == before["documents"]
    # No retry storm: the workers stop at the first 401 (at most one request each in flight).
    assert env.stats()["requests"] - before["requests"] <= 4 + 1
    # Documents that were never sent need no lookup before their next attempt.
    sent = env.st.con.execute("SELECT count(*) FROM sage.outbox WHERE attempts > 0").fetchall()
    assert sent[0][0] <= 4


# -- 12. Sage rejects a document -------------------------------------------------------------
def test_given_period_closed_after_planning_when_loaded_then_rejected_docs_dead_others_post(
    env: Env,
) -> None:
    mapping = load_mapping(
        text=default_mapping_text().replace(
            "closed_period_policy: next_open", "closed_period_policy: dead_letter"
        )
    )
    assert mapping.closed_period_policy == "dead_letter"
    with env.client() as client:
        loader = Loader(env.st, client, run_id="load-1", concurrency=4)
        loader.enqueue(plan(env, client, mapping))
        # Finance closes May while the documents wait in the outbox.
        with env.http() as http:
            http.post(
                "/_sandbox/periods/close", json={"year": 2026, "period": 5}
            ).raise_for_status()
        loader.run()

    rows = outbox(env.st)
    dead = dead_letters(env.st)
    date_fields = ("invoice_date", "receipt_date", "memo_date", "entry_date")
    dated = {
        k: next(p[f] for f in date_fields if f in p)
        for k, r in rows.items()
        if any(f in (p := json.loads(r["payload"])) for f in date_fields)
    }
    rejected = {k: d for k, d in dead.items() if d["http_status"] is not None}
    assert rejected, "no document reached Sage dated in May: the test would prove nothing"
    for key, d in rejected.items():
        assert rows[key]["status"] == "dead"
        assert (d["http_status"], d["error_code"]) == (422, "period_closed"), d
        assert d["error_field"] in date_fields and d["error_field"] in d["reason"], d
        assert dated[key].startswith("2026-05-"), (key, dated[key])
    assert statuses(env.st)["pending"] == 0
    # Everything else posted, but for planning errors and the dependents of dead documents.
    for key, row in rows.items():
        if row["status"] in ("dead", "blocked") and key not in rejected:
            assert dead[key]["error_code"] in ("planning", "blocked"), dead[key]
            assert (row["status"] == "blocked") == (dead[key]["error_code"] == "blocked")
        if dated.get(key, "").startswith("2026-05-"):
            assert row["status"] in ("dead", "blocked"), key
    posted = Counter(r["doc_type"] for r in rows.values() if r["status"] == "posted")
    assert posted["invoice"] > 0 and posted["cash_receipt"] > 0 and posted["customer"] > 0
    assert all(
        dated[k].startswith("2026-06-")
        for k, r in rows.items()
        if r["status"] == "posted" and k in dated
    )


def test_given_document_with_unknown_gl_account_when_loaded_then_only_it_is_dead_lettered(
    env: Env,
) -> None:
    with env.client() as client:
        docs = plan(env, client)
        memo = docs.filter((pl.col("doc_type") == "credit_memo") & pl.col("error").is_null()).row(
            0, named=True
        )
        bad = json.loads(memo["payload"]) | {"gl_account": "9999"}
        docs = docs.with_columns(
            pl.when(pl.col("doc_key") == memo["doc_key"])
            .then(pl.lit(json.dumps(bad)))
            .otherwise(pl.col("payload"))
            .alias("payload")
        )
        loader = Loader(env.st, client, run_id="load-1", concurrency=4)
        loader.enqueue(docs)
        loader.run()

    rows = outbox(env.st)
    dead = dead_letters(env.st)
    assert rows[memo["doc_key"]]["status"] == "dead"
    letter = dead[memo["doc_key"]]
    assert (letter["http_status"], letter["error_code"], letter["error_field"]) == (
        422,
        "unknown_account",
        "gl_account",
    )
    assert "9999" in letter["reason"]
    # The other documents still post: nothing pending, no other dead letter from Sage.
    assert statuses(env.st)["pending"] == 0
    assert [k for k, d in dead.items() if d["http_status"] is not None] == [memo["doc_key"]]
    assert {d["error_code"] for k, d in dead.items() if k != memo["doc_key"]} <= {
        "planning",
        "blocked",
    }
    posted = Counter(r["doc_type"] for r in rows.values() if r["status"] == "posted")
    assert posted["credit_memo"] > 0 and posted["invoice"] > 0 and posted["cash_receipt"] > 0
    with env.http() as http:
        memos = sage_all(http, "creditmemos")
    assert memo["stripe_id"] not in {m.get("reference") for m in memos}
    assert len(memos) == sum(
        1 for r in rows.values() if r["doc_type"] == "credit_memo" and r["status"] == "posted"
    )


# -- planning in slices ----------------------------------------------------------------------
def test_given_small_plan_slices_when_planned_then_same_documents_as_one_slice(env: Env) -> None:
    mapping = load_mapping()
    with env.client() as client:
        periods = client.fiscal_periods()
    whole = list(plan_slices(env.st, mapping, periods, slice_rows=1_000_000))
    sliced = list(plan_slices(env.st, mapping, periods, slice_rows=7))
    assert len(sliced) > len(whole) + 10  # 80 charges in slices of 7, and so on

    def canonical(frames: list[pl.DataFrame]) -> pl.DataFrame:
        return pl.concat(frames).sort("doc_key")

    assert canonical(sliced).height > 150
    assert canonical(sliced).equals(canonical(whole))


def test_given_plan_into_outbox_in_slices_when_loaded_and_rerun_then_nothing_twice(
    env: Env,
) -> None:
    mapping = load_mapping()
    with env.client() as client:
        periods = client.fiscal_periods()
        facts = sage_lookups(client)
        expected = plan_documents(env.st, mapping, periods, **facts)
        waiting = expected.filter(pl.col("error").str.starts_with("waiting:").fill_null(False))
        loader = Loader(env.st, client, run_id="slices-1", concurrency=4)
        taken: list[int] = []

        def enqueue(docs: pl.DataFrame) -> int:
            # Each slice is in the outbox before the next one is planned.
            assert env.st.count("sage.outbox") == sum(taken)
            taken.append(loader.enqueue(docs))
            return taken[-1]

        dry = plan_into_outbox(env.st, mapping, periods, None, slice_rows=7, **facts)
        assert env.st.count("sage.outbox") == 0  # a dry run only counts
        assert dry.planned == {k: v for k, v in expected.group_by("doc_type").len().iter_rows()}

        totals = plan_into_outbox(env.st, mapping, periods, enqueue, slice_rows=7, **facts)
        assert len(taken) > 10
        assert totals.planned == dry.planned
        assert totals.errors == int(expected["error"].is_not_null().sum())
        keys = set(outbox(env.st))
        assert keys == set(expected["doc_key"]) - set(waiting["doc_key"])
        assert totals.enqueued == len(keys)
        loader.run()
        assert statuses(env.st)["pending"] == 0
        documents = env.stats()["documents"]

        again = plan_into_outbox(
            env.st, mapping, periods, Loader(env.st, client, run_id="slices-2").enqueue,
            slice_rows=7, **facts,
        )  # fmt: skip
        assert again.enqueued == 0
        assert env.stats()["documents"] == documents


def test_given_quality_in_small_slices_then_same_quarantine_as_one_slice(env: Env) -> None:
    # Two bad charges, far apart in id order, so they land in different slices.
    bad = [
        r[0] for r in env.st.con.execute("SELECT id FROM staging.charges ORDER BY id").fetchall()
    ]
    bad = [bad[3], bad[-2]]
    env.st.con.execute(
        "UPDATE staging.charges SET currency = 'XYZ' WHERE id IN (?, ?)", bad
    ).fetchall()
    now = dt.datetime.now(dt.UTC)

    def quarantine() -> list[tuple[Any, ...]]:
        return env.st.con.execute(
            'SELECT stream, id, "check", reason FROM staging.quarantine ORDER BY ALL'
        ).fetchall()

    # 40 rows a slice: the 80 charges in two, the larger streams in more (GX per slice).
    sliced = validate_all(env.st, RUN, now=now, slice_rows=40)
    in_slices = quarantine()
    env.st.con.execute("DELETE FROM staging.quarantine").fetchall()
    whole = validate_all(env.st, RUN, now=now, slice_rows=1_000_000)

    assert quarantine() == in_slices
    assert {(s, i) for s, i, _, _ in in_slices} == {("charges", i) for i in bad}
    assert sliced.rows == whole.rows and sliced.rows["charges"] == 80
    assert sliced.quarantined == whole.quarantined
    assert sliced.results == whole.results


# -- states: nothing silent, finished in one run ---------------------------------------------
def test_given_a_customer_never_planned_when_loaded_then_its_documents_are_blocked_naming_it(
    env: Env,
) -> None:
    """A charge whose customer has no Sage document (e.g. deleted in Stripe, never planned)
    used to stay pending forever with 0 attempts and no reason: it is blocked, saying by
    what, and the rest posts."""
    with env.client() as client:
        docs = plan(env, client)
        charge_docs = docs.filter(
            pl.col("doc_type").is_in(["invoice", "cash_receipt"]) & pl.col("error").is_null()
        )
        ghost = next(
            d[len("customer:") :]
            for deps in charge_docs["depends_on"].to_list()
            for d in deps
            if d.startswith("customer:")
        )
        docs = docs.filter(
            ~pl.col("doc_key").is_in([f"customer:{ghost}", f"customer_link:{ghost}"])
        )
        loader = Loader(env.st, client, run_id="load-1", concurrency=4)
        loader.enqueue(docs)
        stats = loader.run()
    ghost_charges = set(
        charge_docs.filter(pl.col("depends_on").list.contains(f"customer:{ghost}"))[
            "stripe_id"
        ].to_list()
    )
    rows = {r["doc_key"]: r for r in env.st.unposted()}
    blocked = {k: r for k, r in rows.items() if r["status"] == "blocked"}
    mine = {k: r for k, r in rows.items() if r["stripe_id"] in ghost_charges}
    assert mine, "no document of that customer: the test would prove nothing"
    assert {r["status"] for r in mine.values()} == {"blocked"}
    for r in mine.values():
        # The invoice names the customer; the receipt names it too, or the invoice that
        # says so.
        assert r["reason"].startswith("blocked by "), r
        assert ghost in r["reason"] and "no Sage document is planned for it" in r["reason"], r
        assert r["attempts"] == 0
    assert statuses(env.st)["pending"] == 0
    assert sum(stats.blocked.values()) == len(blocked)
    assert stats.states["blocked"] == len(blocked)
    assert sum(stats.deferred.values()) == 0
    letters = dead_letters(env.st)
    assert {letters[k]["error_code"] for k in blocked} == {"blocked"}
    # Once the customer is planned and posted, the blocked documents post by themselves.
    with env.client() as client:
        loader = Loader(env.st, client, run_id="load-2", concurrency=4)
        assert loader.enqueue(plan(env, client)) >= 1
        loader.run()
    assert statuses(env.st)["pending"] == 0
    assert not set(mine) & {r["doc_key"] for r in env.st.unposted()}


def test_given_sage_refusing_every_post_when_loaded_then_rounds_until_the_budget_then_partial(
    env: Env,
) -> None:
    """Sage answers 503 to every POST: the loader keeps giving the documents rounds, with
    backoff, until its retry budget is spent, then leaves them pending with a reason; the
    next run posts each exactly once."""
    with env.client() as client:
        docs = plan(env, client)
    seeded = env.stats()["documents"]
    with env.http() as http:
        http.post(
            "/_sandbox/faults", json={"rate_503": 1.0, "only_methods": ["POST"]}
        ).raise_for_status()
    # The loader's clock moves only when it sleeps between rounds: the rounds' own time is
    # not counted, so the budget alone decides how many there are.
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    with env.client() as client:
        loader = Loader(
            env.st,
            client,
            run_id="load-1",
            concurrency=4,
            retry_budget=10.0,
            sleep=sleep,
            clock=lambda: now[0],
        )
        loader.enqueue(docs)
        stats = loader.run()
    # Rounds that post nothing back off: 1 s, 2 s, 4 s; the next (8 s) would pass 10 s.
    # (The first round may post what needs no POST, Sage customers linked by metadata;
    # the next one then follows at once, without a sleep: one round more than sleeps + 1.)
    assert slept == [1.0, 2.0, 4.0], slept
    assert stats.rounds in (len(slept) + 1, len(slept) + 2), stats.rounds
    assert sum(stats.deferred.values()) == statuses(env.st)["pending"] > 0
    for row in env.st.unposted("pending"):
        assert row["reason"].startswith("deferred: not taken by Sage within the retry budget")
    with env.http() as http:
        http.delete("/_sandbox/faults").raise_for_status()
    with env.client() as client:
        again = Loader(env.st, client, run_id="load-2", concurrency=4).run()
    assert sum(again.deferred.values()) == 0 and statuses(env.st)["pending"] == 0
    rows = outbox(env.st)
    posted = Counter(
        r["collection"]
        for r in rows.values()
        if r["status"] == "posted" and r["doc_type"] not in ("customer_link", "item_link")
    )
    documents = env.stats()["documents"]
    for collection in COLLECTIONS:
        assert documents[collection] == seeded[collection] + posted[collection], collection


def test_given_every_post_committed_then_503_when_loaded_then_found_by_lookup_in_one_run(
    env: Env,
) -> None:
    with env.client() as client:
        docs = plan(env, client)
    seeded = env.stats()["documents"]
    with env.http() as http:
        http.post(
            "/_sandbox/faults", json={"commit_then_503_rate": 1.0, "only_methods": ["POST"]}
        ).raise_for_status()
    with env.client() as client:
        loader = Loader(env.st, client, run_id="load-1", concurrency=4)
        loader.enqueue(docs)
        stats = loader.run()
        recovered = client.stats.recovered_by_lookup
    assert sum(stats.deferred.values()) == 0 and statuses(env.st)["pending"] == 0
    rows = outbox(env.st)
    posted = Counter(
        r["collection"]
        for r in rows.values()
        if r["status"] == "posted" and r["doc_type"] not in ("customer_link", "item_link")
    )
    assert recovered == sum(posted.values()) > 100
    documents = env.stats()["documents"]
    for collection in COLLECTIONS:
        assert documents[collection] == seeded[collection] + posted[collection], collection


def test_given_a_staging_file_from_before_the_states_when_opened_then_columns_are_added(
    tmp_path: Path,
) -> None:
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE SCHEMA sage")
        con.execute(
            "CREATE TABLE sage.outbox (doc_key VARCHAR PRIMARY KEY, doc_type VARCHAR, "
            "collection VARCHAR, stripe_id VARCHAR, phase INTEGER, depends_on VARCHAR[], "
            "payload JSON, status VARCHAR, sage_id VARCHAR, attempts INTEGER DEFAULT 0, "
            "last_error VARCHAR, created_at TIMESTAMPTZ, updated_at TIMESTAMPTZ, "
            "posted_at TIMESTAMPTZ, run_id VARCHAR)"
        )
        con.execute(
            "INSERT INTO sage.outbox (doc_key, doc_type, stripe_id, status, created_at) "
            "VALUES ('invoice:ch_1', 'invoice', 'ch_1', 'pending', now())"
        )
    with Staging(path) as st:
        cols = {r[0] for r in st.con.execute("DESCRIBE sage.outbox").fetchall()}
        assert {"waiting_since", "wait_kind"} <= cols
        assert [r["doc_key"] for r in st.unposted("pending")] == ["invoice:ch_1"]
        assert st.state_counts()["pending"] == 1


# -- items (issue 17) --------------------------------------------------------------------------
def test_items_another_process_made_are_linked_and_a_taken_code_is_salted(env: Env) -> None:
    """Before this loader runs, another process (a second run, a webhook) created one
    product's item, and some other product holds the code of a second: the first is linked
    (created once), the second gets the next salted code; every document still posts."""
    from stripe_sage.plan.items import sage_item_code

    products = env.st.frame(
        "SELECT id, name FROM staging.products WHERE sage_item IS NULL ORDER BY id LIMIT 2"
    ).rows()
    (raced_id, raced_name), (taken_id, taken_name) = products
    raced = sage_item_code(raced_id, raced_name)
    taken = sage_item_code(taken_id, taken_name)
    with env.http() as http:
        for code, ref in ((raced, raced_id), (taken, "prod_someone_else")):
            body = {"item": code, "description": "made elsewhere", "type": "service"}
            http.post("/api/v1/items", json={**body, "reference": ref}).raise_for_status()
    with env.client() as client:
        load_once(env, client)
    rows = outbox(env.st)
    assert rows[f"item:{raced_id}"]["sage_id"] == raced
    salted = rows[f"item:{taken_id}"]["sage_id"]
    assert salted == sage_item_code(taken_id, taken_name[:60], 1) != taken
    assert statuses(env.st)["pending"] == 0
    matched = dict(
        env.st.con.execute(
            "SELECT stripe_id, matched_by FROM sage.xref WHERE doc_type = 'item'"
        ).fetchall()
    )
    assert matched[raced_id] == "linked" and matched[taken_id] == "created"
    with env.http() as http:
        items = sage_all(http, "items")
        invoices = sage_all(http, "invoices")
    assert len([i for i in items if i["reference"] == raced_id]) == 1
    codes = {i["item"] for i in items}
    assert all(ln["item"] in codes for inv in invoices for ln in inv["lines"])


def test_two_runs_racing_for_the_same_new_products_create_each_item_once(
    extracted: tuple[SandboxPair, Path], tmp_path: Path
) -> None:
    """Two loaders (two runs, or a run and a webhook batch, each with its own staging file)
    post the same new products' items at the same moment, in two threads, over real HTTP.
    Sage answers its GETs slowly, so both look an item up, find nothing, and POST: Sage takes
    one, refuses the other (the code exists), and the loser links the winner's item. Each
    product ends with one Sage item, each run records it posted (one created, one linked),
    and nothing is dead-lettered."""
    import threading

    pair, template = extracted
    loopback.post(f"{pair.sage_url}/_sandbox/reset").raise_for_status()
    refused_item_posts: list[int] = []

    def record(response: httpx.Response) -> None:
        request = response.request
        item_post = request.method == "POST" and request.url.path == "/api/v1/items"
        if item_post and response.status_code >= 400:
            refused_item_posts.append(response.status_code)

    runs = []
    for n in (1, 2):
        shutil.copy(template, tmp_path / f"run{n}.duckdb")
        runs.append(Staging(tmp_path / f"run{n}.duckdb"))
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def load(st: Staging, n: int) -> None:
        try:
            http = loopback.client(timeout=30.0, event_hooks={"response": [record]})
            with http, SageProClient(pair.sage_url, pair.sage_key, http_client=http) as client:
                docs = plan_documents(
                    st, load_mapping(), client.fiscal_periods(), **sage_lookups(client)
                ).filter(pl.col("doc_type").is_in(["item", "item_link"]))
                loader = Loader(st, client, run_id=f"race-{n}", concurrency=4)
                assert loader.enqueue(docs) == len(docs) > 3
                barrier.wait(timeout=60)
                loader.run()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    try:
        with loopback.client(base_url=pair.sage_url) as http:
            http.post(
                "/_sandbox/faults",
                json={"slow_rate": 1.0, "slow_seconds": 0.3, "only_methods": ["GET"]},
            ).raise_for_status()
        threads = [threading.Thread(target=load, args=(st, n)) for n, st in enumerate(runs, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        with loopback.client(base_url=pair.sage_url) as http:
            http.delete("/_sandbox/faults").raise_for_status()
        outboxes = [outbox(st) for st in runs]
        items_of = [
            {k: r for k, r in box.items() if r["doc_type"] == "item" and k.startswith("item:prod_")}
            for box in outboxes
        ]
        assert items_of[0] and set(items_of[0]) == set(items_of[1])
        # Both runs posted every item document, to the same Sage item; nothing dead.
        for box in outboxes:
            assert {r["status"] for r in box.values()} == {"posted"}
        assert {k: r["sage_id"] for k, r in items_of[0].items()} == {
            k: r["sage_id"] for k, r in items_of[1].items()
        }
        assert [dead_letters(st) for st in runs] == [{}, {}]
        # One run created each product's item, the other linked it.
        matched: dict[str, list[str]] = {}
        for st in runs:
            for stripe_id, how in st.con.execute(
                "SELECT stripe_id, matched_by FROM sage.xref WHERE doc_type = 'item' "
                "AND stripe_id LIKE 'prod_%'"
            ).fetchall():
                matched.setdefault(stripe_id, []).append(how)
        made = {k.removeprefix("item:") for k in items_of[0]}  # not those naming a sage_item
        assert {p: sorted(h) for p, h in matched.items() if p in made} == {
            p: ["created", "linked"] for p in made
        }
        # Sage holds one item per product; the race really happened (a POST was refused).
        with loopback.client(base_url=pair.sage_url, headers=auth(pair)) as http:
            references = Counter(i["reference"] for i in sage_all(http, "items"))
        assert all(references[k.removeprefix("item:")] == 1 for k in items_of[0])
        assert refused_item_posts, "no two POSTs of the same item met: the race did not happen"
    finally:
        for st in runs:
            st.close()
        loopback.delete(f"{pair.sage_url}/_sandbox/faults").raise_for_status()


def auth(pair: SandboxPair) -> dict[str, str]:
    return {"Authorization": f"Bearer {pair.sage_key}"}


def test_a_sage_item_sage_lacks_dead_letters_naming_it_and_blocks_its_lines(env: Env) -> None:
    pid = env.st.frame(
        "SELECT DISTINCT product FROM staging.invoice_lines WHERE product IS NOT NULL "
        "ORDER BY product LIMIT 1"
    )["product"][0]
    env.st.con.execute(
        "UPDATE staging.products SET sage_item = 'NO-SUCH-ITEM' WHERE id = ?", [pid]
    ).fetchall()
    with env.client() as client:
        load_once(env, client)
    letters = dead_letters(env.st)
    reason = letters[f"item_link:{pid}"]["reason"]
    assert "NO-SUCH-ITEM" in reason and pid in reason
    blocked = [k for k, d in letters.items() if d["reason"].startswith(f"blocked by item {pid}")]
    assert blocked and all(k.startswith("invoice:") for k in blocked)
    assert {outbox(env.st)[k]["status"] for k in blocked} == {"blocked"}
    assert statuses(env.st)["pending"] == 0


def assert_exactly_once(env: Env, seeded: dict[str, int]) -> None:
    """Sage holds each posted document once: no reference twice, and as many new documents
    per collection as the outbox recorded as posted."""
    posted = Counter(
        r["collection"]
        for r in outbox(env.st).values()
        if r["status"] == "posted" and r["doc_type"] not in ("customer_link", "item_link")
    )
    documents = env.stats()["documents"]
    with env.http() as http:
        for collection in COLLECTIONS:
            found = sage_all(http, collection)
            references = Counter(d.get("reference") for d in found if d.get("reference"))
            assert [r for r, n in references.items() if n > 1] == [], collection
            assert len(found) == documents[collection]
            assert documents[collection] == seeded[collection] + posted[collection], collection


def test_given_a_batch_when_planned_in_its_scope_then_the_full_plan_has_nothing_more(
    env: Env,
) -> None:
    """A micro-batch plans only what it staged and what depends on it (plan/scope.py): the
    same documents as the full plan, but for documents that still wait, unchanged, for
    something no batch staged (the cost the scope saves)."""
    st, mapping = env.st, load_mapping()
    with env.client() as client:
        periods = client.fiscal_periods()
    picked = st.con.execute(
        "SELECT id, balance_transaction FROM staging.charges WHERE status = 'succeeded' "
        "AND balance_transaction IS NOT NULL AND customer IS NOT NULL "
        "AND id NOT IN (SELECT charge FROM staging.invoice_payments WHERE charge IS NOT NULL) "
        "AND id NOT IN (SELECT charge FROM staging.refunds) ORDER BY id LIMIT 3"
    ).fetchall()
    (new_charge, new_bt), (late_charge, late_bt), (still_late_charge, still_late_bt) = picked
    (invoice,) = st.con.execute(
        "SELECT id FROM staging.invoices WHERE status = 'paid' AND id IN "
        "(SELECT invoice FROM staging.invoice_lines) ORDER BY id LIMIT 1"
    ).fetchone() or (None,)
    (refund, refund_bt) = st.con.execute(
        "SELECT id, balance_transaction FROM staging.refunds "
        "WHERE balance_transaction IS NOT NULL ORDER BY id LIMIT 1"
    ).fetchone() or (None, None)
    assert invoice and refund
    # What the batch will stage arrives later: held out of staging while the rest is planned.
    held = {
        "charges": f"id = '{new_charge}'",
        "balance_transactions": f"id IN ('{new_bt}', '{late_bt}', '{refund_bt}')",
        "invoice_lines": f"invoice = '{invoice}'",
        "refunds": f"id = '{refund}'",
    }
    for table, where in held.items():
        st.con.execute(
            f"CREATE TEMP TABLE held_{table} AS SELECT * FROM staging.{table} WHERE {where}"
        )
        st.con.execute(f"DELETE FROM staging.{table} WHERE {where}")
    # And one balance transaction no batch brings: its charge keeps waiting.
    st.con.execute("DELETE FROM staging.balance_transactions WHERE id = ?", [still_late_bt])
    loader = Loader(st, env.client(), run_id="before")
    plan_into_outbox(st, mapping, periods, loader.enqueue)
    waiting = set(
        k
        for (k,) in st.con.execute(
            "SELECT doc_key FROM sage.outbox WHERE status = 'waiting'"
        ).fetchall()
    )
    assert {f"cash_receipt:{late_charge}", f"cash_receipt:{still_late_charge}"} <= waiting
    assert f"invoice:{invoice}" in waiting
    # The batch stages them (its run id tags what it staged).
    for table in held:
        st.con.execute(
            f"INSERT INTO staging.{table} BY NAME "
            f"SELECT * REPLACE ('batch-1' AS run_id) FROM held_{table}"
        )
    full = plan_documents(st, mapping, periods).sort("doc_key")
    scoped = plan_documents(st, mapping, periods, scope_run_id="batch-1").sort("doc_key")
    keys = set(scoped["doc_key"])
    # What the batch staged, and what waited for it.
    assert {
        f"cash_receipt:{new_charge}",
        f"cash_receipt:{late_charge}",
        f"invoice:{invoice}",
    } <= keys
    assert any(refund in k for k in keys)
    assert scoped.filter(pl.col("error").is_not_null()).is_empty()
    # The full plan has the same documents, and only re-plans unchanged waits besides.
    extra = full.filter(~pl.col("doc_key").is_in(list(keys)))
    assert f"cash_receipt:{still_late_charge}" in set(extra["doc_key"])
    waits = dict(
        st.con.execute(
            "SELECT doc_key, 'waiting: ' || last_error FROM sage.outbox WHERE status = 'waiting'"
        ).fetchall()
    )
    assert {k: waits.get(k) for k in extra["doc_key"]} == dict(
        extra.select("doc_key", "error").iter_rows()
    )
    assert full.filter(pl.col("doc_key").is_in(list(keys))).equals(scoped)
