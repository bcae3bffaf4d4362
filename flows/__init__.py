"""Prefect flows: orchestration only. One module per flow."""
