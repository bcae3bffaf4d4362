"""What moves the Stripe balance besides charges and refunds, as journal lines (pure).

Every balance transaction reaches Stripe Clearing once (docs/accounting.md, section 6):

- its gross through a document of its own (receipt, credit memo, refund-failure journal,
  top-up journal, payout journal) when its category is in ``OWN_DOCUMENT``;
- otherwise, and for every fee, through the journal that *recognises* it: the automatic
  payout that itemises it, or, on an account paid out manually, the journal of its UTC day.

Recognising maps each category to an account through the mapping's
``reporting_categories``; a category the mapping does not know (Stripe adds new ones) goes to
``accounts.suspense`` and is reported (``Suspended``), so the journal still posts and a person
learns what to map.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from stripe_sage.mapping import Mapping
from stripe_sage.money import to_decimal_string

# Categories whose gross amount a document of its own posts to clearing; the journal that
# recognises their transaction books only its fee.
OWN_DOCUMENT = {
    "charge": "cash receipt",
    "payment": "cash receipt",
    "refund": "credit memo",
    "refund_failure": "refund-failure journal",
    "topup": "top-up journal",
    "topup_reversal": "top-up reversal journal",
    "payout": "payout journal",
    "payout_reversal": "payout-failure journal",
}
DISPUTE_CATEGORIES = {"dispute", "dispute_reversal"}
SUSPENSE_FLAG = "suspense"  # ops.flags rows of journals with suspense lines start so


def account(mapping: Mapping, name: str, currency: str) -> str | None:
    """The GL account of an account name of the mapping, for a settlement currency."""
    value = getattr(mapping.accounts, name, None)
    if isinstance(value, dict):
        return value.get(currency.upper())
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Suspended:
    """One balance transaction posted to suspense: its category is not in the mapping."""

    balance_transaction: str
    category: str
    amount: int

    def describe(self, currency: str) -> str:
        return (
            f"{self.balance_transaction} '{self.category}' "
            f"{to_decimal_string(self.amount, currency)}"
        )


@dataclass
class Recognised:
    """Signed amounts per GL account (debit > 0), the clearing amount of the transactions
    whose gross posts elsewhere, what went to suspense, and the first problem met."""

    by_account: dict[str, int] = field(default_factory=dict)
    own_document_gross: int = 0
    suspended: list[Suspended] = field(default_factory=list)
    problem: str | None = None

    def add(self, mapping: Mapping, name: str, currency: str, amount: int) -> None:
        gl = account(mapping, name, currency)
        if gl is None:
            self.problem = self.problem or f"mapping has no '{name}' account for {currency}"
            return
        self.by_account[gl] = self.by_account.get(gl, 0) + amount

    def lines(self) -> list[tuple[str, int]]:
        return [(a, v) for a, v in self.by_account.items() if v]

    def flag(self, currency: str) -> str | None:
        """The line for ``ops.flags``: which transactions went to suspense, by category."""
        if not self.suspended:
            return None
        cats = sorted({s.category for s in self.suspended})
        shown = "; ".join(s.describe(currency) for s in self.suspended[:5])
        more = f" and {len(self.suspended) - 5} more" if len(self.suspended) > 5 else ""
        return (
            f"{SUSPENSE_FLAG}: reporting categor{'y' if len(cats) == 1 else 'ies'} "
            f"{', '.join(repr(c) for c in cats)} not in the mapping, posted to suspense: "
            f"{shown}{more}"
        )


def recognise(members: list[dict[str, Any]], mapping: Mapping, currency: str) -> Recognised:
    """Book each transaction's fee and, unless a document of its own posts its gross, its
    amount to its category's account (suspense when the mapping does not know it).

    ``members``: balance transactions with ``balance_transaction`` (id),
    ``reporting_category``, ``amount`` and ``fee``."""
    out = Recognised()
    for m in members:
        cat = m["reporting_category"]
        if m["fee"]:
            fees = "dispute_fees" if cat in DISPUTE_CATEGORIES else "merchant_fees"
            out.add(mapping, fees, currency, m["fee"])
        if cat in OWN_DOCUMENT:
            out.own_document_gross += m["amount"]
            continue
        name = mapping.reporting_categories.get(cat)
        if name is None or name in ("clearing", "bank"):
            # Unknown, or mapped to clearing although no document of its own posts it (its
            # gross would never reach clearing): suspense, so the journal still balances.
            out.suspended.append(Suspended(m["balance_transaction"], cat, m["amount"]))
            name = "suspense"
        out.add(mapping, name, currency, -m["amount"])
    return out


# -- the journals of the balance ------------------------------------------------------------
def topup_lines(mapping: Mapping, currency: str, amount: int) -> list[tuple[str | None, int]]:
    """A top-up (amount > 0) moves money from the bank into Stripe: Clearing Dr / Bank Cr;
    its reversal (amount < 0) the other way."""
    return [
        (account(mapping, "clearing", currency), amount),
        (account(mapping, "bank", currency), -amount),
    ]


def manual_payout_lines(
    mapping: Mapping, currency: str, amount: int
) -> list[tuple[str | None, int]]:
    """A manual payout cannot be itemised: Bank Dr / Clearing Cr its amount."""
    return [
        (account(mapping, "bank", currency), amount),
        (account(mapping, "clearing", currency), -amount),
    ]


def daily_lines(members: list[dict[str, Any]], mapping: Mapping, currency: str) -> Recognised:
    """One UTC day's journal on an account paid out manually: fees and the categories no
    document posts, Clearing the balancing line."""
    rec = recognise(members, mapping, currency)
    rest = sum(rec.by_account.values())
    if rest:
        rec.add(mapping, "clearing", currency, -rest)
    return rec


def utc_day(created: dt.datetime | int) -> dt.date:
    """The UTC calendar day of a balance transaction's ``created``."""
    if isinstance(created, int):
        return dt.datetime.fromtimestamp(created, dt.UTC).date()
    if created.tzinfo is None:
        return created.date()
    return created.astimezone(dt.UTC).date()


def day_reference(currency: str, day: dt.date) -> str:
    """The daily journal's Sage reference (unique per currency and day, ≤ 30 characters)."""
    return f"STRIPE-DAY-{currency.upper()}-{day.isoformat()}"
