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


# Tax and discounts (issue 18), per invoice and per line, as typed lists: Stripe's current
# ``total_taxes`` / line ``taxes[]`` (``tax_rate_details.tax_rate``, ``tax_behavior``), or the
# older ``total_tax_amounts`` / ``tax_amounts`` (``tax_rate``, ``inclusive``) when an account's
# API version still sends those.
TAXES_TYPE = "STRUCT(tax_rate VARCHAR, amount BIGINT, taxable_amount BIGINT, inclusive BOOLEAN)[]"
DISCOUNTS_TYPE = "STRUCT(discount VARCHAR, amount BIGINT)[]"


def _taxes(current: str, older: str) -> str:
    return (
        f'coalesce(list_transform(from_json(data->\'{current}\', \'[{{"amount": "BIGINT", '
        f'"tax_behavior": "VARCHAR", "tax_rate_details": {{"tax_rate": "VARCHAR"}}, '
        f'"taxable_amount": "BIGINT"}}]\'), lambda t: {{\'tax_rate\': '
        "t.tax_rate_details.tax_rate, 'amount': t.amount, 'taxable_amount': t.taxable_amount, "
        "'inclusive': t.tax_behavior = 'inclusive'}), "
        f"list_transform(CAST(json_extract(data, '$.{older}[*]') AS JSON[]), lambda t: "
        "{'tax_rate': coalesce(t->>'$.tax_rate.id', t->>'$.tax_rate'), "
        "'amount': CAST(t->>'amount' AS BIGINT), "
        "'taxable_amount': CAST(t->>'taxable_amount' AS BIGINT), "
        "'inclusive': CAST(t->>'inclusive' AS BOOLEAN)}), [])"
    )


def _discounts(path: str) -> str:
    # ``discount`` is an id, or the discount object when the reader expanded it.
    return (
        f"coalesce(list_transform(CAST(json_extract(data, '$.{path}[*]') AS JSON[]), lambda d: "
        "{'discount': coalesce(d->>'$.discount.id', d->>'$.discount'), "
        "'amount': CAST(d->>'amount' AS BIGINT)}), [])"
    )


