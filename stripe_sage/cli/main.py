"""``stripe-sage``: the command line. Settings are resolved here, once, and passed down."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from devkit.sandbox.stripe_business import BusinessConfig, default_end
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


def _business(args: argparse.Namespace) -> BusinessConfig:
    return BusinessConfig(
        seed=args.seed,
        charges=args.charges,
        days=args.days,
        end=args.end if args.end is not None else default_end(),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stripe-sage", description="Keep a Sage Pro ERP in step with a Stripe account."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    from devkit import bench
    from stripe_sage.cli import commands

    commands.register(sub)
    bench.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
