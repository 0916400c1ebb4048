"""Building small projects on disk for tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from engine.outbox.store import AttemptResult
from engine.rules.loader import Loader, RuleSet
from engine.rules.problems import Problem

REPO = Path(__file__).resolve().parent.parent

#: Property tests try the number of examples they name times this: 1 in the suite and in CI
#: (the counts are chosen to keep the suite quick), more for a deeper search, e.g.
#: ``PUSHRULES_EXAMPLES=10 python -m pytest -m "not e2e"``.
EXAMPLES_SCALE = float(os.environ.get("PUSHRULES_EXAMPLES", "1"))


def examples(count: int) -> int:
    """``max_examples`` for a property test that names ``count``: scaled by EXAMPLES_SCALE."""
    return max(1, round(count * EXAMPLES_SCALE))


def make_project(root: Path, config: str | None = None) -> Path:
    """A copy of the repository's example project (config and templates, no rules)."""
    root.mkdir(parents=True, exist_ok=True)
    if config is None:
        shutil.copy(REPO / "pushrules.yaml", root / "pushrules.yaml")
    else:
        (root / "pushrules.yaml").write_text(textwrap.dedent(config))
    shutil.copytree(REPO / "templates", root / "templates", dirs_exist_ok=True)
    (root / "rules").mkdir(exist_ok=True)
    return root


def write_rule(root: Path, name: str, text: str) -> Path:
    path = root / "rules" / f"{name}.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(root: Path) -> RuleSet:
    return Loader(root, workers=1).load()


def problems(root: Path, *, severity: str | None = None) -> list[Problem]:
    found = list(load(root).problems)
    return [p for p in found if severity is None or p.severity == severity]


# --- outbox rows --------------------------------------------------------------------------------

#: Where the rows of store tests would go: they are never sent.
URL = "https://api.example.invalid/sendInstantMessage.php"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=5)


def body(marker: object = "m") -> dict[str, Any]:
    """A request the sandbox accepts; ``marker`` tells its copies apart on the wire."""
    return {
        "sendInstantMessage": {
            "partner": {"id": "p"},
            "parentMessageId": "1",
            "message": {"text": str(marker)},
            "targets": [{"memberId": "765c8"}],
        }
    }


def ok(at: datetime = T0, **fields: Any) -> AttemptResult:
    """An attempt Accengage accepted at ``at``; ``fields`` override its answer."""
    values: dict[str, Any] = {"http_status": 200, "return_code": 0, "return_label": "sent"}
    values.update(fields)
    return AttemptResult(at, 0.05, **values)


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo``; its output. Fails the test when git fails."""
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def git_repo(path: Path, branch: str = "main") -> Path:
    """A new git repository with its own author, so commits never depend on the machine's
    configuration."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", branch)
    git(path, "config", "user.name", "Rule Author")
    git(path, "config", "user.email", "author@example.com")
    git(path, "config", "commit.gpgsign", "false")
    return path


def commit_all(repo: Path, message: str) -> str:
    """Commit everything in ``repo``; the new commit's id."""
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()
