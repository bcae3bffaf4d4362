"""The finance console (``stripe-sage console``): a web page where finance sees what the sync
did, what needs a person and why, and replays or resolves it — without SQL or a terminal.

It reads the analysts' published snapshot (never the DuckDB writer) and keeps its own records
(users, sessions, actions, notes) in a small SQLite store of its own (``CONSOLE_STORE``).
"""
