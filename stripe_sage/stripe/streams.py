"""The Stripe streams the product reads, declared once, as data.

Each stream says where it lives in the API, how it is read incrementally, which event object
types update it, and how its raw JSON becomes the typed ``staging.<stream>`` table analysts
query (column, DuckDB type, SQL expression over the raw ``data`` JSON). Money columns are
integer minor units beside a ``currency`` column; timestamps are ``TIMESTAMPTZ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["events", "immutable", "child"]


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    expr: str  # DuckDB SQL over the raw row (``data`` JSON, ``id``)


@dataclass(frozen=True)
class Stream:
    name: str
    path: str
    object_type: str  # Stripe's ``object`` value, used to route events
    mode: Mode
    columns: tuple[Column, ...]
    expand: tuple[str, ...] = ()
    # Immutable streams are re-read with this lookback instead of reading events.
    lookback_seconds: int = 0
    # Child streams are read per parent (invoice lines) instead of listed.
    parent: str | None = None
    notes: str = ""
    depends_on: tuple[str, ...] = field(default=())


def _ts(path: str) -> str:
    return f"to_timestamp(CAST(data->>'{path}' AS BIGINT))"


def _int(path: str) -> str:
    return f"CAST(data->>'{path}' AS BIGINT)"


def _str(path: str) -> str:
    return f"data->>'{path}'"


def _bool(path: str) -> str:
    return f"CAST(data->>'{path}' AS BOOLEAN)"


ID = Column("id", "VARCHAR", "id")
CREATED = Column("created", "TIMESTAMPTZ", _ts("created"))
CURRENCY = Column("currency", "VARCHAR", "upper(data->>'currency')")

STREAMS: dict[str, Stream] = {
    s.name: s
    for s in (
        Stream(
            "customers",
            "/v1/customers",
            "customer",
            "events",
            (
                ID,
                CREATED,
                Column("name", "VARCHAR", _str("name")),
                Column("email", "VARCHAR", _str("email")),
                Column("phone", "VARCHAR", _str("phone")),
                Column("address_line1", "VARCHAR", "data->>'$.address.line1'"),
                Column("address_line2", "VARCHAR", "data->>'$.address.line2'"),
                Column("city", "VARCHAR", "data->>'$.address.city'"),
                Column("state", "VARCHAR", "data->>'$.address.state'"),
                Column("postal_code", "VARCHAR", "data->>'$.address.postal_code'"),
                Column("country", "VARCHAR", "data->>'$.address.country'"),
                Column("currency", "VARCHAR", "upper(data->>'currency')"),
                Column("sage_customer_id", "VARCHAR", "data->>'$.metadata.sage_customer_id'"),
                Column("deleted", "BOOLEAN", "coalesce(CAST(data->>'deleted' AS BOOLEAN), false)"),
                Column("metadata", "JSON", "data->'metadata'"),
            ),
        ),
        Stream(
            "charges",
            "/v1/charges",
            "charge",
            "events",
            (
                ID,
                CREATED,
                Column("amount", "BIGINT", _int("amount")),
                Column("amount_captured", "BIGINT", _int("amount_captured")),
                Column("amount_refunded", "BIGINT", _int("amount_refunded")),
                CURRENCY,
                Column("customer", "VARCHAR", _str("customer")),
                Column("status", "VARCHAR", _str("status")),
                Column("paid", "BOOLEAN", _bool("paid")),
                Column("refunded", "BOOLEAN", _bool("refunded")),
                Column("disputed", "BOOLEAN", _bool("disputed")),
                Column("balance_transaction", "VARCHAR", _str("balance_transaction")),
                Column("payment_intent", "VARCHAR", _str("payment_intent")),
                Column("description", "VARCHAR", _str("description")),
                Column("failure_code", "VARCHAR", _str("failure_code")),
                Column("erp_order_id", "VARCHAR", "data->>'$.metadata.erp_order_id'"),
                Column("card_brand", "VARCHAR", "data->>'$.payment_method_details.card.brand'"),
                Column("card_last4", "VARCHAR", "data->>'$.payment_method_details.card.last4'"),
                Column("card_country", "VARCHAR", "data->>'$.payment_method_details.card.country'"),
                Column("wallet", "VARCHAR", "data->>'$.payment_method_details.card.wallet.type'"),
                Column("metadata", "JSON", "data->'metadata'"),
                # Added for the zero-touch defaults (docs/accounting.md §2): an uncaptured
                # charge plans nothing, and a customer without a name (or deleted in Stripe)
                # takes the name the card holder gave at checkout.
                Column("captured", "BOOLEAN", _bool("captured")),
                Column("billing_name", "VARCHAR", "data->>'$.billing_details.name'"),
                Column("billing_email", "VARCHAR", "data->>'$.billing_details.email'"),
            ),
        ),
        Stream(
            "refunds",
            "/v1/refunds",
            "refund",
            "events",
            (
                ID,
                CREATED,
                Column("amount", "BIGINT", _int("amount")),
                CURRENCY,
                Column("charge", "VARCHAR", _str("charge")),
                Column("status", "VARCHAR", _str("status")),
                Column("reason", "VARCHAR", _str("reason")),
                Column("balance_transaction", "VARCHAR", _str("balance_transaction")),
                Column(
                    "failure_balance_transaction", "VARCHAR", _str("failure_balance_transaction")
                ),
                Column("failure_reason", "VARCHAR", _str("failure_reason")),
            ),
        ),
        Stream(
            "invoices",
            "/v1/invoices",
            "invoice",
            "events",
            (
                ID,
                CREATED,
                Column("number", "VARCHAR", _str("number")),
                Column("customer", "VARCHAR", _str("customer")),
                Column("customer_email", "VARCHAR", _str("customer_email")),
                Column("customer_name", "VARCHAR", _str("customer_name")),
                Column("status", "VARCHAR", _str("status")),
                CURRENCY,
                Column("subtotal", "BIGINT", _int("subtotal")),
                Column(
                    "tax",
                    "BIGINT",
                    "coalesce(list_sum(CAST(json_extract(data, '$.total_taxes[*].amount') "
                    "AS BIGINT[])), 0)",
                ),
                Column("total", "BIGINT", _int("total")),
                Column("amount_due", "BIGINT", _int("amount_due")),
                Column("amount_paid", "BIGINT", _int("amount_paid")),
                Column("amount_remaining", "BIGINT", _int("amount_remaining")),
                Column(
                    "subscription",
                    "VARCHAR",
                    "data->>'$.parent.subscription_details.subscription'",
                ),
                Column("billing_reason", "VARCHAR", _str("billing_reason")),
                Column("period_start", "TIMESTAMPTZ", _ts("period_start")),
                Column("period_end", "TIMESTAMPTZ", _ts("period_end")),
                Column(
                    "finalized_at",
                    "TIMESTAMPTZ",
                    "to_timestamp(CAST(data->>'$.status_transitions.finalized_at' AS BIGINT))",
                ),
                Column(
                    "paid_at",
                    "TIMESTAMPTZ",
                    "to_timestamp(CAST(data->>'$.status_transitions.paid_at' AS BIGINT))",
                ),
                Column("lines_has_more", "BOOLEAN", "CAST(data->>'$.lines.has_more' AS BOOLEAN)"),
            ),
        ),
        Stream(
            "invoice_lines",
            "/v1/invoices/{parent}/lines",
            "line_item",
            "child",
            (
                ID,
                Column("invoice", "VARCHAR", _str("invoice")),
                Column("position", "INTEGER", "CAST(data->>'_position' AS INTEGER)"),
                Column("amount", "BIGINT", _int("amount")),
                CURRENCY,
                Column("description", "VARCHAR", _str("description")),
                Column("quantity", "BIGINT", _int("quantity")),
                Column(
                    "unit_amount",
                    "BIGINT",
                    "CAST(data->>'$.pricing.unit_amount_decimal' AS BIGINT)",
                ),
                Column("price", "VARCHAR", "data->>'$.pricing.price_details.price'"),
                Column("product", "VARCHAR", "data->>'$.pricing.price_details.product'"),
                Column(
                    "period_start",
                    "TIMESTAMPTZ",
                    "to_timestamp(CAST(data->>'$.period.start' AS BIGINT))",
                ),
                Column(
                    "period_end",
                    "TIMESTAMPTZ",
                    "to_timestamp(CAST(data->>'$.period.end' AS BIGINT))",
                ),
            ),
            parent="invoices",
            notes="Embedded lines (≤ 10) come with the invoice; the rest are paged.",
        ),
        Stream(
            "invoice_payments",
            "/v1/invoice_payments",
            "invoice_payment",
            "events",
            (
                ID,
                CREATED,
                Column("invoice", "VARCHAR", _str("invoice")),
                Column("charge", "VARCHAR", "data->>'$.payment.charge'"),
                Column("payment_intent", "VARCHAR", "data->>'$.payment.payment_intent'"),
                Column("amount_paid", "BIGINT", _int("amount_paid")),
                CURRENCY,
                Column("status", "VARCHAR", _str("status")),
                Column(
                    "paid_at",
                    "TIMESTAMPTZ",
                    "to_timestamp(CAST(data->>'$.status_transitions.paid_at' AS BIGINT))",
                ),
            ),
            notes="The link between an invoice and the charge that paid it (API ≥ basil).",
        ),
        Stream(
            "payouts",
            "/v1/payouts",
            "payout",
            "events",
            (
                ID,
                CREATED,
                Column("amount", "BIGINT", _int("amount")),
                CURRENCY,
                Column("arrival_date", "TIMESTAMPTZ", _ts("arrival_date")),
                Column("status", "VARCHAR", _str("status")),
                Column("automatic", "BOOLEAN", _bool("automatic")),
                Column("balance_transaction", "VARCHAR", _str("balance_transaction")),
                Column(
                    "failure_balance_transaction", "VARCHAR", _str("failure_balance_transaction")
                ),
                Column("failure_code", "VARCHAR", _str("failure_code")),
                Column("reconciliation_status", "VARCHAR", _str("reconciliation_status")),
                Column("method", "VARCHAR", _str("method")),
            ),
        ),
        Stream(
            "balance_transactions",
            "/v1/balance_transactions",
            "balance_transaction",
            "immutable",
            (
                ID,
                CREATED,
                Column("available_on", "TIMESTAMPTZ", _ts("available_on")),
                Column("amount", "BIGINT", _int("amount")),
                Column("fee", "BIGINT", _int("fee")),
                Column("net", "BIGINT", _int("net")),
                CURRENCY,
                Column("exchange_rate", "DOUBLE", "CAST(data->>'exchange_rate' AS DOUBLE)"),
                Column("type", "VARCHAR", _str("type")),
                Column("reporting_category", "VARCHAR", _str("reporting_category")),
                Column("source", "VARCHAR", _str("source")),
                Column("status", "VARCHAR", _str("status")),
                Column("description", "VARCHAR", _str("description")),
                Column(
                    "fee_details_total",
                    "BIGINT",
                    "coalesce(list_sum(CAST(json_extract(data, '$.fee_details[*].amount') "
                    "AS BIGINT[])), 0)",
                ),
                Column("fee_details", "JSON", "data->'fee_details'"),
            ),
            lookback_seconds=2 * 86_400,
            notes="Immutable but for status; re-read with a lookback and upserted by id.",
        ),
        Stream(
            "disputes",
            "/v1/disputes",
            "dispute",
            "events",
            (
                ID,
                CREATED,
                Column("amount", "BIGINT", _int("amount")),
                CURRENCY,
                Column("charge", "VARCHAR", _str("charge")),
                Column("status", "VARCHAR", _str("status")),
                Column("reason", "VARCHAR", _str("reason")),
                Column(
                    "balance_transactions",
                    "VARCHAR[]",
                    "CAST(json_extract_string(data, '$.balance_transactions[*].id') AS VARCHAR[])",
                ),
            ),
        ),
        Stream(
            "products",
            "/v1/products",
            "product",
            "events",
            (
                ID,
                CREATED,
                Column("name", "VARCHAR", _str("name")),
                Column("description", "VARCHAR", _str("description")),
                Column("product_type", "VARCHAR", _str("type")),
                Column("active", "BOOLEAN", _bool("active")),
                Column("shippable", "BOOLEAN", _bool("shippable")),
                Column("unit_label", "VARCHAR", _str("unit_label")),
                Column("sage_item", "VARCHAR", "data->>'$.metadata.sage_item'"),
                Column("metadata", "JSON", "data->'metadata'"),
            ),
            notes="Products become Sage items (issue 17); metadata.sage_item names one.",
        ),
        Stream(
            "checkout_sessions",
            "/v1/checkout/sessions",
            "checkout.session",
            "events",
            (
                ID,
                CREATED,
                Column("status", "VARCHAR", _str("status")),
                Column("payment_status", "VARCHAR", _str("payment_status")),
                Column("mode", "VARCHAR", _str("mode")),
                Column("payment_intent", "VARCHAR", _str("payment_intent")),
                Column("customer", "VARCHAR", _str("customer")),
                Column("customer_email", "VARCHAR", "data->>'$.customer_details.email'"),
                Column("customer_name", "VARCHAR", "data->>'$.customer_details.name'"),
                CURRENCY,
                Column("amount_subtotal", "BIGINT", _int("amount_subtotal")),
                Column("amount_total", "BIGINT", _int("amount_total")),
                Column(
                    "amount_discount",
                    "BIGINT",
                    "coalesce(CAST(data->>'$.total_details.amount_discount' AS BIGINT), 0)",
                ),
                Column(
                    "amount_shipping",
                    "BIGINT",
                    "coalesce(CAST(data->>'$.shipping_cost.amount_total' AS BIGINT), 0)",
                ),
                Column(
                    "shipping_tax",
                    "BIGINT",
                    "coalesce(CAST(data->>'$.shipping_cost.amount_tax' AS BIGINT), 0)",
                ),
                Column(
                    "amount_tax",
                    "BIGINT",
                    "coalesce(CAST(data->>'$.total_details.amount_tax' AS BIGINT), 0)",
                ),
                Column("invoice", "VARCHAR", _str("invoice")),
                Column(
                    "invoice_creation",
                    "BOOLEAN",
                    "coalesce(CAST(data->>'$.invoice_creation.enabled' AS BOOLEAN), false)",
                ),
                Column(
                    "line_items_has_more",
                    "BOOLEAN",
                    "CAST(data->>'$.line_items.has_more' AS BOOLEAN)",
                ),
                Column("metadata", "JSON", "data->'metadata'"),
            ),
            expand=("line_items",),
            notes="Checkout orders (issue 17): a goods session becomes a Sage sales order.",
        ),
        Stream(
            "checkout_line_items",
            "/v1/checkout/sessions/{parent}/line_items",
            "item",
            "child",
            (
                ID,
                Column("session", "VARCHAR", _str("_session")),
                Column("position", "INTEGER", "CAST(data->>'_position' AS INTEGER)"),
                Column("description", "VARCHAR", _str("description")),
                Column("quantity", "BIGINT", _int("quantity")),
                CURRENCY,
                Column("price", "VARCHAR", "data->>'$.price.id'"),
                Column("product", "VARCHAR", "data->>'$.price.product'"),
                Column("unit_amount", "BIGINT", "CAST(data->>'$.price.unit_amount' AS BIGINT)"),
                Column("amount_subtotal", "BIGINT", _int("amount_subtotal")),
                Column("amount_discount", "BIGINT", _int("amount_discount")),
                Column("amount_tax", "BIGINT", _int("amount_tax")),
                Column("amount_total", "BIGINT", _int("amount_total")),
                # Tax inside the price (inclusive) or added to it (exclusive): Sage's line is
                # net of tax either way; the planner subtracts an inclusive tax.
                Column(
                    "tax_inclusive",
                    "BOOLEAN",
                    "coalesce(data->>'$.price.tax_behavior' = 'inclusive', false)",
                ),
            ),
            parent="checkout_sessions",
            notes="Expanded with the session (≤ 10); the rest are paged.",
        ),
        Stream(
            "subscriptions",
            "/v1/subscriptions",
            "subscription",
            "events",
            (
                ID,
                CREATED,
                Column("customer", "VARCHAR", _str("customer")),
                Column("status", "VARCHAR", _str("status")),
                CURRENCY,
                Column("start_date", "TIMESTAMPTZ", _ts("start_date")),
            ),
        ),
    )
}

# The order in which streams are extracted and loaded: customers before what references them.
STREAM_ORDER = (
    "customers",
    "products",
    # Before charges: a charge paid through Checkout is planned with its session.
    "checkout_sessions",
    "checkout_line_items",
    "charges",
    "refunds",
    "invoices",
    "invoice_lines",
    "invoice_payments",
    "payouts",
    "balance_transactions",
    "disputes",
    "subscriptions",
)
LISTED_STREAMS = tuple(s for s in STREAM_ORDER if STREAMS[s].mode != "child")
OBJECT_TO_STREAM = {s.object_type: s.name for s in STREAMS.values()}
# Child streams by their parent: the parent's listed objects carry their children.
CHILD_STREAMS = {s.parent: s.name for s in STREAMS.values() if s.parent}
