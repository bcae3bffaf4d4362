"""The development kit's commands — ``demo``, ``sandbox``, ``bench`` — added to ``stripe-sage``
through the ``stripe_sage.commands`` entry point (devkit/pyproject.toml). The shipped wheel
holds none of them: the console script lists whatever the installed entry points provide.

Only argparse wiring here: each command imports its machinery when it runs, so
``stripe-sage --help`` stays light.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devkit.sandbox.stripe_business import BusinessConfig

from stripe_sage.settings import SANDBOX_WEBHOOK_SECRET


def _date_to_ts(text: str) -> int:
    day = dt.date.fromisoformat(text)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def _business_args(p: argparse.ArgumentParser, charges: int) -> None:
    g = p.add_argument_group("generated Stripe business")
    g.add_argument("--seed", type=int, default=7, help="same seed, same data (default 7)")
    g.add_argument("--charges", type=int, default=charges, help=f"charges (default {charges})")
    g.add_argument("--days", type=int, default=30, help="days of history (default 30)")
    g.add_argument(
        "--end",
        type=_date_to_ts,
        default=None,
        help="last day of the business, YYYY-MM-DD (default: today, UTC)",
    )
    g.add_argument(
        "--manual-payouts",
        action="store_true",
        help="the account is paid out only manually (weekly payouts Stripe does not itemise)",
    )
    g.add_argument(
        "--interim-manual-payouts",
        action="store_true",
        help="an automatic account also paid out by hand twice (a standard and an instant "
        "payout between automatic ones)",
    )


def _business(args: argparse.Namespace) -> BusinessConfig:
    from devkit.sandbox.stripe_business import BusinessConfig, default_end

    return BusinessConfig(
        seed=args.seed,
        charges=args.charges,
        days=args.days,
        end=args.end if args.end is not None else default_end(),
        manual_payouts=getattr(args, "manual_payouts", False),
        interim_manual_payouts=getattr(args, "interim_manual_payouts", False),
    )


def cmd_sandbox(args: argparse.Namespace) -> int:
    from devkit.sandbox.launch import SandboxPair

    if args.only == "stripe":
        return _serve_stripe_only(args)

    pair = SandboxPair(
        _business(args),
        sage_db=Path(args.sage_db),
        stripe_port=args.stripe_port,
        sage_port=args.sage_port,
        stripe_rate_limit=args.rate_limit or None,
        sage_rate_limit=args.sage_rate_limit or None,
        live_rate=args.live_rate,
    )
    for url in args.webhook_url or []:
        from devkit.sandbox.stripe_app import WebhookEndpoint

        pair.stripe_app.state.sandbox.endpoints.append(
            WebhookEndpoint(
                url=url,
                secret=args.webhook_secret,
                duplicate_rate=args.duplicates,
                shuffle_window=args.shuffle,
            )
        )
    with pair:
        c = pair.world.config
        counts = {
            r: pair.world.count(r)
            for r in (
                "customers",
                "charges",
                "refunds",
                "disputes",
                "invoices",
                "payouts",
                "balance_transactions",
                "events",
            )
        }
        print(f"Stripe sandbox   {pair.stripe_url}   key {pair.stripe_key}")
        print(f"Sage Pro sandbox {pair.sage_url}   key {pair.sage_key}   db {args.sage_db}")
        print(f"Webhook secret   {args.webhook_secret}   endpoints {args.webhook_url or []}")
        print(
            f"Business seed={c.seed} from {dt.datetime.fromtimestamp(c.start, dt.UTC):%Y-%m-%d}"
            f" to {dt.datetime.fromtimestamp(c.end, dt.UTC):%Y-%m-%d}: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
        )
        print("Ctrl-C stops both.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
    return 0


def _serve_stripe_only(args: argparse.Namespace) -> int:
    """Just the Stripe sandbox (benchmarks measure its process alone)."""
    from devkit.sandbox.runner import ThreadedServer
    from devkit.sandbox.stripe_app import create_stripe_app
    from stripe_sage.settings import SANDBOX_STRIPE_KEY

    app = create_stripe_app(
        _business(args),
        api_key=SANDBOX_STRIPE_KEY,
        rate_limit=args.rate_limit or None,
        live_rate=args.live_rate,
    )
    with ThreadedServer(app, port=args.stripe_port) as srv:
        print(f"Stripe sandbox   {srv.url}   key {SANDBOX_STRIPE_KEY}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping")
    return 0


def register(sub: Any) -> None:
    """Add the devkit's commands to the ``stripe-sage`` parser's subcommands."""
    from devkit.bench import args as bench_args
    from devkit.demo import DEMO_DIR, cmd_demo

    p = sub.add_parser(
        "sandbox",
        help="serve the Stripe and Sage Pro sandboxes on loopback",
        description="Serve both sandboxes on loopback until Ctrl-C.",
    )
    _business_args(p, charges=1_000)
    p.add_argument("--stripe-port", type=int, default=12111)
    p.add_argument("--sage-port", type=int, default=12112)
    p.add_argument("--sage-db", default="data/sage_sandbox.sqlite3")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=25.0,
        help="Stripe requests/s per endpoint, 0 = unlimited (default 25, test mode)",
    )
    p.add_argument(
        "--sage-rate-limit", type=float, default=0.0, help="Sage requests/s, 0 = unlimited"
    )
    p.add_argument(
        "--live-rate",
        type=float,
        default=0.0,
        help="new Stripe activity per second (live mode), delivered as webhooks",
    )
    p.add_argument(
        "--webhook-url", action="append", help="deliver events here, signed (repeatable)"
    )
    p.add_argument("--webhook-secret", default=SANDBOX_WEBHOOK_SECRET)
    p.add_argument(
        "--duplicates", type=float, default=0.0, help="fraction of webhooks delivered twice"
    )
    p.add_argument(
        "--shuffle",
        type=int,
        default=0,
        help="deliver webhooks out of order within windows of N events",
    )
    p.add_argument("--only", choices=("stripe",), help="serve only the Stripe sandbox")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser(
        "demo",
        help="the main job end to end on embedded defaults",
        description="Start both sandboxes on loopback, run the main flow on a "
        "generated business (local DuckDB, local Prefect), run it again to show "
        "that nothing is posted twice, add activity, run once more.",
    )
    _business_args(p, charges=500)
    p.add_argument("--data-dir", default=str(DEMO_DIR))
    p.add_argument("--keep", action="store_true", help="keep the previous demo's state")
    p.add_argument(
        "--rate-limit",
        type=float,
        default=0.0,
        help="Stripe sandbox requests/s per endpoint (0 = unlimited)",
    )
    p.set_defaults(func=cmd_demo)

    bench_args.register(sub)
