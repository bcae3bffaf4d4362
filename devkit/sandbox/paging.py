"""Reading a whole collection back from the Sage sandbox (benchmarks and tests count what
Sage holds): every page of ``GET /api/v1/{collection}``, following ``next_cursor``."""

from __future__ import annotations

from typing import Any

import httpx


def sage_all(http: httpx.Client, collection: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        response = http.get(f"/api/v1/{collection}", params=params)
        response.raise_for_status()
        page = response.json()
        out += page["data"]
        cursor = page.get("next_cursor")
        if not cursor:
            return out
