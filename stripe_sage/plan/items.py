"""Stripe products → Sage items (the item master, Sage Pro v1.1), and the items lines name.

Sage refuses a sales-order or invoice line whose item it does not know, so every line the
product posts names an item that is planned (and posted) before the document: a product's
item (``item:<prod_id>``), or the mapping's default item for lines without a product
(``item:default:<code>``). Documents list those keys in ``depends_on``; the loader posts
phase 0 (customers, items) before the documents that reference them.

- ``metadata.sage_item`` on the product names an existing Sage item: an ``item_link``
  document, checked against Sage (dead-lettered, naming the code, when Sage lacks it).
- otherwise an ``item`` document with a deterministic code (:func:`sage_item_code`); the
  loader creates it unless Sage has it (then it is linked), and the code is written back to
  the product's ``metadata.sage_item``.
"""

from __future__ import annotations

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.plan.documents import _docs, apply_rules, empty_docs, join_errors
from stripe_sage.plan.item_codes import ITEM_CODE, default_item_key, sage_item_code

__all__ = ["default_item_key", "plan_default_item", "plan_items", "sage_item_code"]


def plan_default_item(mapping: Mapping) -> pl.DataFrame:
    """The default item, created by the loader when Sage lacks it (linked when it has it)."""
    code = mapping.items.default_item
    df = pl.DataFrame(
        {
            "id": [f"default:{code}"],
            "doc_type": ["item"],
            "payload": [
                {
                    "item": code,
                    "description": mapping.items.default_description,
                    "type": "service",
                }
            ],
        }
    )
    return _docs(
        df.with_columns(
            pl.lit([], pl.List(pl.String)).alias("depends_on"),
            pl.lit(None, pl.String).alias("error"),
        )
    )


def plan_items(products: pl.DataFrame, mapping: Mapping) -> pl.DataFrame:
    """Each staged product → its Sage item: ``item_link`` when ``metadata.sage_item`` names
    one, else ``item`` (create-or-link) with the code :func:`sage_item_code` derives."""
    if products.is_empty():
        return empty_docs()
    rules = mapping.items.fields
    df = apply_rules(products, rules, "f_").with_columns(
        pl.struct("id", "name")
        .map_batches(
            lambda s: pl.Series(
                [sage_item_code(r["id"], r["name"]) for r in s.to_list()], dtype=pl.String
            ),
            return_dtype=pl.String,
        )
        .alias("_new_code"),
        pl.col("sage_item").cast(pl.String).str.strip_chars().alias("_named"),
    )
    named = pl.col("_named").is_not_null() & (pl.col("_named") != "")
    item_type = pl.col("f_type") if "type" in rules else pl.lit("service")
    df = df.with_columns(item_type.alias("_type"))
    return _docs(
        df.with_columns(
            pl.when(named).then(pl.lit("item_link")).otherwise(pl.lit("item")).alias("doc_type"),
            pl.struct(
                pl.when(named).then(pl.col("_named")).otherwise(pl.col("_new_code")).alias("item"),
                pl.col("f_description").alias("description"),
                pl.col("_type").alias("type"),
                pl.col("id").alias("reference"),
                pl.when(named)
                .then(pl.lit("metadata"))
                .otherwise(pl.lit("created"))
                .alias("_matched_by"),
            ).alias("payload"),
            pl.lit([], pl.List(pl.String)).alias("depends_on"),
            pl.when(named & ~pl.col("_named").str.contains(ITEM_CODE.pattern))
            .then(
                pl.format(
                    "product metadata.sage_item {} is not a Sage item code "
                    "(1-20 of A-Z, 0-9, _ and -)",
                    pl.col("_named"),
                )
            )
            .when(pl.col("f_description").is_null() | (pl.col("f_description") == ""))
            .then(pl.lit("the product has no name for the item's description"))
            .when(~pl.col("_type").is_in(["stock", "service"]))
            .then(
                pl.format(
                    "items.fields.type gives {}; a Sage item is stock or service",
                    pl.col("_type").fill_null("nothing"),
                )
            )
            .otherwise(join_errors())
            .alias("error"),
        )
    )
