"""The three contenders of ``stripe-sage bench compare``, each run in its own process.

``python -m devkit.bench.contenders floor|dlt|ours --spec spec.json --result out.json``

- **floor**: a bare ``httpx`` client pages through the same endpoints with the same page size,
  the same windows, the same concurrency and the same client-side rate limit as our reader,
  parses each page only to find the next cursor (and which invoices have lines past the
  tenth, which it pages from ``/v1/invoices/{id}/lines`` as our extractor does), and throws
  the bytes away.
- **dlt**: dlt's generic ``rest_api`` source, configured for Stripe's cursor paging
  (``starting_after`` = the last id, ``has_more``), the same page size and rate limit,
  resources read in parallel, loaded into DuckDB (extract → normalize → load).
- **ours**: the main flow's stage sequence (``--driver direct``: ``flows/stages.py`` itself,
  outside a Prefect flow run, timed step by step) or the Prefect flow itself
  (``--driver flow``).

Each stage reports wall time, rows and the process's peak RSS *during that stage* (Linux:
``VmHWM`` reset through ``/proc/self/clear_refs`` at the start of each stage). Only
figures and counts are written: never a key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stripe_sage.metrics import peak_rss_mb

if TYPE_CHECKING:
    from flows.stages import Stage

DAY = 86_400


def _key(name: str) -> str:
    """Keys come by environment from the orchestrator, never through a file."""
    return os.environ[name]


def reset_peak_rss() -> bool:
    """Start a new peak-RSS period for this process (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Recorder:
    """Stage timings, rows and per-stage peak RSS of this process."""

    def __init__(self) -> None:
        self.stages: list[dict[str, Any]] = []
        self.resettable = reset_peak_rss()

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        reset_peak_rss()
        row: dict[str, Any] = {"stage": name, "rows": 0}
        t = time.perf_counter()
        yield row
        row["seconds"] = round(time.perf_counter() - t, 3)
        row["peak_rss_mb"] = peak_rss_mb()
        row["rows_per_s"] = round(row["rows"] / row["seconds"]) if row["seconds"] else 0
        self.stages.append(row)

    def split(self, row: dict[str, Any], name: str, seconds: float, rows: int) -> None:
        """Report ``seconds`` of a recorded stage as a stage of its own (the two ran
        interleaved, so they share the peak RSS)."""
        row["seconds"] = round(row["seconds"] - seconds, 3)
        row["rows_per_s"] = round(row["rows"] / row["seconds"]) if row["seconds"] else 0
        part = {"stage": name, "rows": rows, "seconds": round(seconds, 3)}
        part["peak_rss_mb"] = row["peak_rss_mb"]
        part["rows_per_s"] = round(rows / seconds) if seconds else 0
        part["interleaved_with"] = row["stage"]
        self.stages.append(part)


class ThreadSampler:
    """A wall-clock sampler of every thread's stack (pyinstrument sees only the main thread,
    and py-spy is not in the lock file): every ``interval`` s, each thread's stack is
    recorded. ``report`` gives, per function, the share of samples it was on the stack
    (inclusive) and at the top of it (self), over the threads that were doing something."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.stacks: dict[tuple[str, ...], int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack: list[str] = []
                f: Any = frame
                while f is not None:
                    code = f.f_code
                    mod = f.f_globals.get("__name__", "?")
                    stack.append(f"{mod}:{code.co_name}")
                    f = f.f_back
                key = tuple(reversed(stack))
                self.stacks[key] = self.stacks.get(key, 0) + 1

    def report(self, path: Path, top: int = 60) -> None:
        idle = ("threading:wait", "queue:get", "concurrent.futures.thread:_worker")
        busy = {k: v for k, v in self.stacks.items() if not (k and k[-1] in idle)}
        total = sum(busy.values()) or 1
        inclusive: dict[str, int] = {}
        selfs: dict[str, int] = {}
        for stack, n in busy.items():
            for fn in set(stack):
                inclusive[fn] = inclusive.get(fn, 0) + n
            selfs[stack[-1]] = selfs.get(stack[-1], 0) + n
        lines = [
            f"samples every {self.interval * 1000:.0f} ms: {self.samples}; thread-samples "
            f"outside idle pool waits: {total} ({total * self.interval:.1f} thread-seconds)",
            "",
            "inclusive  self  function (share of busy thread-samples)",
        ]
        for fn, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * n / total:8.1f}% {100 * selfs.get(fn, 0) / total:5.1f}%  {fn}")
        path.write_text("\n".join(lines) + "\n")
        with path.with_suffix(".collapsed").open("w") as fh:
            for stack, n in busy.items():
                fh.write(";".join(stack) + f" {n}\n")


# -- the floor ------------------------------------------------------------------------------


class _Bare:
    """A bare client: httpx, the reader's rate limiter, a single retry on 429/5xx."""

    def __init__(self, url: str, key: str, rps: float) -> None:
        from stripe_sage.stripe.client import RateLimiter

        self.http = httpx_client(url, key)
        self.limiter = RateLimiter(rps) if rps > 0 else None
        self.requests = self.retries = 0
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        import orjson

        family = path.split("/")[2]
        while True:
            if self.limiter is not None:
                self.limiter.acquire(family)
            r = self.http.get(path, params=params)
            with self.lock:
                self.requests += 1
                self.bytes += len(r.content)
            if r.status_code == 429 or r.status_code >= 500:
                with self.lock:
                    self.retries += 1
                time.sleep(float(r.headers.get("retry-after") or 0.5))
                continue
            r.raise_for_status()
            page: dict[str, Any] = orjson.loads(r.content)
            return page


def httpx_client(url: str, key: str) -> Any:
    import httpx

    return httpx.Client(
        base_url=url,
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    )


class _BareAsReader:
    """The bare client behind the ``request`` our window planner calls, so that
    ``floor_windows`` plans its windows with the extractor's own (pure) planner over bare
    httpx: the same probes and grid, none of our client."""

    def __init__(self, c: _Bare) -> None:
        self.c = c

    def request(self, method: str, path: str, params: dict[str, Any]) -> dict[str, Any]:
        flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
        for k, v in params.items():
            if isinstance(v, dict):
                flat |= {f"{k}[{op}]": x for op, x in v.items()}
        return self.c.get(path, flat)


def run_floor(spec: dict[str, Any], rec: Recorder, *, windows: bool = False) -> dict[str, Any]:
    """Page every stream and discard the bytes. The plain floor reads each stream with one
    cursor, streams in parallel (the fewest requests there are); ``windows`` makes the same
    requests as our extractor (probes for the oldest window, then windows of 7 days or more
    for a sparse stream, 4 at a time per stream), to tell the cost of our request plan from
    the cost of our processing."""
    from stripe_sage.stripe.extract import WINDOW_OBJECTS, backfill_windows
    from stripe_sage.stripe.streams import STREAMS

    c = _Bare(spec["stripe_url"], _key("BENCH_STRIPE_KEY"), spec["client_rps"])
    now = int(time.time())
    start = now - spec["backfill_days"] * DAY
    size = spec["window_days"] * DAY
    counts: dict[str, int] = {}

    lines_read = [0]

    def pages(path: str, params: dict[str, Any]) -> int:
        n = 0
        params = {**params, "limit": spec["page_size"]}
        while True:
            page = c.get(path, params)
            data = page.get("data") or []
            n += len(data)
            if path == "/v1/invoices":
                # Stripe embeds an invoice's first 10 lines; the rest are one more list per
                # such invoice. Our extractor reads them (invoice_lines), so the floor does.
                for inv in data:
                    if (inv.get("lines") or {}).get("has_more"):
                        lines = pages(f"/v1/invoices/{inv['id']}/lines", {})
                        with c.lock:
                            lines_read[0] += lines
            if not page.get("has_more") or not data:
                return n
            params["starting_after"] = data[-1]["id"]

    def window(path: str, a: int, b: int) -> int:
        return pages(path, {"created[gte]": a, "created[lt]": b + 1 if b >= now else b})

    def stream(name: str) -> None:
        path = STREAMS[name].path
        if not windows:
            counts[name] = pages(path, {})
            return
        plan = backfill_windows(
            _BareAsReader(c), name, start, now, size, min_objects=WINDOW_OBJECTS
        )
        with ThreadPoolExecutor(spec["workers"]) as pool:
            counts[name] = sum(pool.map(lambda w: window(path, *w), plan))

    with rec.stage("extract") as row:
        with ThreadPoolExecutor(len(spec["streams"])) as pool:
            list(pool.map(stream, spec["streams"]))
        row["rows"] = sum(counts.values())
    return {
        "objects": counts,
        "invoice_lines_paged": lines_read[0],
        "plan": "windows" if windows else "cursor",
        "requests": c.requests,
        "retried_429_5xx": c.retries,
        "bytes": c.bytes,
    }


def run_floor_windows(spec: dict[str, Any], rec: Recorder) -> dict[str, Any]:
    return run_floor(spec, rec, windows=True)


# -- dlt ------------------------------------------------------------------------------------


def run_dlt(spec: dict[str, Any], rec: Recorder) -> dict[str, Any]:
    work = Path(spec["work_dir"]) / "dlt"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    os.environ["DLT_DATA_DIR"] = str(work / "data")
    os.environ["RUNTIME__LOG_LEVEL"] = "WARNING"
    import dlt
    from dlt.sources.helpers.requests import Client
    from dlt.sources.helpers.rest_client.paginators import JSONResponseCursorPaginator
    from dlt.sources.rest_api import rest_api_source

    from stripe_sage.stripe.client import RateLimiter
    from stripe_sage.stripe.streams import STREAMS

    # dlt's own retrying session (429/5xx, Retry-After), under the same client-side rate
    # limit as our reader and the floor.
    session = Client(request_max_attempts=12, request_timeout=60).session
    limiter = RateLimiter(spec["client_rps"]) if spec["client_rps"] > 0 else None
    requests_sent = [0]
    if limiter is not None:
        send = session.send

        def limited_send(request: Any, **kw: Any) -> Any:
            family = str(request.path_url).split("?")[0].split("/")[2]
            limiter.acquire(family)
            requests_sent[0] += 1
            return send(request, **kw)

        session.send = limited_send  # type: ignore[method-assign]

    source = rest_api_source(
        {
            "client": {
                "base_url": spec["stripe_url"],
                "auth": {"type": "bearer", "token": _key("BENCH_STRIPE_KEY")},
                "paginator": JSONResponseCursorPaginator(
                    cursor_path="data[-1].id",
                    cursor_param="starting_after",
                    has_more_path="has_more",
                ),
                "session": session,
            },
            "resource_defaults": {
                "parallelized": True,
                "endpoint": {"params": {"limit": spec["page_size"]}, "data_selector": "data"},
            },
            "resources": [
                {"name": s, "endpoint": {"path": STREAMS[s].path.lstrip("/")}}
                for s in spec["streams"]
            ],
        }
    )
    db = work / "bench_dlt.duckdb"
    pipeline = dlt.pipeline(
        pipeline_name="bench_dlt_stripe",
        destination=dlt.destinations.duckdb(str(db)),
        dataset_name="stripe",
        pipelines_dir=str(work / "pipelines"),
    )
    with rec.stage("extract"):
        pipeline.extract(source, loader_file_format=spec.get("dlt_format") or None)
    with rec.stage("normalize"):
        pipeline.normalize()
    with rec.stage("load_duckdb"):
        pipeline.load()
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    tables = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'stripe'"
        ).fetchall()
    }
    counts = {
        s: int(con.execute(f'SELECT count(*) FROM stripe."{s}"').fetchall()[0][0])
        if s in tables
        else 0
        for s in spec["streams"]
    }
    all_rows = sum(
        int(con.execute(f'SELECT count(*) FROM stripe."{t}"').fetchall()[0][0])
        for t in tables
        if not t.startswith("_dlt")
    )
    con.close()
    total = sum(counts.values())
    for row in rec.stages:
        row["rows"] = total
        row["rows_per_s"] = round(total / row["seconds"]) if row["seconds"] else 0
    return {
        "objects": counts,
        "tables": len([t for t in tables if not t.startswith("_dlt")]),
        "rows_all_tables": all_rows,
        "requests": requests_sent[0] if limiter is not None else None,
        "dlt_version": dlt.__version__,
        "loader_file_format": spec.get("dlt_format") or "default (insert_values)",
    }


