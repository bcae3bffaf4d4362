"""Cross-system lookup through Stripe metadata: Sage numbers written back to Stripe.

After a Sage customer is created or matched, its id goes into the Stripe customer's
``metadata.sage_customer_id``; after a charge's Sage invoice (and sales order) is posted,
their numbers go into the charge's ``metadata.sage_invoice_no`` / ``sage_order_no`` (a
Checkout order's into its payment intent's, the acknowledgement back to the shop); the code
of a product's Sage item goes into the product's ``metadata.sage_item``. Each
write carries an idempotency key derived from what it writes, respects the reader's rate
limit, and is recorded in ``sage.writeback`` so it is never sent twice. The metadata-only
``*.updated`` events this causes change no mapped field, so they post nothing back to Sage.
"""

from __future__ import annotations

from typing import Any

from stripe_sage.errors import NotFoundError
from stripe_sage.store.staging import Staging, now_utc
from stripe_sage.stripe.client import StripeReader


def pending(st: Staging, limit: int) -> list[tuple[str, str, str, str]]:
    """(path, stripe id, metadata field, value) still to write, oldest first."""
    rows = st.con.execute(
        """
        WITH wanted AS (
            SELECT '/v1/customers' AS path, x.stripe_id, 'sage_customer_id' AS field,
                   x.sage_id AS value, x.created_at,
                   c.metadata->>'sage_customer_id' AS current
            FROM sage.xref x JOIN staging.customers c ON c.id = x.stripe_id
            WHERE x.doc_type = 'customer' AND NOT c.deleted
            UNION ALL
            SELECT '/v1/charges', x.stripe_id,
                   CASE x.doc_type WHEN 'invoice' THEN 'sage_invoice_no'
                        ELSE 'sage_order_no' END,
                   x.sage_id, x.created_at,
                   ch.metadata->>(CASE x.doc_type WHEN 'invoice' THEN 'sage_invoice_no'
                                  ELSE 'sage_order_no' END)
            FROM sage.xref x JOIN staging.charges ch ON ch.id = x.stripe_id
            WHERE x.doc_type IN ('invoice', 'sales_order')
            UNION ALL
            -- A Checkout order: its Sage numbers on the payment intent (acknowledgement).
            -- Payment intents are not staged: what was written is in sage.writeback.
            SELECT '/v1/payment_intents', cs.payment_intent,
                   CASE x.doc_type WHEN 'invoice' THEN 'sage_invoice_no'
                        ELSE 'sage_order_no' END,
                   x.sage_id, x.created_at, NULL
            FROM sage.xref x JOIN staging.checkout_sessions cs ON cs.id = x.stripe_id
            WHERE x.doc_type IN ('invoice', 'sales_order') AND cs.payment_intent IS NOT NULL
            UNION ALL
            SELECT '/v1/products', x.stripe_id, 'sage_item', x.sage_id, x.created_at,
                   p.metadata->>'sage_item'
            FROM sage.xref x JOIN staging.products p ON p.id = x.stripe_id
            WHERE x.doc_type = 'item')
        SELECT path, stripe_id, field, value FROM wanted w
        WHERE current IS DISTINCT FROM value AND NOT EXISTS (
            SELECT 1 FROM sage.writeback b WHERE b.stripe_id = w.stripe_id
              AND b.field = w.field AND b.value = w.value)
        ORDER BY created_at, stripe_id LIMIT ?""",
        [limit],
    ).fetchall()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def write_back(
    reader: StripeReader, st: Staging, run_id: str, limit: int = 1_000
) -> dict[str, Any]:
    """Write up to ``limit`` values this run (the rest next run: Stripe's write budget is the
    bound, not the pipeline)."""
    done: dict[str, int] = {}
    for path, stripe_id, field, value in pending(st, limit):
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
        st._exec(
            "INSERT OR REPLACE INTO sage.writeback VALUES (?, ?, ?, ?, ?, ?)",
            [stripe_id, field, value, now_utc(), outcome, run_id],
        )
        done[f"{field}:{outcome}"] = done.get(f"{field}:{outcome}", 0) + 1
    return done
