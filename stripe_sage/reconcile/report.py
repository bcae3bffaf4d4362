"""Payout reconciliation with the clearing-account method (docs/accounting.md).

Receipts, credit memos and refund-failure journals already move each charge's gross amount,
each refund and each failed refund through Stripe Clearing. A payout's journal then closes
what it paid out of clearing and recognises what only Stripe knew:

    Dr Bank                 payout.amount
    Dr Merchant Fees        Σ fee of its balance transactions (charge fees, Billing fees)
    Dr Chargebacks          Σ disputed amounts  (Cr when a dispute was won back)
    Dr Dispute Fees         Σ dispute fees      (Cr when a fee came back)
    Dr/Cr other accounts    any other mapped category (adjustments, FX fees, ...)
        Cr Stripe Clearing  Σ gross of the transactions already recognised elsewhere

so each paid-out transaction's clearing movements net to zero, and the Bank line equals the
bank deposit to the cent. Every balance transaction category must be recognised elsewhere or
mapped to an account; otherwise the payout fails with a clear message and posts nothing.
"""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl

from stripe_sage.mapping import Mapping
from stripe_sage.money import exponent, to_decimal_string
from stripe_sage.plan.documents import _docs, empty_docs
from stripe_sage.reconcile.balance import (
    OWN_DOCUMENT,
    Recognised,
    Suspended,
    daily_lines,
    day_reference,
    manual_payout_lines,
    recognise,
    topup_lines,
)
from stripe_sage.reconcile.balance import (
    account as gl_account,
)
from stripe_sage.stripe.client import StripeReader

# Categories whose gross amount reaches clearing through their own Sage document.
RECOGNISED_ELSEWHERE = OWN_DOCUMENT
DISPUTE_CATEGORIES = {"dispute", "dispute_reversal"}


# -- itemising payouts ---------------------------------------------------------------------
def payouts_to_itemise(st: Any) -> list[str]:
    """Paid (or paid-then-failed) automatic payouts whose transactions are not stored yet."""
    return list(st.unitemised_payouts())


def read_payout_schedule(reader: StripeReader, st: Any) -> str | None:
    """``GET /v1/account``: the payout schedule's interval (``manual`` for an account paid
    out only manually), recorded in ``ops.stripe_account``. A key not allowed to read the
    account keeps what was recorded before (None: never read; automatic assumed)."""
    from stripe_sage.errors import AuthenticationError, NotFoundError

    try:
        acct = reader.request("get", "/v1/account")
    except (NotFoundError, AuthenticationError):
        return None
    interval = (((acct.get("settings") or {}).get("payouts") or {}).get("schedule") or {}).get(
        "interval"
    )
    st.set_payout_interval(str(acct.get("id") or ""), interval)
    return str(interval) if interval else None


def itemise_payouts(
    reader: StripeReader, st: Any, run_id: str, payout_ids: list[str], workers: int = 4
) -> int:
    """``GET /v1/balance_transactions?payout=po_…`` for each payout (the list includes the
    payout's own transaction). A paid payout's set never changes, so it is read once."""
    from concurrent.futures import ThreadPoolExecutor

    def fetch(po: str) -> tuple[str, list[dict[str, Any]]]:
        out: list[dict[str, Any]] = []
        for page in reader.list_pages("/v1/balance_transactions", {"payout": po}):
            out.extend(page)
        return po, out

    total = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="itemise") as pool:
        for po, bts in pool.map(fetch, payout_ids):
            with st.transaction():
                st.upsert_raw(
                    "balance_transactions",
                    bts,
                    source="list",
                    run_id=run_id,
                    api_version=reader.api_version,
                )
                st.record_payout_items(po, [b["id"] for b in bts])
            total += len(bts)
    return total


