"""Complete Billing invoices (issue 18): coupons, tax rates, inclusive VAT and proration.

The business fixes each invoice's ``total`` (the charge that pays it); this module works out,
from that total, lines, discounts and taxes whose sums are exactly Stripe's own invoice
arithmetic, per line and per invoice:

- a line's ``amount`` is before discounts; ``discount_amounts`` say what each discount took
  off it; its ``taxes[]`` (one per tax rate) have ``taxable_amount`` = amount − discounts
  (exclusive) or amount − discounts − the tax (inclusive: the tax is inside the amount);
- ``subtotal`` = Σ line amounts; ``total_excluding_tax`` = subtotal − discounts − inclusive
  tax; ``total`` = subtotal − discounts + exclusive tax; ``total_taxes`` sums the lines' taxes
  per rate, ``total_discount_amounts`` the lines' discounts per discount.

Invoice kinds (``KIND_*``): plain (taxed one in four at 8.25% exclusive, as before), a percent
coupon, an amount coupon, inclusive VAT (quantities above one, so unit prices fall in
fractions of a cent), two exclusive rates (state + city), and a subscription's proration (a
negative credit line for unused time, a positive one for the remaining time).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

KIND_PLAIN, KIND_PERCENT, KIND_AMOUNT, KIND_VAT, KIND_TWO_RATES, KIND_PRORATION = range(6)
KIND_NAMES = ("plain", "percent_coupon", "amount_coupon", "inclusive_vat", "two_rates", "proration")

# Tax rates: (id, display_name, description, jurisdiction, percentage, inclusive, tax_type,
# country, state). The first keeps the id the business always used for its sales tax.
TAX_RATES: tuple[tuple[str, str, str, str, float, bool, str, str, str | None], ...] = (
    (
        "txr_1PCaSales0825Tax0000000",
        "Sales Tax",
        "California sales tax",
        "US - CA",
        8.25,
        False,
        "sales_tax",
        "US",
        "CA",
    ),
    (
        "txr_1PIlState0625Tax0000001",
        "Sales Tax",
        "Illinois state sales tax",
        "US - IL",
        6.25,
        False,
        "sales_tax",
        "US",
        "IL",
    ),
    (
        "txr_1PIlCity00250Tax0000002",
        "City Tax",
        "Chicago city sales tax",
        "Chicago",
        2.5,
        False,
        "sales_tax",
        "US",
        "IL",
    ),
    (
        "txr_1PGbVat2000Incl00000003",
        "VAT",
        "UK VAT (prices include it)",
        "GB",
        20.0,
        True,
        "vat",
        "GB",
        None,
    ),
)
SALES_TAX, IL_STATE, CHICAGO, GB_VAT = (r[0] for r in TAX_RATES)
RATE_PERCENT = {r[0]: Decimal(str(r[4])) for r in TAX_RATES}
RATE_INCLUSIVE = {r[0]: r[5] for r in TAX_RATES}
# Coupons: (id, name, percent_off, amount_off in cents).
COUPONS: tuple[tuple[str, str, float | None, int | None], ...] = (
    ("SPRING20", "20% off", 20.0, None),
    ("WELCOME5", "$5.00 off", None, 500),
)
AMOUNT_OFF = 500
AMOUNT_COUPON_MIN_TOTAL = 2_000  # an amount coupon only on invoices well above its value


def half_up(numerator: int, denominator: int) -> int:
    """round(numerator / denominator), halves away from zero (non-negative inputs)."""
    return (2 * numerator + denominator) // (2 * denominator)


def split(amount: int, weights: list[int]) -> list[int]:
    """``amount`` in parts proportional to ``weights``; the first part takes the remainder."""
    total = sum(weights)
    parts = [amount * w // total for w in weights]
    parts[0] += amount - sum(parts)
    return parts


@dataclass
class LineMath:
    amount: int  # before discounts; includes inclusive tax
    quantity: int
    proration: bool = False
    discount: int = 0  # what the invoice's discount took off this line
    taxes: list[tuple[str, int, int]] = field(default_factory=list)  # (rate, amount, taxable)


@dataclass
class InvoiceMath:
    kind: int
    lines: list[LineMath]
    coupon: str | None = None

    @property
    def subtotal(self) -> int:
        return sum(ln.amount for ln in self.lines)

    @property
    def discount(self) -> int:
        return sum(ln.discount for ln in self.lines)

    def tax(self, inclusive: bool) -> int:
        return sum(a for ln in self.lines for r, a, _ in ln.taxes if RATE_INCLUSIVE[r] == inclusive)

    @property
    def total_excluding_tax(self) -> int:
        return self.subtotal - self.discount - self.tax(inclusive=True)

    @property
    def total(self) -> int:
        return self.subtotal - self.discount + self.tax(inclusive=False)

    def taxes_by_rate(self) -> list[tuple[str, int, int]]:
        """(rate, amount, taxable_amount) summed over the lines, in the rates' order."""
        out: dict[str, list[int]] = {}
        for ln in self.lines:
            for rate, amount, taxable in ln.taxes:
                acc = out.setdefault(rate, [0, 0])
                acc[0] += amount
                acc[1] += taxable
        return [(r, a, t) for r, (a, t) in out.items()]


