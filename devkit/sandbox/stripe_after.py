"""After an invoice is finalized (issue 19): credit notes, voids and write-offs.

Only invoices whose payment failed (they stay ``open``) are touched, so no charge, refund or
balance transaction moves and the rest of the business is the same with or without them.
The draws come from an rng of their own (seed + 1919). Of the open invoices:

- one in four gets a credit note (``cn_…``, ``type: pre_payment``) crediting its largest line
  in full, with that line's discount and taxes; the invoice's ``amount_remaining`` falls by
  the note's total (``pre_payment_credit_notes_amount``);
- one in five is voided (``status: void``, ``invoice.voided``);
- one in five is marked uncollectible (``invoice.marked_uncollectible``).

A credited invoice is not voided or written off, and none of the three is paid by the live
mode's ``pay_invoice`` (its charge would no longer be the invoice's amount).

Of the refunds of paid settlement-currency invoices (not failed), half came with a credit
note (own rng, seed + 1921; at least one): ``type: post_payment``, created with the refund,
``refunds`` naming it; a full refund credits every line of the invoice with its taxes, a
partial one is a single ``custom_line_item`` for the refunded amount. The invoice stays
paid (``post_payment_credit_notes_amount``). No charge, refund or balance transaction moves.

Customer credit balances (``credit_balances``, an rng of their own: seed + 1920):

- one in three (at least one) of the open invoices left untouched above was finalized
  against a credit the customer held: a minute before it, an ``adjustment`` customer
  balance transaction granted 20–60 % of its total (negative: credit), which the invoice
  used up at finalization (``applied_to_invoice``, ``starting_balance`` = −credit,
  ``ending_balance`` = 0, its ``amount_due``/``amount_remaining`` the total less the credit);
- a few customers (1 in 50, at least one) were granted a credit on the business's last day
  that no invoice has used yet: their ``balance`` stays negative.

Stripe keeps credit as a negative balance (STRIPE.md); ``customer.balance`` is the sum of
the customer's balance transactions up to the moment asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from devkit.sandbox.stripe_billing import InvoiceMath
    from devkit.sandbox.stripe_business import Business

DAY = 86_400
CREDIT_NOTE_DELAY = 2 * DAY
VOID_DELAY = 4 * DAY
UNCOLLECTIBLE_DELAY = 5 * DAY
P_CREDIT, P_VOID, P_UNCOLLECTIBLE = 0.25, 0.2, 0.2
P_BALANCE, P_LEFTOVER = 1 / 3, 1 / 50
P_REFUND_NOTE = 0.5
BALANCE_LEAD = 60  # the credit is granted a minute before the invoice is finalized
CBTXN_ADJUSTMENT, CBTXN_APPLIED = 0, 1
CBTXN_TYPES = ("adjustment", "applied_to_invoice")


def after_posting(b: Business) -> None:
    """Draw the credit notes, voids and write-offs of ``b``'s open invoices."""
    from devkit.sandbox.stripe_business import Table

    rng = np.random.default_rng(b.config.seed + 1919)
    n_inv = len(b.invoices)
    open_inv = np.nonzero(b.ch_failed[b.inv_charge])[0]
    failed_at = b.charges.created[b.inv_charge[open_inv]]
    fate = rng.random(len(open_inv))
    end = b.config.end
    credited = fate < P_CREDIT
    voided = (fate >= P_CREDIT) & (fate < P_CREDIT + P_VOID)
    written_off = (fate >= P_CREDIT + P_VOID) & (fate < P_CREDIT + P_VOID + P_UNCOLLECTIBLE)
    cn_at = failed_at + CREDIT_NOTE_DELAY
    credited &= cn_at <= end
    voided &= failed_at + VOID_DELAY <= end
    written_off &= failed_at + UNCOLLECTIBLE_DELAY <= end
    # Only settlement-currency invoices: a foreign-currency invoice awaiting settlement is
    # not in Sage yet, and crediting one is not supported (docs/accounting.md §4).
    domestic = ~b.ch_is_fx_invoice[b.inv_charge[open_inv]]
    credited &= domestic
    voided &= domestic
    written_off &= domestic
    b.inv_voided_at = np.zeros(n_inv, np.int64)
    b.inv_voided_at[open_inv[voided]] = failed_at[voided] + VOID_DELAY
    b.inv_uncollectible_at = np.zeros(n_inv, np.int64)
    b.inv_uncollectible_at[open_inv[written_off]] = failed_at[written_off] + UNCOLLECTIBLE_DELAY
    # Post-payment notes (own rng, seed + 1921): half the refunds of paid settlement-currency
    # invoices came with a credit note that names them (at least one when there are any).
    paid_rng = np.random.default_rng(b.config.seed + 1921)
    rf_charge = b.rf_charge
    refunded_invoice = b.ch_invoice[rf_charge]
    eligible = np.nonzero((refunded_invoice >= 0) & ~b.ch_is_fx_invoice[rf_charge] & ~b.rf_failed)[
        0
    ]
    refunding = eligible[paid_rng.random(len(eligible)) < P_REFUND_NOTE]
    if len(refunding) == 0 and len(eligible):
        refunding = eligible[:1]
    created = np.concatenate([cn_at[credited], b.refunds.created[refunding]])
    invoice = np.concatenate([open_inv[credited], refunded_invoice[refunding]])
    refund = np.concatenate([np.full(int(credited.sum()), -1), refunding])
    order = np.argsort(created, kind="stable")
    b.credit_notes = Table(created[order].astype(np.int64))
    b.cn_invoice = invoice[order].astype(np.int32)
    b.cn_refund = refund[order].astype(np.int32)
    b.inv_credit_note = np.full(n_inv, -1, np.int32)
    b.inv_credit_note[b.cn_invoice] = np.arange(len(b.cn_invoice), dtype=np.int32)
    credit_balances(b, open_inv[domestic & ~credited & ~voided & ~written_off])