# -- which transactions a daily journal recognises -----------------------------------------
def daily_recognition_sql(manual_only: bool, bt: str = "b") -> str:
    """A SQL condition on the balance transaction aliased ``bt``: no automatic payout
    recognises it, so the daily journal of its day does (docs/accounting.md, section 6).

    On an account paid out only manually that is every transaction no payout itemises. On an
    account with automatic payouts it is what a manual (or instant) payout swept in between:
    not itemised by any automatic payout although one itemises a transaction of the same
    currency that became available after it (a later automatic payout would have taken it),
    and only once every paid automatic payout is itemised (one not read yet could be the
    payout that holds it). The payouts' own transactions do not count as "later": an
    automatic payout is created after what it pays out became available."""
    unitemised = (
        f"NOT EXISTS (SELECT 1 FROM staging.payout_items i WHERE i.balance_transaction = {bt}.id)"
    )
    if manual_only:
        return unitemised
    return f"""{unitemised}
        AND {bt}.available_on < (
            SELECT max(x.available_on) FROM staging.payout_items i
            JOIN staging.balance_transactions x ON x.id = i.balance_transaction
            WHERE x.reporting_category <> 'payout' AND x.currency = {bt}.currency)
        AND NOT EXISTS (
            SELECT 1 FROM staging.payouts p WHERE p.automatic
              AND p.status IN ('paid', 'failed')
              AND NOT EXISTS (SELECT 1 FROM staging.payout_items i WHERE i.payout = p.id))"""


# -- planning payout journals --------------------------------------------------------------
def _account(mapping: Mapping, name: str, currency: str) -> str | None:
    return gl_account(mapping, name, currency)


def payout_journal(
    payout: dict[str, Any], members: list[dict[str, Any]], mapping: Mapping
) -> tuple[list[tuple[str, int]], str | None, list[Suspended]]:
    """Signed amounts per account (debit > 0) for one automatic payout, or a reason it cannot
    post, and the transactions that went to suspense (unknown reporting categories)."""
    currency = payout["currency"]
    net = sum(m["net"] for m in members)
    if net != payout["amount"]:
        return (
            [],
            (
                f"payout {payout['id']}: its balance transactions net to {net}, not the "
                f"payout amount {payout['amount']} (unexplained remainder "
                f"{payout['amount'] - net})"
            ),
            [],
        )
    rec = recognise(members, mapping, currency)
    rec.add(mapping, "bank", currency, payout["amount"])
    rec.add(mapping, "clearing", currency, -rec.own_document_gross)
    if rec.problem:
        return [], f"payout {payout['id']}: {rec.problem}", rec.suspended
    lines = rec.lines()
    if sum(v for _, v in lines) != 0:
        off = sum(v for _, v in lines)
        return [], f"payout {payout['id']}: journal would be unbalanced by {off}", rec.suspended
    return lines, None, rec.suspended


def payout_lines(
    payout: dict[str, Any], members: list[dict[str, Any]], mapping: Mapping
) -> tuple[list[tuple[str, int]], str | None]:
    """Signed amounts per account (debit > 0) for one payout, or a reason it cannot post."""
    lines, error, _ = payout_journal(payout, members, mapping)
    return lines, error


class _Journals:
    """Journal entry rows in the planners' frame shape (see ``_docs``)."""

    def __init__(self, mapping: Mapping) -> None:
        self.mapping = mapping
        self.tz = ZoneInfo(mapping.timezone)
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        key: str,
        reference: str,
        when: dt.datetime | dt.date | None,
        desc: str,
        currency: str,
        lines: list[tuple[str | None, int]],
        deps: list[str],
        error: str | None,
        flag: str | None = None,
    ) -> None:
        money = [(a, _money(max(v, 0), currency), _money(max(-v, 0), currency)) for a, v in lines]
        if isinstance(when, dt.datetime):
            when = when.astimezone(self.tz).date()
        self.rows.append(
            {
                # A reversal posts after the journal it reverses: one phase later.
                "doc_type": "journal_entry",
                "id": key,
                "depends_on": deps,
                "error": error,
                "flag": flag,
                "phase": 4 if deps else 3,
                "doc_date": when,
                "payload": {
                    "entry_date": "",
                    "source_code": self.mapping.source_code,
                    "description": desc[:60],
                    "reference": reference,
                    "currency": currency,
                    "lines": [
                        {"account": a or "", "debit": d, "credit": c, "description": desc[:60]}
                        for a, d, c in money
                    ],
                },
            }
        )

    def frame(self, periods: pl.DataFrame | None) -> pl.DataFrame:
        if not self.rows:
            return empty_docs()
        frame = pl.DataFrame(self.rows).with_columns(
            pl.col("doc_date").cast(pl.Date),
            pl.col("error").cast(pl.String),
            pl.col("flag").cast(pl.String),
            pl.col("depends_on").cast(pl.List(pl.String)),
            pl.col("payload").struct.with_fields(
                pl.col("doc_date").cast(pl.String).fill_null("").alias("entry_date")
            ),
        )
        return _docs(frame, self.mapping, periods)