def _gross_for_percent(net: int, percent: int) -> int:
    """The smallest line amount a with a − round(a × percent / 100) = net (it exists: that
    difference grows by 0 or 1 as a grows by 1)."""
    a = max(net, net * 100 // (100 - percent) - 2)
    while a - half_up(a * percent, 100) < net:
        a += 1
    return a


def invoice_math(
    total: int, n_lines: int, kind: int, taxed: bool, rr: random.Random
) -> tuple[InvoiceMath, list[int]]:
    """The lines of an invoice of ``total`` (and the per-line weights drawn, for the caller's
    descriptions): amounts, quantities, discounts and taxes whose sums are Stripe's."""
    weights = [rr.randint(1, 10) for _ in range(n_lines)]
    if kind == KIND_VAT:
        amounts = split(total, weights)
        lines = []
        for a in amounts:
            vat = half_up(a * 20, 120)  # 20% inside the price: a * 20 / 120
            qty = 3 if a >= 3 else 1
            lines.append(LineMath(a, qty, taxes=[(GB_VAT, vat, a - vat)]))
        return InvoiceMath(kind, lines), weights
    rates = {KIND_TWO_RATES: [IL_STATE, CHICAGO]}.get(kind, [SALES_TAX] if taxed else [])
    if kind == KIND_PRORATION:
        rates = []
    pct = sum((RATE_PERCENT[r] for r in rates), Decimal(0))
    net = int((Decimal(total) * 100 / (100 + pct)).quantize(Decimal(1))) if rates else total
    tax_total = total - net
    rate_totals = [half_up(int(net * RATE_PERCENT[r] * 100), 10_000) for r in rates]
    if rates:
        rate_totals[-1] = tax_total - sum(rate_totals[:-1])
    if kind == KIND_PRORATION:
        # Credit for the unused time of the old plan, then the new plan's remaining time.
        credit = max(1, total // 3)
        pos = split(total + credit, weights)
        lines = [LineMath(-credit, 1, proration=True)]
        lines += [LineMath(a, 1, proration=k == 0) for k, a in enumerate(pos)]
        return InvoiceMath(kind, lines), weights
    nets = split(net, weights)
    lines = [LineMath(n, 1) for n in nets]
    coupon = None
    if kind == KIND_PERCENT:
        coupon = COUPONS[0][0]
        for ln in lines:
            gross = _gross_for_percent(ln.amount, 20)
            ln.discount, ln.amount = gross - ln.amount, gross
    elif kind == KIND_AMOUNT:
        coupon = COUPONS[1][0]
        for ln, d in zip(lines, split(AMOUNT_OFF, nets), strict=True):
            ln.discount, ln.amount = d, ln.amount + d
    for rate, rate_total in zip(rates, rate_totals, strict=True):
        for ln, part in zip(lines, split(rate_total, nets), strict=True):
            ln.taxes.append((rate, part, ln.amount - ln.discount))
    for ln in lines:
        if ln.amount % 2 == 0 and ln.amount > 2 and ln.discount == 0 and rr.random() < 0.3:
            ln.quantity = 2
    return InvoiceMath(kind, lines, coupon), weights


def unit_amount_decimal(amount: int, quantity: int) -> str:
    """Stripe's ``unit_amount_decimal``: the unit price in minor units, up to 12 decimals."""
    value = (Decimal(amount) / quantity).quantize(Decimal("1e-12")).normalize()
    return f"{value:f}"


def tax_rate_objects(template: dict[str, Any], created: int) -> list[dict[str, Any]]:
    """The account's tax rates in the shape of Stripe's ``tax_rate``, oldest first."""
    out = []
    for k, (rid, name, desc, juris, pct, incl, ttype, country, state) in enumerate(TAX_RATES):
        obj = dict(template)
        obj.update(
            id=rid,
            active=True,
            country=country,
            created=created + k * 60,
            description=desc,
            display_name=name,
            effective_percentage=pct,
            inclusive=incl,
            jurisdiction=juris,
            jurisdiction_level="city" if juris == "Chicago" else ("state" if state else "country"),
            livemode=False,
            metadata={},
            percentage=pct,
            state=state,
            tax_type=ttype,
            flat_amount=None,
            rate_type="percentage",
        )
        out.append(obj)
    return out


def coupon_object(template: dict[str, Any], coupon_id: str, created: int) -> dict[str, Any]:
    cid, name, percent_off, amount_off = next(c for c in COUPONS if c[0] == coupon_id)
    obj = dict(template)
    obj.update(
        id=cid,
        name=name,
        percent_off=percent_off,
        amount_off=amount_off,
        currency="usd" if amount_off else None,
        duration="once",
        duration_in_months=None,
        created=created,
        livemode=False,
        max_redemptions=None,
        metadata={},
        redeem_by=None,
        times_redeemed=1,
        valid=True,
    )
    return obj
