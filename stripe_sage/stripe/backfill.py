"""A backfill split by time window: many extractors write Parquet, one writer merges into DuckDB.

DuckDB has one writer, so a backfill that fans out (Dask workers, or flow runs on several
Prefect workers and machines) cannot write the staging file from each of them. Each window
task instead reads one stream's ``[a, b)`` window from Stripe into its own Parquet file
(written to a temporary name and renamed, so a file that exists is complete); the merge then
upserts every file into ``raw.*`` in the writer's process, marks the windows done in
``ops.sync_windows`` and moves the cursors exactly as the single-process extractor does, so
the next scheduled run goes on incrementally from there.

Nothing here imports Prefect: ``flows/backfill.py`` orchestrates.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stripe_sage.store.staging import Staging, now_utc, raw_json
from stripe_sage.stripe.client import JSON, StripeReader
from stripe_sage.stripe.extract import OVERLAP, backfill_windows, child_rows, window_pages
from stripe_sage.stripe.streams import CHILD_STREAMS, LISTED_STREAMS

PARQUET_SCHEMA = pa.schema([("id", pa.string()), ("created", pa.int64()), ("data", pa.string())])


@dataclass(frozen=True)
class Window:
    stream: str
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"{self.start}_{self.end}"

    def path(self, root: Path, stream: str | None = None) -> Path:
        return root / (stream or self.stream) / f"{self.name}.parquet"

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "start": self.start, "end": self.end}


def plan_windows(
    reader: StripeReader,
    streams: Iterable[str],
    *,
    start: int,
    now: int,
    window_seconds: int,
    done: dict[str, set[tuple[int, int]]] | None = None,
) -> list[Window]:
    """Every stream's windows on the extractor's grid, less those already merged."""
    out = []
    for stream in streams:
        skip = (done or {}).get(stream, set())
        for a, b in backfill_windows(reader, stream, start, now, window_seconds):
            if (a, b) not in skip:
                out.append(Window(stream, a, b))
    return out


def chunk(windows: Sequence[Window], parts: int) -> list[list[Window]]:
    """Windows dealt round-robin into ``parts`` groups (big and small windows mixed)."""
    groups: list[list[Window]] = [[] for _ in range(max(1, parts))]
    for i, w in enumerate(windows):
        groups[i % len(groups)].append(w)
    return [g for g in groups if g]


def _rows(objects: Iterable[JSON]) -> dict[str, list[Any]]:
    seen: dict[str, JSON] = {}
    for obj in objects:  # a page boundary may repeat an object: keep the last
        seen[obj["id"]] = obj
    return {
        "id": list(seen),
        "created": [o.get("created") for o in seen.values()],
        "data": [raw_json(o) for o in seen.values()],
    }


class _ParquetFile:
    """Appends row groups to ``<path>.tmp``; ``commit`` renames it into place."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_suffix(".parquet.tmp")
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, objects: Sequence[JSON]) -> None:
        if not objects:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, PARQUET_SCHEMA, compression="zstd")
        table = pa.table(_rows(objects), schema=PARQUET_SCHEMA)
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> None:
        if self.writer is None:  # an empty window still leaves a (empty) file: it is done
            self.path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(PARQUET_SCHEMA.empty_table(), self.tmp)
        else:
            self.writer.close()
        os.replace(self.tmp, self.path)


def extract_window(reader: StripeReader, window: Window, root: Path, *, now: int) -> dict[str, int]:
    """Read one window into Parquet, page by page (memory stays at a page). A window whose
    file already exists was finished by an earlier attempt of the same backfill run (a task
    retry) and is not read again."""
    target = window.path(root)
    if target.exists():
        return {window.stream: pq.ParquetFile(target).metadata.num_rows, "reused": 1}
    main = _ParquetFile(target)
    child = CHILD_STREAMS.get(window.stream)
    lines = _ParquetFile(window.path(root, child)) if child is not None else None
    for page in window_pages(reader, window.stream, window.start, window.end, now=now):
        if lines is not None:
            lines.write(child_rows(reader, window.stream, page))
        main.write(page)
    if lines is not None:
        lines.commit()  # before the main file: the main file's presence means "all done"
    main.commit()
    out = {window.stream: main.rows}
    if lines is not None and child is not None:
        out[child] = lines.rows
    return out


def merge_windows(
    st: Staging,
    windows: Sequence[Window],
    root: Path,
    *,
    run_id: str,
    now: int,
    api_version: str | None,
) -> dict[str, int]:
    """Upsert every window's Parquet into ``raw.*`` (one transaction per stream, with its
    checkpoints and cursors), as the single-process extractor would have."""
    merged: dict[str, int] = {}
    extracted_at = now_utc()
    by_stream: dict[str, list[Window]] = {}
    for w in windows:
        by_stream.setdefault(w.stream, []).append(w)
    for stream, ws in by_stream.items():
        missing = [w.name for w in ws if not w.path(root).exists()]
        if missing:
            raise FileNotFoundError(
                f"backfill window files missing for {stream}: {', '.join(missing[:5])}"
            )
        child = CHILD_STREAMS.get(stream)
        targets = [stream, child] if child is not None else [stream]
        with st.transaction():
            for target in targets:
                files = [str(w.path(root, target)) for w in ws if w.path(root, target).exists()]
                if not files:
                    continue
                merged[target] = st.merge_raw_parquet(
                    target, files, api_version=api_version, extracted_at=extracted_at, run_id=run_id
                )
            for w in ws:
                rows = pq.ParquetFile(w.path(root)).metadata.num_rows
                st.mark_window(stream, w.start, w.end, rows, run_id)
        _mark_backfilled(st, stream, now)
    return merged


def _mark_backfilled(st: Staging, stream: str, now: int) -> None:
    """Cursors as the single-process extractor leaves them after a backfill."""
    st.set_sync_state(stream, created_cursor=now, backfill_done=True)
    if (st.sync_state(stream) or {}).get("events_cursor") is None:
        st.set_sync_state(stream, events_cursor=now - OVERLAP)


def finish_streams(st: Staging, streams: Iterable[str], *, now: int) -> None:
    """Streams with nothing to read are backfilled too (the next run goes incremental)."""
    for stream in streams:
        if not (st.sync_state(stream) or {}).get("backfill_done"):
            _mark_backfilled(st, stream, now)


def windows_done(
    st: Staging, streams: Iterable[str] = LISTED_STREAMS
) -> dict[str, set[tuple[int, int]]]:
    return {s: st.windows_done(s) for s in streams}
