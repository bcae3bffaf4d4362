"""Every payout shape (issue 21), pure: categories and suspense, top-up journals, manual
payouts and the daily journals of an account paid out manually (docs/accounting.md §6)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import polars as pl
import pytest

from stripe_sage.errors import ConfigurationError
from stripe_sage.mapping import Accounts, default_mapping_text, load_mapping
from stripe_sage.reconcile.balance import OWN_DOCUMENT, recognise
from stripe_sage.reconcile.report import (
    payout_journal,
    plan_daily_journals,
    plan_payouts,
    plan_topups,
)

pytestmark = pytest.mark.unit
MAPPING = load_mapping()
# The categories docs/stripe.md ("Balance transaction reporting categories") lists.
STRIPE_MD_CATEGORIES = (
    "charge refund refund_failure dispute dispute_reversal fee payout payout_reversal topup "
    "topup_reversal transfer transfer_reversal platform_earning platform_earning_refund "
    "connect_reserved_funds risk_reserved_funds partial_capture_reversal tax other_adjustment"
).split()
UTC = dt.UTC


def member(cat: str, amount: int, fee: int = 0, n: int = 0) -> dict[str, Any]:
    return {
        "balance_transaction": f"txn_{cat}{n}",
        "reporting_category": cat,
        "amount": amount,
        "fee": fee,
        "net": amount - fee,
    }


def bts_frame(rows: list[tuple[str, str, dt.datetime, int, int, str | None]]) -> pl.DataFrame:
    """(id, category, created, amount, fee, source) → staged balance transactions."""
    return pl.DataFrame(
        {
            "id": [r[0] for r in rows],
            "reporting_category": [r[1] for r in rows],
            "type": [r[1] for r in rows],
            "created": [r[2] for r in rows],
            "amount": [r[3] for r in rows],
            "fee": [r[4] for r in rows],
            "net": [r[3] - r[4] for r in rows],
            "source": [r[5] for r in rows],
            "currency": ["usd"] * len(rows),
        },
        schema_overrides={"created": pl.Datetime("us", "UTC")},
    )


def lines_of(doc: dict[str, Any]) -> dict[str, int]:
    """Signed minor units per account (debit > 0) of a planned journal."""
    out: dict[str, int] = {}
    for line in json.loads(doc["payload"])["lines"]:
        value = round(float(line["debit"]) * 100) - round(float(line["credit"]) * 100)
        out[line["account"]] = out.get(line["account"], 0) + value
    return out


def test_every_category_stripe_lists_has_a_default_account() -> None:
    for cat in STRIPE_MD_CATEGORIES:
        name = MAPPING.reporting_categories.get(cat)
        assert name in Accounts.model_fields, f"{cat} has no default account"
        assert cat in OWN_DOCUMENT or name not in ("clearing", "bank"), cat


def test_connect_categories_post_to_their_own_accounts() -> None:
    members = [
        member("charge", 10_000, 320),
        member("platform_earning", 1_200),
        member("platform_earning_refund", -300, n=1),
        member("transfer", -4_000),
        member("transfer_reversal", 1_000, n=1),
    ]
    p = {"id": "po_1", "currency": "USD", "amount": sum(m["net"] for m in members)}
    lines, error, suspended = payout_journal(p, members, MAPPING)
    assert error is None and suspended == []
    assert dict(lines) == {
        "1000": p["amount"],
        "6100": 320,
        "4020": -900,  # application fees earned net of the refund: revenue (credit)
        "6200": 3_000,
        "1050": -10_000,
    }


def test_a_top_up_inside_a_payout_counts_as_already_cleared() -> None:
    members = [member("charge", 10_000, 320), member("topup", 50_000), member("topup_reversal", -5)]
    p = {"id": "po_1", "currency": "USD", "amount": sum(m["net"] for m in members)}
    lines, error, _ = payout_journal(p, members, MAPPING)
    assert error is None
    # Clearing gives up the charge's gross and the top-up's: the top-up journal debited it.
    assert dict(lines) == {"1000": 59_675, "6100": 320, "1050": -59_995}


def test_an_unknown_category_goes_to_suspense_with_a_flag_naming_it() -> None:
    members = [member("charge", 10_000, 320), member("lunar_levy", -1_234)]
    rec = recognise(members, MAPPING, "USD")
    assert rec.by_account["9990"] == 1_234
    flag = rec.flag("USD")
    assert flag is not None and flag.startswith("suspense:")
    assert "'lunar_levy'" in flag and "txn_lunar_levy0" in flag and "-12.34" in flag
    p = {"id": "po_9", "currency": "USD", "amount": 10_000 - 320 - 1_234}
    docs = plan_payouts(
        pl.DataFrame(
            {
                "id": ["po_9"],
                "automatic": [True],
                "status": ["paid"],
                "currency": ["USD"],
                "amount": [p["amount"]],
                "arrival_date": [dt.datetime(2026, 6, 3, tzinfo=UTC)],
                "failure_balance_transaction": [None],
            }
        ),
        pl.DataFrame({"payout": ["po_9", "po_9"], "balance_transaction": ["t1", "t2"]}),
        bts_frame(
            [
                ("t1", "charge", dt.datetime(2026, 6, 1, tzinfo=UTC), 10_000, 320, "ch_1"),
                ("t2", "lunar_levy", dt.datetime(2026, 6, 1, tzinfo=UTC), -1_234, 0, None),
            ]
        ),
        MAPPING,
    )
    [doc] = docs.to_dicts()
    assert doc["error"] is None and "lunar_levy" in doc["flag"]
    assert lines_of(doc) == {"1000": p["amount"], "6100": 320, "9990": 1_234, "1050": -10_000}


def test_old_mapping_files_load_and_take_the_defaults() -> None:
    text = default_mapping_text()
    text = text.replace('  platform_revenue: "4020"', "").replace('  suspense: "9990"', "")
    start = text.index("reporting_categories:")
    old = load_mapping(text=text[:start] + "reporting_categories:\n  charge: clearing\n")
    assert old.accounts.platform_revenue == "4020" and old.accounts.suspense == "9990"
    assert old.reporting_categories["platform_earning"] == "platform_revenue"
    assert old.reporting_categories["topup"] == "clearing"


def test_a_category_mapped_to_no_account_is_refused_naming_it() -> None:
    text = default_mapping_text() + "  made_up: no_such_account\n"
    with pytest.raises(ConfigurationError, match="made_up: 'no_such_account'"):
        load_mapping(text=text)


def test_top_up_and_its_reversal_each_get_one_journal() -> None:
    created = dt.datetime(2026, 6, 2, 13, tzinfo=UTC)
    bts = bts_frame(
        [
            ("txn_a", "topup", created, 50_000, 0, "tu_A"),
            ("txn_b", "topup_reversal", created + dt.timedelta(days=2), -50_000, 0, "tu_A"),
            ("txn_c", "charge", created, 999, 30, "ch_1"),
        ]
    )
    docs = plan_topups(bts, MAPPING).sort("doc_key")
    assert docs["doc_key"].to_list() == [
        "journal_entry:topup:tu_A",
        "journal_entry:topup_reversal:tu_A",
    ]
    topup, reversal = docs.to_dicts()
    assert lines_of(topup) == {"1050": 50_000, "1000": -50_000}
    assert lines_of(reversal) == {"1050": -50_000, "1000": 50_000}
    assert json.loads(topup["payload"])["reference"] == "tu_A"
    assert json.loads(topup["payload"])["entry_date"] == "2026-06-02"
    assert json.loads(reversal["payload"])["reference"] == "txn_b"
    assert reversal["depends_on"] == ["journal_entry:topup:tu_A"]


def test_a_manual_payout_moves_its_amount_from_clearing_to_the_bank() -> None:
    payouts = pl.DataFrame(
        {
            "id": ["po_m"],
            "automatic": [False],
            "status": ["paid"],
            "currency": ["USD"],
            "amount": [123_456],
            "arrival_date": [dt.datetime(2026, 6, 9, tzinfo=UTC)],
            "failure_balance_transaction": [None],
        }
    )
    empty_items = pl.DataFrame(schema={"payout": pl.String, "balance_transaction": pl.String})
    [doc] = plan_payouts(payouts, empty_items, bts_frame([]), MAPPING).to_dicts()
    assert doc["doc_key"] == "journal_entry:po_m" and doc["error"] is None
    assert lines_of(doc) == {"1000": 123_456, "1050": -123_456}
    assert json.loads(doc["payload"])["entry_date"] == "2026-06-09"


def test_daily_journals_recognise_fees_and_adjustments_per_utc_day() -> None:
    d1 = dt.datetime(2026, 6, 1, 23, 30, tzinfo=UTC)
    d2 = dt.datetime(2026, 6, 2, 0, 30, tzinfo=UTC)
    bts = bts_frame(
        [
            ("t1", "charge", d1, 10_000, 320, "ch_1"),
            ("t2", "dispute", d1, -4_000, 1_500, "du_1"),
            ("t3", "platform_earning", d1, 700, 0, "fee_1"),
            ("t4", "charge", d2, 5_000, 175, "ch_2"),
            ("t5", "lunar_levy", d2, -100, 0, None),
            ("t6", "topup", d2, 50_000, 0, "tu_1"),  # gross posts elsewhere, no fee
            ("t7", "payout", d2, -9_000, 0, "po_1"),
            ("t8", "charge", dt.datetime(2026, 6, 3, 1, tzinfo=UTC), 5_000, 175, "ch_3"),
        ]
    )
    docs = plan_daily_journals(bts, MAPPING, today=dt.date(2026, 6, 3)).sort("doc_key")
    # The day not over yet (June 3) is left for a later run.
    assert docs["doc_key"].to_list() == [
        "journal_entry:stripe_day:USD:2026-06-01",
        "journal_entry:stripe_day:USD:2026-06-02",
    ]
    day1, day2 = docs.to_dicts()
    assert lines_of(day1) == {
        "6100": 320,
        "6120": 1_500,
        "6110": 4_000,
        "4020": -700,
        "1050": -5_120,
    }
    assert day1["flag"] is None
    assert lines_of(day2) == {"6100": 175, "9990": 100, "1050": -275}
    assert "lunar_levy" in day2["flag"]
    assert json.loads(day2["payload"])["reference"] == "STRIPE-DAY-USD-2026-06-02"
    assert json.loads(day2["payload"])["entry_date"] == "2026-06-02"


def test_a_day_of_gross_amounts_only_gets_no_daily_journal() -> None:
    d = dt.datetime(2026, 6, 1, 12, tzinfo=UTC)
    bts = bts_frame([("t1", "topup", d, 50_000, 0, "tu_1"), ("t2", "refund", d, -500, 0, "re")])
    assert plan_daily_journals(bts, MAPPING, today=dt.date(2026, 6, 5)).is_empty()


def test_on_an_automatic_account_days_a_manual_payout_swept_get_their_daily_journal(
    tmp_path: Any,
) -> None:
    """What a payout made by hand took between automatic payouts (no automatic payout lists
    it, yet a later one lists what became available after it) is recognised by its days'
    journals; what merely waits for the next automatic payout is not, nor is anything while
    a paid automatic payout is not itemised yet."""
    from stripe_sage.plan.outbox import _balance_documents
    from stripe_sage.store.staging import Staging

    def at(day: int, hour: int) -> dt.datetime:
        return dt.datetime(2026, 6, day, hour, tzinfo=UTC)

    bts = bts_frame(
        [
            ("t_auto1", "charge", at(1, 10), 10_000, 320, "ch_1"),
            ("t_swept", "charge", at(2, 9), 8_000, 300, "ch_2"),
            ("t_swept_dispute", "dispute", at(4, 1), -4_000, 1_500, "du_1"),
            ("t_manual", "payout", at(4, 2), -2_200, 0, "po_manual"),
            ("t_later", "charge", at(4, 10), 5_000, 175, "ch_3"),
            ("t_po_auto2", "payout", at(7, 6), -4_825, 0, "po_auto2"),
            ("t_pending", "charge", at(5, 10), 6_000, 204, "ch_4"),
        ]
    ).with_columns(
        pl.Series(
            "available_on",
            [at(3, 0), at(4, 0), at(4, 1), at(4, 2), at(6, 0), at(7, 6), at(7, 0)],
        )
    )
    items = pl.DataFrame(
        {
            "payout": ["po_auto1", "po_auto2", "po_auto2"],
            "balance_transaction": ["t_auto1", "t_later", "t_po_auto2"],
        }
    )
    payouts = pl.DataFrame(
        {
            "id": ["po_auto1", "po_manual", "po_auto2", "po_auto3"],
            "automatic": [True, False, True, True],
            "status": ["paid", "paid", "paid", "in_transit"],
        }
    )
    with Staging(tmp_path / "s.duckdb") as st:
        st.set_payout_interval("acct_1", "daily")
        for table, frame in (
            ("balance_transactions", bts),
            ("payout_items", items),
            ("payouts", payouts),
        ):
            with st.registered("_rows", frame):
                st.con.execute(f"INSERT INTO staging.{table} BY NAME SELECT * FROM _rows")

        def planned() -> dict[str, dict[str, int]]:
            *_, daily = _balance_documents(st, MAPPING, None, today=dt.date(2026, 6, 8))
            return {r["doc_key"]: lines_of(r) for r in daily.to_dicts()}

        assert planned() == {
            "journal_entry:stripe_day:USD:2026-06-02": {"6100": 300, "1050": -300},
            "journal_entry:stripe_day:USD:2026-06-04": {
                "6120": 1_500,
                "6110": 4_000,
                "1050": -5_500,
            },
        }
        # A paid automatic payout not itemised yet may be the one that lists them: wait.
        st.con.execute("UPDATE staging.payouts SET status = 'paid' WHERE id = 'po_auto3'")
        assert planned() == {}


def test_a_payout_journal_is_the_same_whatever_order_its_transactions_are_read_in() -> None:
    """A re-planned or previewed journal must not read as changed because a join returned
    its transactions in another order: its lines follow the transactions' time."""
    t = dt.datetime(2026, 6, 2, 9, tzinfo=UTC)
    rows = [
        ("txn_1", "charge", t, 10_000, 320, "ch_1"),
        ("txn_2", "dispute", t + dt.timedelta(hours=1), -5_000, 1_500, "dp_1"),
        ("txn_3", "other_adjustment", t + dt.timedelta(hours=2), -700, 0, None),
        ("txn_4", "refund", t + dt.timedelta(hours=3), -2_000, 0, "re_1"),
        ("txn_5", "fee", t + dt.timedelta(hours=4), -150, 0, None),
    ]
    bts = bts_frame(rows)
    net = sum(r[3] - r[4] for r in rows)
    payouts = pl.DataFrame(
        {
            "id": ["po_1"],
            "automatic": [True],
            "status": ["paid"],
            "currency": ["USD"],
            "amount": [net],
            "arrival_date": [t + dt.timedelta(days=2)],
            "failure_balance_transaction": [None],
        }
    )
    items = pl.DataFrame(
        {"payout": ["po_1"] * len(rows), "balance_transaction": [r[0] for r in rows]}
    )
    payloads = {
        plan_payouts(
            payouts,
            items.sample(fraction=1.0, shuffle=True, seed=seed),
            bts.sample(fraction=1.0, shuffle=True, seed=seed + 100),
            MAPPING,
        )["payload"][0]
        for seed in range(8)
    }
    assert len(payloads) == 1, payloads
    accounts = [line["account"] for line in json.loads(payloads.pop())["lines"]]
    # By the transactions' time: merchant fees (the charge), the dispute's fee and amount,
    # the adjustment, then the bank and clearing (the charge and refund are own documents).
    assert accounts == ["6100", "6120", "6110", "6190", "1000", "1050"], accounts
