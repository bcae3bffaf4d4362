"""Checkout orders (issue 17): a completed Stripe Checkout Session for goods → a Sage sales
order with one line per Stripe line item, then the invoice of that order; the charge that paid
the session posts only its cash receipt, applied to that invoice (``plan_charges`` with the
``order_session`` column this module adds to the charges).

- A goods session is ``mode = payment``, ``status = complete``, created without
  ``invoice_creation`` (a session with it posts through its Billing invoice, as any invoice).
- Its documents are keyed by the session id (``sales_order:cs_…``, ``invoice:cs_…``) and
  reference the payment intent (``pi_…``): a session id is longer than Sage's 30 characters.
- Lines: the product's item (as Billing lines: ``item_codes.line_item``), Stripe's quantity, the
  unit price net of tax (an inclusive tax is subtracted; ``line_amounts.with_line_prices`` keeps
  the extension exact), the line's description; shipping is a line of the mapping's shipping
  item. The session's discount is the invoice's ``discount_amount`` (Sage v1.1, as on Billing
  invoices); the sales order carries the lines before it (Sage's sales order has no discount
  field, and its lines may not be negative). The invoice's ``tax_amount`` is the session's
  tax, so lines − discount + tax = the session's ``amount_total``.

Which charges wait for a session (:func:`link_charges_to_sessions`): a charge carries no
marker of a session of its own, so its payment intent is looked for among the staged
sessions. When none names it, the charge is a standalone sale once Stripe has been asked —
the ``checkout_sessions`` stream has been listed (with its events) up to the charge's own
``created`` (a session always exists before the charge that pays it), or its payment intent
was looked up on Stripe by the webhook path (``staging.checkout_lookups``). Until then it
waits, with a reason.

A session listed while still open names no payment intent yet, and it completes moments
after its charge: a run can read the charge and the open session but not the completion.
So a charge made while a payment-mode session created within the day before it (a session
expires after 24 hours) was staged open counts as asked only once sessions (and their
events) were read ``orders.completion_grace_seconds`` after the charge; until then it waits,
naming the open session.
"""

from __future__ import annotations

import datetime as dt

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.customers import guest_customer_key
from stripe_sage.plan.documents import (
    _docs,
    empty_docs,
    exponent_expr,
    first_error,
    local_date,
    money_string,
)
from stripe_sage.plan.item_codes import line_item
from stripe_sage.plan.line_amounts import with_line_prices
from stripe_sage.store.staging import Staging, not_quarantined

# Sessions expire 24 hours after they are created: an older open one cannot be this charge's.
SESSION_LIFETIME = dt.timedelta(days=1)

OPEN_SESSION_SCHEMA: dict[str, pl.DataType] = {
    "open_session": pl.String(),
    "open_created": pl.Datetime("us", "UTC"),
}

SESSION_LINK_SCHEMA: dict[str, pl.DataType] = {
    "payment_intent": pl.String(),
    "session": pl.String(),
    "session_status": pl.String(),
    "session_goods": pl.Boolean(),
}


def goods_session() -> pl.Expr:
    """A session that is an order of goods: paid in Checkout, not through a Billing invoice."""
    return (pl.col("mode") == "payment") & ~pl.col("invoice_creation").fill_null(False)


def shipping_item_key(mapping: Mapping) -> str:
    """The doc key of the shipping item (planned like the default item)."""
    return f"item:default:{mapping.items.shipping_item}"


def plan_order_items(mapping: Mapping) -> pl.DataFrame:
    """The shipping item, created by the loader when Sage lacks it (linked when it has it),
    planned when a slice of orders first needs it."""
    items = mapping.items
    codes = [(items.shipping_item, items.shipping_description)]
    df = pl.DataFrame(
        {
            "id": [f"default:{code}" for code, _ in codes],
            "doc_type": ["item"] * len(codes),
            "payload": [
                {"item": code, "description": desc, "type": "service"} for code, desc in codes
            ],
        }
    ).unique(subset="id", keep="first", maintain_order=True)
    return _docs(
        df.with_columns(
            pl.lit([], pl.List(pl.String)).alias("depends_on"),
            pl.lit(None, pl.String).alias("error"),
        )
    )


