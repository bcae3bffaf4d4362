"""``stripe-sage mapping preview``: staged Stripe rows beside the Sage payloads the mapping
makes of them, in the terminal and as an HTML page; nothing is posted. A mapping error names
the file and line, so a finance analyst can change a mapping and see the effect."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from stripe_sage.mapping import Mapping
from stripe_sage.plan.cash_receipts import plan_charges
from stripe_sage.plan.credit_memos import plan_refunds, refunded_invoices
from stripe_sage.plan.customers import (
    customer_columns,
    guest_customer_key,
    plan_customers,
    plan_guest_customer,
)
from stripe_sage.plan.invoices import plan_invoices
from stripe_sage.plan.items import plan_items
from stripe_sage.plan.orders import plan_orders
from stripe_sage.reconcile.report import plan_payouts
from stripe_sage.store.staging import Staging

SHOWN = {
    "charges": (
        "id",
        "amount",
        "currency",
        "customer",
        "status",
        "captured",
        "billing_name",
        "card_brand",
        "erp_order_id",
    ),
    "refunds": ("id", "amount", "currency", "charge", "status", "reason"),
    "customers": (
        "id",
        "name",
        "email",
        "charge_billing_name",
        "country",
        "sage_customer_id",
        "deleted",
    ),
    "invoices": ("id", "total", "tax", "currency", "customer", "status"),
    "products": ("id", "name", "product_type", "sage_item", "active"),
    # Payout journals: a line in suspense (a reporting category the mapping does not know)
    # shows as the journal's flag.
    "payouts": ("id", "amount", "currency", "status", "automatic", "arrival_date"),
    "checkout_sessions": (
        "id",
        "payment_intent",
        "customer",
        "status",
        "currency",
        "amount_subtotal",
        "amount_discount",
        "amount_shipping",
        "amount_tax",
        "amount_total",
        "invoice_creation",
        "invoice",
    ),
}


def _notes(stream: str, row: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """What a default did to this record, in words (the full name where it was shortened)."""
    notes = []
    if stream == "customers":
        for d in docs:
            sent = d["payload"].get("name")
            if sent is not None and sent != row.get("name"):
                how = "no name in Stripe" if not row.get("name") else "shortened to fit Sage"
                notes.append(f"name: {how}; Stripe: {row.get('name')!r}, Sage: {sent!r}")
    if stream == "payouts":
        if row.get("automatic") is False:
            notes.append("manual payout: not itemised; Bank Dr / Clearing Cr its amount")
        for d in docs:
            if d.get("flag"):
                notes.append(f"to suspense: {d['flag']}")
    if stream == "checkout_sessions":
        if row.get("invoice_creation"):
            notes.append(
                f"created with invoice_creation: posts through its Billing invoice "
                f"{row.get('invoice')}, not as an order"
            )
        elif row.get("status") != "complete":
            notes.append(f"{row.get('status')}: nothing is posted until the session completes")
        else:
            notes.append(
                f"the payment of {row.get('payment_intent')} posts only its receipt, applied "
                "to this order's invoice"
            )
    if stream == "charges":
        if row.get("captured") is False:
            notes.append("not captured: nothing is posted until it is (never, if released)")
        if row.get("customer") is None and any(d["doc_type"] != "customer" for d in docs):
            notes.append("guest checkout: posted to the mapping's guest customer")
    return notes


def _line_item_notes(items: Any) -> dict[str, list[str]]:
    """Each session's Stripe line items, in words, beside the order's lines."""
    out: dict[str, list[str]] = {}
    for it in items.sort("session", "position").iter_rows(named=True):
        tax = it["amount_tax"] or 0
        how = "incl." if it["tax_inclusive"] else "excl."
        out.setdefault(it["session"], []).append(
            f"line item: {it['quantity']} × {it['description']} ({it['product']}) "
            f"subtotal {it['amount_subtotal']}, discount {it['amount_discount']}, "
            f"tax {tax} {how}"
        )
    return out


def preview(
    st: Staging,
    mapping: Mapping,
    stream: str,
    limit: int,
    ids: list[str] | None = None,
    known_orders: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``[{"stripe": {...}, "documents": [{"doc_type", "payload", "error", "flag"}],
    "notes": [...]}]``. ``known_orders``: the ERP order ids Sage has (None: not checked)."""
    where = "WHERE id IN (SELECT unnest(?::VARCHAR[]))" if ids else ""
    params: list[Any] = [ids] if ids else []
    select = customer_columns() if stream == "customers" else "s.*"
    rows = st.frame(
        f"SELECT {select} FROM staging.{stream} s {where} ORDER BY created DESC LIMIT ?",
        [*params, limit],
    )
    if stream == "charges":
        docs = plan_charges(
            rows,
            st.table("balance_transactions"),
            st.table("invoice_payments"),
            mapping,
            known_orders=known_orders,
        )
    elif stream == "refunds":
        docs = plan_refunds(
            rows,
            st.table("charges"),
            st.table("balance_transactions"),
            mapping,
            charge_refunds=st.table("refunds"),
            refunded_invoices=refunded_invoices(st.table("invoice_payments"), st.table("invoices")),
        )
    elif stream == "customers":
        docs = plan_customers(rows, mapping)
    elif stream == "invoices":
        docs = plan_invoices(
            rows, st.table("invoice_lines"), mapping, tax_rates=st.table("tax_rates")
        )
    elif stream == "products":  # product → item (item: created, item_link: metadata.sage_item)
        docs = plan_items(rows, mapping)
    elif stream == "payouts":
        with st.registered("_preview", rows.select("id")):
            items = st.frame(
                "SELECT i.* FROM staging.payout_items i WHERE i.payout IN (SELECT id FROM _preview)"
            )
            bts = st.frame(
                "SELECT b.* FROM staging.balance_transactions b WHERE b.id IN ("
                "SELECT i.balance_transaction FROM staging.payout_items i "
                "WHERE i.payout IN (SELECT id FROM _preview) "
                "UNION ALL SELECT failure_balance_transaction FROM staging.payouts "
                "WHERE id IN (SELECT id FROM _preview))"
            )
        docs = plan_payouts(rows, items, bts, mapping)
    elif stream == "checkout_sessions":  # a session beside its sales order and invoice
        with st.registered("_preview", rows.select("id")):
            items = st.frame(
                "SELECT s.*, s.product IN (SELECT id FROM staging.products) AS product_staged "
                "FROM staging.checkout_line_items s WHERE s.session IN (SELECT id FROM _preview)"
            )
        docs = plan_orders(rows, items, mapping)
        line_notes = _line_item_notes(items)
    else:
        raise ValueError(f"no preview for {stream!r}: choose one of {', '.join(SHOWN)}")
    by_source: dict[str, list[dict[str, Any]]] = {}
    for d in docs.iter_rows(named=True):
        source = d["stripe_id"].split(":")[-1]
        by_source.setdefault(source, []).append(
            {
                "doc_type": d["doc_type"],
                "payload": json.loads(d["payload"]),
                "error": d["error"],
                "flag": d["flag"],
            }
        )
    cols = [c for c in SHOWN[stream] if c in rows.columns]
    out = []
    for r in rows.iter_rows(named=True):
        documents = by_source.get(r["id"], [])
        notes = _notes(stream, r, documents)
        if stream == "checkout_sessions":
            notes = line_notes.get(r["id"], []) + notes
        out.append({"stripe": {c: r[c] for c in cols}, "documents": documents, "notes": notes})
    guest = guest_customer_key(mapping)
    if stream == "charges" and guest and rows["customer"].null_count():
        # The guest customer those charges post to (created once, on first need).
        g = plan_guest_customer(mapping, in_sage=False).row(0, named=True)
        out.append(
            {
                "stripe": {"id": guest, "customer": None},
                "documents": [
                    {
                        "doc_type": g["doc_type"],
                        "payload": json.loads(g["payload"]),
                        "error": g["error"],
                        "flag": None,
                    }
                ],
                "notes": ["guest customer: created once, on the first guest charge"],
            }
        )
    return out


