"""The Sage Pro sandbox: a FastAPI app implementing ``docs/sage_api.md`` with its state in SQLite.

Sage Pro has no public REST API, so the product integrates against a contract and this app
is that contract made executable: every rule of the contract is enforced here (the product
must never learn a rule in production that the sandbox let slip), it keeps state across a
restart (the exactly-once story is about crashes), and it can misbehave on request (rate
limits, 5xx, slow answers, dropped connections, and "commit then fail") so the client's
retry and exactly-once logic can be proved against it.

Design notes (what the contract left open, and what was chosen) live in ``_DESCRIPTION``,
which is also the OpenAPI description served at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hmac
import json
import math
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import httpx
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model
from pydantic import ValidationError as PydanticValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devkit.sandbox.sage_seed import (
    CHART_OF_ACCOUNTS,
    TAX_CODES,
    SeedCustomer,
    SeedItem,
    SeedLine,
    SeedSalesOrder,
)
from stripe_sage.money import KNOWN_CURRENCIES, exponent, to_decimal_string

_DESCRIPTION = """
Sage Pro sandbox implementing docs/sage_api.md (v1). Money is a decimal string with exactly the
currency's exponent of decimals; dates are `YYYY-MM-DD`; every error answers
`{"error": {"code", "message", "field"}}` — including malformed JSON (400 `bad_request`),
unknown routes (404 `not_found`), wrong methods (405 `method_not_allowed`) and query
parameters (422 `validation_error`). The API does **not** deduplicate: find what was posted
with `GET /api/v1/<collection>?reference=`.

**Choices where the contract is silent** (what a real ERP does):
- Unknown body fields are a `validation_error` naming the field (catches mapping typos);
  read-only fields (`invoice_no`, `balance_due`, `status`, `updated_at`, ...) are unknown on
  create. Money and quantities must be JSON strings, never numbers.
- Customers: `customer_id`, `name` and `currency` are required; `status` defaults to
  `active`. `PUT` merges the given fields, then validates the merged record; a `customer_id`
  in a `PUT` body must equal the path's.
