"""Serve the product's deployments on one machine (``python deployments/serve.py``).

- ``stripe-to-sage``: the main sync on a cron schedule (``SYNC_CRON``, default every 15 min)
- ``reconcile-payouts``: daily payout reconciliation (``RECONCILE_CRON``, default 06:30 UTC)
- ``sync-customers-from-sage``: Sage → Stripe customer changes, hourly (``CUSTOMERS_CRON``)
- ``realtime-processor``: the long-lived real-time processor (``stripe-sage serve`` starts
  it as its own process; served here on demand, e.g. after stopping that process)
- ``process-stripe-events``: drains the webhook inbox once, on demand (the real-time
  processor does this continuously; the scheduled sync drains it too)
- ``replay-dead-letters``, ``backfill`` (Dask fan-out), ``backfill-windows``: on demand

The same deployments for a work pool (workers on several machines) are in ``prefect.yaml``.

``--only NAME`` serves a subset (tests serve only the event-triggered deployment).
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.backfill import backfill, backfill_windows
from flows.process_stripe_events import process_stripe_events
from flows.realtime_processor import realtime_processor
from flows.reconcile_payouts import reconcile_payouts
from flows.replay_dead_letters import replay_dead_letters
from flows.stripe_to_sage import stripe_to_sage
from flows.sync_customers_from_sage import sync_customers_from_sage
from stripe_sage.settings import Settings


def deployments(settings: Settings) -> dict[str, object]:
    return {
        "stripe-to-sage": stripe_to_sage.to_deployment(
            name="stripe-to-sage",
            cron=settings.sync_cron,
            parameters={"trigger": "schedule"},
            tags=["stripe-sage", "sync"],
            concurrency_limit=1,
        ),
        "reconcile-payouts": reconcile_payouts.to_deployment(
            name="reconcile-payouts",
            cron=settings.reconcile_cron,
            parameters={"trigger": "schedule"},
            tags=["stripe-sage", "reconciliation"],
            concurrency_limit=1,
        ),
        "sync-customers-from-sage": sync_customers_from_sage.to_deployment(
            name="sync-customers-from-sage",
            cron=settings.customers_cron,
            parameters={"trigger": "schedule"},
            tags=["stripe-sage", "customers"],
            concurrency_limit=1,
        ),
        "realtime-processor": realtime_processor.to_deployment(
            name="realtime-processor",
            tags=["stripe-sage", "webhooks", "realtime"],
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
            ),
        ),
        "process-stripe-events": process_stripe_events.to_deployment(
            name="process-stripe-events",
            tags=["stripe-sage", "webhooks"],
            parameters={"trigger": "manual"},
            concurrency_limit=ConcurrencyLimitConfig(
                limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
            ),
        ),
        "replay-dead-letters": replay_dead_letters.to_deployment(
            name="replay-dead-letters",
            tags=["stripe-sage", "dead-letters"],
            parameters={"trigger": "manual"},
            concurrency_limit=1,
        ),
        "backfill": backfill.to_deployment(
            name="backfill",
            tags=["stripe-sage", "backfill"],
            parameters={"fan_out": "dask", "workers": 2, "trigger": "manual"},
            concurrency_limit=1,
        ),
        "backfill-windows": backfill_windows.to_deployment(
            name="backfill-windows", tags=["stripe-sage", "backfill"]
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    settings = Settings()  # resolved once for every deployment served
    served = deployments(settings)
    parser.add_argument("--only", action="append", choices=sorted(served))
    args = parser.parse_args(argv)
    chosen = [d for name, d in served.items() if not args.only or name in args.only]
    serve(*chosen, query_seconds=settings.runner_poll_seconds)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
