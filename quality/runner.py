"""Run the expectation suites with Great Expectations and turn the results into decisions.

``validate_stream`` validates one staged stream (a Polars frame) and returns which rows go to
``staging.quarantine`` and why, which ids may be loaded, and one summary per expectation.
``check_wholesale`` decides whether the whole stream must stop the load. ``render_markdown``
and ``build_data_docs`` report the run.

Great Expectations is the evaluator: the failing rows come from GX's per-row results
(``result_format`` COMPLETE, ``unexpected_index_list``: the row positions, mapped back to
ids in Polars), never from a second implementation of the checks here. Only derived columns
are computed beforehand, in Polars (``quality.suites.prepare``). GX runs on pandas (its SQL
datasource does not speak DuckDB), so the frame is converted with nullable integer/boolean
dtypes to keep integers integers.

Every call into the GX API is in :class:`_GreatExpectations`, so an upgrade touches one class.
GX is imported lazily (it takes seconds), and one ephemeral context per process is created on
first use and reused; GX calls are serialised with a lock because the context's stores are
not thread-safe and Prefect may run tasks in threads.
"""

from __future__ import annotations

import html
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import polars as pl

from quality import suites
from quality.suites import ROW_COLUMN, Check, Suite
from stripe_sage.errors import DataQualityError

log = logging.getLogger(__name__)

QUARANTINE_SCHEMA: dict[str, Any] = {
    "stream": pl.String,
    "id": pl.String,
    "check": pl.String,
    "reason": pl.String,
    "run_id": pl.String,
}
Engine = Literal["gx", "polars"]
_NO_IDS: Mapping[str, pl.Series | set[str]] = MappingProxyType({})


@dataclass
class StreamValidation:
    """The outcome of validating one stream.

    ``quarantine`` has one row per failing row per check (columns exactly ``stream, id,
    check, reason, run_id``); ``passed_ids`` are the ids of rows that failed no row-level
    check. A table-level failure (see ``results[i]["level"]``) does not touch either: it is
    for :func:`check_wholesale` to stop the load.
    """

    stream: str
    rows: int
    quarantine: pl.DataFrame
    passed_ids: pl.Series
    results: list[dict[str, Any]]
    success: bool
    suite_name: str = ""
    run_id: str = ""
    failed_rows: int = 0
    previous_rows: int | None = None
    gx: Any = field(default=None, repr=False, compare=False)  # what Data Docs render

    @property
    def failed_fraction(self) -> float:
        return self.failed_rows / self.rows if self.rows else 0.0

    @property
    def failed_checks(self) -> dict[str, int]:
        """Failed check → rows failing it (0 for a table-level failure)."""
        return {
            r["check"]: int(r["unexpected_count"] or 0) for r in self.results if not r["success"]
        }


