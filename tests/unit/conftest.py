"""The unit tier: pure functions and in-process objects, no servers and no network. A unit test
that opens a network connection belongs in the integration tier; this makes that a failure."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"a unit test opened a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