- Required on documents: sales order `customer_id, order_date, currency, lines (>= 1)`;
  invoice `customer_id, invoice_date, currency, lines (>= 1), total` (`due_date` defaults to
  `invoice_date` and may not precede it; `tax_amount` defaults to zero and is >= 0; `total`
  >= 0; an invoice line's `unit_price` may be negative, e.g. a discount or proration line,
  a sales-order line's may not; a unit price carries the currency's exponent of decimals
  and up to 4 more, and each line's extension is rounded half-up, away from zero); cash receipt
  `customer_id, receipt_date, amount (> 0), currency, deposit_account`; credit memo
  `customer_id, memo_date, amount (> 0), currency`, and `gl_account` unless it has an
  `invoice_no` (then the invoice's receivable is credited); journal entry `entry_date,
  source_code ([A-Z0-9]{2}), currency, lines (>= 2)`, a missing `debit`/`credit` is zero.
- Validation order: field rules (`validation_error`), then `unknown_customer` /
  `unknown_account`, then document rules (`unbalanced`, `over_application`, links), and
  `period_closed` last — so a document re-dated by the `next_open` policy then posts.
  A date outside every defined fiscal period is also `period_closed`. Sales orders are not
  dated documents (no period check).
- Customer/currency mismatches between linked documents are a `validation_error` on
  `customer_id` / `currency`. An already invoiced sales order may be invoiced again
  (partial invoicing); its status stays `invoiced`.
- `apply_to` lines naming the same invoice are summed before the `balance_due` check.
  An invoice with `balance_due` 0 is `paid`.
- Items (v1.1): `item`, `description`, `type` are required; `opening_quantity` only on stock
  items (a service item's `on_hand` stays `"0"`); `unit_price` is in USD. An existing `item`
  is a `validation_error` on `item`. Every sales-order or invoice line must name an item of
  the item master (`validation_error` on `lines[i].item`, checked after `unknown_customer`);
  an invoice reduces each stock line's item `on_hand` by its quantity, possibly below zero.
- Lists are ordered by creation; `cursor` is opaque; `limit` is 1..200 (default 50).
  `updated_since` (customers only) is inclusive (`updated_at >= updated_since`); a naive
  timestamp is UTC. Reference data lists (`glaccounts`, `fiscalperiods`, `taxcodes`) page
  the same way.
- v1.1 tax and discounts: an invoice's `discount_amount` (>= 0, default 0) comes off the
  line extensions before tax (`total` = Σ extensions − discount_amount + tax_amount).
  `tax_lines[]` `{tax_code, amount}` are optional (absent: one lump `tax_amount`); when given,
  each `tax_code` must be in the seeded tax-code table (`GET /api/v1/taxcodes`, reference
  data like the chart of accounts: a real ERP posts each code's tax to that code's liability
  account, so an unknown code is a `validation_error` on `tax_lines[i].tax_code`, never a
  guess), each amount >= 0, and Σ amount = `tax_amount` (`validation_error` on `tax_lines`).
  A credit memo's `tax_amount` (0 <= t <= amount, default 0) and `tax_lines` follow the same
  rules; its `expense_account` (default `4900`, Sales Returns) must be in the chart
  (`unknown_account`).
- Document numbers are server-assigned and sequential: `SO0000001`, `INV0000001`,
  `RCP0000001`, `CM00000001`, `JE00000001` (new numbers skip ones seeded orders hold).
- `Idempotency-Key` is not honoured: the client must be exactly-once by `reference`.

**Rate limit** (when configured): a token bucket of `rate_limit_rps` requests per second over
`/api/v1`; an over-budget request answers 429 `rate_limited` with `Retry-After` in whole
seconds (>= 1).

**Sandbox controls** under `/_sandbox/` need no bearer token (the sandbox listens on
loopback). Faults (`POST /_sandbox/faults`) apply to `/api/v1` only, in this order: injected
429/500/503 (the request is not processed), the rate limit, auth, then the request runs;
`commit_then_503` runs the request (committing any document) and answers 503; `drop` runs
the request, starts the response and cuts the connection — in-process (ASGI test client)
the caller gets `httpx.RemoteProtocolError`; under uvicorn the client sees the connection
closed mid-response (also `httpx.RemoteProtocolError`), and uvicorn logs the app error.
`slow` runs the request and holds the response back `slow_seconds` (any document is
committed before the delay, so a client that timed out finds it by reference). Injected
429s carry `Retry-After: <retry_after>` (an integer when whole, else a decimal).
Fault decisions come from `random.Random(seed)`, one draw per eligible request, so a run is
reproducible for a given request sequence. `reset` wipes documents, re-seeds reference data
and the factory's seeds, restores fiscal periods, and turns faults off.
"""

JsonDict = dict[str, Any]
DEFAULT_RETURNS_ACCOUNT = "4900"  # the company's Sales Returns account (credit memo default)
TAX_CODE_SET = frozenset(code for code, *_ in TAX_CODES)
M = TypeVar("M", bound=BaseModel)

# ISO 3166-1 alpha-2, plus XK (Kosovo, user-assigned but used by Stripe and most ERPs).
COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO
    BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK
    DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR
    GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM
    KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP
    MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL
    PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST
    SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG
    VI VN VU WF WS YE YT ZA ZM ZW XK""".split()
)

_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_UTC = datetime.UTC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)


@dataclass(frozen=True)
class _Spec:
    """One collection: the key of its documents and the format of server-assigned numbers."""

    name: str
    key: str
    prefix: str
    digits: int


SPECS: dict[str, _Spec] = {
    "customers": _Spec("customers", "customer_id", "", 0),  # chosen by the client
    "salesorders": _Spec("salesorders", "order_no", "SO", 7),
    "invoices": _Spec("invoices", "invoice_no", "INV", 7),
    "cashreceipts": _Spec("cashreceipts", "receipt_no", "RCP", 7),
    "creditmemos": _Spec("creditmemos", "memo_no", "CM", 8),
    "journalentries": _Spec("journalentries", "entry_no", "JE", 8),
    "items": _Spec("items", "item", "", 0),  # chosen by the client (v1.1)
}


class SageApiError(Exception):
    """The one way a handler fails: rendered as the contract's error body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def _invalid(field: str | None, message: str, code: str = "validation_error") -> SageApiError:
    return SageApiError(422, code, message, field)


def _error_body(code: str, message: str, field: str | None = None) -> JsonDict:
    return {"error": {"code": code, "message": message, "field": field}}


# --- field validators (pydantic AfterValidators: their errors carry the field's location) ---


def _check_currency(value: str) -> str:
    if value != value.upper():
        raise ValueError("must be an upper-case ISO 4217 code")
    if value not in KNOWN_CURRENCIES:
        raise ValueError(f"unknown currency {value!r}")
    return value


def _check_country(value: str) -> str:
    if value not in COUNTRIES:
        raise ValueError("must be an ISO 3166-1 alpha-2 code (upper case)")
    return value


def _check_email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("not a valid email address")
    return value


def _check_date(value: str) -> str:
    try:
        if not _ISO_DATE.match(value):
            raise ValueError
        datetime.date.fromisoformat(value)
    except ValueError:
        raise ValueError("must be a date YYYY-MM-DD") from None
    return value


def _check_quantity(value: str) -> str:
    if Decimal(value) <= 0:
        raise ValueError("must be greater than zero")
    return value


def _text(max_length: int, min_length: int = 1, **kw: Any) -> Any:
    return Field(strict=True, min_length=min_length, max_length=max_length, **kw)


Currency = Annotated[str, Field(strict=True, examples=["USD"]), AfterValidator(_check_currency)]
IsoDate = Annotated[str, Field(strict=True, examples=["2026-01-31"]), AfterValidator(_check_date)]
Money = Annotated[
    str,
    Field(
        strict=True,
        pattern=r"^-?\d+(\.\d+)?$",
        description="decimal string with exactly the currency's exponent of decimals",
        examples=["12.34"],
    ),
]
Quantity = Annotated[
    str,
    Field(strict=True, pattern=r"^\d+(\.\d+)?$", description="decimal string > 0"),
    AfterValidator(_check_quantity),
]
CustomerRef = Annotated[str, _text(10)]
DocRef = Annotated[str, _text(30, description="the Stripe id")]
Account = Annotated[str, _text(45)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CustomerUpdate(_Model):
    """Fields of a customer; a ``PUT`` merges the ones given into the record."""

    customer_id: Annotated[str, Field(strict=True, pattern=r"^[A-Z0-9]{1,10}$")] | None = None
    name: Annotated[str, _text(40)] | None = None
    email: Annotated[str, _text(60), AfterValidator(_check_email)] | None = None
    phone: Annotated[str, _text(20, 0)] | None = None
    address1: Annotated[str, _text(40, 0)] | None = None
    address2: Annotated[str, _text(40, 0)] | None = None
    city: Annotated[str, _text(30, 0)] | None = None
    state: Annotated[str, _text(10, 0)] | None = None
    postal_code: Annotated[str, _text(10, 0)] | None = None
    country: Annotated[str, Field(strict=True), AfterValidator(_check_country)] | None = None
    currency: Currency | None = None
    reference: Annotated[str, _text(40, description="the Stripe cus_ id")] | None = None
    status: Literal["active", "inactive"] | None = None


class CustomerCreate(CustomerUpdate):
    """A new customer; ``customer_id`` is chosen by the client: 1-10 of ``[A-Z0-9]``, unique."""

    customer_id: Annotated[str, Field(strict=True, pattern=r"^[A-Z0-9]{1,10}$")]
    name: Annotated[str, _text(40)]
    currency: Currency


class Customer(CustomerCreate):
    status: Literal["active", "inactive"] = "active"
    updated_at: str = Field(description="set by the server, ISO 8601 UTC")


class ItemCreate(_Model):
    """A new item (v1.1); ``item`` is chosen by the client: 1-20 of ``[A-Z0-9_-]``, unique."""

    item: Annotated[str, Field(strict=True, pattern=r"^[A-Z0-9_-]{1,20}$")]
    description: Annotated[str, _text(60)]
    type: Literal["stock", "service"]
    unit_price: Money | None = None
    opening_quantity: (
        Annotated[str, Field(strict=True, pattern=r"^\d+(\.\d+)?$", description="stock items only")]
        | None
    ) = None
    reference: Annotated[str, _text(40, description="the Stripe prod_ id")] | None = None


class Item(_Model):
    item: str
    description: str
    type: Literal["stock", "service"]
    unit_price: Money | None = None
    on_hand: str = Field(description="read-only; opening_quantity less the quantities invoiced")
    reference: str | None = None


class Line(_Model):
    item: Annotated[str, _text(20)]
    description: Annotated[str, _text(60, 0)] | None = None
    quantity: Quantity
    unit_price: Money


class SalesOrderCreate(_Model):
    customer_id: CustomerRef
    order_date: IsoDate
    currency: Currency
    reference: DocRef | None = None
    lines: Annotated[list[Line], Field(min_length=1)]


class SalesOrder(SalesOrderCreate):
    order_no: str
    status: Literal["open", "invoiced"]


class TaxLine(_Model):
    tax_code: Annotated[str, _text(10)] = Field(description="a code of GET /api/v1/taxcodes")
    amount: Money


class InvoiceCreate(_Model):
    customer_id: CustomerRef
    invoice_date: IsoDate
    due_date: IsoDate | None = Field(default=None, description="defaults to invoice_date")
    currency: Currency
    reference: DocRef | None = None
    sales_order_no: Annotated[str, _text(10)] | None = None
    lines: Annotated[list[Line], Field(min_length=1)]
    discount_amount: Money | None = Field(default=None, description=">= 0, defaults to zero")
    tax_amount: Money | None = Field(default=None, description=">= 0, defaults to zero")
    tax_lines: list[TaxLine] | None = Field(
        default=None, description="per tax code; when given, Σ amount = tax_amount"
    )
    total: Money = Field(
        description="Σ line extensions (quantity x unit_price, rounded) − discount_amount + "
        "tax_amount, exactly"
    )


class Invoice(InvoiceCreate):
    invoice_no: str
    balance_due: Money
    status: Literal["open", "paid"]


class Application(_Model):
    invoice_no: Annotated[str, _text(10)]
    amount: Money


class CashReceiptCreate(_Model):
    customer_id: CustomerRef
    receipt_date: IsoDate
    amount: Money
    currency: Currency
    payment_method: Annotated[str, _text(20, 0)] | None = None
    reference: DocRef | None = None
    deposit_account: Account
    apply_to: list[Application] | None = None
    memo: Annotated[str, _text(60, 0)] | None = None


class CashReceipt(CashReceiptCreate):
    receipt_no: str


class CreditMemoCreate(_Model):
    customer_id: CustomerRef
    memo_date: IsoDate
    amount: Money
    currency: Currency
    reference: DocRef | None = None
    reason: Annotated[str, _text(60, 0)] | None = None
    invoice_no: Annotated[str, _text(10)] | None = None
    # Cr for the memo when there is no invoice_no (required then); with invoice_no the
    # invoice's receivable is credited and a gl_account given is not used (SAGEPRO_API.md).
    gl_account: Account | None = None
    tax_amount: Money | None = Field(default=None, description="0 <= tax_amount <= amount")
    tax_lines: list[TaxLine] | None = Field(default=None, description="Σ amount = tax_amount")
    expense_account: Account | None = Field(
        default=None, description=f"Dr for amount − tax_amount; default {DEFAULT_RETURNS_ACCOUNT}"
    )


class CreditMemo(CreditMemoCreate):
    memo_no: str


class JournalLine(_Model):
    account: Account
    debit: Money | None = None
    credit: Money | None = None
    description: Annotated[str, _text(60, 0)] | None = None


class JournalEntryCreate(_Model):
    entry_date: IsoDate
    source_code: Annotated[str, Field(strict=True, pattern=r"^[A-Z0-9]{2}$", examples=["ST"])]
    description: Annotated[str, _text(60, 0)] | None = None
    reference: DocRef | None = None
    currency: Currency
    lines: Annotated[list[JournalLine], Field(min_length=2)]


class JournalEntry(JournalEntryCreate):
    entry_no: str


class GLAccount(BaseModel):
    account: str
    description: str
    type: str


class TaxCode(BaseModel):
    tax_code: str
    description: str
    rate: str = Field(description="percent, a decimal string")
    liability_account: str


class FiscalPeriod(BaseModel):
    year: int
    period: int
    start: str
    end: str
    status: Literal["open", "closed"]


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class FaultConfig(_Model):
    """Fault injection: fractions 0..1 of eligible ``/api/v1`` requests; all off by default."""

    seed: int = 0
    rate_429: float = Field(default=0.0, ge=0, le=1)
    retry_after: float = Field(
        default=1.0, ge=0, description="Retry-After seconds of injected 429s"
    )
    rate_500: float = Field(default=0.0, ge=0, le=1)
    rate_503: float = Field(default=0.0, ge=0, le=1)
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    slow_seconds: float = Field(default=0.5, ge=0, le=120)
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    commit_then_503_rate: float = Field(default=0.0, ge=0, le=1)
    only_methods: list[str] | None = Field(default=None, description="e.g. ['POST']; null = all")
    max_faults: int | None = Field(default=None, ge=0, description="stop injecting after this many")


class PeriodRef(_Model):
    year: int
    period: int = Field(ge=1, le=12)


class SeedLineIn(_Model):
    item: str
    description: str | None = None
    quantity: str
    unit_price_minor: int


class SeedCustomerIn(_Model):
    customer_id: str
    name: str
    email: str | None = None
    currency: str
    reference: str | None = None


class SeedSalesOrderIn(_Model):
    order_no: str
    customer_id: str
    order_date: datetime.date
    currency: str
    lines: list[SeedLineIn]
    reference: str | None = None


class SeedItemIn(_Model):
    item: str
    description: str
    type: Literal["stock", "service"] = "service"
    unit_price_minor: int | None = None
    currency: str = "USD"
    opening_quantity: str | None = None
    reference: str | None = None


class SeedRequest(_Model):
    """Extra items / customers / sales orders to add (kept if they exist; not kept by reset)."""

    items: list[SeedItemIn] = []
    customers: list[SeedCustomerIn] = []
    sales_orders: list[SeedSalesOrderIn] = []


class SandboxStats(BaseModel):
    documents: dict[str, int]
    faults: dict[str, int]
    rate_limited: int
    requests: int


Limit = Annotated[int, Query(ge=1, le=200, description="page size, at most 200")]
CursorQ = Annotated[str | None, Query(description="opaque, from next_cursor")]
ReferenceQ = Annotated[str | None, Query(description="exact match on reference")]


def _page_model(item: type[BaseModel]) -> type[BaseModel]:
    return create_model(
        f"{item.__name__}List",
        data=(list[item], ...),  # type: ignore[valid-type]
        next_cursor=(str | None, None),
    )


# --- parsing helpers ---


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parse(model: type[M], body: JsonDict) -> M:
    try:
        return model.model_validate(body)
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        where = _loc(err["loc"])
        raise _invalid(where or None, f"{where}: {err['msg']}" if where else err["msg"]) from None


def _money(
    value: str | None,
    currency: str,
    field: str,
    *,
    sign: Literal["any", "nonneg", "positive"] = "any",
    default_zero: bool = False,
) -> Decimal:
    """Parse a money string, refusing any other number of decimals than the exponent's."""
    exp = exponent(currency)
    if value is None:
        if default_zero:
            return Decimal(0).scaleb(-exp)
        raise _invalid(field, f"{field}: required")
    decimals = len(value.split(".", 1)[1]) if "." in value else 0
    if decimals != exp:
        raise _invalid(
            field, f"{field}: {value!r} must carry exactly {exp} decimals for {currency}"
        )
    amount = Decimal(value)
    if sign == "positive" and amount <= 0:
        raise _invalid(field, f"{field}: must be greater than zero")
    if sign == "nonneg" and amount < 0:
        raise _invalid(field, f"{field}: must not be negative")
    return amount


def _unit_price(value: str, currency: str, field: str) -> Decimal:
    """v1.1 "Line amounts": a unit price carries the currency's exponent of decimals and up to
    4 more ("8.4034" USD, "1000.5" JPY), so a tax-inclusive or converted price can be exact."""
    exp = exponent(currency)
    decimals = len(value.split(".", 1)[1]) if "." in value else 0
    if not exp <= decimals <= exp + 4:
        raise _invalid(
            field,
            f"{field}: {value!r} must carry {exp} to {exp + 4} decimals for {currency}",
        )
    return Decimal(value)


def _tax_lines(lines: list[TaxLine] | None, tax: Decimal, currency: str) -> list[JsonDict]:
    """v1.1 ``tax_lines``: each code in the tax-code table, amounts in the currency's exponent
    and not negative, their sum exactly ``tax_amount``. Absent: one lump ``tax_amount``."""
    if lines is None:
        return []
    out, summed = [], Decimal(0)
    for i, line in enumerate(lines):
        if line.tax_code not in TAX_CODE_SET:
            raise _invalid(
                f"tax_lines[{i}].tax_code",
                f"tax_lines[{i}].tax_code: no tax code {line.tax_code!r} (GET /api/v1/taxcodes)",
            )
        amount = _money(line.amount, currency, f"tax_lines[{i}].amount", sign="nonneg")
        summed += amount
        out.append({"tax_code": line.tax_code, "amount": _fmt(amount, currency)})
    if summed != tax:
        raise _invalid(
            "tax_lines", f"tax_lines: Σ amount {_fmt(summed, currency)} != tax_amount {tax}"
        )
    return out


def _extension(amount: Decimal, currency: str) -> Decimal:
    """A line's extension: rounded half-up (away from zero) to the currency's exponent."""
    return amount.quantize(Decimal(1).scaleb(-exponent(currency)), rounding=ROUND_HALF_UP)


def _fmt(amount: Decimal, currency: str) -> str:
    exp = exponent(currency)
    text = f"{amount:.{exp}f}"
    return text[1:] if text.startswith("-") and Decimal(text) == 0 else text


def _micros(moment: datetime.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return (moment - _EPOCH) // datetime.timedelta(microseconds=1)


def _iso(moment: datetime.datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return moment.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _encode_cursor(tag: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{tag}:{position}".encode()).decode().rstrip("=")


def _decode_cursor(tag: str, cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        got, _, position = raw.rpartition(":")
        if got != tag:
            raise ValueError
        return int(position)
    except ValueError:
        raise _invalid("cursor", "cursor: not a cursor of this list") from None


# --- storage ---

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL,
    number TEXT NOT NULL,
    reference TEXT,
    updated_us INTEGER NOT NULL,
    body TEXT NOT NULL,
    UNIQUE (collection, number)
);
CREATE INDEX IF NOT EXISTS documents_reference ON documents (collection, reference);
CREATE INDEX IF NOT EXISTS documents_updated ON documents (collection, updated_us);
CREATE TABLE IF NOT EXISTS glaccounts (
    account TEXT PRIMARY KEY, description TEXT NOT NULL, type TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS periods (
    year INTEGER NOT NULL, period INTEGER NOT NULL,
    start_date TEXT NOT NULL, end_date TEXT NOT NULL, status TEXT NOT NULL,
    PRIMARY KEY (year, period)
);
CREATE TABLE IF NOT EXISTS sequences (collection TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""


def _month_end(year: int, month: int) -> datetime.date:
    first_next = datetime.date(year + (month == 12), month % 12 + 1, 1)
    return first_next - datetime.timedelta(days=1)


class SageStore:
    """SQLite state: one connection shared under a lock, writes in ``BEGIN IMMEDIATE``.

    One lock keeps the read-validate-write of a document (e.g. an application against an
    invoice's ``balance_due``) atomic under uvicorn's threads and the test client's portals;
    ``BEGIN IMMEDIATE`` keeps it atomic against a second app on the same file.
    """

    def __init__(
        self,
        db_path: str | Path,
        *,
        clock: Callable[[], datetime.datetime],
        customers: Sequence[SeedCustomer],
        sales_orders: Sequence[SeedSalesOrder],
        fiscal_years: Sequence[int],
        closed_through: datetime.date | None,
        items: Sequence[SeedItem] = (),
    ) -> None:
        self.clock = clock
        self._items = list(items)
        self._customers = list(customers)
        self._orders = list(sales_orders)
        self._years = sorted(set(fiscal_years))
        self._closed_through = closed_through
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            str(db_path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        with self.transaction() as conn:
            self._seed(conn, self._customers, self._orders, self._items)

    # transactions

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # seeding

    def _period_rows(self) -> list[tuple[int, int, str, str, str]]:
        rows = []
        for year in self._years:
            for month in range(1, 13):
                end = _month_end(year, month)
                closed = self._closed_through is not None and end <= self._closed_through
                rows.append(
                    (
                        year,
                        month,
                        datetime.date(year, month, 1).isoformat(),
                        end.isoformat(),
                        "closed" if closed else "open",
                    )
                )
        return rows

    def _seed(
        self,
        conn: sqlite3.Connection,
        customers: Sequence[SeedCustomer],
        orders: Sequence[SeedSalesOrder],
        items: Sequence[SeedItem] = (),
    ) -> None:
        """Insert what is absent; never touch what exists (idempotent across restarts)."""
        conn.executemany("INSERT OR IGNORE INTO glaccounts VALUES (?, ?, ?)", CHART_OF_ACCOUNTS)
        conn.executemany(
            "INSERT OR IGNORE INTO periods VALUES (?, ?, ?, ?, ?)", self._period_rows()
        )
        now = self.clock()
        for seed_item in items:
            if self.get(conn, "items", seed_item.item) is not None:
                continue
            fields: JsonDict = {
                "item": seed_item.item,
                "description": seed_item.description,
                "type": seed_item.type,
                "reference": seed_item.reference,
            }
            if seed_item.unit_price_minor is not None:
                fields["unit_price"] = to_decimal_string(
                    seed_item.unit_price_minor, seed_item.currency
                )
            if seed_item.opening_quantity is not None:
                fields["opening_quantity"] = seed_item.opening_quantity
            try:
                item_record = _parse(ItemCreate, fields)
            except SageApiError as exc:
                raise ValueError(f"seed item {seed_item.item!r}: {exc.message}") from None
            self.insert(conn, "items", item_record.item, _item_doc(item_record), now)
        for cust in customers:
            if self.get(conn, "customers", cust.customer_id) is not None:
                continue
            fields = {
                "customer_id": cust.customer_id,
                "name": cust.name,
                "email": cust.email,
                "currency": cust.currency,
                "reference": cust.reference,
            }
            try:
                record = _parse(CustomerCreate, fields)
            except SageApiError as exc:
                raise ValueError(f"seed customer {cust.customer_id!r}: {exc.message}") from None
            self.insert(conn, "customers", cust.customer_id, _customer_doc(record, now), now)
        for order in orders:
            if self.get(conn, "salesorders", order.order_no) is not None:
                continue
            if self.get(conn, "customers", order.customer_id) is None:
                raise ValueError(f"seeded order {order.order_no}: no customer {order.customer_id}")
            for ln in order.lines:
                if self.get(conn, "items", ln.item) is None:
                    raise ValueError(f"seeded order {order.order_no}: no item {ln.item}")
            doc = {
                "order_no": order.order_no,
                "customer_id": order.customer_id,
                "order_date": order.order_date.isoformat(),
                "currency": order.currency,
                "reference": order.reference,
                "lines": [
                    {
                        "item": ln.item,
                        "description": ln.description,
                        "quantity": ln.quantity,
                        "unit_price": to_decimal_string(ln.unit_price_minor, order.currency),
                    }
                    for ln in order.lines
                ],
                "status": "open",
            }
            self.insert(conn, "salesorders", order.order_no, doc, now)

    def seed_more(
        self,
        customers: Sequence[SeedCustomer],
        orders: Sequence[SeedSalesOrder],
        items: Sequence[SeedItem] = (),
    ) -> None:
        with self.transaction() as conn:
            self._seed(conn, customers, orders, items)

    def reset(self) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM documents")
            conn.execute("DELETE FROM sequences")
            conn.execute("DELETE FROM periods")
            conn.execute("DELETE FROM glaccounts")
            self._seed(conn, self._customers, self._orders, self._items)

    # documents

    def get(self, conn: sqlite3.Connection, collection: str, number: str) -> JsonDict | None:
        row = conn.execute(
            "SELECT body FROM documents WHERE collection = ? AND number = ?", (collection, number)
        ).fetchone()
        return None if row is None else dict(json.loads(row["body"]))

    def insert(
        self,
        conn: sqlite3.Connection,
        collection: str,
        number: str,
        doc: JsonDict,
        now: datetime.datetime,
    ) -> None:
        conn.execute(
            "INSERT INTO documents (collection, number, reference, updated_us, body)"
            " VALUES (?, ?, ?, ?, ?)",
            (collection, number, doc.get("reference"), _micros(now), json.dumps(doc)),
        )

    def update(
        self,
        conn: sqlite3.Connection,
        collection: str,
        number: str,
        doc: JsonDict,
        now: datetime.datetime,
    ) -> None:
        conn.execute(
            "UPDATE documents SET body = ?, reference = ?, updated_us = ?"
            " WHERE collection = ? AND number = ?",
            (json.dumps(doc), doc.get("reference"), _micros(now), collection, number),
        )

    def next_number(self, conn: sqlite3.Connection, spec: _Spec) -> str:
        row = conn.execute(
            "SELECT last FROM sequences WHERE collection = ?", (spec.name,)
        ).fetchone()
        last = int(row["last"]) if row else 0
        while True:
            last += 1
            number = f"{spec.prefix}{last:0{spec.digits}d}"
            if self.get(conn, spec.name, number) is None:
                break
        conn.execute(
            "INSERT INTO sequences VALUES (?, ?)"
            " ON CONFLICT (collection) DO UPDATE SET last = excluded.last",
            (spec.name, last),
        )
        return number

    def page(
        self,
        collection: str,
        *,
        after: int,
        limit: int,
        reference: str | None = None,
        updated_since_us: int | None = None,
    ) -> tuple[list[JsonDict], int | None]:
        sql = "SELECT id, body FROM documents WHERE collection = ? AND id > ?"
        args: list[Any] = [collection, after]
        if reference is not None:
            sql += " AND reference = ?"
            args.append(reference)
        if updated_since_us is not None:
            sql += " AND updated_us >= ?"
            args.append(updated_since_us)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit + 1)
        with self.reading() as conn:
            rows = conn.execute(sql, args).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        last = int(rows[-1]["id"]) if more and rows else None
        return [json.loads(r["body"]) for r in rows], last

    def counts(self) -> dict[str, int]:
        with self.reading() as conn:
            rows = conn.execute(
                "SELECT collection, COUNT(*) AS n FROM documents GROUP BY collection"
            ).fetchall()
        found = {r["collection"]: int(r["n"]) for r in rows}
        return {name: found.get(name, 0) for name in SPECS}

    # reference data

    def accounts(self) -> list[JsonDict]:
        with self.reading() as conn:
            rows = conn.execute("SELECT * FROM glaccounts ORDER BY account").fetchall()
        return [dict(r) for r in rows]

    def account_exists(self, conn: sqlite3.Connection, account: str) -> bool:
        found = conn.execute("SELECT 1 FROM glaccounts WHERE account = ?", (account,)).fetchone()
        return found is not None

    def periods(self) -> list[JsonDict]:
        with self.reading() as conn:
            rows = conn.execute("SELECT * FROM periods ORDER BY year, period").fetchall()
        return [_period_doc(r) for r in rows]

    def period_for(self, conn: sqlite3.Connection, day: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM periods WHERE start_date <= ? AND end_date >= ?", (day, day)
        ).fetchone()
        return row

    def set_period(self, year: int, period: int, status: str) -> JsonDict:
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE periods SET status = ? WHERE year = ? AND period = ?",
                (status, year, period),
            )
            if cur.rowcount == 0:
                raise SageApiError(404, "not_found", f"no fiscal period {year}-{period:02d}")
            row = conn.execute(
                "SELECT * FROM periods WHERE year = ? AND period = ?", (year, period)
            ).fetchone()
        return _period_doc(row)


def _period_doc(row: sqlite3.Row) -> JsonDict:
    return {
        "year": row["year"],
        "period": row["period"],
        "start": row["start_date"],
        "end": row["end_date"],
        "status": row["status"],
    }


_CUSTOMER_FIELDS = (
    "customer_id", "name", "email", "phone", "address1", "address2", "city", "state",
    "postal_code", "country", "currency", "reference", "status",
)  # fmt: skip


def _customer_doc(record: CustomerCreate, now: datetime.datetime) -> JsonDict:
    doc = {name: getattr(record, name) for name in _CUSTOMER_FIELDS}
    doc["status"] = doc["status"] or "active"
    doc["updated_at"] = _iso(now)
    return doc


def _item_doc(record: ItemCreate) -> JsonDict:
    # A service item holds no stock: its on_hand stays "0" whatever is invoiced.
    opening = record.opening_quantity if record.type == "stock" else None
    return {
        "item": record.item,
        "description": record.description,
        "type": record.type,
        "unit_price": record.unit_price,
        "on_hand": opening or "0",
        "reference": record.reference,
    }


# --- the business rules, one function per document type ---


class SageLedger:
    """Validates and posts documents; every rule of the contract is here."""

    def __init__(self, store: SageStore) -> None:
        self.store = store

    def _now(self) -> datetime.datetime:
        now = self.store.clock()
        return now if now.tzinfo else now.replace(tzinfo=_UTC)

    def _customer_exists(self, conn: sqlite3.Connection, customer_id: str) -> None:
        if self.store.get(conn, "customers", customer_id) is None:
            raise _invalid("customer_id", f"no customer {customer_id!r}", "unknown_customer")

    def _account_exists(self, conn: sqlite3.Connection, account: str, field: str) -> None:
        if not self.store.account_exists(conn, account):
            raise _invalid(field, f"{field}: no GL account {account!r}", "unknown_account")

    def _period_open(self, conn: sqlite3.Connection, day: str, field: str) -> None:
        row = self.store.period_for(conn, day)
        if row is None:
            raise _invalid(field, f"{field}: {day} is in no defined fiscal period", "period_closed")
        if row["status"] != "open":
            raise _invalid(
                field,
                f"{field}: fiscal period {row['year']}-{row['period']:02d} is closed",
                "period_closed",
            )

    def _lines(
        self, lines: list[Line], currency: str, *, negative: bool = True
    ) -> tuple[list[JsonDict], Decimal]:
        """v1.1 line amounts: each line's extension is quantity x unit_price rounded half-up
        to the currency's exponent; returns the lines and Σ extensions. ``negative``: whether
        a line may be a credit (invoices yes, sales orders no)."""
        out: list[JsonDict] = []
        total = Decimal(0)
        with localcontext() as ctx:
            ctx.prec = 80
            for i, line in enumerate(lines):
                price = _unit_price(line.unit_price, currency, f"lines[{i}].unit_price")
                if not negative and price < 0:
                    raise _invalid(
                        f"lines[{i}].unit_price", f"lines[{i}].unit_price: must not be negative"
                    )
                total += _extension(Decimal(line.quantity) * price, currency)
                out.append(line.model_dump())
        return out, total

    def _items_exist(self, conn: sqlite3.Connection, lines: list[Line]) -> list[JsonDict]:
        """v1.1: every line names an item of the item master; returns them, line by line."""
        found: list[JsonDict] = []
        for i, line in enumerate(lines):
            item = self.store.get(conn, "items", line.item)
            if item is None:
                raise _invalid(
                    f"lines[{i}].item", f"lines[{i}].item: {line.item!r} is not in the item master"
                )
            found.append(item)
        return found

    def _reduce_stock(
        self,
        conn: sqlite3.Connection,
        lines: list[Line],
        items: list[JsonDict],
        now: datetime.datetime,
    ) -> None:
        """Invoicing a stock item reduces its on_hand by the line quantity (may go negative:
        a back order is the warehouse's problem, not a reason to refuse the invoice)."""
        moved: dict[str, Decimal] = {}
        for line, item in zip(lines, items, strict=True):
            if item["type"] == "stock":
                moved[line.item] = moved.get(line.item, Decimal(0)) + Decimal(line.quantity)
        for code, quantity in moved.items():
            current = self.store.get(conn, "items", code)
            assert current is not None
            current["on_hand"] = str(Decimal(current["on_hand"]) - quantity)
            self.store.update(conn, "items", code, current, now)

    def _linked_invoice(
        self, conn: sqlite3.Connection, invoice_no: str, field: str, customer: str, currency: str
    ) -> JsonDict:
        invoice = self.store.get(conn, "invoices", invoice_no)
        if invoice is None:
            raise _invalid(field, f"{field}: no invoice {invoice_no!r}")
        if invoice["customer_id"] != customer:
            raise _invalid(
                "customer_id",
                f"customer_id: invoice {invoice_no} belongs to {invoice['customer_id']}",
            )
        if invoice["currency"] != currency:
            raise _invalid(
                "currency", f"currency: invoice {invoice_no} is in {invoice['currency']}"
            )
        return invoice

    def _apply(
        self,
        conn: sqlite3.Connection,
        invoice: JsonDict,
        amount: Decimal,
        now: datetime.datetime,
    ) -> None:
        balance = Decimal(invoice["balance_due"]) - amount
        invoice["balance_due"] = _fmt(balance, invoice["currency"])
        invoice["status"] = "paid" if balance == 0 else "open"
        self.store.update(conn, "invoices", invoice["invoice_no"], invoice, now)

    # customers

    def create_customer(self, body: JsonDict) -> JsonDict:
        record = _parse(CustomerCreate, body)
        now = self._now()
        with self.store.transaction() as conn:
            if self.store.get(conn, "customers", record.customer_id) is not None:
                raise _invalid("customer_id", f"customer_id: {record.customer_id!r} already exists")
            doc = _customer_doc(record, now)
            self.store.insert(conn, "customers", record.customer_id, doc, now)
        return doc

    def update_customer(self, customer_id: str, body: JsonDict) -> JsonDict:
        change = _parse(CustomerUpdate, body)
        if change.customer_id is not None and change.customer_id != customer_id:
            raise _invalid("customer_id", "customer_id: cannot be changed")
        now = self._now()
        with self.store.transaction() as conn:
            current = self.store.get(conn, "customers", customer_id)
            if current is None:
                raise SageApiError(404, "not_found", f"no customer {customer_id!r}")
            merged = {k: v for k, v in current.items() if k != "updated_at"}
            merged.update({k: body[k] for k in change.model_fields_set})
            record = _parse(CustomerCreate, merged)
            doc = _customer_doc(record, now)
            self.store.update(conn, "customers", customer_id, doc, now)
        return doc

    # items (v1.1)

    def create_item(self, body: JsonDict) -> JsonDict:
        record = _parse(ItemCreate, body)
        if record.unit_price is not None:
            _money(record.unit_price, "USD", "unit_price", sign="nonneg")
        if record.opening_quantity is not None and record.type != "stock":
            raise _invalid("opening_quantity", "opening_quantity: only stock items hold stock")
        now = self._now()
        with self.store.transaction() as conn:
            if self.store.get(conn, "items", record.item) is not None:
                raise _invalid("item", f"item: {record.item!r} already exists")
            doc = _item_doc(record)
            self.store.insert(conn, "items", record.item, doc, now)
        return doc

    # documents

    def create_sales_order(self, body: JsonDict) -> JsonDict:
        order = _parse(SalesOrderCreate, body)
        lines, _ = self._lines(order.lines, order.currency, negative=False)
        now = self._now()
        with self.store.transaction() as conn:
            self._customer_exists(conn, order.customer_id)
            self._items_exist(conn, order.lines)
            doc = {
                "order_no": self.store.next_number(conn, SPECS["salesorders"]),
                **order.model_dump(),
                "lines": lines,
                "status": "open",
            }
            self.store.insert(conn, "salesorders", doc["order_no"], doc, now)
        return doc

    def create_invoice(self, body: JsonDict) -> JsonDict:
        inv = _parse(InvoiceCreate, body)
        cur = inv.currency
        lines, extended = self._lines(inv.lines, cur)
        discount = _money(
            inv.discount_amount, cur, "discount_amount", sign="nonneg", default_zero=True
        )
        tax = _money(inv.tax_amount, cur, "tax_amount", sign="nonneg", default_zero=True)
        tax_lines = _tax_lines(inv.tax_lines, tax, cur)
        total = _money(inv.total, cur, "total", sign="nonneg")
        due = inv.due_date or inv.invoice_date
        if due < inv.invoice_date:
            raise _invalid("due_date", "due_date: precedes invoice_date")
        if extended - discount + tax != total:
            raise _invalid(
                "total",
                f"total: {inv.total} != Σ line extensions − discount_amount + tax_amount = "
                f"{extended - discount + tax}",
            )
        now = self._now()
        with self.store.transaction() as conn:
            self._customer_exists(conn, inv.customer_id)
            items = self._items_exist(conn, inv.lines)
            order = None
            if inv.sales_order_no is not None:
                order = self.store.get(conn, "salesorders", inv.sales_order_no)
                if order is None:
                    raise _invalid(
                        "sales_order_no", f"sales_order_no: no sales order {inv.sales_order_no!r}"
                    )
                if order["customer_id"] != inv.customer_id:
                    raise _invalid(
                        "customer_id",
                        f"customer_id: sales order {inv.sales_order_no} belongs to "
                        f"{order['customer_id']}",
                    )
                if order["currency"] != cur:
                    raise _invalid(
                        "currency",
                        f"currency: sales order {inv.sales_order_no} is in {order['currency']}",
                    )
            self._period_open(conn, inv.invoice_date, "invoice_date")
            doc = {
                "invoice_no": self.store.next_number(conn, SPECS["invoices"]),
                **inv.model_dump(),
                "due_date": due,
                "lines": lines,
                "discount_amount": _fmt(discount, cur),
                "tax_amount": _fmt(tax, cur),
                "tax_lines": tax_lines,
                "total": _fmt(total, cur),
                "balance_due": _fmt(total, cur),
                "status": "paid" if total == 0 else "open",
            }
            self.store.insert(conn, "invoices", doc["invoice_no"], doc, now)
            self._reduce_stock(conn, inv.lines, items, now)
            if order is not None and order["status"] != "invoiced":
                order["status"] = "invoiced"
                self.store.update(conn, "salesorders", order["order_no"], order, now)
        return doc

    def create_cash_receipt(self, body: JsonDict) -> JsonDict:
        rec = _parse(CashReceiptCreate, body)
        cur = rec.currency
        amount = _money(rec.amount, cur, "amount", sign="positive")
        applications = [
            (i, app.invoice_no, _money(app.amount, cur, f"apply_to[{i}].amount", sign="positive"))
            for i, app in enumerate(rec.apply_to or [])
        ]
        now = self._now()
        with self.store.transaction() as conn:
            self._customer_exists(conn, rec.customer_id)
            self._account_exists(conn, rec.deposit_account, "deposit_account")
            invoices: dict[str, JsonDict] = {}
            applied: dict[str, Decimal] = {}
            for i, invoice_no, part in applications:
                if invoice_no not in invoices:
                    invoices[invoice_no] = self._linked_invoice(
                        conn, invoice_no, f"apply_to[{i}].invoice_no", rec.customer_id, cur
                    )
                applied[invoice_no] = applied.get(invoice_no, Decimal(0)) + part
                balance = Decimal(invoices[invoice_no]["balance_due"])
                if applied[invoice_no] > balance:
                    raise _invalid(
                        f"apply_to[{i}].amount",
                        f"apply_to[{i}].amount: more than invoice {invoice_no}'s balance_due "
                        f"{invoices[invoice_no]['balance_due']}",
                        "over_application",
                    )
            if sum(applied.values(), Decimal(0)) > amount:
                raise _invalid(
                    "apply_to",
                    "apply_to: applications exceed the receipt amount",
                    "over_application",
                )
            self._period_open(conn, rec.receipt_date, "receipt_date")
            doc = {
                "receipt_no": self.store.next_number(conn, SPECS["cashreceipts"]),
                **rec.model_dump(),
                "apply_to": [
                    {"invoice_no": invoice_no, "amount": _fmt(part, cur)}
                    for _, invoice_no, part in applications
                ],
            }
            self.store.insert(conn, "cashreceipts", doc["receipt_no"], doc, now)
            for invoice_no, part in applied.items():
                self._apply(conn, invoices[invoice_no], part, now)
        return doc

    def create_credit_memo(self, body: JsonDict) -> JsonDict:
        memo = _parse(CreditMemoCreate, body)
        cur = memo.currency
        amount = _money(memo.amount, cur, "amount", sign="positive")
        tax = _money(memo.tax_amount, cur, "tax_amount", sign="nonneg", default_zero=True)
        if tax > amount:
            raise _invalid("tax_amount", "tax_amount: more than the memo's amount")
        tax_lines = _tax_lines(memo.tax_lines, tax, cur)
        if memo.invoice_no is None and memo.gl_account is None:
            raise _invalid("gl_account", "gl_account: required when the memo has no invoice_no")
        expense = memo.expense_account or DEFAULT_RETURNS_ACCOUNT
        now = self._now()
        with self.store.transaction() as conn:
            self._customer_exists(conn, memo.customer_id)
            if memo.gl_account is not None:
                self._account_exists(conn, memo.gl_account, "gl_account")
            self._account_exists(conn, expense, "expense_account")
            invoice = None
            if memo.invoice_no is not None:
                invoice = self._linked_invoice(
                    conn, memo.invoice_no, "invoice_no", memo.customer_id, cur
                )
                if amount > Decimal(invoice["balance_due"]):
                    raise _invalid(
                        "amount",
                        f"amount: more than invoice {memo.invoice_no}'s balance_due "
                        f"{invoice['balance_due']}",
                        "over_application",
                    )
            self._period_open(conn, memo.memo_date, "memo_date")
            doc = {
                "memo_no": self.store.next_number(conn, SPECS["creditmemos"]),
                **memo.model_dump(),
                "tax_amount": _fmt(tax, cur),
                "tax_lines": tax_lines,
                "expense_account": expense,
            }
            self.store.insert(conn, "creditmemos", doc["memo_no"], doc, now)
            if invoice is not None:
                self._apply(conn, invoice, amount, now)
        return doc

    def create_journal_entry(self, body: JsonDict) -> JsonDict:
        entry = _parse(JournalEntryCreate, body)
        cur = entry.currency
        lines: list[JsonDict] = []
        debits = credits = Decimal(0)
        for i, line in enumerate(entry.lines):
            debit = _money(line.debit, cur, f"lines[{i}].debit", sign="nonneg", default_zero=True)
            credit = _money(
                line.credit, cur, f"lines[{i}].credit", sign="nonneg", default_zero=True
            )
            if (debit == 0) == (credit == 0):
                raise _invalid(
                    f"lines[{i}]", f"lines[{i}]: exactly one of debit and credit must be non-zero"
                )
            debits += debit
            credits += credit
            lines.append(
                {
                    "account": line.account,
                    "debit": _fmt(debit, cur),
                    "credit": _fmt(credit, cur),
                    "description": line.description,
                }
            )
        now = self._now()
        with self.store.transaction() as conn:
            for i, line in enumerate(entry.lines):
                self._account_exists(conn, line.account, f"lines[{i}].account")
            if debits != credits:
                raise _invalid(
                    "lines",
                    f"lines: debits {_fmt(debits, cur)} != credits {_fmt(credits, cur)}",
                    "unbalanced",
                )
            self._period_open(conn, entry.entry_date, "entry_date")
            doc = {
                "entry_no": self.store.next_number(conn, SPECS["journalentries"]),
                **entry.model_dump(),
                "lines": lines,
            }
            self.store.insert(conn, "journalentries", doc["entry_no"], doc, now)
        return doc

    def get(self, collection: str, number: str) -> JsonDict:
        with self.store.reading() as conn:
            doc = self.store.get(conn, collection, number)
        if doc is None:
            raise SageApiError(404, "not_found", f"no {collection} record {number!r}")
        return doc


# --- faults and the rate limit ---

FAULT_KINDS = ("http_429", "http_500", "http_503", "drop", "commit_then_503", "slow")


class SandboxDroppedConnection(httpx.RemoteProtocolError):
    """Raised after the response has started, so the connection ends without a whole answer."""


class FaultInjector:
    """Decides, deterministically from the configured seed, which requests misbehave."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = dict.fromkeys(FAULT_KINDS, 0)
        self.configure(FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)
            self._injected = 0

    def reset_counts(self) -> None:
        with self._lock:
            self.counts = dict.fromkeys(FAULT_KINDS, 0)

    def _spend(self, cfg: FaultConfig) -> bool:
        """Count one injected fault against ``max_faults``; False when the budget is spent."""
        if cfg.max_faults is not None and self._injected >= cfg.max_faults:
            return False
        self._injected += 1
        return True

    def decide(self, method: str) -> tuple[str | None, bool]:
        """One draw per eligible request: an exclusive kind (or None) and whether to be slow."""
        with self._lock:
            cfg = self.config
            if cfg.only_methods is not None and method.upper() not in {
                m.upper() for m in cfg.only_methods
            }:
                return None, False
            pick, slow_draw = self._rng.random(), self._rng.random()
            kind: str | None = None
            threshold = 0.0
            for name, rate in (
                ("http_429", cfg.rate_429),
                ("http_500", cfg.rate_500),
                ("http_503", cfg.rate_503),
                ("drop", cfg.drop_rate),
                ("commit_then_503", cfg.commit_then_503_rate),
            ):
                threshold += rate
                if pick < threshold:
                    kind = name
                    break
            slow = slow_draw < cfg.slow_rate
            if kind is not None and self._spend(cfg):
                self.counts[kind] += 1
            else:
                kind = None
            if slow and self._spend(cfg):
                self.counts["slow"] += 1
            else:
                slow = False
            return kind, slow


class RateBudget:
    """A token bucket of ``rps`` requests per second; answers how long to wait when empty."""

    def __init__(self, rps: float) -> None:
        self.rps = rps
        self.capacity = max(1.0, rps)
        self._tokens = self.capacity
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> float | None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rps)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return None
            return (1 - self._tokens) / self.rps


def _retry_after_header(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


async def _send_json(
    send: Send, status: int, body: JsonDict, headers: Sequence[tuple[str, str]] = ()
) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


@dataclass
class _Counters:
    requests: int = 0
    rate_limited: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class SandboxMiddleware:
    """Faults, the rate limit and bearer auth for ``/api/v1`` — in that order (see the docs)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_key: str,
        faults: FaultInjector,
        budget: RateBudget | None,
        counters: _Counters,
    ) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self.faults = faults
        self.budget = budget
        self.counters = counters

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                return hmac.compare_digest(b"Bearer " + token.strip(), self._expected) and (
                    scheme.lower() == b"bearer"
                )
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/v1"):
            await self.app(scope, receive, send)
            return
        with self.counters.lock:
            self.counters.requests += 1
        kind, slow = self.faults.decide(scope["method"])
        if kind == "http_429":
            retry = _retry_after_header(self.faults.config.retry_after)
            await _send_json(
                send,
                429,
                _error_body("rate_limited", "rate limited (sandbox fault)"),
                [("retry-after", retry)],
            )
            return
        if kind in ("http_500", "http_503"):
            status = 500 if kind == "http_500" else 503
            await _send_json(
                send, status, _error_body("unavailable", "unavailable (sandbox fault)")
            )
            return
        wait = self.budget.take() if self.budget is not None else None
        if wait is not None:
            with self.counters.lock:
                self.counters.rate_limited += 1
            await _send_json(
                send,
                429,
                _error_body("rate_limited", "over the request budget"),
                [("retry-after", str(max(1, math.ceil(wait))))],
            )
            return
        if not self._authorized(scope):
            await _send_json(send, 401, _error_body("unauthorized", "missing or invalid API key"))
            return
        if kind is None and not slow:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        await self.app(scope, receive, capture)
        if slow:
            await asyncio.sleep(self.faults.config.slow_seconds)
        if kind == "commit_then_503":
            await _send_json(send, 503, _error_body("unavailable", "unavailable (sandbox fault)"))
            return
        if kind == "drop":
            await send(messages[0])
            raise SandboxDroppedConnection("sandbox fault: connection dropped mid-response")
        for message in messages:
            await send(message)


# --- the app ---


def _doc(
    response: type[BaseModel],
    status: int = 200,
    *,
    request: type[BaseModel] | None = None,
    errors: Sequence[int] = (401, 422),
    models: list[type[BaseModel]],
) -> JsonDict:
    """OpenAPI for a hand-parsed route (bodies are parsed by hand to keep the error shape)."""

    def ref(model: type[BaseModel]) -> JsonDict:
        if model not in models:
            models.append(model)
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    out: JsonDict = {
        "responses": {
            str(status): {"content": {"application/json": {"schema": ref(response)}}},
            **{
                str(code): {
                    "description": "error",
                    "content": {"application/json": {"schema": ref(ErrorBody)}},
                }
                for code in errors
            },
        }
    }
    if request is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref(request)}},
        }
    return out


async def _json_object(request: Request) -> JsonDict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SageApiError(400, "bad_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise SageApiError(400, "bad_request", "the body is not a JSON object")
    return body


def _page(items: list[JsonDict], tag: str, limit: int, cursor: str | None) -> JsonDict:
    start = _decode_cursor(tag, cursor)
    chunk = items[start : start + limit]
    more = start + limit < len(items)
    return {"data": chunk, "next_cursor": _encode_cursor(tag, start + limit) if more else None}


def create_sage_app(
    db_path: str | Path,
    *,
    api_key: str,
    customers: Sequence[SeedCustomer] = (),
    sales_orders: Sequence[SeedSalesOrder] = (),
    items: Sequence[SeedItem] = (),
    fiscal_years: Sequence[int] | None = None,
    closed_through: datetime.date | None = None,
    rate_limit_rps: float | None = None,
    clock: Callable[[], datetime.datetime] | None = None,
) -> FastAPI:
    """Build the sandbox over the SQLite file ``db_path`` (created, or reopened as it is).

    Seeds are inserted only when absent, so re-creating the app on the same file keeps every
    document; ``fiscal_years`` defaults to the clock's year -2 ... +1, and periods ending on or
    before ``closed_through`` start closed.
    """
    now_fn: Callable[[], datetime.datetime] = clock or (lambda: datetime.datetime.now(_UTC))
    if fiscal_years is None:
        year = now_fn().year
        fiscal_years = range(year - 2, year + 2)
    store = SageStore(
        db_path,
        clock=now_fn,
        customers=customers,
        sales_orders=sales_orders,
        fiscal_years=fiscal_years,
        closed_through=closed_through,
        items=items,
    )
    ledger = SageLedger(store)
    faults = FaultInjector()
    counters = _Counters()
    budget = RateBudget(rate_limit_rps) if rate_limit_rps else None

    app = FastAPI(title="Sage Pro sandbox", version="1.0.0", description=_DESCRIPTION)
    app.state.store = store
    app.state.faults = faults
    app.add_middleware(
        SandboxMiddleware, api_key=api_key, faults=faults, budget=budget, counters=counters
    )
    models: list[type[BaseModel]] = []

    @app.exception_handler(SageApiError)
    async def _sage_error(_: Request, exc: SageApiError) -> JSONResponse:
        return JSONResponse(_error_body(exc.code, exc.message, exc.field), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _request_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [p for p in err.get("loc", ()) if p not in ("query", "path", "body")]
        where = _loc(loc) or None
        msg = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
        return JSONResponse(_error_body("validation_error", msg, where), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "bad_request" if exc.status_code < 500 else "unavailable")
        return JSONResponse(
            _error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body("unavailable", "internal error"), status_code=500)

    # customers

    @app.post(
        "/api/v1/customers",
        status_code=201,
        tags=["customers"],
        openapi_extra=_doc(Customer, 201, request=CustomerCreate, models=models),
    )
    async def create_customer(request: Request) -> JSONResponse:
        """Create a customer; ``customer_id`` is chosen by the client and must be new."""
        return JSONResponse(ledger.create_customer(await _json_object(request)), status_code=201)

    @app.get(
        "/api/v1/customers",
        tags=["customers"],
        openapi_extra=_doc(_page_model(Customer), models=models),
    )
    async def list_customers(
        reference: ReferenceQ = None,
        updated_since: Annotated[
            str | None, Query(description="ISO 8601; inclusive; naive means UTC")
        ] = None,
        limit: Limit = 50,
        cursor: CursorQ = None,
    ) -> JSONResponse:
        """Customers in creation order; with ``updated_since`` the changes since then."""
        since = None
        if updated_since is not None:
            try:
                since = _micros(datetime.datetime.fromisoformat(updated_since.replace(" ", "+")))
            except ValueError:
                raise _invalid("updated_since", "updated_since: not an ISO 8601 time") from None
        return _list("customers", limit, cursor, reference, since)

    @app.get(
        "/api/v1/customers/{customer_id}",
        tags=["customers"],
        openapi_extra=_doc(Customer, errors=(401, 404), models=models),
    )
    async def get_customer(customer_id: str) -> JSONResponse:
        return JSONResponse(ledger.get("customers", customer_id))

    @app.put(
        "/api/v1/customers/{customer_id}",
        tags=["customers"],
        openapi_extra=_doc(
            Customer, request=CustomerUpdate, errors=(400, 401, 404, 422), models=models
        ),
    )
    async def update_customer(customer_id: str, request: Request) -> JSONResponse:
        """Merge the given fields into the customer (404 when absent); ``updated_at`` moves."""
        body = await _json_object(request)
        return JSONResponse(ledger.update_customer(customer_id, body))

    def _list(
        collection: str,
        limit: int,
        cursor: str | None,
        reference: str | None,
        since: int | None = None,
    ) -> JSONResponse:
        after = _decode_cursor(collection, cursor)
        data, last = store.page(
            collection, after=after, limit=limit, reference=reference, updated_since_us=since
        )
        next_cursor = _encode_cursor(collection, last) if last is not None else None
        return JSONResponse({"data": data, "next_cursor": next_cursor})

    # documents

    creators: dict[str, tuple[Callable[[JsonDict], JsonDict], type[BaseModel], type[BaseModel]]]
    creators = {
        "salesorders": (ledger.create_sales_order, SalesOrderCreate, SalesOrder),
        "invoices": (ledger.create_invoice, InvoiceCreate, Invoice),
        "cashreceipts": (ledger.create_cash_receipt, CashReceiptCreate, CashReceipt),
        "creditmemos": (ledger.create_credit_memo, CreditMemoCreate, CreditMemo),
        "journalentries": (ledger.create_journal_entry, JournalEntryCreate, JournalEntry),
        "items": (ledger.create_item, ItemCreate, Item),
    }
    for name, (create_fn, in_model, out_model) in creators.items():
        _document_routes(app, name, create_fn, in_model, out_model, ledger, _list, models)

    # reference data

    @app.get(
        "/api/v1/glaccounts",
        tags=["reference data"],
        openapi_extra=_doc(_page_model(GLAccount), models=models),
    )
    async def gl_accounts(limit: Limit = 50, cursor: CursorQ = None) -> JSONResponse:
        """The chart of accounts (read-only)."""
        return JSONResponse(_page(store.accounts(), "glaccounts", limit, cursor))

    @app.get(
        "/api/v1/taxcodes",
        tags=["reference data"],
        openapi_extra=_doc(_page_model(TaxCode), models=models),
    )
    async def tax_codes(limit: Limit = 50, cursor: CursorQ = None) -> JSONResponse:
        """The tax-code table (read-only): what ``tax_lines[].tax_code`` may name."""
        rows = [
            {"tax_code": c, "description": d, "rate": r, "liability_account": a}
            for c, d, r, a in TAX_CODES
        ]
        return JSONResponse(_page(rows, "taxcodes", limit, cursor))

    @app.get(
        "/api/v1/fiscalperiods",
        tags=["reference data"],
        openapi_extra=_doc(_page_model(FiscalPeriod), models=models),
    )
    async def fiscal_periods(limit: Limit = 50, cursor: CursorQ = None) -> JSONResponse:
        """Monthly fiscal periods with their open/closed status (read-only)."""
        return JSONResponse(_page(store.periods(), "fiscalperiods", limit, cursor))

    # sandbox controls

    @app.post(
        "/_sandbox/reset",
        tags=["sandbox"],
        openapi_extra=_doc(SandboxStats, errors=(), models=models),
    )
    async def sandbox_reset() -> JSONResponse:
        """Wipe documents, re-seed, restore fiscal periods, faults off, counters zero."""
        store.reset()
        faults.configure(FaultConfig())
        faults.reset_counts()
        with counters.lock:
            counters.requests = counters.rate_limited = 0
        return JSONResponse(_stats())

    @app.post(
        "/_sandbox/seed",
        tags=["sandbox"],
        openapi_extra=_doc(SandboxStats, request=SeedRequest, errors=(400, 422), models=models),
    )
    async def sandbox_seed(request: Request) -> JSONResponse:
        """Add customers / sales orders that are absent (in-memory seeds are unchanged)."""
        seed = _parse(SeedRequest, await _json_object(request))
        try:
            store.seed_more(
                [SeedCustomer(**c.model_dump()) for c in seed.customers],
                [
                    SeedSalesOrder(
                        **{
                            **o.model_dump(exclude={"lines"}),
                            "lines": [SeedLine(**ln.model_dump()) for ln in o.lines],
                        }
                    )
                    for o in seed.sales_orders
                ],
                [SeedItem(**i.model_dump()) for i in seed.items],
            )
        except ValueError as exc:
            raise _invalid(None, str(exc)) from None
        return JSONResponse(_stats())

    for action, status in (("close", "closed"), ("open", "open")):
        _period_route(app, store, action, status, models)

    @app.post(
        "/_sandbox/faults",
        tags=["sandbox"],
        openapi_extra=_doc(FaultConfig, request=FaultConfig, errors=(400, 422), models=models),
    )
    async def sandbox_faults(request: Request) -> JSONResponse:
        """Replace the fault configuration (omitted fields: off); the RNG restarts at ``seed``."""
        config = _parse(FaultConfig, await _json_object(request))
        exclusive = (
            config.rate_429
            + config.rate_500
            + config.rate_503
            + config.drop_rate
            + config.commit_then_503_rate
        )
        if exclusive > 1 + 1e-9:
            raise _invalid(
                None,
                "rate_429 + rate_500 + rate_503 + drop_rate + "
                "commit_then_503_rate must not exceed 1",
            )
        faults.configure(config)
        return JSONResponse(config.model_dump())

    @app.get(
        "/_sandbox/faults",
        tags=["sandbox"],
        openapi_extra=_doc(FaultConfig, errors=(), models=models),
    )
    async def sandbox_faults_get() -> JSONResponse:
        return JSONResponse(faults.config.model_dump())

    @app.delete(
        "/_sandbox/faults",
        tags=["sandbox"],
        openapi_extra=_doc(FaultConfig, errors=(), models=models),
    )
    async def sandbox_faults_off() -> JSONResponse:
        """Turn every fault off."""
        faults.configure(FaultConfig())
        return JSONResponse(faults.config.model_dump())

    @app.get(
        "/_sandbox/stats",
        tags=["sandbox"],
        openapi_extra=_doc(SandboxStats, errors=(), models=models),
    )
    async def sandbox_stats() -> JSONResponse:
        """Documents per collection, faults injected by kind, rate-limited and total requests."""
        return JSONResponse(_stats())

    def _stats() -> JsonDict:
        with counters.lock:
            requests, limited = counters.requests, counters.rate_limited
        return {
            "documents": store.counts(),
            "faults": dict(faults.counts),
            "rate_limited": limited,
            "requests": requests,
        }

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for model in models:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(js.pop("$defs", {}))
            schemas[model.__name__] = js
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/api/v1"):
                for operation in operations.values():
                    operation["security"] = [{"bearerAuth": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = custom_openapi  # type: ignore[method-assign]
    return app


ListFn = Callable[[str, int, "str | None", "str | None"], JSONResponse]


def _document_routes(
    app: FastAPI,
    name: str,
    create_fn: Callable[[JsonDict], JsonDict],
    in_model: type[BaseModel],
    out_model: type[BaseModel],
    ledger: SageLedger,
    list_fn: ListFn,
    models: list[type[BaseModel]],
) -> None:
    """POST, GET list and GET by number for one document collection."""
    key = SPECS[name].key

    async def create_doc(request: Request) -> JSONResponse:
        return JSONResponse(create_fn(await _json_object(request)), status_code=201)

    async def list_docs(
        reference: ReferenceQ = None,
        limit: Limit = 50,
        cursor: CursorQ = None,
    ) -> JSONResponse:
        return list_fn(name, limit, cursor, reference)

    async def get_doc(request: Request) -> JSONResponse:
        return JSONResponse(ledger.get(name, request.path_params[key]))

    app.add_api_route(
        f"/api/v1/{name}",
        create_doc,
        methods=["POST"],
        status_code=201,
        tags=[name],
        name=f"create_{name}",
        summary=f"Create one of {name} (no deduplication)",
        openapi_extra=_doc(out_model, 201, request=in_model, errors=(400, 401, 422), models=models),
    )
    app.add_api_route(
        f"/api/v1/{name}",
        list_docs,
        methods=["GET"],
        tags=[name],
        name=f"list_{name}",
        summary=f"List {name}, filter by reference",
        openapi_extra=_doc(_page_model(out_model), models=models),
    )
    app.add_api_route(
        f"/api/v1/{name}/{{{key}}}",
        get_doc,
        methods=["GET"],
        tags=[name],
        name=f"get_{name}",
        summary=f"Get one of {name} by {key}",
        openapi_extra={
            **_doc(out_model, errors=(401, 404), models=models),
            "parameters": [
                {"name": key, "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        },
    )


def _period_route(
    app: FastAPI, store: SageStore, action: str, status: str, models: list[type[BaseModel]]
) -> None:
    async def set_period(request: Request) -> JSONResponse:
        ref = _parse(PeriodRef, await _json_object(request))
        return JSONResponse(store.set_period(ref.year, ref.period, status))

    app.add_api_route(
        f"/_sandbox/periods/{action}",
        set_period,
        methods=["POST"],
        tags=["sandbox"],
        name=f"sandbox_period_{action}",
        summary=f"Mark a fiscal period {status}",
        openapi_extra=_doc(FiscalPeriod, request=PeriodRef, errors=(400, 404, 422), models=models),
    )


__all__ = [
    "CHART_OF_ACCOUNTS",
    "FAULT_KINDS",
    "FaultConfig",
    "SageApiError",
    "SeedCustomer",
    "SeedItem",
    "SeedLine",
    "SeedSalesOrder",
    "create_sage_app",
]