def validate_stream(
    stream: str,
    df: pl.DataFrame,
    *,
    known_ids: Mapping[str, pl.Series | set[str]] = _NO_IDS,
    now: datetime,
    run_id: str,
    docs_dir: Path | None = None,
    context: Any = None,
    previous_rows: int | None = None,
    engine: Engine = "gx",
) -> StreamValidation:
    """Validate the staged rows of ``stream`` with its expectation suite.

    ``known_ids`` maps a stream name to the ids that references may point at (staged plus
    this batch): ``{"charges": ...}`` for refunds and disputes, ``{"invoices": ...}`` for
    invoice lines and invoice payments; a missing entry is a ``ValueError``, not a silently
    skipped check. ``now`` is the run's clock (``created`` may be at most a day after it).
    ``previous_rows`` adds the row-count expectation (see ``suites.row_count_bounds``).
    ``docs_dir`` also writes Data Docs there (see :func:`build_data_docs`). ``context`` is a
    GX data context to use instead of the process's ephemeral one.

    An empty frame validates trivially: only the row-count expectation, if any, is run.

    ``engine``: ``"gx"`` (Great Expectations, with Data Docs) or ``"polars"``: the same
    checks evaluated in Polars with the same outcomes (tests/unit/test_quality_engines.py),
    for the real-time processor's micro-batches of a few rows, where GX costs seconds per
    stream and Data Docs are not built.
    """
    suite = suites.build_suite(stream, now=now, previous_rows=previous_rows)
    missing = [r.target for r in suites.required_references(stream) if r.target not in known_ids]
    if missing:
        raise ValueError(
            f"validating {stream} needs known_ids for {', '.join(missing)} "
            "(the ids its references may point at)"
        )
    prepared = suites.prepare(stream, df, known_ids=known_ids)
    if df.height == 0:
        checks = [c for c in suite.checks if c.kind == "row_count"]
    else:
        checks = [c for c in suite.checks if all(col in prepared.columns for col in c.columns())]

    def outcome(**kw: Any) -> StreamValidation:
        return StreamValidation(stream=stream, rows=df.height, suite_name=suite.name,
                                run_id=run_id, previous_rows=previous_rows, **kw)  # fmt: skip

    if not checks:
        return outcome(
            quarantine=pl.DataFrame(schema=QUARANTINE_SCHEMA),
            passed_ids=_ids(prepared),
            results=[],
            success=True,
        )

    # GX sees only the columns the checks read; its row positions are the ``_row`` numbers.
    frame = prepared.select(list(dict.fromkeys(col for c in checks for col in c.columns())))
    payload: _GxPayload | None = None
    if engine == "polars":
        results = _polars_outcomes(checks, frame)
    else:
        gx = _GreatExpectations.for_context(context)
        results, payload = gx.validate(suite, checks, frame, run_id=run_id, now=now)

    failing: dict[int, None] = {}
    pieces: list[pl.DataFrame] = []
    for order, (check, result) in enumerate(zip(checks, results, strict=True)):
        if result.rows:
            failing |= dict.fromkeys(result.rows)
            pieces.append(_quarantine_rows(stream, check, order, result.rows, prepared, run_id))
    quarantine = (
        pl.concat(pieces).sort(["_row", "_order"]).drop(["_row", "_order"])
        if pieces
        else pl.DataFrame(schema=QUARANTINE_SCHEMA)
    )
    failed = pl.Series(ROW_COLUMN, list(failing), dtype=prepared.schema[ROW_COLUMN])
    validation = outcome(
        quarantine=quarantine,
        passed_ids=_ids(prepared.filter(~pl.col(ROW_COLUMN).is_in(failed.implode()))),
        results=[r.summary(c) for c, r in zip(checks, results, strict=True)],
        success=all(r.success for r in results),
        failed_rows=len(failing),
        gx=payload,
    )
    if docs_dir is not None:
        build_data_docs([validation], docs_dir)
    return validation


