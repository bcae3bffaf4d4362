"""Every payout shape end to end (issue 21, docs/accounting.md section 6), on two sandbox
businesses: one paid out automatically (with top-ups, one reversed, Connect application fees
and transfers, a reporting category no mapping knows, and a standard and an instant payout
made by hand between automatic ones), and one whose account is paid out only manually.
Expectations are computed from the Stripe side (its listings)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from devkit.sandbox.stripe_business import MADE_UP_CATEGORY
from tests.helpers.business import (
    ACCOUNTING_QUALITY,
    OWN_DOCUMENT,
    Env,
    expected_documents,
    make_env,
    run_flow,
    run_twice_under_sage_faults,
    sage_all,
    stripe_all,
    swept_by_manual_payouts,
    use_env,
)
from tests.helpers.servers import BIN

pytestmark = pytest.mark.e2e
CLEARING, BANK, SUSPENSE = "1050", "1000", "9990"


class Shapes:
    def __init__(self, env: Env, result: dict[str, Any]) -> None:
        self.env, self.result = env, result
        with env.stripe() as s:
            self.payouts = stripe_all(s, "/v1/payouts")
            self.bts = stripe_all(s, "/v1/balance_transactions")
        with env.sage() as c:
            self.journals = sage_all(c, "journalentries")
            self.receipts = sage_all(c, "cashreceipts")
            self.memos = sage_all(c, "creditmemos")

    def by_reference(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for j in self.journals:
            out.setdefault(j["reference"], []).append(j)
        return out


def _business(tmp: pytest.TempPathFactory, name: str, seed: int, manual: bool) -> Iterator[Shapes]:
    mp = pytest.MonkeyPatch()
    env = make_env(
        tmp.mktemp(name),
        charges=150,
        seed=seed,
        monkeypatch=mp,
        manual_payouts=manual,
        interim_manual_payouts=not manual,
    )
    with env.pair:
        use_env(env, mp, quality=ACCOUNTING_QUALITY)
        result = run_flow(trigger="test")
        yield Shapes(env, result)
    mp.undo()


@pytest.fixture(scope="module")
def auto(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Shapes]:
    yield from _business(tmp_path_factory, "auto", 61, manual=False)


@pytest.fixture(scope="module")
def manual(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Shapes]:
    yield from _business(tmp_path_factory, "manual", 67, manual=True)


def minor(value: str) -> int:
    return int(Decimal(value) * 100)


def lines_by_account(journal: dict[str, Any]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for line in journal["lines"]:
        out[line["account"]] += minor(line["debit"]) - minor(line["credit"])
    return dict(out)


def _payout_journals_balance_and_bank_is_the_amount(shapes: Shapes) -> None:
    refs = shapes.by_reference()
    done = [p for p in shapes.payouts if p["status"] in ("paid", "failed")]
    assert done
    for j in shapes.journals:
        assert sum(lines_by_account(j).values()) == 0, j["reference"]
    for p in done:
        [journal] = refs[p["id"]]  # exactly one
        assert lines_by_account(journal)[BANK] == p["amount"], p["id"]


def test_every_payout_journal_balances_and_its_bank_line_is_the_payout(
    auto: Shapes, manual: Shapes
) -> None:
    # The automatic account also paid out by hand: once standard, once instant.
    by_hand = [p for p in auto.payouts if not p["automatic"]]
    assert sorted(p["method"] for p in by_hand) == ["instant", "standard"]
    assert not any(p["automatic"] for p in manual.payouts)
    _payout_journals_balance_and_bank_is_the_amount(auto)
    _payout_journals_balance_and_bank_is_the_amount(manual)
    # A manual payout's journal is the amount from clearing to the bank, nothing else.
    for shapes in (auto, manual):
        _manual_payout_journals_move_the_amount_to_the_bank(shapes)


def _manual_payout_journals_move_the_amount_to_the_bank(shapes: Shapes) -> None:
    refs = shapes.by_reference()
    for p in shapes.payouts:
        if p["status"] == "paid" and not p["automatic"]:
            [j] = refs[p["id"]]
            assert lines_by_account(j) == {BANK: p["amount"], CLEARING: -p["amount"]}
            assert (
                j["entry_date"]
                == dt.datetime.fromtimestamp(p["arrival_date"], dt.UTC).date().isoformat()
            )


def test_top_up_journals_exist_once_and_a_reversal_reverses_its_top_up(auto: Shapes) -> None:
    refs = auto.by_reference()
    topups = [b for b in auto.bts if b["reporting_category"] == "topup"]
    reversals = [b for b in auto.bts if b["reporting_category"] == "topup_reversal"]
    assert topups and reversals
    for b in topups:
        [j] = refs[b["source"]]
        assert b["source"].startswith("tu_")
        assert lines_by_account(j) == {CLEARING: b["amount"], BANK: -b["amount"]}
        assert j["entry_date"] == dt.datetime.fromtimestamp(b["created"], dt.UTC).date().isoformat()
    for b in reversals:
        [j] = refs[b["id"]]
        assert lines_by_account(j) == {CLEARING: b["amount"], BANK: -b["amount"]}
        assert b["source"] in {t["source"] for t in topups}


def test_connect_categories_post_to_their_accounts_inside_the_payout(auto: Shapes) -> None:
    """Each Connect transaction is recognised by the journal of the automatic payout that
    lists it, or, when a payout made by hand took it, by its day's journal."""
    refs = auto.by_reference()
    earning = ("platform_earning", "platform_earning_refund")
    transfers = ("transfer", "transfer_reversal")
    with auto.env.stripe() as s:
        listed = {
            p["id"]: stripe_all(s, "/v1/balance_transactions", payout=p["id"])
            for p in auto.payouts
            if p["automatic"] and p["status"] in ("paid", "failed")
        }
        swept = swept_by_manual_payouts(s, auto.bts, auto.payouts)
    recognised_by: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for po, members in listed.items():
        recognised_by |= {m["id"]: (po, members) for m in members}
    for m in swept:
        ref = f"STRIPE-DAY-USD-{dt.datetime.fromtimestamp(m['created'], dt.UTC).date()}"
        same_day = [x for x in swept if f"STRIPE-DAY-USD-{_utc_day(x)}" == ref]
        recognised_by[m["id"]] = (ref, same_day)
    for cat, account, group in (
        ("platform_earning", "4020", earning),
        ("platform_earning_refund", "4020", earning),
        ("transfer", "6200", transfers),
        ("transfer_reversal", "6200", transfers),
    ):
        found = [b for b in auto.bts if b["reporting_category"] == cat]
        assert found, cat
        for b in found:
            ref, members = recognised_by[b["id"]]
            want = -sum(m["amount"] for m in members if m["reporting_category"] in group)
            [j] = refs[ref]
            assert lines_by_account(j).get(account, 0) == want, (cat, ref)


