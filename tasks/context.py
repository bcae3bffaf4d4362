"""Tasks run inside a Prefect flow run (logs and artifacts go to the run) or, called through
``task.fn`` by the benchmark's direct driver, without one (logs to the standard logger, no
artifacts: the engine would start an API server just to receive them)."""

from __future__ import annotations

import logging
from typing import Any

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging import get_run_logger

_plain = logging.getLogger("stripe_sage")


def in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_logger() -> Any:
    """The run's logger in a run (its lines show in the Prefect UI), else a plain one."""
    return get_run_logger() if in_run() else _plain
