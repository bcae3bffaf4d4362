"""The reconciliation report as one self-contained HTML page (inline SVG, no scripts), for a
controller who would rather look at a chart than read a table."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any

import polars as pl

from stripe_sage.money import to_decimal_string
from stripe_sage.reconcile.ar import AR_AMOUNTS

SERIES = (("gross", "#2b6cb0"), ("fees", "#c53030"), ("net", "#2f855a"), ("payouts", "#805ad5"))
STATUS_COLOUR = {
    "matched": "#2f855a",
    "mismatch": "#c53030",
    "unposted": "#dd6b20",
    "pending": "#718096",
    "manual": "#b7791f",
    "failed": "#9b2c2c",
}


def daily_series(st: Any) -> pl.DataFrame:
    """Per day: gross charges, fees, net of all activity, and payouts arriving."""
    return st.frame("""
        WITH b AS (
            SELECT CAST(created AS DATE) AS day,
                CAST(sum(amount) FILTER (WHERE reporting_category = 'charge') AS BIGINT) AS gross,
                CAST(sum(fee) AS BIGINT) AS fees,
                CAST(sum(net) FILTER (WHERE type <> 'payout') AS BIGINT) AS net
            FROM staging.balance_transactions GROUP BY 1),
        p AS (SELECT CAST(arrival_date AS DATE) AS day, CAST(sum(amount) AS BIGINT) AS payouts
              FROM staging.payouts WHERE status IN ('paid', 'in_transit') GROUP BY 1)
        SELECT day, coalesce(gross, 0) AS gross, coalesce(fees, 0) AS fees,
            coalesce(net, 0) AS net, coalesce(payouts, 0) AS payouts
        FROM b FULL JOIN p USING (day) ORDER BY day""")


def _chart(daily: pl.DataFrame, currency: str, width: int = 900, height: int = 260) -> str:
    if daily.is_empty():
        return "<p>No activity.</p>"
    days = daily["day"].to_list()
    values = {name: daily[name].to_list() for name, _ in SERIES}
    top = max(max(abs(v) for v in vals) for vals in values.values()) or 1
    left, bottom = 70, 30
    plot_w, plot_h = width - left - 10, height - bottom - 10
    step = plot_w / max(len(days), 1)
    bar = max(step / (len(SERIES) + 1), 1)
    parts = [
        f'<svg role="img" aria-label="daily gross, fees, net and payouts" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
    ]
    zero = 10 + plot_h / 2 if any(v < 0 for vals in values.values() for v in vals) else 10 + plot_h
    scale = (zero - 10) / top
    parts.append(f'<line x1="{left}" y1="{zero}" x2="{width - 10}" y2="{zero}" stroke="#999"/>')
    parts.append(
        f'<text x="4" y="16" font-size="11">{to_decimal_string(int(top), currency)}</text>'
    )
    for i, day in enumerate(days):
        x0 = left + i * step
        for k, (name, colour) in enumerate(SERIES):
            v = values[name][i]
            h = abs(v) * scale
            y = zero - h if v >= 0 else zero
            parts.append(
                f'<rect x="{x0 + k * bar:.1f}" y="{y:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{day} {name} '
                f"{to_decimal_string(v, currency)}</title></rect>"
            )
        if i % max(len(days) // 10, 1) == 0:
            parts.append(f'<text x="{x0:.1f}" y="{height - 8}" font-size="10">{day}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="color:{c}">&#9632; {n}</span>' for n, c in SERIES)
    return "".join(parts) + f"<p>{legend}</p>"


def render(
    rep: pl.DataFrame,
    daily: pl.DataFrame,
    clearing: list[dict[str, Any]],
    *,
    title: str = "Stripe payout reconciliation",
    balance: pl.DataFrame | None = None,
    suspense: pl.DataFrame | None = None,
    ar: list[dict[str, Any]] | None = None,
    disputes: pl.DataFrame | None = None,
    fx: list[dict[str, Any]] | None = None,
) -> str:
    currency = rep["currency"][0] if rep.height else "USD"
    counts = (
        rep.group_by("recon_status").len().sort("recon_status").to_dicts() if rep.height else []
    )
    summary = ", ".join(f"{c['len']} {c['recon_status']}" for c in counts) or "no payouts"
    cols = (
        "payout",
        "kind",
        "arrival_date",
        "status",
        "amount",
        "gross",
        "fees",
        "refunds",
        "disputes",
        "other",
        "net",
        "bank_line",
        "suspense",
        "journal_no",
        "recon_status",
        "difference",
    )
    money = {
        "amount",
        "gross",
        "fees",
        "refunds",
        "disputes",
        "other",
        "net",
        "bank_line",
        "suspense",
        "difference",
    }
    rows = []
    for r in rep.iter_rows(named=True):
        cells = []
        for c in cols:
            v = r.get(c)
            if c in money and v is not None:
                text = to_decimal_string(int(v), r["currency"])
                cells.append(f'<td class="num">{text}</td>')
            elif c == "recon_status":
                colour = STATUS_COLOUR.get(str(v), "#000")
                cells.append(
                    f'<td style="color:{colour};font-weight:bold">{html.escape(str(v))}</td>'
                )
            else:
                cells.append(f"<td>{html.escape('' if v is None else str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    clearing_rows = "".join(
        f"<tr><td>{c['currency']}</td><td>{c['account']}</td>"
        f"<td class='num'>{to_decimal_string(c['sage_clearing'], c['currency'])}</td>"
        f"<td class='num'>{to_decimal_string(c['stripe_unpaid_gross'], c['currency'])}</td>"
        f"<td class='num'>{to_decimal_string(c['difference'], c['currency'])}</td>"
        f"<td class='num'>{to_decimal_string(c['unexplained'], c['currency'])}</td>"
        f"<td>{len(c['unposted_documents'])}</td></tr>"
        for c in clearing
    )
    fx_rows = "".join(
        f"<tr><td>{f['currency']}</td><td>{f['account']}</td>"
        f"<td class='num'>{to_decimal_string(f['gain'], f['currency'])}</td>"
        f"<td class='num'>{to_decimal_string(f['loss'], f['currency'])}</td>"
        f"<td class='num'>{to_decimal_string(f['net'], f['currency'])}</td>"
        f"<td>{f['journals']}</td></tr>"
        for f in fx or []
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    balance_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape('' if r.get(c) is None else str(r.get(c)))}</td>"
            for c in ("kind", "reference", "entry_date", "status", "journal_no", "flag")
        )
        + "</tr>"
        for r in (balance.to_dicts() if balance is not None else [])
    )
    suspense_rows = "".join(
        f"<tr><td>{html.escape(str(r['doc_key']))}</td><td>{html.escape(str(r['flag']))}</td></tr>"
        for r in (suspense.to_dicts() if suspense is not None else [])
    )
    head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
    ar_summary, ar_rows = _ar_tables(ar or [])
    dispute_rows = _dispute_rows(disputes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #1a202c; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border-bottom: 1px solid #e2e8f0; padding: 4px 8px; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="summary">{len(rep)} payouts: {html.escape(summary)}. Generated {generated}.</p>
<h2>Daily gross, fees, net and payouts ({currency})</h2>
{_chart(daily, currency)}
<h2>Stripe Clearing check</h2>
<table id="clearing"><tr><th>currency</th><th>account</th><th>Sage clearing</th>
<th>Stripe gross not paid out</th><th>difference</th><th>unexplained</th>
<th>unposted documents</th></tr>{clearing_rows}</table>
<h2>AR tie-out: Sage open AR against Stripe's open invoices</h2>
<table id="ar-summary"><tr><th>currency</th><th>customers</th><th>Sage open AR</th>
<th>Stripe open (amount remaining)</th><th>difference</th><th>explained by unposted</th>
<th>unexplained</th><th>customers with a difference</th><th>Stripe credit balances</th></tr>
{ar_summary}</table>
<table id="ar"><tr><th>currency</th><th>customer</th><th>name</th><th>Sage open AR</th>
<th>Stripe open</th><th>difference</th><th>explained</th><th>unexplained</th>
<th>credit balance</th><th>documents behind the difference</th></tr>{ar_rows}</table>
<h2>Realized FX gain/loss (posted)</h2>
<table id="realized-fx"><tr><th>currency</th><th>account</th><th>gains</th><th>losses</th>
<th>net (gain +)</th><th>journals</th></tr>{fx_rows}</table>
<h2>Payouts</h2>
<table id="payouts"><tr>{head}</tr>{"".join(rows)}</table>
<h2>Top-ups and daily journals (accounts paid out manually)</h2>
<table id="balance"><tr><th>kind</th><th>reference</th><th>date</th><th>status</th>
<th>journal no</th><th>flag</th></tr>{balance_rows}</table>
<h2>Posted to suspense (reporting categories the mapping does not know)</h2>
<table id="suspense"><tr><th>document</th><th>what</th></tr>{suspense_rows}</table>
<h2>Lost disputes on invoiced sales (booked in the payout journal; the invoice stays paid)</h2>
<table id="invoice-disputes"><tr><th>dispute</th><th>amount</th><th>reason</th><th>charge</th>
<th>invoice</th><th>Stripe number</th><th>Sage invoice</th><th>customer</th><th>name</th>
<th>payout</th></tr>{dispute_rows}</table>
</body></html>"""


