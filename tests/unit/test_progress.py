"""The terminal's progress of a run: each step the flows run reported to the display the CLI
registers (rich, writing to a string here), with rows, rate and failures."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from flows.stages import FlowClock, observed, progress
from stripe_sage.cli.progress import TerminalProgress

pytestmark = pytest.mark.unit


def test_each_step_prints_its_rows_and_rate_and_a_failure_says_so() -> None:
    out = io.StringIO()
    display = TerminalProgress(Console(file=out, width=120, color_system=None))
    counts: dict = {}
    with observed(display):
        with FlowClock(counts).stage("extract") as row:
            time.sleep(0.06)  # a rate is shown for steps longer than a blink
            row["rows"] = 12_345
        with progress("plan"):
            pass
        with pytest.raises(RuntimeError), progress("load"):
            raise RuntimeError("Sage down")
    with progress("after"):  # no observer any more: nothing printed
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("✓ extract") and "12,345 rows" in lines[0] and "/s" in lines[0]
    assert lines[1].startswith("✓ plan") and "rows" not in lines[1]
    assert lines[2].startswith("✗ load failed")
    assert "extract" in counts["timings"]  # the run's own timings are kept as before


def test_a_steps_time_leaves_out_the_events_the_run_served_during_it() -> None:
    """A sync serving webhook events (``SyncEventPump``) inside its load: the load's own
    time excludes the batches' time, which the timings show apart."""
    served = [0.0]
    counts: dict = {}
    clock = FlowClock(counts, served=lambda: served[0])
    with clock.stage("load"):
        t = time.perf_counter()
        time.sleep(0.3)  # a batch served inside the load ...
        served[0] += time.perf_counter() - t
        time.sleep(0.05)  # ... and the load's own work
    with clock.stage("write_back"):
        time.sleep(0.02)
    assert 0.04 <= counts["timings"]["load"] < 0.2, counts
    assert 0.3 <= counts["timings"]["served_events"] < 0.35, counts
    assert set(counts["timings"]) == {"load", "write_back", "served_events"}
