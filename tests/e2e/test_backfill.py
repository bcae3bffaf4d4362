"""The windowed backfill (Dask fan-out, Parquet per window, one merging writer) gives the same
DuckDB contents as the single-process extractor, and hands over to incremental runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from stripe_sage.stripe.streams import STREAMS
from tests.helpers.business import ACCOUNTING_QUALITY, Env, make_env, use_env

pytestmark = pytest.mark.e2e

# Columns that say when and by which run a row was written, not what it holds.
RUN_COLUMNS = {"run_id", "staged_at", "extracted_at", "source"}


def table_contents(db: Path) -> dict[str, set[tuple[Any, ...]]]:
    """Every raw and staging table as a set of rows, less the run bookkeeping columns."""
    out: dict[str, set[tuple[Any, ...]]] = {}
    with duckdb.connect(str(db), read_only=True) as con:
        for schema in ("raw", "staging"):
            for stream in STREAMS:
                cols = [
                    r[0]
                    for r in con.execute(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
                        [schema, stream],
                    ).fetchall()
                    if r[0] not in RUN_COLUMNS
                ]
                select = ", ".join(f'CAST("{c}" AS VARCHAR)' for c in cols)
                out[f"{schema}.{stream}"] = set(
                    con.execute(f"SELECT {select} FROM {schema}.{stream}").fetchall()
                )
        out["payout_items"] = set(con.execute("SELECT * FROM staging.payout_items").fetchall())
        out["sync_state"] = set(
            con.execute("SELECT stream, backfill_done FROM ops.sync_state").fetchall()
        )
    return out


@pytest.fixture(scope="module")
def business(tmp_path_factory: pytest.TempPathFactory, prefect_harness: None) -> Iterator[Env]:
    mp = pytest.MonkeyPatch()
    env = make_env(tmp_path_factory.mktemp("backfill"), charges=300, seed=23, monkeypatch=mp)
    with env.pair:
        yield env
    mp.undo()


def test_dask_backfill_equals_the_single_process_run(
    business: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.backfill import backfill
    from flows.stripe_to_sage import stripe_to_sage

    use_env(business, monkeypatch, quality=ACCOUNTING_QUALITY)
    single = tmp_path / "single.duckdb"
    monkeypatch.setenv("STAGING_DB", str(single))
    stripe_to_sage(dry_run=True, trigger="test")

    fanned = tmp_path / "fanned.duckdb"
    monkeypatch.setenv("STAGING_DB", str(fanned))
    counts = backfill(fan_out="dask", workers=2, window_days=7, then_sync=False, trigger="test")

    assert counts["windows"] > 8
    assert len(counts["processes"]) == 2, "both Dask worker processes read windows"
    assert counts["merged"]["charges"] == 300
    reference, result = table_contents(single), table_contents(fanned)
    assert reference.keys() == result.keys()
    for table in reference:
        assert reference[table], f"{table} is empty in the single-process run"
        assert result[table] == reference[table], table
    # The window files are gone once merged; the windows are checkpointed.
    assert not list((tmp_path / "backfill").glob("*/*/*.parquet"))
    with duckdb.connect(str(fanned), read_only=True) as con:
        windows = con.execute("SELECT count(*) FROM ops.sync_windows").fetchall()[0][0]
        status = con.execute("SELECT status FROM ops.runs WHERE flow = 'backfill'").fetchall()
    assert windows == counts["windows"]
    assert status == [("completed",)]
    # It checked its rows with the engine QUALITY_ENGINE names (Polars here: no Data Docs),
    # as the scheduled sync does.
    assert counts["quarantined"] is not None and counts["data_docs"] is None

    # The next scheduled run goes on incrementally from the backfill's cursors.
    after = stripe_to_sage(dry_run=True, trigger="test")
    assert {x["mode"] for x in after["extract"].values()} == {"incremental"}
    assert table_contents(fanned) == reference