def _td(v: Any, num: bool = False) -> str:
    text = html.escape("" if v is None else str(v))
    return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"


def _ar_tables(ar: list[dict[str, Any]]) -> tuple[str, str]:
    """The tie-out's totals per currency, and its customers (those with a difference
    first), each with the unposted documents behind the difference."""
    summary, rows = [], []
    for t in ar:
        cur = t["currency"]

        def m(v: int, cur: str = cur) -> str:
            return to_decimal_string(int(v), cur)

        colour = "#c53030" if t["unexplained"] else "#2f855a"
        summary.append(
            "<tr>"
            + _td(cur)
            + _td(t["customers"])
            + "".join(
                _td(m(t[k]), True) for k in ("sage_open", "stripe_open", "difference", "explained")
            )
            + f'<td class="num" style="color:{colour};font-weight:bold">{m(t["unexplained"])}</td>'
            + _td(t["customers_with_difference"])
            + _td(m(t["credit_balances"]), True)
            + "</tr>"
        )
        for c in t["rows"]:
            docs = "; ".join(
                f"{d['doc_key']} {d['status']} {m(d['amount'])}"
                + (f" ({d['reason']})" if d["reason"] else "")
                for d in c["documents"]
            )
            rows.append(
                "<tr>"
                + _td(cur)
                + _td(c["customer"])
                + _td(c["name"])
                + "".join(_td(m(c[k]), True) for k in AR_AMOUNTS)
                + _td(docs)
                + "</tr>"
            )
    return "".join(summary), "".join(rows)


def _dispute_rows(disputes: pl.DataFrame | None) -> str:
    if disputes is None:
        return ""
    return "".join(
        "<tr>"
        + _td(d["dispute"])
        + _td(to_decimal_string(int(d["amount"]), d["currency"]), True)
        + "".join(
            _td(d[k])
            for k in (
                "reason",
                "charge",
                "invoice",
                "invoice_number",
                "sage_invoice_no",
                "customer",
                "customer_name",
                "payout",
            )
        )
        + "</tr>"
        for d in disputes.iter_rows(named=True)
    )