def credit_balances(b: Business, untouched: np.ndarray) -> None:
    """Credits granted and applied at finalization (``b.inv_balance_applied``), and the
    customer balance transactions behind them (``b.cbtxn*``, sorted by created)."""
    from devkit.sandbox.stripe_business import Table

    rng = np.random.default_rng(b.config.seed + 1920)
    n_inv = len(b.invoices)
    totals = b.ch_amount[b.inv_charge[untouched]]
    pick = rng.random(len(untouched)) < P_BALANCE
    share = rng.uniform(0.2, 0.6, len(untouched))
    credit = np.maximum(1, (totals * share).astype(np.int64))
    pick &= credit < totals
    if not pick.any() and (credit < totals).any():  # at least one, when any can
        pick[np.argmax(credit < totals)] = True
    applied_to = untouched[pick]
    b.inv_balance_applied = np.zeros(n_inv, np.int64)
    b.inv_balance_applied[applied_to] = credit[pick]
    finalized = b.invoices.created[applied_to] + 1
    inv_customer = b.ch_customer[b.inv_charge]
    # Leftover credit, granted on the last day to customers with no invoice after it.
    grant_at = b.config.end - DAY
    last_invoice = np.full(b.n_customers, -1, np.int64)
    known = inv_customer >= 0
    np.maximum.at(last_invoice, inv_customer[known], b.invoices.created[known])
    eligible = np.nonzero(last_invoice < grant_at - DAY)[0]
    leftover = eligible[rng.random(len(eligible)) < P_LEFTOVER]
    if len(leftover) == 0 and len(eligible):
        leftover = eligible[:1]
    leftover_amount = rng.integers(5, 200, len(leftover)) * 100
    created = np.concatenate(
        [finalized - BALANCE_LEAD, finalized, np.full(len(leftover), grant_at, np.int64)]
    )
    customer = np.concatenate(
        [inv_customer[applied_to], inv_customer[applied_to], leftover]
    ).astype(np.int32)
    amount = np.concatenate([-credit[pick], credit[pick], -leftover_amount]).astype(np.int64)
    invoice = np.concatenate(
        [np.full(len(applied_to), -1), applied_to, np.full(len(leftover), -1)]
    ).astype(np.int32)
    kind = np.concatenate(
        [
            np.full(len(applied_to), CBTXN_ADJUSTMENT),
            np.full(len(applied_to), CBTXN_APPLIED),
            np.full(len(leftover), CBTXN_ADJUSTMENT),
        ]
    ).astype(np.int8)
    order = np.lexsort((kind, created))
    b.customer_balance_transactions = Table(created[order].astype(np.int64))
    b.cbtxn_customer = customer[order]
    b.cbtxn_amount = amount[order]
    b.cbtxn_invoice = invoice[order]
    b.cbtxn_type = kind[order]
    # Each transaction's ending_balance: the customer's running sum, in created order.
    ending = np.zeros(len(order), np.int64)
    running: dict[int, int] = {}
    for x in range(len(order)):
        c = int(b.cbtxn_customer[x])
        running[c] = running.get(c, 0) + int(b.cbtxn_amount[x])
        ending[x] = running[c]
    b.cbtxn_ending = ending


def credited_line(math: InvoiceMath) -> int:
    """The line a credit note credits: the invoice's largest."""
    return max(range(len(math.lines)), key=lambda k: math.lines[k].amount)


def line_total(math: InvoiceMath, k: int) -> int:
    """What line k adds to the invoice's total: amount − discount + its exclusive tax."""
    from devkit.sandbox.stripe_billing import RATE_INCLUSIVE

    ln = math.lines[k]
    return ln.amount - ln.discount + sum(a for r, a, _ in ln.taxes if not RATE_INCLUSIVE[r])


def credit_note_taxes(math: InvoiceMath, k: int) -> list[dict[str, Any]]:
    """The credited line's taxes in Stripe's ``taxes``/``total_taxes`` shape."""
    from devkit.sandbox.stripe_billing import RATE_INCLUSIVE

    return [
        {
            "amount": amount,
            "tax_behavior": "inclusive" if RATE_INCLUSIVE[rate] else "exclusive",
            "tax_rate_details": {"tax_rate": rate},
            "taxability_reason": "standard_rated",
            "taxable_amount": taxable,
            "type": "tax_rate_details",
        }
        for rate, amount, taxable in math.lines[k].taxes
    ]
