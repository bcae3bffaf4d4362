"""``stripe-sage bench compare`` and ``bench scale``: our pipeline beside the floor and dlt.

One sandbox process (both sandboxes, the generated business, the same rate limits) serves
every contender in turn; each contender runs in its own process, so its wall time and peak
RSS are its own (``wait4`` ``ru_maxrss``, plus per-stage peaks reported by the contender).
See ``bench_contenders.py`` for what each one does.

Figures (all written to ``bench-results/``):

- per contender and stage: seconds, rows, rows/s, peak RSS during the stage;
- ``extract+stage``: ours = extract (listing every stream into ``raw.*``) + stage (typed
  ``staging.*``); floor = its extract (same requests, bytes thrown away); dlt = extract +
  normalize + load into DuckDB (its typed tables). ``ours_vs_floor`` = ours / floor (lower
  is better, 1.0 is the floor); ``dlt_vs_ours`` = dlt / ours (how many times faster we are);
- the rows each contender read per stream, which must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY
from stripe_sage.stripe.streams import LISTED_STREAMS

CONTENDERS = ("floor", "floor_windows", "dlt", "ours")


def _spec(args: argparse.Namespace, stripe_port: int, sage_port: int, work: Path) -> dict[str, Any]:
    return {
        "stripe_url": f"http://127.0.0.1:{stripe_port}",
        "sage_url": f"http://127.0.0.1:{sage_port}",
        "streams": list(LISTED_STREAMS),
        "page_size": 100,
        "client_rps": args.client_rps,
        "workers": 4,  # the extractor's windows read in parallel per stream
        "backfill_days": 3 * 365,
        "window_days": 7,
        "through": args.through,
        "driver": args.driver,
        "sage_concurrency": args.sage_concurrency,
        "sage_rate_limit": args.sage_rate_limit,
        "sage_max_rps": args.sage_max_rps,
        "dlt_format": args.dlt_format,
        "work_dir": str(work),
    }


def run_contender(
    name: str, spec: dict[str, Any], work: Path, profile: bool = False
) -> dict[str, Any]:
    """One contender in its own process; its figures plus its whole-process peak RSS."""
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    result_path = work / f"result_{name}.json"
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "devkit.bench.contenders",
        name,
        "--spec",
        str(spec_path),
        "--result",
        str(result_path),
    ]
    if profile:
        cmd += ["--profile", str(work / f"profile_{name}.html")]
    env = {**os.environ, "BENCH_STRIPE_KEY": SANDBOX_STRIPE_KEY, "BENCH_SAGE_KEY": SANDBOX_SAGE_KEY}
    log = (work / f"log_{name}.txt").open("wb")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    log.close()
    if proc.returncode != 0 or not result_path.exists():
        tail = (work / f"log_{name}.txt").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"contender {name} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    kb = usage.ru_maxrss // 1024 if sys.platform == "darwin" else usage.ru_maxrss
    result["process_peak_rss_mb"] = round(kb / 1024, 1)
    result["process_wall_s"] = round(wall, 2)
    return result


def _seconds(result: dict[str, Any], *stages: str) -> float:
    return round(sum(s["seconds"] for s in result["stages"] if s["stage"] in stages), 3)


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """extract+stage per contender, the two ratios, and whether the row counts agree."""
    es: dict[str, float] = {}
    if "floor" in results:
        es["floor"] = _seconds(results["floor"], "extract")
    if "floor_windows" in results:
        es["floor_windows"] = _seconds(results["floor_windows"], "extract")
    if "dlt" in results:
        es["dlt"] = _seconds(results["dlt"], "extract", "normalize", "load_duckdb")
    if "ours" in results:
        es["ours"] = _seconds(results["ours"], "extract", "stage")
    out: dict[str, Any] = {"extract_stage_s": es}
    objects = {k: sum(r["objects"].values()) for k, r in results.items()}
    out["objects"] = objects
    out["extract_stage_objects_per_s"] = {
        k: round(objects[k] / v) if v else 0 for k, v in es.items()
    }
    if "floor" in es and "ours" in es and es["floor"]:
        out["ours_vs_floor"] = round(es["ours"] / es["floor"], 3)
    if "dlt" in es and "ours" in es and es["ours"]:
        out["dlt_vs_ours"] = round(es["dlt"] / es["ours"], 2)
    per_stream = {k: r["objects"] for k, r in results.items()}
    out["counts_agree"] = len({json.dumps(v, sort_keys=True) for v in per_stream.values()}) == 1
    out["peak_rss_mb"] = {k: r["process_peak_rss_mb"] for k, r in results.items()}
    if "ours" in results and "load" in results["ours"]:
        out["sage_load"] = results["ours"]["load"]
    return out


def print_table(charges: int, results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> None:
    print(f"\n{charges:,} charges — per contender and stage")
    head = f"{'contender':<14}{'stage':<11}{'seconds':>9}{'rows':>11}{'rows/s':>10}{'peak MB':>9}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        for s in r["stages"]:
            print(
                f"{name:<14}{s['stage']:<11}{s['seconds']:>9.2f}{s['rows']:>11,}"
                f"{s['rows_per_s']:>10,}{s['peak_rss_mb'] or 0:>9.0f}"
            )
        total = sum(s["seconds"] for s in r["stages"])
        print(
            f"{name:<14}{'TOTAL':<11}{total:>9.2f}{'':>11}{'':>10}{r['process_peak_rss_mb']:>9.0f}"
        )
    es = summary["extract_stage_s"]
    print(
        "extract+stage: "
        + ", ".join(f"{k} {v:.2f} s ({summary['objects'][k]:,} objects)" for k, v in es.items())
    )
    if "ours_vs_floor" in summary:
        print(f"ours / floor = {summary['ours_vs_floor']:.2f}  (target ≤ 1.3)")
    if "dlt_vs_ours" in summary:
        print(f"dlt / ours   = {summary['dlt_vs_ours']:.2f}  (target ≥ 3)")
    print(f"row counts agree between contenders: {summary['counts_agree']}")
    if "sage_load" in summary:
        sl = summary["sage_load"]
        print(
            f"Sage load: {sl['posted']:,} posted, {sl['docs_per_s']} docs/s, "
            f"{sl['sage_requests_per_s']} requests/s (limit {sl['sage_rate_limit'] or 'none'}, "
            f"client pacing {sl['sage_max_rps'] or 'off'}), {sl['sage_429']} × 429"
        )


def compare_once(args: argparse.Namespace, charges: int) -> dict[str, Any]:
    from devkit.bench import start_sandbox
    from stripe_sage.metrics import peak_rss_mb

    out = Path(args.out)
    work = out / f"work_{charges}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "bench_sage.sqlite3").unlink(missing_ok=True)
    t = time.perf_counter()
    proc, stripe_port, sage_port = start_sandbox(
        charges,
        only=None,
        rate_limit=args.rate_limit,
        sage_rate_limit=args.sage_rate_limit,
        data=work,
        days=args.days,
    )
    startup = time.perf_counter() - t
    spec = _spec(args, stripe_port, sage_port, work)
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in args.contenders.split(","):
            print(f"  {charges:,} charges: running {name} ...", flush=True)
            results[name] = run_contender(name, spec, work, profile=args.profile)
        sandbox_rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    summary = summarise(results)
    return {
        "charges": charges,
        "days": args.days,
        "stripe_rate_limit_per_endpoint": args.rate_limit or None,
        "client_rps_per_endpoint": args.client_rps,
        "page_size": 100,
        "through": args.through,
        "driver": args.driver,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "sandbox_startup_s": round(startup, 2),
        "sandbox_peak_rss_mb": sandbox_rss,
        "summary": summary,
        "contenders": results,
    }


def chart_compare(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["contenders"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.9 * len(results)))
    names = list(results)
    for i, name in enumerate(names):
        left = 0.0
        for s in results[name]["stages"]:
            ax.barh(i, s["seconds"], left=left, edgecolor="white")
            if s["seconds"] > 0.04 * max(1e-9, _total(results)):
                ax.text(
                    left + s["seconds"] / 2, i, s["stage"], ha="center", va="center", fontsize=8
                )
            left += s["seconds"]
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds (wall, per stage)")
    ax.set_title(
        f"{report['charges']:,} charges, Stripe limit {report['stripe_rate_limit_per_endpoint']} "
        f"req/s/endpoint, client {report['client_rps_per_endpoint']} req/s/endpoint"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _total(results: dict[str, dict[str, Any]]) -> float:
    return max(sum(s["seconds"] for s in r["stages"]) for r in results.values())


def chart_scale(reports: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    sizes = [r["charges"] for r in reports]
    names = sorted({n for r in reports for n in r["contenders"]}, key=CONTENDERS.index)
    for name in names:
        pts = [(r["charges"], r["summary"]) for r in reports if name in r["contenders"]]
        xs = [p[0] for p in pts]
        a.plot(xs, [p[1]["extract_stage_s"][name] for p in pts], marker="o", label=name)
        b.plot(xs, [p[1]["extract_stage_objects_per_s"][name] for p in pts], marker="o", label=name)
        c.plot(xs, [p[1]["peak_rss_mb"][name] for p in pts], marker="o", label=name)
    for ax, title in (
        (a, "extract+stage seconds"),
        (b, "objects/s (extract+stage)"),
        (c, "peak RSS of the process, MiB"),
    ):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax.set_xlabel("charges")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bench_compare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = compare_once(args, args.charges)
    print_table(args.charges, report["contenders"], report["summary"])
    stem = out / f"compare_{args.charges}_{args.through}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    chart_compare(report, stem.with_suffix(".png"))
    print(f"written: {stem.with_suffix('.json')}, {stem.with_suffix('.png')}")
    return 0


def bench_scale(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    reports = []
    for n in sizes:
        report = compare_once(args, n)
        print_table(n, report["contenders"], report["summary"])
        (out / f"compare_{n}_{args.through}.json").write_text(json.dumps(report, indent=2))
        reports.append(report)
    rows = [
        {
            "charges": r["charges"],
            **{f"{k}_s": v for k, v in r["summary"]["extract_stage_s"].items()},
            **{f"{k}_peak_mb": v for k, v in r["summary"]["peak_rss_mb"].items()},
            "ours_vs_floor": r["summary"].get("ours_vs_floor"),
            "dlt_vs_ours": r["summary"].get("dlt_vs_ours"),
        }
        for r in reports
    ]
    print("\nscaling (extract+stage seconds, process peak RSS MiB)")
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()))
    stem = out / f"scale_{args.through}"
    stem.with_suffix(".json").write_text(json.dumps({"sizes": rows, "runs": reports}, indent=2))
    chart_scale(reports, stem.with_suffix(".png"))
    print(f"written: {stem.with_suffix('.json')}, {stem.with_suffix('.png')}")
    return 0
