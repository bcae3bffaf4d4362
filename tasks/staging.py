"""Staging and quality tasks."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from quality.runner import Engine
from quality.validate import QualityOutcome, validate_all
from stripe_sage.store.staging import Staging
from tasks.context import in_run, run_logger


@task(name="stage", cache_policy=NO_CACHE)
def stage(st: Staging, run_id: str, checkpoint: bool = True) -> dict[str, int]:
    counts = st.stage_all(run_id, checkpoint=checkpoint)
    run_logger().info("staged: %s", counts)
    return counts


@task(name="quality", cache_policy=NO_CACHE)
def quality(
    st: Staging,
    run_id: str,
    previous_rows: dict[str, int],
    docs_dir: Path | None,
    engine: Engine = "gx",
    between: Callable[[], None] | None = None,
) -> QualityOutcome:
    outcome = validate_all(
        st,
        run_id,
        now=dt.datetime.now(dt.UTC),
        docs_dir=docs_dir,
        previous_rows=previous_rows,
        engine=engine,
        between=between,
    )
    if outcome.results and in_run():
        create_table_artifact(
            key="data-quality",
            table=[
                {
                    k: r.get(k)
                    for k in (
                        "stream",
                        "check",
                        "column",
                        "success",
                        "unexpected_count",
                        "element_count",
                    )
                }
                for r in outcome.results
            ],
            description="Great Expectations results for the rows this run staged",
        )
    if outcome.markdown and in_run():
        create_markdown_artifact(key="data-quality-summary", markdown=outcome.markdown)
    run_logger().info(
        "quality: quarantined %s (data docs: %s)", outcome.quarantined, outcome.docs_path
    )
    return outcome


@task(name="publish-snapshot", cache_policy=NO_CACHE)
def publish_snapshot(st: Staging, root: Path, run_id: str) -> str:
    """Refresh the analysts' read-only snapshot (Parquet + views), atomically."""
    from stripe_sage.store.snapshot import publish

    path = publish(st, root, run_id)
    run_logger().info("analyst snapshot published: %s", path)
    return str(path)


@task(name="copy-console-records", cache_policy=NO_CACHE)
def copy_console_records(st: Staging, store_path: Path) -> dict[str, int]:
    """The finance console's actions and users into ``ops.console_*`` (before the snapshot,
    so analysts see them); nothing when no console store exists."""
    if not Path(store_path).exists():
        return {"actions": 0, "users": 0, "mapping_versions": 0}
    from stripe_sage.console.store import ConsoleStore

    store = ConsoleStore(store_path)
    actions, users = store.export()
    st.replace_console_records(actions, users)
    versions = store.export_mapping_versions()
    st.replace_console_mapping_versions(versions)
    return {"actions": len(actions), "users": len(users), "mapping_versions": len(versions)}
