"""``stripe-sage serve``: the whole product on one machine, under one Ctrl-C.

It starts, as child processes, in this order:
1. a Prefect server (its SQLite database under a project-local ``PREFECT_HOME``, ``.prefect``)
   with the UI, unless ``PREFECT_API_URL`` already names a running server;
2. (``--with-sandboxes``) the Stripe and Sage Pro sandboxes, for a demo on embedded defaults;
3. the deployment runner (``deployments/serve.py``): every flow with its schedule and the
   concurrency limits;
4. the real-time processor (``stripe-sage processor``): one long-lived flow run that turns
   webhook events into Sage documents in micro-batches, seconds after they arrive;
5. the webhook receiver, which stores the events in its inbox for the processor;
6. the finance console (``stripe-sage console``), which replays through that server;
and installs the alert automations (``tasks/alerts.py``). Ctrl-C (or SIGTERM) stops
them in the reverse order, each given time to finish what it is doing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Supervisor:
    """Child processes started in order and stopped in reverse."""

    log_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: list[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - the child writes to it for its lifetime
        proc = subprocess.Popen(
            args,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def check(self) -> Child | None:
        """The first child that exited on its own, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout: float = 30.0) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT)
                try:
                    child.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    child.proc.terminate()
                    try:
                        child.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        child.proc.kill()
                        child.proc.wait()
            print(f"  stopped {child.name} (exit {child.proc.returncode})", flush=True)


def wait_until(check: Callable[[], bool], timeout: float, what: str, sup: Supervisor) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if (dead := sup.check()) is not None:
            raise RuntimeError(f"{dead.name} exited ({dead.proc.returncode}); see {dead.log}")
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")


def _status(url: str) -> int | None:
    """The HTTP status a URL answers with, or None while nothing listens."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _ok(url: str) -> bool:
    return _status(url) == 200


def _answers(url: str) -> bool:
    """Any HTTP answer (a sandbox answers 401 without a key: it is up)."""
    return _status(url) is not None


def serve(
    *,
    prefect_port: int = 4200,
    webhook_port: int | None = None,
    with_sandboxes: bool = False,
    sandbox_args: list[str] | None = None,
    open_browser: bool = False,
    run_for: float | None = None,
) -> int:
    home = Path(os.environ.get("PREFECT_HOME") or ROOT / ".prefect").resolve()
    external = os.environ.get("PREFECT_API_URL")
    api = external or f"http://127.0.0.1:{prefect_port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": os.environ.get(
            "PREFECT_SERVER_ANALYTICS_ENABLED", "false"
        ),
    }
    sup = Supervisor(home / "logs", env)
    stopping = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not external:
            sup.start(
                "prefect-server",
                [
                    str(BIN / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(prefect_port),
                ],
            )
        wait_until(lambda: _ok(api + "/health"), 120, "the Prefect server", sup)
        if with_sandboxes:
            sup.start("sandboxes", [str(BIN / "stripe-sage"), "sandbox", *(sandbox_args or [])])
            from stripe_sage.settings import Settings

            s = Settings()
            wait_until(
                lambda: (
                    _answers(f"{s.sagepro_base_url}/openapi.json")
                    and _answers(f"{s.stripe_api_base}/v1/charges")
                ),
                120,
                "the sandboxes",
                sup,
            )
        _install_alerts(env)
        sup.start("deployments", [sys.executable, str(ROOT / "deployments" / "serve.py")])
        sup.start("realtime-processor", [str(BIN / "stripe-sage"), "processor"])
        receiver = [str(BIN / "stripe-sage"), "webhooks"]
        if webhook_port:
            receiver += ["--port", str(webhook_port)]
        sup.start("webhook-receiver", receiver)
        sup.start("console", [str(BIN / "stripe-sage"), "console"])
        ui = api.removesuffix("/api")
        print(
            f"stripe-sage is serving.\n"
            f"  Prefect UI        {ui}   (flows, runs, retries, artifacts, automations)\n"
            f"  Prefect API       {api}\n"
            f"  webhook receiver  http://127.0.0.1:{webhook_port or 8787}/stripe/webhook\n"
            f"  finance console   http://127.0.0.1:{_console_port()}/\n"
            f"  logs              {sup.log_dir}\n"
            f"Ctrl-C stops everything.",
            flush=True,
        )
        if open_browser:
            webbrowser.open(ui)
        started = time.monotonic()
        while not stopping["signal"]:
            if (dead := sup.check()) is not None:
                print(f"{dead.name} exited ({dead.proc.returncode}); see {dead.log}", flush=True)
                return 1
            if run_for is not None and time.monotonic() - started > run_for:
                break
            time.sleep(0.5)
        print("stopping…", flush=True)
        return 0
    finally:
        sup.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _install_alerts(env: dict[str, str]) -> None:
    """In a child process: the automations go to the server this command talks to."""
    subprocess.run(
        [str(BIN / "stripe-sage"), "alerts", "install"],
        env=env,
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _console_port() -> int:
    from stripe_sage.settings import Settings

    return Settings().console_port