def _utc_day(b: dict[str, Any]) -> dt.date:
    return dt.datetime.fromtimestamp(b["created"], dt.UTC).date()


def test_a_made_up_category_lands_in_suspense_its_payout_posts_and_an_alert_names_it(
    auto: Shapes,
) -> None:
    [odd] = [b for b in auto.bts if b["reporting_category"] == MADE_UP_CATEGORY]
    with auto.env.stripe() as s:
        payout = next(
            p
            for p in auto.payouts
            if p["automatic"]
            and p["status"] in ("paid", "failed")
            and odd["id"]
            in {x["id"] for x in stripe_all(s, "/v1/balance_transactions", payout=p["id"])}
        )
    [j] = auto.by_reference()[payout["id"]]
    assert lines_by_account(j)[SUSPENSE] == -odd["amount"]
    assert lines_by_account(j)[BANK] == payout["amount"]
    with duckdb.connect(str(auto.env.db), read_only=True) as con:
        flags = con.execute(
            "SELECT doc_key, flag FROM ops.flags WHERE flag LIKE 'suspense:%'"
        ).fetchall()
        report = con.execute(
            "SELECT payout, suspense FROM ops.reconciliation WHERE suspense <> 0"
        ).fetchall()
        run_id = con.execute(
            "SELECT run_id FROM ops.runs WHERE flow = 'stripe_to_sage' ORDER BY started_at LIMIT 1"
        ).fetchall()[0][0]
    assert [(k, f) for k, f in flags if k == f"journal_entry:{payout['id']}"]
    assert MADE_UP_CATEGORY in flags[0][1] and odd["id"] in flags[0][1]
    assert report == [(payout["id"], -odd["amount"])]
    assert auto.result["reconciliation"]["suspense"] == 1
    # The alert: the run emitted the suspense event naming the category (Prefect's events).
    assert MADE_UP_CATEGORY in _suspense_event(run_id)
    # `mapping preview --stream payouts` shows what goes to suspense.
    out = subprocess.run(
        [
            str(BIN / "stripe-sage"),
            "mapping",
            "preview",
            "--stream",
            "payouts",
            "--id",
            payout["id"],
            "--html",
            str(auto.env.db.parent / "preview.html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STAGING_DB": str(auto.env.db)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"to suspense: suspense: reporting category '{MADE_UP_CATEGORY}'" in out.stdout
    assert odd["id"] in out.stdout and '"account": "9990"' in out.stdout


def _suspense_event(run_id: str) -> list[str]:
    """Categories of the suspense event the run emitted, read back from Prefect's API."""
    from prefect.client.orchestration import get_client

    from tasks.alerts import SUSPENSE_POSTED

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            found = client.request(
                "POST",
                "/events/filter",
                json={"filter": {"event": {"name": [SUSPENSE_POSTED]}}, "limit": 50},
            ).json()
            for event in found.get("events", []):
                if event["payload"].get("run_id") == run_id:
                    return list(event["payload"]["categories"])
            if time.monotonic() > deadline:
                return []
            time.sleep(1)


def test_clearing_equals_gross_not_paid_out_on_the_automatic_account(auto: Shapes) -> None:
    """Paid out: what the automatic payouts list, and what the payouts made by hand took
    (Stripe lists nothing for those: the transactions no automatic payout lists that were
    available when one was made). The latter's fees and other amounts are recognised by
    the daily journals of their days, so the clearing difference is 0."""
    with auto.env.stripe() as s:
        paid_out = {
            b["id"]
            for p in auto.payouts
            if p["automatic"] and p["status"] in ("paid", "failed")
            for b in stripe_all(s, "/v1/balance_transactions", payout=p["id"])
        }
        swept = swept_by_manual_payouts(s, auto.bts, auto.payouts)
    by_hand = [p for p in auto.payouts if not p["automatic"]]
    assert swept and all(p["status"] == "paid" for p in by_hand)
    # What the payouts by hand took is exactly what they paid.
    assert sum(b["net"] for b in swept) == sum(p["amount"] for p in by_hand)
    own = OWN_DOCUMENT - {"payout"}
    taken = paid_out | {b["id"] for b in swept}
    unpaid_gross = sum(
        b["amount"] for b in auto.bts if b["reporting_category"] in own and b["id"] not in taken
    )
    assert _sage_clearing(auto, None) == unpaid_gross
    [usd] = [c for c in auto.result["reconciliation"]["clearing"] if c["currency"] == "USD"]
    assert usd["unexplained"] == 0 and usd["difference"] == 0
    # The daily journals: one per day the payouts by hand took fees (or other amounts)
    # from, taking from clearing exactly those.
    clearing_moves: Counter[str] = Counter()  # per UTC day: amounts no document posts - fees
    recognised: set[str] = set()  # days with something to recognise
    for b in swept:
        day = dt.datetime.fromtimestamp(b["created"], dt.UTC).date().isoformat()
        other = 0 if b["reporting_category"] in OWN_DOCUMENT else b["amount"]
        clearing_moves[day] += other - b["fee"]
        if b["fee"] or other:
            recognised.add(day)
    assert recognised
    daily = {r: js for r, js in auto.by_reference().items() if r.startswith("STRIPE-DAY-USD-")}
    assert sorted(daily) == sorted(f"STRIPE-DAY-USD-{d}" for d in recognised)
    for day in recognised:
        [j] = daily[f"STRIPE-DAY-USD-{day}"]
        assert lines_by_account(j).get(CLEARING, 0) == clearing_moves[day], day
    with duckdb.connect(str(auto.env.db), read_only=True) as con:
        kinds = dict(
            con.execute(
                "SELECT recon_status, count(*) FROM ops.reconciliation GROUP BY 1"
            ).fetchall()
        )
    assert kinds.get("manual") == len(by_hand)


def _sage_clearing(shapes: Shapes, day: dt.date | None) -> int:
    """Sage's Stripe Clearing balance from its documents (those dated up to ``day``)."""

    def upto(date: str) -> bool:
        return day is None or dt.date.fromisoformat(date) <= day

    total = sum(
        minor(r["amount"])
        for r in shapes.receipts
        if r["deposit_account"] == CLEARING and upto(r["receipt_date"])
    )
    total -= sum(
        minor(m["amount"])
        for m in shapes.memos
        if m["gl_account"] == CLEARING and upto(m["memo_date"])
    )
    for j in shapes.journals:
        if upto(j["entry_date"]):
            total += lines_by_account(j).get(CLEARING, 0)
    return total


def test_clearing_equals_the_stripe_balance_at_each_days_end_on_a_manual_account(
    manual: Shapes,
) -> None:
    created = [b["created"] for b in manual.bts]
    first = dt.datetime.fromtimestamp(min(created), dt.UTC).date()
    last = dt.datetime.fromtimestamp(max(created), dt.UTC).date()
    days = [first + dt.timedelta(days=k) for k in range((last - first).days + 1)]
    refs = manual.by_reference()
    daily = [r for r in refs if r.startswith("STRIPE-DAY-USD-")]
    assert len(daily) >= len(days) - 3  # a journal for (nearly) every day with activity
    for day in days:
        end = int(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp())
        balance = sum(b["net"] for b in manual.bts if b["created"] < end)
        # A payout Stripe took from the balance that has not arrived yet is in transit: its
        # journal is dated its arrival (docs/accounting.md).
        in_transit = sum(
            p["amount"] for p in manual.payouts if p["created"] < end and p["arrival_date"] >= end
        )
        assert _sage_clearing(manual, day) == balance + in_transit, day
    [usd] = [c for c in manual.result["reconciliation"]["clearing"] if c["currency"] == "USD"]
    assert usd["unexplained"] == 0


def test_the_report_shows_manual_payouts_and_daily_journals(manual: Shapes) -> None:
    with duckdb.connect(str(manual.env.db), read_only=True) as con:
        kinds = dict(
            con.execute(
                "SELECT recon_status, count(*) FROM ops.reconciliation GROUP BY 1"
            ).fetchall()
        )
    paid = [p for p in manual.payouts if p["status"] == "paid"]
    assert kinds.get("manual") == len(paid)
    days = {
        k: v
        for k, v in manual.result["reconciliation"]["balance_journals"].items()
        if k.startswith("stripe_day:")
    }
    assert days == {
        "stripe_day:posted": len([r for r in manual.by_reference() if r.startswith("STRIPE-DAY-")])
    }
    html = (manual.env.db.parent / "reconciliation.html").read_text()
    assert "STRIPE-DAY-USD-" in html and 'id="balance"' in html


@pytest.mark.parametrize("name", ["auto", "manual"])
def test_no_dead_letters_and_exactly_once_on_rerun(
    name: str, request: pytest.FixtureRequest
) -> None:
    shapes: Shapes = request.getfixturevalue(name)
    use_env(shapes.env, request.getfixturevalue("monkeypatch"), quality=ACCOUNTING_QUALITY)
    assert not any(shapes.result["load"]["dead"].values()), shapes.result["load"]
    again = run_flow(trigger="test")
    assert sum(again["load"]["posted"].values()) == 0
    with shapes.env.sage() as c:
        journals = sage_all(c, "journalentries")
    counts = Counter(j["reference"] for j in journals)
    assert max(counts.values()) == 1, [r for r, n in counts.items() if n > 1]
    assert len(journals) == expected_documents(shapes.env)["journal_entry"]


def test_the_new_stripe_objects_have_stripes_current_shapes(auto: Shapes) -> None:
    from devkit.sandbox.stripe_state import load_fixtures

    fixtures = load_fixtures()
    with auto.env.stripe() as s:
        for path, key in (
            ("/v1/topups", "topup"),
            ("/v1/application_fees", "application_fee"),
            ("/v1/transfers", "transfer"),
        ):
            objects = stripe_all(s, path)
            assert objects, path
            for obj in objects:
                assert set(obj) == set(fixtures[key]), (path, set(obj) ^ set(fixtures[key]))
                assert obj["object"] == key
        account = s.get("/v1/account").json()
        assert set(account) == set(fixtures["account"])
        assert account["settings"]["payouts"]["schedule"]["interval"] == "daily"


def test_stripe_refuses_to_itemise_a_manual_payout(manual: Shapes) -> None:
    with manual.env.stripe() as s:
        assert s.get("/v1/account").json()["settings"]["payouts"]["schedule"]["interval"] == (
            "manual"
        )
        answer = s.get("/v1/balance_transactions", params={"payout": manual.payouts[0]["id"]})
    assert answer.status_code == 400 and "manual" in answer.json()["error"]["message"]


def test_a_manual_account_under_sage_faults_posts_each_journal_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    env = make_env(tmp_path, charges=80, seed=71, monkeypatch=monkeypatch, manual_payouts=True)
    with env.pair:
        use_env(env, monkeypatch, quality=ACCOUNTING_QUALITY)
        first, second, injected = run_twice_under_sage_faults(
            env, seed=11, commit_then_503_rate=0.15
        )
        assert injected["commit_then_503"] > 0
        assert not any(first["load"]["dead"].values()) and not any(second["load"]["dead"].values())
        with env.sage() as c:
            journals = sage_all(c, "journalentries")
        counts = Counter(j["reference"] for j in journals)
        assert max(counts.values()) == 1, [r for r, n in counts.items() if n > 1]
        assert len(journals) == expected_documents(env)["journal_entry"]
        assert any(r.startswith("STRIPE-DAY-USD-") for r in counts)
        assert any(r.startswith("tu_") for r in counts)
