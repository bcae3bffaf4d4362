"""The real-time processor's pacing: backoff after failed batches, the refresh at most once
a period, and when a batch runs."""

from __future__ import annotations

from stripe_sage.realtime import Backoff, Refresh, batch_should_run


def test_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    b = Backoff(initial=0.5, cap=4.0)
    assert b.ready(0.0) and b.delay() == 0.0
    waits = [b.failed(100.0) for _ in range(6)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert not b.ready(103.9) and b.ready(104.0)
    b.succeeded()
    assert b.ready(0.0) and b.failed(10.0) == 0.5


def test_refresh_runs_only_after_a_change_and_at_most_once_a_period() -> None:
    r = Refresh(every=60.0, last=0.0)
    assert not r.due(1000.0)  # nothing changed: nothing to refresh
    r.touched()
    assert r.due(1000.0)
    r.ran(1000.0)
    r.touched()
    assert not r.due(1059.0) and r.due(1060.0)
    assert r.done == 1


def test_a_batch_runs_for_waiting_events_or_documents_once_the_backoff_passed() -> None:
    b = Backoff(initial=1.0)
    assert not batch_should_run(0, False, b, 0.0)
    assert batch_should_run(3, False, b, 0.0)
    assert batch_should_run(0, True, b, 0.0)
    b.failed(10.0)
    assert not batch_should_run(3, True, b, 10.5)
    assert batch_should_run(3, False, b, 11.0)