def plan_payouts(
    payouts: pl.DataFrame,
    items: pl.DataFrame,
    bts: pl.DataFrame,
    mapping: Mapping,
    periods: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One journal entry per paid payout; a reversing one for a payout that failed after.

    An automatic payout's journal recognises what it itemises (fees, disputes, Connect and
    other categories; unknown ones to suspense, flagged); a manual payout, which Stripe does
    not itemise, moves its amount from clearing to the bank. Payouts are few (one a day), and
    classifying each one's transactions reads best as plain Python; the period policy and
    payload rendering are the shared Polars steps."""
    done = payouts.filter(pl.col("status").is_in(["paid", "failed"]))
    if done.is_empty():
        return empty_docs()
    members = (
        items.join(bts, left_on="balance_transaction", right_on="id", how="inner")
        if not items.is_empty()
        else pl.DataFrame()
    )
    if not members.is_empty():
        # Sorted: a journal's lines follow its transactions' order, the same on every plan
        # (a join's row order is not guaranteed; a re-planned or previewed journal whose
        # lines moved would read as changed).
        members = members.filter(pl.col("type") != "payout").sort(
            "payout", "created", "balance_transaction"
        )
    grouped = (
        {key[0]: g.to_dicts() for key, g in members.group_by("payout", maintain_order=True)}
        if not members.is_empty()
        else {}
    )
    itemised = set(items["payout"].to_list()) if not items.is_empty() else set()
    created = (
        dict(zip(bts["id"].to_list(), bts["created"].to_list(), strict=True))
        if not bts.is_empty()
        else {}
    )
    out = _Journals(mapping)
    for p in done.iter_rows(named=True):
        cur = p["currency"]
        if p["automatic"]:
            if p["id"] not in itemised:
                continue  # itemised by the next run
            lines, error, suspended = payout_journal(p, grouped.get(p["id"], []), mapping)
            flag = _suspense_flag(suspended, cur)
            desc = f"Stripe payout {p['id']}"
            journal_lines: list[tuple[str | None, int]] = list(lines)
        else:
            journal_lines, error, flag = manual_payout_lines(mapping, cur, p["amount"]), None, None
            desc = f"Stripe manual payout {p['id']}"
        out.add(p["id"], p["id"], p["arrival_date"], desc, cur, journal_lines, [], error, flag)
        if p["status"] == "failed":
            fbt = p["failure_balance_transaction"]
            when = created.get(fbt)
            out.add(
                f"payout_failure:{p['id']}",
                fbt,
                when,
                f"Stripe payout {p['id']} failed",
                cur,
                [
                    (_account(mapping, "clearing", cur), p["amount"]),
                    (_account(mapping, "bank", cur), -p["amount"]),
                ],
                [f"journal_entry:{p['id']}"],
                None if when else f"waiting: failure balance transaction {fbt} is not staged",
            )
    return out.frame(periods)


def _suspense_flag(suspended: list[Suspended], currency: str) -> str | None:
    return Recognised(suspended=suspended).flag(currency)


TOPUP_CATEGORIES = ("topup", "topup_reversal")


def plan_topups(
    bts: pl.DataFrame, mapping: Mapping, periods: pl.DataFrame | None = None
) -> pl.DataFrame:
    """A journal per top-up (Clearing Dr / Bank Cr, dated its creation, reference its
    ``tu_`` id) and per top-up reversal (the other way, reference its ``txn_`` id). Inside a
    later payout a top-up counts as already cleared (``OWN_DOCUMENT``)."""
    rows = bts.filter(pl.col("reporting_category").is_in(TOPUP_CATEGORIES))
    out = _Journals(mapping)
    for b in rows.sort("created", "id").iter_rows(named=True):
        cur = b["currency"].upper()
        reversal = b["reporting_category"] == "topup_reversal"
        source = b["source"] or b["id"]
        out.add(
            f"{b['reporting_category']}:{source}",
            b["id"] if reversal else source,
            b["created"],
            f"Stripe top-up {source}" + (" reversed" if reversal else ""),
            cur,
            topup_lines(mapping, cur, b["amount"]),
            # A reversal after the top-up it reverses, when both are in Stripe's records.
            [f"journal_entry:topup:{source}"]
            if reversal and source in set(rows["source"].to_list())
            else [],
            None,
        )
    return out.frame(periods)


def plan_daily_journals(
    bts: pl.DataFrame,
    mapping: Mapping,
    today: dt.date,
    periods: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One journal per settlement currency and UTC day before ``today`` recognising the
    fees and the categories no document posts of the transactions ``bts`` (those no
    automatic payout recognises: ``daily_recognition_sql``), Clearing the balancing line.
    Days whose transactions only move gross amounts (nothing to recognise) get no journal."""
    if bts.is_empty():
        return empty_docs()
    out = _Journals(mapping)
    created = pl.col("created")
    dtype = bts.schema["created"]
    utc = (
        created.dt.convert_time_zone("UTC")
        if isinstance(dtype, pl.Datetime) and dtype.time_zone
        else created.dt.replace_time_zone("UTC")
    )
    frame = bts.with_columns(
        utc.dt.date().alias("_day"),
        pl.col("currency").str.to_uppercase().alias("_cur"),
        pl.col("id").alias("balance_transaction"),
    ).filter(pl.col("_day") < today)
    for (day, cur), group in sorted(
        frame.group_by("_day", "_cur"), key=lambda kv: (kv[0][0], kv[0][1])
    ):
        rec = daily_lines(group.sort("created", "id").to_dicts(), mapping, str(cur))
        lines = rec.lines()
        if not lines:
            continue
        out.add(
            f"stripe_day:{cur}:{day}",
            day_reference(str(cur), day),
            day,
            f"Stripe fees and adjustments {day} (daily journal)",
            str(cur),
            list(lines),
            [],
            f"stripe day {day}: {rec.problem}" if rec.problem else None,
            rec.flag(str(cur)),
        )
    return out.frame(periods)


