"""Stripe customers → Sage customers (``plan_customers``).

Each Stripe customer is linked to the Sage customer its ``metadata.sage_customer_id`` names,
else to the one Sage customer with its email, else created under a deterministic id
(``sage_customer_id``). Charges without a Stripe customer post to one guest customer
(``plan_guest_customer``), and Stripe-side changes to customers Sage already has become
customer updates (``plan_customer_updates``). Beside them, what the outbox reads for them:
``customer_columns``, ``select_sage_customers``, ``select_changed``, and whether the guest
customer is still to plan (``guest_planned``, ``guest_needed``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.documents import _docs, apply_rules, empty_docs, join_errors, with_derived
from stripe_sage.store.staging import Staging

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


# -- selection: the staged rows these planners read ---------------------------------------
# The latest charge's billing details of each customer (name fallbacks: a customer without a
# name, or deleted in Stripe, is named as the card holder named themselves at checkout).
CHARGE_BILLING = (
    "(SELECT ch.{col} FROM staging.charges ch WHERE ch.customer = {alias}.id "
    "AND ch.{col} IS NOT NULL ORDER BY ch.created DESC LIMIT 1)"
)


def customer_columns(alias: str = "s") -> str:
    """``<alias>.*`` and the derived columns a customer mapping may read."""
    return (
        f"{alias}.*, "
        + CHARGE_BILLING.format(col="billing_name", alias=alias)
        + " AS charge_billing_name, "
        + CHARGE_BILLING.format(col="billing_email", alias=alias)
        + " AS charge_billing_email"
    )


def select_sage_customers(
    st: Staging,
    new_customers: pl.DataFrame,
    sage_customers: Callable[[], pl.DataFrame] | None,
) -> pl.DataFrame | None:
    """Sage's customers for email matching (``plan_customers``), each with the Stripe
    customer it is linked to: listed only when some of ``new_customers`` has no
    ``metadata.sage_customer_id`` (else None)."""
    if (
        sage_customers is None
        or not new_customers.filter(pl.col("sage_customer_id").is_null()).height
    ):
        return None
    linked = st.frame(
        "SELECT sage_id AS customer_id, stripe_id AS linked_to FROM sage.xref "
        "WHERE doc_type = 'customer'"
    )
    return sage_customers().join(linked, on="customer_id", how="left")


def guest_planned(st: Staging, gid: str) -> bool:
    """The outbox settled the guest customer in either form (created, or linked): once it is
    created, Sage has it, and it must not be planned again as a link."""
    return bool(st.settled_among([f"{t}:{GUEST_KEY}:{gid}" for t in ("customer", "customer_link")]))


def guest_needed(st: Staging) -> bool:
    """Some succeeded charge has no Stripe customer (the guest customer is created on first
    need, not on an account that never has guest checkout)."""
    return st.guest_charge_staged()


def select_changed(st: Staging, run_id: str) -> pl.DataFrame:
    """Customers run ``run_id`` changed that Sage already has, with what was last sent for
    them (``plan_customer_updates``)."""
    return st.frame(
        f"SELECT {customer_columns('c')}, "
        "(SELECT CAST(o.payload AS VARCHAR) FROM sage.outbox o "
        "WHERE o.status = 'posted' AND (o.stripe_id = c.id OR o.stripe_id LIKE c.id || ':%') "
        "AND o.doc_type IN ('customer', 'customer_link', 'customer_update') "
        "ORDER BY o.posted_at DESC LIMIT 1) AS last_sent "
        "FROM staging.customers c JOIN sage.xref x ON x.stripe_id = c.id "
        "AND x.doc_type = 'customer' WHERE c.run_id = ? AND x.run_id <> ?",
        [run_id, run_id],
    )
