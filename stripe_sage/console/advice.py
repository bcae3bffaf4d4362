"""The likely fix for an unposted document, derived from its reason: a small table of reason
patterns, first match wins. Advice names what a finance person changes (in Sage, in Stripe,
in the mapping) and whether a replay is needed afterwards."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Advice:
    pattern: re.Pattern[str]
    text: str  # may name the first capture group as {0}


def _a(pattern: str, text: str) -> Advice:
    return Advice(re.compile(pattern, re.IGNORECASE), text)


# Most specific first. Each pattern is matched against "<state> <reason>".
ADVICE: tuple[Advice, ...] = (
    _a(
        r"erp_order_id (\S+): Sage has no such sales order",
        "Create sales order {0} in Sage (or set charges.unknown_erp_order: on_account in the "
        "mapping to post such payments on account), then replay.",
    ),
    _a(
        r"period_closed|closed (fiscal )?period",
        "Open the fiscal period in Sage (or let the mapping's closed-period policy move the "
        "document to the next open period), then replay.",
    ),
    _a(
        r"customer_id (\S+), which does not exist in Sage|unknown_customer",
        "Link this Stripe customer to an existing Sage customer (metadata sage_customer_id "
        "{0}) or create that customer in Sage, then replay.",
    ),
    _a(
        r"item (\S+), which is not in Sage's item master|unknown_item",
        "Create item {0} in Sage's item master, or map the product to an existing item in the "
        "mapping's items section, then replay.",
    ),
    _a(
        r"tax",
        "Map the Stripe tax rate to a Sage tax code in the mapping's tax section, then replay.",
    ),
    _a(
        r"unknown_account|account \S+ (does not exist|is not in)",
        "Create the GL account in Sage or correct it in the mapping's accounts section, then "
        "replay.",
    ),
    _a(
        r"guest_customer_id",
        "Set charges.guest_customer_id in the mapping to the Sage customer that takes guest "
        "checkouts, then replay.",
    ),
    _a(
        r"unbalanced|over_application",
        "The amounts do not add up in Sage: compare the Stripe object with the payload below, "
        "correct the document it applies to, then replay.",
    ),
    _a(
        r"longer than|too long|max(imum)? length",
        "A field exceeds Sage's length: set the field's length policy in the mapping "
        "(truncate or a fallback), then replay.",
    ),
    _a(
        r"^quarantined",
        "The Stripe record failed a data-quality check: correct it in Stripe; the next sync "
        "checks it again and posts it. No replay needed.",
    ),
    _a(
        r"^waiting",
        "Nothing to do yet: it waits for Stripe data; the next run posts it when the data "
        "arrives. If it waits for days, ask an engineer.",
    ),
    _a(
        r"^blocked",
        "Fix the document it depends on: replaying that one replays this one too.",
    ),
    _a(
        r"^pending",
        "Sage did not take it yet (unavailable or rate limited); the next run retries it.",
    ),
)
DEFAULT_ADVICE = (
    "Read Sage's reason above, fix the cause in Sage or in the mapping, then replay. If the "
    "reason is unclear, ask an engineer (the Prefect UI has the run's logs)."
)


def likely_fix(state: str, reason: str | None) -> str:
    subject = f"{state} {reason or ''}"
    for advice in ADVICE:
        if m := advice.pattern.search(subject):
            groups = [g for g in m.groups() if g] or [""]
            return advice.text.format(*groups)
    return DEFAULT_ADVICE