def _money(minor: int, currency: str) -> str:
    return to_decimal_string(minor, currency)


# -- the report ----------------------------------------------------------------------------
def report(
    st: Any,
    *,
    payout: str | None = None,
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
) -> pl.DataFrame:
    """Per payout: amount, gross, fees, refunds, disputes, other, net, Sage journal, bank
    line, status (matched / mismatch / pending / manual / failed) and the difference."""
    where: list[str] = ["TRUE"]
    params: list[Any] = []
    if payout:
        where.append("p.id = ?")
        params.append(payout)
    if date_from:
        where.append("p.arrival_date >= ?")
        params.append(date_from)
    if date_to:
        where.append("p.arrival_date < ? + INTERVAL 1 DAY")
        params.append(date_to)
    return st.frame(
        f"""
        WITH m AS (
            SELECT i.payout,
                CAST(sum(b.amount) FILTER (WHERE b.reporting_category = 'charge') AS BIGINT)
                    AS gross,
                CAST(sum(b.fee) AS BIGINT) AS fees,
                CAST(sum(b.amount) FILTER (WHERE b.reporting_category IN ('refund',
                    'refund_failure')) AS BIGINT) AS refunds,
                CAST(sum(b.amount) FILTER (WHERE b.reporting_category IN ('dispute',
                    'dispute_reversal')) AS BIGINT) AS disputes,
                CAST(sum(b.amount) FILTER (WHERE b.reporting_category NOT IN ('charge',
                    'refund', 'refund_failure', 'dispute', 'dispute_reversal')) AS BIGINT)
                    AS other,
                CAST(sum(b.net) AS BIGINT) AS net, count(*) AS transactions
            FROM staging.payout_items i JOIN staging.balance_transactions b
              ON b.id = i.balance_transaction
            WHERE b.type <> 'payout' GROUP BY i.payout),
        j AS (
            SELECT o.stripe_id AS payout, o.sage_id, o.status AS doc_status, o.last_error,
                o.payload FROM sage.outbox o
            WHERE o.doc_type = 'journal_entry' AND o.stripe_id LIKE 'po_%')
        SELECT p.id AS payout, CAST(p.arrival_date AS DATE) AS arrival_date, p.status,
            p.automatic, p.currency, p.amount, coalesce(m.gross, 0) AS gross,
            coalesce(m.fees, 0) AS fees, coalesce(m.refunds, 0) AS refunds,
            coalesce(m.disputes, 0) AS disputes, coalesce(m.other, 0) AS other,
            m.net, m.transactions, j.sage_id AS journal_no, j.doc_status AS journal_status,
            j.last_error, j.payload AS journal_payload,
            CASE WHEN p.automatic THEN 'automatic' ELSE 'manual' END AS kind,
            -- A manual payout is not itemised: its journal moves its amount from clearing
            -- to the bank ('manual' once posted); fees come in the daily journals.
            CASE WHEN NOT p.automatic AND p.status NOT IN ('paid', 'failed') THEN 'pending'
                 WHEN NOT p.automatic AND j.doc_status IS DISTINCT FROM 'posted' THEN 'unposted'
                 WHEN NOT p.automatic THEN 'manual'
                 WHEN p.status NOT IN ('paid', 'failed') THEN 'pending'
                 WHEN m.net IS NULL THEN 'pending'
                 WHEN m.net <> p.amount THEN 'mismatch'
                 WHEN j.doc_status IS DISTINCT FROM 'posted' THEN 'unposted'
                 WHEN p.status = 'failed' THEN 'failed'
                 ELSE 'matched' END AS recon_status,
            CASE WHEN p.automatic THEN p.amount - coalesce(m.net, p.amount) ELSE 0 END
                AS difference
        FROM staging.payouts p LEFT JOIN m ON m.payout = p.id LEFT JOIN j ON j.payout = p.id
        WHERE {" AND ".join(where)}
        ORDER BY p.arrival_date, p.id""",
        params,
    )


