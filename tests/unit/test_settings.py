"""Every knob the flows and deployments use is a Settings field, read from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from stripe_sage.settings import Settings

pytestmark = pytest.mark.unit


def test_schedules_poll_and_backfill_dir_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SYNC_CRON", "*/5 * * * *")
    monkeypatch.setenv("RECONCILE_CRON", "0 7 * * *")
    monkeypatch.setenv("CUSTOMERS_CRON", "15 * * * *")
    monkeypatch.setenv("RUNNER_POLL_SECONDS", "0.5")
    monkeypatch.setenv("BACKFILL_DIR", str(tmp_path / "windows"))
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.sync_cron, s.reconcile_cron, s.customers_cron) == (
        "*/5 * * * *",
        "0 7 * * *",
        "15 * * * *",
    )
    assert s.runner_poll_seconds == 0.5
    assert s.backfill_dir == tmp_path / "windows"


def test_defaults_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SYNC_CRON", "RECONCILE_CRON", "CUSTOMERS_CRON", "RUNNER_POLL_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("BACKFILL_DIR", raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.sync_cron == "*/15 * * * *" and s.runner_poll_seconds == 2.0
    assert s.backfill_dir is None


def test_a_bad_poll_interval_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNNER_POLL_SECONDS", "0")
    with pytest.raises(ValueError, match="runner_poll_seconds"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_the_syncs_quality_engine_is_great_expectations_unless_polars_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QUALITY_ENGINE", raising=False)
    assert Settings(_env_file=None).quality_engine == "gx"  # type: ignore[call-arg]
    monkeypatch.setenv("QUALITY_ENGINE", "polars")
    assert Settings(_env_file=None).quality_engine == "polars"  # type: ignore[call-arg]
    monkeypatch.setenv("QUALITY_ENGINE", "pandas")
    with pytest.raises(ValueError, match="quality_engine"):
        Settings(_env_file=None)  # type: ignore[call-arg]
