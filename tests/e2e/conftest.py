"""The e2e tier: real Prefect flows against both sandboxes and real DuckDB files."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devkit.sandbox.stripe_business import BusinessConfig
from tests.helpers.business import Env, make_env, run_flow, use_env

DEFAULT = BusinessConfig()  # the business `make demo` serves


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API for the whole session (its database copied migrated)."""
    from tests.helpers.servers import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def default_business(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness: None
) -> Iterator[tuple[Env, dict[str, Any]]]:
    """The sandbox's default business (``BusinessConfig``'s defaults: the one ``make demo``
    serves) after the main flow's first run, and that run's result: built once per worker
    for the modules that check it (tests/helpers/scheduling.py ``SHARED`` runs them on one
    worker, in its order; a serial run keeps that order too). Their tests may run the flow
    again (it must post nothing), but must not add to the business — except the last one in
    that order (test_after_posting pays a written-off invoice)."""
    with pytest.MonkeyPatch.context() as mp:
        env = make_env(
            tmp_path_factory.mktemp("default_business"),
            charges=DEFAULT.charges,
            seed=DEFAULT.seed,
            monkeypatch=mp,
        )
        with env.pair:
            use_env(env, mp)
            result = run_flow(trigger="test")
            mp.undo()  # each module sets the environment for its own tests
            yield env, result