def add_bank_line(rep: pl.DataFrame, mapping: Mapping) -> pl.DataFrame:
    """The posted journal's Bank debit, in minor units, beside the payout amount, and what
    its journal put in suspense (reporting categories the mapping does not know)."""
    from stripe_sage.money import from_decimal_string

    bank: list[int | None] = []
    suspense: list[int] = []
    for payload, cur in zip(
        rep["journal_payload"].to_list(), rep["currency"].to_list(), strict=True
    ):
        value = None
        parked = 0
        if payload:
            body = json.loads(payload) if isinstance(payload, str) else payload
            account = _account(mapping, "bank", cur)
            value = (
                sum(
                    from_decimal_string(line["debit"], cur)
                    for line in body["lines"]
                    if line["account"] == account
                )
                or None
            )
            parked = sum(
                from_decimal_string(line["debit"], cur) - from_decimal_string(line["credit"], cur)
                for line in body["lines"]
                if line["account"] == mapping.accounts.suspense
            )
        bank.append(value)
        suspense.append(parked)
    out = rep.with_columns(
        pl.Series("bank_line", bank, dtype=pl.Int64),
        pl.Series("suspense", suspense, dtype=pl.Int64),
    ).drop("journal_payload")
    return out.with_columns(
        pl.when(
            pl.col("recon_status").is_in(["matched", "manual"])
            & (pl.col("bank_line") != pl.col("amount"))
        )
        .then(pl.lit("mismatch"))
        .otherwise(pl.col("recon_status"))
        .alias("recon_status")
    )


def balance_journals(st: Any) -> pl.DataFrame:
    """The journals of the balance that are not payouts: top-ups (and their reversals) and,
    on an account paid out manually, the daily fee journals; each with its Sage number,
    state, date, amount through clearing and flag (suspense)."""
    return st.frame(
        """
        SELECT o.doc_key, split_part(o.stripe_id, ':', 1) AS kind, o.payload->>'reference'
                AS reference, CAST(o.payload->>'entry_date' AS DATE) AS entry_date,
            o.payload->>'currency' AS currency, o.status, o.sage_id AS journal_no,
            o.last_error, f.flag
        FROM sage.outbox o LEFT JOIN ops.flags f USING (doc_key)
        WHERE o.doc_type = 'journal_entry' AND split_part(o.stripe_id, ':', 1) IN
            ('topup', 'topup_reversal', 'stripe_day')
        ORDER BY entry_date, o.doc_key"""
    )


def suspense_postings(st: Any) -> pl.DataFrame:
    """Journals with lines in suspense (``ops.flags``), newest first: what to map."""
    return st.frame(
        "SELECT doc_key, stripe_id, flag, flagged_at, run_id FROM ops.flags "
        "WHERE flag LIKE 'suspense:%' ORDER BY flagged_at DESC, doc_key"
    )


