"""A deterministic generated Stripe business, held as compact numpy columns.

Every resource is a table sorted by ``created``; an object's *index* is its position in that
table and is encoded in its id, so that paging (`starting_after`), `created[...]` filters and
retrieval are index arithmetic and binary searches, and 1,000,000 charges with their refunds,
disputes, balance transactions, payouts and events fit in a few hundred MB. Objects are only
rendered into Stripe-shaped dicts when served (see ``stripe_render``).

The same ``BusinessConfig`` (seed, charges, end, days) always yields the same business, byte
for byte. What it contains, by design, so that the pipeline's hard cases all occur:

- customers: some without email, some pairs sharing an email, names over 40 characters,
  non-ASCII names; one in ten carries ``metadata.sage_customer_id`` (pushed by an eCommerce
  platform together with its sales orders);
- charges in USD, EUR, GBP, JPY (zero-decimal) and KWD (three-decimal), all settling in USD
  with an ``exchange_rate``; fees of 2.9% + 30¢ (+1% international) itemised in
  ``fee_details``; about 3% failed;
- one charge in twenty carries ``metadata.erp_order_id`` of a Sage sales order;
- one charge in ten pays a Stripe Billing invoice (some over 10 lines, some taxed, half from
  subscriptions); an invoice whose charge failed stays open; invoices also carry percent
  and amount coupons, inclusive VAT (quantities > 1, so prices in fractions of a cent), two
  exclusive rates, and subscription prorations (``stripe_billing``, issue 18);
- full, partial and failed refunds, days after their charge (so only ``/v1/events`` shows
  them to an incremental reader);
- disputes won (fee sometimes returned) and lost, and still open; one lost on a paid Billing
  invoice's payment (issue 19: the invoice stays paid);
- a monthly Billing fee (`stripe_fee`), automatic daily payouts whose balance transactions'
  ``net`` sums exactly to the payout amount, and one payout that fails after it was paid.

And the everyday shapes of a real account (docs/accounting.md "Zero-touch defaults"), each a
small share scaled with the business (a few per 1000 charges, never fewer than one or two):

- guest checkout: charges with no Stripe customer (``customer`` null, the buyer only in
  ``billing_details``), half of them refunded later;
- customers with no name: some whose cards carry a billing name, some with only an email,
  some with nothing at all;
- names longer than Sage's 40 characters with no word boundary to shorten at;
- customers deleted in Stripe after their charges (the list leaves them out, retrieving one
  answers Stripe's ``deleted`` stub, their charges still name them);
- card authorizations never captured: still pending (``captured`` false, no balance
  transaction), expired after 7 days (``charge.expired``) or released by the merchant
  (``charge.refunded``); neither of the last two has a refund object or moves money;
- charges whose ``metadata.erp_order_id`` names an order Sage never received.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

DAY = 86_400
HOUR = 3_600

# Presentment currencies: code, exponent, base rate to USD in major units, share of charges.
CURRENCIES: tuple[tuple[str, int, float, float], ...] = (
    ("usd", 2, 1.0, 0.70),
    ("eur", 2, 1.08, 0.10),
    ("gbp", 2, 1.27, 0.08),
    ("jpy", 0, 0.0067, 0.07),
    ("kwd", 3, 3.25, 0.05),
)
USD = 0
# Settlement currencies of the account's balances (bt.currency); index 0 is the default.
SETTLEMENT_CURRENCIES = ("usd", "eur")
EUR = 1  # in CURRENCIES, and in SETTLEMENT_CURRENCIES
DISPUTE_FEE = 1500
# The most an invoice whose payment is disputed and lost (issue 19) may be, so the payout
# that sweeps the withdrawal up stays positive.
LOST_INVOICE_DISPUTE_MAX = 10_000
BILLING_FEE = 2500
# Authorizations: 0 a normal (captured or failed) charge, else never captured and ...
# A Checkout Session completes this many seconds after the charge that paid it (as in
# Stripe, where the payment succeeds first): a read in between sees the charge and the
# session still open.
SESSION_COMPLETES_AFTER = 1
AUTH_PENDING, AUTH_EXPIRED, AUTH_RELEASED = 1, 2, 3  # ... still open, expired, released
AUTH_EXPIRY = 7 * DAY  # Stripe's card authorizations lapse after 7 days
# Shares of the everyday shapes, per 1000 charges (customers: per 1000 customers), and the
# least of each a business holds however small.
PER_MILLE: dict[str, tuple[int, int]] = {
    "guest": (5, 3),
    "auth_pending": (2, 1),
    "auth_expired": (2, 1),
    "auth_released": (2, 1),
    "erp_unknown": (3, 2),
    "nameless_billing": (16, 1),
    "nameless_email": (16, 1),
    "nameless_nothing": (16, 1),
    "long_unbroken": (16, 1),
    "deleted": (16, 2),
}


def share(kind: str, n: int) -> int:
    per_mille, least = PER_MILLE[kind]
    return max(least, n * per_mille // 1000)


def spread(pool: np.ndarray, count: int, offset: int) -> np.ndarray:
    """``count`` members of ``pool`` spaced evenly over it (deterministic, no randomness)."""
    if count <= 0 or len(pool) == 0:
        return np.array([], np.int64)
    count = min(count, len(pool))
    pos = (np.arange(count, dtype=np.int64) * len(pool)) // count
    return np.sort(pool[(pos + offset) % len(pool)])


def default_end() -> int:
    """Midnight UTC today: the business is 'up to now' unless a fixed end is given."""
    today = dt.datetime.now(dt.UTC).date()
    return int(dt.datetime(today.year, today.month, today.day, tzinfo=dt.UTC).timestamp())


def midnight(ts: Any) -> Any:
    """Start of the UTC day of ``ts`` (an int or an array of unix seconds)."""
    return ts - (ts % DAY)


# Balance transaction kinds: (type, reporting_category).
BT_KINDS: tuple[tuple[str, str], ...] = (
    ("charge", "charge"),  # 0
    ("refund", "refund"),  # 1
    ("refund_failure", "refund_failure"),  # 2
    ("adjustment", "dispute"),  # 3
    ("adjustment", "dispute_reversal"),  # 4
    ("payout", "payout"),  # 5
    ("payout_failure", "payout_reversal"),  # 6
    ("stripe_fee", "fee"),  # 7
    ("topup", "topup"),  # 8
    ("topup_reversal", "topup_reversal"),  # 9
    ("application_fee", "platform_earning"),  # 10
    ("application_fee_refund", "platform_earning_refund"),  # 11
    ("transfer", "transfer"),  # 12
    ("transfer_refund", "transfer_reversal"),  # 13
    # A category Stripe has not invented yet (the list is open): it must go to suspense.
    ("adjustment", "orbital_reserve_adjustment"),  # 14
)
BT_CHARGE, BT_REFUND, BT_REFUND_FAILURE, BT_DISPUTE, BT_DISPUTE_REVERSAL = 0, 1, 2, 3, 4
BT_PAYOUT, BT_PAYOUT_FAILURE, BT_STRIPE_FEE = 5, 6, 7
BT_TOPUP, BT_TOPUP_REVERSAL, BT_APP_FEE, BT_APP_FEE_REFUND = 8, 9, 10, 11
BT_TRANSFER, BT_TRANSFER_REVERSAL, BT_MADE_UP = 12, 13, 14
MADE_UP_CATEGORY = BT_KINDS[BT_MADE_UP][1]

# Event types the business emits, and which resource their data.object is.
EVENT_TYPES: tuple[tuple[str, str], ...] = (
    ("customer.created", "customers"),  # 0
    ("customer.subscription.created", "subscriptions"),  # 1
    ("invoice.created", "invoices"),  # 2
    ("invoice.finalized", "invoices"),  # 3
    ("invoice.paid", "invoices"),  # 4
    ("invoice.payment_succeeded", "invoices"),  # 5
    ("invoice.payment_failed", "invoices"),  # 6
    ("charge.succeeded", "charges"),  # 7
    ("charge.failed", "charges"),  # 8
    ("charge.refunded", "charges"),  # 9
    ("refund.created", "refunds"),  # 10
    ("refund.failed", "refunds"),  # 11
    ("charge.dispute.created", "disputes"),  # 12
    ("charge.dispute.funds_withdrawn", "disputes"),  # 13
    ("charge.dispute.closed", "disputes"),  # 14
    ("charge.dispute.funds_reinstated", "disputes"),  # 15
    ("payout.created", "payouts"),  # 16
    ("payout.paid", "payouts"),  # 17
    ("payout.reconciliation_completed", "payouts"),  # 18
    ("payout.failed", "payouts"),  # 19
    ("customer.updated", "customers"),  # 20
    ("customer.deleted", "customers"),  # 21
    ("charge.updated", "charges"),  # 22
    ("invoice.updated", "invoices"),  # 23
    ("charge.expired", "charges"),  # 24
    ("credit_note.created", "credit_notes"),  # 25 (issue 19, stripe_after)
    ("invoice.voided", "invoices"),  # 26
    ("invoice.marked_uncollectible", "invoices"),  # 27
    ("checkout.session.completed", "checkout_sessions"),  # 28
)
EVENT_CODE = {name: i for i, (name, _) in enumerate(EVENT_TYPES)}


@dataclass(frozen=True)
class BusinessConfig:
    seed: int = 7
    charges: int = 1_000
    end: int = field(default_factory=default_end)
    days: int = 30
    # The account's payout schedule is manual (settings.payouts.schedule.interval): Stripe
    # pays nothing out by itself; the merchant pays out weekly (automatic=false payouts,
    # which Stripe will not itemise).
    manual_payouts: bool = False
    # An account with automatic payouts whose merchant also pays out by hand now and then
    # (issue 21): one standard and one instant payout (automatic=false, which Stripe will not
    # itemise), each taking the balance available at that moment between two automatic
    # payouts. Ignored with manual_payouts.
    interim_manual_payouts: bool = False
    # A second settlement currency (issue 20): the account also holds a EUR balance, paid out
    # to a EUR bank account; its EUR sales settle in it (no conversion).
    eur_balance: bool = False

    @property
    def start(self) -> int:
        return self.end - self.days * DAY


@dataclass
class Table:
    """One resource's base rows, sorted by created; ``created[i]`` is object i's timestamp."""

    created: np.ndarray

    def __len__(self) -> int:
        return int(self.created.shape[0])


class Business:
    """The generated business. Build once (seconds at 1M charges), then read-only."""

    # Issue 19 (drawn by ``stripe_after.after_posting``): per invoice the void and write-off
    # times (0: never) and its credit note (-1: none); per credit note its invoice.
    credit_notes: Table
    cn_invoice: np.ndarray
    cn_refund: np.ndarray  # the refund a post-payment note names (-1: a pre-payment note)
    inv_credit_note: np.ndarray
    inv_voided_at: np.ndarray
    inv_uncollectible_at: np.ndarray
    # Customer credit balances (``stripe_after.credit_balances``): per invoice the credit it
    # used at finalization (0: none); per customer balance transaction its customer, amount
    # (negative: credit granted), invoice (-1: none), type and the customer's ending balance.
    inv_balance_applied: np.ndarray
    customer_balance_transactions: Table
    cbtxn_customer: np.ndarray
    cbtxn_amount: np.ndarray
    cbtxn_invoice: np.ndarray
    cbtxn_type: np.ndarray
    cbtxn_ending: np.ndarray

    def __init__(self, config: BusinessConfig) -> None:
        if config.charges < 20:
            raise ValueError("a business needs at least 20 charges")
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self._customers()
        self._charges()
        self._subscriptions_and_invoices()
        self._invoice_kinds()
        self._everyday_shapes()
        self._refunds()
        self._refunds_at_later_rates()
        self._second_settlement_currency()
        self._disputes()
        # Checkout Sessions draw from their own rng and read only the charges' kinds, so
        # they are drawn here, before an invoice paid in parts changes its charges' amounts.
        self._checkout_sessions()
        self._invoices_paid_in_parts()
        self._lost_dispute_on_an_invoice()
        self._balance_transactions_and_payouts()
        from devkit.sandbox.stripe_after import after_posting  # it reads this module's Table

        after_posting(self)
        self._events()
        del self.rng

    # -- customers -------------------------------------------------------------------------
    def _customers(self) -> None:
        c, rng = self.config, self.rng
        n = max(24, c.charges // 8)
        self.customers = Table(np.sort(rng.integers(c.start - 90 * DAY, c.start, n)))
        self.n_customers = n

    # -- charges ---------------------------------------------------------------------------
    def _charges(self) -> None:
        c, rng = self.config, self.rng
        n = c.charges
        idx = np.arange(n)
        self.charges = Table(np.sort(rng.integers(c.start, c.end - 3 * HOUR, n)))
        shares = np.array([s for *_, s in CURRENCIES])
        cur = rng.choice(len(CURRENCIES), n, p=shares / shares.sum()).astype(np.int8)
        self.ch_is_invoice = idx % 10 == 3
        self.ch_is_erp = idx % 20 == 7
        # Billing invoices and ERP orders are in USD, but every ninth invoice is billed in
        # EUR, GBP or JPY (foreign-currency invoices, settled in USD at the charge's rate).
        self.ch_is_fx_invoice = self.ch_is_invoice & (idx % 90 == 33)
        cur[(self.ch_is_invoice & ~self.ch_is_fx_invoice) | self.ch_is_erp] = USD
        cur[self.ch_is_fx_invoice] = np.array([1, 2, 3], np.int8)[
            (idx[self.ch_is_fx_invoice] // 90) % 3
        ]
        self.ch_currency = cur
        major = np.clip(np.exp(rng.normal(3.6, 1.0, n)), 1.0, 5_000.0)
        exps = np.array([e for _, e, _, _ in CURRENCIES])[cur]
        to_ccy = np.array([1.0, 1 / 1.08, 1 / 1.27, 1 / 0.0067, 1 / 3.25])[cur]
        amount = np.round(major * to_ccy * 10.0**exps).astype(np.int64)
        self.ch_amount = np.maximum(amount, np.where(exps == 0, 100, 10 ** (exps + 0)))
        base_rate = np.array([r for _, _, r, _ in CURRENCIES])[cur]
        rate = np.round(base_rate * (1 + rng.normal(0, 0.003, n)), 6)
        rate[cur == USD] = 1.0
        self.ch_rate = rate
        settle = np.round(self.ch_amount * rate * 10.0 ** (2 - exps)).astype(np.int64)
        self.ch_bt_amount = np.where(cur == USD, self.ch_amount, settle)
        self.ch_fee_processing = np.round(self.ch_bt_amount * 0.029).astype(np.int64) + 30
        self.ch_fee_intl = np.where(
            cur == USD, 0, np.round(self.ch_bt_amount * 0.01).astype(np.int64)
        )
        self.ch_customer = rng.integers(0, self.n_customers, n).astype(np.int32)
        erp_customers = 10 * rng.integers(0, (self.n_customers + 9) // 10, n)
        self.ch_customer[self.ch_is_erp] = erp_customers[self.ch_is_erp].astype(np.int32)
        self.ch_failed = (rng.random(n) < 0.03) & ~self.ch_is_erp
        # One foreign-currency invoice's payment failed: it stays open, awaiting settlement.
        fx_invoices = np.nonzero(self.ch_is_fx_invoice)[0]
        if len(fx_invoices) >= 2:
            self.ch_failed[fx_invoices[1]] = True
        self.ch_card = rng.integers(0, 4, n).astype(np.int8)  # brand index

    # -- Billing ---------------------------------------------------------------------------
    def _subscriptions_and_invoices(self) -> None:
        c, rng = self.config, self.rng
        inv_charge = np.nonzero(self.ch_is_invoice)[0]
        n_inv = len(inv_charge)
        self.inv_charge = inv_charge
        self.invoices = Table(self.charges.created[inv_charge] - HOUR)
        n_sub = max(3, n_inv // 6)
        self.subscriptions = Table(np.sort(rng.integers(c.start - 60 * DAY, c.start, n_sub)))
        self.sub_customer = rng.integers(0, self.n_customers, n_sub).astype(np.int32)
        j = np.arange(n_inv)
        from_sub = j % 2 == 0
        self.inv_subscription = np.where(from_sub, rng.integers(0, n_sub, n_inv), -1).astype(
            np.int32
        )
        cust = self.ch_customer[inv_charge]
        cust[from_sub] = self.sub_customer[self.inv_subscription[from_sub]]
        self.ch_customer[inv_charge] = cust
        many = rng.random(n_inv) < 0.15
        self.inv_lines = np.where(
            many, rng.integers(11, 15, n_inv), rng.integers(1, 4, n_inv)
        ).astype(np.int16)
        total = self.ch_amount[inv_charge]
        taxed = j % 4 == 1
        subtotal = np.where(taxed, np.round(total / 1.0825).astype(np.int64), total)
        self.inv_tax = total - subtotal
        # Lines need at least one minor unit each.
        self.inv_lines = np.minimum(self.inv_lines, np.maximum(subtotal, 1)).astype(np.int16)
        self.ch_invoice = np.full(c.charges, -1, np.int32)
        self.ch_invoice[inv_charge] = j

    def _invoice_kinds(self) -> None:
        """Which invoices carry a coupon, inclusive VAT, two tax rates or a proration
        (``stripe_billing``), drawn from an rng of their own so nothing else shifts."""
        from devkit.sandbox.stripe_billing import (
            AMOUNT_COUPON_MIN_TOTAL,
            KIND_AMOUNT,
            KIND_PLAIN,
            KIND_PRORATION,
        )

        rng = np.random.default_rng(self.config.seed + 1818)
        n_inv = len(self.inv_charge)
        kind = rng.choice(6, n_inv, p=[0.45, 0.12, 0.1, 0.12, 0.1, 0.11]).astype(np.int8)
        total = self.ch_amount[self.inv_charge]
        kind[(kind == KIND_PRORATION) & (self.inv_subscription < 0)] = KIND_PLAIN
        kind[(kind == KIND_AMOUNT) & (total < AMOUNT_COUPON_MIN_TOTAL)] = KIND_PLAIN
        # An amount-off coupon is in USD: a foreign-currency invoice takes none.
        foreign = self.ch_is_fx_invoice[self.inv_charge]
        kind[(kind == KIND_AMOUNT) & foreign] = KIND_PLAIN
        # Every kind at least once, however small the business.
        for k in range(1, 6):
            if (kind == k).any():
                continue
            ok = kind == KIND_PLAIN
            if k == KIND_PRORATION:
                ok &= self.inv_subscription >= 0
            if k == KIND_AMOUNT:
                ok &= (total >= AMOUNT_COUPON_MIN_TOTAL) & ~foreign
            free = np.nonzero(ok)[0]
            if len(free):
                kind[free[len(free) // 2]] = k
        self.inv_kind = kind

    # -- everyday shapes ---------------------------------------------------------------------
    def _everyday_shapes(self) -> None:
        """Mark the everyday shapes (module docstring) by index arithmetic, drawing nothing
        from ``rng``: the rest of the business is the same with or without them."""
        c = self.config
        n = c.charges
        created = self.charges.created
        plain = np.nonzero(~self.ch_is_invoice & ~self.ch_is_erp & ~self.ch_failed)[0]
        taken = np.zeros(n, bool)

        def pick(kind: str, where: np.ndarray, offset: int) -> np.ndarray:
            pool = plain[where[plain] & ~taken[plain]]
            got = spread(pool, share(kind, n), offset)
            taken[got] = True
            return got

        anywhere = np.ones(n, bool)
        self.ch_guest = np.zeros(n, bool)
        self.ch_guest[pick("guest", anywhere, 1)] = True
        self.ch_erp_unknown = np.zeros(n, bool)
        # The web shop sells in USD, like its orders Sage does have.
        self.ch_erp_unknown[pick("erp_unknown", self.ch_currency == USD, 2)] = True
        self.ch_auth = np.zeros(n, np.int8)
        self.ch_auth_at = np.zeros(n, np.int64)  # when it expired or was released
        pending = pick("auth_pending", created >= c.end - AUTH_EXPIRY + DAY, 0)
        self.ch_auth[pending] = AUTH_PENDING
        expired = pick("auth_expired", created + AUTH_EXPIRY <= c.end - HOUR, 3)
        self.ch_auth[expired] = AUTH_EXPIRED
        self.ch_auth_at[expired] = created[expired] + AUTH_EXPIRY
        released = pick("auth_released", created + DAY <= c.end - HOUR, 5)
        self.ch_auth[released] = AUTH_RELEASED
        self.ch_auth_at[released] = created[released] + DAY
        self.ch_customer[self.ch_guest] = -1

        # Customers: none of these carries a Sage id (the shop pushed those with a name) or
        # one of the other special names.
        k = np.arange(self.n_customers)
        charged = self.ch_customer[self.ch_customer >= 0]
        has_charge = np.zeros(self.n_customers, bool)
        has_charge[charged] = True
        billed = np.zeros(self.n_customers, bool)  # customers of Billing invoices/subscriptions
        billed[self.ch_customer[self.inv_charge]] = True
        billed[self.sub_customer] = True
        free = (k % 10 != 0) & (k % 37 != 5) & (k % 17 != 2) & has_charge
        used = np.zeros(self.n_customers, bool)

        def pick_customers(kind: str, where: np.ndarray, offset: int) -> np.ndarray:
            pool = np.nonzero(where & ~used)[0]
            got = spread(pool, share(kind, self.n_customers), offset)
            used[got] = True
            return got

        # Deleted after their last charge (Stripe refuses charges for a deleted customer).
        self.cu_deleted_at = np.zeros(self.n_customers, np.int64)
        gone = pick_customers("deleted", free & ~billed, 1)
        last = np.full(self.n_customers, c.start, np.int64)
        mine = self.ch_customer >= 0
        np.maximum.at(last, self.ch_customer[mine], created[mine])
        self.cu_deleted_at[gone] = np.minimum(
            c.end - HOUR, np.maximum(last[gone] + HOUR, c.end - 2 * DAY)
        )
        # 0 a name, 1 no name but a billing name on its cards, 2 only an email, 3 nothing,
        # 4 a name over 40 characters with no word boundary to shorten at.
        self.cu_name_kind = np.zeros(self.n_customers, np.int8)
        for kind, code, offset in (
            ("nameless_billing", 1, 2),
            ("nameless_email", 2, 3),
            ("nameless_nothing", 3, 4),
            ("long_unbroken", 4, 5),
        ):
            self.cu_name_kind[pick_customers(kind, free, offset)] = code

    # -- Checkout Sessions (issue 17) -------------------------------------------------------
    def _checkout_sessions(self) -> None:
        """Checkout Sessions, each paid by one of the business's charges (the session's
        ``payment_intent`` is the charge's): goods orders on plain captured USD charges, and a
        few sessions created with ``invoice_creation`` on the charges of Billing invoices
        (they post through their invoice). Drawn from their own rng, after everything else is
        decided, so the rest of the business is the same with or without them; what each
        session holds (items, quantities, tax, shipping, discount) is rendered from its index
        (``stripe_state``)."""
        c = self.config
        rng = np.random.default_rng(c.seed + 1_700)
        n = c.charges
        goods_pool = np.nonzero(
            ~self.ch_is_invoice
            & ~self.ch_is_erp
            & ~self.ch_failed
            & (self.ch_auth == 0)
            & ~self.ch_erp_unknown
            & (self.ch_currency == USD)
            & (self.ch_amount >= 2_000)
        )[0]
        n_goods = min(len(goods_pool), min(40, max(8, n // 40)))
        goods = np.sort(rng.choice(goods_pool, n_goods, replace=False))
        paid_invoices = np.nonzero(~self.ch_failed[self.inv_charge])[0]
        n_inv = min(len(paid_invoices), max(2, n // 250))
        invoiced = np.sort(rng.choice(paid_invoices, n_inv, replace=False))
        charge = np.concatenate([goods, self.inv_charge[invoiced]]).astype(np.int64)
        invoice = np.concatenate([np.full(n_goods, -1), invoiced]).astype(np.int32)
        # The buyer spends a few minutes in Checkout before paying (Billing invoices are
        # created an hour before their charge: the session comes first).
        lead = rng.integers(60, 1_800, len(charge))
        created = np.where(
            invoice >= 0,
            self.charges.created[charge] - HOUR - lead,
            self.charges.created[charge] - lead,
        )
        order = np.argsort(created, kind="stable")
        self.checkout_sessions = Table(created[order])
        self.cs_charge = charge[order]
        self.cs_invoice = invoice[order]

    # -- refunds ---------------------------------------------------------------------------
    def _refunds(self) -> None:
        c, rng = self.config, self.rng
        n = c.charges
        ok = ~self.ch_failed & (self.ch_auth == 0)
        delay = rng.integers(HOUR, 10 * DAY, n)
        created = self.charges.created + delay
        want = ok & (rng.random(n) < 0.08) & (created <= c.end - 2 * HOUR)
        # Every other guest checkout is refunded (the refund credits the guest customer).
        guests = np.nonzero(self.ch_guest)[0][::2]
        want[guests] = True
        created[guests] = np.minimum(created[guests], c.end - 2 * HOUR)
        partial = rng.random(n) < 0.4
        frac = rng.uniform(0.1, 0.9, n)
        amount = np.where(
            partial, np.maximum(1, np.round(self.ch_amount * frac)).astype(np.int64), self.ch_amount
        )
        bt_amount = np.where(
            partial,
            np.maximum(1, np.round(self.ch_bt_amount * (amount / self.ch_amount))).astype(np.int64),
            self.ch_bt_amount,
        )
        fail = (rng.random(n) < 0.1) & (created <= c.end - 2 * DAY)
        charge_ids = np.nonzero(want)[0]
        order = np.argsort(created[charge_ids], kind="stable")
        charge_ids = charge_ids[order]
        self.refunds = Table(created[charge_ids])
        self.rf_charge = charge_ids.astype(np.int32)
        self.rf_amount = amount[charge_ids]
        self.rf_bt_amount = bt_amount[charge_ids]
        self.rf_failed = fail[charge_ids]
        self.rf_failed_at = np.where(self.rf_failed, self.refunds.created + DAY, 0)
        self.ch_refund = np.full(n, -1, np.int32)
        self.ch_refund[charge_ids] = np.arange(len(charge_ids), dtype=np.int32)

    def _refunds_at_later_rates(self) -> None:
        """A refund of a foreign-currency sale settles at Stripe's rate of the refund's day,
        not the charge's: rates move by a percent or two in the days between (own random
        stream, so the rest of the business does not shift)."""
        rng = np.random.default_rng(self.config.seed + 2020)
        charge = self.rf_charge
        cur = self.ch_currency[charge]
        drift = np.clip(rng.normal(0, 0.015, len(charge)), -0.05, 0.05)
        rate = np.round(self.ch_rate[charge] * (1 + drift), 6)
        rate[cur == USD] = 1.0
        exps = np.array([e for _, e, _, _ in CURRENCIES])[cur]
        settle = np.round(self.rf_amount * rate * 10.0 ** (2 - exps)).astype(np.int64)
        self.rf_rate = rate
        self.rf_bt_amount = np.where(cur == USD, self.rf_amount, np.maximum(1, settle))

    # -- foreign-currency invoices paid in parts (issue 20) -----------------------------------
    def _invoices_paid_in_parts(self) -> None:
        """A few paid foreign-currency invoices are paid in two parts at moving rates: the
        invoice's own charge pays 30-60 % of its total, and a later charge by the same
        customer, presented in the invoice's currency (a plain sale of the business,
        re-purposed, so that no id or count shifts), pays the rest at a rate 1-3 % away.
        Stripe lists two ``invoice_payment``s for such an invoice; it is ``paid`` from the
        second. Drawn from
        an rng of their own (seed + 2026), after every other draw that reads the charges'
        amounts, so the rest of the business is the same with or without them."""
        c = self.config
        rng = np.random.default_rng(c.seed + 2026)
        n_inv = len(self.inv_charge)
        self.inv_total = self.ch_amount[self.inv_charge].copy()  # an invoice's total
        self.inv_second_charge = np.full(n_inv, -1, np.int64)  # its second part's charge
        first = self.inv_charge
        created = self.charges.created
        eligible = np.nonzero(
            self.ch_is_fx_invoice[first]
            & (self.ch_settle[first] == 0)  # converted: not settled in its own currency
            & ~self.ch_failed[first]
            & (self.ch_refund[first] < 0)
            & (self.ch_dispute[first] < 0)
            & ~np.isin(np.arange(n_inv), self.cs_invoice)
            & (self.inv_total >= 200)
        )[0]
        plain = (
            ~self.ch_is_invoice
            & ~self.ch_is_erp
            & ~self.ch_failed
            & (self.ch_auth == 0)
            & ~self.ch_guest
            & ~self.ch_erp_unknown
            & (self.ch_refund < 0)
            & (self.ch_dispute < 0)
            & (self.ch_customer >= 0)
            & ~np.isin(np.arange(c.charges), self.cs_charge)
            & (self.ch_settle == 0)  # settled in USD, like the invoice's first part
        )
        exps = np.array([e for _, e, _, _ in CURRENCIES])
        taken = np.zeros(c.charges, bool)
        wanted = max(1, len(eligible) // 4)
        for j in eligible:
            if taken.sum() >= wanted:
                break
            i1 = int(first[j])
            cur = int(self.ch_currency[i1])
            later = plain & ~taken & (created > created[i1] + HOUR)
            # Days later when the business has them, else the same day.
            pool = np.nonzero(later & (created >= created[i1] + 2 * DAY))[0]
            if not len(pool):
                pool = np.nonzero(later)[0]
            if not len(pool):
                continue
            i2 = int(pool[rng.integers(0, len(pool))])
            self.ch_currency[i2] = cur  # presented in the invoice's currency
            taken[i2] = True
            total = int(self.inv_total[j])
            part1 = int(np.clip(round(total * rng.uniform(0.3, 0.6)), 1, total - 1))
            drift = rng.uniform(0.01, 0.03) * rng.choice([-1.0, 1.0])
            self.ch_rate[i2] = round(float(self.ch_rate[i1]) * (1 + drift), 6)
            self.ch_amount[i1], self.ch_amount[i2] = part1, total - part1
            self.ch_customer[i2] = self.ch_customer[i1]
            self.ch_invoice[i2] = j
            self.inv_second_charge[j] = i2
            for i in (i1, i2):
                settle = round(
                    int(self.ch_amount[i]) * float(self.ch_rate[i]) * 10.0 ** (2 - exps[cur])
                )
                self.ch_bt_amount[i] = settle
                self.ch_fee_processing[i] = round(settle * 0.029) + 30
                self.ch_fee_intl[i] = round(settle * 0.01)
        # Invoice payments, oldest first: one per invoice (created with it), and a second
        # for an invoice paid in parts (created with its charge).
        parts = np.nonzero(self.inv_second_charge >= 0)[0]
        ip_invoice = np.concatenate([np.arange(n_inv), parts]).astype(np.int32)
        ip_charge = np.concatenate([first, self.inv_second_charge[parts]]).astype(np.int64)
        ip_created = np.concatenate([self.invoices.created, created[self.inv_second_charge[parts]]])
        order = np.argsort(ip_created, kind="stable")
        self.invoice_payments = Table(ip_created[order])
        self.ip_invoice = ip_invoice[order]
        self.ip_charge = ip_charge[order]

    def invoice_paid_at(self, j: int) -> int:
        """When invoice j (paid) was paid in full: its last part's charge."""
        i = int(self.inv_second_charge[j])
        return int(self.charges.created[i if i >= 0 else self.inv_charge[j]])

    # -- a second settlement currency (issue 20) ---------------------------------------------
    def _second_settlement_currency(self) -> None:
        """With ``eur_balance``: every EUR sale (Billing invoices' charges too) settles in EUR,
        unconverted (``exchange_rate`` null) as Stripe settles a currency the account holds
        a balance in, its fees in EUR, its refunds and disputes in EUR; payouts are per
        currency. Without it everything settles in USD, as before. No draw."""
        n = self.config.charges
        self.ch_settle = np.zeros(n, np.int8)  # index into SETTLEMENT_CURRENCIES
        if not self.config.eur_balance:
            return
        eur = self.ch_currency == EUR
        self.ch_settle[eur] = 1
        self.ch_rate[eur] = 1.0
        self.ch_bt_amount[eur] = self.ch_amount[eur]
        self.ch_fee_processing[eur] = np.round(self.ch_amount[eur] * 0.029).astype(np.int64) + 30
        self.ch_fee_intl[eur] = 0
        refunded = eur[self.rf_charge]
        self.rf_rate[refunded] = 1.0
        self.rf_bt_amount[refunded] = self.rf_amount[refunded]

    # -- disputes --------------------------------------------------------------------------
    def _disputes(self) -> None:
        c, rng = self.config, self.rng
        n = c.charges
        created = self.charges.created + rng.integers(2 * DAY, 20 * DAY, n)
        want = (
            ~self.ch_failed
            & (self.ch_auth == 0)
            & (self.ch_refund < 0)
            & (rng.random(n) < 0.012)
            & (created <= c.end - HOUR)
        )
        closed_at = created + 8 * DAY
        charge_ids = np.nonzero(want)[0]
        order = np.argsort(created[charge_ids], kind="stable")
        charge_ids = charge_ids[order]
        self.disputes = Table(created[charge_ids])
        m = len(charge_ids)
        self.dp_charge = charge_ids.astype(np.int32)
        closed = closed_at[charge_ids] <= c.end
        won = rng.random(m) < 0.5
        # 0 needs_response, 1 won, 2 lost
        self.dp_status = np.where(closed, np.where(won, 1, 2), 0).astype(np.int8)
        self.dp_closed_at = np.where(closed, closed_at[charge_ids], 0)
        self.dp_fee_returned = (self.dp_status == 1) & (rng.random(m) < 0.3)
        self.ch_dispute = np.full(n, -1, np.int32)
        self.ch_dispute[charge_ids] = np.arange(m, dtype=np.int32)

    def _lost_dispute_on_an_invoice(self) -> None:
        """One dispute on a paid Billing invoice's payment, lost (issue 19: the payout journal
        books it, the invoice stays paid, the report links dispute, invoice and customer).

        The cardholder disputes 2-10 days after paying; the merchant accepts within the day
        (Stripe closes an accepted dispute as ``lost`` at once). Its withdrawal (amount and the
        dispute fee, one balance transaction) is available at once, so the next automatic
        payout sweeps it up. The invoice: paid in full by one USD charge (not in Checkout,
        not refunded, not already disputed) of at most ``LOST_INVOICE_DISPUTE_MAX``, so that
        day's payout stays positive. Appended after every other dispute (created no earlier
        than the last), so no dispute id shifts; drawn from an rng of its own (seed + 1922),
        so nothing else is drawn differently. None when no invoice fits."""
        c = self.config
        rng = np.random.default_rng(c.seed + 1922)
        first = self.inv_charge
        n_inv = len(first)
        created = self.charges.created
        last = int(self.disputes.created[-1]) if len(self.disputes) else c.start
        lo = np.maximum(created[first] + 2 * DAY, last + 1)
        hi = np.minimum(created[first] + 10 * DAY, c.end - 3 * DAY)
        eligible = np.nonzero(
            ~self.ch_failed[first]
            & (self.ch_auth[first] == 0)
            & (self.ch_refund[first] < 0)
            & (self.ch_dispute[first] < 0)
            & ~self.ch_is_fx_invoice[first]
            & (self.ch_settle[first] == 0)
            & (self.inv_second_charge < 0)
            & ~np.isin(np.arange(n_inv), self.cs_invoice)
            & (self.inv_total <= LOST_INVOICE_DISPUTE_MAX)
            & (lo <= hi)
        )[0]
        if not len(eligible):
            return
        j = int(eligible[rng.integers(0, len(eligible))])
        i = int(first[j])
        at = int(rng.integers(int(lo[j]), int(hi[j]) + 1))
        closed = at + int(rng.integers(HOUR, DAY))
        self.disputes = Table(np.append(self.disputes.created, at))
        self.dp_charge = np.append(self.dp_charge, i).astype(np.int32)
        self.dp_status = np.append(self.dp_status, 2).astype(np.int8)  # lost
        self.dp_closed_at = np.append(self.dp_closed_at, closed)
        self.dp_fee_returned = np.append(self.dp_fee_returned, False)
        self.ch_dispute[i] = len(self.disputes) - 1

    # -- balance transactions and payouts --------------------------------------------------
    def _balance_transactions_and_payouts(self) -> None:
        c = self.config
        rows: list[dict[str, np.ndarray]] = []

        def add(
            kind: int,
            created: np.ndarray,
            amount: np.ndarray,
            fee: np.ndarray,
            src: np.ndarray,
            available: np.ndarray,
            currency: np.ndarray | None = None,  # SETTLEMENT_CURRENCIES index; None: USD
        ) -> None:
            rows.append(
                {
                    "kind": np.full(len(created), kind, np.int8),
                    "created": created.astype(np.int64),
                    "amount": amount.astype(np.int64),
                    "fee": fee.astype(np.int64),
                    "src": src.astype(np.int32),
                    "available": available.astype(np.int64),
                    "currency": (
                        np.zeros(len(created), np.int8)
                        if currency is None
                        else currency.astype(np.int8)
                    ),
                }
            )

        ok = np.nonzero(~self.ch_failed & (self.ch_auth == 0))[0]  # captured: money moved
        ch_created = self.charges.created[ok]
        add(
            BT_CHARGE,
            ch_created,
            self.ch_bt_amount[ok],
            self.ch_fee_processing[ok] + self.ch_fee_intl[ok],
            ok,
            midnight(ch_created) + 2 * DAY,
            self.ch_settle[ok],
        )
        r = np.arange(len(self.refunds))
        add(
            BT_REFUND,
            self.refunds.created,
            -self.rf_bt_amount,
            np.zeros(len(r)),
            r,
            self.refunds.created,
            self.ch_settle[self.rf_charge],
        )
        rf = np.nonzero(self.rf_failed)[0]
        add(
            BT_REFUND_FAILURE,
            self.rf_failed_at[rf],
            self.rf_bt_amount[rf],
            np.zeros(len(rf)),
            rf,
            self.rf_failed_at[rf],
            self.ch_settle[self.rf_charge[rf]],
        )
        d = np.arange(len(self.disputes))
        dp_amount = self.ch_bt_amount[self.dp_charge]
        add(
            BT_DISPUTE,
            self.disputes.created,
            -dp_amount,
            np.full(len(d), DISPUTE_FEE),
            d,
            self.disputes.created,
            self.ch_settle[self.dp_charge],
        )
        won = np.nonzero(self.dp_status == 1)[0]
        add(
            BT_DISPUTE_REVERSAL,
            self.dp_closed_at[won],
            dp_amount[won],
            np.where(self.dp_fee_returned[won], -DISPUTE_FEE, 0),
            won,
            self.dp_closed_at[won],
            self.ch_settle[self.dp_charge[won]],
        )
        # A monthly Billing fee on the first of each month inside the business.
        months = []
        day0 = dt.datetime.fromtimestamp(c.start, dt.UTC).date().replace(day=1)
        while True:
            day0 = (day0 + dt.timedelta(days=32)).replace(day=1)
            ts = int(dt.datetime(day0.year, day0.month, 1, 3, tzinfo=dt.UTC).timestamp())
            if ts > c.end - HOUR:
                break
            months.append(ts)
        if not months:
            months.append(c.start + c.days * DAY // 2)
        m = np.array(months, np.int64)
        add(BT_STRIPE_FEE, m, np.full(len(m), -BILLING_FEE), np.zeros(len(m)), np.arange(len(m)), m)
        self._balance_shapes(add)

        cols = {k: np.concatenate([row[k] for row in rows]) for k in rows[0]}
        net = cols["amount"] - cols["fee"]
        payout_of = np.full(len(net), -1, np.int32)
        po_created: list[int] = []
        po_amount: list[int] = []
        po_currency: list[int] = []
        pending_extra: list[tuple[int, int, int]] = []  # failure bts: (available, amount, payout)
        extra_payout_of: list[int] = []  # the later payout that swept each failure bt up
        failed_payout = -1
        po_arrival: list[int] = []
        po_method: list[str] = []  # "standard" | "instant"
        po_automatic: list[bool] = []
        fail_after = c.start + c.days * DAY // 2
        first_day = int(midnight(c.start)) + 2 * DAY
        # Manual payouts: the merchant pays out the available balance once a week.
        every = 7 * DAY if c.manual_payouts else DAY
        # Automatic daily payouts per balance currency: each day at 06:00 UTC, everything of
        # that currency available by midnight (the one failing payout is a USD one); payouts
        # by hand between them (interim_manual_payouts) take the USD balance available then.
        for code in np.unique(cols["currency"]):
            in_code = np.nonzero(cols["currency"] == code)[0]
            by_avail = in_code[np.argsort(cols["available"][in_code], kind="stable")]
            avail_sorted = cols["available"][by_avail]
            carry: list[np.ndarray] = []
            carry_extra: list[int] = []
            pos = 0
            interim = self._interim_payout_times(first_day) if code == 0 else []
            for day in range(first_day, int(midnight(c.end)) + 1, every):
                created = day + 6 * HOUR
                if created > c.end - HOUR:
                    break
                for when, method in [x for x in interim if x[0] < created]:
                    # A payout by hand takes what is available at that moment and not paid out.
                    interim.remove((when, method))
                    upto = int(np.searchsorted(avail_sorted, when, side="right"))
                    carry.append(by_avail[pos:upto])
                    pos = upto
                    members = np.concatenate(carry)
                    total = int(net[members].sum())
                    if total <= 0:  # nothing to take: the merchant tries again the next day
                        interim.append((when + DAY, method))
                        continue
                    payout_of[members] = len(po_created)
                    po_created.append(when)
                    po_amount.append(total)
                    po_currency.append(int(code))
                    # Instant: in the bank within the half hour; standard: two days later.
                    po_arrival.append(
                        when + 30 * 60 if method == "instant" else int(midnight(when)) + 2 * DAY
                    )
                    po_method.append(method)
                    po_automatic.append(False)
                    carry = []
                nxt = max(pos, int(np.searchsorted(avail_sorted, day, side="right")))
                carry.append(by_avail[pos:nxt])
                pos = nxt
                carry_extra += [
                    k
                    for k, (avail, _, _) in enumerate(pending_extra)
                    if code == 0  # a failed (USD) payout's money comes back to USD
                    and avail <= day
                    and extra_payout_of[k] < 0
                    and k not in carry_extra
                ]
                members = np.concatenate(carry)
                total = int(net[members].sum()) + sum(pending_extra[k][1] for k in carry_extra)
                if total <= 0:
                    continue  # nothing to pay out: the balance carries to the next day
                p = len(po_created)
                po_created.append(created)
                po_amount.append(total)
                po_currency.append(int(code))
                po_arrival.append(day + 2 * DAY)
                po_method.append("standard")
                po_automatic.append(not c.manual_payouts)
                payout_of[members] = p
                for k in carry_extra:
                    extra_payout_of[k] = p
                carry, carry_extra = [], []
                arrival = day + 2 * DAY
                if (
                    failed_payout < 0
                    and code == 0
                    and not c.manual_payouts
                    and day >= fail_after
                    and arrival + DAY <= c.end - DAY
                ):
                    failed_payout = p
                    pending_extra.append((arrival + DAY, total, p))
                    extra_payout_of.append(-1)
        # Payouts in order of creation (with one currency they already are).
        po_order = np.lexsort((np.array(po_currency, np.int64), np.array(po_created, np.int64)))
        renumber = np.empty(len(po_order), np.int32)
        renumber[po_order] = np.arange(len(po_order), dtype=np.int32)
        payout_of = (
            np.where(payout_of >= 0, renumber[np.maximum(payout_of, 0)], -1).astype(np.int32)
            if len(po_order)
            else payout_of
        )
        extra_payout_of = [int(renumber[p]) if p >= 0 else -1 for p in extra_payout_of]
        pending_extra = [(a, v, int(renumber[p])) for a, v, p in pending_extra]
        failed_payout = int(renumber[failed_payout]) if failed_payout >= 0 else -1
        po_created = [po_created[k] for k in po_order]
        po_amount = [po_amount[k] for k in po_order]
        po_currency = [po_currency[k] for k in po_order]
        po_arrival = [po_arrival[k] for k in po_order]
        po_method = [po_method[k] for k in po_order]
        po_automatic = [po_automatic[k] for k in po_order]

        n_po = len(po_created)
        self.po_created_arr = np.array(po_created, np.int64)
        self.payouts = Table(self.po_created_arr)
        self.po_amount = np.array(po_amount, np.int64)
        self.po_arrival = np.array(po_arrival, np.int64)
        self.po_method = np.array(po_method, dtype=object)
        self.po_automatic = np.array(po_automatic, bool)
        self.failed_payout = failed_payout
        self.po_currency = np.array(po_currency, np.int8)
        self.po_failed_at = np.zeros(n_po, np.int64)
        if failed_payout >= 0:
            self.po_failed_at[failed_payout] = self.po_arrival[failed_payout] + DAY

        # Append the payouts' own bts and the failure bts, then sort everything by created.
        pk = np.arange(n_po)
        extra = {
            "kind": np.concatenate(
                [
                    np.full(n_po, BT_PAYOUT, np.int8),
                    np.full(len(pending_extra), BT_PAYOUT_FAILURE, np.int8),
                ]
            ),
            "created": np.concatenate(
                [self.po_created_arr, np.array([a for a, _, _ in pending_extra], np.int64)]
            ),
            "amount": np.concatenate(
                [-self.po_amount, np.array([v for _, v, _ in pending_extra], np.int64)]
            ),
            "fee": np.zeros(n_po + len(pending_extra), np.int64),
            "src": np.concatenate(
                [pk, np.array([p for _, _, p in pending_extra], np.int64)]
            ).astype(np.int32),
            "available": np.concatenate(
                [self.po_created_arr, np.array([a for a, _, _ in pending_extra], np.int64)]
            ),
            "currency": np.concatenate(
                [self.po_currency, np.zeros(len(pending_extra), np.int8)]
            ).astype(np.int8),
        }
        payout_all = np.concatenate(
            [payout_of, pk.astype(np.int32), np.array(extra_payout_of, np.int32)]
        )
        allc = {k: np.concatenate([cols[k], extra[k]]) for k in cols}
        order = np.argsort(allc["created"], kind="stable")
        self.balance_transactions = Table(allc["created"][order])
        self.bt_kind = allc["kind"][order]
        self.bt_amount = allc["amount"][order]
        self.bt_fee = allc["fee"][order]
        self.bt_src = allc["src"][order]
        self.bt_available = allc["available"][order]
        self.bt_payout = payout_all[order]
        self.bt_currency = allc["currency"][order]  # index into SETTLEMENT_CURRENCIES
        # Back-references from sources to their bts.
        self._bt_index: dict[int, np.ndarray] = {}
        for kind in range(len(BT_KINDS)):
            sel = np.nonzero(self.bt_kind == kind)[0]
            lookup = np.full(int(self.bt_src[sel].max(initial=-1)) + 1, -1, np.int64)
            lookup[self.bt_src[sel]] = sel
            self._bt_index[kind] = lookup
        # Balance transactions of each payout, as a CSR (sorted by payout, then index).
        by_payout = np.lexsort((np.arange(len(order)), self.bt_payout))
        self.bt_by_payout = by_payout[self.bt_payout[by_payout] >= 0].astype(np.int64)
        self.bt_by_payout_key = self.bt_payout[self.bt_by_payout]

    def _interim_payout_times(self, first_day: int) -> list[tuple[int, str]]:
        """When the merchant of an account with automatic payouts paid out by hand
        (``interim_manual_payouts``): a standard payout about a third into the business and an
        instant one about two thirds in, each in the small hours, before that day's automatic
        payout (charges become available at midnight: they take those). From their own rng,
        so the other draws do not shift."""
        c = self.config
        if not c.interim_manual_payouts or c.manual_payouts:
            return []
        rng = np.random.default_rng(c.seed + 2_200)
        span = int(midnight(c.end)) - first_day
        out = []
        for share, method in ((0.33, "standard"), (0.66, "instant")):
            day = int(midnight(first_day + int(span * share)))
            out.append((day + int(rng.integers(1 * HOUR, 5 * HOUR)), method))
        return out

    def _balance_shapes(self, add: Any) -> None:
        """Top-ups (one reversed), Connect application fees (one partly refunded) and
        transfers to connected accounts (one reversed), and one transaction of a category
        Stripe has not invented yet (issue 21). A handful each, from their own rng so the
        other draws do not shift; every one is swept into a payout like any transaction."""
        c = self.config
        rng = np.random.default_rng(c.seed + 2_100)
        span = c.days * DAY

        def at(n: int, lo: float, hi: float) -> np.ndarray:
            return np.sort(c.start + (rng.uniform(lo, hi, n) * span).astype(np.int64))

        none = np.zeros(1, np.int64)
        # Top-ups from the bank (ACH: available after 4 days); the second is reversed 2 days
        # later (its money leaves the balance again at once).
        tu_created = at(2, 0.2, 0.6)
        tu_amount = np.array([50_000, 20_000], np.int64)
        self.topups = Table(tu_created)
        self.tu_amount = tu_amount
        self.tu_reversed_at = np.array([0, int(tu_created[1]) + 2 * DAY], np.int64)
        add(BT_TOPUP, tu_created, tu_amount, np.zeros(2), np.arange(2), tu_created + 4 * DAY)
        rev = self.tu_reversed_at[1:]
        add(BT_TOPUP_REVERSAL, rev, -tu_amount[1:], none, np.array([1]), rev)
        # Application fees earned on connected accounts' charges; the first partly refunded.
        fee_created = at(3, 0.1, 0.7)
        fee_amount = rng.integers(300, 1_500, 3).astype(np.int64)
        self.application_fees = Table(fee_created)
        self.fee_amount = fee_amount
        self.fee_refunded = np.array([fee_amount[0] // 2, 0, 0], np.int64)
        self.fee_refunded_at = np.array([int(fee_created[0]) + DAY, 0, 0], np.int64)
        add(BT_APP_FEE, fee_created, fee_amount, np.zeros(3), np.arange(3), fee_created + 2 * DAY)
        add(
            BT_APP_FEE_REFUND,
            self.fee_refunded_at[:1],
            -self.fee_refunded[:1],
            none,
            np.array([0]),
            self.fee_refunded_at[:1],
        )
        # Transfers to connected accounts; the second is reversed a day later.
        tr_created = at(2, 0.3, 0.8)
        tr_amount = rng.integers(2_000, 8_000, 2).astype(np.int64)
        self.transfers = Table(tr_created)
        self.tr_amount = tr_amount
        self.tr_reversed_at = np.array([0, int(tr_created[1]) + DAY], np.int64)
        add(BT_TRANSFER, tr_created, -tr_amount, np.zeros(2), np.arange(2), tr_created)
        rev = self.tr_reversed_at[1:]
        add(BT_TRANSFER_REVERSAL, rev, tr_amount[1:], none, np.array([1]), rev)
        # One transaction of a reporting category no mapping knows.
        odd = at(1, 0.4, 0.5)
        add(BT_MADE_UP, odd, np.array([-1_234]), none, np.zeros(1, np.int64), odd)

    def bt_of(self, kind: int, src: int) -> int:
        """Index of the balance transaction of ``kind`` whose source is ``src``, or -1."""
        lookup = self._bt_index[kind]
        return int(lookup[src]) if 0 <= src < len(lookup) else -1

    def payout_bts(self, p: int) -> np.ndarray:
        lo = int(np.searchsorted(self.bt_by_payout_key, p, side="left"))
        hi = int(np.searchsorted(self.bt_by_payout_key, p, side="right"))
        return self.bt_by_payout[lo:hi]

    # -- events ----------------------------------------------------------------------------
    def _events(self) -> None:
        c = self.config
        parts: list[tuple[np.ndarray, int, np.ndarray]] = []  # (created, type, object index)

        def add(created: np.ndarray, etype: str, obj: np.ndarray) -> None:
            parts.append((np.asarray(created, np.int64), EVENT_CODE[etype], np.asarray(obj)))

        add(self.customers.created, "customer.created", np.arange(len(self.customers)))
        ncs = np.arange(len(self.checkout_sessions))
        add(
            self.charges.created[self.cs_charge] + SESSION_COMPLETES_AFTER,
            "checkout.session.completed",
            ncs,
        )
        gone = np.nonzero(self.cu_deleted_at)[0]
        add(self.cu_deleted_at[gone], "customer.deleted", gone)
        add(
            self.subscriptions.created,
            "customer.subscription.created",
            np.arange(len(self.subscriptions)),
        )
        ninv = np.arange(len(self.invoices))
        add(self.invoices.created, "invoice.created", ninv)
        add(self.invoices.created + 1, "invoice.finalized", ninv)
        inv_ok = ~self.ch_failed[self.inv_charge]
        paid = ninv[inv_ok]
        # An invoice paid in parts is paid when its last part is.
        last = np.where(self.inv_second_charge >= 0, self.inv_second_charge, self.inv_charge)
        add(self.charges.created[last[paid]] + 1, "invoice.paid", paid)
        add(self.charges.created[self.inv_charge[paid]] + 1, "invoice.payment_succeeded", paid)
        unpaid = ninv[~inv_ok]
        add(self.charges.created[self.inv_charge[unpaid]] + 1, "invoice.payment_failed", unpaid)
        nch = np.arange(c.charges)
        # An authorization succeeds as a charge too (``captured`` false) ...
        add(self.charges.created[~self.ch_failed], "charge.succeeded", nch[~self.ch_failed])
        # ... then lapses after 7 days, or the merchant releases it (Stripe: refunded).
        lapsed = self.ch_auth == AUTH_EXPIRED
        add(self.ch_auth_at[lapsed], "charge.expired", nch[lapsed])
        freed = self.ch_auth == AUTH_RELEASED
        add(self.ch_auth_at[freed], "charge.refunded", nch[freed])
        add(self.charges.created[self.ch_failed], "charge.failed", nch[self.ch_failed])
        nrf = np.arange(len(self.refunds))
        add(self.refunds.created, "charge.refunded", self.rf_charge)
        add(self.refunds.created, "refund.created", nrf)
        add(self.rf_failed_at[self.rf_failed], "refund.failed", nrf[self.rf_failed])
        ndp = np.arange(len(self.disputes))
        add(self.disputes.created, "charge.dispute.created", ndp)
        add(self.disputes.created, "charge.dispute.funds_withdrawn", ndp)
        closed = self.dp_status > 0
        add(self.dp_closed_at[closed], "charge.dispute.closed", ndp[closed])
        won = self.dp_status == 1
        add(self.dp_closed_at[won], "charge.dispute.funds_reinstated", ndp[won])
        npo = np.arange(len(self.payouts))
        add(self.payouts.created, "payout.created", npo)
        arrived = self.po_arrival <= c.end
        add(self.po_arrival[arrived], "payout.paid", npo[arrived])
        add(self.po_arrival[arrived] + HOUR, "payout.reconciliation_completed", npo[arrived])
        if self.failed_payout >= 0:
            add(
                self.po_failed_at[[self.failed_payout]],
                "payout.failed",
                np.array([self.failed_payout]),
            )
        # Issue 19: credit notes, voids and write-offs of open invoices (stripe_after).
        add(self.credit_notes.created, "credit_note.created", np.arange(len(self.credit_notes)))
        voided = np.nonzero(self.inv_voided_at)[0]
        add(self.inv_voided_at[voided], "invoice.voided", voided)
        written_off = np.nonzero(self.inv_uncollectible_at)[0]
        add(self.inv_uncollectible_at[written_off], "invoice.marked_uncollectible", written_off)
        created = np.concatenate([p[0] for p in parts])
        etype = np.concatenate([np.full(len(p[0]), p[1], np.int8) for p in parts])
        obj = np.concatenate([p[2] for p in parts]).astype(np.int32)
        keep = created <= c.end
        created, etype, obj = created[keep], etype[keep], obj[keep]
        order = np.argsort(created, kind="stable")
        self.events = Table(created[order])
        self.ev_type = etype[order]
        self.ev_object = obj[order]

    # -- derived views used by the Sage seed and tests -------------------------------------
    @cached_property
    def erp_charges(self) -> np.ndarray:
        return np.nonzero(self.ch_is_erp)[0]

    def erp_order_no(self, charge: int) -> str | None:
        """The Sage order a charge settles: seeded in Sage, or (a few) one Sage never got."""
        if self.ch_is_erp[charge]:
            return f"SO{charge // 20:07d}"
        if self.ch_erp_unknown[charge]:
            return f"SO9{charge:06d}"
        return None

    def sage_customer_id(self, customer: int) -> str | None:
        """The Sage id an eCommerce platform stored on one customer in ten."""
        return f"E{customer:07d}" if customer % 10 == 0 else None


# -- products (issue 17) -------------------------------------------------------------------
# The catalog Billing invoice lines sell (their ``pricing.price_details.product`` names these
# ids). Two name an item a shop already keeps in Sage (``metadata.sage_item``, seeded in the
# Sage sandbox by ``sage_seed.SHOP_ITEMS``); the rest become items the product creates. One
# name is longer than Sage's 60-character item description; two are physical goods.
PRODUCT_CATALOG: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("prod_pro", "Pro plan (monthly)", "service", {"sage_item": "PRO-MONTHLY"}),
    ("prod_seat", "Team seat", "service", {}),
    ("prod_api", "API overage, per 1,000 calls", "service", {}),
    ("prod_onb", "Onboarding package", "good", {"sage_item": "ONBOARDING"}),
    ("prod_sup", "Premium support", "service", {}),
    ("prod_sto", "Storage add-on 100 GB", "service", {}),
    (
        "prod_ent",
        "Annual maintenance and priority support for the enterprise deployment tier",
        "service",
        {},
    ),
    ("prod_kit", "Starter hardware kit", "good", {}),
    # Goods the web shop sells through Checkout (with prod_kit and prod_onb).
    ("prod_mug", "Enamel camp mug", "good", {}),
    ("prod_tee", "Organic cotton T-shirt", "good", {}),
)
# What Checkout Sessions sell: the catalog's physical goods, with their unit prices in cents.
CHECKOUT_GOODS: tuple[tuple[str, str], ...] = (
    ("prod_kit", "Starter hardware kit"),
    ("prod_onb", "Onboarding package"),
    ("prod_mug", "Enamel camp mug"),
    ("prod_tee", "Organic cotton T-shirt"),
)


def product_catalog(config: BusinessConfig) -> list[dict[str, Any]]:
    """The business's products, oldest first, an hour apart from the business's start (so a
    backfill from the start reads them like everything else)."""
    first = config.start
    return [
        {
            "id": pid,
            "name": name,
            "type": kind,
            "shippable": kind == "good",
            "metadata": dict(metadata),
            "created": first + k * HOUR,
        }
        for k, (pid, name, kind, metadata) in enumerate(PRODUCT_CATALOG)
    ]
