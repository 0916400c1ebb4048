"""The commands that only read rules never load APScheduler (only the daemon runs jobs), and
``validate`` and ``test`` (what a pre-commit hook runs) load neither the store, the HTTP client
nor the server: each group of commands registers its parsers without importing what its
commands use. ``validate`` of a valid project loads only its own group of commands, and
neither Cerberus (run only on a document the fast schema pass refuses) nor asyncio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from engine.cli.main import main
def _run(argv):
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code
code = main(sys.argv[1:])
heavy = ("apscheduler", "sqlalchemy", "httpx", "uvicorn", "starlette", "cerberus", "asyncio")
loaded = {h: sorted(m for m in sys.modules if m.split(".")[0] == h) for h in heavy}
groups = sorted(m for m in sys.modules if m.startswith("engine.cli."))
print(json.dumps({"code": code, **loaded, "engine.cli": groups}))
"""


def probe(
    argv: list[str], code: str = PROBE
) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """What ``pushrules argv`` loaded, run by ``code`` in a new interpreter; and the run."""
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else {}), done


@pytest.mark.parametrize(
    "argv",
    [["validate"], ["next"], ["next", "monday-digest", "--count", "3"]],
    ids=["validate", "next", "next-rule"],
)
def test_read_only_commands_do_not_import_apscheduler(argv: list[str]) -> None:
    result, done = probe(argv)
    assert done.returncode == 0, done.stderr
    assert result["code"] == 0, done.stdout
    assert result["apscheduler"] == [], f"pushrules {' '.join(argv)} loaded {result['apscheduler']}"


def test_the_probe_sees_apscheduler_when_the_scheduler_is_imported() -> None:
    """The probe itself can fail: importing the daemon's scheduler does load APScheduler."""
    result, done = probe(["next"], "import engine.daemon.scheduler\n" + PROBE)
    assert result["apscheduler"], done.stderr


@pytest.mark.parametrize(
    "argv",
    [["validate"], ["--help"], ["test"], ["explain", "--help"], ["plan", "--base", "HEAD"]],
    ids=["validate", "help", "test", "explain-help", "plan"],
)
def test_validate_and_help_load_no_store_client_or_server(argv: list[str]) -> None:
    """``test`` too: rule tests need no store (a pre-commit hook may run them)."""
    result, done = probe(argv, PROBE.replace("main(sys.argv[1:])", "_run(sys.argv[1:])"))
    # --help exits 0 through SystemExit; plan 2 where the checkout is not a git repository.
    assert result["code"] in (0, 2), done.stderr
    for package in ("sqlalchemy", "httpx", "uvicorn", "starlette", "apscheduler"):
        assert result[package] == [], f"pushrules {' '.join(argv)} loaded {result[package]}"


@pytest.mark.parametrize(
    "argv",
    [["validate"], ["validate", "rules/flight-canceled.yaml"]],
    ids=["project", "one-file"],
)
def test_validate_of_a_valid_project_loads_its_group_alone(argv: list[str]) -> None:
    """What a pre-commit hook runs on every commit: no other command group's module (their
    imports cost as much as the checks), no Cerberus, no asyncio."""
    result, done = probe(argv)
    assert done.returncode == 0, done.stderr
    assert result["code"] == 0, done.stdout  # the repository's project is valid
    assert result["cerberus"] == [], f"pushrules {' '.join(argv)} loaded Cerberus"
    assert result["asyncio"] == [], f"pushrules {' '.join(argv)} loaded asyncio"
    assert result["engine.cli"] == ["engine.cli.check", "engine.cli.common", "engine.cli.main"]
