"""Extract tasks: one per stream (run concurrently), then one for the events since the cursor."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from stripe_sage.stripe.extract import Extractor
from tasks.context import run_logger


@task(name="extract-stream", task_run_name="extract-{stream}", cache_policy=NO_CACHE)
def extract_stream(
    extractor: Extractor, stream: str, full_refresh: bool = False, since: int | None = None
) -> dict[str, Any]:
    stats = extractor.extract_stream(stream, full_refresh=full_refresh, since=since)
    run_logger().info(
        "%s: %s, %d listed in %d windows", stream, stats.mode, stats.listed, stats.windows
    )
    return asdict(stats)


@task(name="extract-events", cache_policy=NO_CACHE)
def extract_events(extractor: Extractor, streams: tuple[str, ...]) -> dict[str, Any]:
    stats = extractor.extract_events(streams=streams)
    logger = run_logger()
    for warning in stats.warnings:
        logger.warning(warning)
    logger.info("events: %d read, changed objects re-fetched: %s", stats.events, stats.changed)
    return asdict(stats)
