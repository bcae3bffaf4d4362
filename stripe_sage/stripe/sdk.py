"""The only module that touches stripe-python's private internals.

The reader (``client.py``) uses the SDK as its transport but skips two of its costs: the
``StripeObject`` trees (successful bodies are parsed with orjson) and the debug line the SDK
formats for every response. Both need names the SDK does not publish — its requestor's
``request_raw`` and ``_interpret_response``, ``_request_options.extract_options_from_dict``,
``_util.get_api_mode``, ``_api_requestor.log_debug`` and ``_util._console_log_level``. They
live here alone, and ``tests/unit/test_stripe_sdk.py`` checks every one of them against the
installed SDK, so an upgrade that moves one fails that test by name instead of the extract.
"""

from __future__ import annotations

import logging
from typing import Any

import stripe
import stripe._api_requestor
import stripe._util
from stripe._request_options import extract_options_from_dict
from stripe._util import get_api_mode

# (module, attribute) pairs this adapter reads or replaces; the test imports each one.
PRIVATE_NAMES = (
    ("stripe._api_requestor", "log_debug"),
    ("stripe._api_requestor", "_APIRequestor"),
    ("stripe._util", "_console_log_level"),
    ("stripe._util", "logger"),
    ("stripe._util", "get_api_mode"),
    ("stripe._request_options", "extract_options_from_dict"),
)
# Methods of the requestor (``StripeClient._requestor``) and the arguments passed to them.
REQUESTOR_METHODS = {
    "request_raw": ("method", "url", "params", "options", "base_address", "api_mode", "usage"),
    "_interpret_response": ("rbody", "rcode", "rheaders", "api_mode"),
}


def raw_request(
    client: stripe.StripeClient, method: str, path: str, params: dict[str, Any]
) -> tuple[object, int, Any, Any]:
    """``StripeClient.raw_request`` without building a response object: the body as sent,
    the status, the headers, and the API mode (for ``raise_for_response``)."""
    options, params = extract_options_from_dict(dict(params))
    api_mode = get_api_mode(path)
    body, code, headers = client._requestor.request_raw(
        method,
        path,
        params=params,
        options=options,
        base_address="api",
        api_mode=api_mode,
        usage=["raw_request"],
    )
    return body, code, headers, api_mode


def raise_for_response(
    client: stripe.StripeClient, body: Any, code: int, headers: Any, api_mode: Any
) -> None:
    """The SDK's own reading of a response: raises its ``StripeError`` for a 4xx/5xx or a body
    it cannot parse; returns for anything else."""
    client._requestor._interpret_response(body, code, headers, api_mode)


def debug_log_only_when_logged() -> None:
    """stripe-python builds its debug line for every response (``log_debug("API response
    body", body=...)``: the whole body decoded, searched for whitespace and ``repr``-ed) before
    anything decides whether it is logged. For a 100-charge page that is ~2 ms of CPU, 40 % of
    the request (measured against the sandbox), under the GIL the extract threads share.
    The requestor's ``log_debug`` is wrapped to format only when the line will be emitted
    (``STRIPE_LOG=debug`` or the ``stripe`` logger enabled for DEBUG): the same output then,
    no work otherwise. Idempotent."""
    original = stripe._api_requestor.log_debug
    if getattr(original, "_only_when_logged", False):
        return

    def log_debug(message: str, **params: Any) -> None:
        if stripe._util._console_log_level() == "debug" or stripe._util.logger.isEnabledFor(
            logging.DEBUG
        ):
            original(message, **params)

    log_debug._only_when_logged = True  # type: ignore[attr-defined]
    stripe._api_requestor.log_debug = log_debug
