"""Prefect tasks: thin wrappers that add logging, artifacts and concurrency around the plain
logic in ``stripe_sage``. Retries live in the clients (one level per kind of failure), so the
tasks themselves do not retry; none caches (inputs are live connections)."""
