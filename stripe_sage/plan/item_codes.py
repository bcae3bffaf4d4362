"""Item codes and the item a line names: expressions shared by the document planners and
the item planner (:mod:`stripe_sage.plan.items`), with no planner imports of their own."""

from __future__ import annotations

import base64
import hashlib
import re

import polars as pl

from stripe_sage.mapping import Mapping

ITEM_CODE_MAX = 20
ITEM_CODE = re.compile(r"^[A-Z0-9_-]{1,20}$")
_HASH_CHARS = 6  # base32: 30 bits of the prod_ id
_NOT_CODE = re.compile(r"[^A-Z0-9]+")


def sage_item_code(product_id: str, name: str | None, salt: int = 0) -> str:
    """A Sage item code for a Stripe product: the name's letters and digits (upper case,
    runs of anything else as one ``-``, at most 13 characters) then ``-`` and 6 characters
    of a hash of the product id — so it reads like the product, two products with the same
    name never share it, and the same product always gets the same code. ``salt`` > 0 gives
    the next candidate when Sage already has the code for another product."""
    slug = _NOT_CODE.sub("-", (name or "").upper()).strip("-")
    slug = slug[: ITEM_CODE_MAX - _HASH_CHARS - 1].rstrip("-") or "ITEM"
    seed = product_id if salt == 0 else f"{product_id}#{salt}"
    digest = base64.b32encode(hashlib.sha256(seed.encode()).digest()).decode()
    return f"{slug}-{digest[:_HASH_CHARS]}"


def default_item_key(mapping: Mapping) -> str:
    """The doc key of the mapping's default item (lines without a product)."""
    return f"item:default:{mapping.items.default_item}"


def item_key(product: pl.Expr) -> pl.Expr:
    """The doc key a product's item is planned under (``item:<prod_id>``)."""
    return pl.concat_str([pl.lit("item:"), product])


def line_item(product: pl.Expr, mapping: Mapping) -> tuple[pl.Expr, pl.Expr]:
    """(the line's ``item`` value, the item's doc key) for a line sold from ``product``
    (null: no product, the default item). A product's item is a placeholder the loader
    resolves to the code Sage holds (created or linked)."""
    key = (
        pl.when(product.is_not_null())
        .then(item_key(product))
        .otherwise(pl.lit(default_item_key(mapping)))
    )
    value = (
        pl.when(product.is_not_null())
        .then(pl.concat_str([pl.lit("@xref:"), item_key(product)]))
        .otherwise(pl.lit(mapping.items.default_item))
    )
    return value, key
