"""Dead-letter replay: release chosen dead documents so the next plan and load retry them.

A dead letter is a document Sage rejected (or could not be planned). Once the cause is fixed
— a missing sales order created in Sage, a mapping corrected, a period reopened — replaying
deletes its outbox row (it was never created in Sage: rejected documents have no Sage id),
the planner plans it again from the staged Stripe rows with the current mapping, and the
loader posts it under the same exactly-once rules. Documents dead-lettered as ``blocked``
are not chosen on their own (they wait for what blocks them); they are released with the
document they wait for, since the planner plans a Stripe object's documents together.
``ops.dead_letters`` keeps the history (``replayed``, ``replayed_at``); a
document Sage rejects again becomes a dead letter again with ``occurrences`` + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from stripe_sage.store.staging import Staging


def release_dead_letters(
    st: Staging,
    *,
    doc_keys: Sequence[str] | None = None,
    doc_type: str | None = None,
    error_code: str | None = None,
) -> list[str]:
    """Release the dead, unreplayed documents matching every given filter (all of them when
    none is given); returns their keys."""
    keys = st.replayable_dead_letters(doc_keys=doc_keys, doc_type=doc_type, error_code=error_code)
    blocked = st.blocked_dependencies()
    chosen = set(keys)
    grew = True
    while grew:  # dependents of dependents, too
        grew = False
        for key, deps in blocked.items():
            if key not in chosen and chosen & set(deps or []):
                chosen.add(key)
                grew = True
    keys = sorted(chosen)
    if keys:
        st.release_for_replay(keys)
    return keys