def _polars_outcomes(checks: Sequence[Check], frame: pl.DataFrame) -> list[_Outcome]:
    """Each check over ``frame`` as GX evaluates it: a row-level check ignores nulls (but
    ``not_null``), counts every row in ``element_count`` and names its failing rows by
    position; ``unique`` fails every row whose value repeats; a table-level check has no
    rows."""
    out: list[_Outcome] = []
    height = frame.height
    for check in checks:
        p = check.params
        if check.kind == "columns_present":
            missing = [c for c in p["columns"] if c not in frame.columns]
            details = {"mismatched": {"missing": missing}} if missing else None
            out.append(_Outcome(not missing, "expect_table_columns_to_match_set", None, None,
                                None, observed_value=list(frame.columns),
                                details=details))  # fmt: skip
            continue
        if check.kind == "row_count":
            ok = height >= p["min_value"] and (p["max_value"] is None or height <= p["max_value"])
            out.append(_Outcome(ok, "expect_table_row_count_to_be_between", None, None, None,
                                observed_value=height))  # fmt: skip
            continue
        col = pl.col(str(check.column))
        if check.kind == "integer":
            dtype = frame.schema[str(check.column)]
            # GX observes the pandas dtype of the column (``float64``): the same words.
            shown = _GreatExpectations._to_pandas(frame.select(col))[str(check.column)].dtype
            out.append(_Outcome(dtype.is_integer() or dtype == pl.Null,
                                "expect_column_values_to_be_in_type_list", height, None, None,
                                observed_value=str(shown)))  # fmt: skip
            continue
        present = col.is_not_null()
        match check.kind:
            case "not_null":
                failing = col.is_null()
                name = "expect_column_values_to_not_be_null"
            case "unique":
                failing = present & col.is_duplicated()
                name = "expect_column_values_to_be_unique"
            case "match_regex":
                failing = present & ~col.cast(pl.String).str.contains(p["regex"])
                name = "expect_column_values_to_match_regex"
            case "in_set":
                failing = present & ~col.is_in(list(p["value_set"]))
                name = "expect_column_values_to_be_in_set"
            case "between":
                outside = pl.lit(False)
                if p["min_value"] is not None:
                    outside = outside | (col < p["min_value"])
                if p["max_value"] is not None:
                    outside = outside | (col > p["max_value"])
                failing = present & outside
                name = "expect_column_values_to_be_between"
            case _:
                raise ValueError(f"unknown check kind {check.kind!r}")
        rows = (
            frame.select(failing.fill_null(False).alias("f"))
            .with_row_index("pos")
            .filter(pl.col("f"))["pos"]
            .to_list()
        )
        out.append(_Outcome(not rows, name, height, len(rows), rows or None))
    return out


def merge_validations(parts: Sequence[StreamValidation]) -> StreamValidation:
    """One stream validated in slices of rows → the validation of all of them at once.

    A check succeeds only where it succeeded on every slice; counts are summed; quarantine
    rows and passed ids are concatenated; the first failing slice gives a check's observed
    value, error and reason. Only for row-level checks and per-row table checks (columns,
    types): the slices must be disjoint, and the row count is for :func:`check_wholesale` to
    apply to the table (``current_rows``), not for a slice.
    """
    if not parts:
        raise ValueError("no slices to merge")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for r in part.results:
            into = merged.get(r["check"])
            if into is None:
                merged[r["check"]] = dict(r)
                continue
            for key in ("unexpected_count", "element_count"):
                if r[key] is not None:
                    into[key] = (into[key] or 0) + r[key]
            if into["success"] and not r["success"]:
                into |= {k: r[k] for k in ("observed_value", "error", "reason")}
            into["success"] = into["success"] and r["success"]
    return StreamValidation(
        stream=first.stream,
        rows=sum(p.rows for p in parts),
        quarantine=pl.concat([p.quarantine for p in parts]),
        passed_ids=pl.concat([p.passed_ids for p in parts]),
        results=list(merged.values()),
        success=all(p.success for p in parts),
        suite_name=first.suite_name,
        run_id=first.run_id,
        failed_rows=sum(p.failed_rows for p in parts),
        previous_rows=first.previous_rows,
        gx=_GreatExpectations.merge_payloads([p.gx for p in parts if p.gx is not None]),
    )


