"""The Polars engine (the real-time processor's micro-batches) gives the same outcomes as
Great Expectations (the scheduled run) for every check of every suite: the same quarantine
rows and reasons, the same passed ids, the same success and counts per check."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import polars as pl
import pytest

from quality.runner import StreamValidation, validate_stream
from tests.unit.test_quality import _GOOD, CASES, NOW, RUN, Rows, known

pytestmark = pytest.mark.unit


def both(frame: pl.DataFrame, stream: str, **kw: Any) -> tuple[StreamValidation, ...]:
    kw.setdefault("known_ids", known(max(frame.height, 5)))
    return tuple(
        validate_stream(stream, frame, now=NOW, run_id=RUN, engine=engine, **kw)
        for engine in ("gx", "polars")
    )


def comparable(v: StreamValidation) -> dict[str, Any]:
    return {
        "quarantine": v.quarantine.to_dicts(),
        "passed": sorted(v.passed_ids.to_list()),
        "success": v.success,
        "failed_rows": v.failed_rows,
        "results": [
            {k: r[k] for k in ("check", "level", "success", "unexpected_count", "reason")}
            | {"element_count": r["element_count"] if r["level"] == "row" else None}
            for r in v.results
        ],
    }


@pytest.mark.parametrize("stream", sorted(_GOOD))
def test_every_bad_row_case_of_a_stream_same_outcome(stream: str) -> None:
    """Every one-bad-row case of tests/unit/test_quality.py for ``stream``, each in a row of
    its own in one frame (one GX validation per stream keeps the test fast)."""
    cases: list[dict[str, Any]] = [c for s, c, _, _ in CASES if s == stream]  # type: ignore[misc]
    rows = Rows(stream, len(cases) + 2)
    for i, change in enumerate(cases):
        rows.set(i + 1, **change)
    gx, fast = both(rows.frame(), stream, known_ids=known(len(rows.rows)))
    assert gx.quarantine.height >= len(cases)  # each case fails a check
    assert comparable(fast) == comparable(gx)


def _bts() -> pl.DataFrame:
    rows = Rows("balance_transactions", 6).set(0, net=1).set(2, fee=-5).set(5, currency=None)
    return rows.frame()


BUILDS: dict[str, Callable[[], tuple[str, pl.DataFrame]]] = {
    "duplicated_ids": lambda: (
        "charges", Rows("charges", 5).set(3, id="ch_0001").set(4, id="ch_0001").frame()
    ),
    "null_id": lambda: ("payouts", Rows("payouts", 3).set(1, id=None).frame()),
    "two_checks_one_row": lambda: (
        "charges", Rows("charges", 3).set(1, currency="XYZ", status="weird").frame()
    ),
    "created_ahead_within_a_day": lambda: (
        "charges", Rows("charges", 3).set(0, created=NOW + timedelta(hours=23)).frame()
    ),
    "many_bad": lambda: ("balance_transactions", _bts()),
    "unknown_reference": lambda: (
        "refunds", Rows("refunds", 4).set(0, charge="ch_other").set(1, charge=None).frame()
    ),
    "missing_column": lambda: (
        "balance_transactions", Rows("balance_transactions", 3).frame().drop("fee")
    ),
    "float_amounts": lambda: ("refunds", Rows("refunds", 3).frame(amount=pl.Float64())),
    "empty": lambda: ("charges", Rows("charges", 0).frame()),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BUILDS))
def test_other_shapes_same_outcome(case: str) -> None:
    stream, frame = BUILDS[case]()
    gx, fast = both(frame, stream)
    assert comparable(fast) == comparable(gx)
