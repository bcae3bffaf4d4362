"""The console's pure parts: password hashing, the likely-fix table, its own store's login
throttle, sessions and action records (SQLite in tmp_path)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pytest

from stripe_sage.console import store as console_store
from stripe_sage.console.advice import DEFAULT_ADVICE, likely_fix
from stripe_sage.console.passwords import hash_password, verify_password
from stripe_sage.console.store import MAX_FAILURES, ConsoleStore, Throttled
from stripe_sage.store.snapshot import reason_class_sql

pytestmark = pytest.mark.unit


def test_passwords_are_salted_and_verified() -> None:
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a != b and "correct horse" not in a  # salted, never stored in clear
    assert verify_password("correct horse", a) and verify_password("correct horse", b)
    assert not verify_password("correct hors", a)
    assert not verify_password("x", "not-a-hash")


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        (
            "dead",
            "metadata.erp_order_id SO7777777: Sage has no such sales order "
            "(charges.unknown_erp_order: reject)",
            "Create sales order SO7777777 in Sage",
        ),
        ("dead", "422 period_closed: 2026-06 is closed", "Open the fiscal period"),
        (
            "dead",
            "customer_id C000123, which does not exist in Sage",
            "existing Sage customer (metadata sage_customer_id C000123)",
        ),
        ("waiting", "waiting: balance transaction not staged", "Nothing to do yet"),
        ("blocked", "blocked by invoice:ch_1 (dead)", "Fix the document it depends on"),
        ("quarantined", "not_null: amount is null", "correct it in Stripe"),
    ],
)
def test_likely_fix_names_what_to_change(state: str, reason: str, expected: str) -> None:
    assert expected in likely_fix(state, reason)


def test_an_unknown_reason_gets_the_general_advice() -> None:
    assert likely_fix("dead", "something Sage never said before") == DEFAULT_ADVICE


def test_reasons_differing_only_in_ids_group_together() -> None:
    con = duckdb.connect()
    expr = reason_class_sql("r")
    rows = con.execute(
        f"SELECT DISTINCT {expr} FROM (VALUES "
        "('metadata.erp_order_id SO7777777: Sage has no such sales order'), "
        "('metadata.erp_order_id SO1234567: Sage has no such sales order'), "
        "('blocked by invoice:ch_3Nabc (dead)'), ('blocked by invoice:ch_9Zxy (dead)')) t(r)"
    ).fetchall()
    assert sorted(r[0] for r in rows) == [
        "blocked by invoice:<id> (dead)",
        "metadata.erp_order_id <no>: Sage has no such sales order",
    ]


def test_login_throttles_after_repeated_wrong_passwords(tmp_path: Path) -> None:
    store = ConsoleStore(tmp_path / "console.sqlite3")
    store.set_password("finance", "a long password", role="admin")
    for _ in range(MAX_FAILURES):
        assert store.login("finance", "wrong") is None
    with pytest.raises(Throttled):  # even the right password, until the window passes
        store.login("finance", "a long password")
    store._con().execute(
        "UPDATE login_failures SET at = ?",
        ((dt.datetime.now(dt.UTC) - console_store.FAILURE_WINDOW).isoformat(),),
    )
    assert store.login("finance", "a long password") is not None


def test_sessions_expire_and_a_new_password_ends_them(tmp_path: Path) -> None:
    store = ConsoleStore(tmp_path / "console.sqlite3", session_minutes=60)
    store.set_password("audit", "another long one", role="auditor")
    token = store.login("audit", "another long one")
    session = store.session(token)
    assert session is not None and session.role == "auditor" and len(session.csrf) > 30
    # The stored token is a hash: the file alone logs nobody in.
    assert token not in {r[0] for r in store._con().execute("SELECT token_hash FROM sessions")}
    store._con().execute(
        "UPDATE sessions SET expires_at = ?", (dt.datetime.now(dt.UTC).isoformat(),)
    )
    assert store.session(token) is None
    token = store.login("audit", "another long one")
    store.set_password("audit", "a changed password", role="auditor")
    assert store.session(token) is None
    with pytest.raises(ValueError):
        store.set_password("x", "y", role="owner")


def test_actions_are_recorded_with_who_when_and_outcome(tmp_path: Path) -> None:
    store = ConsoleStore(tmp_path / "console.sqlite3")
    first = store.record("finance", "replay", "invoice:ch_1", ["invoice:ch_1"])
    store.finish(first, "done", "released 1 dead letters; dead again: []")
    store.record("finance", "resolve", "invoice:ch_2", ["invoice:ch_2"], note="voided in Sage")
    on_first = store.actions(doc_key="invoice:ch_1")
    assert [(a["action"], a["status"], a["user"]) for a in on_first] == [
        ("replay", "done", "finance")
    ]
    assert store.resolved()["invoice:ch_2"]["note"] == "voided in Sage"
    assert "invoice:ch_1" not in store.resolved()


# -- the mapping editor's pure part -------------------------------------------------------------
def test_the_default_mapping_round_trips_byte_for_byte() -> None:
    from stripe_sage.console.mapping_editor import dump_tree, load_tree
    from stripe_sage.mapping import default_mapping_text

    text = default_mapping_text()
    assert dump_tree(load_tree(text)) == text


def test_a_form_change_keeps_comments_and_quoting_and_validates() -> None:
    from stripe_sage.console.mapping_editor import apply_form
    from stripe_sage.mapping import default_mapping_text, load_mapping

    text = default_mapping_text()
    change = apply_form(
        text,
        {
            "/accounts/merchant_fees": "6190",
            "/refunds/credit_memo/reason/value_map/fraudulent": "",  # emptied: removed
            "+/refunds/credit_memo/reason/value_map": "expired_uncaptured_charge",
            "+/refunds/credit_memo/reason/value_map:value": "Expired",
            "/customers/fields/email/max_length": "61",
        },
    )
    assert not change.errors
    mapping = load_mapping(text=change.text)
    assert mapping.accounts.merchant_fees == "6190"  # still a string: the quotes were kept
    memo = mapping.refunds.credit_memo["reason"].value_map or {}
    assert memo.get("expired_uncaptured_charge") == "Expired" and "fraudulent" not in memo
    assert mapping.customers.fields["email"].max_length == 61
    assert [ln for ln in text.splitlines() if "#" in ln] == [
        ln for ln in change.text.splitlines() if "#" in ln
    ]
    assert len(change.changed) == 4


def test_form_errors_name_the_field() -> None:
    from stripe_sage.console.mapping_editor import apply_form
    from stripe_sage.mapping import default_mapping_text

    text = default_mapping_text()
    typed = apply_form(text, {"/customers/fields/email/max_length": "sixty"})
    assert "whole number" in typed.errors["/customers/fields/email/max_length"]
    assert typed.typed["/customers/fields/email/max_length"] == "sixty"
    invalid = apply_form(text, {"/source_code": "STR"})
    assert "pattern" in invalid.errors["/source_code"]
    unknown = apply_form(text, {"/customers/fields/email/from": "e_mail"})
    assert "unknown field 'e_mail'" in unknown.errors["/customers/fields/email/from"]
    assert apply_form(text, {"/source_code": "ST"}).text == text  # unchanged: same bytes


def test_the_exception_list_pages_and_counts_by_the_stored_reason_class() -> None:
    from stripe_sage.console import reads

    con = duckdb.connect()
    con.execute("CREATE SCHEMA ops")
    con.execute(
        "CREATE TABLE ops.unposted AS SELECT 'invoice:ch_' || i AS doc_key, 'invoice' AS "
        "doc_type, 'ch_' || i AS stripe_id, CASE WHEN i % 3 = 0 THEN 'waiting' ELSE 'dead' "
        "END AS state, 'customer_id C' || i || ', which does not exist in Sage' AS reason, "
        "TIMESTAMP '2026-01-01' + i * INTERVAL 1 MINUTE AS since, 1 AS attempts, "
        "'customer_id C<n>, which does not exist in Sage' AS reason_class FROM range(450) t(i)"
    )
    dead = 450 - 150
    first, total = reads.exceptions(con, state="dead")
    assert total == dead and len(first) == reads.PAGE_ROWS
    last, total = reads.exceptions(con, state="dead", offset=reads.PAGE_ROWS)
    assert total == dead and len(last) == dead - reads.PAGE_ROWS
    assert not {r["doc_key"] for r in first} & {r["doc_key"] for r in last}
    assert reads.exceptions(con, state="dead", offset=1000) == ([], dead)
    same, n = reads.exceptions(con, reason_class="customer_id C<n>, which does not exist in Sage")
    assert n == 450 and "existing Sage customer" in same[0]["fix"]
    keys = reads.keys_with_reason(con, "customer_id C<n>, which does not exist in Sage")
    assert len(keys) == dead


def test_a_run_copies_the_mapping_versions_for_analysts(tmp_path: Path) -> None:
    from stripe_sage.store.staging import Staging
    from tasks.staging import copy_console_records

    store = ConsoleStore(tmp_path / "console.sqlite3")
    store.set_password("finance", "finance-pass-1234")
    first = store.add_mapping_version("(file)", "/m.yaml", "version: 1\n", "as found")
    second = store.add_mapping_version("finance", "/m.yaml", "version: 1 # x\n", "a: 1 → 2")
    with Staging(tmp_path / "stripe_sage.duckdb") as st:
        counts = copy_console_records.fn(st, tmp_path / "console.sqlite3")
        rows = st.con.execute(
            'SELECT id, "user", note, text FROM ops.console_mapping_versions ORDER BY id'
        ).fetchall()
    assert counts["mapping_versions"] == 2
    assert rows == [
        (first, "(file)", "as found", "version: 1\n"),
        (second, "finance", "a: 1 → 2", "version: 1 # x\n"),
    ]


def test_a_replay_a_stopped_console_was_running_becomes_interrupted(tmp_path: Path) -> None:
    """A console killed while its replay ran never records the outcome: the next console
    marks that action interrupted (with what to do), and leaves a live console's alone."""
    import subprocess
    import sys

    path = tmp_path / "console.sqlite3"
    # A console process that started a replay and died before recording its outcome.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from stripe_sage.console.store import ConsoleStore; "
            "ConsoleStore(sys.argv[1]).record("
            "'finance', 'replay', 'ch_dead', ['cash_receipt:ch_dead'])",
            str(path),
        ],
        check=True,
    )
    store = ConsoleStore(path)
    live = store.record("finance", "replay", "ch_live", ["cash_receipt:ch_live"])
    done = store.record("finance", "resolve", "ch_x", ["cash_receipt:ch_x"], status="done")
    [dead] = [a["id"] for a in store.actions() if a["target"] == "ch_dead"]
    assert store.interrupt_orphans() == [dead]
    by_id = {a["id"]: a for a in store.actions()}
    assert by_id[dead]["status"] == "interrupted"
    assert "replay what is still unposted" in by_id[dead]["outcome"]
    assert by_id[dead]["finished_at"]
    assert by_id[live]["status"] == "started" and by_id[done]["status"] == "done"
    assert store.interrupt_orphans() == []  # once
