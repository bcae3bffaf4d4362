"""What one micro-batch of the real-time processor needs to plan: the staged rows the batch
touched and the rows whose documents depend on them, as a set of Stripe ids.

The full plan reads every staged row whose documents the outbox has not settled, so each
batch re-planned (and re-read) everything that still waits (an open invoice, a charge whose
balance transaction is late): a fixed cost per batch that grows with the business. A
waiting document waits for something to be staged; when it is, a batch touches it, and the
dependency rules below bring the waiting document back into the plan. The processor still
runs the full plan periodically (``PROCESSOR_FULL_PLAN_SECONDS``) for what depends on time
rather than data (a day that ended, sessions listed further by a sync).

The scope is a filter only: a scoped plan is the full plan restricted to these ids, so it
can never plan anything the full plan would not (tests/integration/test_plan_scope.py and
test_load.py compare them). Stripe ids carry their object's prefix (``ch_``, ``in_``,
``re_``, ...), so one flat set serves every stream."""

from __future__ import annotations

from stripe_sage.store.staging import Staging

SCOPE_TABLE = "_plan_scope"

# Touched rows of one staged table (the batch's run id tags what it staged).
_T = "(SELECT {col} FROM staging.{table} WHERE run_id = $run_id)"


def _touched(table: str, col: str = "id") -> str:
    return _T.format(table=table, col=col)


# Each rule: ids whose documents depend on what the batch staged (a row B whose documents
# read a row A, A staged by a batch without B). Planning reads, per document family (its
# ``select_inputs`` beside its planner, e.g. plan/cash_receipts.py; slices: plan/outbox.py):
# - charges (receipt, own invoice and order, recovery and Realized FX journals) ← their
#   balance transaction, checkout session or lookup, customer, invoice payments; and, through
#   the invoices they paid: the invoice (written off before the charge: a recovery journal,
#   not a receipt) and every payment of it with its charge and that charge's balance
#   transaction (a part of a foreign-currency invoice receipts its share at the rate of the
#   invoice's first payment, and books the rest as Realized FX);
# - invoices ← lines, products of lines, payments (and the paying charges and their balance
#   transactions), customer, credit notes; their void, write-off and credit-balance memos
#   read the invoice's own row only;
# - credit notes ← the note's own row (and its invoice, by the rule on invoices);
# - refunds (memo, failure and Realized FX journals) ← their charge (not quarantined) and its
#   balance transaction, the charge's other refunds (a partial refund's share), their own
#   balance transactions, the credit notes naming them, and the invoice their charge paid
#   (the memo's reason names it): all through the charges rule;
# - orders ← sessions, line items, products; payouts ← items and their balance transactions
#   (a lost dispute on an invoice payment is one of them: it is in no other document);
#   top-ups ← their own balance transaction; customers ← the latest charge's billing details.
# Not scoped: the daily journals of what no automatic payout recognises (one journal is a
# whole day's transactions, recognised by what the payouts itemise, and a day is planned
# once it has ended: a filter on ids would plan part of a day; they are planned over every
# unsettled day each batch, ~20 ms at 20k charges), the guest customer, and the customer
# updates (the run's own changed customers already).
_SCOPE_SQL = f"""
CREATE OR REPLACE TEMP TABLE {SCOPE_TABLE} AS
WITH
bts AS {_touched("balance_transactions")},
paying AS (
    SELECT id FROM staging.charges WHERE run_id = $run_id
    OR balance_transaction IN (SELECT id FROM bts)
    OR customer IN {_touched("customers")}
    OR id IN {_touched("invoice_payments", "charge")}
    OR id IN {_touched("refunds", "charge")}
    OR payment_intent IN {_touched("checkout_sessions", "payment_intent")}
    OR payment_intent IN {_touched("checkout_lookups", "payment_intent")}
),
paid AS (
    SELECT invoice FROM staging.invoice_payments
    WHERE run_id = $run_id OR charge IN (SELECT id FROM paying)
    UNION ALL SELECT id FROM staging.invoices WHERE run_id = $run_id
),
charges AS (
    SELECT id FROM paying
    UNION ALL SELECT charge FROM staging.invoice_payments
    WHERE invoice IN (SELECT invoice FROM paid)
),
products AS {_touched("products")},
invoices AS (
    SELECT id FROM staging.invoices WHERE run_id = $run_id
    OR customer IN {_touched("customers")}
    OR id IN {_touched("invoice_lines", "invoice")}
    OR id IN {_touched("credit_notes", "invoice")}
    OR id IN (SELECT invoice FROM staging.invoice_lines WHERE product IN (SELECT id FROM products))
    OR id IN (SELECT invoice FROM paid)
),
refunds AS (
    SELECT id FROM staging.refunds WHERE run_id = $run_id
    OR charge IN (SELECT id FROM charges)
    OR balance_transaction IN (SELECT id FROM bts)
    OR failure_balance_transaction IN (SELECT id FROM bts)
    OR id IN (SELECT unnest(refunds) FROM staging.credit_notes WHERE run_id = $run_id)
),
sessions AS (
    SELECT id FROM staging.checkout_sessions WHERE run_id = $run_id
    OR id IN {_touched("checkout_line_items", "session")}
    OR id IN (SELECT session FROM staging.checkout_line_items
              WHERE product IN (SELECT id FROM products))
    OR payment_intent IN (SELECT payment_intent FROM staging.charges
                          WHERE id IN (SELECT id FROM charges))
),
payouts AS (
    SELECT id FROM staging.payouts WHERE run_id = $run_id
    OR failure_balance_transaction IN (SELECT id FROM bts)
    OR id IN (SELECT payout FROM staging.payout_items
              WHERE balance_transaction IN (SELECT id FROM bts))
)
SELECT DISTINCT id FROM (
    SELECT id FROM charges
    UNION ALL SELECT id FROM invoices
    UNION ALL SELECT id FROM refunds
    UNION ALL SELECT id FROM sessions
    UNION ALL SELECT id FROM payouts
    UNION ALL SELECT id FROM products
    UNION ALL SELECT id FROM bts
    UNION ALL SELECT id FROM staging.credit_notes WHERE run_id = $run_id
        OR invoice IN (SELECT id FROM invoices)
    UNION ALL SELECT id FROM staging.customers WHERE run_id = $run_id
        OR id IN (SELECT customer FROM staging.charges WHERE id IN (SELECT id FROM charges))
) WHERE id IS NOT NULL
"""


def build_scope(st: Staging, run_id: str) -> bool:
    """Fill ``_plan_scope`` (a temporary table of this connection) with the ids run
    ``run_id`` touched and the ids that depend on them. Returns False when the batch touched
    something every document may depend on (tax rates): then only the full plan is right."""
    return st.build_plan_scope(_SCOPE_SQL, run_id)


def in_scope(scoped: bool, alias: str = "s") -> str:
    """The SQL condition (`` AND ...``) restricting ``<alias>.id`` to the scope, or nothing."""
    return f" AND {alias}.id IN (SELECT id FROM {SCOPE_TABLE})" if scoped else ""
