"""Process memory figures for run summaries and benchmarks (Linux /proc, else getrusage)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size of a process so far, in MiB."""
    kb = _status_kb(pid, "VmHWM")
    if kb is None and pid == "self":
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return round((kb or 0) / 1024, 1)
