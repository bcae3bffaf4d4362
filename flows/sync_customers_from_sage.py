"""The Sage → Stripe direction of the customer master (scheduled)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from flows.lifecycle import flow_run
from stripe_sage.sage.client import SageProClient
from stripe_sage.sage.customer_master import ConflictRule, sync_from_sage
from stripe_sage.settings import Settings
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader


@task(name="sage-customers-to-stripe", cache_policy=NO_CACHE)
def sage_to_stripe(
    st: Staging, sage: SageProClient, reader: StripeReader, run_id: str, rule: ConflictRule
) -> dict[str, int]:
    counts = sync_from_sage(st, sage, reader, run_id, rule=rule)
    get_run_logger().info("Sage → Stripe customers: %s", counts)
    return counts


@flow(name="sync_customers_from_sage", log_prints=True)
def sync_customers_from_sage(
    conflict_rule: ConflictRule = "latest_wins", trigger: str = "manual"
) -> dict[str, Any]:
    """Sage customers changed since the cursor update their linked Stripe customers; when
    both sides changed, ``conflict_rule`` decides and ``ops.customer_conflicts`` records it."""
    settings = Settings()  # a flow run is an entry point: resolved once, passed down
    with flow_run(settings, flow="sync_customers_from_sage", trigger=trigger) as run:
        ctx = run.context
        counts = sage_to_stripe(ctx.staging, ctx.sage, ctx.reader, run.run_id, conflict_rule)
        run.counts.update(counts)
        return counts
