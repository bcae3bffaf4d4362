"""The terminal's view of a run (``stripe-sage sync``, ``backfill``, ``replay``): each step
while it runs (a spinner with its elapsed time, on a terminal), then one line per finished
step with its rows and rate, on stderr; the run's summary stays on stdout as before. Without
a terminal (a pipe, the console's replay subprocess) only the finished lines are printed."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console


class TerminalProgress:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stderr)
        self._status: Any = None
        self._t0 = time.perf_counter()

    def started(self, name: str) -> None:
        self._stop()
        if self.console.is_terminal:
            self._status = self.console.status(f"{name} …", spinner="dots")
            self._status.start()

    def ended(self, name: str, rows: int | None, seconds: float, failed: bool) -> None:
        self._stop()
        total = time.perf_counter() - self._t0
        if failed:
            self.console.print(f"[red]✗ {name}[/] failed after {seconds:.1f} s")
            return
        what = ""
        if rows is not None:
            rate = f", {rows / seconds:,.0f}/s" if seconds > 0.05 and rows else ""
            what = f" {rows:,} rows{rate}"
        self.console.print(
            f"[green]✓[/] {name:<11}{what} in {seconds:.1f} s  [dim](run {total:.0f} s)[/]",
            highlight=False,
        )

    def _stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
