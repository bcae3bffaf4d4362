"""Stripe Billing invoices → Sage invoices (``plan_invoices``).

A finalized invoice (open, paid, void or uncollectible) becomes a Sage invoice with all its
lines, discounts and tax; one in a currency that is not a settlement currency posts once
Stripe settled its payment, restated at that rate. What follows a posted invoice (credit
notes, voids, write-offs, credit balances) is in ``after_posting``; the invoice of a charge
that paid no Stripe invoice in ``cash_receipts``. ``select_inputs`` reads what a slice of
invoices is planned from.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.documents import (
    _docs,
    apply_rules,
    empty_docs,
    exponent_expr,
    first_error,
    local_date,
    money_string,
)
from stripe_sage.plan.fx import invoice_settlements, settle_foreign_invoices
from stripe_sage.plan.invoice_tax import TAX_LINES_SCHEMA, TAXES_DTYPE, invoice_tax_lines
from stripe_sage.plan.item_codes import line_item
from stripe_sage.plan.line_amounts import with_line_prices
from stripe_sage.store.staging import Staging, not_quarantined


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
    lines = lines.with_columns((pl.col("amount") - pl.col("tax_inclusive")).alias("_net"))
    # Stripe's quantity kept (stock moves by it), the unit price exact to v1.1's 4 extra decimals
    ln = with_line_prices(
        apply_rules(lines, mapping.invoices.line, "l_"),
        pl.col("_net"),
        pl.col("quantity"),
        exponent_expr(pl.col("currency")),
        quantity_as="q",
        price_as="unit_price",
    ).with_columns(
        item.alias("_item"),
        item_dep.alias("_item_key"),
        (pl.col("product").is_not_null() & ~staged.fill_null(False)).alias("_unstaged"),
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


# -- selection: the staged rows a slice of invoices is planned from -----------------------
@dataclass(frozen=True)
class InvoiceInputs:
    """What ``plan_invoices`` plans one slice of invoices from (with the tax rates)."""

    lines: pl.DataFrame  # their unquarantined lines, with product_staged
    settlements: pl.DataFrame  # what Stripe settled for the charges that paid them (plan/fx.py)


def select_inputs(st: Staging, invoices: pl.DataFrame) -> InvoiceInputs:
    """The staged rows a slice of ``invoices`` is planned from, read while the slice is
    registered as ``_plan_slice``."""
    with st.registered("_plan_slice", invoices.select("id")):
        lines = st.frame(
            # product_staged: a line's item comes from its product (see plan/items.py).
            "SELECT s.*, s.product IN (SELECT id FROM staging.products) AS product_staged "
            "FROM staging.invoice_lines s "
            "WHERE s.invoice IN (SELECT id FROM _plan_slice) AND "
            + not_quarantined("invoice_lines")
        )
        # What Stripe settled for the charges that paid the slice's invoices: a foreign-
        # currency invoice posts at that (plan/fx.py).
        payments = st.frame(
            "SELECT p.* FROM staging.invoice_payments p "
            "WHERE p.invoice IN (SELECT id FROM _plan_slice)"
        )
        paying, paying_bts = paying_charges(st, payments)
    return InvoiceInputs(lines=lines, settlements=invoice_settlements(payments, paying, paying_bts))


def paying_charges(st: Staging, payments: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The staged charges behind ``payments`` (invoice payments) and their balance
    transactions: what a foreign-currency invoice's rate and shares come from (plan/fx.py)."""
    with st.registered("_paying", payments.select("charge")):
        paying = st.frame(
            "SELECT c.* FROM staging.charges c WHERE c.id IN (SELECT charge FROM _paying)"
        )
        paying_bts = st.frame(
            "SELECT b.* FROM staging.balance_transactions b WHERE b.id IN "
            "(SELECT c.balance_transaction FROM staging.charges c "
            "WHERE c.id IN (SELECT charge FROM _paying))"
        )
    return paying, paying_bts
