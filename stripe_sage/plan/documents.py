"""Pure Polars transforms: staged Stripe rows → planned Sage Pro documents.

Where a Stripe charge becomes a Sage cash receipt: ``plan_charges``. Every function here is
``DataFrame(s) → DataFrame``, built from expressions (no row loops), with money kept in integer
minor units until ``money_string`` renders the payload. The output of every planner has the
columns of ``DOC_SCHEMA``: one row per Sage document, its JSON payload (with ``@xref:<doc_key>``
placeholders the loader resolves to Sage numbers), the documents it depends on, and
``error`` — a clear reason when the record cannot become a valid document (it is then
dead-lettered instead of posted), or, prefixed ``waiting:``, what it still waits for (a
balance transaction not staged yet): such documents are planned again by the next run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import polars as pl

from stripe_sage.mapping import DERIVED_COLUMNS, TEMPLATE_FIELD, FieldRule, Mapping
from stripe_sage.money import KNOWN_CURRENCIES, THREE_DECIMAL, ZERO_DECIMAL
from stripe_sage.plan.fx import PAYMENT_SHARE_SCHEMA, settle_foreign_invoices
from stripe_sage.plan.invoice_tax import TAX_LINES_SCHEMA, TAXES_DTYPE, invoice_tax_lines
from stripe_sage.plan.item_codes import default_item_key, line_item
from stripe_sage.plan.line_amounts import line_price_exprs

DOC_SCHEMA: dict[str, pl.DataType] = {
    "doc_key": pl.String(),
    "doc_type": pl.String(),
    "collection": pl.String(),
    "phase": pl.Int32(),
    "stripe_id": pl.String(),
    "depends_on": pl.List(pl.String()),
    "payload": pl.String(),
    "error": pl.String(),
    # Posted as planned, but a person should look (e.g. a receipt on account because Sage has
    # no sales order for its metadata.erp_order_id); listed in ops.flags and the preview.
    "flag": pl.String(),
}
# Customers first, then what references them; receipts and memos after the invoices.
PHASES = {
    "customer": 0,
    "item": 0,
    "item_link": 0,
    "customer_link": 0,
    "customer_update": 1,
    "sales_order": 1,
    "invoice": 2,
    "cash_receipt": 3,
    "credit_memo": 3,
    "journal_entry": 3,
}
COLLECTIONS = {
    "customer": "customers",
    "item": "items",
    "item_link": "items",
    "customer_link": "customers",
    "customer_update": "customers",
    "sales_order": "salesorders",
    "invoice": "invoices",
    "cash_receipt": "cashreceipts",
    "credit_memo": "creditmemos",
    "journal_entry": "journalentries",
}


def empty_docs() -> pl.DataFrame:
    return pl.DataFrame(schema=DOC_SCHEMA)


# -- money and dates ---------------------------------------------------------------------
def exponent_expr(currency: pl.Expr) -> pl.Expr:
    cur = currency.str.to_uppercase()
    return (
        pl.when(cur.is_in(list(ZERO_DECIMAL)))
        .then(0)
        .when(cur.is_in(list(THREE_DECIMAL)))
        .then(3)
        .when(cur.is_in(list(KNOWN_CURRENCIES)))
        .then(2)
        .otherwise(None)
    )


def money_string(amount: pl.Expr, currency: pl.Expr) -> pl.Expr:
    """Integer minor units → Sage's decimal string: JPY 1000 → "1000", KWD 1250 → "1.250"."""
    exp = exponent_expr(currency)
    a = amount.cast(pl.Int64)
    sign = pl.when(a < 0).then(pl.lit("-")).otherwise(pl.lit(""))
    mag = a.abs()
    scale = pl.when(exp == 0).then(1).when(exp == 3).then(1000).otherwise(100)
    whole = (mag // scale).cast(pl.String)
    frac = (mag % scale).cast(pl.String)
    return (
        pl.when(exp == 0)
        .then(pl.concat_str([sign, whole]))
        .when(exp == 3)
        .then(pl.concat_str([sign, whole, pl.lit("."), frac.str.zfill(3)]))
        .otherwise(pl.concat_str([sign, whole, pl.lit("."), frac.str.zfill(2)]))
    )


def local_date(ts: pl.Expr, tz: str) -> pl.Expr:
    return ts.dt.convert_time_zone(tz).dt.date()


def presentment(amount: pl.Expr, currency: pl.Expr, rate: pl.Expr) -> pl.Expr:
    """'EUR 12.34 @1.08' for the memo when the charge was not in the settlement currency."""
    text = pl.concat_str([currency.str.to_uppercase(), pl.lit(" "), money_string(amount, currency)])
    return (
        pl.when(rate.is_not_null())
        .then(pl.concat_str([text, pl.lit(" @"), rate.round(6).cast(pl.String)]))
        .otherwise(text)
    )


# -- field rules -------------------------------------------------------------------------
def template_value(template: str) -> pl.Expr:
    """``"Stripe {id}"`` over the row's columns (a null column reads as empty text)."""
    parts: list[pl.Expr] = []
    pos = 0
    for m in TEMPLATE_FIELD.finditer(template):
        if m.start() > pos:
            parts.append(pl.lit(template[pos : m.start()]))
        parts.append(pl.col(m.group(1)).cast(pl.String).fill_null(""))
        pos = m.end()
    if pos < len(template):
        parts.append(pl.lit(template[pos:]))
    return pl.concat_str(parts).str.strip_chars()


def blank_as_null(value: pl.Expr) -> pl.Expr:
    return pl.when(value.str.strip_chars().str.len_chars() > 0).then(value)


def shorten(value: pl.Expr, limit: int) -> pl.Expr:
    """Cut text longer than ``limit`` at the last word boundary that fits ("Acme Widgets
    International Holdings" → "Acme Widgets International" at 30); a single word longer
    than the limit is cut at the limit. Trailing separators go with the cut."""
    at_word = value.str.extract(rf"(?s)^(.{{1,{limit}}})(?:\s|$)", 1)
    cut = pl.coalesce(at_word, value.str.slice(0, limit)).str.strip_chars_end(" ,;:-/&.")
    return pl.when(value.str.len_chars() > limit).then(cut).otherwise(value)


def rule_value(rule: FieldRule) -> pl.Expr:
    if rule.const is not None:
        value = pl.lit(rule.const, pl.String)
    elif rule.template is not None:
        value = template_value(rule.template)
    else:
        col = pl.col(rule.from_)  # type: ignore[arg-type]
        value = col.cast(pl.String)
        if rule.value_map is not None:
            value = value.str.to_lowercase().replace_strict(
                rule.value_map, default=None, return_dtype=pl.String
            )
    if rule.upper:
        value = value.str.to_uppercase()
    if rule.when is not None:
        c = pl.col(rule.when.column).cast(pl.String)
        if rule.when.equals is not None:
            cond = c == rule.when.equals
        elif rule.when.in_ is not None:
            cond = c.is_in(rule.when.in_)
        else:
            cond = c.is_null() if rule.when.is_null else c.is_not_null()
        value = pl.when(cond).then(value).otherwise(pl.lit(None, pl.String))
    if rule.fallbacks:
        value = pl.coalesce(
            blank_as_null(value),
            *[
                blank_as_null(template_value(f) if "{" in f else pl.col(f).cast(pl.String))
                for f in rule.fallbacks
            ],
        )
    if rule.default is not None:
        value = value.fill_null(pl.lit(rule.default))
    if rule.max_length and rule.on_overflow == "truncate":
        value = value.str.slice(0, rule.max_length)
    if rule.max_length and rule.on_overflow == "shorten":
        value = shorten(value, rule.max_length)
    return value


def rule_error(name: str, rule: FieldRule) -> pl.Expr:
    """A clear reason when a value breaks a rejecting length limit, else null."""
    if not rule.max_length or rule.on_overflow != "reject":
        return pl.lit(None, pl.String)
    value = rule_value(rule)
    return pl.when(value.str.len_chars() > rule.max_length).then(
        pl.format(
            "{} is {} characters ({}); Sage allows {}",
            pl.lit(name),
            value.str.len_chars(),
            value,
            pl.lit(rule.max_length),
        )
    )


def apply_rules(df: pl.DataFrame, rules: dict[str, FieldRule], prefix: str) -> pl.DataFrame:
    """Add ``<prefix><field>`` columns and an ``_rule_errors`` list of reasons."""
    errs = [rule_error(name, rule) for name, rule in rules.items()]
    return df.with_columns(
        *[rule_value(rule).alias(f"{prefix}{name}") for name, rule in rules.items()],
        pl.concat_list(errs).list.drop_nulls().alias("_rule_errors")
        if errs
        else pl.lit([], pl.List(pl.String)).alias("_rule_errors"),
    )


def first_error(*errs: pl.Expr) -> pl.Expr:
    return pl.coalesce(*errs)


def join_errors(col: str = "_rule_errors") -> pl.Expr:
    return pl.when(pl.col(col).list.len() > 0).then(pl.col(col).list.join("; "))


def with_derived(df: pl.DataFrame, stream: str) -> pl.DataFrame:
    """The derived columns a mapping may read (mapping.DERIVED_COLUMNS), null where the
    caller did not supply them (e.g. a customer no charge names yet)."""
    missing = sorted(DERIVED_COLUMNS[stream] - set(df.columns))
    return df.with_columns(pl.lit(None, pl.String).alias(c) for c in missing)


# -- customers ---------------------------------------------------------------------------
GUEST_KEY = "guest"  # stripe_id of the guest customer document: doc_key customer:guest:<id>


def guest_customer_key(mapping: Mapping) -> str | None:
    """``customer:guest:<id>``, what guest charges and their refunds depend on (None: the
    mapping sets no guest customer)."""
    gid = mapping.charges.guest_customer_id
    return f"customer:{GUEST_KEY}:{gid}" if gid else None


def plan_guest_customer(mapping: Mapping, in_sage: bool) -> pl.DataFrame:
    """The one Sage customer for charges without a Stripe customer (guest checkout): linked
    when Sage already has ``charges.guest_customer_id``, else created with the mapping's
    ``guest_customer_name``. Planned when a guest charge or refund first needs it; the
    outbox keeps it from being planned twice."""
    gid = mapping.charges.guest_customer_id
    if not gid:
        return empty_docs()
    payload: dict[str, Any] = {"customer_id": gid}
    if not in_sage:
        payload |= {
            "name": mapping.charges.guest_customer_name,
            "currency": mapping.settlement_currencies[0],
            "reference": f"stripe-sage {GUEST_KEY}",
            "status": "active",
        }
    payload["_matched_by"] = "guest"
    df = pl.DataFrame(
        {
            "doc_type": ["customer_link" if in_sage else "customer"],
            "key": [f"{GUEST_KEY}:{gid}"],
            "payload": [payload],
            "depends_on": [[]],
            "error": [None],
        },
        schema_overrides={"depends_on": pl.List(pl.String), "error": pl.String},
    )
    return _docs(df, key_col="key")


def sage_customer_id(stripe_id: str, prefix: str = "S", salt: int = 0) -> str:
    """Deterministic, ≤ 10 chars of [A-Z0-9]; never a truncated Stripe id. ``salt`` > 0 on clash."""
    digest = hashlib.sha256(f"{stripe_id}:{salt}".encode()).digest()
    n = int.from_bytes(digest[:8], "big")
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    width = 10 - len(prefix)
    chars = []
    for _ in range(width):
        n, r = divmod(n, 36)
        chars.append(alphabet[r])
    return prefix + "".join(chars)


SAGE_CUSTOMERS_SCHEMA = {"customer_id": pl.String(), "email": pl.String(), "linked_to": pl.String()}


def sage_customer_emails(customers: Iterable[dict[str, Any]]) -> pl.DataFrame:
    """Sage's customers (as its API lists them) as the frame email matching reads."""
    rows = [{"customer_id": c["customer_id"], "email": c.get("email")} for c in customers]
    return pl.DataFrame(rows, schema={"customer_id": pl.String, "email": pl.String})


def email_matches(customers: pl.DataFrame, sage_customers: pl.DataFrame) -> pl.DataFrame:
    """Per Stripe customer: the Sage customers sharing its email (case-insensitive), free
    ones only (a Sage customer already linked to another Stripe customer is never merged)."""
    sage = sage_customers.filter(pl.col("email").is_not_null()).with_columns(
        pl.col("email").str.to_lowercase().alias("_email")
    )
    return (
        customers.select("id", pl.col("email").str.to_lowercase().alias("_email"))
        .filter(pl.col("_email").is_not_null())
        .join(sage, on="_email", how="inner")
        .filter(pl.col("linked_to").is_null() | (pl.col("linked_to") == pl.col("id")))
        .group_by("id")
        .agg(pl.col("customer_id").sort().alias("email_candidates"))
    )


def plan_customers(
    customers: pl.DataFrame, mapping: Mapping, sage_customers: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Match each Stripe customer to Sage, in this order: the Sage id in Stripe
    ``metadata.sage_customer_id``; (already cross-referenced customers are not planned
    again); a *unique* email among Sage customers not linked to another Stripe customer;
    else create one with a deterministic id. Two Sage customers with the email are never
    guessed between: the record is dead-lettered naming both."""
    if customers.is_empty():
        return empty_docs()
    rules = mapping.customers.fields
    df = apply_rules(with_derived(customers, "customers"), rules, "f_")
    prefix = mapping.customers.id_prefix
    sage = (
        sage_customers if sage_customers is not None else pl.DataFrame(schema=SAGE_CUSTOMERS_SCHEMA)
    )
    df = df.join(email_matches(customers, sage), on="id", how="left").with_columns(
        pl.col("email_candidates").fill_null(pl.lit([], pl.List(pl.String))),
        pl.col("id")
        .map_batches(
            lambda s: pl.Series([sage_customer_id(x, prefix) for x in s], dtype=pl.String),
            return_dtype=pl.String,
        )
        .alias("_new_id"),
    )
    by_metadata = pl.col("sage_customer_id").is_not_null()
    n = pl.col("email_candidates").list.len()
    by_email = ~by_metadata & (n == 1)
    ambiguous = ~by_metadata & (n > 1)
    linked = by_metadata | by_email
    payload_fields = [pl.col(f"f_{name}").alias(name) for name in rules]
    df = df.with_columns(
        pl.when(linked)
        .then(pl.lit("customer_link"))
        .otherwise(pl.lit("customer"))
        .alias("doc_type"),
        pl.struct(
            pl.when(by_metadata)
            .then(pl.col("sage_customer_id"))
            .when(by_email)
            .then(pl.col("email_candidates").list.first())
            .otherwise(pl.col("_new_id"))
            .alias("customer_id"),
            *payload_fields,
            pl.col("id").alias("reference"),
            pl.when(by_metadata)
            .then(pl.lit("metadata"))
            .when(by_email)
            .then(pl.lit("email"))
            .otherwise(pl.lit("created"))
            .alias("_matched_by"),
        ).alias("payload"),
        pl.when(ambiguous)
        .then(
            pl.format(
                "ambiguous email {}: Sage customers {} all have it; set metadata.sage_customer_id "
                "on the Stripe customer to choose",
                pl.col("email"),
                pl.col("email_candidates").list.join(" and "),
            )
        )
        .when(linked)
        .then(None)
        .otherwise(join_errors())
        .alias("error"),
    )
    return _docs(df.with_columns(pl.lit([], pl.List(pl.String)).alias("depends_on")))


def plan_customer_updates(changed: pl.DataFrame, mapping: Mapping) -> pl.DataFrame:
    """Stripe-side changes to customers already in Sage (a deleted one becomes inactive).
    The key carries a hash of the mapped values, so the same values are never planned twice;
    the loader sends only the fields that differ from Sage's current record."""
    if changed.is_empty():
        return empty_docs()
    rules = {k: v for k, v in mapping.customers.fields.items() if k != "currency"}
    df = apply_rules(with_derived(changed, "customers"), rules, "f_")
    body = pl.struct(*[pl.col(f"f_{name}").alias(name) for name in rules])
    if "last_sent" in df.columns:  # skip when the mapped values are what Sage got last time
        last = pl.col("last_sent").str.json_decode(pl.Struct({name: pl.String for name in rules}))
        df = df.filter(last.is_null() | (last.struct.json_encode() != body.struct.json_encode()))
        if df.is_empty():
            return empty_docs()
    df = df.with_columns(
        pl.lit("customer_update").alias("doc_type"),
        pl.concat_str(
            [
                pl.col("id"),
                pl.lit(":"),
                body.struct.json_encode().hash().cast(pl.String).str.slice(0, 12),
            ]
        ).alias("update_key"),
        pl.struct(
            pl.concat_str([pl.lit("@xref:customer:"), pl.col("id")]).alias("customer_id"),
            *[pl.col(f"f_{name}").alias(name) for name in rules],
        ).alias("payload"),
        pl.concat_list([pl.concat_str([pl.lit("customer:"), pl.col("id")])]).alias("depends_on"),
        join_errors().alias("error"),
    )
    return _docs(df, key_col="update_key")


# -- charges -----------------------------------------------------------------------------
def captured(df: pl.DataFrame) -> pl.Expr:
    """Money exists: the charge was captured. An authorization not captured yet plans
    nothing (it is planned when a later run sees it captured); one that expired or was
    released stays uncaptured and plans nothing ever. Rows staged before the column
    existed (null) were captured: Stripe gave them a balance transaction."""
    if "captured" not in df.columns:
        return pl.lit(True)
    return pl.col("captured").fill_null(True)


def classify_charges(charges: pl.DataFrame, invoice_payments: pl.DataFrame) -> pl.DataFrame:
    """Succeeded, captured charges, each with the Stripe invoice it paid (if any)."""
    paid = charges.filter((pl.col("status") == "succeeded") & pl.col("paid") & captured(charges))
    links = (
        invoice_payments.filter(pl.col("status") == "paid")
        .select(pl.col("charge").alias("id"), pl.col("invoice").alias("paid_invoice"))
        .unique(subset="id")
    )
    return paid.join(links, on="id", how="left")


def refunded_invoices(invoice_payments: pl.DataFrame, invoices: pl.DataFrame) -> pl.DataFrame:
    """Per charge that paid a Stripe invoice (a paid invoice payment): the invoice and its
    Stripe number (null until staged), for the reason of a refund of that charge."""
    paid = invoice_payments.filter(pl.col("status") == "paid").select("charge", "invoice")
    numbers = invoices.select(
        pl.col("id").alias("invoice"), pl.col("number").alias("invoice_number")
    )
    return (
        paid.join(numbers, on="invoice", how="left")
        .sort("charge", "invoice")
        .unique(subset="charge", keep="first", maintain_order=True)
    )


def with_settlement(
    df: pl.DataFrame, bts: pl.DataFrame, bt_col: str, sign: int = 1
) -> pl.DataFrame:
    """Attach the balance transaction's settlement amount/currency/rate (docs/accounting.md)."""
    b = bts.select(
        pl.col("id").alias(bt_col),
        (pl.col("amount") * sign).alias("settlement_amount"),
        pl.col("currency").alias("settlement_currency"),
        pl.col("exchange_rate"),
    )
    return df.join(b, on=bt_col, how="left")


def plan_charges(
    charges: pl.DataFrame,
    bts: pl.DataFrame,
    invoice_payments: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    known_orders: Iterable[str] | None = None,
    *,
    written_off: pl.DataFrame | None = None,
    payment_shares: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Each succeeded, captured charge → a Sage invoice (or its ERP sales order's invoice) +
    a cash receipt applied to it; a charge that paid a Stripe Billing invoice → just the
    receipt, applied to that invoice's Sage document. Amounts in the settlement currency.

    A charge that paid (part of) an invoice in a currency that is not a settlement currency
    (``payment_shares``: ``fx.invoice_payment_shares``) receipts its share of the invoice at
    the rate the invoice was booked at, and a journal moves what Stripe settled beyond that
    share between Stripe Clearing and Realized FX gain/loss — clearing still moves by exactly
    the charge's ``bt.amount`` and the invoice is left with nothing open once fully paid.

    A charge without a Stripe customer posts to the mapping's guest customer. With
    ``known_orders`` (the ``metadata.erp_order_id`` values Sage has a sales order for), a
    charge naming an order Sage does not have posts its receipt on account (no invoice, no
    ``apply_to``) and is flagged (``charges.unknown_erp_order: on_account``), or is a planning
    error (``reject``); ``None`` means not checked (every order taken as known).

    A charge that paid an invoice after it was written off (``written_off``: ``id``,
    ``marked_uncollectible_at`` of such invoices) is a recovery: no receipt (the invoice's
    balance is gone), a journal Stripe Clearing Dr / Bad Debt Cr for what Stripe collected
    (``journal_entry:recovery:<ch_…>``), after the write-off memo."""
    df = classify_charges(charges, invoice_payments)
    if df.is_empty():
        return empty_docs()
    if written_off is not None and not written_off.is_empty():
        df = df.join(
            written_off.select(
                pl.col("id").alias("paid_invoice"),
                pl.col("marked_uncollectible_at").alias("_written_off_at"),
            ),
            on="paid_invoice",
            how="left",
        ).with_columns(
            (
                pl.col("_written_off_at").is_not_null()
                & (pl.col("_written_off_at") <= pl.col("created"))
            )
            .fill_null(False)
            .alias("_recovery")
        )
    else:
        df = df.with_columns(pl.lit(False).alias("_recovery"))
    # Checkout (plan/orders.py): the goods session a charge paid (only its receipt posts,
    # applied to the order's invoice), or why it waits for one. Absent: neither.
    for col in ("order_session", "session_wait"):
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias(col))
    df = with_settlement(df, bts, "balance_transaction").with_columns(
        presentment(pl.col("amount"), pl.col("currency"), pl.col("exchange_rate")).alias(
            "presentment"
        ),
        local_date(pl.col("created"), mapping.timezone).alias("doc_date"),
    )
    # A payment of a foreign-currency invoice: its share of the invoice at the booking rate.
    shares = (
        payment_shares if payment_shares is not None else pl.DataFrame(schema=PAYMENT_SHARE_SCHEMA)
    ).select(pl.col("charge").alias("id"), "invoice_share", "booking_currency", "share_wait")
    pays_foreign_invoice = (
        pl.col("paid_invoice").is_not_null()
        & ~pl.col("currency").str.to_uppercase().is_in(mapping.settlement_currencies)
        & pl.lit(payment_shares is not None)
    )
    df = df.join(shares, on="id", how="left").with_columns(
        pays_foreign_invoice.alias("_fx_payment"),
        pl.when(pays_foreign_invoice)
        .then(pl.col("invoice_share"))
        .otherwise(pl.col("settlement_amount"))
        .alias("receipt_amount"),
    )
    tz_clearing = mapping.accounts.clearing
    guest = mapping.charges.guest_customer_id
    df = apply_rules(
        df,
        {
            **{f"inv_{k}": v for k, v in mapping.charges.invoice.items()},
            **{f"rcp_{k}": v for k, v in mapping.charges.receipt.items()},
        },
        "",
    )
    guest_key = guest_customer_key(mapping)
    customer_key = (
        pl.when(pl.col("customer").is_not_null())
        .then(pl.concat_str([pl.lit("customer:"), pl.col("customer")]))
        .otherwise(pl.lit(guest_key, pl.String))
    )
    customer_ref = pl.concat_str([pl.lit("@xref:"), customer_key])
    erp = pl.col("erp_order_id").is_not_null()
    if known_orders is None:
        unknown_order = pl.lit(False)
    else:
        unknown_order = erp & ~pl.col("erp_order_id").is_in(sorted(set(known_orders)))
    on_account = unknown_order & pl.lit(mapping.charges.unknown_erp_order == "on_account")
    settle = money_string(pl.col("receipt_amount"), pl.col("settlement_currency"))
    missing = first_error(
        pl.col("session_wait"),
        # A succeeded charge before Stripe created its balance transaction: no amount to
        # post yet. It waits (the next run plans it again), never a POST with null money.
        pl.when(pl.col("balance_transaction").is_null()).then(
            pl.format("waiting: waiting for the balance transaction of {}", pl.col("id"))
        ),
        pl.when(pl.col("settlement_amount").is_null()).then(
            pl.format(
                "waiting: balance transaction {} of the charge is not staged",
                pl.col("balance_transaction"),
            )
        ),
        pl.when(~pl.col("settlement_currency").is_in(mapping.settlement_currencies)).then(
            pl.format(
                "settlement currency {} is not in the mapping's settlement_currencies",
                pl.col("settlement_currency"),
            )
        ),
        pl.when(pl.col("_fx_payment") & pl.col("invoice_share").is_null()).then(
            pl.coalesce(
                pl.col("share_wait"),
                pl.format(
                    "waiting: the payments of invoice {} are not staged", pl.col("paid_invoice")
                ),
            )
        ),
        pl.when(
            pl.col("_fx_payment") & (pl.col("booking_currency") != pl.col("settlement_currency"))
        ).then(
            pl.format(
                "charge settled in {} but invoice {} is booked in {}: a payment of an invoice "
                "settles in the invoice's settlement currency",
                pl.col("settlement_currency"),
                pl.col("paid_invoice"),
                pl.col("booking_currency"),
            )
        ),
        pl.when(pl.col("customer").is_null() & pl.lit(guest is None)).then(
            pl.lit("charge has no customer and the mapping sets no charges.guest_customer_id")
        ),
        pl.when(unknown_order & ~on_account).then(
            pl.format(
                "metadata.erp_order_id {}: Sage has no such sales order "
                "(charges.unknown_erp_order: reject)",
                pl.col("erp_order_id"),
            )
        ),
        join_errors(),
    )
    df = df.with_columns(
        missing.alias("error"),
        customer_ref.alias("customer_ref"),
        customer_key.alias("customer_key"),
        pl.col("settlement_currency")
        .replace_strict(tz_clearing, default=None)
        .alias("clearing_account"),
        on_account.alias("_on_account"),
    )
    base_deps = (
        pl.when(pl.col("customer_key").is_not_null())
        .then(pl.concat_list([pl.col("customer_key")]))
        .otherwise(pl.lit([], pl.List(pl.String)))
    )

    own = df.filter(
        pl.col("paid_invoice").is_null()
        & ~pl.col("_on_account")
        & pl.col("order_session").is_null()
        & pl.col("session_wait").is_null()
    )
    as_order = mapping.charges.document == "sales_order_and_invoice"
    item, item_deps = _charge_item(mapping)
    line = pl.struct(
        item.alias("item"),
        pl.col("inv_description").alias("description"),
        pl.lit("1").alias("quantity"),
        settle.alias("unit_price"),
    )
    order_key = pl.concat_str([pl.lit("sales_order:"), pl.col("id")])
    invoice_key = pl.concat_str([pl.lit("invoice:"), pl.col("id")])
    frames = []
    if as_order:
        orders = own.filter(~erp).with_columns(
            pl.lit("sales_order").alias("doc_type"),
            pl.struct(
                pl.col("customer_ref").alias("customer_id"),
                pl.col("doc_date").cast(pl.String).alias("order_date"),
                pl.col("settlement_currency").alias("currency"),
                pl.col("id").alias("reference"),
                pl.concat_list([line]).alias("lines"),
            ).alias("payload"),
            pl.concat_list([base_deps, item_deps]).alias("depends_on"),
        )
        frames.append(orders)
    invoices = own.with_columns(
        pl.lit("invoice").alias("doc_type"),
        pl.struct(
            pl.col("customer_ref").alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("invoice_date"),
            pl.col("doc_date").cast(pl.String).alias("due_date"),
            pl.col("settlement_currency").alias("currency"),
            pl.col("id").alias("reference"),
            pl.when(erp)
            .then(pl.col("erp_order_id"))
            .otherwise(
                pl.concat_str([pl.lit("@xref:"), order_key])
                if as_order
                else pl.lit(None, pl.String)
            )
            .alias("sales_order_no"),
            pl.concat_list([line]).alias("lines"),
            money_string(pl.lit(0), pl.col("settlement_currency")).alias("tax_amount"),
            settle.alias("total"),
        ).alias("payload"),
        (
            pl.concat_list(
                [
                    base_deps,
                    item_deps,
                    pl.when(~erp)
                    .then(pl.concat_list([order_key]))
                    .otherwise(pl.lit([], pl.List(pl.String))),
                ]
            )
            if as_order
            else pl.concat_list([base_deps, item_deps])
        ).alias("depends_on"),
    )
    frames.append(invoices)
    applied_key = (
        pl.when(pl.col("paid_invoice").is_not_null())
        .then(pl.concat_str([pl.lit("invoice:"), pl.col("paid_invoice")]))
        .when(pl.col("order_session").is_not_null())
        .then(pl.concat_str([pl.lit("invoice:"), pl.col("order_session")]))
        .otherwise(invoice_key)
    )
    applied = pl.concat_list(
        [
            pl.struct(
                pl.concat_str([pl.lit("@xref:"), applied_key]).alias("invoice_no"),
                settle.alias("amount"),
            )
        ]
    )
    flag = pl.when(pl.col("_on_account")).then(
        pl.format(
            "unlinked: Sage has no sales order {} (metadata.erp_order_id); receipt on account",
            pl.col("erp_order_id"),
        )
    )
    # A flagged receipt says so in its memo, where the person applying it in Sage looks.
    memo = (
        pl.when(pl.col("_on_account"))
        .then(
            pl.concat_str(
                [pl.lit("UNLINKED SO "), pl.col("erp_order_id"), pl.lit(" "), pl.col("rcp_memo")]
            ).str.slice(0, 60)
        )
        .otherwise(pl.col("rcp_memo"))
    )
    recoveries = df.filter(pl.col("_recovery"))
    if not recoveries.is_empty():
        frames.append(_recovery_journals(recoveries, base_deps, mapping))
    receipts = df.filter(~pl.col("_recovery")).with_columns(
        pl.lit("cash_receipt").alias("doc_type"),
        pl.struct(
            pl.col("customer_ref").alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("receipt_date"),
            settle.alias("amount"),
            pl.col("settlement_currency").alias("currency"),
            pl.col("rcp_payment_method").alias("payment_method"),
            pl.col("id").alias("reference"),
            pl.col("clearing_account").alias("deposit_account"),
            pl.when(pl.col("_on_account"))
            .then(applied.list.slice(0, 0))
            .otherwise(applied)
            .alias("apply_to"),
            memo.alias("memo"),
        ).alias("payload"),
        pl.when(pl.col("_on_account"))
        .then(base_deps)
        .otherwise(pl.concat_list([base_deps, pl.concat_list([applied_key])]))
        .alias("depends_on"),
        flag.alias("flag"),
    )
    frames.append(receipts)
    return pl.concat(
        [
            *(
                _docs(
                    f, mapping, periods, key_col="stripe_key" if "stripe_key" in f.columns else "id"
                )
                for f in frames
            ),
            _payment_fx_journals(df, mapping, periods),
        ]
    )


def _recovery_journals(df: pl.DataFrame, base_deps: pl.Expr, mapping: Mapping) -> pl.DataFrame:
    """Charges that collected a written-off invoice: Stripe Clearing Dr / Bad Debt Cr for the
    charge's settled amount (ACCOUNTING.md: a recovery journal, not a receipt), dated the
    charge's day, reference the charge; after the invoice's write-off memo (phase 4)."""
    from stripe_sage.plan.after_posting import WRITE_OFF_PREFIX

    cur = pl.col("settlement_currency")
    amount = pl.col("settlement_amount")
    desc = pl.format("Recovery of written-off invoice {} by {}", pl.col("paid_invoice"), "id")
    return df.with_columns(
        pl.lit("journal_entry").alias("doc_type"),
        pl.lit(4).alias("phase"),
        pl.concat_str([pl.lit("recovery:"), pl.col("id")]).alias("stripe_key"),
        journal_payload(
            mapping,
            pl.col("doc_date"),
            desc.str.slice(0, 60),
            pl.col("id"),
            cur,
            pl.concat_list(
                [
                    journal_line(pl.col("clearing_account"), amount, cur, desc.str.slice(0, 60)),
                    journal_line(
                        pl.lit(mapping.accounts.bad_debt), -amount, cur, desc.str.slice(0, 60)
                    ),
                ]
            ),
        ).alias("payload"),
        pl.concat_list(
            [
                base_deps,
                pl.concat_list(
                    [pl.concat_str([pl.lit(f"credit_memo:{WRITE_OFF_PREFIX}"), "paid_invoice"])]
                ),
            ]
        ).alias("depends_on"),
    )


def _payment_fx_journals(
    df: pl.DataFrame, mapping: Mapping, periods: pl.DataFrame | None
) -> pl.DataFrame:
    """Realized FX on a later payment of a foreign-currency invoice: its receipt applied its
    share of the invoice at the booking rate; this moves what Stripe settled beyond that
    share (its ``bt.amount`` − share) between Stripe Clearing and FX gain/loss — a gain when
    the payment settled more, a loss when less. A payment at the booking rate (an invoice's
    first) needs none."""
    fx = df.filter(
        pl.col("_fx_payment")
        & pl.col("error").is_null()
        & (pl.col("settlement_amount") != pl.col("receipt_amount"))
    )
    if fx.is_empty():
        return empty_docs()
    # Sage allows 60 characters: the charge names its invoice (Stripe's invoice_payments).
    # Its balance transaction is the reference: the charge id is its receipt's.
    return _fx_journals(
        fx,
        mapping,
        periods,
        kind="payment_fx",
        desc=pl.concat_str([pl.lit("Realized FX on payment "), pl.col("id")]),
        clearing=pl.col("clearing_account"),
        gain=pl.col("settlement_amount") - pl.col("receipt_amount"),
    )


def _fx_journals(
    fx: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None,
    *,
    kind: str,
    desc: pl.Expr,
    clearing: pl.Expr,
    gain: pl.Expr,
) -> pl.DataFrame:
    """One Realized FX journal per row of ``fx`` (``journal_entry:<kind>:<id>``, dated the
    row's ``doc_date``, reference its ``balance_transaction``): ``gain`` (settlement minor
    units, > 0 a gain, < 0 a loss) credited to ``accounts.fx_gain_loss`` and debited to
    Stripe Clearing (in that order of lines, as refunds' journals have always been)."""
    cur = pl.col("settlement_currency")
    journals = fx.with_columns(
        pl.lit("journal_entry").alias("doc_type"),
        pl.concat_str([pl.lit(f"{kind}:"), pl.col("id")]).alias("stripe_key"),
        journal_payload(
            mapping,
            pl.col("doc_date"),
            desc,
            pl.col("balance_transaction"),
            cur,
            pl.concat_list(
                [
                    journal_line(pl.lit(mapping.accounts.fx_gain_loss), -gain, cur, desc),
                    journal_line(clearing, gain, cur, desc),
                ]
            ),
        ).alias("payload"),
        pl.lit([], pl.List(pl.String)).alias("depends_on"),
    )
    return _docs(journals, mapping, periods, key_col="stripe_key")


def _charge_item(mapping: Mapping) -> tuple[pl.Expr, pl.Expr]:
    """(the item a charge's line names, the item documents it waits for): the mapping's
    ``charges.invoice.item`` rule when it sets one (that item must exist in Sage), else the
    default item, which the product plans (``item:default:<code>``) and posts first."""
    if "item" in mapping.charges.invoice:
        return pl.col("inv_item"), pl.lit([], pl.List(pl.String))
    return pl.lit(mapping.items.default_item), pl.lit([default_item_key(mapping)])


# -- Stripe Billing invoices -------------------------------------------------------------
def plan_invoices(
    invoices: pl.DataFrame,
    lines: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    tax_rates: pl.DataFrame | None = None,
    settlements: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Finalized Stripe invoices (open or paid) → Sage invoices with all their lines.

    An invoice in a currency that is not a settlement currency posts once Stripe settled the
    charge that paid it (``settlements``: ``fx.invoice_settlements``), restated in the
    settlement currency at that charge's rate (``fx.settle_foreign_invoices``); until then
    it is awaiting settlement, a wait with its due date, not an error.

    docs/accounting.md §3 "Stripe Billing, completely": every line net of its inclusive tax (unit
    prices exact to v1.1's 4 extra decimals), proration credits as negative lines,
    ``discount_amount`` = the invoice's discounts, ``tax_amount`` = all its tax (inclusive and
    exclusive) in ``tax_lines`` per Stripe tax rate (``invoice_tax``), so that Σ lines −
    discount + tax is Stripe's ``total`` exactly; anything else is a reason, not a post."""
    # Issue 19: a voided or written-off invoice still posts (its number was issued); its
    # memo (plan/after_posting.py) then takes its open balance off.
    inv = invoices.filter(pl.col("status").is_in(["open", "paid", "void", "uncollectible"]))
    if inv.is_empty():
        return empty_docs()
    inv = _with_tax_columns(inv)
    lines = _with_tax_columns(lines)
    foreign = ~pl.col("currency").is_in(mapping.settlement_currencies)
    if settlements is not None and not inv.filter(foreign).is_empty():
        settled_inv, settled_lines = settle_foreign_invoices(
            inv.filter(foreign), lines, settlements
        )
        if not settled_inv.is_empty():
            ids = settled_inv["id"]
            inv = pl.concat([inv.filter(~pl.col("id").is_in(ids.implode())), settled_inv])
            lines = pl.concat(
                [lines.filter(~pl.col("invoice").is_in(ids.implode())), settled_lines]
            )
    if "item" in mapping.invoices.line:  # a mapping's own item rule: that item must exist
        item, item_dep = pl.col("l_item"), pl.lit(None, pl.String)
    else:
        item, item_dep = line_item(pl.col("product"), mapping)
    staged = pl.col("product_staged") if "product_staged" in lines.columns else pl.lit(True)
    # Stripe's quantity kept (stock moves by it), the unit price exact to v1.1's 4 extra decimals
    quantity, unit_price = line_price_exprs(
        pl.col("_net"), pl.col("quantity"), exponent_expr(pl.col("currency"))
    )
    lines = lines.with_columns((pl.col("amount") - pl.col("tax_inclusive")).alias("_net"))
    ln = apply_rules(lines, mapping.invoices.line, "l_").with_columns(
        item.alias("_item"),
        item_dep.alias("_item_key"),
        (pl.col("product").is_not_null() & ~staged.fill_null(False)).alias("_unstaged"),
        quantity.alias("q"),
        unit_price.alias("unit_price"),
    )
    ln = (
        ln.sort("invoice", "position")
        .group_by("invoice", maintain_order=True)
        .agg(
            pl.struct(
                pl.col("_item").alias("item"),
                pl.col("l_description").alias("description"),
                pl.col("q").alias("quantity"),
                pl.col("unit_price"),
            ).alias("lines"),
            pl.col("_net").sum().alias("lines_total"),
            pl.col("_rule_errors")
            .list.explode(keep_nulls=False, empty_as_null=False)
            .alias("line_errors"),
            pl.len().alias("n_lines"),
            pl.col("_item_key").drop_nulls().unique(maintain_order=True).alias("item_keys"),
            pl.col("product")
            .filter(pl.col("_unstaged"))
            .unique(maintain_order=True)
            .alias("unstaged_products"),
        )
    )
    taxes = invoice_tax_lines(inv, tax_rates, mapping, money_string)
    df = (
        inv.join(ln, left_on="id", right_on="invoice", how="left")
        .join(taxes, on="id", how="left")
        .with_columns(
            pl.col("tax_lines").fill_null(pl.lit([], TAX_LINES_SCHEMA["tax_lines"])),
            (pl.col("tax_exclusive") + pl.col("tax_inclusive")).alias("_tax"),
        )
    )
    df = df.with_columns(
        local_date(pl.coalesce("finalized_at", "created"), mapping.timezone).alias("doc_date"),
        pl.concat_str([pl.lit("customer:"), pl.col("customer")]).alias("customer_key"),
    )
    error = first_error(
        pl.when(pl.col("n_lines").is_null()).then(pl.lit("waiting: invoice lines are not staged")),
        pl.when(pl.col("unstaged_products").list.len() > 0).then(
            pl.format(
                "waiting: product(s) {} of the lines are not staged",
                pl.col("unstaged_products").list.join(", "),
            )
        ),
        pl.when(~pl.col("currency").is_in(mapping.settlement_currencies)).then(
            pl.format(
                "waiting: awaiting settlement: {} invoice {} posts in the settlement currency "
                "when Stripe settles its payment (due {})",
                pl.col("currency"),
                pl.col("id"),
                pl.coalesce(
                    local_date(pl.col("due_date"), mapping.timezone)
                    if "due_date" in inv.columns
                    else pl.lit(None, pl.Date),
                    pl.col("doc_date"),
                ).cast(pl.String),
            )
        ),
        pl.col("tax_error"),
        pl.when(
            pl.col("lines_total") - pl.col("discount") + pl.col("_tax") != pl.col("total")
        ).then(
            pl.format(
                "lines net of inclusive tax ({}) − discounts ({}) + tax ({}) differ from the "
                "invoice total ({})",
                pl.col("lines_total"),
                pl.col("discount"),
                pl.col("_tax"),
                pl.col("total"),
            )
        ),
        pl.when(pl.col("line_errors").list.len() > 0).then(pl.col("line_errors").list.join("; ")),
    )
    df = df.with_columns(
        pl.lit("invoice").alias("doc_type"),
        pl.struct(
            pl.concat_str([pl.lit("@xref:"), pl.col("customer_key")]).alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("invoice_date"),
            pl.col("doc_date").cast(pl.String).alias("due_date"),
            pl.col("currency"),
            pl.col("id").alias("reference"),
            pl.col("lines"),
            money_string(pl.col("discount"), pl.col("currency")).alias("discount_amount"),
            money_string(pl.col("_tax"), pl.col("currency")).alias("tax_amount"),
            # absent (null) when Stripe itemised no tax: one lump tax_amount, as before
            pl.when(pl.col("tax_lines").list.len() > 0)
            .then(pl.col("tax_lines"))
            .alias("tax_lines"),
            money_string(pl.col("total"), pl.col("currency")).alias("total"),
        ).alias("payload"),
        pl.concat_list(
            [pl.col("customer_key"), pl.col("item_keys").fill_null(pl.lit([], pl.List(pl.String)))]
        ).alias("depends_on"),
        error.alias("error"),
    )
    return _docs(df, mapping, periods)


def _with_tax_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """The issue-18 columns (``discount``, ``tax_inclusive``, ``tax_exclusive``, ``taxes``) as
    zero / empty when a frame predates them (e.g. rows built by an older caller): such an
    invoice is then planned exactly as before, its ``tax`` all exclusive."""
    fill: list[pl.Expr] = []
    if "discount" not in frame.columns:
        fill.append(pl.lit(0, pl.Int64).alias("discount"))
    if "tax_inclusive" not in frame.columns:
        fill.append(pl.lit(0, pl.Int64).alias("tax_inclusive"))
    if "tax_exclusive" not in frame.columns:
        tax = pl.col("tax") if "tax" in frame.columns else pl.lit(0, pl.Int64)
        fill.append(tax.alias("tax_exclusive"))
    if "taxes" not in frame.columns:
        fill.append(pl.lit(None, TAXES_DTYPE).alias("taxes"))
    frame = frame.with_columns(fill) if fill else frame
    return frame.with_columns(
        pl.col("discount").fill_null(0),
        pl.col("tax_inclusive").fill_null(0),
        pl.col("tax_exclusive").fill_null(0),
    )


# -- refunds -----------------------------------------------------------------------------
def plan_refunds(
    refunds: pl.DataFrame,
    charges: pl.DataFrame,
    bts: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
    charge_refunds: pl.DataFrame | None = None,
    credited_refunds: Sequence[str] = (),
    refunded_invoices: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Every refund that moved money → a credit memo against Stripe Clearing; a refund that
    later failed → also a journal entry reversing it (Dr Clearing, Cr Sales Returns).

    A refund of an invoice payment without a credit note is such a memo too (the invoice
    stays paid, as in Stripe); its reason names the invoice, by its Stripe number (else its
    id): ``refunded_invoices`` (``refunded_invoices()``: charge → invoice, number).

    A refund of a foreign-currency sale reverses the sale at the charge's own rate (the memo)
    and a journal moves the rest of what it cost at the refund's rate between Stripe Clearing
    and Realized FX gain/loss (docs/accounting.md, "Foreign currency, first class").
    ``charge_refunds``: every staged refund of the same charges (earlier ones may be posted
    already); the default is ``refunds`` itself. ``credited_refunds``: refunds a credit note
    names (issue 19): they post through that note's memo only, never a second time."""
    df = refunds.filter(
        pl.col("balance_transaction").is_not_null() & ~pl.col("id").is_in(sorted(credited_refunds))
    )
    if df.is_empty():
        return empty_docs()
    ch = with_settlement(
        charges.select(
            "id",
            "customer",
            "amount",
            "currency",
            "balance_transaction",
            captured(charges).alias("_charge_captured"),
        ).rename({"id": "charge", "customer": "charge_customer"}),
        bts,
        "balance_transaction",
    ).select(
        "charge",
        "charge_customer",
        "_charge_captured",
        pl.col("amount").alias("charge_amount"),
        pl.col("currency").alias("charge_currency"),
        pl.col("settlement_amount").alias("charge_settled"),
    )
    siblings = (charge_refunds if charge_refunds is not None else refunds).filter(
        pl.col("balance_transaction").is_not_null()
    )
    sale = refund_sale_amounts(siblings, ch)
    df = (
        df.join(ch.with_columns(pl.lit(True).alias("_charge_found")), on="charge", how="left")
        .join(sale, on="id", how="left")
        .filter(
            # Releasing an authorization that was never captured refunds no money.
            pl.col("_charge_captured").fill_null(True)
        )
    )
    if df.is_empty():
        return empty_docs()
    guest_key = guest_customer_key(mapping)
    df = with_settlement(df, bts, "balance_transaction", sign=-1).with_columns(
        presentment(pl.col("amount"), pl.col("currency"), pl.col("exchange_rate")).alias(
            "presentment"
        ),
        local_date(pl.col("created"), mapping.timezone).alias("doc_date"),
        # A refund of a guest charge credits the guest customer the charge was posted to.
        pl.when(pl.col("charge_customer").is_not_null())
        .then(pl.concat_str([pl.lit("customer:"), pl.col("charge_customer")]))
        .otherwise(pl.lit(guest_key, pl.String))
        .alias("customer_key"),
    )
    # A sale in another currency than it settled in: the memo reverses it at the charge's
    # rate, the FX journal takes the difference (a tiny refund whose share rounds to nothing
    # stays whole in the memo).
    fx = (pl.col("charge_currency") != pl.col("settlement_currency")) & (
        pl.col("sale_amount").fill_null(0) > 0
    )
    df = df.with_columns(
        fx.fill_null(False).alias("_fx"),
        pl.when(fx)
        .then(pl.col("sale_amount"))
        .otherwise(pl.col("settlement_amount"))
        .alias("memo_amount"),
    ).with_columns(
        (pl.col("settlement_amount") - pl.col("memo_amount")).alias("fx_difference"),
    )
    df = apply_rules(df, mapping.refunds.credit_memo, "m_")
    clearing = pl.col("settlement_currency").replace_strict(mapping.accounts.clearing, default=None)
    error = first_error(
        pl.when(pl.col("_charge_found").is_null()).then(
            pl.format("waiting: refund's charge {} is not staged", pl.col("charge"))
        ),
        pl.when(
            pl.col("_charge_found")
            & pl.col("charge_settled").is_null()
            & (pl.col("charge_currency") != pl.col("settlement_currency"))
        ).then(
            pl.format(
                "waiting: the balance transaction of the refund's charge {} is not staged "
                "(its rate converts the sale back)",
                pl.col("charge"),
            )
        ),
        pl.when(pl.col("customer_key").is_null()).then(
            pl.format(
                "refund's charge {} has no customer to credit and the mapping sets no "
                "charges.guest_customer_id",
                pl.col("charge"),
            )
        ),
        pl.when(pl.col("settlement_amount").is_null()).then(
            pl.format(
                "waiting: balance transaction {} of the refund is not staged",
                pl.col("balance_transaction"),
            )
        ),
        join_errors(),
    )
    settle = money_string(pl.col("memo_amount"), pl.col("settlement_currency"))
    df = df.with_columns(error.alias("error"))
    if refunded_invoices is None or refunded_invoices.is_empty():
        df = df.with_columns(pl.lit(None, pl.String).alias("_invoice_name"))
    else:
        names = refunded_invoices.select(
            "charge", pl.coalesce("invoice_number", "invoice").alias("_invoice_name")
        ).unique(subset="charge", keep="first", maintain_order=True)
        df = df.join(names, on="charge", how="left")
    # The invoice's name is never cut off: what is before it is shortened to fit 60.
    invoice_part = pl.concat_str([pl.lit(", invoice "), pl.col("_invoice_name")])
    said = pl.concat_str([pl.col("m_reason"), pl.lit(" "), pl.col("presentment")])
    reason = (
        pl.when(pl.col("_invoice_name").is_not_null())
        .then(
            pl.concat_str(
                [said.str.slice(0, pl.lit(60) - invoice_part.str.len_chars()), invoice_part]
            )
        )
        .otherwise(said)
        .str.slice(0, 60)
    )
    memos = df.with_columns(
        pl.lit("credit_memo").alias("doc_type"),
        pl.struct(
            pl.concat_str([pl.lit("@xref:"), pl.col("customer_key")]).alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("memo_date"),
            settle.alias("amount"),
            pl.col("settlement_currency").alias("currency"),
            pl.col("id").alias("reference"),
            reason.alias("reason"),
            clearing.alias("gl_account"),
        ).alias("payload"),
        pl.concat_list([pl.col("customer_key")]).alias("depends_on"),
    )
    failed = df.filter(pl.col("failure_balance_transaction").is_not_null())
    frames = [_docs(memos, mapping, periods), _refund_fx_journals(df, mapping, periods)]
    if not failed.is_empty():
        fb = bts.select(
            pl.col("id").alias("failure_balance_transaction"),
            pl.col("amount").alias("failure_amount"),
            local_date(pl.col("created"), mapping.timezone).alias("failure_date"),
        )
        failed = failed.join(fb, on="failure_balance_transaction", how="left")
        cur = pl.col("settlement_currency")
        desc = pl.concat_str([pl.lit("Refund failed "), pl.col("id")])
        # The money came back: clearing gets what the failure returned, Sales Returns loses
        # what the memo booked, and FX gain/loss takes back any difference between the two.
        back = pl.col("failure_amount") - pl.col("memo_amount")
        journals = failed.with_columns(
            pl.lit("journal_entry").alias("doc_type"),
            pl.concat_str([pl.lit("refund_failure:"), pl.col("id")]).alias("stripe_key"),
            journal_payload(
                mapping,
                pl.col("failure_date"),
                desc,
                pl.col("id"),
                cur,
                pl.concat_list(
                    [
                        journal_line(clearing, pl.col("failure_amount"), cur, desc),
                        journal_line(
                            pl.lit(mapping.accounts.sales_returns),
                            -pl.col("memo_amount"),
                            cur,
                            desc,
                        ),
                    ]
                ).list.concat(
                    pl.when(back != 0)
                    .then(
                        pl.concat_list(
                            [journal_line(pl.lit(mapping.accounts.fx_gain_loss), -back, cur, desc)]
                        )
                    )
                    .otherwise(pl.lit([], pl.List(JOURNAL_LINE)))
                ),
            ).alias("payload"),
            pl.lit([], pl.List(pl.String)).alias("depends_on"),
            first_error(
                pl.when(pl.col("failure_amount").is_null()).then(
                    pl.format(
                        "waiting: failure balance transaction {} is not staged",
                        pl.col("failure_balance_transaction"),
                    )
                )
            ).alias("error"),
        )
        frames.append(
            _docs(
                journals.with_columns(pl.col("failure_date").alias("doc_date")),
                mapping,
                periods,
                key_col="stripe_key",
            )
        )
    return pl.concat(frames)


def refund_sale_amounts(refunds: pl.DataFrame, charges: pl.DataFrame) -> pl.DataFrame:
    """``id`` → ``sale_amount``: the part of its charge's settled gross each refund reverses,
    at the charge's own rate, in settlement minor units. Cumulative, so the refunds of one
    charge add up to exactly its settled gross once it is fully refunded (the last partial
    refund takes the rounding remainder): share(n) = round(Σ refunded to n × settled / amount)
    − round(Σ refunded before n × settled / amount), half-up. Null where the charge's
    settlement is not staged."""
    if refunds.is_empty():
        return pl.DataFrame(schema={"id": pl.String, "sale_amount": pl.Int64})
    df = (
        refunds.select("id", "charge", "created", pl.col("amount").cast(pl.Int64))
        .join(charges.select("charge", "charge_amount", "charge_settled"), on="charge", how="left")
        .sort("charge", "created", "id")
        .with_columns(pl.col("amount").cum_sum().over("charge").alias("_to"))
    )
    a, settled = pl.col("charge_amount").cast(pl.Int64), pl.col("charge_settled").cast(pl.Int64)

    def share(refunded: pl.Expr) -> pl.Expr:  # round-half-up(refunded x settled / a)
        return (2 * refunded * settled + a) // (2 * a)

    return df.select(
        "id",
        pl.when(a > 0)
        .then(share(pl.col("_to")) - share(pl.col("_to") - pl.col("amount")))
        .otherwise(None)
        .alias("sale_amount"),
    )


JOURNAL_LINE = pl.Struct(
    {"account": pl.String, "debit": pl.String, "credit": pl.String, "description": pl.String}
)


def journal_line(account: pl.Expr, signed: pl.Expr, currency: pl.Expr, desc: pl.Expr) -> pl.Expr:
    """One journal line: a positive ``signed`` amount is a debit, a negative one a credit."""
    zero = money_string(pl.lit(0), currency)
    return pl.struct(
        account.alias("account"),
        pl.when(signed > 0).then(money_string(signed, currency)).otherwise(zero).alias("debit"),
        pl.when(signed < 0).then(money_string(-signed, currency)).otherwise(zero).alias("credit"),
        desc.alias("description"),
    )


def journal_payload(
    mapping: Mapping,
    date: pl.Expr,
    desc: pl.Expr,
    reference: pl.Expr,
    currency: pl.Expr,
    lines: pl.Expr,
) -> pl.Expr:
    """A Sage journal entry's payload (source code from the mapping; ``lines`` of
    ``journal_line``)."""
    return pl.struct(
        date.cast(pl.String).alias("entry_date"),
        pl.lit(mapping.source_code).alias("source_code"),
        desc.alias("description"),
        reference.alias("reference"),
        currency.alias("currency"),
        lines.alias("lines"),
    )


def _refund_fx_journals(
    df: pl.DataFrame, mapping: Mapping, periods: pl.DataFrame | None
) -> pl.DataFrame:
    """Realized FX on refunds of foreign-currency sales: the memo reversed the sale at the
    charge's rate; this moves the difference to what the refund cost (its balance
    transaction) between Stripe Clearing and FX gain/loss, so clearing moves by exactly the
    refund's ``bt.amount`` and a full refund leaves net sales where they were."""
    fx = df.filter(pl.col("_fx") & (pl.col("fx_difference") != 0) & pl.col("error").is_null())
    if fx.is_empty():
        return empty_docs()
    # > 0: the refund cost more than the sale brought in (a loss). Its own balance
    # transaction is the reference: the refund id is the memo's and, when it fails, the
    # reversing journal's (Sage finds documents by reference).
    return _fx_journals(
        fx,
        mapping,
        periods,
        kind="refund_fx",
        desc=pl.concat_str([pl.lit("Realized FX on refund "), pl.col("id")]),
        clearing=pl.col("settlement_currency").replace_strict(
            mapping.accounts.clearing, default=None
        ),
        gain=-pl.col("fx_difference"),
    )


# -- closed periods ----------------------------------------------------------------------
DATE_FIELDS = {
    "invoice": "invoice_date",
    "cash_receipt": "receipt_date",
    "credit_memo": "memo_date",
    "journal_entry": "entry_date",
}
MEMO_FIELDS = {"cash_receipt": "memo", "credit_memo": "reason", "journal_entry": "description"}


def periods_frame(periods: list[dict[str, object]]) -> pl.DataFrame:
    """Sage fiscal periods with, for each, the first day of the next open period after it."""
    df = (
        pl.DataFrame(periods, schema_overrides={"start": pl.String, "end": pl.String})
        .select(
            pl.col("start").str.to_date(),
            pl.col("end").str.to_date(),
            pl.col("status"),
            pl.format("{}-{}", pl.col("year"), pl.col("period").cast(pl.String).str.zfill(2)).alias(
                "period_name"
            ),
        )
        .sort("start")
    )
    open_start = pl.when(pl.col("status") == "open").then(pl.col("start"))
    return df.with_columns(open_start.shift(-1).backward_fill().alias("next_open"))


def adjust_for_periods(
    df: pl.DataFrame, doc_type: str, mapping: Mapping, periods: pl.DataFrame
) -> pl.DataFrame:
    """Apply the closed-period policy to dated documents: re-date to the next open period
    (original date kept in the memo) or dead-letter. Never silently dropped."""
    date_field = DATE_FIELDS[doc_type]
    memo_field = MEMO_FIELDS.get(doc_type)
    p = periods.rename({c: f"_p_{c}" for c in periods.columns})
    df = df.sort("doc_date").join_asof(
        p, left_on="doc_date", right_on="_p_start", strategy="backward"
    )
    closed = (
        pl.col("_p_end").is_null()
        | (pl.col("doc_date") > pl.col("_p_end"))
        | (pl.col("_p_status") != "open")
    )
    note = pl.format(" (orig {}, period closed)", pl.col("doc_date"))
    if mapping.closed_period_policy == "next_open":
        eff = pl.when(closed).then(pl.col("_p_next_open")).otherwise(pl.col("doc_date"))
        err = pl.when(closed & pl.col("_p_next_open").is_null()).then(
            pl.format(
                "{} {} falls in a closed period and no later period is open",
                pl.lit(date_field),
                pl.col("doc_date"),
            )
        )
    else:
        eff = pl.col("doc_date")
        err = pl.when(closed).then(
            pl.format(
                "{} {} falls in closed fiscal period {} (policy dead_letter)",
                pl.lit(date_field),
                pl.col("doc_date"),
                pl.col("_p_period_name"),
            )
        )
    fields = [eff.cast(pl.String).alias(date_field)]
    if doc_type == "invoice":
        fields.append(
            pl.when(closed & pl.lit(mapping.closed_period_policy == "next_open"))
            .then(eff)
            .otherwise(pl.col("doc_date"))
            .cast(pl.String)
            .alias("due_date")
        )
    if memo_field and mapping.closed_period_policy == "next_open":
        memo = pl.col("payload").struct.field(memo_field).fill_null("")
        # Sage memos hold 60 characters: shorten the memo, never the note with the date.
        room = pl.lit(60, pl.Int64) - note.str.len_chars().cast(pl.Int64)
        fields.append(
            pl.when(closed)
            .then(pl.concat_str([memo.str.slice(0, room).str.strip_chars(), note]))
            .otherwise(pl.col("payload").struct.field(memo_field))
            .alias(memo_field)
        )
    return df.with_columns(
        pl.col("payload").struct.with_fields(*fields),
        pl.coalesce(pl.col("error"), err).alias("error"),
    ).drop([f"_p_{c}" for c in periods.columns])


def _docs(
    df: pl.DataFrame,
    mapping: Mapping | None = None,
    periods: pl.DataFrame | None = None,
    key_col: str = "id",
) -> pl.DataFrame:
    """Apply the period policy, render payloads as JSON, project onto DOC_SCHEMA."""
    if df.is_empty():
        return empty_docs()
    doc_type = df["doc_type"][0]
    if (
        periods is not None
        and mapping is not None
        and doc_type in DATE_FIELDS
        and "doc_date" in df.columns
    ):
        df = adjust_for_periods(df, doc_type, mapping, periods)
    return df.select(
        pl.concat_str([pl.col("doc_type"), pl.lit(":"), pl.col(key_col)]).alias("doc_key"),
        pl.col("doc_type"),
        pl.col("doc_type").replace_strict(COLLECTIONS, return_dtype=pl.String).alias("collection"),
        (
            pl.col("phase").cast(pl.Int32)
            if "phase" in df.columns
            else pl.col("doc_type").replace_strict(PHASES, return_dtype=pl.Int32)
        ).alias("phase"),
        pl.col(key_col).alias("stripe_id"),
        pl.col("depends_on").cast(pl.List(pl.String)),
        pl.col("payload").struct.json_encode(),
        pl.coalesce(pl.col("error").cast(pl.String), missing_required(df, key_col)).alias("error"),
        (pl.col("flag").cast(pl.String) if "flag" in df.columns else pl.lit(None, pl.String)).alias(
            "flag"
        ),
    )


# Fields Sage requires that come from Stripe amounts: null there is a planning error naming
# the record, never a POST (an uncaptured charge once went out with total and currency null).
REQUIRED_FIELDS = {
    "customer": ("name", "currency"),
    "sales_order": ("currency",),
    "invoice": ("currency", "total"),
    "cash_receipt": ("currency", "amount"),
    "credit_memo": ("currency", "amount"),
    "journal_entry": ("currency",),
}


def missing_required(df: pl.DataFrame, key_col: str) -> pl.Expr:
    """'cash_receipt for ch_…: amount is null …' when a required field of the payload is
    null (the first one), else null."""
    fields = df.schema["payload"]
    names = {f.name for f in fields.fields} if isinstance(fields, pl.Struct) else set()
    # Per row: one frame may hold several document types (customers and customer links).
    checks = [
        pl.when(
            (pl.col("doc_type") == doc_type) & pl.col("payload").struct.field(f).is_null()
        ).then(
            pl.format(
                "{} for {}: required field {} would be null (its Stripe source has no value "
                "yet); not posted",
                pl.col("doc_type"),
                pl.col(key_col),
                pl.lit(f),
            )
        )
        for doc_type in df["doc_type"].unique().to_list()
        for f in REQUIRED_FIELDS.get(doc_type, ())
        if f in names
    ]
    return pl.coalesce(checks) if checks else pl.lit(None, pl.String)
