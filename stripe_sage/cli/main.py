"""``stripe-sage``: the command line. Settings are resolved here, once per command, and passed
down. The product's commands come from :mod:`stripe_sage.cli.commands`; others (the devkit's
``demo``, ``sandbox``, ``bench``) from the ``stripe_sage.commands`` entry points installed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from stripe_sage.cli import commands

PLUGIN_GROUP = "stripe_sage.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stripe-sage", description="Keep a Sage Pro ERP in step with a Stripe account."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    for ep in entry_points(group=PLUGIN_GROUP):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