def render_terminal(items: list[dict[str, Any]]) -> str:
    out = []
    for item in items:
        s = item["stripe"]
        out.append("  ".join(f"{k}={v}" for k, v in s.items()))
        for d in item["documents"] or [{"doc_type": "-", "payload": "no document", "error": None}]:
            body = json.dumps(d["payload"], ensure_ascii=False)
            out.append(f"    → {d['doc_type']}: {body}")
            if d["error"]:
                out.append(f"      ! {d['error']}")
            if d.get("flag"):
                out.append(f"      ⚑ {d['flag']}")
        for note in item.get("notes", []):
            out.append(f"    · {note}")
    return "\n".join(out)


def render_html(items: list[dict[str, Any]], stream: str, mapping_name: str) -> str:
    rows = []
    for item in items:
        stripe = "<br>".join(
            f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}"
            for k, v in item["stripe"].items()
        )
        docs = "".join(
            f"<div><b>{html.escape(d['doc_type'])}</b><pre>"
            f"{html.escape(json.dumps(d['payload'], indent=2, ensure_ascii=False))}</pre>"
            + (f"<p class='err'>{html.escape(d['error'])}</p>" if d["error"] else "")
            + (f"<p class='flag'>⚑ {html.escape(d['flag'])}</p>" if d.get("flag") else "")
            + "</div>"
            for d in item["documents"]
        ) + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in item.get("notes", []))
        rows.append(f"<tr><td>{stripe}</td><td>{docs or 'no document'}</td></tr>")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Mapping preview: {html.escape(stream)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px}} td{{vertical-align:top;
border-bottom:1px solid #ddd;padding:6px}} pre{{margin:0;font-size:12px}}
.err{{color:#c53030}} .flag{{color:#b7791f}}
.note{{color:#4a5568;font-size:12px}}</style></head><body>
<h1>Mapping preview: {html.escape(stream)}</h1><p>Mapping: {html.escape(mapping_name)}.
Nothing was posted.</p><table><tr><th>Stripe (staged)</th><th>Sage payload</th></tr>
{"".join(rows)}</table></body></html>"""


def write_html(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
