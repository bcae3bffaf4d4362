"""The Stripe sandbox's world: the generated business plus what happened since.

Base objects come from ``Business`` columns; activity created later (live mode, the
``/_sandbox/activity`` control, metadata updates through the API) lives in small overlay
lists and patch maps. Every object is rendered on demand into the shape of Stripe's own
example in ``fixtures3.json`` (templates copied shallowly, only what varies is replaced), at a
point in time: an event's ``data.object`` shows the object as it was when the event happened.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from devkit.sandbox.stripe_after import credit_note_taxes, credited_line, line_total
from devkit.sandbox.stripe_billing import (
    RATE_INCLUSIVE,
    InvoiceMath,
    coupon_object,
    invoice_math,
    tax_rate_objects,
    unit_amount_decimal,
)
from devkit.sandbox.stripe_business import (
    AUTH_EXPIRY,
    AUTH_PENDING,
    BT_CHARGE,
    BT_DISPUTE,
    BT_DISPUTE_REVERSAL,
    BT_KINDS,
    BT_PAYOUT,
    BT_PAYOUT_FAILURE,
    BT_REFUND,
    BT_REFUND_FAILURE,
    BT_STRIPE_FEE,
    CHECKOUT_GOODS,
    CURRENCIES,
    DAY,
    EVENT_TYPES,
    HOUR,
    SESSION_COMPLETES_AFTER,
    SETTLEMENT_CURRENCIES,
    Business,
    BusinessConfig,
    product_catalog,
)

API_VERSION = "2026-10-28.endive"
JSON = dict[str, Any]

# Resource name → (id prefix, fixture key).
RESOURCES: dict[str, tuple[str, str]] = {
    "customers": ("cus", "customer"),
    "charges": ("ch", "charge"),
    "refunds": ("re", "refund"),
    "disputes": ("du", "dispute"),
    "invoices": ("in", "invoice"),
    "invoice_lines": ("il", "line_item"),
    "subscriptions": ("sub", "subscription"),
    "payouts": ("po", "payout"),
    "balance_transactions": ("txn", "balance_transaction"),
    "events": ("evt", "event"),
    "invoice_payments": ("inpay", "invoice_payment"),
    "products": ("prod", "product"),
    "tax_rates": ("txr", "tax_rate"),
    "topups": ("tu", "topup"),
    "application_fees": ("fee", "application_fee"),
    "transfers": ("tr", "transfer"),
    "credit_notes": ("cn", "credit_note"),
    # Listed per customer only (/v1/customers/{id}/balance_transactions), as in Stripe.
    "customer_balance_transactions": ("cbtxn", "customer_balance_transaction"),
    "checkout_sessions": ("cs_test", "checkout.session"),  # as Stripe: cs_test_…
    "payment_intents": ("pi", "payment_intent"),
}
# Checkout's inclusive sales tax (the shop's prices include it) and its coupon.
CHECKOUT_TAX_RATE = ("txr_checkout_incl_8_25", 8.25)
CHECKOUT_COUPON = "SPRING10"
PREFIX_TO_RESOURCE = {prefix: name for name, (prefix, _) in RESOURCES.items()}

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MASK = (1 << 64) - 1


def _b62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def _unb62(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 62 + _B62.index(ch)
    return n


def load_fixtures() -> dict[str, JSON]:
    text = resources.files("devkit.sandbox").joinpath("data/stripe_fixtures3.json").read_text()
    return json.loads(text)["resources"]


FIRST = [
    "Ada",
    "Grace",
    "Alan",
    "Maria",
    "Jonas",
    "Priya",
    "Kenji",
    "Fatima",
    "Luca",
    "Olga",
    "Tomás",
    "Zoë",
    "Łukasz",
    "Søren",
    "Anaïs",
    "Björn",
    "Chloé",
    "Dmitri",
    "Eun-ji",
    "Noah",
]
LAST = [
    "Lovelace",
    "Hopper",
    "Turing",
    "García",
    "Müller",
    "Sharma",
    "Tanaka",
    "Haddad",
    "Rossi",
    "Ivanova",
    "Nakamura",
    "Ångström",
    "Żółć",
    "Kierkegaard",
    "Dubois",
    "O'Neil",
]
COMPANY = [
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Tyrell",
    "Cyberdyne",
    "Soylent",
    "Wonka",
    "Aperture",
]
PRODUCTS = [
    ("Pro plan (monthly)", "prod_pro"),
    ("Team seat", "prod_seat"),
    ("API overage, per 1,000 calls", "prod_api"),
    ("Onboarding package", "prod_onb"),
    ("Premium support", "prod_sup"),
    ("Storage add-on 100 GB", "prod_sto"),
    ("Annual maintenance and priority support for the enterprise deployment tier", "prod_ent"),
]
COUNTRIES = ["US", "US", "US", "GB", "DE", "JP", "KW", "FR", "CA", "NL"]
BRANDS = ["visa", "mastercard", "amex", "discover"]
# Business.cu_name_kind: customers without a name, and names with no word boundary.
NAMELESS_BILLING, NAMELESS_EMAIL, NAMELESS_NOTHING, LONG_UNBROKEN = 1, 2, 3, 4
UNBROKEN = [
    "Donaudampfschifffahrtselektrizitätenhauptbetriebswerkbauunterbeamtengesellschaft",
    "Grundstücksverkehrsgenehmigungszuständigkeitsübertragungsverordnung",
    "Taumatawhakatangihangakoauauotamateaturipukakapikimaungahoronukupokaiwhenuakitanatahu",
    "Llanfairpwllgwyngyllgogerychwyrndrobwllllantysiliogogogoch",
]


@dataclass
class ChargeSpec:
    created: int
    amount: int
    currency: int  # index into CURRENCIES
    rate: float
    bt_amount: int
    fee_processing: int
    fee_intl: int
    customer: int  # -1: a guest checkout (no Stripe customer)
    failed: bool
    invoice: int = -1
    erp_order_no: str | None = None
    card: int = 0
    bt: int = -1  # overlay charges store their bt index
    auth: int = 0  # AUTH_*: an authorization never captured (stripe_business)
    auth_at: int = 0  # when it expired or was released


@dataclass
class RefundSpec:
    created: int
    charge: int
    amount: int
    bt_amount: int
    failed_at: int = 0  # 0: never fails
    bt: int = -1
    failure_bt: int = -1
    rate: float | None = None  # Stripe's rate of the refund's day; None: the charge's


@dataclass
class BtSpec:
    kind: int
    created: int
    amount: int
    fee: int
    src: int
    available_on: int
    payout: int = -1
    currency: int = 0  # index into SETTLEMENT_CURRENCIES (issue 20)


@dataclass
class Overlay:
    """What happened after the generated business's end (small, in memory)."""

    customers: list[JSON] = field(default_factory=list)  # extra customer attribute dicts
    charges: list[ChargeSpec] = field(default_factory=list)
    refunds: list[RefundSpec] = field(default_factory=list)
    bts: list[BtSpec] = field(default_factory=list)
    events: list[JSON] = field(default_factory=list)  # fully rendered
    charge_refunds: dict[int, list[int]] = field(default_factory=dict)  # charge → refund idx
    invoice_paid_by: dict[int, int] = field(default_factory=dict)  # open invoice → charge
    patches: dict[tuple[str, int], JSON] = field(default_factory=dict)  # current-state merges
    deleted_customers: set[int] = field(default_factory=set)
    # Balance transactions Stripe has not created yet (bt index → time.monotonic() from which
    # it exists): until then its charge shows none and retrieving it is a 404.
    bt_ready_at: dict[int, float] = field(default_factory=dict)