# -- ours -----------------------------------------------------------------------------------


def _bench_settings(spec: dict[str, Any]) -> Any:
    from pydantic import SecretStr

    from stripe_sage.settings import Settings

    work = Path(spec["work_dir"]) / "ours"
    work.mkdir(parents=True, exist_ok=True)
    for p in work.glob("bench_stripe_sage.duckdb*"):
        p.unlink()
    return Settings(
        stripe_api_key=SecretStr(_key("BENCH_STRIPE_KEY")),
        stripe_api_base=spec["stripe_url"],
        sagepro_base_url=spec["sage_url"],
        sagepro_api_key=SecretStr(_key("BENCH_SAGE_KEY")),
        staging_db=work / "bench_stripe_sage.duckdb",
        stripe_max_rps=spec["client_rps"] if spec["client_rps"] > 0 else 1e6,
        sage_concurrency=spec["sage_concurrency"],
        webhook_inbox=work / "no_inbox.sqlite3",
    )


def run_ours(spec: dict[str, Any], rec: Recorder) -> dict[str, Any]:
    if spec.get("driver") == "flow":
        return _run_ours_flow(spec, rec)
    return _run_ours_direct(spec, rec)


# The rows ``--through`` runs of the stage sequence (flows/stages.py).
SEQUENCE: dict[str, tuple[Stage, ...]] = {
    "extract": ("extract",),
    "stage": ("extract", "stage"),
    "quality": ("extract", "stage", "quality"),
    "transform": ("extract", "stage", "quality", "plan"),
    "plan": ("extract", "stage", "quality", "plan"),
    "load": ("extract", "stage", "quality", "plan", "load"),
}


