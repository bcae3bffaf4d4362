"""The real-time processor's pacing, as plain logic (the loop itself is
``flows/realtime_processor.py``): when the next micro-batch may run, and when the
reconciliation report and the analysts' snapshot are due again."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Exponential backoff between failed attempts: ``initial`` seconds, doubling up to
    ``cap``; a success resets it. ``ready(now)`` says whether an attempt may run now."""

    initial: float = 0.5
    cap: float = 30.0
    failures: int = 0
    not_before: float = 0.0

    def delay(self) -> float:
        return 0.0 if self.failures == 0 else min(self.cap, self.initial * 2 ** (self.failures - 1))

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; returns the seconds until the next attempt."""
        self.failures += 1
        wait = self.delay()
        self.not_before = now + wait
        return wait

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before


@dataclass
class Refresh:
    """The whole-run epilogue (reconciliation report, analysts' snapshot) at most once every
    ``every`` seconds, and only when a batch changed something since the last one."""

    every: float
    last: float = 0.0
    changed: bool = False
    done: int = field(default=0)

    def touched(self) -> None:
        self.changed = True

    def due(self, now: float) -> bool:
        return self.changed and now - self.last >= self.every

    def ran(self, now: float) -> None:
        self.last, self.changed, self.done = now, False, self.done + 1


def batch_should_run(
    waiting_events: int, retry_documents: bool, backoff: Backoff, now: float
) -> bool:
    """A batch runs when events wait in the inbox, or documents wait for another attempt
    (Sage did not take them), and the backoff after a failed batch has passed."""
    return (waiting_events > 0 or retry_documents) and backoff.ready(now)
