"""HTTP from the tests to loopback servers, without a new TLS setup per request.

httpx builds an SSL context for every client it makes (loading certifi's CA bundle: ~20 ms of
CPU each), and ``httpx.get``/``httpx.post`` make a client per call. The tests poll servers in
loops and open clients per helper call, so that was over a thousand CA-bundle loads per
``make test`` for nothing: every server here is plain HTTP on 127.0.0.1. These helpers give
each client one shared, default (verifying) context instead; each call still opens its own
connection, as ``httpx.get`` does."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

# A default context, certificates verified: never used on http://, built once per process.
TLS = ssl.create_default_context()


def client(**kw: Any) -> httpx.Client:
    """``httpx.Client(**kw)`` on the shared context."""
    return httpx.Client(verify=TLS, **kw)


def request(method: str, url: str, **kw: Any) -> httpx.Response:
    """``httpx.request``: one request on a client of its own."""
    with client() as http:
        return http.request(method, url, **kw)


def get(url: str, **kw: Any) -> httpx.Response:
    return request("GET", url, **kw)


def post(url: str, **kw: Any) -> httpx.Response:
    return request("POST", url, **kw)


def delete(url: str, **kw: Any) -> httpx.Response:
    return request("DELETE", url, **kw)