def check_wholesale(
    validation: StreamValidation,
    *,
    previous_rows: int | None,
    max_failed_fraction: float = 0.5,
    min_rows: int = 10,
    current_rows: int | None = None,
) -> None:
    """Raise ``DataQualityError`` when the suite failed wholesale, so the load must stop.

    Wholesale means any of:

    * a table-level expectation failed (missing columns, a money column that is not integer,
      the row count) or an expectation could not be evaluated at all;
    * the row count collapsed against ``previous_rows`` (``suites.row_count_bounds``: with
      at least 1,000 rows last time, fewer than 10% of them now). When ``validate_stream``
      already ran the row-count expectation with the same ``previous_rows`` its GX result
      decides; otherwise the same bounds are applied here to ``current_rows``, which
      defaults to ``validation.rows``. Compare like with like: when the frame validated is
      only this run's changed rows but ``previous_rows`` is the staged table's total, pass
      the table's total after staging as ``current_rows`` (else every small incremental run
      of a large stream looks like a collapse);
    * more than ``max_failed_fraction`` of the rows failed a row-level check, counted only
      from ``min_rows`` rows up: below that a fraction means little, and bad rows are simply
      quarantined.

    Otherwise bad rows stay in quarantine and the good ones are loaded.
    """
    problems: list[str] = []
    for r in validation.results:
        if r["success"]:
            continue
        if r["error"]:
            problems.append(f"{r['check']} could not be evaluated: {r['error']}")
        elif r["level"] == "table":
            problems.append(f"{r['check']} failed ({r['reason']})")
    evaluated_by_gx = previous_rows == validation.previous_rows and current_rows is None
    if previous_rows is not None and not evaluated_by_gx:
        rows = validation.rows if current_rows is None else current_rows
        bounds = suites.row_count_bounds(previous_rows)
        if bounds is not None and rows < bounds[0]:
            problems.append(
                f"row_count failed ({rows} rows, expected at least {bounds[0]} "
                f"after {previous_rows} in the previous run)"
            )
    if validation.rows >= min_rows and validation.failed_fraction > max_failed_fraction:
        problems.append(
            f"{validation.failed_rows} of {validation.rows} rows "
            f"({validation.failed_fraction:.0%}) failed row-level checks, more than the "
            f"{max_failed_fraction:.0%} allowed"
        )
    if problems:
        raise DataQualityError(
            f"data-quality suite {validation.suite_name or validation.stream} failed "
            f"wholesale (run {validation.run_id}): " + "; ".join(problems),
            code="suite_failed_wholesale",
        )


def render_markdown(validations: Iterable[StreamValidation]) -> str:
    """A compact Markdown table, one line per stream, for a Prefect markdown artifact."""
    lines = [
        "| stream | rows | failed rows | checks failed |",
        "|---|---:|---:|---|",
    ]
    for v in validations:
        failed = [
            f"{r['check']} ({r['unexpected_count']})" if r["level"] == "row" else
            f"{r['check']} (table)"
            for r in v.results if not r["success"]
        ]  # fmt: skip
        cell = ", ".join(failed) if failed else "none"
        lines.append(f"| {_md(v.stream)} | {v.rows} | {v.failed_rows} | {_md(cell)} |")
    return "\n".join(lines) + "\n"


def build_data_docs(validations: Sequence[StreamValidation], docs_dir: Path) -> Path | None:
    """Write Great Expectations Data Docs for these validations into ``docs_dir``.

    GX 1.x builds Data Docs from an ephemeral context when a filesystem site is configured,
    so this uses GX's own site builder: ``docs_dir/index.html`` lists the validations, with
    one page per suite (``expectations/staging/<stream>.html``) and per validation result
    (``validations/staging/<stream>/<run_id>/...``). Results are rendered as GX's summary
    (the first 20 unexpected values and ids), not the full failing-id lists, which live in
    ``staging.quarantine``. Validations written to the same ``docs_dir`` by this process
    accumulate in its index (use one directory per run). Should GX fail to build the site,
    a self-contained ``index.html`` with the same per-expectation results is written instead
    and a warning logged. Returns the index page, or None when nothing was validated.
    """
    docs_dir = Path(docs_dir)
    entries = [v for v in validations if v.gx is not None]
    if not entries:
        return None
    docs_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _GreatExpectations.build_docs(entries, docs_dir)
    except Exception as exc:  # GX's renderer is the fragile part; never lose the report
        log.warning("GX Data Docs failed (%s); writing a plain HTML report instead", exc)
        return _write_html_report(validations, docs_dir)


