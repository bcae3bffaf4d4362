"""The expectation suites for the typed ``staging.<stream>`` tables, declared as data.

A suite is a tuple of :class:`Check` values in a small, GX-neutral vocabulary (``kind``);
``quality.runner`` is the only module that turns them into Great Expectations objects, so a
GX upgrade touches one place. Each check names the ``check`` value written to
``staging.quarantine`` and carries the sentence (a ``str.format`` template over the failing
row) that becomes the quarantine ``reason``.

Cross-table and cross-column rules are not re-implemented as Python checks: :func:`prepare`
adds derived columns with Polars (``charge_exists`` from a join against the known charge ids,
``amount_minus_fee_minus_net`` for a balance transaction, ...) and the suite asserts on
those columns with ordinary expectations, so Great Expectations reports them like any other.

What the suites check, per stream:

* every stream: ``id`` not null, unique in the batch, and shaped like a Stripe id of that
  stream (``cus_``, ``ch_``/``py_``, ``re_``/``pyr_``, ``in_``, ``il_``, ``inpay_``, ``po_``,
  ``txn_``, ``du_``/``dp_``, ``sub_``, ``prod_`` followed by letters and digits);
  ``created`` (all but invoice lines) not null and between 2010-01-01 and ``now`` + 1 day;
  ``currency`` not null (customers excepted) and in the exponent table of ``money.py``;
  the columns the suite reads are present (a table-level check).
* money columns: integer dtype (table-level) and within ``±MAX_AMOUNT``, non-negative or
  positive where Stripe guarantees it (charge, refund and payout ``amount`` > 0; captured,
  refunded, invoice ``amount_due``/``amount_paid``/``amount_remaining``/``tax`` ≥ 0).
* charges: ``amount_refunded`` and ``amount_captured`` do not exceed ``amount``.
* balance transactions: ``amount - fee == net`` and ``Σ fee_details.amount == fee``.
* statuses in the sets Stripe documents (charges, refunds, payouts, invoices, invoice
  payments, balance transactions, disputes, subscriptions).
* references: a refund's and a dispute's ``charge`` among the known charge ids, an invoice
  line's and an invoice payment's ``invoice`` among the known invoice ids.
* optionally the row count against the previous run (:func:`row_count_bounds`).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import polars as pl

from stripe_sage.money import KNOWN_CURRENCIES
from stripe_sage.stripe.streams import STREAMS

Kind = Literal[
    "not_null",  # per row: value present
    "unique",  # per row: value not repeated in the batch (every occurrence fails)
    "match_regex",  # per row: params["regex"]
    "in_set",  # per row: params["value_set"]; nulls are left to a not_null check
    "between",  # per row: params["min_value"] ≤ value ≤ params["max_value"]; nulls skipped
    "integer",  # table: the column's dtype is a 64-bit integer
    "columns_present",  # table: params["columns"] all exist
    "row_count",  # table: params["min_value"] ≤ rows ≤ params["max_value"]
]
TABLE_KINDS: frozenset[str] = frozenset({"integer", "columns_present", "row_count"})

ROW_COLUMN = "_row"
"""Row number added by :func:`prepare`; it identifies failing rows even when ids repeat."""

MIN_CREATED = datetime(2010, 1, 1, tzinfo=UTC)
FUTURE_TOLERANCE = timedelta(days=1)
MAX_AMOUNT = 999_999_999_999
"""Sanity bound on any money column: twelve digits of minor units. Stripe caps a single
charge at eight digits (twelve for a few currencies such as IDR); a larger value is a unit
or parsing error, not a sale."""

ROW_COUNT_MIN_PREVIOUS = 1_000
ROW_COUNT_MIN_RATIO = 0.1

ID_PREFIXES: dict[str, tuple[str, ...]] = {
    "customers": ("cus",),
    "charges": ("ch", "py"),  # py_: charges of non-card payment methods (ACH, SEPA, ...)
    "refunds": ("re", "pyr"),  # pyr_: refunds of py_ charges
    "invoices": ("in",),
    "invoice_lines": ("il",),
    "invoice_payments": ("inpay",),
    "payouts": ("po",),
    "balance_transactions": ("txn",),
    "disputes": ("du", "dp"),
    "subscriptions": ("sub",),
    "products": ("prod",),
    "tax_rates": ("txr",),
    "credit_notes": ("cn",),
    "checkout_sessions": ("cs_test", "cs_live", "cs"),  # Stripe: cs_test_…, cs_live_…
    "checkout_line_items": ("li",),
}

STATUSES: dict[str, tuple[str, ...]] = {
    "charges": ("succeeded", "pending", "failed"),
    "refunds": ("succeeded", "pending", "failed", "canceled", "requires_action"),
    "payouts": ("paid", "pending", "in_transit", "canceled", "failed"),
    "invoices": ("draft", "open", "paid", "uncollectible", "void"),
    "invoice_payments": ("open", "paid", "canceled"),
    "credit_notes": ("issued", "void"),
    "checkout_sessions": ("open", "complete", "expired"),
    "balance_transactions": ("available", "pending"),
    "disputes": (
        "warning_needs_response", "warning_under_review", "warning_closed",
        "needs_response", "under_review", "won", "lost", "prevented",
    ),
    "subscriptions": (
        "incomplete", "incomplete_expired", "trialing", "active", "past_due", "canceled",
        "unpaid", "paused",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Amount:
    column: str
    min_value: int
    required: bool = True


AMOUNTS: dict[str, tuple[Amount, ...]] = {
    "charges": (Amount("amount", 1), Amount("amount_captured", 0), Amount("amount_refunded", 0)),
    "refunds": (Amount("amount", 1),),
    "invoices": (
        Amount("subtotal", -MAX_AMOUNT), Amount("tax", 0), Amount("total", -MAX_AMOUNT),
        Amount("amount_due", 0), Amount("amount_paid", 0), Amount("amount_remaining", 0),
    ),
    "invoice_lines": (Amount("amount", -MAX_AMOUNT), Amount("quantity", 0, required=False)),
    "invoice_payments": (Amount("amount_paid", 0, required=False),),
    "payouts": (Amount("amount", 1),),
    "balance_transactions": (
        Amount("amount", -MAX_AMOUNT), Amount("fee", -MAX_AMOUNT), Amount("net", -MAX_AMOUNT),
        Amount("fee_details_total", -MAX_AMOUNT),
    ),
    "disputes": (Amount("amount", 0),),
    "credit_notes": (Amount("total", 0), Amount("subtotal", -MAX_AMOUNT)),
    "checkout_sessions": (Amount("amount_total", 0, required=False),),
    "checkout_line_items": (Amount("amount_subtotal", 0), Amount("quantity", 0, required=False)),
}  # fmt: skip

OPTIONAL_CURRENCY = frozenset({"customers"})  # a customer has no currency until billed


@dataclass(frozen=True)
class Reference:
    """``column`` must name an object of stream ``target`` (ids passed in as known ids)."""

    column: str
    target: str

    @property
    def derived(self) -> str:
        return f"{self.column}_exists"


REFERENCES: dict[str, tuple[Reference, ...]] = {
    "refunds": (Reference("charge", "charges"),),
    "disputes": (Reference("charge", "charges"),),
    "invoice_lines": (Reference("invoice", "invoices"),),
    "invoice_payments": (Reference("invoice", "invoices"),),
    "checkout_line_items": (Reference("session", "checkout_sessions"),),
}


@dataclass(frozen=True)
class Derived:
    """A column computed in Polars before validation, asserted on by a check."""

    name: str
    inputs: tuple[str, ...]
    expr: Callable[[], pl.Expr]


DERIVED: dict[str, tuple[Derived, ...]] = {
    "charges": (
        Derived("amount_minus_refunded", ("amount", "amount_refunded"),
                lambda: pl.col("amount") - pl.col("amount_refunded")),
        Derived("amount_minus_captured", ("amount", "amount_captured"),
                lambda: pl.col("amount") - pl.col("amount_captured")),
    ),
    "balance_transactions": (
        Derived("amount_minus_fee_minus_net", ("amount", "fee", "net"),
                lambda: pl.col("amount") - pl.col("fee") - pl.col("net")),
        Derived("fee_details_minus_fee", ("fee_details_total", "fee"),
                lambda: pl.col("fee_details_total") - pl.col("fee")),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Check:
    """One expectation: what GX asserts, and what quarantine says when a row fails it."""

    name: str  # the ``check`` value in staging.quarantine
    kind: Kind
    column: str | None  # None for table-level checks without a column
    reason: str  # str.format template over the failing row's columns and ``params``
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def row_level(self) -> bool:
        """Row-level failures quarantine rows; table-level failures fail the suite wholesale."""
        return self.kind not in TABLE_KINDS

    def reason_fields(self) -> tuple[str, ...]:
        """Row columns the reason template reads (``params`` keys excluded)."""
        names = {f for _, f, _, _ in string.Formatter().parse(self.reason) if f}
        return tuple(sorted(n for n in names if n not in self.params))

    def columns(self) -> tuple[str, ...]:
        """Columns the check needs in the frame."""
        if self.kind == "columns_present":
            return ()
        own = (self.column,) if self.column else ()
        return tuple(dict.fromkeys((*own, *self.reason_fields())))


@dataclass(frozen=True)
class Suite:
    stream: str
    checks: tuple[Check, ...]

    @property
    def name(self) -> str:
        return f"staging.{self.stream}"

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)


def row_count_bounds(previous_rows: int | None) -> tuple[int, int | None] | None:
    """Row-count bounds for a stream given the rows the previous successful run validated.

    The rule catches a collapse, not normal variation: it applies only when the previous run
    saw at least ``ROW_COUNT_MIN_PREVIOUS`` rows (small streams fluctuate), and then demands
    at least ``ROW_COUNT_MIN_RATIO`` of them (a drop of more than 90% means an extract or a
    staging step lost data, e.g. zero charges where there were 5,000). There is no upper
    bound: backfills legitimately grow a stream. Compare like with like: ``previous_rows``
    must count the same thing as ``rows`` (the full staged table is the robust choice, as it
    never shrinks; per-run deltas are noisier).
    """
    if previous_rows is None or previous_rows < ROW_COUNT_MIN_PREVIOUS:
        return None
    return math.ceil(previous_rows * ROW_COUNT_MIN_RATIO), None


def _not_null(column: str) -> Check:
    return Check(f"{column}_not_null", "not_null", column, f"{column} is null",
                 description=f"{column} is present")  # fmt: skip


def _id_checks(stream: str) -> list[Check]:
    prefixes = ID_PREFIXES[stream]
    regex = rf"^(?:{'|'.join(prefixes)})_[A-Za-z0-9]+$"
    shown = " or ".join(f"{p}_" for p in prefixes)
    return [
        _not_null("id"),
        Check("id_unique", "unique", "id", "id {id} appears more than once in the batch",
              description="id is unique in the batch"),
        Check("id_format", "match_regex", "id",
              f"id {{id}} is not a well-formed {stream} id ({shown} then letters and digits)",
              params={"regex": regex}, description=f"id matches {regex}"),
    ]  # fmt: skip


def _created_checks(now: datetime) -> list[Check]:
    latest = _utc(now) + FUTURE_TOLERANCE
    return [
        _not_null("created"),
        Check("created_range", "between", "created",
              "created {created} is outside {min_value} .. {max_value} "
              "(not before 2010, at most one day after the run)",
              params={"min_value": MIN_CREATED, "max_value": latest},
              description="created is after 2010-01-01 and at most one day in the future"),
    ]  # fmt: skip


def _currency_checks(stream: str) -> list[Check]:
    checks = [] if stream in OPTIONAL_CURRENCY else [_not_null("currency")]
    checks.append(
        Check("currency_known", "in_set", "currency",
              "currency {currency} is not in the currency exponent table",
              params={"value_set": sorted(KNOWN_CURRENCIES)},
              description="currency is in the exponent table (upper case)")
    )  # fmt: skip
    return checks


def _amount_checks(amount: Amount) -> list[Check]:
    col = amount.column
    sign = {0: "non-negative", 1: "positive"}.get(amount.min_value, "within bounds")
    checks = [_not_null(col)] if amount.required else []
    checks += [
        Check(f"{col}_integer", "integer", col, f"{col} is not an integer column",
              description=f"{col} is integer minor units"),
        Check(f"{col}_range", "between", col,
              f"{col} {{{col}}} is outside {{min_value}}..{{max_value}} (must be {sign})",
              params={"min_value": amount.min_value, "max_value": MAX_AMOUNT},
              description=f"{col} is {sign} and at most {MAX_AMOUNT}"),
    ]  # fmt: skip
    return checks


def _status_checks(stream: str) -> list[Check]:
    allowed = STATUSES[stream]
    return [
        _not_null("status"),
        Check("status_known", "in_set", "status",
              f"status {{status}} is not a known {stream} status ({', '.join(allowed)})",
              params={"value_set": list(allowed)}, description="status is a known value"),
    ]  # fmt: skip


def _reference_checks(ref: Reference) -> list[Check]:
    return [
        _not_null(ref.column),
        Check(ref.derived, "in_set", ref.derived,
              f"{ref.column} {{{ref.column}}} is not among the known {ref.target} ids",
              params={"value_set": [True]},
              description=f"{ref.column} refers to a known object of {ref.target}"),
    ]  # fmt: skip


def _stream_specific(stream: str) -> list[Check]:
    if stream == "charges":
        return [
            Check("amount_refunded_within_amount", "between", "amount_minus_refunded",
                  "amount_refunded {amount_refunded} exceeds amount {amount}",
                  params={"min_value": 0, "max_value": None},
                  description="amount_refunded <= amount"),
            Check("amount_captured_within_amount", "between", "amount_minus_captured",
                  "amount_captured {amount_captured} exceeds amount {amount}",
                  params={"min_value": 0, "max_value": None},
                  description="amount_captured <= amount"),
        ]  # fmt: skip
    if stream == "balance_transactions":
        return [
            Check("net_equals_amount_minus_fee", "between", "amount_minus_fee_minus_net",
                  "amount {amount} - fee {fee} != net {net} "
                  "(off by {amount_minus_fee_minus_net})",
                  params={"min_value": 0, "max_value": 0},
                  description="amount - fee == net"),
            Check("fee_details_sum_equals_fee", "between", "fee_details_minus_fee",
                  "fee_details_total {fee_details_total} (sum of fee_details.amount) "
                  "!= fee {fee}",
                  params={"min_value": 0, "max_value": 0},
                  description="sum of fee_details.amount == fee"),
        ]  # fmt: skip
    return []


def build_suite(stream: str, *, now: datetime, previous_rows: int | None = None) -> Suite:
    """The suite for ``stream``; ``now`` bounds ``created``, ``previous_rows`` the row count."""
    if stream not in STREAMS or stream not in ID_PREFIXES:
        raise ValueError(f"no expectation suite for stream {stream!r}")
    staged = {c.name for c in STREAMS[stream].columns}
    checks = _id_checks(stream)
    if "created" in staged:
        checks += _created_checks(now)
    if "currency" in staged:
        checks += _currency_checks(stream)
    for amount in AMOUNTS.get(stream, ()):
        checks += _amount_checks(amount)
    if stream in STATUSES:
        checks += _status_checks(stream)
    for ref in REFERENCES.get(stream, ()):
        checks += _reference_checks(ref)
    checks += _stream_specific(stream)

    # The staged columns the checks read: a derived column stands for its inputs.
    sources: dict[str, tuple[str, ...]] = {d.name: d.inputs for d in DERIVED.get(stream, ())}
    sources |= {r.derived: (r.column,) for r in REFERENCES.get(stream, ())}
    needed: dict[str, None] = {}
    for c in checks:
        for col in c.columns():
            needed |= dict.fromkeys(sources.get(col, (col,)))
    checks.insert(
        0,
        Check("columns_present", "columns_present", None,
              "the frame lacks columns the suite reads",
              params={"columns": list(needed)},
              description="the staged columns the suite reads are present"),
    )  # fmt: skip
    bounds = row_count_bounds(previous_rows)
    if bounds is not None:
        checks.append(
            Check("row_count", "row_count", None,
                  "row count is below {min_value} (previous run: {previous_rows})",
                  params={"min_value": bounds[0], "max_value": bounds[1],
                          "previous_rows": previous_rows},
                  description="no collapse in row count against the previous run")
        )  # fmt: skip
    return Suite(stream, tuple(checks))


def required_references(stream: str) -> tuple[Reference, ...]:
    return REFERENCES.get(stream, ())


def prepare(
    stream: str, df: pl.DataFrame, *, known_ids: Mapping[str, pl.Series | set[str]]
) -> pl.DataFrame:
    """Add the row number and the derived columns the suite of ``stream`` asserts on.

    Derived columns whose inputs are missing are left out; the ``columns_present`` check
    reports the missing inputs. Timestamps are made UTC (naive ones are taken as UTC) so GX
    compares them with the UTC bounds. A reference column that is null gets a null
    ``<column>_exists`` (the not-null check reports it once, not twice).
    """
    exprs: list[pl.Expr] = []
    for d in DERIVED.get(stream, ()):
        if all(c in df.columns for c in d.inputs):
            exprs.append(d.expr().alias(d.name))
    for ref in REFERENCES.get(stream, ()):
        if ref.column in df.columns and ref.target in known_ids:
            known = known_ids[ref.target]
            ids = known if isinstance(known, pl.Series) else pl.Series(sorted(known))
            ids = ids.cast(pl.String)
            col = pl.col(ref.column)
            exprs.append(
                pl.when(col.is_null()).then(None).otherwise(col.is_in(ids.implode()))
                .alias(ref.derived)
            )  # fmt: skip
    for name, dtype in df.schema.items():
        if isinstance(dtype, pl.Datetime):
            col = pl.col(name)
            utc = col.dt.replace_time_zone("UTC") if dtype.time_zone is None else col
            exprs.append(utc.dt.convert_time_zone("UTC").alias(name))
    out = df.with_columns(exprs) if exprs else df
    return out.with_row_index(ROW_COLUMN)


def _utc(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