def invoice_disputes(st: Any) -> pl.DataFrame:
    """Lost disputes on invoice payments, linked to the invoice and its customer
    (docs/accounting.md §3): the payout journal books the loss (Chargebacks) and the invoice
    stays paid, as in Stripe; the report names the dispute, the charge, the invoice (Stripe
    number and Sage number), the customer and the payout whose journal booked it."""
    return st.frame(
        """
        SELECT d.id AS dispute, d.created, d.amount, d.currency, d.reason, d.charge,
            i.id AS invoice, i.number AS invoice_number, o.sage_id AS sage_invoice_no,
            i.customer, c.name AS customer_name,
            (SELECT min(pi.payout) FROM staging.payout_items pi
             WHERE list_contains(d.balance_transactions, pi.balance_transaction)) AS payout
        FROM staging.disputes d
        JOIN staging.invoice_payments p ON p.charge = d.charge AND p.status = 'paid'
        JOIN staging.invoices i ON i.id = p.invoice
        LEFT JOIN staging.customers c ON c.id = i.customer
        LEFT JOIN sage.outbox o ON o.doc_key = 'invoice:' || i.id
        WHERE d.status = 'lost'
        ORDER BY d.created, d.id"""
    )


def store(st: Any, rep: pl.DataFrame, run_id: str) -> None:
    """``ops.reconciliation``: one row per payout, as of the latest report."""
    frame = rep.with_columns(
        pl.lit(run_id).alias("run_id"), pl.lit(dt.datetime.now(dt.UTC)).alias("reported_at")
    )
    st.replace_reconciliation(frame)


def store_ar(st: Any, ar: list[dict[str, Any]], run_id: str) -> None:
    """``ops.ar_tie_out``: the latest AR tie-out per customer (minor units; those with a
    difference first, up to ``reconcile.ar.ROW_LIMIT`` per currency), for the console's
    reconciliation page and the analysts."""
    from stripe_sage.reconcile.ar import AR_TIE_OUT_COLUMNS

    rows = [
        {"currency": t["currency"], **{k: r[k] for k in AR_TIE_OUT_COLUMNS[1:]}}
        for t in ar
        for r in t["rows"]
    ]
    schema = {c: pl.Int64 for c in AR_TIE_OUT_COLUMNS} | {
        "currency": pl.String,
        "customer": pl.String,
        "name": pl.String,
    }
    frame = (
        pl.DataFrame(rows, schema=schema)
        .select(AR_TIE_OUT_COLUMNS)
        .with_columns(
            pl.lit(run_id).alias("run_id"), pl.lit(dt.datetime.now(dt.UTC)).alias("reported_at")
        )
    )
    st.replace_ar_tie_out(frame)