# --- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    """One expectation's result, reduced to what the runner needs (GX-neutral)."""

    success: bool
    expectation: str
    element_count: int | None
    unexpected_count: int | None
    rows: list[int] | None  # failing row numbers for a row-level check, when it failed
    observed_value: Any = None
    details: Mapping[str, Any] | None = None
    error: str | None = None

    def summary(self, check: Check) -> dict[str, Any]:
        return {
            "check": check.name,
            "expectation": self.expectation,
            "column": check.column,
            "level": "row" if check.row_level else "table",
            "success": self.success,
            "unexpected_count": self.unexpected_count,
            "element_count": self.element_count,
            "observed_value": self.observed_value,
            "error": self.error,
            "description": check.description,
            "reason": "" if check.row_level or self.success else self._table_reason(check),
        }

    def _table_reason(self, check: Check) -> str:
        text = _format(check.reason, {}, check.params)
        missing = ((self.details or {}).get("mismatched") or {}).get("missing")
        if missing:
            return f"{text}: missing {', '.join(map(str, missing))}"
        if self.observed_value is not None:
            return f"{text}; observed {self.observed_value}"
        return text


def _quarantine_rows(
    stream: str, check: Check, order: int, rows: list[int], df: pl.DataFrame, run_id: str
) -> pl.DataFrame:
    fields = [f for f in check.reason_fields() if f in df.columns]
    keep = [ROW_COLUMN, *(["id"] if "id" in df.columns else []), *fields]
    picked = df.select(list(dict.fromkeys(keep)))
    picked = picked.filter(pl.col(ROW_COLUMN).is_in(pl.Series(rows).implode()))
    values = picked.select(fields).to_dicts() if fields else [{}] * picked.height
    reasons = [_format(check.reason, row, check.params) for row in values]
    ids = (
        _owned(picked["id"].cast(pl.String))
        if "id" in picked.columns
        else pl.repeat(None, picked.height, eager=True)
    )
    return pl.DataFrame(
        {
            "stream": [stream] * picked.height,
            "id": ids.cast(pl.String),
            "check": [check.name] * picked.height,
            "reason": reasons,
            "run_id": [run_id] * picked.height,
            "_row": picked[ROW_COLUMN].cast(pl.Int64),
            "_order": [order] * picked.height,
        },
        schema={**QUARANTINE_SCHEMA, "_row": pl.Int64, "_order": pl.Int64},
    )