def link_charges_to_sessions(
    charges: pl.DataFrame,
    sessions: pl.DataFrame,
    looked_up: pl.DataFrame,
    sessions_read_until: dt.datetime | None,
    mapping: Mapping,
    open_sessions: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """``charges`` with ``order_session`` (the goods session the charge paid: it posts only
    its receipt, applied to that session's invoice) and ``session_wait`` (a ``waiting:``
    reason while the charge may still belong to a session not staged or not complete).

    ``sessions``: staged sessions naming the charges' payment intents (SESSION_LINK_SCHEMA);
    ``looked_up``: payment intents Stripe was asked about (column ``payment_intent``);
    ``sessions_read_until``: how far the ``checkout_sessions`` stream has been listed;
    ``open_sessions``: staged payment-mode sessions still open (OPEN_SESSION_SCHEMA) created
    up to a day before the charges (module docstring)."""
    if not mapping.orders.enabled or charges.is_empty():
        return charges.with_columns(
            pl.lit(None, pl.String).alias("order_session"),
            pl.lit(None, pl.String).alias("session_wait"),
        )
    s = sessions.unique(subset="payment_intent", keep="first")
    df = charges.join(s, on="payment_intent", how="left").join(
        looked_up.select("payment_intent").unique().with_columns(pl.lit(True).alias("_asked")),
        on="payment_intent",
        how="left",
    )
    df = _latest_open_session(df, open_sessions)
    goods = pl.col("session_goods").fill_null(False)
    complete = pl.col("session_status") == "complete"
    grace = dt.timedelta(seconds=mapping.orders.completion_grace_seconds)
    if sessions_read_until is None:
        listed = pl.lit(False)
        listed_late = pl.lit(False)
    else:
        until = pl.lit(sessions_read_until).cast(charges.schema["created"])
        listed = pl.col("created") <= until
        listed_late = (pl.col("created") + pl.lit(grace)) <= until
    maybe_unread = (
        pl.col("payment_intent").is_not_null()
        & pl.col("session").is_null()
        & ~pl.col("_asked").fill_null(False)
    )
    unknown = maybe_unread & ~listed
    # Read up to the charge, but a session was open then: its completion may not be read yet.
    completing = maybe_unread & listed & pl.col("open_session").is_not_null() & ~listed_late
    return df.with_columns(
        pl.when(goods & complete).then(pl.col("session")).alias("order_session"),
        pl.when(goods & ~complete)
        .then(
            pl.format(
                "waiting: checkout session {} of payment intent {} is {}, not complete; the "
                "payment posts with its order",
                pl.col("session"),
                pl.col("payment_intent"),
                pl.col("session_status"),
            )
        )
        .when(unknown)
        .then(
            pl.format(
                "waiting: checkout sessions are not read up to this payment (payment intent "
                "{}): if one names it, the payment posts with its order",
                pl.col("payment_intent"),
            )
        )
        .when(completing)
        .then(
            pl.format(
                "waiting: checkout session {} was open when this payment was made (payment "
                "intent {}); it posts once sessions are read {} s after it (with its order if "
                "the session completes with it)",
                pl.col("open_session"),
                pl.col("payment_intent"),
                pl.lit(mapping.orders.completion_grace_seconds),
            )
        )
        .alias("session_wait"),
    ).drop("session", "session_status", "session_goods", "_asked", "open_session")


def _latest_open_session(charges: pl.DataFrame, open_sessions: pl.DataFrame | None) -> pl.DataFrame:
    """``charges`` with ``open_session``: the latest staged open session created within a
    session's lifetime before the charge, or null."""
    if open_sessions is None or open_sessions.is_empty():
        return charges.with_columns(pl.lit(None, pl.String).alias("open_session"))
    key = charges.schema["created"]
    opened = open_sessions.select(
        "open_session", pl.col("open_created").cast(key).alias("_opened")
    ).sort("_opened")
    return (
        charges.with_row_index("_order")
        .sort("created")
        .join_asof(
            opened,
            left_on="created",
            right_on="_opened",
            strategy="backward",
            tolerance=SESSION_LIFETIME,
        )
        .sort("_order")
        .drop("_order", "_opened")
    )


def plan_orders(
    sessions: pl.DataFrame,
    items: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Completed goods sessions → a Sage sales order and its invoice each (module docstring).
    ``items``: the sessions' staged line items, with ``product_staged``."""
    df = sessions.filter(goods_session() & (pl.col("status") == "complete"))
    if df.is_empty() or not mapping.orders.enabled:
        return empty_docs()
    shipping_key = shipping_item_key(mapping)
    item, item_key = line_item(pl.col("product"), mapping)
    staged = pl.col("product_staged") if "product_staged" in items.columns else pl.lit(True)
    # Net of tax: an inclusive tax is inside the line's subtotal; an exclusive one is not.
    net = pl.col("amount_subtotal") - pl.when(pl.col("tax_inclusive")).then(
        pl.col("amount_tax")
    ).otherwise(0)
    lines = (
        with_line_prices(
            items,
            net,
            pl.col("quantity"),
            exponent_expr(pl.col("currency")),
            quantity_as="_q",
            price_as="_price",
        )
        .with_columns(
            item.alias("_item"),
            item_key.alias("_item_key"),
            (pl.col("product").is_not_null() & ~staged.fill_null(False)).alias("_unstaged"),
            net.alias("_net"),
        )
        .sort("session", "position")
        .group_by("session", maintain_order=True)
        .agg(
            pl.struct(
                pl.col("_item").alias("item"),
                pl.col("description").fill_null("Stripe order line").str.slice(0, 60),
                pl.col("_q").alias("quantity"),
                pl.col("_price").alias("unit_price"),
            ).alias("item_lines"),
            pl.col("_net").sum().alias("items_net"),
            pl.len().alias("n_lines"),
            pl.col("_item_key").drop_nulls().unique(maintain_order=True).alias("item_keys"),
            pl.col("product").filter(pl.col("_unstaged")).unique().alias("unstaged_products"),
        )
    )
    guest_key = guest_customer_key(mapping)
    df = df.join(lines, left_on="id", right_on="session", how="left").with_columns(
        local_date(pl.col("created"), mapping.timezone).alias("doc_date"),
        pl.when(pl.col("customer").is_not_null())
        .then(pl.concat_str([pl.lit("customer:"), pl.col("customer")]))
        .otherwise(pl.lit(guest_key, pl.String))
        .alias("customer_key"),
        (pl.col("amount_shipping") - pl.col("shipping_tax")).alias("shipping_net"),
    )
    cur = pl.col("currency")
    shipping_line = pl.struct(
        pl.lit(mapping.items.shipping_item).alias("item"),
        pl.lit(mapping.items.shipping_description).alias("description"),
        pl.lit("1").alias("quantity"),
        money_string(pl.col("shipping_net"), cur).alias("unit_price"),
    )
    with_shipping = pl.col("shipping_net") > 0
    order_lines = (
        pl.when(with_shipping)
        .then(pl.concat_list([pl.col("item_lines"), pl.concat_list([shipping_line])]))
        .otherwise(pl.col("item_lines"))
    )
    lines_total = pl.col("items_net") + pl.col("shipping_net") - pl.col("amount_discount")
    error = first_error(
        pl.when(pl.col("n_lines").is_null()).then(
            pl.lit("waiting: the session's line items are not staged")
        ),
        pl.when(pl.col("unstaged_products").list.len() > 0).then(
            pl.format(
                "waiting: product(s) {} of the line items are not staged",
                pl.col("unstaged_products").list.join(", "),
            )
        ),
        pl.when(pl.col("payment_intent").is_null()).then(
            pl.lit("a complete session without a payment intent: nothing to reference")
        ),
        pl.when(pl.col("customer_key").is_null()).then(
            pl.lit("session has no customer and the mapping sets no charges.guest_customer_id")
        ),
        pl.when(~cur.is_in(mapping.settlement_currencies)).then(
            pl.format(
                "session currency {} is not a settlement currency; posting it would need FX",
                cur,
            )
        ),
        pl.when(lines_total + pl.col("amount_tax") != pl.col("amount_total")).then(
            pl.format(
                "line items ({}) + shipping ({}) - discount ({}) + tax ({}) differ from the "
                "session total ({})",
                pl.col("items_net"),
                pl.col("shipping_net"),
                pl.col("amount_discount"),
                pl.col("amount_tax"),
                pl.col("amount_total"),
            )
        ),
    )
    customer_ref = pl.concat_str([pl.lit("@xref:"), pl.col("customer_key")])
    base_deps = pl.concat_list(
        [
            pl.concat_list([pl.col("customer_key")]),
            pl.col("item_keys").fill_null(pl.lit([], pl.List(pl.String))),
            pl.when(with_shipping)
            .then(pl.lit([shipping_key]))
            .otherwise(pl.lit([], pl.List(pl.String))),
        ]
    )
    order_key = pl.concat_str([pl.lit("sales_order:"), pl.col("id")])
    df = df.with_columns(error.alias("error"))
    orders = df.with_columns(
        pl.lit("sales_order").alias("doc_type"),
        pl.struct(
            customer_ref.alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("order_date"),
            cur.alias("currency"),
            pl.col("payment_intent").alias("reference"),
            order_lines.alias("lines"),
        ).alias("payload"),
        base_deps.alias("depends_on"),
    )
    invoices = df.with_columns(
        pl.lit("invoice").alias("doc_type"),
        pl.struct(
            customer_ref.alias("customer_id"),
            pl.col("doc_date").cast(pl.String).alias("invoice_date"),
            pl.col("doc_date").cast(pl.String).alias("due_date"),
            cur.alias("currency"),
            pl.col("payment_intent").alias("reference"),
            pl.concat_str([pl.lit("@xref:"), order_key]).alias("sales_order_no"),
            order_lines.alias("lines"),
            money_string(pl.col("amount_discount"), cur).alias("discount_amount"),
            money_string(pl.col("amount_tax"), cur).alias("tax_amount"),
            money_string(pl.col("amount_total"), cur).alias("total"),
        ).alias("payload"),
        pl.concat_list([base_deps, pl.concat_list([order_key])]).alias("depends_on"),
    )
    return pl.concat([_docs(orders, mapping, periods), _docs(invoices, mapping, periods)])


# -- selection: the staged rows a slice of sessions is planned from -----------------------
def select_inputs(st: Staging, sessions: pl.DataFrame) -> pl.DataFrame:
    """The unquarantined line items of a slice of ``sessions`` (with ``product_staged``),
    read while the slice is registered as ``_plan_slice``."""
    with st.registered("_plan_slice", sessions.select("id")):
        return st.frame(
            "SELECT s.*, s.product IN (SELECT id FROM staging.products) AS product_staged "
            "FROM staging.checkout_line_items s "
            "WHERE s.session IN (SELECT id FROM _plan_slice) AND "
            + not_quarantined("checkout_line_items")
        )
