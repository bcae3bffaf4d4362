"""The private stripe-python names the reader depends on (``stripe_sage/stripe/sdk.py``) are
still where it expects them, with the arguments it passes; and Stripe's answers map through
the one status table. An SDK upgrade that moves any of them fails here, by name."""

from __future__ import annotations

import importlib
import inspect

import pytest
import stripe

from stripe_sage.errors import (
    STATUS_ERRORS,
    AuthenticationError,
    FatalError,
    NotFoundError,
    RetryableError,
    ValidationError,
    error_for_status,
)
from stripe_sage.stripe import sdk
from stripe_sage.stripe.client import StripeReader, _map_error

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("module", "name"), sdk.PRIVATE_NAMES)
def test_every_private_name_the_adapter_uses_exists(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name), (
        f"stripe {stripe.VERSION} has no {module}.{name}: update stripe_sage/stripe/sdk.py"
    )


@pytest.mark.parametrize(("method", "arguments"), sorted(sdk.REQUESTOR_METHODS.items()))
def test_the_requestor_methods_take_the_arguments_the_adapter_passes(
    method: str, arguments: tuple[str, ...]
) -> None:
    client = stripe.StripeClient("sk_test_adapter", max_network_retries=0)
    requestor = getattr(client, "_requestor", None)
    assert requestor is not None, f"stripe {stripe.VERSION}: StripeClient._requestor is gone"
    fn = getattr(requestor, method, None)
    assert callable(fn), f"stripe {stripe.VERSION}: the requestor has no {method}"
    params = inspect.signature(fn).parameters
    missing = [a for a in arguments if a not in params]
    assert not missing, f"stripe {stripe.VERSION}: {method} no longer takes {missing}"


def test_the_debug_line_hook_is_installed_once() -> None:
    StripeReader("sk_test_adapter")  # importing the client installs it
    hooked = stripe._api_requestor.log_debug
    assert getattr(hooked, "_only_when_logged", False)
    sdk.debug_log_only_when_logged()
    assert stripe._api_requestor.log_debug is hooked


def _sdk_error(status: int, body: str, headers: dict[str, str] | None = None) -> stripe.StripeError:
    """What the SDK itself raises for this answer (its own response reading, no network)."""
    client = stripe.StripeClient("sk_test_adapter", max_network_retries=0)
    with pytest.raises(stripe.StripeError) as caught:
        sdk.raise_for_response(client, body, status, headers or {}, "V1")
    return caught.value


def test_stripe_answers_map_through_the_one_status_table() -> None:
    body = (
        '{"error": {"type": "invalid_request_error", "code": "%s", "param": "%s", "message": "m"}}'
    )
    not_found = _map_error(_sdk_error(404, body % ("resource_missing", "id")), "get", "/v1/x")
    assert isinstance(not_found, NotFoundError) and not_found.field == "id"
    assert not_found.code == "resource_missing" and not_found.system == "stripe"
    refused = _map_error(_sdk_error(402, body % ("card_declined", "card")), "post", "/v1/x")
    assert isinstance(refused, ValidationError)
    auth = _map_error(_sdk_error(401, body % ("", "")), "get", "/v1/x")
    assert isinstance(auth, AuthenticationError)
    limited = _map_error(
        _sdk_error(429, body % ("rate_limit", ""), {"Retry-After": "3"}),
        "get",
        "/v1/x",
    )
    assert isinstance(limited, RetryableError) and limited.retry_after == 3.0
    down = _map_error(_sdk_error(503, body % ("", "")), "get", "/v1/x")
    assert isinstance(down, RetryableError)
    gone = _map_error(stripe.APIConnectionError("reset"), "get", "/v1/x")
    assert isinstance(gone, RetryableError) and gone.http_status is None


def test_the_status_table_decides_retry_or_fatal_for_both_clients() -> None:
    for status in (429, 500, 502, 503):
        assert isinstance(error_for_status(status, "m"), RetryableError)
    for status, cls in STATUS_ERRORS.items():
        assert type(error_for_status(status, "m")) is cls
    assert type(error_for_status(418, "m")) is FatalError
