"""Shared test configuration: tiers by folder (each tier's own fixtures are in its conftest)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.scheduling import ORDER, CostliestFirst, FileSeconds, file_of

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts and not item.get_closest_marker(tier):
                item.add_marker(getattr(pytest.mark, tier))
    # Files sharing a session fixture run in their order in a plain (serial) run too: the last
    # one may add to the shared business (tests/helpers/scheduling.py SHARED).
    slots = [k for k, item in enumerate(items) if file_of(item.nodeid) in ORDER]
    shared = sorted((items[k] for k in slots), key=lambda item: ORDER[file_of(item.nodeid)])
    for k, item in zip(slots, shared, strict=True):
        items[k] = item


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` (``make test``), costliest files first: tests/helpers/scheduling.py."""
    if config.getvalue("dist") == "loadfile":
        return CostliestFirst(config, log)
    return None


def pytest_configure(config: pytest.Config) -> None:
    # On xdist's controller only: its workers report every test to it.
    if config.getvalue("dist") not in (None, "no") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(FileSeconds(), "stripe-sage-file-seconds")
