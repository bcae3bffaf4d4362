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

from stripe_sage.store.staging import Staging, now_utc

BLOCKED = "blocked"


def release_dead_letters(
    st: Staging,
    *,
    doc_keys: Sequence[str] | None = None,
    doc_type: str | None = None,
    error_code: str | None = None,
) -> list[str]:
    """Release the dead, unreplayed documents matching every given filter (all of them when
    none is given); returns their keys."""
    where = ["o.status = 'dead'", "NOT d.replayed", f"coalesce(d.error_code, '') <> '{BLOCKED}'"]
    params: list[object] = []
    if doc_keys:
        where.append("o.doc_key IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(doc_keys))
    if doc_type:
        where.append("o.doc_type = ?")
        params.append(doc_type)
    if error_code:
        where.append("d.error_code = ?")
        params.append(error_code)
    keys = [
        r[0]
        for r in st.con.execute(
            "SELECT o.doc_key FROM sage.outbox o JOIN ops.dead_letters d USING (doc_key) "
            f"WHERE {' AND '.join(where)} ORDER BY o.doc_key",
            params,
        ).fetchall()
    ]
    blocked = dict(
        st.con.execute(
            "SELECT o.doc_key, o.depends_on FROM sage.outbox o JOIN ops.dead_letters d "
            f"USING (doc_key) WHERE o.status IN ('dead', '{BLOCKED}') "
            f"AND d.error_code = '{BLOCKED}'"
        ).fetchall()
    )
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
        with st.transaction() as con:
            con.execute(
                f"DELETE FROM sage.outbox WHERE status IN ('dead', '{BLOCKED}') "
                "AND doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [keys],
            ).fetchall()
            con.execute(
                "UPDATE ops.dead_letters SET replayed = true, replayed_at = ? "
                "WHERE doc_key IN (SELECT unnest(?::VARCHAR[]))",
                [now_utc(), keys],
            ).fetchall()
    return keys