class _StageClock:
    """The recorder as the stage sequence's clock: a row per step with its own peak RSS; the
    time the plan spent inserting into the outbox reported as a "plan" row of its own; the
    Stripe requests of extract and stage, and the Sage requests of the load alone."""

    def __init__(self, rec: Recorder, ctx: Any, out: dict[str, Any], with_plan: bool) -> None:
        self.rec, self.ctx, self.out, self.with_plan = rec, ctx, out, with_plan
        self.sage_before: dict[str, Any] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        if name == "itemise":
            self.out["stripe_requests_extract_stage"] = dict(self.ctx.reader.stats)
        if name == "load":
            self.sage_before = self.ctx.sage.stats.as_dict()
        with self.rec.stage(name) as row:
            yield row
        if name == "transform":
            enqueue_s, enqueued = row.pop("enqueue_seconds"), row.pop("enqueued")
            if self.with_plan:
                self.rec.split(row, "plan", enqueue_s, enqueued)


def _run_ours_direct(spec: dict[str, Any], rec: Recorder) -> dict[str, Any]:
    """The main flow's stage sequence itself (``run_stages``), each step's plain function
    outside a Prefect flow run, timed step by step."""
    from flows.lifecycle import FlowRun, recorded
    from flows.stages import run_stages
    from stripe_sage.runtime import RunContext
    from stripe_sage.sage.client import SageProClient

    settings = _bench_settings(spec)
    through = spec["through"]
    out: dict[str, Any] = {}
    with RunContext.open(
        settings,
        str(uuid.uuid4()),
        backfill_days=spec["backfill_days"],
        window_days=spec["window_days"],
    ) as ctx:
        if spec.get("sage_max_rps"):
            # The client-side token bucket (SAGE_MAX_RPS), same client otherwise.
            ctx.sage.close()
            ctx.sage = SageProClient(
                settings.sagepro_base_url,
                settings.sagepro_api_key,
                max_rps=spec["sage_max_rps"],
            )
            ctx.loader.client = ctx.sage
        clock = _StageClock(rec, ctx, out, with_plan=through != "transform")
        with recorded(FlowRun(settings, "bench", ctx.run_id, ctx=ctx), trigger="bench") as run:
            counts = run_stages(
                ctx,
                run,
                stages=SEQUENCE[through],
                streams=tuple(spec["streams"]),
                # "transform" alone is a dry run: planned, nothing enqueued.
                dry_run=through == "transform",
                clock=clock,
            )
            if run.status is None:
                run.finish("bench")
    out["objects"] = {s: x["listed"] for s, x in counts["extract"].items()}
    if "quarantined" in counts:
        out["quarantined"] = counts["quarantined"]
    if "load" in counts:
        load = counts["load"]
        row = next(r for r in rec.stages if r["stage"] == "load")
        seconds = row["seconds"]
        after = counts["sage_client"]
        sent = after["attempts"] - clock.sage_before["attempts"]
        out["load"] = {
            "posted": sum(load["posted"].values()),
            "dead": sum(load["dead"].values()),
            "deferred": sum(load["deferred"].values()),
            "sage_requests": sent,
            "sage_429": after["rate_limited"] - clock.sage_before["rate_limited"],
            "sage_requests_per_s": round(sent / seconds, 1) if seconds else 0,
            "docs_per_s": row["rows_per_s"],
            "sage_rate_limit": spec.get("sage_rate_limit") or None,
            "sage_max_rps": spec.get("sage_max_rps") or None,
        }
    return out


