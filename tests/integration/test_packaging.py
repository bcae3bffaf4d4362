"""What the wheel ships and what the console script costs to start (issue 15's contracts)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "bin" / "uv"
HEAVY = ("numpy", "polars", "pandas", "duckdb", "prefect", "great_expectations")


def test_the_wheel_holds_no_devkit_sandbox_benchmark_or_fixture(tmp_path: Path) -> None:
    if not UV.exists():
        pytest.fail(f"{UV} missing: run make install")
    subprocess.run(
        [str(UV), "build", "--wheel", "--out-dir", str(tmp_path), "--quiet", str(ROOT)],
        check=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("stripe_sage-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("stripe_sage/plan/") for n in names)
    assert any(n.startswith("flows/") for n in names)
    shipped_devkit = [
        n
        for n in names
        if n.startswith("devkit/")
        or "sandbox" in n
        or "bench" in n
        or "fixtures" in n
        or n.startswith("tests/")
    ]
    assert shipped_devkit == []
    # The devkit's commands come from its own distribution's entry point, not the wheel's.
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "devkit" not in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from stripe_sage.cli.main import build_parser\n"
        "try:\n    build_parser().parse_args(['--help'])\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="
    # The devkit's commands are there through the entry point.
    assert "demo" in out.stdout and "bench" in out.stdout and "sandbox" in out.stdout