def _format(template: str, row: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    shown = {k: ("no limit" if v is None else _show(v)) for k, v in params.items()}
    shown |= {k: _show(v) for k, v in row.items()}
    return template.format(**shown)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _ids(df: pl.DataFrame) -> pl.Series:
    if "id" not in df.columns:
        return pl.Series("id", [], dtype=pl.String)
    return _owned(df["id"].cast(pl.String).drop_nulls().alias("id"))


def _owned(strings: pl.Series) -> pl.Series:
    """A copy that owns its bytes. A Polars string column can be views into the buffers of
    the whole frame it came from (every column of a slice read from DuckDB); a Series kept
    past its slice would hold all of them alive: ~30 MB per 100k-row slice of charges."""
    copied = pl.from_arrow(strings.to_arrow())
    assert isinstance(copied, pl.Series)
    return copied.alias(strings.name)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _write_html_report(validations: Sequence[StreamValidation], docs_dir: Path) -> Path:
    """A self-contained page with the per-expectation results (fallback for Data Docs)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>stripe-sage data quality"
        "</title><style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px}.fail{background:#fdd}</style></head>"
        "<body><h1>stripe-sage data quality</h1>"
    ]
    for v in validations:
        parts.append(
            f"<h2>{html.escape(v.suite_name or v.stream)}</h2><p>run {html.escape(v.run_id)}: "
            f"{v.rows} rows, {v.failed_rows} failed</p><table><tr><th>check</th>"
            "<th>expectation</th><th>column</th><th>success</th><th>unexpected</th>"
            "<th>elements</th></tr>"
        )
        for r in v.results:
            cls = "" if r["success"] else " class='fail'"
            cells = (r["check"], r["expectation"], r["column"] or "", r["success"],
                     r["unexpected_count"], r["element_count"])  # fmt: skip
            row = "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in cells)
            parts.append(f"<tr{cls}>{row}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = docs_dir / "index.html"
    path.write_text("".join(parts), encoding="utf-8")
    return path


# --- Great Expectations: every version-sensitive call is below ---------------------------

_PANDAS_DTYPES: dict[str, str] = {
    "int8": "Int8Dtype", "int16": "Int16Dtype", "int32": "Int32Dtype", "int64": "Int64Dtype",
    "uint8": "UInt8Dtype", "uint16": "UInt16Dtype", "uint32": "UInt32Dtype",
    "uint64": "UInt64Dtype", "bool_": "BooleanDtype",
}  # fmt: skip
_INTEGER_TYPES = ["Int64Dtype", "int64"]  # names ExpectColumnValuesToBeInTypeList resolves


@dataclass
class _GxPayload:
    """What Data Docs need from one validation: the suite and the (trimmed) result."""

    suite: Any
    result: Any
    run_id: str
    run_time: datetime
    stream: str


@dataclass
class _DocsSite:
    """One Data Docs directory's GX context and the results it lists, oldest first."""

    context: Any
    results: OrderedDict[Any, None] = field(default_factory=OrderedDict)


class _GreatExpectations:
    DATASOURCE = "stripe_sage"
    BATCH_DEFINITION = "whole_frame"
    DOCS_SITE = "stripe_sage"
    MAX_DOCS_DIRS = 8
    MAX_RESULTS_PER_SITE = 400  # ~25 runs of every stream

    _lock = threading.RLock()
    _default: _GreatExpectations | None = None
    _docs: OrderedDict[Path, _DocsSite] = OrderedDict()

    def __init__(self, context: Any) -> None:
        self.context = context

    @classmethod
    def for_context(cls, context: Any) -> _GreatExpectations:
        with cls._lock:
            if context is not None:
                return cls(context)
            if cls._default is None:
                cls._default = cls(cls._ephemeral_context())
            return cls._default

    @staticmethod
    def _ephemeral_context() -> Any:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
        )
        return gx.get_context(project_config=config, mode="ephemeral")

    @classmethod
    def _site_context(cls, docs_dir: Path) -> Any:
        """An ephemeral context whose one Data Docs site is ``docs_dir``."""
        context = cls._ephemeral_context()
        context.add_data_docs_site(
            cls.DOCS_SITE,
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        return context

    def _batch_definition(self, asset_name: str) -> Any:
        sources = self.context.data_sources
        try:
            datasource = sources.get(self.DATASOURCE)
        except KeyError:
            datasource = sources.add_pandas(self.DATASOURCE)
        if asset_name in datasource.get_asset_names():
            asset = datasource.get_asset(asset_name)
        else:
            asset = datasource.add_dataframe_asset(asset_name)
        for bd in asset.batch_definitions:
            if bd.name == self.BATCH_DEFINITION:
                return bd
        return asset.add_batch_definition_whole_dataframe(self.BATCH_DEFINITION)

    @staticmethod
    def _expectation(check: Check) -> Any:
        import great_expectations.expectations as E

        common: dict[str, Any] = {"meta": {"check": check.name}, "notes": check.description}
        p = check.params
        if check.kind == "columns_present":
            return E.ExpectTableColumnsToMatchSet(
                column_set=list(p["columns"]), exact_match=False, **common
            )
        if check.kind == "row_count":
            return E.ExpectTableRowCountToBeBetween(
                min_value=p["min_value"], max_value=p["max_value"], **common
            )
        if check.column is None:
            raise ValueError(f"check {check.name} of kind {check.kind} needs a column")
        col = check.column
        match check.kind:
            case "not_null":
                return E.ExpectColumnValuesToNotBeNull(column=col, **common)
            case "unique":
                return E.ExpectColumnValuesToBeUnique(column=col, **common)
            case "match_regex":
                return E.ExpectColumnValuesToMatchRegex(column=col, regex=p["regex"], **common)
            case "in_set":
                return E.ExpectColumnValuesToBeInSet(
                    column=col, value_set=list(p["value_set"]), **common
                )
            case "between":
                return E.ExpectColumnValuesToBeBetween(
                    column=col, min_value=p["min_value"], max_value=p["max_value"], **common
                )
            case "integer":
                return E.ExpectColumnValuesToBeInTypeList(
                    column=col, type_list=_INTEGER_TYPES, **common
                )
        raise ValueError(f"unknown check kind {check.kind!r}")

    @staticmethod
    def _to_pandas(frame: pl.DataFrame) -> Any:
        import pandas as pd
        import pyarrow as pa

        mapping = {getattr(pa, a)(): getattr(pd, p)() for a, p in _PANDAS_DTYPES.items()}
        return frame.to_arrow().to_pandas(types_mapper=mapping.get)

    def validate(
        self, suite: Suite, checks: Sequence[Check], frame: pl.DataFrame, *, run_id: str,
        now: datetime,
    ) -> tuple[list[_Outcome], _GxPayload]:  # fmt: skip
        """Validate ``frame`` against ``checks``; outcomes come back in ``checks`` order.

        Failing rows are read from GX's ``unexpected_index_list`` under ``COMPLETE``. Without
        ``unexpected_index_column_names`` GX returns the pandas index labels of the failing
        rows, which are their positions in ``frame`` (a fresh ``RangeIndex``): that is the
        equivalent of naming an id column, exact even when ids repeat or are null, and about
        ten times faster when many rows fail (GX fetches named index columns cell by cell).
        """
        import great_expectations as gx
        import pandas as pd

        result_format = {
            "result_format": "COMPLETE",
            "return_unexpected_index_query": False,
            "partial_unexpected_count": 20,
        }
        pdf = self._to_pandas(frame)
        if not pdf.index.equals(pd.RangeIndex(frame.height)):
            raise AssertionError("the pandas frame must keep Polars row order")
        with self._lock:
            gx_suite = gx.ExpectationSuite(
                name=suite.name, expectations=[self._expectation(c) for c in checks]
            )
            batch = self._batch_definition(suite.stream).get_batch(
                batch_parameters={"dataframe": pdf}
            )
            result = batch.validate(gx_suite, result_format=result_format)

        by_check = {r.expectation_config.meta.get("check"): r for r in result.results}
        outcomes = [self._outcome(c, by_check[c.name]) for c in checks]
        for r in result.results:  # keep what Data Docs show; quarantine has the full lists
            for key in ("unexpected_list", "unexpected_index_list", "unexpected_index_query"):
                r.result.pop(key, None)
        payload = _GxPayload(gx_suite, result, run_id, _utc(now), suite.stream)
        return outcomes, payload

    @staticmethod
    def _outcome(check: Check, r: Any) -> _Outcome:
        res = r.result or {}
        error = _GreatExpectations._error(r.exception_info)
        rows: list[int] | None = None
        index = res.get("unexpected_index_list")
        if check.row_level and not r.success and not error and index is not None:
            rows = [int(item) for item in index]
        if check.row_level and not r.success and not error and rows is None:
            error = "GX returned no per-row results for a failed row-level expectation"
        return _Outcome(
            success=bool(r.success),
            expectation=str(r.expectation_config.type),
            element_count=res.get("element_count"),
            unexpected_count=res.get("unexpected_count"),
            rows=rows,
            observed_value=res.get("observed_value"),
            details=res.get("details"),
            error=error,
        )

    @staticmethod
    def _error(info: Any) -> str | None:
        if not info:
            return None
        found = [info] if "raised_exception" in info else list(info.values())
        for item in found:
            if isinstance(item, Mapping) and item.get("raised_exception"):
                return str(item.get("exception_message") or "exception in GX")
        return None

    @staticmethod
    def merge_payloads(payloads: Sequence[_GxPayload]) -> _GxPayload | None:
        """The GX results of one suite over disjoint slices as one result (for Data Docs):
        counts summed, percentages recomputed, success only where every slice succeeded,
        the first 20 unexpected values kept."""
        if not payloads:
            return None
        first = payloads[0]
        by_check = {r.expectation_config.meta.get("check"): r for r in first.result.results}
        for p in payloads[1:]:
            for r in p.result.results:
                into = by_check.get(r.expectation_config.meta.get("check"))
                if into is None:
                    first.result.results.append(r)
                    by_check[r.expectation_config.meta.get("check")] = r
                    continue
                if into.success and not r.success:
                    into.exception_info = r.exception_info
                into.success = bool(into.success and r.success)
                a, b = into.result, r.result or {}
                if a is None:
                    continue
                for key in ("element_count", "unexpected_count", "missing_count"):
                    if isinstance(a.get(key), int) and isinstance(b.get(key), int):
                        a[key] += b[key]
                if "partial_unexpected_list" in a:
                    extra = b.get("partial_unexpected_list") or []
                    a["partial_unexpected_list"] = (a["partial_unexpected_list"] + extra)[:20]
                elements, unexpected = a.get("element_count"), a.get("unexpected_count")
                if isinstance(elements, int) and isinstance(unexpected, int) and elements:
                    missing = a.get("missing_count") or 0
                    present = elements - missing
                    a["unexpected_percent_total"] = 100.0 * unexpected / elements
                    a["missing_percent"] = 100.0 * missing / elements
                    for key in ("unexpected_percent", "unexpected_percent_nonmissing"):
                        if key in a:
                            a[key] = 100.0 * unexpected / present if present else None
        results = first.result.results
        succeeded = sum(1 for r in results if r.success)
        first.result.success = succeeded == len(results)
        first.result.statistics = {
            **(first.result.statistics or {}),
            "evaluated_expectations": len(results),
            "successful_expectations": succeeded,
            "unsuccessful_expectations": len(results) - succeeded,
            "success_percent": 100.0 * succeeded / len(results) if results else None,
        }
        return first

    @classmethod
    def build_docs(cls, validations: Sequence[StreamValidation], docs_dir: Path) -> Path:
        """Render Data Docs with GX's site builder into ``docs_dir``.

        One ephemeral context per ``docs_dir`` (the last ``MAX_DOCS_DIRS`` kept) holds the
        results this process gave that directory, the latest ``MAX_RESULTS_PER_SITE``, so
        its index lists them and nothing else. Only the pages of the new results and of
        their suites are rendered (GX's incremental build); the earlier pages are on disk
        already. Rendering every page again on each run made a process's n-th run render
        n runs' pages, and kept every result of a long-lived process in memory.
        """
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        key = docs_dir.resolve()
        with cls._lock:
            site = cls._docs.pop(key, None) or _DocsSite(cls._site_context(key))
            cls._docs[key] = site
            while len(cls._docs) > cls.MAX_DOCS_DIRS:
                cls._docs.popitem(last=False)

            context = site.context
            changed: list[Any] = []
            for v in validations:
                p = v.gx
                context.suites.add_or_update(p.suite)
                run = RunIdentifier(run_name=p.run_id, run_time=p.run_time)
                p.result.meta["run_id"] = run
                p.result.meta["validation_time"] = p.run_time
                suite_key = ExpectationSuiteIdentifier(name=p.suite.name)
                result_key = ValidationResultIdentifier(
                    expectation_suite_identifier=suite_key, run_id=run, batch_identifier=p.stream
                )
                context.validation_results_store.set(result_key, p.result)
                site.results.pop(result_key, None)
                site.results[result_key] = None
                changed += [suite_key, result_key]
            while len(site.results) > cls.MAX_RESULTS_PER_SITE:
                oldest, _ = site.results.popitem(last=False)
                context.validation_results_store.remove_key(oldest)
            context.build_data_docs(site_names=[cls.DOCS_SITE], resource_identifiers=changed)
        index = key / "index.html"
        if not index.exists():
            raise FileNotFoundError(f"GX reported success but wrote no {index}")
        return index


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