def _sum_of(list_expr: str, where: str = "true") -> str:
    kept = f"list_filter({list_expr}, lambda x: {where})"
    return f"coalesce(list_sum(list_transform({kept}, lambda x: x.amount)), 0)"


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
                # Issue 19: the customer's balance (negative: credit the customer holds), shown
                # beside the AR tie-out.
                Column("balance", "BIGINT", _int("balance")),
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
                # Issue 19: the customer's balance before and after the invoice; the credit it
                # used is ending - starting (Stripe keeps credit as a negative balance).
                Column("starting_balance", "BIGINT", _int("starting_balance")),
                Column("ending_balance", "BIGINT", _int("ending_balance")),
                Column("voided_at", "TIMESTAMPTZ", _ts("status_transitions.voided_at")),
                Column(
                    "marked_uncollectible_at",
                    "TIMESTAMPTZ",
                    _ts("status_transitions.marked_uncollectible_at"),
                ),
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
                # When a foreign-currency invoice awaiting settlement becomes overdue (null
                # for automatic collection: due when finalized).
                Column("due_date", "TIMESTAMPTZ", _ts("due_date")),
                # Issue 18: discounts and tax, per invoice. ``tax`` above is all of it;
                # exclusive tax is added to the lines, inclusive tax is inside them.
                Column("discount", "BIGINT", _sum_of(_discounts("total_discount_amounts"))),
                Column(
                    "tax_exclusive",
                    "BIGINT",
                    _sum_of(_taxes("total_taxes", "total_tax_amounts"), "NOT x.inclusive"),
                ),
                Column(
                    "tax_inclusive",
                    "BIGINT",
                    _sum_of(_taxes("total_taxes", "total_tax_amounts"), "x.inclusive"),
                ),
                Column("total_excluding_tax", "BIGINT", _int("total_excluding_tax")),
                Column("taxes", TAXES_TYPE, _taxes("total_taxes", "total_tax_amounts")),
                Column("discounts", DISCOUNTS_TYPE, _discounts("total_discount_amounts")),
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
                # Whole minor units, else null (a price in fractions of a cent; the exact
                # text is unit_amount_decimal).
                Column(
                    "unit_amount",
                    "BIGINT",
                    "TRY_CAST(data->>'$.pricing.unit_amount_decimal' AS BIGINT)",
                ),
                Column("unit_amount_decimal", "VARCHAR", "data->>'$.pricing.unit_amount_decimal'"),
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
                # Issue 18: what discounts took off the line, its taxes per rate, and whether
                # it is a proration (a credit for unused time is a negative amount).
                Column("discount", "BIGINT", _sum_of(_discounts("discount_amounts"))),
                Column(
                    "tax_inclusive",
                    "BIGINT",
                    _sum_of(_taxes("taxes", "tax_amounts"), "x.inclusive"),
                ),
                Column(
                    "tax_exclusive",
                    "BIGINT",
                    _sum_of(_taxes("taxes", "tax_amounts"), "NOT x.inclusive"),
                ),
                Column("taxes", TAXES_TYPE, _taxes("taxes", "tax_amounts")),
                Column("discounts", DISCOUNTS_TYPE, _discounts("discount_amounts")),
                Column(
                    "proration",
                    "BOOLEAN",
                    "coalesce(CAST(data->>'$.parent.subscription_item_details.proration' AS "
                    "BOOLEAN), CAST(data->>'$.parent.invoice_item_details.proration' AS BOOLEAN), "
                    "CAST(data->>'proration' AS BOOLEAN), false)",
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
            "tax_rates",
            "/v1/tax_rates",
            "tax_rate",
            "events",
            (
                ID,
                CREATED,
                Column("display_name", "VARCHAR", _str("display_name")),
                Column("description", "VARCHAR", _str("description")),
                Column("jurisdiction", "VARCHAR", _str("jurisdiction")),
                Column("country", "VARCHAR", _str("country")),
                Column("state", "VARCHAR", _str("state")),
                Column("percentage", "DECIMAL(9,4)", "CAST(data->>'percentage' AS DECIMAL(9,4))"),
                Column("inclusive", "BOOLEAN", _bool("inclusive")),
                Column("active", "BOOLEAN", _bool("active")),
                Column("tax_type", "VARCHAR", _str("tax_type")),
            ),
            notes="The rates invoices' taxes name (issue 18): Sage tax codes come from these.",
        ),
        Stream(
            "credit_notes",
            "/v1/credit_notes",
            "credit_note",
            "events",
            (
                ID,
                CREATED,
                Column("number", "VARCHAR", _str("number")),
                Column("invoice", "VARCHAR", _str("invoice")),
                Column("customer", "VARCHAR", _str("customer")),
                Column("status", "VARCHAR", _str("status")),
                Column("type", "VARCHAR", _str("type")),
                Column("reason", "VARCHAR", _str("reason")),
                CURRENCY,
                Column("subtotal", "BIGINT", _int("subtotal")),
                Column("discount_amount", "BIGINT", _int("discount_amount")),
                Column("total", "BIGINT", _int("total")),
                Column("total_excluding_tax", "BIGINT", _int("total_excluding_tax")),
                Column("pre_payment_amount", "BIGINT", _int("pre_payment_amount")),
                Column("post_payment_amount", "BIGINT", _int("post_payment_amount")),
                Column("effective_at", "TIMESTAMPTZ", _ts("effective_at")),
                Column("voided_at", "TIMESTAMPTZ", _ts("voided_at")),
                Column("taxes", TAXES_TYPE, _taxes("total_taxes", "tax_amounts")),
                # The refunds it names (a note on a paid invoice): they post through its memo.
                Column(
                    "refunds",
                    "VARCHAR[]",
                    "coalesce(list_transform(CAST(json_extract(data, '$.refunds[*]') AS JSON[]), "
                    "lambda r: coalesce(r->>'$.refund.id', r->>'refund')), [])",
                ),
                # Its lines (Stripe embeds them; a note here credits at most a few lines).
                Column(
                    "lines",
                    "STRUCT(id VARCHAR, invoice_line_item VARCHAR, amount BIGINT, "
                    "discount_amount BIGINT, quantity BIGINT, description VARCHAR)[]",
                    "coalesce(list_transform(CAST(json_extract(data, '$.lines.data[*]') AS "
                    "JSON[]), lambda ln: {'id': ln->>'id', "
                    "'invoice_line_item': ln->>'invoice_line_item', "
                    "'amount': CAST(ln->>'amount' AS BIGINT), "
                    "'discount_amount': CAST(ln->>'discount_amount' AS BIGINT), "
                    "'quantity': CAST(ln->>'quantity' AS BIGINT), "
                    "'description': ln->>'description'}), [])",
                ),
                Column("lines_has_more", "BOOLEAN", "CAST(data->>'$.lines.has_more' AS BOOLEAN)"),
            ),
            notes="Credit notes (issue 19): each becomes one Sage credit memo.",
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
                # Issue 18: its items (price, quantity, period end) for the analysts' MRR
                # tables (``billing.subscription_items``, ``billing.mrr_by_customer``).
                Column(
                    "items",
                    "STRUCT(id VARCHAR, price VARCHAR, product VARCHAR, quantity BIGINT, "
                    'unit_amount BIGINT, currency VARCHAR, "interval" VARCHAR, '
                    "interval_count BIGINT, current_period_end TIMESTAMPTZ)[]",
                    "coalesce(list_transform(CAST(json_extract(data, '$.items.data[*]') AS "
                    "JSON[]), lambda i: {'id': i->>'id', 'price': coalesce(i->>'$.price.id', "
                    "i->>'price'), 'product': i->>'$.price.product', "
                    "'quantity': CAST(i->>'quantity' AS BIGINT), "
                    "'unit_amount': TRY_CAST(i->>'$.price.unit_amount' AS BIGINT), "
                    "'currency': upper(i->>'$.price.currency'), "
                    "'interval': i->>'$.price.recurring.interval', "
                    "'interval_count': CAST(i->>'$.price.recurring.interval_count' AS BIGINT), "
                    "'current_period_end': "
                    "to_timestamp(CAST(i->>'current_period_end' AS BIGINT))}), [])",
                ),
            ),
        ),
    )
}

# The order in which streams are extracted and loaded: customers before what references them.
STREAM_ORDER = (
    "customers",
    "products",
    "tax_rates",
    # Before charges: a charge paid through Checkout is planned with its session.
    "checkout_sessions",
    "checkout_line_items",
    "charges",
    "refunds",
    "invoices",
    "invoice_lines",
    "invoice_payments",
    "credit_notes",
    "payouts",
    "balance_transactions",
    "disputes",
    "subscriptions",
)
LISTED_STREAMS = tuple(s for s in STREAM_ORDER if STREAMS[s].mode != "child")
OBJECT_TO_STREAM = {s.object_type: s.name for s in STREAMS.values()}
# Child streams by their parent: the parent's listed objects carry their children.
CHILD_STREAMS = {s.parent: s.name for s in STREAMS.values() if s.parent}
