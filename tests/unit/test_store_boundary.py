"""One store: outside ``stripe_sage/store/`` the shipped code reaches the staging file only
through the store's named operations (docs/architecture.md, "One store"). SQL run directly on
a DuckDB connection elsewhere, or the store's private ``_exec``, or a reach into ``Staging.con``
fails here, naming the file and line."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the wheel ships and what runs it; the devkit and the tests read tables freely.
SCANNED = ("stripe_sage", "flows", "tasks", "quality", "deployments")
STORE = Path("stripe_sage/store")
# Files that run SQL on connections that are not the staging file, each with its reason.
ALLOWED = {
    # The finance console's own users, sessions and actions (SQLite, its own store).
    Path("stripe_sage/console/store.py"): "the console's own store (SQLite)",
    # Read-only connections to the published analysts' snapshot, never the staging file:
    # the console's pages are queries over the snapshot's views.
    Path("stripe_sage/console/reads.py"): "read-only reads of the published snapshot",
}
SQL_CALLS = {"execute", "executemany", "_exec"}


def violations(source: str, name: str) -> list[str]:
    """Each ``<x>.execute(…)``, ``<x>.executemany(…)``, ``<x>._exec(…)`` call and each
    ``<x>.con`` outside ``self``'s own, as ``name:line: code``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in SQL_CALLS
        ) or (
            isinstance(node, ast.Attribute)
            and node.attr == "con"
            and not (isinstance(node.value, ast.Name) and node.value.id == "self")
            and not (isinstance(node.value, ast.Attribute) and node.value.attr == "_local")
        ):
            code = (ast.get_source_segment(source, node) or "").splitlines()[0]
            found.append(f"{name}:{node.lineno}: {code}")
    return found


def test_only_the_store_runs_sql_on_the_staging_file() -> None:
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.is_relative_to(STORE) or rel in ALLOWED:
                continue
            found += violations(path.read_text(), str(rel))
    assert not found, (
        "SQL outside the store: add a named operation to stripe_sage/store/staging.py "
        "instead:\n" + "\n".join(found)
    )


def test_the_scan_sees_each_way_around_the_store() -> None:
    code = (
        "def f(st, con):\n"
        "    con.execute('SELECT 1').fetchall()\n"
        "    st.con.execute('SELECT 1')\n"
        "    st._exec('CHECKPOINT')\n"
        "    con.executemany('INSERT INTO t VALUES (?)', [[1]])\n"
        "    self.con.close()\n"
    )
    lines = sorted({int(v.split(":")[1]) for v in violations(code, "x.py")})
    assert lines == [2, 3, 4, 5]


def test_every_allowed_file_exists_and_still_needs_its_place() -> None:
    for rel in ALLOWED:
        path = ROOT / rel
        assert path.exists(), f"{rel} is allowed to run SQL but no longer exists"
        assert violations(path.read_text(), str(rel)), f"{rel} no longer runs SQL: drop it"
