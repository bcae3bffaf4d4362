"""The mapping file: how Stripe fields become Sage fields, as validated data (no code in strings).

A field rule takes its value from a staged column (``from``), a constant (``const``) or a
template over columns (``template: "Stripe {id}"``); then a ``value_map`` (``succeeded`` →
``Paid``), a ``when`` condition, a ``default``, and a length limit with an overflow policy
(``reject`` dead-letters the record with a clear reason; ``truncate`` is allowed only for free
text; ``shorten`` cuts at a word boundary), and ``fallbacks`` tried in order when the value is
blank (``[charge_billing_name, email, "Stripe {id}"]``). Errors name the YAML line, so a
finance analyst can fix the file without reading code.
"""

from __future__ import annotations

import re
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stripe_sage.errors import ConfigurationError
from stripe_sage.stripe.streams import STREAMS

TEMPLATE_FIELD = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    column: str
    equals: str | None = None
    in_: list[str] | None = Field(default=None, alias="in")
    is_null: bool | None = None


class FieldRule(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str | None = Field(default=None, alias="from")
    const: str | None = None
    template: str | None = None
    value_map: dict[str, str] | None = None
    default: str | None = None
    when: Condition | None = None
    # Tried in order when the value is null or blank: a column name, or a template
    # ("Stripe {id}"); the first that gives text wins, before ``default``.
    fallbacks: list[str] = []
    max_length: int | None = Field(default=None, gt=0)
    # reject: dead-letter the record naming the field; truncate: cut (free text only);
    # shorten: cut at the last word boundary that fits (names: the full text stays in the
    # staged row, the analysts' tables and `mapping preview`).
    on_overflow: Literal["reject", "truncate", "shorten"] = "reject"
    upper: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> FieldRule:
        given = [k for k in ("from_", "const", "template") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a field rule needs exactly one of 'from', 'const' or 'template'")
        return self

    def columns(self) -> set[str]:
        cols = set()
        if self.from_:
            cols.add(self.from_)
        if self.template:
            cols |= set(TEMPLATE_FIELD.findall(self.template))
        if self.when:
            cols.add(self.when.column)
        for fallback in self.fallbacks:
            cols |= set(TEMPLATE_FIELD.findall(fallback)) if "{" in fallback else {fallback}
        return cols


# Every reporting category docs/stripe.md lists (and the older names the default file keeps) →
# the account name it posts to in a payout (or daily) journal. "clearing" marks a category
# whose gross a document of its own posts (receipts, memos, top-up and payout journals).
DEFAULT_REPORTING_CATEGORIES: dict[str, str] = {
    "charge": "clearing",
    "refund": "clearing",
    "refund_failure": "clearing",
    "topup": "clearing",
    "topup_reversal": "clearing",
    "payout": "bank",
    "payout_reversal": "bank",
    "dispute": "chargebacks",
    "dispute_reversal": "chargebacks",
    "fee": "merchant_fees",
    "stripe_fee": "merchant_fees",
    "stripe_fx_fee": "fx_fees",
    "platform_earning": "platform_revenue",
    "platform_earning_refund": "platform_revenue",
    "application_fee": "platform_revenue",
    "transfer": "connect_transfers",
    "transfer_reversal": "connect_transfers",
    "connect_reserved_funds": "other_adjustments",
    "risk_reserved_funds": "other_adjustments",
    "partial_capture_reversal": "other_adjustments",
    "tax": "sales_tax",
    "other_adjustment": "other_adjustments",
}


class Accounts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clearing: dict[str, str]  # settlement currency → GL account
    bank: dict[str, str]
    receivables: str
    sales: str
    subscription_revenue: str
    sales_tax: str
    sales_returns: str
    merchant_fees: str
    chargebacks: str
    dispute_fees: str
    fx_fees: str
    other_adjustments: str
    # Realized FX gain/loss: the rate difference of refunds of foreign-currency sales.
    fx_gain_loss: str = "7500"
    # Added with issue 21; optional so older mapping files load (defaults: the Sage sandbox's
    # chart). Application fees earned (platform_earning and its refunds) are revenue of their
    # own; transfers to connected accounts go to connect_transfers; a reporting category the
    # mapping does not know goes to suspense (flagged and alerted, never blocking a payout).
    platform_revenue: str = "4020"
    connect_transfers: str = "6200"
    suspense: str = "9990"
    # Issue 19: invoices written off (memo expense_account), recovered later (journal Cr).
    bad_debt: str = "6300"
    # Issue 19: customer credit (Stripe's customer balance) applied to invoices.
    customer_credit: str = "2400"


class CustomerMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id_prefix: str = Field(default="S", pattern=r"^[A-Z0-9]{0,3}$")
    fields: dict[str, FieldRule]


class ChargeMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    document: Literal["invoice", "sales_order_and_invoice"] = "invoice"
    # Charges without a Stripe customer (guest checkout) and their refunds post to this Sage
    # customer, created on first need (linked if Sage already has it). null: dead-letter them.
    guest_customer_id: str | None = Field(default="GUEST", pattern=r"^[A-Z0-9]{1,10}$")
    guest_customer_name: str = Field(default="Stripe guest checkout", min_length=1, max_length=40)
    # A charge whose metadata.erp_order_id Sage has no sales order for: post its receipt on
    # account (no apply_to, no invoice) and flag it for a person (on_account), or dead-letter
    # its documents (reject).
    unknown_erp_order: Literal["on_account", "reject"] = "on_account"
    invoice: dict[str, FieldRule]
    receipt: dict[str, FieldRule]


class RefundMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credit_memo: dict[str, FieldRule]


class InvoiceMapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    line: dict[str, FieldRule]


def _default_item_fields() -> dict[str, FieldRule]:
    return {
        "description": FieldRule.model_validate(
            {"from": "name", "max_length": 60, "on_overflow": "truncate"}
        ),
        "type": FieldRule.model_validate({"const": "service"}),
    }


class ItemMapping(BaseModel):
    """Stripe products → Sage items (issue 17). A product's ``metadata.sage_item`` names an
    existing item; otherwise an item is created with a code derived from the product (name and
    a hash of its id). ``fields`` map the product's staged columns to the item's ``description``
    and ``type`` (``stock`` or ``service``; e.g. ``{from: product_type, value_map: {good:
    stock}, default: service}`` makes physical goods stock items). Lines without a product
    (plain charges, Billing lines without a price) name ``default_item``, which the product
    creates in Sage (as a service item) when Sage lacks it."""

    model_config = ConfigDict(extra="forbid")
    default_item: str = Field(default="STRIPE-SALE", pattern=r"^[A-Z0-9_-]{1,20}$")
    default_description: str = Field(default="Stripe sale", min_length=1, max_length=60)
    fields: dict[str, FieldRule] = Field(default_factory=_default_item_fields)
    # Checkout orders (issue 17): the shipping of a session is a line of this item, created
    # in Sage (a service item) when Sage lacks it, on first need. (A session's discount is
    # its invoice's discount_amount: no item.)
    shipping_item: str = Field(default="STRIPE-SHIPPING", pattern=r"^[A-Z0-9_-]{1,20}$")
    shipping_description: str = Field(default="Shipping", min_length=1, max_length=60)

    @model_validator(mode="after")
    def _known_fields(self) -> ItemMapping:
        unknown = set(self.fields) - {"description", "type"}
        if unknown:
            raise ValueError(f"items.fields: unknown item field(s) {sorted(unknown)}")
        if "description" not in self.fields:
            raise ValueError("items.fields: description is required")
        return self


class JurisdictionCode(BaseModel):
    """A Sage tax code for the Stripe tax rates of one jurisdiction and percentage."""

    model_config = ConfigDict(extra="forbid")
    jurisdiction: str
    percentage: Decimal = Field(ge=0, le=100)
    code: str = Field(pattern=r"^[A-Z0-9_-]{1,10}$")


class TaxMapping(BaseModel):
    """Stripe tax rates → Sage tax codes (issue 18), tried in this order: ``codes`` by the
    rate's id (``txr_…``), then ``by_jurisdiction`` (the staged rate's jurisdiction and
    percentage), then ``default_code``. A rate none of them codes is not guessed: its invoice
    is dead-lettered with a reason naming the rate, and replayed once the mapping codes it.
    Each code's tax posts to the liability account Sage's tax-code table gives it
    (``accounts.sales_tax`` for the sandbox's codes). Optional: a mapping file without a
    ``tax`` section codes nothing, so only untaxed invoices post."""

    model_config = ConfigDict(extra="forbid")
    codes: dict[str, Annotated[str, Field(pattern=r"^[A-Z0-9_-]{1,10}$")]] = {}
    by_jurisdiction: list[JurisdictionCode] = []
    default_code: str | None = Field(default=None, pattern=r"^[A-Z0-9_-]{1,10}$")


class OrderMapping(BaseModel):
    """Checkout Sessions (issue 17). A completed goods session (``mode: payment``, no
    ``invoice_creation``) becomes a Sage sales order and its invoice, and the charge that
    paid it a receipt applied to that invoice. ``enabled: false`` posts every charge as a
    standalone sale and never waits for sessions (an account that does not use Checkout for
    goods)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # A session is listed while still open and completes moments after its charge: a charge
    # made while a payment-mode session was open waits until sessions have been read this
    # long after the charge (its completion read with them). 0: the charge posts as soon as
    # sessions are read up to it (a session's completion may then be missed).
    completion_grace_seconds: int = Field(default=600, ge=0, le=86_400)


class Mapping(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1]
    timezone: str = "UTC"
    closed_period_policy: Literal["next_open", "dead_letter"] = "next_open"
    settlement_currencies: list[str] = ["USD"]
    source_code: str = Field(default="ST", pattern=r"^[A-Z0-9]{2}$")
    accounts: Accounts
    customers: CustomerMapping
    charges: ChargeMapping
    refunds: RefundMapping
    invoices: InvoiceMapping
    items: ItemMapping = Field(default_factory=ItemMapping)
    tax: TaxMapping = Field(default_factory=TaxMapping)
    orders: OrderMapping = Field(default_factory=OrderMapping)
    # Stripe balance-transaction reporting categories → account names above (payout journals).
    # The file's entries are laid over DEFAULT_REPORTING_CATEGORIES (every category docs/stripe.md
    # lists has a default); a category neither knows posts to accounts.suspense.
    reporting_categories: dict[str, str] = {}

    @model_validator(mode="after")
    def _categories_over_defaults(self) -> Mapping:
        unknown = {
            cat: name
            for cat, name in self.reporting_categories.items()
            if name not in Accounts.model_fields
        }
        if unknown:
            raise ValueError(
                "reporting_categories: "
                + ", ".join(f"{c}: {n!r}" for c, n in sorted(unknown.items()))
                + f" name no account (accounts: {', '.join(Accounts.model_fields)})"
            )
        self.reporting_categories = {**DEFAULT_REPORTING_CATEGORIES, **self.reporting_categories}
        return self


# Which staged stream each rule group reads, so that unknown columns fail on load.
RULE_STREAMS: dict[tuple[str, ...], str] = {
    ("customers", "fields"): "customers",
    ("charges", "invoice"): "charges",
    ("charges", "receipt"): "charges",
    ("refunds", "credit_memo"): "refunds",
    ("invoices", "line"): "invoice_lines",
    ("items", "fields"): "products",
}
# Derived columns the planners add next to the staged ones (documented in the mapping).
DERIVED_COLUMNS: dict[str, set[str]] = {
    "charges": {"presentment", "settlement_amount", "settlement_currency", "exchange_rate"},
    "refunds": {"presentment", "settlement_amount", "settlement_currency", "charge_customer"},
    # The latest charge's billing details (name fallbacks for nameless or deleted customers).
    "customers": {"charge_billing_name", "charge_billing_email"},
    "invoice_lines": set(),
    "products": set(),
}


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of ``path`` inside a composed YAML document (the deepest node found)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if k.value == str(key) or (key == "from_" and k.value == "from"):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def default_mapping_text() -> str:
    return resources.files("stripe_sage").joinpath("mappings/default.yaml").read_text()


def load_mapping(path: Path | None = None, *, text: str | None = None) -> Mapping:
    """Load and validate a mapping file; every error names the file and the line."""
    name = str(path) if path else "default mapping"
    if text is None:
        text = path.read_text() if path else default_mapping_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{name}: not valid YAML: {exc}") from None
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _line_of(node, loc)
            where = ".".join(str(p) for p in loc)
            problems.append(f"{name}, line {line}: {where}: {err['msg']}")
        raise ConfigurationError("invalid mapping:\n  " + "\n  ".join(problems)) from None
    problems = []
    for (group, sub), stream in RULE_STREAMS.items():
        rules: dict[str, FieldRule] = getattr(getattr(mapping, group), sub)
        known = {c.name for c in STREAMS[stream].columns} | DERIVED_COLUMNS[stream]
        for field_name, rule in rules.items():
            for col in sorted(rule.columns() - known):
                key = (
                    "from"
                    if rule.from_ == col
                    else "template"
                    if rule.template and "{" + col + "}" in rule.template
                    else "when"
                    if rule.when and rule.when.column == col
                    else "fallbacks"
                )
                line = _line_of(node, (group, sub, field_name, key))
                problems.append(
                    f"{name}, line {line}: {group}.{sub}.{field_name}: unknown field {col!r} "
                    f"(the {stream} stream has: {', '.join(sorted(known))})"
                )
    if problems:
        raise ConfigurationError("invalid mapping:\n  " + "\n  ".join(problems))
    return mapping
