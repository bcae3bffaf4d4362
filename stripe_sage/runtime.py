"""Everything one run needs, built from ``Settings`` at the edge and closed afterwards."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from stripe_sage.mapping import Mapping, load_mapping
from stripe_sage.sage.client import SageProClient
from stripe_sage.sage.loader import Loader
from stripe_sage.settings import Settings
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader
from stripe_sage.stripe.extract import DAY, WINDOW_OBJECTS, Extractor


def stripe_reader(settings: Settings, max_rps: float | None = None) -> StripeReader:
    """The Stripe client from settings (``max_rps``: a share of ``STRIPE_MAX_RPS``)."""
    return StripeReader(
        settings.stripe_api_key.get_secret_value(),
        api_base=settings.stripe_api_base,
        max_rps=max_rps if max_rps is not None else settings.stripe_max_rps,
    )


@dataclass
class RunContext:
    settings: Settings
    run_id: str
    staging: Staging
    reader: StripeReader
    sage: SageProClient
    mapping: Mapping
    extractor: Extractor
    loader: Loader
    # How this run got the DuckDB writer slot (tasks/writer.py), recorded in ops.runs.
    writer_slot: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(
        cls,
        settings: Settings,
        run_id: str,
        *,
        now: int | None = None,
        backfill_days: int = 3 * 365,
        window_days: int = 7,
    ) -> RunContext:
        mapping = load_mapping(settings.mapping_file)  # fail before touching anything else
        staging = Staging(settings.staging_db)
        reader = stripe_reader(settings)
        sage = SageProClient(
            settings.sagepro_base_url, settings.sagepro_api_key, max_rps=settings.sage_max_rps
        )
        now = int(time.time()) if now is None else now
        extractor = Extractor(
            reader,
            staging,
            run_id=run_id,
            now=now,
            backfill_start=now - backfill_days * DAY,
            window_seconds=window_days * DAY,
            window_objects=WINDOW_OBJECTS,
        )
        loader = Loader(
            staging,
            sage,
            run_id=run_id,
            concurrency=settings.sage_concurrency,
            retry_budget=settings.sage_retry_budget,
        )
        return cls(settings, run_id, staging, reader, sage, mapping, extractor, loader)

    def for_batch(self, run_id: str, *, retry_budget: float | None = None) -> RunContext:
        """The same warm staging file, clients and mapping under another run id: one
        micro-batch of the real-time processor (its own extractor and loader, which tag what
        they write with the run id). Close it with ``close_batch``, never ``close``."""
        extractor = Extractor(
            self.reader,
            self.staging,
            run_id=run_id,
            now=int(time.time()),
            backfill_start=self.extractor.backfill_start,
            window_seconds=self.extractor.window_seconds,
            window_objects=self.extractor.window_objects,
        )
        loader = Loader(
            self.staging,
            self.sage,
            run_id=run_id,
            concurrency=self.settings.sage_concurrency,
            retry_budget=(
                self.settings.sage_retry_budget if retry_budget is None else retry_budget
            ),
        )
        return RunContext(
            self.settings, run_id, self.staging, self.reader, self.sage, self.mapping,
            extractor, loader, self.writer_slot,
        )  # fmt: skip

    def close_batch(self) -> None:
        """End a ``for_batch`` context: its page writer only (the file and clients stay)."""
        self.extractor.writer.close()

    def close(self) -> None:
        try:
            self.extractor.writer.close()
        finally:
            self.sage.close()
            self.staging.close()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
