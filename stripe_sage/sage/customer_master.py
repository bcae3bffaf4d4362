"""The Sage → Stripe direction of the customer master.

Sage customers changed since the cursor (``GET /api/v1/customers?updated_since=``) that are
linked to a Stripe customer update it (name, email, phone, address). Updates never
ping-pong: a field is only written where the two sides differ, so the echo of a write finds
nothing to do. When both sides changed since the last sync, the configured rule decides
(default: the most recent change wins) and the conflict is recorded in
``ops.customer_conflicts``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, Literal

from stripe_sage.errors import NotFoundError
from stripe_sage.sage.client import SageProClient
from stripe_sage.store.staging import Staging, now_utc
from stripe_sage.stripe.client import StripeReader

ConflictRule = Literal["latest_wins", "sage_wins", "stripe_wins"]
CURSOR = "sage_customers"
ADDRESS = {
    "address1": "line1",
    "address2": "line2",
    "city": "city",
    "state": "state",
    "postal_code": "postal_code",
    "country": "country",
}


def stripe_view(sage: dict[str, Any]) -> dict[str, Any]:
    """A Sage customer as the Stripe customer fields it governs."""
    return {
        "name": sage.get("name"),
        "email": sage.get("email"),
        "phone": sage.get("phone"),
        "address": {stripe: sage.get(field) for field, stripe in ADDRESS.items()},
    }


def differences(stripe: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in wanted.items():
        if key == "address":
            current = stripe.get("address") or {}
            changed = {k: v for k, v in value.items() if (current.get(k) or None) != (v or None)}
            if changed:
                out["address"] = {k: v or "" for k, v in value.items()}
        elif (stripe.get(key) or None) != (value or None):
            out[key] = value or ""
    return out


def _parse(ts: str | None) -> dt.datetime | None:
    if not ts:
        return None
    when = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def sync_from_sage(
    st: Staging,
    sage: SageProClient,
    reader: StripeReader,
    run_id: str,
    *,
    rule: ConflictRule = "latest_wins",
    overlap_seconds: int = 60,
) -> dict[str, int]:
    state = st.sync_state(CURSOR) or {}
    since = state.get("created_cursor")
    started = now_utc()
    updated_since = (
        dt.datetime.fromtimestamp(since - overlap_seconds, dt.UTC).isoformat() if since else None
    )
    links = st.stripe_customers_by_sage_id()
    counts = {
        "changed_in_sage": 0,
        "updated_in_stripe": 0,
        "unchanged": 0,
        "unlinked": 0,
        "conflicts": 0,
    }
    for customer in sage.list_customers(updated_since=updated_since):
        counts["changed_in_sage"] += 1
        stripe_id = links.get(customer["customer_id"])
        if stripe_id is None:
            counts["unlinked"] += 1
            continue
        try:
            current = reader.retrieve("/v1/customers", stripe_id)
        except NotFoundError:
            continue
        if current.get("deleted"):
            continue
        diff = differences(current, stripe_view(customer))
        if not diff:
            counts["unchanged"] += 1  # e.g. the echo of our own Stripe → Sage update
            continue
        stripe_changed = _stripe_changed_since(st, stripe_id, since)
        if stripe_changed is not None:
            counts["conflicts"] += 1
            sage_at = _parse(customer.get("updated_at"))
            winner = {"sage_wins": "sage", "stripe_wins": "stripe"}.get(
                rule, "sage" if sage_at and sage_at >= stripe_changed else "stripe"
            )
            st.record_customer_conflict(
                stripe_id,
                customer["customer_id"],
                fields=sorted(diff),
                sage_values=json.dumps(stripe_view(customer)),
                stripe_values=json.dumps({k: current.get(k) for k in diff}),
                sage_updated_at=sage_at,
                stripe_changed_at=stripe_changed,
                winner=winner,
                rule=rule,
                run_id=run_id,
            )
            if winner == "stripe":
                continue  # the Stripe → Sage direction carries Stripe's values over
        key = hashlib.sha256(json.dumps([stripe_id, diff], sort_keys=True).encode()).hexdigest()
        reader.update(
            "/v1/customers",
            stripe_id,
            diff,
            idempotency_key=f"stripe-sage:sage-to-stripe:{key[:40]}",
        )
        counts["updated_in_stripe"] += 1
    st.set_sync_state(CURSOR, created_cursor=int(started.timestamp()))
    return counts


def _stripe_changed_since(st: Staging, stripe_id: str, since: int | None) -> dt.datetime | None:
    """When Stripe-side changes not yet sent to Sage were seen, if any: the customer's
    mapped values differ from what was last posted to Sage and it changed after ``since``."""
    found = st.customer_last_sent(stripe_id)
    if found is None:
        return None
    seen, name, email, phone, last = found
    if since is not None and seen.timestamp() < since:
        return None
    sent = json.loads(last) if last else {}
    if (sent.get("name"), sent.get("email"), sent.get("phone")) == (name, email, phone):
        return None
    return seen