def _run_ours_flow(spec: dict[str, Any], rec: Recorder) -> dict[str, Any]:
    """The Prefect flow itself (through ``transform``: a dry run; ``load``: a full run)."""
    settings = _bench_settings(spec)
    env = {
        "STRIPE_API_BASE": spec["stripe_url"],
        "STRIPE_API_KEY": _key("BENCH_STRIPE_KEY"),
        "SAGEPRO_BASE_URL": spec["sage_url"],
        "SAGEPRO_API_KEY": _key("BENCH_SAGE_KEY"),
        "STAGING_DB": str(settings.staging_db),
        "STRIPE_MAX_RPS": str(settings.stripe_max_rps),
        "SAGE_CONCURRENCY": str(spec["sage_concurrency"]),
        "WEBHOOK_INBOX": str(settings.webhook_inbox),
    }
    os.environ.update(env)
    from stripe_sage.cli.commands import prefect_defaults

    prefect_defaults()
    from flows.stripe_to_sage import stripe_to_sage

    t = time.perf_counter()
    r = stripe_to_sage(
        trigger="bench",
        dry_run=spec["through"] != "load",
        backfill_days=spec["backfill_days"],
        window_days=spec["window_days"],
    )
    wall = time.perf_counter() - t
    objects = {s: x["listed"] for s, x in r["extract"].items()}
    rows = {
        "extract": sum(objects.values()),
        "stage": sum(r.get("staged", {}).values()),
        "transform": sum(r.get("planned", {}).values()),
        "load": sum((r.get("load") or {}).get("posted", {}).values()),
    }
    for name, seconds in r["timings"].items():
        rec.stages.append(
            {
                "stage": name,
                "seconds": round(seconds, 3),
                "rows": rows.get(name, 0),
                "rows_per_s": round(rows.get(name, 0) / seconds) if seconds else 0,
                # The flow records its process's peak so far, not per stage.
                "peak_rss_mb": r["peak_rss_mb"].get(name),
            }
        )
    return {"objects": objects, "flow_wall_s": round(wall, 2), "status": r.get("status")}


