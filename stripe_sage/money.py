"""Minor units ↔ Sage decimal strings, by an explicit currency exponent table (never ``/100``).

Amounts are integer minor units everywhere inside the pipeline; they become decimal strings
only when a Sage payload is rendered. See docs/accounting.md, "Minor units".
"""

from __future__ import annotations

from decimal import Decimal

ZERO_DECIMAL = frozenset("BIF CLP DJF GNF JPY KMF KRW MGA PYG RWF UGX VND VUV XAF XOF XPF".split())
THREE_DECIMAL = frozenset("BHD JOD KWD OMR TND".split())
# Every other ISO 4217 currency Stripe settles or presents in is two-decimal. The set is
# explicit so that an unknown code is a data-quality failure, not a guess.
TWO_DECIMAL = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BWP BYN BZD
    CAD CDF CHF CNY COP CRC CVE CZK DKK DOP DZD EGP ETB EUR FJD FKP GBP GEL GIP GMD GTQ GYD HKD
    HNL HTG HUF IDR ILS INR ISK JMD KES KGS KHR KYD KZT LAK LBP LKR LRD LSL MAD MDL MKD MMK MNT
    MOP MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB
    SAR SBD SCR SEK SGD SHP SLE SOS SRD STD SZL THB TJS TOP TRY TTD TWD TZS UAH USD UYU UZS WST
    XCD YER ZAR ZMW""".split()
)
KNOWN_CURRENCIES = ZERO_DECIMAL | THREE_DECIMAL | TWO_DECIMAL


class UnknownCurrencyError(ValueError):
    """A currency outside the exponent table: a data-quality failure, not a guess."""


def exponent(currency: str) -> int:
    """Number of decimals of ``currency`` (any case)."""
    code = currency.upper()
    if code in ZERO_DECIMAL:
        return 0
    if code in THREE_DECIMAL:
        return 3
    if code in TWO_DECIMAL:
        return 2
    raise UnknownCurrencyError(f"unknown currency {currency!r}: not in the exponent table")


def to_decimal_string(amount_minor: int, currency: str) -> str:
    """Render integer minor units as Sage's money string: JPY 1000 → "1000", KWD 1250 → "1.250"."""
    exp = exponent(currency)
    value = Decimal(int(amount_minor)).scaleb(-exp)
    return f"{value:.{exp}f}"


def from_decimal_string(amount: str, currency: str) -> int:
    """Parse a Sage money string back into minor units, refusing a wrong number of decimals."""
    exp = exponent(currency)
    text = amount.strip()
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    if decimals != exp:
        raise ValueError(f"{amount!r} must carry exactly {exp} decimals for {currency.upper()}")
    return int(Decimal(text).scaleb(exp))
