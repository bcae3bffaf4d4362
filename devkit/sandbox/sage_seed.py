"""Seed data for the Sage Pro sandbox: the chart of accounts and the shapes of seeded records.

Kept apart from the app so that tests, the demo and the mapping file can name the same
accounts and build seeded customers/orders without importing FastAPI. Amounts in seeds are
integer minor units, like everywhere else inside the product; the sandbox renders them as
Sage money strings with the currency's exponent.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Final, Literal

AccountType = Literal["asset", "liability", "equity", "revenue", "expense"]

# (account, description, type). The accounts the product's default mapping posts to; a
# journal line naming any other account is rejected with ``unknown_account``.
CHART_OF_ACCOUNTS: Final[list[tuple[str, str, AccountType]]] = [
    ("1000", "Bank - Operating", "asset"),
    ("1010", "Bank - EUR", "asset"),
    ("1050", "Stripe Clearing USD", "asset"),
    ("1051", "Stripe Clearing EUR", "asset"),
    ("1052", "Stripe Clearing GBP", "asset"),
    ("1100", "Accounts Receivable", "asset"),
    ("2200", "Sales Tax Payable", "liability"),
    ("2400", "Customer Credit Balances", "liability"),
    ("4000", "Sales", "revenue"),
    ("4010", "Subscription Revenue", "revenue"),
    ("4020", "Application Fee Revenue", "revenue"),
    ("4900", "Sales Returns and Allowances", "revenue"),
    ("6100", "Merchant Fees", "expense"),
    ("6110", "Chargebacks", "expense"),
    ("6120", "Dispute Fees", "expense"),
    ("6130", "FX Fees", "expense"),
    ("6190", "Other Stripe Adjustments", "expense"),
    ("6200", "Connected Account Transfers", "expense"),
    ("6300", "Bad Debt", "expense"),
    ("7500", "Realized FX Gain/Loss", "expense"),
    ("9990", "Suspense", "asset"),
]

# (tax_code, description, rate in percent, liability account). Sage's tax-code table: an
# invoice or credit memo's tax_lines[].tax_code must be one of these (validation_error
# otherwise); each code's tax posts to its liability account.
TAX_CODES: Final[list[tuple[str, str, str, str]]] = [
    ("SALESTAX", "Sales tax (general)", "0", "2200"),
    ("CA", "California sales tax", "8.25", "2200"),
    ("IL", "Illinois state sales tax", "6.25", "2200"),
    ("CHICAGO", "Chicago city sales tax", "2.5", "2200"),
    ("VAT20", "VAT standard rate 20%", "20", "2200"),
    ("EXEMPT", "Exempt / zero rated", "0", "2200"),
]


@dataclass(frozen=True)
class SeedCustomer:
    """A customer that exists in Sage before the integration runs (e.g. created by sales)."""

    customer_id: str
    name: str
    email: str | None
    currency: str
    reference: str | None = None


@dataclass(frozen=True)
class SeedLine:
    """One sales-order line; ``quantity`` is a decimal string, the price integer minor units."""

    item: str
    description: str | None
    quantity: str
    unit_price_minor: int


@dataclass(frozen=True)
class SeedSalesOrder:
    """An open sales order a Stripe charge can settle (``metadata.erp_order_id``)."""

    order_no: str
    customer_id: str
    order_date: datetime.date
    currency: str
    lines: list[SeedLine] = field(default_factory=list)
    reference: str | None = None


@dataclass(frozen=True)
class SeedItem:
    """An item already in Sage's item master (v1.1): what ``metadata.sage_item`` names, or what
    seeded sales orders sell. Never the items the product creates itself (its default items)."""

    item: str
    description: str
    type: Literal["stock", "service"] = "service"
    unit_price_minor: int | None = None
    currency: str = "USD"
    opening_quantity: str | None = None
    reference: str | None = None


# Items a shop keeps in Sage before the integration runs: the web shop's order item, and the
# items the sandbox Stripe business's products name in ``metadata.sage_item``.
SHOP_ITEMS: Final[list[SeedItem]] = [
    SeedItem("WEB-ORDER", "Web shop order", "service"),
    SeedItem("PRO-MONTHLY", "Pro plan (monthly)", "service", 4900),
    SeedItem("ONBOARDING", "Onboarding package", "stock", 50000, opening_quantity="500"),
]