def clearing_check(st: Any, mapping: Mapping) -> list[dict[str, Any]]:
    """Sage's Stripe Clearing balance (from the documents posted) against the Stripe side:
    Σ gross of the transactions recognised by their own documents that no posted payout
    journal has cleared (docs/accounting.md, invariant 4). A difference comes with the documents
    that explain it (not posted, each with its state — dead, waiting, blocked, pending,
    quarantined — and its reason).

    A manual (or instant) payout's own transaction is what its journal posts, so it counts
    on the Stripe side, and so do the fees and other amounts of the ended days' daily
    journals (``daily_recognition_sql``): on an account paid out only manually the Stripe side
    is then its balance; on one with automatic payouts, the transactions a manual payout
    swept in between are recognised by their days' journals."""
    manual = st.payouts_manual_only()
    swept = daily_recognition_sql(manual)
    today = dt.datetime.now(dt.UTC).date()
    out = []
    for currency, account in mapping.accounts.clearing.items():
        sage = st.posted_clearing_balance(account, currency)
        scale = 10 ** exponent(currency)
        docs = st.frame(
            f"""
            WITH cleared AS (
                SELECT i.balance_transaction FROM staging.payout_items i
                JOIN sage.outbox o ON o.doc_key = 'journal_entry:' || i.payout
                WHERE o.status = 'posted'),
            own AS (
                SELECT b.id, b.amount, b.reporting_category, b.source,
                    CASE b.reporting_category
                        -- A charge that collected a written-off invoice: its recovery.
                        WHEN 'charge' THEN CASE WHEN EXISTS (SELECT 1 FROM sage.outbox r
                            WHERE r.doc_key = 'journal_entry:recovery:' || b.source)
                            THEN 'journal_entry:recovery:' || b.source
                            ELSE 'cash_receipt:' || b.source END
                        -- A refund a credit note names posts through the note's memo.
                        WHEN 'refund' THEN 'credit_memo:' || coalesce(
                            (SELECT min(cn.id) FROM staging.credit_notes cn
                             WHERE list_contains(cn.refunds, b.source)), b.source)
                        WHEN 'refund_failure' THEN 'journal_entry:refund_failure:' || b.source
                        WHEN 'payout_reversal' THEN 'journal_entry:payout_failure:' || b.source
                        WHEN 'topup' THEN 'journal_entry:topup:' || b.source
                        WHEN 'topup_reversal' THEN 'journal_entry:topup_reversal:' || b.source
                        WHEN 'payout' THEN 'journal_entry:' || b.source
                    END AS doc_key,
                    b.id IN (SELECT balance_transaction FROM cleared) AS is_cleared
                FROM staging.balance_transactions b
                WHERE b.currency = ?1 AND (b.reporting_category IN
                    ('charge', 'refund', 'refund_failure', 'payout_reversal', 'topup',
                     'topup_reversal')
                    -- A manual payout's own transaction is what its journal posts.
                    OR (b.reporting_category = 'payout' AND (?2 OR b.source IN
                        (SELECT id FROM staging.payouts WHERE NOT automatic))))),
            -- What each ended day's journal recognises (fees, and the whole amount of the
            -- categories no document posts) of the transactions no automatic payout does.
            daily AS (
                -- Its effect on clearing: less the fee, plus the amount (a dispute takes
                -- money out, an application fee brings it in).
                SELECT b.id, -b.fee + CASE WHEN b.reporting_category IN
                        (SELECT unnest(?3::VARCHAR[])) THEN 0 ELSE b.amount END AS amount,
                    b.reporting_category, b.source,
                    'journal_entry:stripe_day:' || upper(b.currency) || ':'
                        || CAST(CAST(timezone('UTC', b.created) AS DATE) AS VARCHAR) AS doc_key,
                    false AS is_cleared
                FROM staging.balance_transactions b
                WHERE b.currency = ?1
                  AND CAST(timezone('UTC', b.created) AS DATE) < ?4
                  AND {swept}),
            -- A receipt (memo) of a foreign sale puts the sale's share on clearing and its
            -- Realized FX journal the rest of the transaction: each explains its own part
            -- when it is not posted (the journal's clearing lines, from its planned payload).
            fx AS (
                SELECT o.doc_key, split_part(o.doc_key, ':', 3) AS source,
                    CASE split_part(o.doc_key, ':', 2) WHEN 'payment_fx' THEN 'charge'
                        ELSE 'refund' END AS reporting_category,
                    CAST(round(sum(CAST(l->>'debit' AS DECIMAL(18, 3))
                                   - CAST(l->>'credit' AS DECIMAL(18, 3))) * ?6) AS BIGINT)
                        AS amount
                FROM sage.outbox o, unnest(CAST(o.payload->'lines' AS JSON[])) t(l)
                WHERE (starts_with(o.doc_key, 'journal_entry:payment_fx:')
                       OR starts_with(o.doc_key, 'journal_entry:refund_fx:'))
                  AND o.payload->>'currency' = ?1 AND l->>'account' = ?5
                GROUP BY ALL),
            own_split AS (
                SELECT own.id, own.amount - coalesce(fx.amount, 0) AS amount,
                    own.reporting_category, own.source, own.doc_key, own.is_cleared
                FROM own LEFT JOIN fx USING (source, reporting_category)
                UNION ALL
                SELECT own.id, fx.amount, own.reporting_category, own.source, fx.doc_key,
                    own.is_cleared
                FROM own JOIN fx USING (source, reporting_category)),
            rec AS (SELECT * FROM own_split UNION ALL SELECT * FROM daily WHERE amount <> 0)
            SELECT rec.*,
                coalesce(o.status, CASE WHEN q.reason IS NOT NULL THEN 'quarantined'
                                        ELSE 'not planned' END) AS doc_status,
                coalesce(o.last_error, q.reason) AS last_error
            FROM rec LEFT JOIN sage.outbox o USING (doc_key)
            -- A quarantined Stripe record is why its document is not planned: say so.
            LEFT JOIN (SELECT id, min("check" || ': ' || reason) AS reason
                       FROM staging.quarantine GROUP BY id) q ON q.id = rec.source""",
            [currency, manual, sorted(OWN_DOCUMENT), today, account, scale],
        )
        if docs.is_empty() and not sage:
            continue
        stripe_side = int(docs.filter(~pl.col("is_cleared"))["amount"].sum() or 0)
        sage_minor = int(Decimal(sage) * scale)  # exact: DuckDB DECIMAL → Decimal
        unposted = docs.filter(pl.col("doc_status") != "posted")
        # An unposted document leaves its amount out of Sage; once cleared by a payout
        # journal it leaves the clearing account short by that amount.
        explained = int(unposted["amount"].sum() or 0)
        difference = sage_minor - stripe_side
        out.append(
            {
                "currency": currency,
                "account": account,
                "sage_clearing": sage_minor,
                "stripe_unpaid_gross": stripe_side,
                "difference": difference,
                "explained_by_unposted": -explained,
                "unexplained": difference + explained,
                # dead / waiting / blocked / pending / quarantined / not planned → count.
                "unposted_by_state": dict(
                    unposted.group_by("doc_status").len().sort("doc_status").iter_rows()
                ),
                "unposted_documents": unposted.select(
                    "doc_key", "doc_status", "amount", "last_error"
                )
                .sort("doc_status", "doc_key")
                .head(50)
                .to_dicts(),
            }
        )
    return out


