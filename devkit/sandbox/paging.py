"""Reading a whole list back from either sandbox (benchmarks and tests count what each side
holds): every page of a Stripe list (``has_more``/``starting_after``) or of a Sage collection
(``next_cursor``)."""

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


def stripe_all(http: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    query: dict[str, Any] = {"limit": 100, **params}
    while True:
        response = http.get(path, params=query)
        response.raise_for_status()
        page = response.json()
        out += page["data"]
        if not page["has_more"]:
            return out
        query["starting_after"] = page["data"][-1]["id"]
