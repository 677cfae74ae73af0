"""The code stays formatted by the one formatter configured in pyproject.toml (`make format`)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_code_is_formatted_with_ruff():
    ruff = Path(sys.executable).with_name("ruff")
    outcome = subprocess.run(
        [str(ruff), "format", "--check", "mkd_tf", "cli", "tests", "benchmarks", "conftest.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert outcome.returncode == 0, f"run `make format`:\n{outcome.stdout}{outcome.stderr}"
