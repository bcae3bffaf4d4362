"""One settings class, resolved once at the edge (CLI, flow entry) and passed into clients.

Clients never read the environment themselves. Secrets are ``SecretStr`` so that a repr, a
log line or an exception shows ``**********``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The embedded defaults: both sandboxes on loopback with their well-known test keys.
SANDBOX_STRIPE_URL = "http://127.0.0.1:12111"
SANDBOX_SAGE_URL = "http://127.0.0.1:12112"
SANDBOX_STRIPE_KEY = "sk_test_stripe_sage_sandbox"
SANDBOX_SAGE_KEY = "sage_test_stripe_sage_sandbox"
SANDBOX_WEBHOOK_SECRET = "whsec_stripe_sage_sandbox"


class Settings(BaseSettings):
    """Environment variables (and ``.env``); see the README's configuration table."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    stripe_api_key: SecretStr = Field(default=SecretStr(SANDBOX_STRIPE_KEY))
    # Unset means real Stripe; the embedded default is the loopback sandbox.
    stripe_api_base: str | None = Field(default=SANDBOX_STRIPE_URL)
    stripe_webhook_secret: SecretStr = Field(default=SecretStr(SANDBOX_WEBHOOK_SECRET))
    sagepro_base_url: str = Field(default=SANDBOX_SAGE_URL)
    sagepro_api_key: SecretStr = Field(default=SecretStr(SANDBOX_SAGE_KEY))
    staging_db: Path = Field(default=Path("data/stripe_sage.duckdb"))
    mapping_file: Path | None = Field(default=None)
    # Requests per second toward Stripe; under test mode's 25 req/s per endpoint budget.
    stripe_max_rps: float = Field(default=20.0, gt=0)
    sage_concurrency: int = Field(default=4, ge=1, le=64)
    # Requests per second toward Sage, paced by the client (set it to Sage's rate limit);
    # unset: unlimited.
    sage_max_rps: float | None = Field(default=None, gt=0)
    # The webhook receiver's own durable inbox (never the staging DB) and where it listens.
    webhook_inbox: Path = Field(default=Path("data/webhook_inbox.sqlite3"))
    webhook_host: str = Field(default="127.0.0.1")
    webhook_port: int = Field(default=8787)
    # Prefect's API (the receiver posts events there); unset: no trigger, the sync drains.
    prefect_api_url: str | None = Field(default=None)
    # Alerts (tasks/alerts.py): where notifications go (a Slack-style incoming webhook
    # URL often carries a token, hence secret), and how many open dead letters raise one.
    alert_webhook_url: SecretStr | None = Field(default=None)
    dead_letter_alert_threshold: int = Field(default=25, ge=0)
    # How long a document may wait, per class of reason (sage.outbox.wait_kind), before the
    # waiting alert fires; "default" covers the others. JSON in the environment, e.g.
    # WAITING_ALERT_HOURS='{"balance_transaction": 24}'.
    waiting_alert_hours: dict[str, float] = Field(
        default_factory=lambda: {"balance_transaction": 24.0, "default": 24.0}
    )
    # Seconds of further rounds a load gives documents Sage did not take (503, 429,
    # timeouts) before the run ends partial, leaving them to the next run.
    sage_retry_budget: float = Field(default=300.0, ge=0)
    # Schedules of the served deployments (deployments/serve.py), and how often the runner
    # polls for triggered runs (Prefect's default is 10 s; 2 s keeps webhook latency low).
    sync_cron: str = Field(default="*/15 * * * *")
    reconcile_cron: str = Field(default="30 6 * * *")
    customers_cron: str = Field(default="5 * * * *")
    runner_poll_seconds: float = Field(default=2.0, gt=0)
    # The real-time event processor (flows/realtime_processor.py): at most this many inbox
    # events per micro-batch, how often it looks at the inbox while idle, how often (at most)
    # it refreshes the reconciliation report and the analysts' snapshot, and the retry
    # budget of one batch's load (short: the processor retries the rest with its own
    # backoff, so a Sage outage never stalls it for SAGE_RETRY_BUDGET).
    processor_batch_events: int = Field(default=500, ge=1)
    processor_poll_seconds: float = Field(default=0.05, gt=0)
    processor_refresh_seconds: float = Field(default=60.0, ge=0)
    processor_retry_budget: float = Field(default=10.0, ge=0)
    # A micro-batch plans only what it staged and what depends on it (plan/scope.py); at
    # most this often a batch plans everything unsettled instead (what waits on time, not
    # data: a day that ended). And at most this often the processor raises the dead-letter
    # and waiting-age alerts (tasks/alerts.py), as a scheduled run does at its end.
    processor_full_plan_seconds: float = Field(default=60.0, ge=0)
    processor_alert_seconds: float = Field(default=300.0, ge=0)
    # While a sync holds the DuckDB writer, its own run serves webhook events at most this
    # often (a micro-batch between two steps of its stages: flows/realtime_processor.py
    # SyncEventPump); 0: events wait for the end of the sync.
    sync_serve_seconds: float = Field(default=1.0, ge=0)
    # How the scheduled and manual syncs check staged rows: "gx", Great Expectations with
    # its Data Docs (data/data_docs/); "polars", the same checks with the same outcomes in
    # Polars (the real-time processor's engine), no Data Docs: a few seconds less per sync.
    quality_engine: Literal["gx", "polars"] = Field(default="gx")
    # The finance console (`stripe-sage console`): its own store (users, sessions, actions;
    # never the staging file), where it listens, and how long a session lasts unused.
    console_store: Path = Field(default=Path("data/console.sqlite3"))
    console_host: str = Field(default="127.0.0.1")
    console_port: int = Field(default=8788)
    console_session_minutes: float = Field(default=480, gt=0)
    # Where a backfill's window files go (shared by every machine of a fan-out); unset:
    # ``backfill/`` beside the staging file.
    backfill_dir: Path | None = Field(default=None)

    def secrets(self) -> list[str]:
        """Every secret value, for scrubbing tests and log filters."""
        return [
            s.get_secret_value()
            for s in (self.stripe_api_key, self.stripe_webhook_secret, self.sagepro_api_key)
            if s.get_secret_value()
        ]
