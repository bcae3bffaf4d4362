"""How ``make test`` hands test files to its xdist workers: one file at a time (module fixtures
stay on one worker), the costliest first, and files that share a session fixture together.

xdist's own ``loadfile`` hands files out by their number of tests, so a one-test e2e module
of a minute could start last while the other worker sits idle. Here each file's cost is what
it took the last time (pytest's cache), else the figure below, else a guess by tier: the long
files start first and the many short ones fill in at the end, so both workers finish together.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling
from xdist.workermanage import WorkerController

CACHE_KEY = "stripe_sage/file_seconds"

# Files whose module fixtures share one session fixture per worker: they run on the same
# worker, as one unit and in this order, so the shared state is built once
# (tests/e2e/conftest.py). The files that only read it come before those that run again; the
# last one may add to the business (after_posting pays a written-off invoice).
SHARED: dict[str, str] = {
    "tests/e2e/test_zero_touch.py": "default business",
    "tests/e2e/test_after_posting.py": "default business",
}
ORDER = {path: n for n, path in enumerate(SHARED)}

# Seconds per file on this 2-core machine (sum of setup, call and teardown; ``make test``),
# for a checkout without a cache. The cache, once written, takes over.
MEASURED: dict[str, float] = json.loads(
    (Path(__file__).with_name("file_seconds.json")).read_text(encoding="utf-8")
)
BY_TIER = {"e2e": 30.0, "integration": 5.0, "unit": 1.0}


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def guess(path: str) -> float:
    for tier, seconds in BY_TIER.items():
        if f"/{tier}/" in f"/{path}":
            return seconds
    return 1.0


class CostliestFirst(LoadFileScheduling):
    """``--dist loadfile``, shared files kept together, costliest unit handed out first."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        cache = getattr(config, "cache", None)  # None under ``-p no:cacheprovider``
        cached = cache.get(CACHE_KEY, {}) if cache is not None else {}
        self.seconds: dict[str, float] = {**MEASURED, **cached}

    def _split_scope(self, nodeid: str) -> str:
        path = file_of(nodeid)
        return SHARED.get(path, path)

    def cost(self, scope: str) -> float:
        files = [p for p, s in SHARED.items() if s == scope] or [scope]
        return sum(self.seconds.get(p, guess(p)) for p in files)

    def _assign_work_unit(self, node: WorkerController) -> None:
        # The base class hands out the queue's first unit: put the costliest there.
        costliest = max(self.workqueue, key=self.cost)
        self.workqueue.move_to_end(costliest, last=False)
        unit = self.workqueue[costliest]
        if costliest in SHARED.values():  # its files in SHARED's order (sort is stable)
            ordered = sorted(unit, key=lambda nodeid: ORDER[file_of(nodeid)])
            self.workqueue[costliest] = {nodeid: unit[nodeid] for nodeid in ordered}
        super()._assign_work_unit(node)


class FileSeconds:
    """Records each file's seconds in pytest's cache at the end of a run (on the controller
    only: xdist workers report to it)."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[file_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        cache = getattr(session.config, "cache", None)
        if cache is None or not self.seconds:
            return
        known = cache.get(CACHE_KEY, {})
        cache.set(CACHE_KEY, {**known, **{p: round(s, 1) for p, s in sorted(self.seconds.items())}})