RUNNERS: dict[str, Callable[[dict[str, Any], Recorder], dict[str, Any]]] = {
    "floor": run_floor,
    "floor_windows": run_floor_windows,
    "dlt": run_dlt,
    "ours": run_ours,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.contenders")
    p.add_argument("contender", choices=sorted(RUNNERS))
    p.add_argument("--spec", required=True, help="JSON file: URLs, keys, streams, limits")
    p.add_argument("--result", required=True, help="where to write the figures (JSON)")
    p.add_argument(
        "--profile",
        help="write a pyinstrument HTML profile (main thread) and an all-threads "
        "sample report (.threads.txt) here",
    )
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    rec = Recorder()
    profiler = None
    sampler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005, async_mode="disabled")
        profiler.start()
        sampler = ThreadSampler()
        sampler.start()
    t = time.perf_counter()
    extra = RUNNERS[args.contender](spec, rec)
    wall = time.perf_counter() - t
    if sampler is not None:
        sampler.stop()
        sampler.report(Path(args.profile).with_suffix(".threads.txt"))
    if profiler is not None:
        profiler.stop()
        Path(args.profile).write_text(profiler.output_html())
        Path(args.profile).with_suffix(".txt").write_text(
            profiler.output_text(unicode=False, color=False, show_all=False)
        )
    result = {
        "contender": args.contender,
        "wall_s": round(wall, 3),
        "stages": rec.stages,
        "per_stage_rss": rec.resettable,
        **extra,
    }
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
