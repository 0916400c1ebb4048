"""``validate FILE...`` (what a pre-commit hook passes), ``--strict``, and the hooks themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from engine.cli.main import main
from tests.helpers import REPO, make_project, write_rule

BAD = """\
trigger: {event: demo}
apps: {flights-ios: {parentMessageId: "1"}}
message: {text: Hi, sound: loud}
targets: [{memberId: "1"}]
"""
WARNED = BAD.replace("loud", "custom")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path / "repo" / "notifications")
    write_rule(root, "bad", BAD)
    write_rule(root, "warned", WARNED)
    monkeypatch.chdir(tmp_path / "repo")
    return root


def test_files_are_checked_in_their_project_and_alone(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "notifications/rules/warned.yaml"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("notifications/rules/warned.yaml:3:")  # named from here
    assert "bad.yaml" not in out
    assert "1 file checked: 0 errors, 1 warning" in err
    assert (
        main(["validate", "notifications/rules/bad.yaml", "notifications/rules/warned.yaml"]) == 1
    )


def test_one_file_is_the_only_rule_or_test_file_read(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-commit hook validating the file a commit touched reads no other rule or test
    file of the project (a large project would make every commit wait for all of them)."""
    from engine.rules import cases, loader, yaml_source

    tests = project / "rule-tests"
    tests.mkdir()
    for name in ("bad", "warned"):
        (tests / f"{name}.yaml").write_text(
            f"rule: {name}\ncases:\n  - name: one\n    event: {{}}\n    expect: {{requests: 1}}\n"
        )
    read: list[str] = []
    real = yaml_source.read_source

    def counting(path: Path, root: Path, top: Path) -> str:
        read.append(path.relative_to(root).as_posix())
        return real(path, root, top)

    for module in (loader, cases):
        monkeypatch.setattr(module, "read_source", counting)
    assert main(["validate", "notifications/rules/warned.yaml"]) == 0
    assert read == ["rules/warned.yaml"]
    read.clear()
    assert main(["validate", "notifications/rule-tests/warned.yaml"]) == 0
    assert read == ["rule-tests/warned.yaml"]
    capsys.readouterr()


def test_strict_makes_warnings_fail(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "notifications/rules/warned.yaml", "--strict"]) == 1
    assert "warned.yaml:3:21: error [5]" in capsys.readouterr().out
    assert main(["validate", "--project", str(REPO), "--strict"]) == 0


def test_errors_of_pushrules_yaml_come_with_any_file(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = project / "pushrules.yaml"
    config.write_text(config.read_text().replace("platform: ios", "platform: iOS", 1))
    assert main(["validate", "notifications/rules/warned.yaml"]) == 1
    assert re.search(r"^notifications/pushrules.yaml:\d+:\d+: error", capsys.readouterr().out, re.M)


def test_a_template_file_reports_its_own_problems(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    template = project / "templates/buttons/yes-no.yaml"
    template.write_text(template.read_text().replace("action: close", "acton: close"))
    assert main(["validate", str(template)]) == 1
    assert "yes-no.yaml:" in capsys.readouterr().out


def test_usage_mistakes_exit_2(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lonely.yaml").write_text("a: 1\n")
    assert main(["validate", str(tmp_path / "lonely.yaml")]) == 2
    assert "no pushrules.yaml" in capsys.readouterr().err
    assert main(["validate", "notifications/rules/gone.yaml"]) == 2
    assert main(["validate", "notifications", "notifications/rules/bad.yaml"]) == 2


def test_project_names_the_project_of_the_files(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "--project", "notifications", "notifications/rules/bad.yaml"]) == 1
    assert "bad.yaml:3:28: error [5]" in capsys.readouterr().out


def test_the_published_hooks_run_these_commands() -> None:
    hooks = {h["id"]: h for h in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}
    assert hooks["pushrules-validate"]["entry"] == "pushrules validate"
    assert hooks["pushrules-fmt"]["entry"] == "pushrules fmt"
    validate_files = re.compile(hooks["pushrules-validate"]["files"])
    fmt_files = re.compile(hooks["pushrules-fmt"]["files"])
    for path in (
        "pushrules.yaml",
        "rules/a.yaml",
        "notifications/rules/x/b.yml",
        "rule-tests/a.yaml",
        "templates/messages/m.yaml",
    ):
        assert validate_files.search(path) and fmt_files.search(path), path
    for path in (".pre-commit-config.yaml", "docs/rules.yaml", "myrules/a.yaml"):
        assert not validate_files.search(path) and not fmt_files.search(path), path


def test_a_named_rule_test_file_is_checked_against_the_project_s_rules(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tests = project / "rule-tests"
    tests.mkdir()
    (tests / "warned.yaml").write_text(
        "cases:\n  - name: ok\n    event: {}\n    expect: {requests: 1}\n"
    )
    (tests / "gone.yaml").write_text(
        "rule: wraned\ncases:\n  - name: n\n    expect: {sent: false}\n"
    )
    assert main(["validate", "notifications/rule-tests/warned.yaml"]) == 0
    assert main(["validate", "notifications/rule-tests/gone.yaml"]) == 1
    out = capsys.readouterr().out
    assert "notifications/rule-tests/gone.yaml:1:1: error" in out, out
    assert "no rule 'wraned'" in out and "warned" in out
