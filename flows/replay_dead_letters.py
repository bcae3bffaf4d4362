"""Dead-letter replay on demand (deployment ``replay-dead-letters``, no schedule)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.logging import get_run_logger

from flows.lifecycle import flow_run
from flows.stages import progress
from stripe_sage.sage.replay import release_dead_letters
from stripe_sage.settings import Settings
from tasks.sage import fiscal_periods, load, plan
from tasks.staging import publish_snapshot


@flow(name="replay_dead_letters", log_prints=True)
def replay_dead_letters(
    doc_keys: list[str] | None = None,
    doc_type: str | None = None,
    error_code: str | None = None,
    trigger: str = "manual",
) -> dict[str, Any]:
    """Retry the dead letters matching the filters (all when none is given) after their cause
    was fixed; what Sage rejects again is dead-lettered again, naming the reason."""
    logger = get_run_logger()
    settings = Settings()  # a flow run is an entry point: resolved once, passed down
    with flow_run(settings, flow="replay_dead_letters", trigger=trigger) as run:
        ctx, st, counts = run.context, run.context.staging, run.counts
        with progress("release") as row:
            released = release_dead_letters(
                st, doc_keys=doc_keys, doc_type=doc_type, error_code=error_code
            )
            row["rows"] = len(released)
        counts["released"] = released
        with progress("plan"):
            plan(st, ctx.loader, ctx.mapping, fiscal_periods(ctx.sage), ctx.sage, run.run_id)
        with progress("load") as row:
            counts["load"] = load(ctx.loader)
            # Dependents blocked on a replayed document are revived at the start of a load:
            # a second pass posts them now rather than at the next scheduled run.
            if ctx.loader.revive_unblocked() or ctx.loader.pending_count():
                counts["load_dependents"] = load(ctx.loader)
            row["rows"] = sum((counts["load"].get("posted") or {}).values())
        again = st.dead_among(released)
        counts["dead_again"] = again
        logger.info("replayed %d dead letters: %d dead again", len(released), len(again))
        # Published like a sync's, so the console and analysts see the replay's outcome now
        # rather than after the next scheduled run (the run's own row recorded first).
        run.finish("completed")
        with progress("snapshot"):
            counts["snapshot"] = publish_snapshot(
                st, Path(settings.staging_db).parent / "snapshot", run.run_id
            )
        return counts
