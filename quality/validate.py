"""Validation of what a run staged, a slice at a time: each stream's changed rows through its
suite (:mod:`quality.runner`), failing rows into ``staging.quarantine``, one merged result
per stream for the run's artifacts and Data Docs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quality.runner import (
    Engine,
    build_data_docs,
    check_wholesale,
    merge_validations,
    render_markdown,
    validate_stream,
)
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.streams import STREAM_ORDER

QUALITY_SLICE_ROWS = 100_000

# Reference checks: which staged ids a stream's rows must point at.
REFERENCES = {
    "refunds": ("charges",),
    "invoice_lines": ("invoices",),
    "invoice_payments": ("invoices",),
    "disputes": ("charges",),
    "checkout_line_items": ("checkout_sessions",),
}


@dataclass
class QualityOutcome:
    rows: dict[str, int] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    markdown: str = ""
    docs_path: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)


def validate_all(
    st: Staging,
    run_id: str,
    *,
    now: dt.datetime,
    docs_dir: Path | None = None,
    previous_rows: dict[str, int] | None = None,
    slice_rows: int = QUALITY_SLICE_ROWS,
    engine: Engine = "gx",
    between: Callable[[], None] | None = None,
) -> QualityOutcome:
    """Validate what this run staged, ``slice_rows`` rows at a time; failing rows go to
    ``staging.quarantine``. ``engine``: see ``quality.runner.validate_stream``. ``between``
    is called after each stream (a sync serves webhook events there)."""
    outcome = QualityOutcome()
    validations = []
    for stream in STREAM_ORDER:
        # A slice of rows at a time, streamed from DuckDB: GX works on pandas copies of its
        # input (at 1M charges, whole streams took this stage to 3.0 GiB; slices, 1.1 GiB).
        # The referenced ids are read only for a stream that changed (a micro-batch touches
        # two or three streams: no whole-table id reads for the others).
        known: dict[str, Any] | None = None
        parts = []
        for df in st.changed_slices(stream, run_id, slice_rows):
            if known is None:
                known = {
                    ref: st.frame(f"SELECT id FROM staging.{ref}")["id"]
                    for ref in REFERENCES.get(stream, ())
                }
            parts.append(
                validate_stream(stream, df, known_ids=known, now=now, run_id=run_id, engine=engine)
            )
        if not parts:
            continue
        v = merge_validations(parts)
        # The table's size before and after this run: a collapse, not a small increment.
        check_wholesale(
            v,
            previous_rows=(previous_rows or {}).get(stream),
            current_rows=st.count(f"staging.{stream}"),
        )
        st.requarantine_changed(stream, run_id, v.quarantine)
        outcome.rows[stream] = v.rows
        outcome.quarantined[stream] = v.quarantine["id"].n_unique() if v.quarantine.height else 0
        outcome.results.extend({"stream": stream, **r} for r in v.results)
        validations.append(v)
        if between is not None:
            between()
    outcome.markdown = render_markdown(validations) if validations else ""
    if docs_dir is not None and validations:
        path = build_data_docs(validations, docs_dir)
        outcome.docs_path = str(path) if path else None
    return outcome
