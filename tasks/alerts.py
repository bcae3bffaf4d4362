"""Alerts: Prefect automations on a failed run, an authentication failure, dead letters
above a threshold, and documents waiting longer than their reason allows, delivered
through one notification block (a webhook URL: Slack's incoming webhooks and most chat
tools accept its JSON body).

The flows emit two events of their own (``emit_*`` below): ``stripe-sage.auth.failed`` when
Stripe or Sage refuses a key, and ``stripe-sage.dead-letters.above-threshold`` when a run
ends with more open dead letters than ``DEAD_LETTER_ALERT_THRESHOLD``, and
``stripe-sage.waiting.overdue`` when documents wait longer than ``WAITING_ALERT_HOURS``
allows for their reason (e.g. a balance transaction not there after 24 h). Failed runs need no
event of ours: Prefect emits ``prefect.flow-run.Failed`` / ``Crashed`` itself.
``install_alerts`` (``stripe-sage alerts install``) creates or replaces the automations.
Messages name the run, the system and the reason; they never carry a key (the errors they
quote are built without one, see errors.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from stripe_sage.errors import AuthenticationError

AUTH_FAILED = "stripe-sage.auth.failed"
DEAD_LETTERS_ABOVE = "stripe-sage.dead-letters.above-threshold"
WAITING_OVERDUE = "stripe-sage.waiting.overdue"
SUSPENSE_POSTED = "stripe-sage.suspense.posted"
BLOCK_NAME = "stripe-sage-alerts"
PRODUCT_FLOWS = (
    "stripe_to_sage",
    "reconcile_payouts",
    "sync_customers_from_sage",
    "process_stripe_events",
    "realtime_processor",
    "replay_dead_letters",
    "backfill",
    "backfill-windows",
)


def auth_error_in(exc: BaseException | None) -> AuthenticationError | None:
    """The authentication failure behind an exception, following its causes."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, AuthenticationError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def emit_auth_failed(exc: AuthenticationError, *, run_id: str, flow: str) -> None:
    from prefect.events import emit_event

    system = exc.system or "unknown"
    emit_event(
        event=AUTH_FAILED,
        resource={
            "prefect.resource.id": f"stripe-sage.system.{system}",
            "prefect.resource.name": system,
        },
        payload={"run_id": run_id, "flow": flow, "message": str(exc)[:500]},
    )


def emit_dead_letters(
    count: int,
    threshold: int,
    *,
    run_id: str,
    flow: str,
    unposted: dict[str, int] | None = None,
) -> bool:
    """Emit the threshold event when ``count`` open dead letters exceed ``threshold``; the
    other unposted states (``Staging.state_counts``: blocked, waiting, quarantined...) ride
    along, so the alert tells the whole of what is not in Sage."""
    if count <= threshold:
        return False
    from prefect.events import emit_event

    emit_event(
        event=DEAD_LETTERS_ABOVE,
        resource={
            "prefect.resource.id": "stripe-sage.dead-letters",
            "prefect.resource.name": "open dead letters",
        },
        payload={
            "run_id": run_id,
            "flow": flow,
            "count": count,
            "threshold": threshold,
            **{k: v for k, v in (unposted or {}).items() if k != "dead"},
        },
    )
    return True


def emit_waiting_overdue(overdue: list[dict[str, Any]], *, run_id: str, flow: str) -> bool:
    """Emit the overdue event when documents wait longer than their reason allows
    (``overdue``: ``Staging.overdue_waiting``, oldest first)."""
    if not overdue:
        return False
    from prefect.events import emit_event

    oldest = overdue[0]
    emit_event(
        event=WAITING_OVERDUE,
        resource={
            "prefect.resource.id": "stripe-sage.waiting",
            "prefect.resource.name": "waiting documents",
        },
        payload={
            "run_id": run_id,
            "flow": flow,
            "count": len(overdue),
            "doc_key": oldest["doc_key"],
            "reason": str(oldest["reason"])[:300],
            "age_hours": oldest["age_hours"],
            "limit_hours": oldest["limit_hours"],
            "kinds": sorted({str(o["wait_kind"]) for o in overdue}),
        },
    )
    return True


def emit_suspense(flags: list[dict[str, Any]], *, run_id: str, flow: str) -> bool:
    """Emit the suspense event when this run planned journals with lines in suspense: a
    reporting category the mapping does not know (``flags``: ``Staging.suspense_flags``).
    The journals post; the alert names the categories so a person maps them."""
    if not flags:
        return False
    from prefect.events import emit_event

    categories = sorted(
        {c for f in flags for c in re.findall(r"'([^']+)'", str(f["flag"]).split(":", 2)[1])}
    )
    emit_event(
        event=SUSPENSE_POSTED,
        resource={
            "prefect.resource.id": "stripe-sage.suspense",
            "prefect.resource.name": "suspense postings",
        },
        payload={
            "run_id": run_id,
            "flow": flow,
            "count": len(flags),
            "categories": categories,
            "doc_key": flags[0]["doc_key"],
            "flag": str(flags[0]["flag"])[:300],
        },
    )
    return True


