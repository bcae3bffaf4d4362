"""The AR tie-out (docs/accounting.md, invariant 11): per customer, the open AR Sage holds
against the open ``amount_remaining`` of the customer's Stripe invoices.

Both sides come from the staging DB, like the clearing check: Sage's from the documents
posted (an invoice raises its own balance; a receipt's ``apply_to`` and a credit memo's
``invoice_no`` reduce the balance of the invoice they name), Stripe's from
``staging.invoices`` (status ``open``, settlement currencies only: a foreign-currency invoice
awaiting settlement is listed as such, not tied out). A difference is explained by the
documents behind it that are not posted (each with its state and reason) and by open Stripe
invoices no document was planned for yet; what is left is ``unexplained``, and
``stripe-sage reconcile`` exits 1 on it, naming the customer and the amounts.

The customer's Stripe credit balance (``customers.balance``: negative = credit the customer
holds) is shown beside it: credit not yet applied to an invoice is not AR, so it explains
nothing and is listed for the reader.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.money import exponent

# Each posted or planned document's effect on the open balance of the Sage invoice it names,
# in the currency's decimal units (DuckDB DECIMAL; scaled to minor units in Python).
_MOVES = """
    WITH docs AS (
        SELECT doc_key, doc_type, status, last_error, payload FROM sage.outbox
        WHERE doc_type IN ('invoice', 'cash_receipt', 'credit_memo')
          AND payload->>'currency' = ?1),
    moves AS (
        SELECT doc_key AS target, doc_key, status, last_error,
            CAST(payload->>'total' AS DECIMAL(18, 3)) AS amount,
            CASE WHEN payload->>'customer_id' LIKE '@xref:customer:%'
                 THEN substr(payload->>'customer_id', 16) ELSE payload->>'customer_id' END
                AS customer
        FROM docs WHERE doc_type = 'invoice'
        UNION ALL
        SELECT substr(a->>'invoice_no', 7), doc_key, status, last_error,
            -CAST(a->>'amount' AS DECIMAL(18, 3)), NULL
        FROM docs, unnest(CAST(payload->'apply_to' AS JSON[])) t(a)
        WHERE doc_type = 'cash_receipt' AND a->>'invoice_no' LIKE '@xref:invoice:%'
        UNION ALL
        SELECT substr(payload->>'invoice_no', 7), doc_key, status, last_error,
            -CAST(payload->>'amount' AS DECIMAL(18, 3)), NULL
        FROM docs
        WHERE doc_type = 'credit_memo' AND payload->>'invoice_no' LIKE '@xref:invoice:%')
    SELECT inv.customer, m.target, m.doc_key, m.status, m.last_error,
        CAST(round(coalesce(m.amount, 0) * ?2) AS BIGINT) AS amount,
        inv.status = 'posted' AS target_posted
    FROM moves m JOIN (SELECT target, customer, status FROM moves WHERE customer IS NOT NULL)
        inv USING (target)
"""

# Open settlement-currency Stripe invoices, and whether any document was planned for them.
_STRIPE_OPEN = """
    SELECT i.customer, i.id, i.amount_remaining,
        EXISTS (SELECT 1 FROM sage.outbox o WHERE o.doc_key = 'invoice:' || i.id) AS planned,
        (SELECT min("check" || ': ' || reason) FROM staging.quarantine q WHERE q.id = i.id)
            AS quarantined
    FROM staging.invoices i
    WHERE i.status = 'open' AND i.currency = ?1 AND i.amount_remaining <> 0
"""

ROW_LIMIT = 200  # customers listed on the page (those with a difference first)
# A customer's row of the tie-out (``ops.ar_tie_out``, the HTML page, the console), amounts
# in minor units.
AR_AMOUNTS = (
    "sage_open",
    "stripe_open",
    "difference",
    "explained",
    "unexplained",
    "credit_balance",
)
AR_TIE_OUT_COLUMNS = ("currency", "customer", "name", *AR_AMOUNTS)


def _credit_balances(st: Any) -> dict[str, int]:
    """Stripe customers' balances (negative: credit they hold), where staged and non-zero."""
    rows = st.frame("SELECT id, balance FROM staging.customers WHERE coalesce(balance, 0) <> 0")
    return {str(c): int(b) for c, b in rows.iter_rows()}


