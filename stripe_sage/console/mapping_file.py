"""The mapping file the console edits: read it, write a saved version of it (atomically, the
exact text that was validated), and, where the product runs on the built-in default, create a
project-local copy on the first save and point the settings (``.env``'s ``MAPPING_FILE``) at
it. The file stays the source of truth: engineers review it in git like any other."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stripe_sage.console.store import ConsoleStore
from stripe_sage.mapping import default_mapping_text

CHART_SECONDS = 300  # Sage's chart changes rarely; a page should not wait on Sage each time


class MappingFile:
    def __init__(
        self,
        path: Path | None,
        target: Path,
        env_file: Path | None,
        run_env: dict[str, str],
        chart: Callable[[], list[dict[str, Any]]] | None,
    ) -> None:
        self.path = path
        self.target = target
        self.env_file = env_file
        # The environment replays run with: it follows the file once the first save made it.
        self.run_env = run_env
        self._chart = chart
        self._chart_cache: tuple[float, list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self.path) if self.path else f"{self.target} (not created yet: the default)"

    def read(self) -> str:
        return self.path.read_text() if self.path else default_mapping_text()

    def save(self, store: ConsoleStore, user: str, text: str, note: str) -> int:
        """Write ``text`` byte for byte and record it as a version; returns its id."""
        with self._lock:
            if self.path is None:
                self._create_from_default(store)
            assert self.path is not None
            name = str(self.path)
            if not store.mapping_versions(name):
                # The file as found: what the first roll-back goes back to.
                store.add_mapping_version(
                    "(file)",
                    name,
                    self.path.read_text(),
                    "the file before the console's first save",
                )
            tmp = self.path.with_name(f".{self.path.name}.console-tmp")
            tmp.write_bytes(text.encode())
            os.replace(tmp, self.path)
            return store.add_mapping_version(user, name, text, note)

    def _create_from_default(self, store: ConsoleStore) -> None:
        path = self.target.resolve()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(default_mapping_text())
        self.path = path
        self.run_env["MAPPING_FILE"] = str(path)
        if self.env_file is not None:
            lines = self.env_file.read_text().splitlines() if self.env_file.exists() else []
            kept = [ln for ln in lines if not ln.strip().startswith("MAPPING_FILE=")]
            kept.append(f"MAPPING_FILE={path}")
            self.env_file.write_text("\n".join(kept) + "\n")

    def chart(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """Sage's GL accounts (cached a few minutes), or None and why not."""
        if self._chart is None:
            return None, "no Sage connection configured"
        now = time.monotonic()
        if self._chart_cache and now - self._chart_cache[0] < CHART_SECONDS:
            return self._chart_cache[1], None
        try:
            accounts = self._chart()
        except Exception as exc:  # shown on the page: the accounts are typed instead
            return None, f"Sage's chart of accounts could not be read ({type(exc).__name__})"
        self._chart_cache = (now, accounts)
        return accounts, None
