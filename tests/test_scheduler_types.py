"""The daemon's packages and the trigger math type-check under ``mypy --strict``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("engine/daemon", "engine/rules/schedule.py")


def test_daemon_and_schedule_are_mypy_strict_clean() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--ignore-missing-imports", *CHECKED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # Errors in modules these import are other packages' business: only these files count.
    ours = [line for line in done.stdout.splitlines() if line.startswith(CHECKED)]
    assert ours == [], "\n".join(ours)
    assert "error" not in done.stderr, done.stderr
