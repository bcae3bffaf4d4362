"""What every planner shares: the planned-document frame and the expressions that build it.

The planners are the modules beside this one, each named after the Sage documents it makes:
``customers`` (Stripe customers → Sage customers), ``cash_receipts`` (where a Stripe charge
becomes a Sage cash receipt: ``plan_charges``), ``invoices`` (Stripe Billing invoices → Sage
invoices), ``credit_memos`` (Stripe refunds → Sage credit memos), ``after_posting`` (what
follows a posted invoice), ``orders`` (Checkout → sales orders) and ``items``. A family's
selection sits beside its planner (e.g. ``cash_receipts.select_inputs``: the staged rows a
slice of charges is planned from); ``outbox`` slices the rows still to plan and calls both.
Every planner is ``DataFrame(s) → DataFrame``, built from expressions (no row loops), with
money kept in integer minor units until ``money_string`` renders the payload. The output of
every planner has the columns of ``DOC_SCHEMA``: one row per Sage document, its JSON payload
(with ``@xref:<doc_key>`` placeholders the loader resolves to Sage numbers), the documents
it depends on, and ``error`` — a clear reason when the record cannot become a valid document
(it is then dead-lettered instead of posted), or, prefixed ``waiting:``, what it still waits
for (a balance transaction not staged yet): such documents are planned again by the next
run.

This module keeps only what the planners share: ``DOC_SCHEMA`` and ``_docs`` (the projection
onto it, with the closed-period policy and the required fields), money and date expressions,
the mapping's field rules, a balance transaction's settlement columns, and journal entries.
"""

from __future__ import annotations

import polars as pl

from stripe_sage.mapping import DERIVED_COLUMNS, TEMPLATE_FIELD, FieldRule, Mapping
from stripe_sage.money import KNOWN_CURRENCIES, THREE_DECIMAL, ZERO_DECIMAL

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


# -- settlement (charges and refunds) ----------------------------------------------------
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


# -- journal entries ---------------------------------------------------------------------
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
