"""Build and serve both sandboxes together, wired to the same generated business."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from devkit.sandbox.runner import ThreadedServer
from devkit.sandbox.sage_app import create_sage_app
from devkit.sandbox.sage_seed import SHOP_ITEMS
from devkit.sandbox.seed_link import sage_seed_for
from devkit.sandbox.stripe_app import create_stripe_app
from devkit.sandbox.stripe_business import BusinessConfig
from devkit.sandbox.stripe_state import StripeWorld
from stripe_sage.settings import SANDBOX_SAGE_KEY, SANDBOX_STRIPE_KEY


def closed_through_for(config: BusinessConfig) -> dt.date:
    """Books are closed up to the month before the business starts (a realistic default)."""
    start = dt.datetime.fromtimestamp(config.start, dt.UTC).date()
    return start.replace(day=1) - dt.timedelta(days=1)


def fiscal_years_for(config: BusinessConfig, now: float) -> list[int]:
    first = dt.datetime.fromtimestamp(config.start, dt.UTC).year - 1
    last = (
        max(
            dt.datetime.fromtimestamp(config.end, dt.UTC).year,
            dt.datetime.fromtimestamp(now, dt.UTC).year,
        )
        + 1
    )
    return list(range(first, last + 1))


@dataclass
class SandboxPair:
    """Both sandboxes on loopback. ``with SandboxPair(cfg, sage_db=...) as sb: sb.stripe_url``."""

    config: BusinessConfig
    sage_db: Path
    stripe_port: int = 0
    sage_port: int = 0
    stripe_key: str = SANDBOX_STRIPE_KEY
    sage_key: str = SANDBOX_SAGE_KEY
    stripe_rate_limit: float | None = None
    sage_rate_limit: float | None = None
    closed_through: dt.date | None = None
    live_rate: float = 0.0
    clock: Callable[[], float] = time.time
    host: str = "127.0.0.1"
    world: StripeWorld = field(init=False)
    _servers: list[ThreadedServer] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.world = StripeWorld(self.config, clock=self.clock)
        customers, orders = sage_seed_for(self.world)
        self.stripe_app = create_stripe_app(
            world=self.world,
            api_key=self.stripe_key,
            rate_limit=self.stripe_rate_limit,
            live_rate=self.live_rate,
        )
        self.sage_db.parent.mkdir(parents=True, exist_ok=True)
        self.sage_app = create_sage_app(
            self.sage_db,
            api_key=self.sage_key,
            customers=customers,
            sales_orders=orders,
            items=SHOP_ITEMS,
            fiscal_years=fiscal_years_for(self.config, self.clock()),
            closed_through=self.closed_through or closed_through_for(self.config),
            rate_limit_rps=self.sage_rate_limit,
        )

    @property
    def stripe_url(self) -> str:
        return self._servers[0].url

    @property
    def sage_url(self) -> str:
        return self._servers[1].url

    def start(self) -> SandboxPair:
        self._servers = [
            ThreadedServer(self.stripe_app, host=self.host, port=self.stripe_port),
            ThreadedServer(self.sage_app, host=self.host, port=self.sage_port),
        ]
        for server in self._servers:
            server.start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()

    def __enter__(self) -> SandboxPair:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        return {
            "stripe_url": self.stripe_url,
            "sage_url": self.sage_url,
            "stripe_key": self.stripe_key,
            "sage_key": self.sage_key,
        }