def deep_merge(base: JSON, patch: JSON) -> JSON:
    """A new dict: ``patch`` merged into ``base`` (nested dicts copied, never mutated)."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class StripeWorld:
    """Thread-safe facade over the business + overlay used by the sandbox app."""

    def __init__(self, config: BusinessConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.b = Business(config)
        self.o = Overlay()
        self.clock = clock
        self.lock = threading.RLock()
        self.tpl = load_fixtures()
        self._salt = int.from_bytes(hashlib.sha256(f"seed:{config.seed}".encode()).digest()[:8])
        self.listeners: list[Callable[[JSON], None]] = []
        self.endpoint_count: Callable[[], int] = lambda: 0
        # Presentment currencies; activity may add one Stripe has and our table lacks.
        self.currencies: list[tuple[str, int, float, float]] = list(CURRENCIES)
        # Products keep the fixed ids their invoice lines name (not index-encoded ids).
        self.products = product_catalog(config)
        self._product_index = {p["id"]: k for k, p in enumerate(self.products)}
        # Invoice payments are named after their invoice: id → index, built when first asked.
        self._invoice_payment_index: dict[str, int] | None = None
        # Tax rates too (issue 18): the few rates the account's invoices name.
        # created from the business's start, like the products, so a backfill from it reads them
        self.tax_rates = tax_rate_objects(self.tpl["tax_rate"], config.start + 30)
        self._tax_rate_index = {r["id"]: k for k, r in enumerate(self.tax_rates)}

    # -- ids -------------------------------------------------------------------------------
    def make_id(self, resource: str, index: int) -> str:
        if resource == "products":
            return str(self.products[index]["id"])
        if resource == "tax_rates":
            return str(self.tax_rates[index]["id"])
        if resource == "invoice_payments":
            # As Stripe's: named after the invoice (its second part with a "2").
            j = int(self.b.ip_invoice[index])
            first = int(self.b.ip_charge[index]) == int(self.b.inv_charge[j])
            return f"inpay_{self.make_id('invoices', j)[3:]}" + ("" if first else "2")
        prefix = RESOURCES[resource][0]
        tail = ((index + 1) * 0x9E3779B97F4A7C15 ^ self._salt) & _MASK
        return f"{prefix}_{_b62(index, 7)}{_b62(tail, 11)}"

    def parse_id(self, resource: str, obj_id: str) -> int | None:
        """Index of ``obj_id`` in ``resource``, or None when it is not one of ours."""
        if resource == "products":
            return self._product_index.get(obj_id)
        if resource == "tax_rates":
            return self._tax_rate_index.get(obj_id)
        if resource == "invoice_payments":
            if self._invoice_payment_index is None:
                n = self.count("invoice_payments")
                self._invoice_payment_index = {
                    self.make_id("invoice_payments", p): p for p in range(n)
                }
            return self._invoice_payment_index.get(obj_id)
        prefix = RESOURCES[resource][0] + "_"
        if not obj_id.startswith(prefix) or len(obj_id) != len(prefix) + 18:
            return None
        try:
            index = _unb62(obj_id[len(prefix) : len(prefix) + 7])
        except ValueError:
            return None
        if self.make_id(resource, index) != obj_id or index >= self.count(resource):
            return None
        if resource == "balance_transactions" and not self.bt_exists(index):
            return None
        return index

    def bt_exists(self, x: int) -> bool:
        """Whether Stripe has created balance transaction ``x`` yet (see ``create_charge``)."""
        ready = self.o.bt_ready_at.get(x)
        return ready is None or time.monotonic() >= ready

    # -- counts and timestamps -------------------------------------------------------------
    def base_count(self, resource: str) -> int:
        if resource == "invoice_payments":
            return len(self.b.invoice_payments)
        if resource == "invoice_lines":
            return 0
        if resource == "products":
            return len(self.products)
        if resource == "tax_rates":
            return len(self.tax_rates)
        if resource == "payment_intents":  # one per charge: pi_ and ch_ share their tail
            return len(self.b.charges)
        return len(getattr(self.b, resource))

    def extra(self, resource: str) -> list[Any]:
        lists: dict[str, list[Any]] = {
            "customers": self.o.customers,
            "charges": self.o.charges,
            "refunds": self.o.refunds,
            "balance_transactions": self.o.bts,
            "events": self.o.events,
            "payment_intents": self.o.charges,
        }
        return lists.get(resource, [])

    def count(self, resource: str) -> int:
        return self.base_count(resource) + len(self.extra(resource))

    def base_created(self, resource: str) -> np.ndarray:
        if resource == "invoice_payments":
            return self.b.invoice_payments.created
        if resource == "products":
            return np.array([p["created"] for p in self.products], np.int64)
        if resource == "tax_rates":
            return np.array([r["created"] for r in self.tax_rates], np.int64)
        if resource == "payment_intents":
            return self.b.charges.created
        table: Any = getattr(self.b, resource)
        return table.created

    def created_of(self, resource: str, index: int) -> int:
        n = self.base_count(resource)
        if index < n:
            return int(self.base_created(resource)[index])
        item = self.extra(resource)[index - n]
        return int(item["created"] if isinstance(item, dict) else item.created)

    def now(self) -> int:
        return int(self.clock())

    def as_of(self, t: int | None = None) -> int:
        return self.now() if t is None else t

    # -- specs -----------------------------------------------------------------------------
    def charge(self, i: int) -> ChargeSpec:
        b = self.b
        if i >= len(b.charges):
            return self.o.charges[i - len(b.charges)]
        return ChargeSpec(
            created=int(b.charges.created[i]),
            amount=int(b.ch_amount[i]),
            currency=int(b.ch_currency[i]),
            rate=float(b.ch_rate[i]),
            bt_amount=int(b.ch_bt_amount[i]),
            fee_processing=int(b.ch_fee_processing[i]),
            fee_intl=int(b.ch_fee_intl[i]),
            customer=int(b.ch_customer[i]),
            failed=bool(b.ch_failed[i]),
            invoice=int(b.ch_invoice[i]),
            erp_order_no=b.erp_order_no(i),
            card=int(b.ch_card[i]),
            bt=b.bt_of(BT_CHARGE, i) if not b.ch_failed[i] and not b.ch_auth[i] else -1,
            auth=int(b.ch_auth[i]),
            auth_at=int(b.ch_auth_at[i]),
        )

    def refund(self, r: int) -> RefundSpec:
        b = self.b
        if r >= len(b.refunds):
            return self.o.refunds[r - len(b.refunds)]
        return RefundSpec(
            created=int(b.refunds.created[r]),
            charge=int(b.rf_charge[r]),
            amount=int(b.rf_amount[r]),
            bt_amount=int(b.rf_bt_amount[r]),
            failed_at=int(b.rf_failed_at[r]),
            bt=b.bt_of(BT_REFUND, r),
            failure_bt=b.bt_of(BT_REFUND_FAILURE, r) if b.rf_failed[r] else -1,
            rate=float(b.rf_rate[r]),
        )

    def bt(self, t: int) -> BtSpec:
        b = self.b
        if t >= len(b.balance_transactions):
            return self.o.bts[t - len(b.balance_transactions)]
        return BtSpec(
            kind=int(b.bt_kind[t]),
            created=int(b.balance_transactions.created[t]),
            amount=int(b.bt_amount[t]),
            fee=int(b.bt_fee[t]),
            src=int(b.bt_src[t]),
            available_on=int(b.bt_available[t]),
            payout=int(b.bt_payout[t]),
            currency=int(b.bt_currency[t]),
        )

    def refunds_of_charge(self, i: int) -> list[int]:
        out = []
        if i < len(self.b.charges) and self.b.ch_refund[i] >= 0:
            out.append(int(self.b.ch_refund[i]))
        out += self.o.charge_refunds.get(i, [])
        return out

    # -- rendering -------------------------------------------------------------------------
    def render(
        self,
        resource: str,
        index: int,
        *,
        as_of: int | None = None,
        expand: frozenset[str] = frozenset(),
    ) -> JSON:
        t = self.as_of(as_of)
        fn = getattr(self, f"_render_{resource}")
        obj: JSON = fn(index, t, expand)
        patch = self.o.patches.get((resource, index))
        # Patches come from activity after the generated business ends; an event from inside
        # it shows the object as it was then. A deleted customer shows only its tombstone.
        if patch and t >= self.config.end and not obj.get("deleted"):
            obj = deep_merge(obj, patch)
        return obj

    def _customer_attrs(self, k: int) -> JSON:
        n = len(self.b.customers)
        if k >= n:
            extra = self.o.customers[k - n]
            return {**extra, "billing_name": extra.get("billing_name", extra["name"])}
        rr = random.Random(self.config.seed * 1_000_003 + k)
        first, last = rr.choice(FIRST), rr.choice(LAST)
        name: str | None = f"{first} {last}"
        if k % 37 == 5:
            name = f"{first} {last}, {rr.choice(COMPANY)} International Holdings and Trading Co."
        elif k % 17 == 2:
            name = rr.choice(["山田 太郎", "Zoë Ångström-Øvergård", "Łukasz Żółć", "José Müller"])
        base = k - 1 if k % 29 == 11 else k  # pairs sharing one email
        email = None if k % 13 == 4 else f"customer{base}@example.com"
        country = rr.choice(COUNTRIES)
        billing_name = name  # the name on the customer's cards
        kind = int(self.b.cu_name_kind[k])
        if kind == NAMELESS_BILLING:
            name = None
        elif kind == NAMELESS_EMAIL:
            name, billing_name = None, None
            email = f"customer{k}@example.com"
        elif kind == NAMELESS_NOTHING:
            name, billing_name, email = None, None, None
        elif kind == LONG_UNBROKEN:
            name = billing_name = UNBROKEN[k % len(UNBROKEN)]
        return {
            "created": int(self.b.customers.created[k]),
            "name": name,
            "billing_name": billing_name,
            "email": email,
            "phone": f"+1 555 {rr.randint(100, 999)} {rr.randint(1000, 9999)}",
            "address": {
                "city": rr.choice(
                    ["Springfield", "Berlin", "Tokyo", "Kuwait City", "London", "Paris"]
                ),
                "country": country,
                "line1": f"{rr.randint(1, 999)} Main Street",
                "line2": None,
                "postal_code": f"{rr.randint(10000, 99999)}",
                "state": "CA" if country == "US" else None,
            },
            "metadata": ({"sage_customer_id": sid} if (sid := self.b.sage_customer_id(k)) else {}),
        }

    def _guest_attrs(self, i: int) -> JSON:
        """The buyer of a guest checkout: only what the payment form collected."""
        rr = random.Random(self.config.seed * 2_000_003 + i)
        first, last = rr.choice(FIRST), rr.choice(LAST)
        country = rr.choice(COUNTRIES)
        return {
            "name": None,
            "billing_name": f"{first} {last}",
            "email": f"guest{i}@example.net",
            "phone": None,
            "address": {
                "city": rr.choice(["Springfield", "Berlin", "Tokyo", "London", "Paris"]),
                "country": country,
                "line1": f"{rr.randint(1, 999)} Market Street",
                "line2": None,
                "postal_code": f"{rr.randint(10000, 99999)}",
                "state": "CA" if country == "US" else None,
            },
            "metadata": {},
        }

    def deleted_at(self, k: int) -> int | None:
        """When customer ``k`` was deleted in Stripe (in the business or later), else None."""
        if k < len(self.b.customers) and self.b.cu_deleted_at[k]:
            return int(self.b.cu_deleted_at[k])
        if k in self.o.deleted_customers:
            return int(self.o.patches.get(("customers_deleted_at", k), {}).get("at", 0))
        return None

    def is_deleted(self, k: int, t: int | None = None) -> bool:
        at = self.deleted_at(k)
        return at is not None and self.as_of(t) >= at

    def _render_customers(self, k: int, t: int, expand: frozenset[str]) -> JSON:
        if self.is_deleted(k, t):
            # Stripe's answer for a deleted customer: only this stub (docs/stripe.md).
            return {"id": self.make_id("customers", k), "object": "customer", "deleted": True}
        a = self._customer_attrs(k)
        obj = dict(self.tpl["customer"])
        obj.update(
            id=self.make_id("customers", k),
            created=a["created"],
            email=a["email"],
            name=a["name"],
            phone=a["phone"],
            address=dict(a["address"]),
            metadata=dict(a["metadata"]),
            currency="usd",
            description=None,
            discount=None,
            invoice_prefix=f"{_b62(k, 6).upper()}",
            next_invoice_sequence=1,
            shipping=None,
            balance=self.customer_balance(k, t),
            delinquent=False,
            default_source=None,
            test_clock=None,
        )
        return obj

    def customer_balance_transactions(self, k: int, t: int) -> list[int]:
        """Customer k's balance transactions as of t, oldest first (issue 19)."""
        by_customer = self.__dict__.get("_cbtxn_by_customer")
        if by_customer is None:
            by_customer = {}
            for x, c in enumerate(self.b.cbtxn_customer.tolist()):
                by_customer.setdefault(int(c), []).append(x)
            self.__dict__["_cbtxn_by_customer"] = by_customer
        created = self.b.customer_balance_transactions.created
        return [x for x in by_customer.get(k, []) if int(created[x]) <= t]

    def customer_balance(self, k: int, t: int) -> int:
        """Stripe's ``customer.balance`` as of t: negative is credit the customer holds."""
        amounts = self.b.cbtxn_amount
        return int(sum(int(amounts[x]) for x in self.customer_balance_transactions(k, t)))

    def _render_customer_balance_transactions(self, x: int, t: int, expand: frozenset[str]) -> JSON:
        from devkit.sandbox.stripe_after import CBTXN_TYPES

        b = self.b
        j = int(b.cbtxn_invoice[x])
        obj = dict(self.tpl["customer_balance_transaction"])
        obj.update(
            id=self.make_id("customer_balance_transactions", x),
            amount=int(b.cbtxn_amount[x]),
            created=int(b.customer_balance_transactions.created[x]),
            credit_note=None,
            currency="usd",
            customer=self.make_id("customers", int(b.cbtxn_customer[x])),
            description=None if j >= 0 else "Goodwill credit",
            ending_balance=int(b.cbtxn_ending[x]),
            invoice=self.make_id("invoices", j) if j >= 0 else None,
            livemode=False,
            metadata=None if j >= 0 else {},
            type=CBTXN_TYPES[int(b.cbtxn_type[x])],
            checkout_session=None,
            customer_account=None,
        )
        return obj

    def _render_products(self, k: int, t: int, expand: frozenset[str]) -> JSON:
        p = self.products[k]
        obj = dict(self.tpl["product"])
        obj.update(
            id=p["id"],
            name=p["name"],
            type=p["type"],
            shippable=p["shippable"],
            metadata=dict(p["metadata"]),
            created=p["created"],
            updated=p["created"],
            description=None,
            default_price=f"price_{p['id'][5:]}",
            package_dimensions=None,
            images=[],
            marketing_features=[],
            livemode=False,
        )
        return obj

    def _render_tax_rates(self, k: int, t: int, expand: frozenset[str]) -> JSON:
        return copy.deepcopy(self.tax_rates[k])

    def _charge_state(self, i: int, t: int) -> tuple[int, list[int], int]:
        """(amount refunded as of t, refund indices visible at t, dispute index or -1)."""
        refunded, visible = 0, []
        for r in self.refunds_of_charge(i):
            spec = self.refund(r)
            if spec.created <= t:
                visible.append(r)
                if not (spec.failed_at and spec.failed_at <= t):
                    refunded += spec.amount
        d = -1
        if i < len(self.b.charges) and self.b.ch_dispute[i] >= 0:
            dd = int(self.b.ch_dispute[i])
            if self.b.disputes.created[dd] <= t:
                d = dd
        return refunded, visible, d

    def _render_charges(self, i: int, t: int, expand: frozenset[str]) -> JSON:
        c = self.charge(i)
        tpl = self.tpl["charge"]
        cid = self.make_id("charges", i)
        code = self.currencies[c.currency][0]
        refunded, visible, dispute = self._charge_state(i, t)
        guest = c.customer < 0
        cust = self._guest_attrs(i) if guest else self._customer_attrs(c.customer)
        ok = not c.failed
        captured = ok and not c.auth
        if c.auth and c.auth != AUTH_PENDING and c.auth_at <= t:
            refunded = c.amount  # expired or released: Stripe shows the whole amount refunded
        metadata: JSON = {}
        if c.erp_order_no:
            metadata["erp_order_id"] = c.erp_order_no
        card = dict(tpl["payment_method_details"]["card"])
        rr = random.Random(i * 31 + self.config.seed)
        card.update(
            brand=BRANDS[c.card],
            network=BRANDS[c.card],
            last4=f"{rr.randint(0, 9999):04d}",
            country=cust["address"]["country"],
            amount_authorized=c.amount,
            fingerprint=_b62(
                (self._salt ^ ((-1 - i if guest else c.customer) * 0x2545F4914F6CDD1D)) & _MASK, 16
            ),
            wallet=None,
            exp_month=rr.randint(1, 12),
            exp_year=2030,
        )
        if c.auth:
            card["capture_before"] = c.created + AUTH_EXPIRY
        obj = dict(tpl)
        obj.update(
            id=cid,
            amount=c.amount,
            amount_captured=c.amount if captured else 0,
            amount_refunded=refunded,
            balance_transaction=(
                self.make_id("balance_transactions", c.bt)
                if captured and self.bt_exists(c.bt)
                else None
            ),
            billing_details={
                **tpl["billing_details"],
                "email": cust["email"],
                "name": cust["billing_name"],
                "address": dict(cust["address"]),
            },
            captured=captured,
            created=c.created,
            currency=code,
            customer=None if guest else self.make_id("customers", c.customer),
            description=("Payment for invoice" if c.invoice >= 0 else "Order payment"),
            disputed=dispute >= 0,
            failure_code="card_declined" if c.failed else None,
            failure_message="Your card was declined." if c.failed else None,
            metadata=metadata,
            outcome={
                **tpl["outcome"],
                "network_status": "declined_by_network" if c.failed else "approved_by_network",
                "reason": "generic_decline" if c.failed else None,
                "seller_message": "The bank did not return any further details."
                if c.failed
                else "Payment complete.",
                "type": "issuer_declined" if c.failed else "authorized",
            },
            paid=ok,
            payment_intent=f"pi_{cid[3:]}",
            payment_method=f"pm_{cid[3:]}",
            payment_method_details={"card": card, "type": "card"},
            receipt_email=cust["email"],
            receipt_url=f"https://pay.stripe.com/receipts/{cid}",
            refunded=ok and refunded >= c.amount,
            status="failed" if c.failed else "succeeded",
            livemode=False,
            source=None,
            review=None,
            transfer_data=None,
            shipping=None,
            calculated_statement_descriptor="STRIPE SAGE DEMO",
        )
        obj.pop("refunds", None)  # not included since 2022-11-15 unless expanded
        if "refunds" in expand:
            data = [self._render_refunds(r, t, frozenset()) for r in reversed(visible)]
            obj["refunds"] = {
                "object": "list",
                "data": data,
                "has_more": False,
                "url": f"/v1/charges/{cid}/refunds",
            }
        if "balance_transaction" in expand and obj["balance_transaction"] is not None:
            obj["balance_transaction"] = self._render_balance_transactions(c.bt, t, frozenset())
        if "customer" in expand and not guest:
            obj["customer"] = self.render("customers", c.customer, as_of=t)
        return obj

    def _render_refunds(self, r: int, t: int, expand: frozenset[str]) -> JSON:
        s = self.refund(r)
        ch = self.charge(s.charge)
        failed = bool(s.failed_at and s.failed_at <= t)
        obj = dict(self.tpl["refund"])
        obj.update(
            id=self.make_id("refunds", r),
            amount=s.amount,
            balance_transaction=self.make_id("balance_transactions", s.bt),
            charge=self.make_id("charges", s.charge),
            created=s.created,
            currency=self.currencies[ch.currency][0],
            metadata={},
            payment_intent=f"pi_{self.make_id('charges', s.charge)[3:]}",
            reason=("requested_by_customer", "duplicate", "fraudulent")[r % 3],
            status="failed" if failed else "succeeded",
            failure_balance_transaction=(
                self.make_id("balance_transactions", s.failure_bt) if failed else None
            ),
            failure_reason="expired_or_canceled_card" if failed else None,
        )
        if "balance_transaction" in expand:
            obj["balance_transaction"] = self._render_balance_transactions(s.bt, t, frozenset())
        if "charge" in expand:
            obj["charge"] = self.render("charges", s.charge, as_of=t)
        return obj

    def _dispute_status(self, d: int, t: int) -> str:
        b = self.b
        status = int(b.dp_status[d])
        if status and b.dp_closed_at[d] <= t:
            return "won" if status == 1 else "lost"
        return "needs_response"

    def _render_disputes(self, d: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        i = int(b.dp_charge[d])
        ch = self.charge(i)
        status = self._dispute_status(d, t)
        bts = [b.bt_of(BT_DISPUTE, d)]
        if status == "won":
            bts.append(b.bt_of(BT_DISPUTE_REVERSAL, d))
        tpl = self.tpl["dispute"]
        obj = dict(tpl)
        created = int(b.disputes.created[d])
        obj.update(
            id=self.make_id("disputes", d),
            amount=ch.amount,
            balance_transactions=[
                self._render_balance_transactions(x, t, frozenset()) for x in bts
            ],
            charge=self.make_id("charges", i),
            created=created,
            currency=self.currencies[ch.currency][0],
            evidence_details={**tpl["evidence_details"], "due_by": created + 7 * DAY},
            is_charge_refundable=False,
            metadata={},
            payment_intent=f"pi_{self.make_id('charges', i)[3:]}",
            payment_method_details={
                "card": {
                    **tpl["payment_method_details"]["card"],
                    "brand": BRANDS[ch.card],
                    "case_type": "chargeback",
                    "network": BRANDS[ch.card],
                },
                "type": "card",
            },
            reason=("fraudulent", "product_not_received", "duplicate")[d % 3],
            status=status,
        )
        if "charge" in expand:
            obj["charge"] = self.render("charges", i, as_of=t)
        return obj

    def invoice_math(self, j: int) -> InvoiceMath:
        """Invoice j's lines, discounts and taxes (``stripe_billing``), from its total."""
        b = self.b
        total = int(b.inv_total[j])
        rr = random.Random(self.config.seed * 7919 + j)
        math, _ = invoice_math(
            total, int(b.inv_lines[j]), int(b.inv_kind[j]), bool(b.inv_tax[j] > 0), rr
        )
        return math

    def _discount_id(self, j: int) -> str:
        return f"di_{self.make_id('invoices', j)[3:]}"

    def _discount(self, j: int, expand_coupon: bool = False) -> JSON:
        """The discount an invoice's coupon made (Stripe's ``discount`` object)."""
        math = self.invoice_math(j)
        created = int(self.b.invoices.created[j])
        coupon = math.coupon or ""
        obj = dict(self.tpl["discount"])
        obj.update(
            id=self._discount_id(j),
            checkout_session=None,
            customer=self.make_id("customers", self.charge(int(self.b.inv_charge[j])).customer),
            customer_account=None,
            end=None,
            invoice=self.make_id("invoices", j),
            invoice_item=None,
            promotion_code=None,
            start=created,
            subscription=None,
            subscription_item=None,
            source={
                "coupon": coupon_object(self.tpl["coupon"], coupon, self.config.start)
                if expand_coupon
                else coupon,
                "type": "coupon",
            },
        )
        return obj

    def _invoice_lines(self, j: int, expand: frozenset[str] = frozenset()) -> list[JSON]:
        """Invoice j's lines; ``expand`` as given for the line list (``discounts``,
        ``discount_amounts.discount``)."""
        b = self.b
        math = self.invoice_math(j)
        rr = random.Random(self.config.seed * 7919 + j + 1)
        inv_id = self.make_id("invoices", j)
        sub = int(b.inv_subscription[j])
        created = int(b.invoices.created[j])
        tpl = self.tpl["line_item"]
        has_discount = math.coupon is not None
        discount = self._discount(j) if has_discount else None
        lines = []
        for k, lm in enumerate(math.lines):
            desc, product = PRODUCTS[rr.randrange(len(PRODUCTS))]
            amount, qty = lm.amount, lm.quantity
            if lm.proration:
                desc = ("Unused time on " if amount < 0 else "Remaining time on ") + desc
            line_discounts: list[Any] = []
            discount_amounts: list[JSON] = []
            if discount is not None:
                line_discounts = [discount if "discounts" in expand else discount["id"]]
                discount_amounts = [
                    {
                        "amount": lm.discount,
                        "discount": discount
                        if "discount_amounts.discount" in expand
                        else discount["id"],
                    }
                ]
            line = dict(tpl)
            line.update(
                id=f"il_{inv_id[3:]}{k:02d}",
                invoice=inv_id,
                amount=amount,
                currency=self.currencies[self.charge(int(b.inv_charge[j])).currency][0],
                description=desc if lm.proration else f"{qty} × {desc}",
                discountable=not lm.proration,
                livemode=False,
                metadata={},
                period={"start": created, "end": created + 30 * DAY},
                quantity=qty,
                quantity_decimal=str(qty),
                subtotal=amount,
                discount_amounts=discount_amounts,
                discounts=line_discounts,
                pretax_credit_amounts=[],
                taxes=[
                    {
                        "amount": tax,
                        "tax_behavior": "inclusive" if RATE_INCLUSIVE[rate] else "exclusive",
                        "tax_rate_details": {"tax_rate": rate},
                        "taxability_reason": "standard_rated",
                        "taxable_amount": taxable,
                        "type": "tax_rate_details",
                    }
                    for rate, tax, taxable in lm.taxes
                ],
                pricing={
                    "type": "price_details",
                    "price_details": {"price": f"price_{product[5:]}", "product": product},
                    "unit_amount_decimal": unit_amount_decimal(amount, qty),
                },
                parent=(
                    {
                        "type": "subscription_item_details",
                        "invoice_item_details": None,
                        "subscription_item_details": {
                            "invoice_item": f"ii_{inv_id[3:]}{k:02d}" if lm.proration else None,
                            "proration": lm.proration,
                            "proration_details": {"credited_items": None},
                            "subscription": self.make_id("subscriptions", sub),
                            "subscription_item": f"si_{self.make_id('subscriptions', sub)[4:]}",
                        },
                    }
                    if sub >= 0
                    else {
                        "type": "invoice_item_details",
                        "subscription_item_details": None,
                        "invoice_item_details": {
                            "invoice_item": f"ii_{inv_id[3:]}{k:02d}",
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": None,
                        },
                    }
                ),
            )
            lines.append(line)
        return lines

    def invoice_paid_charge(self, j: int, t: int) -> int:
        """The charge that paid invoice j (in full: an invoice paid in parts, its last part)
        as of t, or -1 while it is open."""
        i = int(self.b.inv_charge[j])
        second = int(self.b.inv_second_charge[j])
        if second >= 0:
            return second if self.b.charges.created[second] <= t else -1
        if not self.b.ch_failed[i] and self.b.charges.created[i] <= t:
            return i
        later = self.o.invoice_paid_by.get(j)
        if later is not None and self.charge(later).created <= t:
            return later
        return -1

    def invoice_amount_paid(self, j: int, t: int) -> int:
        """What invoice j's payments paid as of t (its parts, when paid in parts)."""
        second = int(self.b.inv_second_charge[j])
        if second < 0:
            return int(self.b.inv_total[j]) if self.invoice_paid_charge(j, t) >= 0 else 0
        return sum(
            self.charge(i).amount
            for i in (int(self.b.inv_charge[j]), second)
            if self.charge(i).created <= t
        )

    def invoice_credited(self, j: int, t: int) -> int:
        """What invoice j's credit note (issue 19) took off it as of t, 0 without one."""
        cn = int(self.b.inv_credit_note[j])
        if cn < 0 or int(self.b.credit_notes.created[cn]) > t or self.b.cn_refund[cn] >= 0:
            return 0
        math = self.invoice_math(j)
        return line_total(math, credited_line(math))

    def invoice_refund_credited(self, j: int, t: int) -> int:
        """What invoice j's post-payment credit note (it names a refund) credited as of t."""
        cn = int(self.b.inv_credit_note[j])
        r = int(self.b.cn_refund[cn]) if cn >= 0 else -1
        if r < 0 or int(self.b.credit_notes.created[cn]) > t:
            return 0
        return int(self.b.rf_amount[r])

    def invoice_status(self, j: int, t: int) -> str:
        """paid, open, void or uncollectible as of t (a written-off invoice can still be paid)."""
        if self.invoice_paid_charge(j, t) >= 0:
            return "paid"
        voided_at = int(self.b.inv_voided_at[j])
        if voided_at and voided_at <= t:
            return "void"
        written_off_at = int(self.b.inv_uncollectible_at[j])
        if written_off_at and written_off_at <= t:
            return "uncollectible"
        return "open"

    def _credited_lines(self, cn: int) -> list[int] | None:
        """The invoice lines credit note cn credits, or None for a custom amount: a
        pre-payment note credits the largest line; a post-payment note the whole invoice
        when its refund was full, else the refunded amount as one custom line."""
        b = self.b
        j = int(b.cn_invoice[cn])
        math = self.invoice_math(j)
        r = int(b.cn_refund[cn])
        if r < 0:
            return [credited_line(math)]
        if int(b.rf_amount[r]) == math.total:
            return list(range(len(math.lines)))
        return None

    def credit_note_lines(self, cn: int) -> list[JSON]:
        b = self.b
        j = int(b.cn_invoice[cn])
        math = self.invoice_math(j)
        cn_id = self.make_id("credit_notes", cn)
        credited = self._credited_lines(cn)
        if credited is None:
            amount = int(b.rf_amount[int(b.cn_refund[cn])])
            obj = dict(self.tpl["credit_note_line_item"])
            obj.update(
                id=f"cnli_{cn_id[3:]}00",
                amount=amount,
                description="Partial refund",
                discount_amount=0,
                discount_amounts=[],
                invoice_line_item=None,
                livemode=False,
                quantity=1,
                tax_rates=[],
                type="custom_line_item",
                unit_amount=amount,
                unit_amount_decimal=str(amount),
                pretax_credit_amounts=[],
                taxes=[],
                metadata={},
            )
            return [obj]
        inv_lines = self._invoice_lines(j)
        out = []
        for n, k in enumerate(credited):
            ln = math.lines[k]
            inv_line = inv_lines[k]
            obj = dict(self.tpl["credit_note_line_item"])
            obj.update(
                id=f"cnli_{cn_id[3:]}{n:02d}",
                amount=ln.amount,
                description=inv_line["description"],
                discount_amount=ln.discount,
                discount_amounts=[
                    {"amount": ln.discount, "discount": d} for d in inv_line["discounts"]
                ],
                invoice_line_item=inv_line["id"],
                livemode=False,
                quantity=ln.quantity,
                tax_rates=[],
                type="invoice_line_item",
                unit_amount=None,
                unit_amount_decimal=None,
                pretax_credit_amounts=(
                    [
                        {"amount": ln.discount, "discount": d, "type": "discount"}
                        for d in inv_line["discounts"]
                    ]
                ),
                taxes=credit_note_taxes(math, k),
                metadata={},
            )
            out.append(obj)
        return out

    def _render_credit_notes(self, cn: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        j = int(b.cn_invoice[cn])
        r = int(b.cn_refund[cn])
        created = int(b.credit_notes.created[cn])
        cn_id = self.make_id("credit_notes", cn)
        inv = self._render_invoices(j, created, frozenset())
        lines = self.credit_note_lines(cn)
        taxes = [x for ln in lines for x in ln["taxes"]]
        exclusive = sum(x["amount"] for x in taxes if x["tax_behavior"] == "exclusive")
        inclusive = sum(x["amount"] for x in taxes if x["tax_behavior"] == "inclusive")
        subtotal = sum(ln["amount"] for ln in lines)
        discount = sum(ln["discount_amount"] for ln in lines)
        total = subtotal - discount + exclusive
        by_rate: dict[str, JSON] = {}
        for x in taxes:  # per rate, in the lines' order
            rate = x["tax_rate_details"]["tax_rate"]
            acc = by_rate.setdefault(rate, {**x, "amount": 0, "taxable_amount": 0})
            acc["amount"] += x["amount"]
            acc["taxable_amount"] += x["taxable_amount"]
        discounts: dict[str, int] = {}
        for ln in lines:
            for d in ln["discount_amounts"]:
                discounts[d["discount"]] = discounts.get(d["discount"], 0) + d["amount"]
        obj = dict(self.tpl["credit_note"])
        obj.update(
            id=cn_id,
            amount=total,
            amount_shipping=0,
            created=created,
            currency="usd",
            customer=inv["customer"],
            customer_account=None,
            customer_balance_transaction=None,
            discount_amount=discount,
            discount_amounts=[{"amount": a, "discount": d} for d, a in discounts.items()],
            effective_at=created,
            invoice=inv["id"],
            livemode=False,
            memo=None,
            metadata={},
            number=f"{inv['number']}-CN-01",
            out_of_band_amount=None,
            pdf=f"https://pay.stripe.com/credit_notes/{cn_id}/pdf",
            post_payment_amount=total if r >= 0 else 0,
            pre_payment_amount=0 if r >= 0 else total,
            pretax_credit_amounts=[
                {"amount": a, "discount": d, "type": "discount"} for d, a in discounts.items()
            ],
            reason="order_change" if r < 0 else "requested_by_customer",
            refunds=(
                [
                    {
                        "amount_refunded": total,
                        "refund": self.make_id("refunds", r),
                        "payment_record_refund": None,
                        "type": "refund",
                    }
                ]
                if r >= 0
                else []
            ),
            shipping_cost=None,
            status="issued",
            subtotal=subtotal,
            subtotal_excluding_tax=subtotal - inclusive,
            total=total,
            total_excluding_tax=total - exclusive - inclusive,
            total_taxes=list(by_rate.values()),
            type="post_payment" if r >= 0 else "pre_payment",
            voided_at=None,
            lines={
                "object": "list",
                "data": lines,
                "has_more": False,
                "url": f"/v1/credit_notes/{cn_id}/lines",
            },
        )
        return obj

    def _render_invoices(self, j: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        i = int(b.inv_charge[j])
        ch = self.charge(i)
        cust = self._customer_attrs(ch.customer)
        total = int(b.inv_total[j])
        math = self.invoice_math(j)
        assert math.total == total, f"invoice {j}: lines make {math.total}, not {total}"
        paid_by = self.invoice_paid_charge(j, t)
        paid = paid_by >= 0
        status = self.invoice_status(j, t)
        credited = self.invoice_credited(j, t)
        # Issue 19: credit the customer held, used up when the invoice was finalized.
        balance_used = int(b.inv_balance_applied[j])
        voided_at = int(b.inv_voided_at[j])
        written_off_at = int(b.inv_uncollectible_at[j])
        created = int(b.invoices.created[j])
        sub = int(b.inv_subscription[j])
        line_expand = frozenset(
            e[len("lines.data.") :] for e in expand if e.startswith("lines.data.")
        )
        lines = self._invoice_lines(j, line_expand)
        inv_id = self.make_id("invoices", j)
        tpl = self.tpl["invoice"]
        discount = self._discount(j) if math.coupon else None
        obj = dict(tpl)
        obj.update(
            id=inv_id,
            number=f"{_b62(ch.customer, 6).upper()}-{j + 1:04d}",
            customer=self.make_id("customers", ch.customer),
            customer_email=cust["email"],
            customer_name=cust["name"],
            customer_phone=cust["phone"],
            customer_address=dict(cust["address"]),
            customer_shipping=None,
            # Credit the customer held is used at finalization (issue 19; only on settlement-
            # currency invoices); an invoice paid in parts (issue 20) has paid its parts so far.
            amount_due=total - balance_used,
            amount_paid=(
                self.invoice_amount_paid(j, t) - balance_used
                if paid
                else self.invoice_amount_paid(j, t)
            ),
            amount_remaining=(
                0 if paid else total - credited - balance_used - self.invoice_amount_paid(j, t)
            ),
            pre_payment_credit_notes_amount=credited,
            post_payment_credit_notes_amount=self.invoice_refund_credited(j, t),
            amount_overpaid=0,
            amount_shipping=0,
            attempt_count=1,
            attempted=True,
            auto_advance=status == "open",
            billing_reason="subscription_cycle" if sub >= 0 else "manual",
            collection_method="charge_automatically",
            created=created,
            currency=self.currencies[ch.currency][0],
            due_date=None,
            effective_at=created + 1,
            ending_balance=0,  # finalized: any credit it used is gone
            from_invoice=None,
            hosted_invoice_url=f"https://invoice.stripe.com/i/{inv_id}",
            invoice_pdf=f"https://pay.stripe.com/invoice/{inv_id}/pdf",
            last_finalization_error=None,
            livemode=False,
            metadata={},
            next_payment_attempt=created + 3 * DAY if status == "open" else None,
            parent=(
                {
                    "type": "subscription_details",
                    "quote_details": None,
                    "subscription_details": {
                        "metadata": {},
                        "subscription": self.make_id("subscriptions", sub),
                    },
                }
                if sub >= 0
                else None
            ),
            period_start=created,
            period_end=created + 30 * DAY,
            shipping_cost=None,
            shipping_details=None,
            starting_balance=-balance_used,
            status=status,
            status_transitions={
                "finalized_at": created + 1,
                "marked_uncollectible_at": (
                    written_off_at if written_off_at and written_off_at <= t else None
                ),
                "paid_at": self.charge(paid_by).created if paid else None,
                "voided_at": voided_at if status == "void" else None,
            },
            subtotal=math.subtotal,
            subtotal_excluding_tax=math.subtotal - math.tax(inclusive=True),
            total=total,
            total_excluding_tax=math.total_excluding_tax,
            discounts=(
                [] if discount is None else [discount if "discounts" in expand else discount["id"]]
            ),
            total_discount_amounts=(
                []
                if discount is None
                else [
                    {
                        "amount": math.discount,
                        "discount": discount
                        if "total_discount_amounts.discount" in expand
                        else discount["id"],
                    }
                ]
            ),
            total_pretax_credit_amounts=[],
            total_taxes=[
                {
                    "amount": tax,
                    "tax_behavior": "inclusive" if RATE_INCLUSIVE[rate] else "exclusive",
                    "tax_rate_details": {"tax_rate": rate},
                    "taxability_reason": "standard_rated",
                    "taxable_amount": taxable,
                    "type": "tax_rate_details",
                }
                for rate, tax, taxable in math.taxes_by_rate()
            ],
            webhooks_delivered_at=created + 1,
            lines={
                "object": "list",
                "data": lines[:10],
                "has_more": len(lines) > 10,
                "url": f"/v1/invoices/{inv_id}/lines",
            },
        )
        if "customer" in expand:
            obj["customer"] = self.render("customers", ch.customer, as_of=t)
        return obj

    def _render_invoice_payments(self, p: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        j = int(b.ip_invoice[p])
        own = int(b.ip_charge[p])
        first = own == int(b.inv_charge[j])
        if int(b.inv_second_charge[j]) < 0:
            # One payment: the invoice's charge, or the live mode's later one.
            paid_by = self.invoice_paid_charge(j, t)
            i = paid_by if paid_by >= 0 else own
            paid = paid_by >= 0
        else:  # one part of an invoice paid in parts (issue 20)
            i = own
            paid = self.charge(i).created <= t
        ch = self.charge(i)
        inv_id = self.make_id("invoices", j)
        obj = dict(self.tpl["invoice_payment"])
        obj.update(
            id=self.make_id("invoice_payments", p),
            amount_paid=ch.amount if paid else 0,
            amount_requested=ch.amount,
            created=int(b.invoices.created[j]) if first else ch.created,
            currency=self.currencies[ch.currency][0],
            invoice=inv_id,
            is_default=first,
            livemode=False,
            payment={"type": "charge", "charge": self.make_id("charges", i)},
            status="paid" if paid else "open",
            status_transitions={
                "canceled_at": None,
                "paid_at": ch.created if paid else None,
            },
        )
        return obj

    def _render_subscriptions(self, s: int, t: int, expand: frozenset[str]) -> JSON:
        tpl = self.tpl["subscription"]
        created = int(self.b.subscriptions.created[s])
        sid = self.make_id("subscriptions", s)
        item = copy.deepcopy(tpl["items"]["data"][0])
        # Issue 18: each subscription sells one of the catalog's plans, 1-5 seats, monthly or
        # yearly (the analysts' MRR tables read these).
        rr = random.Random(self.config.seed * 104_729 + s)
        _, product = PRODUCTS[rr.randrange(len(PRODUCTS))]
        yearly = rr.random() < 0.2
        unit_amount = rr.choice([900, 1900, 4900, 9900]) * (10 if yearly else 1)
        period = (365 if yearly else 30) * DAY
        periods_done = max(0, (self.config.end - created) // period)
        item.update(
            id=f"si_{sid[4:]}",
            subscription=sid,
            created=created,
            quantity=rr.randint(1, 5),
            current_period_start=created + periods_done * period,
            current_period_end=created + (periods_done + 1) * period,
            price={
                **item["price"],
                "id": f"price_{product[5:]}_{'year' if yearly else 'month'}",
                "product": product,
                "created": created,
                "currency": "usd",
                "livemode": False,
                "unit_amount": unit_amount,
                "unit_amount_decimal": str(unit_amount),
                "recurring": {
                    **item["price"]["recurring"],
                    "interval": "year" if yearly else "month",
                    "interval_count": 1,
                },
            },
        )
        obj = dict(tpl)
        obj.update(
            id=sid,
            customer=self.make_id("customers", int(self.b.sub_customer[s])),
            created=created,
            start_date=created,
            billing_cycle_anchor=created,
            cancel_at=None,
            canceled_at=None,
            ended_at=None,
            status="active",
            currency="usd",
            livemode=False,
            metadata={},
            latest_invoice=None,
            discounts=[],
            items={
                "object": "list",
                "data": [item],
                "has_more": False,
                "url": f"/v1/subscription_items?subscription={sid}",
            },
            next_pending_invoice_item_invoice=None,
            pause_collection=None,
            trial_end=None,
            trial_start=None,
            transfer_data=None,
            schedule=None,
            pending_update=None,
        )
        return obj

    def _payout_state(self, p: int, t: int) -> tuple[str, str]:
        b = self.b
        t = min(t, self.config.end)  # the generated business is frozen at its end
        arrival = int(b.po_arrival[p])
        if p == b.failed_payout and b.po_failed_at[p] <= t:
            return "failed", "completed"
        if arrival <= t:
            return "paid", "completed" if arrival + HOUR <= t else "in_progress"
        return "in_transit", "in_progress"

    def _render_payouts(self, p: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        status, recon = self._payout_state(p, t)
        failed = status == "failed"
        bt = b.bt_of(BT_PAYOUT, p)
        fbt = b.bt_of(BT_PAYOUT_FAILURE, p) if failed else -1
        pid = self.make_id("payouts", p)
        obj = dict(self.tpl["payout"])
        obj.update(
            id=pid,
            amount=int(b.po_amount[p]),
            arrival_date=int(b.po_arrival[p]),
            automatic=bool(b.po_automatic[p]),
            balance_transaction=self.make_id("balance_transactions", bt),
            created=int(b.payouts.created[p]),
            currency=SETTLEMENT_CURRENCIES[int(b.po_currency[p])],
            description="STRIPE PAYOUT",
            destination=(
                "ba_stripe_sage_eur" if int(b.po_currency[p]) else "ba_stripe_sage_operating"
            ),
            failure_balance_transaction=self.make_id("balance_transactions", fbt)
            if failed
            else None,
            failure_code="account_closed" if failed else None,
            failure_message="The bank account has been closed." if failed else None,
            livemode=False,
            metadata={},
            method=str(b.po_method[p]),
            reconciliation_status=recon,
            status=status,
            type="bank_account",
            original_payout=None,
            reversed_by=None,
            trace_id={
                "status": "supported" if status != "in_transit" else "pending",
                "value": f"TRACE{p:010d}" if status != "in_transit" else None,
            },
        )
        if "balance_transaction" in expand:
            obj["balance_transaction"] = self._render_balance_transactions(bt, t, frozenset())
        return obj

    def _render_balance_transactions(self, x: int, t: int, expand: frozenset[str]) -> JSON:
        s = self.bt(x)
        btype, category = BT_KINDS[s.kind]
        cur = SETTLEMENT_CURRENCIES[s.currency]
        rate: float | None = None
        fee_details: list[JSON] = []
        if s.kind == BT_CHARGE:
            ch = self.charge(s.src)
            source = self.make_id("charges", s.src)
            description = "Payment for invoice" if ch.invoice >= 0 else "Order payment"
            rate = ch.rate if ch.currency else None
            fee_details.append(
                {
                    "amount": ch.fee_processing,
                    "application": None,
                    "currency": cur,
                    "description": "Stripe processing fees",
                    "type": "stripe_fee",
                }
            )
            if ch.fee_intl:
                fee_details.append(
                    {
                        "amount": ch.fee_intl,
                        "application": None,
                        "currency": cur,
                        "description": "International card fee",
                        "type": "stripe_fee",
                    }
                )
        elif s.kind in (BT_REFUND, BT_REFUND_FAILURE):
            rf = self.refund(s.src)
            ch = self.charge(rf.charge)
            source = self.make_id("refunds", s.src)
            description = "REFUND FOR CHARGE" if s.kind == BT_REFUND else "REFUND FAILURE"
            rate = (rf.rate if rf.rate is not None else ch.rate) if ch.currency else None
        elif s.kind in (BT_DISPUTE, BT_DISPUTE_REVERSAL):
            ch = self.charge(int(self.b.dp_charge[s.src]))
            source = self.make_id("disputes", s.src)
            description = (
                "Chargeback withdrawal for " if s.kind == BT_DISPUTE else "Chargeback reversal for "
            ) + self.make_id("charges", int(self.b.dp_charge[s.src]))
            rate = ch.rate if ch.currency else None
            if s.fee:
                fee_details.append(
                    {
                        "amount": s.fee,
                        "application": None,
                        "currency": cur,
                        "description": "Dispute fee",
                        "type": "stripe_fee",
                    }
                )
        elif s.kind in (BT_PAYOUT, BT_PAYOUT_FAILURE):
            source = self.make_id("payouts", s.src)
            description = "STRIPE PAYOUT" if s.kind == BT_PAYOUT else "Payout failure"
        elif s.kind == BT_STRIPE_FEE:
            source = None
            description = "Billing - Usage Fee (monthly)"
        else:
            source, description = self._balance_shape_source(s.kind, s.src)
        if s.currency:  # settled in the sale's own currency (a EUR balance): no conversion
            rate = None
        obj = dict(self.tpl["balance_transaction"])
        obj.update(
            id=self.make_id("balance_transactions", x),
            amount=s.amount,
            available_on=s.available_on,
            created=s.created,
            currency=cur,
            description=description,
            exchange_rate=rate,
            fee=s.fee,
            fee_details=fee_details,
            net=s.amount - s.fee,
            reporting_category=category,
            source=source,
            status="available" if s.available_on <= t else "pending",
            type=btype,
            balance_type="payments",
        )
        if "source" in expand and source is not None and source.split("_")[0] in PREFIX_TO_RESOURCE:
            res = PREFIX_TO_RESOURCE[source.split("_", 1)[0]]
            obj["source"] = self.render(res, self.parse_id(res, source) or 0, as_of=t)
        return obj

    # -- top-ups, Connect and the account (issue 21) ----------------------------------------
    def _balance_shape_source(self, kind: int, src: int) -> tuple[str | None, str]:
        """Source id and description of a top-up, Connect or made-up balance transaction."""
        btype = BT_KINDS[kind][0]
        if btype.startswith("topup"):
            return self.make_id("topups", src), (
                "Top-up reversal" if btype == "topup_reversal" else "Top-up from bank"
            )
        if btype.startswith("application_fee"):
            # Stripe's refund of an application fee is a fee_refund (fr_…) object.
            if btype == "application_fee_refund":
                return f"fr_{self.make_id('application_fees', src)[4:]}", "Application fee refund"
            return self.make_id("application_fees", src), "Application fee"
        if btype.startswith("transfer"):
            if btype == "transfer_refund":
                return f"trr_{self.make_id('transfers', src)[3:]}", "Transfer reversal"
            return self.make_id("transfers", src), "Transfer to connected account"
        return None, "Orbital reserve adjustment"

    def _render_topups(self, k: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        created = int(b.topups.created[k])
        bt = b.bt_of(BT_KINDS.index(("topup", "topup")), k)
        reversed_at = int(b.tu_reversed_at[k])
        obj = dict(self.tpl["topup"])
        obj.update(
            id=self.make_id("topups", k),
            amount=int(b.tu_amount[k]),
            balance_transaction=self.make_id("balance_transactions", bt),
            created=created,
            currency="usd",
            description="Top-up from the operating account",
            expected_availability_date=created + 4 * DAY,
            livemode=False,
            metadata={},
            status="reversed" if reversed_at and reversed_at <= t else "succeeded",
            statement_descriptor=None,
            transfer_group=None,
        )
        return obj

    def _render_application_fees(self, k: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        created = int(b.application_fees.created[k])
        refunded = int(b.fee_refunded[k]) if 0 < b.fee_refunded_at[k] <= t else 0
        fid = self.make_id("application_fees", k)
        bt = b.bt_of(BT_KINDS.index(("application_fee", "platform_earning")), k)
        obj = dict(self.tpl["application_fee"])
        obj.update(
            id=fid,
            account=f"acct_connected{k:04d}",
            amount=int(b.fee_amount[k]),
            amount_refunded=refunded,
            balance_transaction=self.make_id("balance_transactions", bt),
            charge=f"py_connected{k:010d}",
            created=created,
            currency="usd",
            fee_source={"charge": f"py_connected{k:010d}", "type": "charge"},
            livemode=False,
            refunded=refunded == int(b.fee_amount[k]),
            refunds={
                "data": [],
                "has_more": False,
                "object": "list",
                "url": f"/v1/application_fees/{fid}/refunds",
            },
        )
        return obj

    def _render_transfers(self, k: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        reversed_ = 0 < b.tr_reversed_at[k] <= t
        tid = self.make_id("transfers", k)
        bt = b.bt_of(BT_KINDS.index(("transfer", "transfer")), k)
        obj = dict(self.tpl["transfer"])
        obj.update(
            id=tid,
            amount=int(b.tr_amount[k]),
            amount_reversed=int(b.tr_amount[k]) if reversed_ else 0,
            balance_transaction=self.make_id("balance_transactions", bt),
            created=int(b.transfers.created[k]),
            currency="usd",
            description=None,
            destination=f"acct_connected{k:04d}",
            destination_payment=f"py_transfer{k:010d}",
            livemode=False,
            metadata={},
            reversals={
                "data": [],
                "has_more": False,
                "object": "list",
                "url": f"/v1/transfers/{tid}/reversals",
            },
            reversed=bool(reversed_),
            source_transaction=None,
            source_type="card",
            transfer_group=None,
        )
        return obj

    def render_account(self) -> JSON:
        """``GET /v1/account``: the business's own account, with its payout schedule."""
        obj = copy.deepcopy(self.tpl["account"])
        obj["id"] = f"acct_sandbox{self.config.seed:06d}"
        obj["settings"]["payouts"]["schedule"] = (
            {"delay_days": 2, "interval": "manual"}
            if self.config.manual_payouts
            else {"delay_days": 2, "interval": "daily"}
        )
        return dict(obj)

    def _render_events(self, e: int, t: int, expand: frozenset[str]) -> JSON:
        n = len(self.b.events)
        if e >= n:
            return self.o.events[e - n]
        etype, resource = EVENT_TYPES[int(self.b.ev_type[e])]
        created = int(self.b.events.created[e])
        obj_index = int(self.b.ev_object[e])
        if etype == "customer.deleted":  # the customer as it was, flagged (as delete_customer)
            data_obj = {**self.render(resource, obj_index, as_of=created - 1), "deleted": True}
        else:
            data_obj = self.render(resource, obj_index, as_of=created)
        return self._event(self.make_id("events", e), etype, created, data_obj)

    def _event(
        self, eid: str, etype: str, created: int, data_obj: JSON, previous: JSON | None = None
    ) -> JSON:
        obj = dict(self.tpl["event"])
        data: JSON = {"object": data_obj}
        if previous is not None:
            data["previous_attributes"] = previous
        obj.update(
            id=eid,
            api_version=API_VERSION,
            created=created,
            data=data,
            livemode=False,
            pending_webhooks=self.endpoint_count(),
            request={"id": None, "idempotency_key": None},
            type=etype,
        )
        return obj

    # -- Checkout Sessions and payment intents (issue 17) ---------------------------------
    def session_of_charge(self, i: int) -> int:
        """The Checkout Session charge ``i`` paid, or -1."""
        k = np.nonzero(self.b.cs_charge == i)[0]
        return int(k[0]) if len(k) else -1

    def _checkout_parts(self, s: int) -> tuple[list[JSON], int, int]:
        """(line items, shipping, discount) of session ``s``; Σ line amount_total + shipping
        is the paying charge's amount, exactly. Drawn from the session's index."""
        b = self.b
        i = int(b.cs_charge[s])
        total = self.charge(i).amount
        cs_id = self.make_id("checkout_sessions", s)
        rr = random.Random(self.config.seed * 104_729 + s)
        parts: list[tuple[str, str, int, int]] = []  # product, name, quantity, unit amount
        tax_rate = 0.0
        shipping = discount = 0
        per_line_tax: list[int] = []
        j = int(b.cs_invoice[s])
        if j >= 0:  # invoice_creation: the items of its Billing invoice, tax exclusive
            lines = self._invoice_lines(j)
            for ln in lines:
                pd = ln["pricing"]["price_details"]
                q = int(ln["quantity"])
                parts.append((pd["product"], ln["description"], q, int(ln["amount"]) // q))
            tax = int(b.inv_tax[j])
            weights = [q * u for _, _, q, u in parts]
            per_line_tax = [tax * w // max(1, sum(weights)) for w in weights]
            per_line_tax[0] += tax - sum(per_line_tax)
        else:
            if rr.random() < 0.6:
                shipping = min(rr.choice([499, 895, 1200]), total // 5)
            lines_total = total - shipping
            if rr.random() < 0.4:
                discount = lines_total // 9  # 10% off the subtotal
            subtotal = lines_total + discount
            n = rr.randint(1, 4) if subtotal >= 400 else 1
            goods = rr.sample(CHECKOUT_GOODS, n)
            weights = [rr.randint(1, 10) for _ in range(n)]
            left = subtotal
            for k, (product, name) in enumerate(goods):
                if k == n - 1:  # the last line takes what is left, one unit of it
                    parts.append((product, name, 1, left))
                    break
                q = rr.randint(1, 3)
                unit = max(1, subtotal * weights[k] // sum(weights) // q)
                if left - q * unit < 1:
                    q, unit = 1, max(1, (left - 1) // 2)
                parts.append((product, name, q, unit))
                left -= q * unit
            tax_rate = CHECKOUT_TAX_RATE[1] if rr.random() < 0.5 else 0.0
        amounts = [q * u for _, _, q, u in parts]
        discounts = [discount * a // max(1, sum(amounts)) for a in amounts]
        if discounts:
            discounts[-1] += discount - sum(discounts)
        tpl = self.tpl["item"]
        items = []
        for k, ((product, name, q, unit), amount, off) in enumerate(
            zip(parts, amounts, discounts, strict=True)
        ):
            if j >= 0:
                tax, inclusive = per_line_tax[k], False
            else:  # inclusive: the tax is inside what the buyer paid for the line
                tax = round((amount - off) * tax_rate / (100 + tax_rate))
                inclusive = True
            price = deep_merge(
                tpl["price"],
                {
                    "id": f"price_{product[5:]}_{unit}",
                    "product": product,
                    "unit_amount": unit,
                    "unit_amount_decimal": str(unit),
                    "type": "one_time",
                    "recurring": None,
                    "transform_quantity": None,
                    "custom_unit_amount": None,
                    "tax_behavior": "inclusive" if inclusive else "exclusive",
                    "created": self.config.start,
                },
            )
            item = dict(tpl)
            item.update(
                id=f"li_{cs_id.rsplit('_', 1)[-1]}{k:02d}",
                amount_subtotal=amount,
                amount_discount=off,
                amount_tax=tax,
                amount_total=amount - off + (0 if inclusive else tax),
                currency="usd",
                description=name,
                price=price,
                quantity=q,
                metadata={},
                adjustable_quantity=None,
                taxes=(
                    [
                        {
                            "amount": tax,
                            "rate": deep_merge(
                                self.tpl["tax_rate"],
                                {
                                    "id": CHECKOUT_TAX_RATE[0],
                                    "inclusive": inclusive,
                                    "percentage": CHECKOUT_TAX_RATE[1],
                                    "country": "US",
                                    "jurisdiction": "US",
                                    "description": "Sales tax",
                                    "display_name": "Sales tax",
                                    "tax_type": "sales_tax",
                                    "flat_amount": None,
                                    "effective_percentage": CHECKOUT_TAX_RATE[1],
                                },
                            ),
                            "taxability_reason": None,
                            "taxable_amount": amount - off - (tax if inclusive else 0),
                        }
                    ]
                    if tax
                    else []
                ),
                discounts=(
                    [
                        {
                            "amount": off,
                            "discount": deep_merge(
                                self.tpl["discount"],
                                {
                                    "id": f"di_{cs_id.rsplit('_', 1)[-1]}",
                                    "checkout_session": cs_id,
                                    "customer": None,
                                    "source": {"coupon": CHECKOUT_COUPON, "type": "coupon"},
                                },
                            ),
                        }
                    ]
                    if off
                    else []
                ),
            )
            items.append(item)
        return items, shipping, discount

    def checkout_line_items(self, s: int) -> list[JSON]:
        return self._checkout_parts(s)[0]

    def _render_checkout_sessions(self, s: int, t: int, expand: frozenset[str]) -> JSON:
        b = self.b
        i = int(b.cs_charge[s])
        ch = self.charge(i)
        cs_id = self.make_id("checkout_sessions", s)
        created = int(b.checkout_sessions.created[s])
        complete = ch.created + SESSION_COMPLETES_AFTER <= t
        items, shipping, discount = self._checkout_parts(s)
        j = int(b.cs_invoice[s])
        guest = ch.customer < 0
        cust = self._guest_attrs(i) if guest else self._customer_attrs(ch.customer)
        tax = sum(int(x["amount_tax"]) for x in items)
        obj = dict(self.tpl["checkout.session"])
        obj.update(
            id=cs_id,
            created=created,
            expires_at=created + DAY,
            currency="usd",
            customer=None if guest else self.make_id("customers", ch.customer),
            customer_creation="if_required" if guest else None,
            customer_details={
                **self.tpl["checkout.session"]["customer_details"],
                "address": dict(cust["address"]),
                "email": cust["email"],
                "name": cust["billing_name"],
                "phone": None,
            },
            customer_email=None,
            client_secret=None,
            amount_subtotal=sum(int(x["amount_subtotal"]) for x in items),
            amount_total=ch.amount,
            invoice=self.make_id("invoices", j) if j >= 0 and complete else None,
            invoice_creation={
                **self.tpl["checkout.session"]["invoice_creation"],
                "enabled": j >= 0,
            },
            mode="payment",
            # Since API 2022-08-01 the payment intent exists once the buyer confirms.
            payment_intent=f"pi_{self.make_id('charges', i)[3:]}" if complete else None,
            payment_status="paid" if complete else "unpaid",
            status="complete" if complete else "open",
            shipping_address_collection=(
                {"allowed_countries": ["US", "CA", "GB", "DE"]} if shipping else None
            ),
            shipping_cost=(
                {
                    "amount_subtotal": shipping,
                    "amount_tax": 0,
                    "amount_total": shipping,
                    "shipping_rate": "shr_standard",
                }
                if shipping
                else None
            ),
            shipping_options=(
                [{"shipping_amount": shipping, "shipping_rate": "shr_standard"}] if shipping else []
            ),
            total_details={
                "amount_discount": discount,
                "amount_shipping": shipping,
                "amount_tax": tax,
            },
            discounts=([{"coupon": CHECKOUT_COUPON, "promotion_code": None}] if discount else []),
            currency_conversion=None,
            adaptive_pricing={"enabled": False},
            livemode=False,
            metadata={},
            url=None,
            success_url="https://shop.example.com/thanks",
            cancel_url="https://shop.example.com/cart",
            managed_payments={"enabled": False},
            after_expiration=None,
            collected_information=None,
            payment_method_configuration_details=None,
        )
        if "line_items" in expand:
            obj["line_items"] = {
                "object": "list",
                "data": items[:10],
                "has_more": len(items) > 10,
                "url": f"/v1/checkout/sessions/{cs_id}/line_items",
            }
        return obj

    def _render_payment_intents(self, i: int, t: int, expand: frozenset[str]) -> JSON:
        c = self.charge(i)
        cid = self.make_id("charges", i)
        captured = not c.failed and not c.auth
        status = (
            "requires_payment_method"
            if c.failed
            else ("requires_capture" if c.auth == AUTH_PENDING else "succeeded")
        )
        if c.auth and c.auth != AUTH_PENDING:
            status = "canceled"
        obj = dict(self.tpl["payment_intent"])
        obj.update(
            id=f"pi_{cid[3:]}",
            amount=c.amount,
            amount_capturable=c.amount if c.auth == AUTH_PENDING else 0,
            amount_received=c.amount if captured else 0,
            amount_details={"tip": {}},
            canceled_at=c.auth_at if status == "canceled" else None,
            capture_method="manual" if c.auth else "automatic",
            client_secret=f"pi_{cid[3:]}_secret_{_b62(self._salt ^ i, 11)}",
            created=c.created,
            currency=self.currencies[c.currency][0],
            customer=None if c.customer < 0 else self.make_id("customers", c.customer),
            description="Payment for invoice" if c.invoice >= 0 else "Order payment",
            last_payment_error=None,
            latest_charge=cid,
            livemode=False,
            metadata={},
            next_action=None,
            payment_method=f"pm_{cid[3:]}",
            processing=None,
            shipping=None,
            status=status,
            transfer_data=None,
            managed_payments={"enabled": False},
            payment_method_configuration_details=None,
        )
        return obj

    # -- activity after the generated business (live mode, controls, API writes) -----------
    def _tick(self) -> int:
        """Now, but never before the newest thing that already happened (lists stay sorted)."""
        latest = max(
            self.config.end,
            *(
                self.created_of(r, self.count(r) - 1)
                for r in ("charges", "refunds", "events", "balance_transactions", "customers")
                if self.count(r)
            ),
        )
        return max(self.now(), latest)

    def _emit(self, etype: str, resource: str, index: int, previous: JSON | None = None) -> JSON:
        e = self.count("events")
        created = self._tick()
        event = self._event(
            self.make_id("events", e), etype, created, self.render(resource, index), previous
        )
        self.o.events.append(event)
        for listener in list(self.listeners):
            listener(event)
        return event

    def create_customer(
        self,
        *,
        name: str,
        email: str | None = None,
        metadata: JSON | None = None,
        phone: str | None = None,
    ) -> int:
        with self.lock:
            k = self.count("customers")
            self.o.customers.append(
                {
                    "created": self._tick(),
                    "name": name,
                    "email": email,
                    "phone": phone,
                    "address": {
                        "city": None,
                        "country": None,
                        "line1": None,
                        "line2": None,
                        "postal_code": None,
                        "state": None,
                    },
                    "metadata": dict(metadata or {}),
                }
            )
            self._emit("customer.created", "customers", k)
            return k

    def update_object(self, resource: str, index: int, fields: JSON) -> JSON:
        """A POST update (customer or charge): merged into current state, emits *.updated."""
        with self.lock:
            before = self.render(resource, index)
            patch = dict(self.o.patches.get((resource, index), {}))
            previous: JSON = {}
            for key, value in fields.items():
                if key == "metadata":
                    merged = dict(patch.get("metadata") or before.get("metadata") or {})
                    for mk, mv in value.items():
                        if mv in ("", None):
                            merged.pop(mk, None)  # Stripe: an empty value unsets the key
                        else:
                            merged[mk] = mv
                    previous["metadata"] = before.get("metadata")
                    patch["metadata"] = merged
                else:
                    previous[key] = before.get(key)
                    if isinstance(value, dict) and isinstance(before.get(key), dict):
                        value = deep_merge(before[key], value)
                    patch[key] = value
            self.o.patches[(resource, index)] = patch
            etype = {
                "customers": "customer.updated",
                "charges": "charge.updated",
                "invoices": "invoice.updated",
                "products": "product.updated",
                "payment_intents": "payment_intent.updated",
            }[resource]
            self._emit(etype, resource, index, previous)
            return self.render(resource, index)

    def delete_customer(self, k: int) -> JSON:
        with self.lock:
            self.o.patches[("customers_deleted_at", k)] = {"at": self._tick()}
            self.o.deleted_customers.add(k)
            e = self.count("events")
            created = self._tick()
            obj = self._render_customers(k, created - 1, frozenset())
            obj["deleted"] = True
            event = self._event(self.make_id("events", e), "customer.deleted", created, obj)
            self.o.events.append(event)
            for listener in list(self.listeners):
                listener(event)
            return {"id": self.make_id("customers", k), "object": "customer", "deleted": True}

    def _new_bt(self, kind: int, amount: int, fee: int, src: int, available_on: int) -> int:
        x = self.count("balance_transactions")
        self.o.bts.append(
            BtSpec(
                kind=kind,
                created=self._tick(),
                amount=amount,
                fee=fee,
                src=src,
                available_on=available_on,
            )
        )
        return x

    def create_charge(
        self,
        *,
        customer: int,
        amount: int,
        currency: str = "usd",
        metadata: JSON | None = None,
        invoice: int = -1,
        balance_transaction_delay: float = 0.0,
    ) -> int:
        """A new succeeded charge, its ``charge.succeeded`` event emitted now. With
        ``balance_transaction_delay`` (seconds), Stripe creates its balance transaction only
        that much later, as it does for some payments: the charge shows none until then, and
        no event says when it appears."""
        with self.lock:
            if customer >= 0 and self.is_deleted(customer):
                raise ValueError(f"No such customer: '{self.make_id('customers', customer)}'")
            codes = [c for c, *_ in self.currencies]
            if currency not in codes:
                if not (len(currency) == 3 and currency.isalpha() and currency.islower()):
                    raise ValueError(f"currency {currency!r} is not a 3-letter code")
                self.currencies.append((currency, 2, 1.0, 0.0))
                codes.append(currency)
            cur = codes.index(currency)
            rate = self.currencies[cur][2]
            exp = self.currencies[cur][1]
            bt_amount = amount if cur == 0 else round(amount * rate * 10 ** (2 - exp))
            i = self.count("charges")
            created = self._tick()
            spec = ChargeSpec(
                created=created,
                amount=amount,
                currency=cur,
                rate=rate,
                bt_amount=bt_amount,
                fee_processing=round(bt_amount * 0.029) + 30,
                fee_intl=0 if cur == 0 else round(bt_amount * 0.01),
                customer=customer,
                failed=False,
                invoice=invoice,
                erp_order_no=(metadata or {}).get("erp_order_id"),
            )
            spec.bt = self._new_bt(
                BT_CHARGE,
                bt_amount,
                spec.fee_processing + spec.fee_intl,
                i,
                created - created % DAY + 2 * DAY,
            )
            if balance_transaction_delay > 0:
                self.o.bt_ready_at[spec.bt] = time.monotonic() + balance_transaction_delay
            self.o.charges.append(spec)
            if metadata:
                extra = {k: v for k, v in metadata.items() if k != "erp_order_id"}
                if extra:
                    self.o.patches[("charges", i)] = {
                        "metadata": {
                            **({"erp_order_id": spec.erp_order_no} if spec.erp_order_no else {}),
                            **extra,
                        }
                    }
            self._emit("charge.succeeded", "charges", i)
            return i

    def refund_charge(self, i: int, amount: int | None = None) -> int:
        with self.lock:
            ch = self.charge(i)
            if ch.failed:
                raise ValueError("a failed charge cannot be refunded")
            if ch.auth:
                raise ValueError("an uncaptured charge moved no money: nothing to refund")
            refunded, _, _ = self._charge_state(i, self._tick())
            amount = ch.amount - refunded if amount is None else amount
            if amount <= 0 or refunded + amount > ch.amount:
                raise ValueError(f"refund of {amount} exceeds what is left on the charge")
            bt_amount = (
                ch.bt_amount
                if amount == ch.amount
                else max(1, round(ch.bt_amount * amount / ch.amount))
            )
            r = self.count("refunds")
            spec = RefundSpec(created=self._tick(), charge=i, amount=amount, bt_amount=bt_amount)
            spec.bt = self._new_bt(BT_REFUND, -bt_amount, 0, r, spec.created)
            self.o.refunds.append(spec)
            self.o.charge_refunds.setdefault(i, []).append(r)
            self._emit("charge.refunded", "charges", i)
            self._emit("refund.created", "refunds", r)
            return r

    def pay_invoice(self, j: int) -> int:
        with self.lock:
            if self.invoice_paid_charge(j, self._tick()) >= 0:
                raise ValueError("invoice is already paid")
            first = self.charge(int(self.b.inv_charge[j]))
            # What is due: the total less the customer credit it used at finalization, in the
            # invoice's own currency (a foreign-currency invoice too).
            due = int(self.b.inv_total[j]) - int(self.b.inv_balance_applied[j])
            i = self.create_charge(
                customer=first.customer,
                amount=due,
                currency=self.currencies[first.currency][0],
                invoice=j,
            )
            self.o.invoice_paid_by[j] = i
            self._emit("invoice.paid", "invoices", j)
            self._emit("invoice.payment_succeeded", "invoices", j)
            return i

    def open_invoices(self) -> list[int]:
        t = self._tick()
        return [
            int(j)
            for j in np.nonzero(self.b.ch_failed[self.b.inv_charge])[0]
            # Issue 19's credited, voided and written-off invoices stay as they are.
            if self.invoice_status(int(j), t) == "open" and self.b.inv_credit_note[j] < 0
        ]
