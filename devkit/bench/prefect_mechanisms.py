"""What each Prefect mechanism costs per micro-batch, against a real Prefect server (the
numbers behind the real-time processor's choice; ``stripe-sage bench realtime`` prints them).

- ``flow_run_s``: a new flow run in an already warm process (what an event-triggered run
  pays at least once the runner started it; the runner's poll and the process spawn come on
  top of it);
- ``task_run_s``: a task run inside a long-lived flow run (the processor's batch);
- ``background_task_s``: ``task.delay()`` until a background task worker (``prefect.task_worker
  .serve``, its own process, warm) starts the body.

Each is the median of ``n`` runs of a task or flow that does nothing, so it is the
mechanism's own overhead.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, task

MARKS = Path(os.environ.get("STRIPE_SAGE_MECHANISM_MARKS", tempfile.gettempdir())) / "marks.txt"


@task(name="mechanism-probe")
def probe(sent: float) -> float:
    started = time.time()
    with open(MARKS, "a") as f:
        f.write(f"{started - sent}\n")
    return started


@task(name="mechanism-noop")
def noop() -> None:
    return None


@flow(name="mechanism-flow-probe")
def flow_probe() -> None:
    return None


@flow(name="mechanism-task-host")
def task_host(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        noop()
        out.append(time.perf_counter() - t)
    return out


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def measure(env: dict[str, str], n: int = 10) -> dict[str, Any]:
    """Run in a child process with ``env`` (PREFECT_API_URL set); returns the medians."""
    work = Path(tempfile.mkdtemp(prefix="stripe-sage-mechanisms-"))
    child_env = {**env, "STRIPE_SAGE_MECHANISM_MARKS": str(work)}
    out = subprocess.run(
        [sys.executable, "-m", "devkit.bench.prefect_mechanisms", str(n)],
        env=child_env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    import json

    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _main(n: int) -> dict[str, Any]:
    flow_probe()  # warm: the first run pays for imports and the client
    flows = []
    for _ in range(n):
        t = time.perf_counter()
        flow_probe()
        flows.append(time.perf_counter() - t)
    tasks = task_host(n * 5)[1:]
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from prefect.task_worker import serve; "
            "from devkit.bench.prefect_mechanisms import probe; serve(probe)",
        ],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        MARKS.unlink(missing_ok=True)
        probe.delay(time.time())  # warm the worker's subscription
        deadline = time.monotonic() + 120
        while not MARKS.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        MARKS.unlink(missing_ok=True)
        for i in range(n):
            probe.delay(time.time())
            while (
                len(MARKS.read_text().splitlines()) if MARKS.exists() else 0
            ) < i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        delays = [float(x) for x in MARKS.read_text().split()] if MARKS.exists() else []
    finally:
        worker.terminate()
        worker.wait(30)
    return {
        "flow_run_s": _median(flows),
        "task_run_s": _median(tasks),
        "background_task_s": _median(delays) if delays else None,
        "n": n,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(_main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)))
