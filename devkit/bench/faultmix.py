"""Sage faults against a fault-free load of the same business, in one benchmark run.

``python -m devkit.bench.faultmix --charges 200`` starts both sandboxes in their own process
(Sage limited to ``--rps`` requests a second, 50 by default, the client paced at the same
rate), extracts, stages and plans the business once, then loads the same outbox twice into
a freshly reset Sage: once without faults, once with 20 % 503, 10 % 429 and 10 %
commit-then-503 (the document is committed, the answer is a 503). Each load is one
``Loader.run()`` — its retry rounds included, within ``--budget`` seconds — and the figures
are read back from Sage independently of the loader: documents posted, duplicates (two
documents with one reference), missing (a planned document Sage does not hold).

``--client-attempts 6 --client-pause`` measures the former policy (the client retrying inside
the posting thread, sleeping through each backoff and Retry-After) for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from devkit.bench import start_sandbox
from devkit.sandbox.paging import sage_all
from stripe_sage.mapping import load_mapping
from stripe_sage.plan.outbox import plan_into_outbox
from stripe_sage.sage.client import COLLECTIONS, SageProClient
from stripe_sage.sage.loader import Loader
from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.extract import DAY, Extractor
from tasks.sage import sage_lookups

FAULTS = {
    "seed": 20261206,
    "rate_503": 0.2,
    "rate_429": 0.1,
    "commit_then_503_rate": 0.1,
    "retry_after": 1.0,
}
STREAMS = (
    "customers",
    "charges",
    "refunds",
    "invoices",
    "invoice_payments",
    "balance_transactions",
    "products",
    "tax_rates",  # the invoices' tax rates give their Sage tax codes (issue 18)
    "checkout_sessions",  # a charge paid through Checkout posts with its order (issue 17)
)


def prepare(stripe_url: str, sage_url: str, path: Path) -> None:
    """Extract, stage and plan the business into ``path`` (the outbox every load starts from)."""
    now = int(time.time())
    with Staging(path) as st:
        reader = StripeReader(SANDBOX_STRIPE_KEY, api_base=stripe_url, max_rps=1_000.0)
        ex = Extractor(
            reader,
            st,
            run_id="faultmix",
            now=now,
            backfill_start=now - 3 * 365 * DAY,
            window_seconds=30 * DAY,
        )
        for stream in STREAMS:
            ex.extract_stream(stream)
        st.stage_all("faultmix")
        # As a run's stage step does: customers deleted in Stripe, named only by charges.
        if ex.fetch_referenced_customers():
            st.stage_all("faultmix")
        with SageProClient(sage_url, SANDBOX_SAGE_KEY) as client:
            loader = Loader(st, client, run_id="faultmix-plan")
            # What a run's plan task tells planning about Sage (tasks/sage.py).
            plan_into_outbox(
                st,
                load_mapping(),
                client.fiscal_periods(),
                loader.enqueue,
                **sage_lookups(client),
            )


def load_once(
    sage_url: str, template: Path, work: Path, *, faults: dict[str, Any] | None, args: Any
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {SANDBOX_SAGE_KEY}"}
    with httpx.Client(base_url=sage_url, headers=headers, timeout=60) as http:
        http.post("/_sandbox/reset").raise_for_status()
        seeded = http.get("/_sandbox/stats").json()["documents"]
        if faults:
            http.post("/_sandbox/faults", json=faults).raise_for_status()
    shutil.copy(template, work)
    with (
        Staging(work) as st,
        SageProClient(sage_url, SANDBOX_SAGE_KEY, max_rps=args.rps) as client,
    ):
        expected = {
            (c, s)
            for c, s in st.con.execute(
                "SELECT collection, stripe_id FROM sage.outbox "
                "WHERE status = 'pending' AND doc_type <> 'customer_link'"
            ).fetchall()
        }
        loader = Loader(
            st,
            client,
            run_id="faultmix-load",
            concurrency=args.concurrency,
            retry_budget=args.budget,
            client_attempts=args.client_attempts,
            client_pause=args.client_pause,
        )
        t = time.perf_counter()
        stats = loader.run()
        seconds = time.perf_counter() - t
        posted = st.con.execute(
            "SELECT count(*) FROM sage.outbox WHERE status = 'posted'"
        ).fetchall()[0][0]
        client_stats = client.stats.as_dict()
        posted_ids = st.con.execute(
            "SELECT collection, sage_id FROM sage.outbox WHERE status = 'posted' "
            "AND doc_type NOT IN ('customer_link', 'customer_update')"
        ).fetchall()
        unposted = dict(
            st.con.execute(
                "SELECT status, count(*) FROM sage.outbox WHERE status <> 'posted' GROUP BY ALL"
            ).fetchall()
        )
    with httpx.Client(base_url=sage_url, headers=headers, timeout=60) as http:
        injected = http.get("/_sandbox/stats").json()
        http.delete("/_sandbox/faults").raise_for_status()
        duplicates = 0
        held: dict[str, set[str]] = {}
        for collection, key in COLLECTIONS.items():
            docs = sage_all(http, collection)
            held[collection] = {str(d[key]) for d in docs}
            if collection != "customers":
                refs = Counter(d.get("reference") for d in docs if d.get("reference"))
                duplicates += sum(n - 1 for n in refs.values() if n > 1)
        # Missing: recorded as posted but not in Sage, or never posted (still pending).
        missing = sum(1 for c, sid in posted_ids if sid not in held[c])
        missing += int(unposted.get("pending", 0))
    return {
        "faults": bool(faults),
        "load_s": round(seconds, 2),
        "planned": len(expected),
        "posted": int(posted),
        "unposted": unposted,
        # Documents Sage holds now that it did not after the reset: the posted ones, once.
        "new_in_sage": sum(len(held[c]) - int(seeded.get(c, 0)) for c in held),
        "posted_documents": len(posted_ids),
        "duplicates": duplicates,
        "missing": missing,
        "remaining_pending": sum(stats.deferred.values()),
        "rounds": stats.rounds,
        "client": client_stats,
        "injected": injected.get("faults", {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devkit.bench.faultmix", description=__doc__)
    p.add_argument("--charges", type=int, default=200)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--rps", type=float, default=50.0, help="Sage's limit and the client's pace")
    p.add_argument("--concurrency", type=int, default=4, help="SAGE_CONCURRENCY (default 4)")
    p.add_argument("--budget", type=float, default=300.0, help="SAGE_RETRY_BUDGET seconds")
    p.add_argument("--client-attempts", type=int, default=3, help="exchanges per round (3)")
    p.add_argument(
        "--client-pause",
        action="store_true",
        help="the client sleeps its backoff/Retry-After inside the posting thread (former policy)",
    )
    p.add_argument("--out", default="bench-results", help="where the JSON goes")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="faultmix-"))
    proc, stripe_port, sage_port = start_sandbox(
        args.charges, only=None, rate_limit=0, data=tmp, days=args.days, sage_rate_limit=args.rps
    )
    try:
        stripe_url, sage_url = f"http://127.0.0.1:{stripe_port}", f"http://127.0.0.1:{sage_port}"
        template = tmp / "template.duckdb"
        prepare(stripe_url, sage_url, template)
        clean = load_once(sage_url, template, tmp / "clean.duckdb", faults=None, args=args)
        faulty = load_once(sage_url, template, tmp / "faulty.duckdb", faults=FAULTS, args=args)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "charges": args.charges,
        "rps": args.rps,
        "concurrency": args.concurrency,
        "client_attempts": args.client_attempts,
        "client_pause": args.client_pause,
        "fault_mix": FAULTS,
        "fault_free": clean,
        "with_faults": faulty,
        "ratio": round(faulty["load_s"] / max(clean["load_s"], 1e-9), 2),
    }
    for name, r in (("fault-free", clean), ("with faults", faulty)):
        print(
            f"{name:<12} load {r['load_s']:>7.2f} s  rounds {r['rounds']}  posted {r['posted']}"
            f"/{r['planned']}  duplicates {r['duplicates']}  missing {r['missing']}  "
            f"unposted {r['unposted']}  "
            f"requests {r['client']['attempts']}  lookups-recovered "
            f"{r['client']['recovered_by_lookup']}"
        )
    print(f"ratio (faults / fault-free): {result['ratio']}×")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pause = "-pause" if args.client_pause else ""
    target = out / f"faultmix-{args.charges}-a{args.client_attempts}{pause}.json"
    target.write_text(json.dumps(result, indent=2, default=str))
    print(f"written {target}")
    ok = faulty["duplicates"] == 0 and faulty["missing"] == 0 and clean["missing"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
