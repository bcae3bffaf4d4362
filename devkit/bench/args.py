"""The ``bench`` command's arguments (imported when the CLI builds its parser; the benchmarks
themselves load only when the command runs)."""

from __future__ import annotations

import argparse
from typing import Any


def _run(args: argparse.Namespace) -> int:
    from devkit.bench import cmd_bench

    return cmd_bench(args)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: ours beside the floor and dlt, scaling, sandbox, pipeline",
        description=(
            "Rerunnable benchmarks; figures printed and written as JSON (and PNG charts for "
            "compare/scale) under --out. compare: the floor (bare httpx), dlt's rest_api "
            "source and our pipeline on the same sandbox; scale: compare at each of --sizes."
        ),
    )
    p.add_argument(
        "what",
        choices=(
            "compare",
            "scale",
            "sandbox",
            "pipeline",
            "receiver",
            "reconcile",
            "realtime",
            "backfill",
            "crash",
            "console",
        ),
    )
    p.add_argument(
        "--fan-outs",
        default="threads,dask",
        help="backfill: the fan-outs to time, comma-separated (threads, dask)",
    )
    p.add_argument("--workers", type=int, default=2, help="backfill: Dask worker processes")
    p.add_argument(
        "--contenders",
        default="floor,dlt,ours",
        help="compare/scale: which to run, comma-separated (floor, floor_windows, dlt, ours)",
    )
    p.add_argument(
        "--sizes", default="10000,100000", help="scale: charges per run, comma-separated"
    )
    p.add_argument(
        "--through",
        choices=("stage", "quality", "transform", "plan", "load"),
        default="stage",
        help="compare/scale: run our pipeline through this stage (load = into Sage)",
    )
    p.add_argument(
        "--driver",
        choices=("direct", "flow"),
        default="direct",
        help="ours: the flow's stages called one by one (direct) or the Prefect flow (flow)",
    )
    p.add_argument(
        "--sage-rate-limit",
        type=float,
        default=0.0,
        help="compare/scale: the Sage sandbox's requests/s (0 = unlimited; crash: 0 = 50)",
    )
    p.add_argument(
        "--sage-max-rps",
        type=float,
        default=0.0,
        help="compare/scale: our Sage client's pacing, requests/s (SAGE_MAX_RPS; 0 = off)",
    )
    p.add_argument(
        "--dlt-format",
        choices=("", "parquet", "jsonl", "insert_values"),
        default="",
        help="compare/scale: dlt's loader file format ('' = dlt's default for DuckDB)",
    )
    p.add_argument(
        "--profile", action="store_true", help="compare/scale: pyinstrument each contender"
    )
    p.add_argument("--events", type=int, default=20, help="realtime: single events to time")
    p.add_argument(
        "--during-sync",
        type=int,
        default=0,
        metavar="CHARGES",
        help="realtime: instead, events at 1/s during the first sync of a business of this "
        "many charges (issue 22: p95 <= 5 s)",
    )
    p.add_argument(
        "--burst", type=int, default=1000, help="realtime: events in the burst (0: none)"
    )
    p.add_argument(
        "--no-mechanisms",
        action="store_true",
        help="realtime: skip measuring what each Prefect mechanism costs",
    )
    p.add_argument("--rate", type=float, default=200.0, help="receiver: events per second")
    p.add_argument("--seconds", type=float, default=30.0, help="receiver: for how long")
    p.add_argument("--charges", type=int, default=100_000)
    p.add_argument("--days", type=int, default=90)
    p.add_argument(
        "--max-objects",
        type=int,
        default=0,
        help="sandbox: stop paging after this many objects (0 = all charges)",
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=25.0,
        help="pipeline: Stripe sandbox requests/s per endpoint (test mode: 25)",
    )
    p.add_argument(
        "--client-rps",
        type=float,
        default=20.0,
        help="pipeline: the reader's own requests/s per endpoint",
    )
    p.add_argument("--sage-concurrency", type=int, default=4)
    p.add_argument(
        "--kills",
        type=int,
        default=12,
        help="crash: kill -9 points (spread over extract, plan, load)",
    )
    p.add_argument(
        "--prefect",
        choices=("embedded", "server", "both"),
        default="both",
        help="crash: the embedded default (local Prefect under PREFECT_HOME), a Prefect "
        "server, or both",
    )
    p.add_argument("--seed", type=int, default=16, help="crash: the random kill points' seed")
    p.add_argument("--repeat", type=int, default=20, help="console: fetches per page")
    p.add_argument("--out", default="bench-results")
    p.set_defaults(func=_run)
