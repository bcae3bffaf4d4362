"""Cross-system lookup through Stripe metadata: Sage numbers written back to Stripe.

After a Sage customer is created or matched, its id goes into the Stripe customer's
``metadata.sage_customer_id``; after a charge's Sage invoice (and sales order) is posted,
their numbers go into the charge's ``metadata.sage_invoice_no`` / ``sage_order_no`` (a
Checkout order's into its payment intent's, the acknowledgement back to the shop); the code
of a product's Sage item goes into the product's ``metadata.sage_item``. Each
write carries an idempotency key derived from what it writes, respects the reader's rate
limit, and is recorded in ``sage.writeback`` so it is not sent again (after a crash, the last
few unrecorded ones are, under the same keys: Stripe answers with the first response). The
metadata-only ``*.updated`` events this causes change no mapped field, so they post nothing
back to Sage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stripe_sage.errors import NotFoundError
from stripe_sage.store.staging import Staging
from stripe_sage.stripe.client import StripeReader

RECORD_EVERY = 50  # writes recorded per statement (a crash may send these again: harmless)


def pending(st: Staging, limit: int) -> list[tuple[str, str, str, str]]:
    """(path, stripe id, metadata field, value) still to write, oldest first."""
    return st.writeback_pending(limit)


def write_back(
    reader: StripeReader,
    st: Staging,
    run_id: str,
    limit: int = 1_000,
    between: Callable[[], None] | None = None,
    record_every: int = RECORD_EVERY,
) -> dict[str, Any]:
    """Write up to ``limit`` values this run (the rest next run: Stripe's write budget is the
    bound, not the pipeline); ``between`` is called before each write.

    What was written is recorded every ``record_every`` writes, before each ``between`` (a
    micro-batch served there tells our own writes' echoes by these records) and at the end,
    whatever ends it. A crash loses the records of at most ``record_every`` writes: the next
    run sends those again with the same idempotency keys, which write nothing new."""
    done: dict[str, int] = {}
    unrecorded: list[tuple[str, str, str, str]] = []

    def record() -> None:
        st.record_writebacks(unrecorded, run_id)
        unrecorded.clear()

    try:
        for path, stripe_id, field, value in pending(st, limit):
            if between is not None:
                record()
                between()
            try:
                reader.update(
                    path,
                    stripe_id,
                    {"metadata": {field: value}},
                    idempotency_key=f"stripe-sage:{stripe_id}:{field}:{value}",
                )
                outcome = "written"
            except NotFoundError:
                outcome = "gone"  # deleted in Stripe meanwhile: nothing to write to
            unrecorded.append((stripe_id, field, value, outcome))
            done[f"{field}:{outcome}"] = done.get(f"{field}:{outcome}", 0) + 1
            if len(unrecorded) >= record_every:
                record()
    finally:
        record()
    return done