def ar_tie_out(st: Any, mapping: Mapping) -> list[dict[str, Any]]:
    """Per settlement currency: totals, and per customer Sage's open AR (posted documents),
    Stripe's open ``amount_remaining``, the difference, what unposted or unplanned documents
    explain of it, and the unexplained rest; customers with a difference list the documents
    behind it."""
    balances = _credit_balances(st)
    names = dict(st.frame("SELECT id, name FROM staging.customers").iter_rows())
    out = []
    for currency in mapping.settlement_currencies:
        scale = 10 ** exponent(currency)
        moves = st.frame(_MOVES, [currency, scale])
        stripe = st.frame(_STRIPE_OPEN, [currency])
        if moves.is_empty() and stripe.is_empty():
            continue
        posted = pl.col("target_posted") & (pl.col("status") == "posted")
        per_doc = moves.group_by("customer").agg(
            pl.col("amount").filter(posted).sum().alias("sage_open"),
            pl.col("amount").sum().alias("planned_open"),
        )
        unplanned = stripe.filter(~pl.col("planned"))
        per_stripe = stripe.group_by("customer").agg(
            pl.col("amount_remaining").sum().alias("stripe_open"),
            pl.col("amount_remaining").filter(~pl.col("planned")).sum().alias("not_planned"),
        )
        rows = (
            per_doc.join(per_stripe, on="customer", how="full", coalesce=True)
            .with_columns(
                pl.col(c).fill_null(0).cast(pl.Int64)
                for c in ("sage_open", "planned_open", "stripe_open", "not_planned")
            )
            .with_columns(
                (pl.col("sage_open") - pl.col("stripe_open")).alias("difference"),
                (pl.col("planned_open") + pl.col("not_planned") - pl.col("stripe_open")).alias(
                    "unexplained"
                ),
            )
            .with_columns((pl.col("difference") - pl.col("unexplained")).alias("explained"))
            .filter(
                (pl.col("sage_open") != 0)
                | (pl.col("stripe_open") != 0)
                | (pl.col("difference") != 0)
            )
        )
        unposted = moves.filter(~posted).select(
            "customer", "doc_key", "status", pl.col("amount"), pl.col("last_error").alias("reason")
        )
        unposted = unposted.vstack(
            unplanned.select(
                "customer",
                pl.concat_str([pl.lit("invoice:"), pl.col("id")]).alias("doc_key"),
                pl.when(pl.col("quarantined").is_not_null())
                .then(pl.lit("quarantined"))
                .otherwise(pl.lit("not planned"))
                .alias("status"),
                pl.col("amount_remaining").alias("amount"),
                pl.col("quarantined").alias("reason"),
            )
        )
        docs_by_customer: dict[str, list[dict[str, Any]]] = {}
        for d in unposted.sort("customer", "doc_key").iter_rows(named=True):
            docs_by_customer.setdefault(str(d["customer"]), []).append(
                {k: d[k] for k in ("doc_key", "status", "amount", "reason")}
            )
        customers = []
        for r in rows.sort(
            pl.col("unexplained").abs(),
            pl.col("difference").abs(),
            pl.col("stripe_open"),
            "customer",
            descending=[True, True, True, False],
        ).iter_rows(named=True):
            cus = str(r["customer"])
            customers.append(
                {
                    "customer": cus,
                    "name": names.get(cus),
                    "sage_open": r["sage_open"],
                    "stripe_open": r["stripe_open"],
                    "difference": r["difference"],
                    "explained": r["explained"],
                    "unexplained": r["unexplained"],
                    "credit_balance": balances.get(cus, 0),
                    "documents": docs_by_customer.get(cus, [])[:20] if r["difference"] else [],
                }
            )
        total = {
            k: int(rows[k].sum() or 0)
            for k in ("sage_open", "stripe_open", "difference", "explained", "unexplained")
        }
        out.append(
            {
                "currency": currency,
                **total,
                "customers": len(customers),
                "customers_with_difference": sum(1 for c in customers if c["difference"]),
                "customers_unexplained": [c for c in customers if c["unexplained"]],
                "credit_balances": sum(v for v in balances.values() if v < 0),
                "rows": customers[:ROW_LIMIT],
            }
        )
    return out


def unexplained_messages(tie_out: list[dict[str, Any]]) -> list[str]:
    """One line per customer whose difference nothing explains, naming the amounts."""
    from stripe_sage.money import to_decimal_string

    out = []
    for t in tie_out:
        cur = t["currency"]
        for c in t["customers_unexplained"]:
            out.append(
                f"AR {cur} {c['customer']}: Sage open {to_decimal_string(c['sage_open'], cur)}, "
                f"Stripe open {to_decimal_string(c['stripe_open'], cur)}, unexplained "
                f"{to_decimal_string(c['unexplained'], cur)}"
            )
    return out
