"""Replays started from the console: the ``replay-dead-letters`` deployment when a Prefect
server runs it, else the same work as ``stripe-sage replay`` in a subprocess. Either way the
console only asks; the flow run takes the DuckDB writer, plans and posts, and publishes the
snapshot the console then reads. Each replay is an action in the console store with its
outcome."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import Any

from stripe_sage.console.store import ConsoleStore

DEPLOYMENT = "replay_dead_letters/replay-dead-letters"


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "**********")
    return text


class Replayer:
    def __init__(
        self,
        store: ConsoleStore,
        *,
        env: Mapping[str, str],
        prefect_api_url: str | None,
        secrets: list[str],
        timeout: float = 1800,
    ) -> None:
        self.store = store
        self.env = dict(env)
        self.prefect_api_url = prefect_api_url
        self.secrets = secrets
        self.timeout = timeout
        self.threads: list[threading.Thread] = []

    def start(self, action_id: int, doc_keys: list[str]) -> None:
        thread = threading.Thread(
            target=self._run, args=(action_id, doc_keys), name=f"replay-{action_id}", daemon=True
        )
        self.threads.append(thread)
        thread.start()

    def _run(self, action_id: int, doc_keys: list[str]) -> None:
        try:
            if self.prefect_api_url and self._via_deployment(action_id, doc_keys):
                return
            self._via_subprocess(action_id, doc_keys)
        except Exception as exc:  # recorded for the person who asked; never silent
            self.store.finish(
                action_id, "failed", _scrub(f"{type(exc).__name__}: {exc}", self.secrets)
            )

    def _via_deployment(self, action_id: int, doc_keys: list[str]) -> bool:
        """Start the deployment's run (False when the server has no such deployment)."""
        from prefect.deployments import run_deployment
        from prefect.exceptions import ObjectNotFound

        try:
            run: Any = run_deployment(
                DEPLOYMENT,
                parameters={"doc_keys": doc_keys, "trigger": "console"},
                timeout=0,  # the run goes on on the server; its outcome is in the Prefect UI
            )
        except ObjectNotFound:
            return False
        self.store.finish(
            action_id, "submitted", f"flow run {run.name} ({run.id}) started on the Prefect server"
        )
        return True

    def _via_subprocess(self, action_id: int, doc_keys: list[str]) -> None:
        args = [sys.executable, "-m", "stripe_sage.cli.main", "replay"]
        for key in doc_keys:
            args += ["--doc-key", key]
        proc = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=self.timeout
        )
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        summary = next((ln for ln in reversed(lines) if ln.startswith("released ")), None)
        if proc.returncode == 0 and summary:
            self.store.finish(action_id, "done", summary)
        elif summary:  # ran, and Sage rejected some again (exit 1): the summary says which
            self.store.finish(action_id, "dead again", _scrub(summary, self.secrets))
        else:
            tail = "\n".join(lines[-15:])
            self.store.finish(
                action_id, "failed", _scrub(f"exit {proc.returncode}\n{tail}", self.secrets)
            )