def realized_fx(st: Any, mapping: Mapping) -> list[dict[str, Any]]:
    """Realized FX gain/loss posted to Sage, per settlement currency (minor units): the
    posted journals with a line on ``accounts.fx_gain_loss`` (refunds of foreign sales,
    their failures, later payments of foreign invoices — docs/accounting.md "Foreign
    currency, first class"). ``net`` > 0 is a gain (the account's credits exceed its
    debits); only Stripe's own rates are behind these amounts."""
    account = mapping.accounts.fx_gain_loss
    rows = st.frame(
        """
        SELECT o.payload->>'currency' AS currency, count(DISTINCT o.doc_key) AS journals,
            coalesce(sum(CAST(l->>'debit' AS DECIMAL(18, 3))), 0) AS debit,
            coalesce(sum(CAST(l->>'credit' AS DECIMAL(18, 3))), 0) AS credit
        FROM sage.outbox o, unnest(CAST(o.payload->'lines' AS JSON[])) t(l)
        WHERE o.status = 'posted' AND o.doc_type = 'journal_entry' AND l->>'account' = ?
        GROUP BY ALL ORDER BY currency""",
        [account],
    ).iter_rows()

    out = []
    for currency, journals, debit, credit in rows:
        scale = 10 ** exponent(currency)
        loss, gain = int(Decimal(debit) * scale), int(Decimal(credit) * scale)
        out.append(
            {
                "currency": currency,
                "account": account,
                "journals": int(journals),
                "gain": gain,
                "loss": loss,
                "net": gain - loss,
            }
        )
    return out


def describe_fx(fx: dict[str, Any]) -> str:
    """One line for the CLI and the demo: 'USD 7500: net gain 12.34 (gains 20.00, losses
    7.66; 9 journals)'."""
    cur, net = fx["currency"], fx["net"]
    word = "gain" if net >= 0 else "loss"
    return (
        f"{cur} {fx['account']}: net {word} {to_decimal_string(abs(net), cur)} "
        f"(gains {to_decimal_string(fx['gain'], cur)}, losses "
        f"{to_decimal_string(fx['loss'], cur)}; {fx['journals']} journals)"
    )


REPORT_COLUMNS = (
    "payout",
    "kind",
    "arrival_date",
    "amount",
    "gross",
    "fees",
    "refunds",
    "disputes",
    "net",
    "bank_line",
    "suspense",
    "journal_no",
    "recon_status",
    "difference",
)


def build_report(
    st: Any,
    mapping: Mapping,
    *,
    html_path: Any = None,
    payout: str | None = None,
    date_from: dt.date | None = None,
    date_to: dt.date | None = None,
) -> tuple[pl.DataFrame, list[dict[str, Any]], list[dict[str, Any]]]:
    """The report, the clearing check and the AR tie-out, with the HTML page written when
    asked."""
    from stripe_sage.reconcile.ar import ar_tie_out
    from stripe_sage.reconcile.html import daily_series, render

    rep = add_bank_line(report(st, payout=payout, date_from=date_from, date_to=date_to), mapping)
    clearing = clearing_check(st, mapping)
    ar = ar_tie_out(st, mapping)
    if html_path is not None:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(
            render(
                rep,
                daily_series(st),
                clearing,
                balance=balance_journals(st),
                suspense=suspense_postings(st),
                ar=ar,
                disputes=invoice_disputes(st),
                fx=realized_fx(st, mapping),
            )
        )
    return rep, clearing, ar
