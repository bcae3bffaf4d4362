"""The expectation suites and the GX validation runner, on small staged-like Polars frames."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from quality import runner, suites
from quality.runner import (
    StreamValidation,
    build_data_docs,
    check_wholesale,
    render_markdown,
    validate_stream,
)
from stripe_sage.errors import DataQualityError
from stripe_sage.stripe.streams import STREAMS

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CREATED = datetime(2026, 2, 1, 9, 30, tzinfo=UTC)
RUN = "run-test"

_POLARS_TYPES: dict[str, pl.DataType] = {
    "VARCHAR": pl.String(),
    "BIGINT": pl.Int64(),
    "INTEGER": pl.Int32(),
    "BOOLEAN": pl.Boolean(),
    "DOUBLE": pl.Float64(),
    "TIMESTAMPTZ": pl.Datetime("us", "UTC"),
    "JSON": pl.String(),
    "VARCHAR[]": pl.List(pl.String()),
}

# One good row per stream, as Stripe would stage it; ``i`` makes ids distinct.
_GOOD: dict[str, Callable[[int], dict[str, Any]]] = {
    "customers": lambda i: {"id": f"cus_{i:04d}", "created": CREATED, "name": f"C{i}",
                            "email": f"c{i}@example.com", "currency": None},
    "charges": lambda i: {"id": f"ch_{i:04d}", "created": CREATED, "amount": 1000 + i,
                          "amount_captured": 1000 + i, "amount_refunded": 0, "currency": "USD",
                          "status": "succeeded", "customer": "cus_0000"},
    "refunds": lambda i: {"id": f"re_{i:04d}", "created": CREATED, "amount": 500,
                          "currency": "USD", "charge": f"ch_{i:04d}", "status": "succeeded"},
    "invoices": lambda i: {"id": f"in_{i:04d}", "created": CREATED, "status": "paid",
                           "currency": "EUR", "subtotal": 900, "tax": 100, "total": 1000,
                           "amount_due": 1000, "amount_paid": 1000, "amount_remaining": 0},
    "invoice_lines": lambda i: {"id": f"il_{i:04d}", "invoice": f"in_{i:04d}", "amount": -50,
                                "currency": "EUR", "quantity": None},
    "invoice_payments": lambda i: {"id": f"inpay_{i:04d}", "created": CREATED,
                                   "invoice": f"in_{i:04d}", "amount_paid": 1000,
                                   "currency": "JPY", "status": "paid"},
    "payouts": lambda i: {"id": f"po_{i:04d}", "created": CREATED, "amount": 250_000,
                          "currency": "KWD", "status": "in_transit"},
    "balance_transactions": lambda i: {"id": f"txn_{i:04d}", "created": CREATED, "amount": 1000,
                                       "fee": 59, "net": 941, "fee_details_total": 59,
                                       "currency": "USD", "status": "available",
                                       "type": "charge"},
    "disputes": lambda i: {"id": f"du_{i:04d}", "created": CREATED, "amount": 1000,
                           "currency": "USD", "charge": f"ch_{i:04d}", "status": "needs_response"},
    "subscriptions": lambda i: {"id": f"sub_{i:04d}", "created": CREATED,
                                "customer": "cus_0000", "status": "active", "currency": "USD"},
    "products": lambda i: {"id": f"prod_{i:04d}", "created": CREATED, "name": f"Product {i}"},
    "tax_rates": lambda i: {"id": f"txr_{i:04d}", "created": CREATED, "display_name": "VAT",
                            "jurisdiction": "GB", "inclusive": True},
    "credit_notes": lambda i: {"id": f"cn_{i:04d}", "created": CREATED, "status": "issued",
                               "invoice": f"in_{i:04d}", "customer": "cus_0000",
                               "currency": "USD", "subtotal": 1000, "total": 1082},
    "checkout_sessions": lambda i: {"id": f"cs_test_{i:04d}", "created": CREATED,
                                    "status": "complete", "currency": "USD",
                                    "amount_total": 2000 + i},
    "checkout_line_items": lambda i: {"id": f"li_{i:04d}", "session": f"cs_test_{i:04d}",
                                      "currency": "USD", "amount_subtotal": 1000,
                                      "quantity": 2},
}  # fmt: skip


class Rows:
    """A fluent builder of staged rows: ``Rows("charges", 5).set(2, currency="XYZ").frame()``."""

    def __init__(self, stream: str, n: int = 5) -> None:
        self.stream = stream
        self.rows = [_GOOD[stream](i) for i in range(n)]

    def set(self, i: int, **changes: Any) -> Rows:
        self.rows[i] = {**self.rows[i], **changes}
        return self

    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    def frame(self, **dtypes: pl.DataType) -> pl.DataFrame:
        staged = {c.name: c.sql_type for c in STREAMS[self.stream].columns}
        columns = list(self.rows[0]) if self.rows else list(_GOOD[self.stream](0))
        schema = {c: dtypes.get(c, _POLARS_TYPES[staged[c]]) for c in columns}
        return pl.DataFrame(self.rows, schema=schema, orient="row")


def known(n: int = 5) -> dict[str, set[str]]:
    return {
        "charges": {f"ch_{i:04d}" for i in range(n)},
        "invoices": {f"in_{i:04d}" for i in range(n)},
        "checkout_sessions": {f"cs_test_{i:04d}" for i in range(n)},
    }


def validate(rows: Rows, **kw: Any) -> StreamValidation:
    kw.setdefault("known_ids", known(len(rows.rows)))
    return validate_stream(rows.stream, rows.frame(), now=NOW, run_id=RUN, **kw)


def quarantined(v: StreamValidation) -> set[tuple[str | None, str]]:
    return {(r["id"], r["check"]) for r in v.quarantine.iter_rows(named=True)}


# --- suites as data ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", list(STREAMS))
def test_given_each_staged_stream_then_its_suite_reads_only_staged_columns(stream: str) -> None:
    suite = suites.build_suite(stream, now=NOW)
    staged = {c.name for c in STREAMS[stream].columns}
    read = set(suite.check("columns_present").params["columns"])
    assert read, stream
    assert read <= staged, read - staged
    assert {"id_not_null", "id_unique", "id_format"} <= {c.name for c in suite.checks}


def test_given_previous_rows_then_row_count_rule_catches_a_collapse_only() -> None:
    assert suites.row_count_bounds(None) is None
    assert suites.row_count_bounds(999) is None
    assert suites.row_count_bounds(5000) == (500, None)


# --- good rows -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", list(STREAMS))
def test_given_good_rows_when_validated_then_all_pass(stream: str) -> None:
    rows = Rows(stream, 4)
    v = validate(rows)
    assert v.quarantine.is_empty(), v.quarantine.to_dicts()
    assert v.success
    assert v.rows == 4
    assert v.failed_rows == 0
    assert sorted(v.passed_ids.to_list()) == sorted(rows.ids())
    assert v.results and all(r["success"] for r in v.results)
    check_wholesale(v, previous_rows=None)


def test_given_results_then_one_summary_per_expectation() -> None:
    v = validate(Rows("charges", 3).set(1, currency="XYZ"))
    names = [r["check"] for r in v.results]
    assert len(names) == len(set(names)) == len(suites.build_suite("charges", now=NOW).checks)
    currency = next(r for r in v.results if r["check"] == "currency_known")
    assert currency["expectation"] == "expect_column_values_to_be_in_set"
    assert currency["column"] == "currency"
    assert (currency["success"], currency["unexpected_count"], currency["element_count"]) == (
        False, 1, 3,
    )  # fmt: skip
    assert not v.success


# --- one bad row, quarantined with the right check and a reason naming the field ----------

CASES = [
    ("charges", {"currency": "XYZ"}, "currency_known", "currency 'XYZ'"),
    ("charges", {"created": datetime(1990, 1, 1, tzinfo=UTC)}, "created_range", "created 1990"),
    ("charges", {"created": NOW + timedelta(days=2)}, "created_range", "created 2026-03-03"),
    ("charges", {"id": "xx_0002"}, "id_format", "id 'xx_0002'"),
    ("charges", {"status": "refunded"}, "status_known", "status 'refunded'"),
    ("charges", {"amount_refunded": 5000}, "amount_refunded_within_amount", "amount_refunded"),
    ("refunds", {"charge": "ch_unknown"}, "charge_exists", "charge 'ch_unknown'"),
    ("refunds", {"amount": 0}, "amount_range", "amount 0"),
    ("refunds", {"charge": None}, "charge_not_null", "charge is null"),
    ("balance_transactions", {"net": 900}, "net_equals_amount_minus_fee", "net 900"),
    ("balance_transactions", {"fee_details_total": 30}, "fee_details_sum_equals_fee",
     "fee_details_total 30"),
    ("invoice_lines", {"invoice": "in_gone"}, "invoice_exists", "invoice 'in_gone'"),
    ("invoice_payments", {"invoice": "in_gone"}, "invoice_exists", "invoice 'in_gone'"),
    ("disputes", {"charge": "ch_gone"}, "charge_exists", "charge 'ch_gone'"),
    ("payouts", {"amount": -100}, "amount_range", "amount -100"),
    ("invoices", {"status": "deleted"}, "status_known", "status 'deleted'"),
    ("customers", {"currency": "usd"}, "currency_known", "currency 'usd'"),
    ("subscriptions", {"id": "sub_bad-id"}, "id_format", "id 'sub_bad-id'"),
]  # fmt: skip


@pytest.mark.parametrize(("stream", "change", "check", "named"), CASES)
def test_given_one_bad_row_then_only_it_is_quarantined_for_that_check(
    stream: str, change: dict[str, Any], check: str, named: str
) -> None:
    rows = Rows(stream, 5).set(2, **change)
    v = validate(rows)
    bad_id = rows.rows[2]["id"]
    assert quarantined(v) == {(bad_id, check)}
    (row,) = v.quarantine.to_dicts()
    assert row["stream"] == stream
    assert row["run_id"] == RUN
    assert named in row["reason"], row["reason"]
    assert sorted(v.passed_ids.to_list()) == sorted(i for i in rows.ids() if i != bad_id)
    assert v.failed_rows == 1
    check_wholesale(v, previous_rows=None)  # one bad row is quarantine, not a stop


def test_given_created_within_one_day_ahead_then_it_passes() -> None:
    v = validate(Rows("charges", 3).set(0, created=NOW + timedelta(hours=23)))
    assert v.quarantine.is_empty()


def test_given_duplicated_id_then_every_occurrence_is_quarantined() -> None:
    rows = Rows("charges", 5).set(3, id="ch_0001")
    v = validate(rows)
    assert v.quarantine.filter(pl.col("check") == "id_unique")["id"].to_list() == [
        "ch_0001", "ch_0001",
    ]  # fmt: skip
    assert quarantined(v) == {("ch_0001", "id_unique")}
    assert "id 'ch_0001' appears more than once" in v.quarantine["reason"][0]
    assert sorted(v.passed_ids.to_list()) == ["ch_0000", "ch_0002", "ch_0004"]


def test_given_null_id_then_quarantined_with_null_id_and_not_passed() -> None:
    v = validate(Rows("payouts", 3).set(1, id=None))
    assert quarantined(v) == {(None, "id_not_null")}
    assert v.passed_ids.to_list() == ["po_0000", "po_0002"]


def test_given_a_row_failing_two_checks_then_one_quarantine_row_per_check() -> None:
    v = validate(Rows("charges", 3).set(1, currency="XYZ", status="weird"))
    assert quarantined(v) == {("ch_0001", "currency_known"), ("ch_0001", "status_known")}
    assert v.failed_rows == 1


def test_given_known_ids_as_series_then_references_resolve() -> None:
    rows = Rows("refunds", 3).set(0, charge="ch_other")
    ids = pl.Series(["ch_0001", "ch_0002", "ch_other"])
    v = validate(rows, known_ids={"charges": ids})
    assert quarantined(v) == set()
    v = validate(rows, known_ids={"charges": pl.Series(["ch_0001"])})
    assert quarantined(v) == {("re_0000", "charge_exists"), ("re_0002", "charge_exists")}


def test_given_missing_known_ids_for_a_reference_then_value_error() -> None:
    with pytest.raises(ValueError, match="known_ids for charges"):
        validate(Rows("refunds", 2), known_ids={})


def test_given_nullable_amounts_then_integers_survive_the_pandas_conversion() -> None:
    v = validate(Rows("invoice_lines", 3).set(0, quantity=2).set(1, quantity=-1))
    assert quarantined(v) == {("il_0001", "quantity_range")}
    assert next(r for r in v.results if r["check"] == "quantity_integer")["success"]


# --- wholesale failures ---------------------------------------------------------------------


def test_given_80_percent_bad_rows_then_wholesale_failure() -> None:
    rows = Rows("charges", 50)
    for i in range(40):
        rows.set(i, currency="XYZ")
    v = validate(rows)
    assert v.failed_rows == 40
    assert v.quarantine.height == 40
    with pytest.raises(DataQualityError, match=r"40 of 50 rows \(80%\)"):
        check_wholesale(v, previous_rows=None)


def test_given_half_bad_rows_then_not_wholesale() -> None:
    rows = Rows("charges", 20)
    for i in range(10):
        rows.set(i, currency="XYZ")
    check_wholesale(validate(rows), previous_rows=None)


def test_given_few_rows_mostly_bad_then_only_quarantined() -> None:
    v = validate(Rows("charges", 4).set(0, currency="XYZ").set(1, currency="XYZ").set(2, id="x"))
    assert v.failed_fraction == 0.75
    check_wholesale(v, previous_rows=None)
    with pytest.raises(DataQualityError):
        check_wholesale(v, previous_rows=None, min_rows=1)


def test_given_zero_rows_after_thousands_then_wholesale_failure() -> None:
    empty = Rows("charges", 0).frame()
    v = validate_stream("charges", empty, now=NOW, run_id=RUN, previous_rows=5000)
    row_count = next(r for r in v.results if r["check"] == "row_count")
    assert (row_count["level"], row_count["success"]) == ("table", False)
    with pytest.raises(DataQualityError, match="row_count"):
        check_wholesale(v, previous_rows=5000)


def test_given_row_count_only_known_at_wholesale_time_then_same_rule_applies() -> None:
    v = validate_stream("charges", Rows("charges", 0).frame(), now=NOW, run_id=RUN)
    with pytest.raises(DataQualityError, match="expected at least 500 after 5000"):
        check_wholesale(v, previous_rows=5000)
    check_wholesale(v, previous_rows=500)  # small streams fluctuate: no rule


def test_given_a_small_delta_of_a_large_table_then_current_rows_compares_like_with_like() -> None:
    delta = validate(Rows("charges", 3))
    check_wholesale(delta, previous_rows=5000, current_rows=5003)
    with pytest.raises(DataQualityError, match="expected at least 500 after 5000"):
        check_wholesale(delta, previous_rows=5000, current_rows=3)


def test_given_modest_drop_then_not_wholesale() -> None:
    v = validate(Rows("charges", 30), previous_rows=200)
    check_wholesale(v, previous_rows=200)
    assert "row_count" not in {r["check"] for r in v.results}


def test_given_missing_column_then_table_level_failure_names_it() -> None:
    frame = Rows("balance_transactions", 3).frame().drop("fee_details_total")
    v = validate_stream("balance_transactions", frame, now=NOW, run_id=RUN)
    columns = next(r for r in v.results if r["check"] == "columns_present")
    assert not columns["success"]
    assert v.quarantine.is_empty()
    with pytest.raises(DataQualityError, match="missing fee_details_total"):
        check_wholesale(v, previous_rows=None)


def test_given_float_amounts_then_integer_check_fails_wholesale() -> None:
    frame = Rows("refunds", 3).frame(amount=pl.Float64())
    v = validate_stream("refunds", frame, known_ids=known(), now=NOW, run_id=RUN)
    assert not next(r for r in v.results if r["check"] == "amount_integer")["success"]
    with pytest.raises(DataQualityError, match="amount_integer"):
        check_wholesale(v, previous_rows=None)


# --- empty frames ---------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [Rows("charges", 0).frame(), pl.DataFrame()])
def test_given_empty_frame_then_it_validates_trivially(frame: pl.DataFrame) -> None:
    v = validate_stream("charges", frame, now=NOW, run_id=RUN)
    assert (v.rows, v.success, v.failed_rows) == (0, True, 0)
    assert v.quarantine.is_empty()
    assert v.quarantine.columns == ["stream", "id", "check", "reason", "run_id"]
    assert v.passed_ids.is_empty()
    check_wholesale(v, previous_rows=None)


# --- reports --------------------------------------------------------------------------------


def test_render_markdown_has_one_line_per_stream_with_failed_checks() -> None:
    bad = validate(Rows("charges", 4).set(0, currency="XYZ").set(1, currency="ABC"))
    good = validate(Rows("refunds", 2))
    text = render_markdown([bad, good])
    lines = text.strip().splitlines()
    assert lines[0] == "| stream | rows | failed rows | checks failed |"
    assert lines[2] == "| charges | 4 | 2 | currency_known (2) |"
    assert lines[3] == "| refunds | 2 | 0 | none |"


def test_build_data_docs_writes_gx_site_with_the_suites(tmp_path: Path) -> None:
    validations = [
        validate(Rows("charges", 3).set(0, currency="XYZ")),
        validate(Rows("refunds", 2)),
    ]
    index = build_data_docs(validations, tmp_path)
    assert index == tmp_path.resolve() / "index.html"
    text = index.read_text()
    assert "staging.charges" in text
    assert "staging.refunds" in text
    pages = list((tmp_path / "validations" / "staging" / "charges" / RUN).rglob("*.html"))
    assert len(pages) == 1
    assert "currency" in pages[0].read_text()


def test_validate_stream_with_docs_dir_writes_docs(tmp_path: Path) -> None:
    validate(Rows("payouts", 2), docs_dir=tmp_path)
    assert "staging.payouts" in (tmp_path / "index.html").read_text()


def test_a_later_run_renders_only_its_own_pages_and_the_index_lists_both(tmp_path: Path) -> None:
    first = validate(Rows("charges", 3))
    build_data_docs([first], tmp_path)
    page = next((tmp_path / "validations" / "staging" / "charges" / RUN).rglob("*.html"))
    page.write_text("rendered by the first run")  # a second full build would overwrite it
    later = validate_stream(
        "charges", Rows("charges", 2).frame(), now=NOW, run_id="run-later",
        known_ids=known(2),
    )  # fmt: skip
    index = build_data_docs([later], tmp_path)
    assert index is not None
    assert page.read_text() == "rendered by the first run"
    assert list((tmp_path / "validations" / "staging" / "charges" / "run-later").rglob("*.html"))
    text = index.read_text()
    assert RUN in text and "run-later" in text


def test_a_sites_index_keeps_the_latest_results_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner._GreatExpectations, "MAX_RESULTS_PER_SITE", 2)
    for n in range(3):
        v = validate_stream(
            "payouts", Rows("payouts", 1).frame(), now=NOW, run_id=f"run-{n}", known_ids=known(1)
        )
        index = build_data_docs([v], tmp_path)
    assert index is not None
    text = index.read_text()
    assert "run-0" not in text
    assert "run-1" in text and "run-2" in text


def test_given_gx_docs_fail_then_plain_html_report_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> Path:
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(runner._GreatExpectations, "build_docs", broken)
    v = validate(Rows("charges", 3).set(0, currency="XYZ"))
    index = build_data_docs([v], tmp_path)
    assert index is not None
    text = index.read_text()
    assert "staging.charges" in text
    assert "<td>currency_known</td>" in text
    assert "class='fail'" in text


def test_given_nothing_validated_then_no_docs(tmp_path: Path) -> None:
    v = validate_stream("charges", pl.DataFrame(), now=NOW, run_id=RUN)
    assert build_data_docs([v], tmp_path / "docs") is None
    assert not (tmp_path / "docs").exists()


def test_one_gx_context_per_process_is_reused() -> None:
    first = runner._GreatExpectations.for_context(None)
    validate(Rows("customers", 2))
    assert runner._GreatExpectations.for_context(None) is first


# --- validating in slices ------------------------------------------------------------------


def test_given_slices_when_merged_then_same_as_validating_all_rows_at_once(
    tmp_path: Path,
) -> None:
    rows = Rows("charges", 12).set(1, currency="XYZ").set(5, status="weird").set(9, amount=-3)
    frame = rows.frame()
    whole = validate_stream("charges", frame, known_ids={}, now=NOW, run_id=RUN)
    parts = [
        validate_stream("charges", frame.slice(start, 5), known_ids={}, now=NOW, run_id=RUN)
        for start in (0, 5, 10)
    ]
    merged = runner.merge_validations(parts)

    assert merged.rows == whole.rows == 12
    assert merged.failed_rows == whole.failed_rows == 3
    assert merged.success is whole.success is False
    assert merged.quarantine.sort("id", "check").equals(whole.quarantine.sort("id", "check"))
    assert sorted(merged.passed_ids.to_list()) == sorted(whole.passed_ids.to_list())
    fields = ("check", "success", "unexpected_count", "element_count", "reason", "error")
    assert [{k: r[k] for k in fields} for r in merged.results] == [
        {k: r[k] for k in fields} for r in whole.results
    ]
    # Data Docs of the merged result count what the whole frame's do.
    got, want = merged.gx.result, whole.gx.result
    assert got.success is want.success is False
    assert (
        got.statistics["unsuccessful_expectations"] == want.statistics["unsuccessful_expectations"]
    )
    counts = {
        r.expectation_config.meta["check"]: (r.success, r.result.get("element_count"),
                                             r.result.get("unexpected_count"))
        for r in got.results
    }  # fmt: skip
    assert counts == {
        r.expectation_config.meta["check"]: (r.success, r.result.get("element_count"),
                                             r.result.get("unexpected_count"))
        for r in want.results
    }  # fmt: skip
    assert build_data_docs([merged], tmp_path) is not None
    check_wholesale(merged, previous_rows=None)  # 3 of 12 bad: quarantine, not a stop


def test_given_one_slice_mostly_bad_when_merged_then_fraction_is_over_all_rows() -> None:
    rows = Rows("charges", 20)
    for i in range(8):
        rows.set(i, currency="XYZ")
    frame = rows.frame()
    first = validate_stream("charges", frame.slice(0, 10), known_ids={}, now=NOW, run_id=RUN)
    with pytest.raises(DataQualityError):
        check_wholesale(first, previous_rows=None)  # 8 of 10 alone would stop the load
    rest = validate_stream("charges", frame.slice(10, 10), known_ids={}, now=NOW, run_id=RUN)
    merged = runner.merge_validations([first, rest])
    assert merged.failed_fraction == 8 / 20
    check_wholesale(merged, previous_rows=None)