@dataclass(frozen=True)
class AlertSpec:
    name: str
    description: str
    expect: frozenset[str]
    match: dict[str, Any]
    match_related: dict[str, Any] | None
    subject: str
    body: str


def alert_specs(flows: Iterable[str] = PRODUCT_FLOWS) -> list[AlertSpec]:
    return [
        AlertSpec(
            name="stripe-sage: run failed",
            description="A stripe-sage flow run failed or crashed.",
            expect=frozenset({"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(flows)},
            subject="stripe-sage: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
            body=(
                "Flow {{ flow.name }}, run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                "{{ flow_run.state.message }}"
            ),
        ),
        AlertSpec(
            name="stripe-sage: authentication failed",
            description="Stripe or Sage Pro refused the configured API key.",
            expect=frozenset({AUTH_FAILED}),
            match={"prefect.resource.id": "stripe-sage.system.*"},
            match_related=None,
            subject="stripe-sage: {{ event.resource.name }} refused the API key",
            body=(
                "{{ event.resource.name }} answered 401/403 in flow {{ event.payload.flow }} "
                "(run {{ event.payload.run_id }}): {{ event.payload.message }}. "
                "Check the key in the environment; nothing was posted after the refusal."
            ),
        ),
        AlertSpec(
            name="stripe-sage: dead letters above threshold",
            description="A run ended with more open dead letters than the threshold.",
            expect=frozenset({DEAD_LETTERS_ABOVE}),
            match={"prefect.resource.id": "stripe-sage.dead-letters"},
            match_related=None,
            subject="stripe-sage: {{ event.payload.count }} open dead letters",
            body=(
                "{{ event.payload.count }} documents are dead-lettered (threshold "
                "{{ event.payload.threshold }}) after run {{ event.payload.run_id }} of "
                "{{ event.payload.flow }}. Also not in Sage: {{ event.payload.blocked }} "
                "blocked by them, {{ event.payload.waiting }} waiting, "
                "{{ event.payload.quarantined }} quarantined records. See stripe-sage "
                "dead-letters list; replay them with the replay-dead-letters deployment once "
                "the cause is fixed."
            ),
        ),
        AlertSpec(
            name="stripe-sage: documents waiting too long",
            description="Documents wait longer than their reason allows (WAITING_ALERT_HOURS).",
            expect=frozenset({WAITING_OVERDUE}),
            match={"prefect.resource.id": "stripe-sage.waiting"},
            match_related=None,
            subject="stripe-sage: {{ event.payload.count }} documents waiting too long",
            body=(
                "{{ event.payload.count }} documents wait longer than allowed after run "
                "{{ event.payload.run_id }} of {{ event.payload.flow }}. The oldest, "
                "{{ event.payload.doc_key }}, has waited {{ event.payload.age_hours }} h "
                "(allowed {{ event.payload.limit_hours }} h): {{ event.payload.reason }}. "
                "See stripe-sage dead-letters list --state waiting."
            ),
        ),
        AlertSpec(
            name="stripe-sage: reporting category posted to suspense",
            description="A balance transaction's reporting category is not in the mapping.",
            expect=frozenset({SUSPENSE_POSTED}),
            match={"prefect.resource.id": "stripe-sage.suspense"},
            match_related=None,
            subject="stripe-sage: unmapped reporting categories {{ event.payload.categories }}",
            body=(
                "Run {{ event.payload.run_id }} of {{ event.payload.flow }} posted "
                "{{ event.payload.count }} journals with lines in the Suspense account: the "
                "mapping's reporting_categories does not know {{ event.payload.categories }}. "
                "The journals posted (nothing is blocked); e.g. {{ event.payload.doc_key }}: "
                "{{ event.payload.flag }}. Map the categories, then reclassify the suspense "
                "balance (SELECT * FROM ops.flags WHERE flag LIKE 'suspense:%')."
            ),
        ),
    ]


def _notification_block(webhook_url: str) -> UUID:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    block = CustomWebhookNotificationBlock(  # type: ignore[call-arg]
        name=BLOCK_NAME,
        url=webhook_url,
        method="POST",
        json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}"},
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)
    return UUID(str(block_id))


def install_alerts(webhook_url: str | None) -> list[str]:
    """Create (or replace) the automations; with no URL they still fire and show in the
    UI's event feed, but notify nobody. Returns the automation names."""
    from prefect.automations import Automation
    from prefect.events.actions import DoNothing, SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_id = _notification_block(webhook_url) if webhook_url else None
    names = []
    for spec in alert_specs():
        while True:  # replace every automation of that name
            try:
                existing: Any = Automation.read(name=spec.name)
                existing.delete()
            except ValueError:
                break
        action: Any = (
            SendNotification(block_document_id=block_id, subject=spec.subject, body=spec.body)
            if block_id
            else DoNothing()
        )
        Automation(
            name=spec.name,
            description=spec.description,
            trigger=EventTrigger(
                expect=set(spec.expect),
                match=spec.match,
                match_related=spec.match_related or {},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[action],
        ).create()
        names.append(spec.name)
    return names
