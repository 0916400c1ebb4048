"""Issue 9: the rule model is plain dataclasses, apart from the checks that build it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def modules_loaded_by(statement: str) -> set[str]:
    """Top-level packages a fresh interpreter has loaded after ``statement``."""
    script = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in json.loads(done.stdout)}


def test_importing_the_rule_model_loads_neither_cerberus_nor_jinja() -> None:
    loaded = modules_loaded_by("from engine.rules.rule import AppPlan, Limit, QuietHours, Rule")
    assert "cerberus" not in loaded
    assert "jinja2" not in loaded


def test_the_checks_load_both() -> None:
    """The other side of the split, so the test above cannot pass by loading nothing: the
    checks load Jinja, and Cerberus once a document needs its words (a valid one does not:
    tests/test_fast_schema.py)."""
    loaded = modules_loaded_by("import engine.rules.checks")
    assert "jinja2" in loaded
    refused = modules_loaded_by(
        "from engine.rules.schemas import RULE_CHECKER; RULE_CHECKER.check({'oops': 1})"
    )
    assert "cerberus" in refused
