"""Plan and load tasks: Polars planning into the outbox, then posting to Sage Pro."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict

import polars as pl
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from stripe_sage.errors import NotFoundError
from stripe_sage.mapping import Mapping
from stripe_sage.plan.customers import sage_customer_emails
from stripe_sage.plan.outbox import plan_into_outbox
from stripe_sage.sage.client import SageProClient
from stripe_sage.sage.loader import Loader
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.writeback import write_back
from tasks.context import in_run, run_logger

LOOKUP_WORKERS = 4


@task(name="fiscal-periods", cache_policy=NO_CACHE)
def fiscal_periods(client: SageProClient) -> list[dict[str, Any]]:
    return client.fiscal_periods()


def sage_has(sage: SageProClient, collection: str, key: str) -> bool:
    """Whether Sage has the document (a customer id, a sales order number): what planning
    is told, as data, about the guest customer and ERP orders (planning never calls Sage)."""
    try:
        sage.get(collection, key)
    except NotFoundError:
        return False
    return True


def sage_has_many(sage: SageProClient, collection: str, keys: list[str]) -> set[str]:
    """The keys Sage has, asked a few at a time (each a GET; planning asks only about the
    charges it plans, so later runs ask about new orders only)."""
    with ThreadPoolExecutor(LOOKUP_WORKERS, thread_name_prefix="sage-lookup") as pool:
        found = pool.map(lambda k: sage_has(sage, collection, k), keys)
        return {k for k, yes in zip(keys, found, strict=True) if yes}


class SageLookups(TypedDict, total=False):
    customer_exists: Callable[[str], bool]
    sales_orders: Callable[[list[str]], set[str]]


def sage_lookups(sage: SageProClient) -> SageLookups:
    """What planning is told about Sage, as callables it may ask (it never calls Sage
    itself): ``customer_exists`` (is the guest customer there?) and ``sales_orders`` (which
    of these ERP orders does Sage have?). Keyword arguments of ``plan_into_outbox``."""
    return SageLookups(
        customer_exists=lambda cid: sage_has(sage, "customers", cid),
        sales_orders=lambda ids: sage_has_many(sage, "salesorders", ids),
    )


@task(name="plan", cache_policy=NO_CACHE)
def plan(
    st: Staging,
    loader: Loader,
    mapping: Mapping,
    periods: list[dict[str, Any]],
    sage: SageProClient | None = None,
    run_id: str | None = None,
    dry_run: bool = False,
    scoped: bool = False,
    excludes_run: str | None = None,
    between: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Plan the Sage documents the staged data implies, slice by slice into the outbox
    (``dry_run``: only count them; ``scoped``: only what run ``run_id`` staged and what
    depends on it, a micro-batch's plan). Returns ``planned`` per doc_type,
    ``planned_errors`` and ``enqueued``."""
    totals = plan_into_outbox(
        st,
        mapping,
        periods,
        None if dry_run else loader.enqueue,
        run_id=run_id,
        scope_run_id=run_id if scoped else None,
        scope_excludes_run=excludes_run if scoped else None,
        between=between,
        sage_customers=(lambda: sage_customer_emails(sage.list_customers())) if sage else None,
        **(sage_lookups(sage) if sage else SageLookups()),
    )
    run_logger().info(
        "planned %d new Sage documents (%d failed planning, %d flagged for a person)%s",
        sum(totals.planned.values()),
        totals.errors,
        totals.flagged,
        " (dry run: nothing enqueued)" if dry_run else "",
    )
    return totals.as_dict()


@task(name="enqueue", cache_policy=NO_CACHE)
def enqueue(loader: Loader, docs: pl.DataFrame) -> int:
    return loader.enqueue(docs)


@task(name="load", cache_policy=NO_CACHE)
def load(loader: Loader) -> dict[str, Any]:
    """Post the outbox; progress shows in the Prefect UI as a progress artifact."""
    if in_run():
        artifact: Any = create_progress_artifact(
            0.0, key="sage-load", description="Sage documents posted this run"
        )
        last = [0.0]

        def progress(done: int, total: int) -> None:
            pct = 100.0 * done / max(total, 1)
            if pct - last[0] >= 5 or done == total:  # at most ~20 updates a run
                update_progress_artifact(artifact, pct)
                last[0] = pct

        loader.on_progress = progress
    stats = loader.run().as_dict()
    run_logger().info("load: %s", stats)
    return stats


@task(name="write-back-to-stripe", cache_policy=NO_CACHE)
def write_back_task(
    reader: StripeReader, st: Staging, run_id: str, between: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Sage ids into Stripe metadata (customers, charges), bounded per run; ``between`` is
    called before each write (a sync serves webhook events there)."""
    counts = write_back(reader, st, run_id, between=between)
    run_logger().info("write-back to Stripe: %s", counts)
    return counts
