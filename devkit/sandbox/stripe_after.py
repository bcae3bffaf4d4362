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
    order = np.argsort(cn_at[credited], kind="stable")
    b.credit_notes = Table(cn_at[credited][order].astype(np.int64))
    b.cn_invoice = open_inv[credited][order].astype(np.int32)
    b.inv_credit_note = np.full(n_inv, -1, np.int32)
    b.inv_credit_note[b.cn_invoice] = np.arange(len(b.cn_invoice), dtype=np.int32)


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
