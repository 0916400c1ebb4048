"""`pushrules validate` and `pushrules compile` as CI and authors use them."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli.main import COMMAND_GROUPS, build_parser, main
from tests.helpers import REPO, make_project, write_rule

BROKEN = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  sound: loud
targets:
  - memberId: "1"
"""


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "p")
    write_rule(root, "x", BROKEN)
    return root


def test_validate_repository_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO)]) == 0
    assert "0 errors" in capsys.readouterr().err


def test_validate_text_format(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(broken)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("rules/x.yaml:5:10: error [5] message.sound: 'loud' is not allowed")


def test_validate_json_format(broken: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(broken), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    [problem] = report["problems"]
    assert problem == {
        "file": "rules/x.yaml",
        "line": 5,
        "column": 10,
        "field": "message.sound",
        "code": 5,
        "severity": "error",
        "message": problem["message"],
    }


def test_validate_github_format(
    broken: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Annotations name files from the repository (the working folder), not from DIR.
    monkeypatch.chdir(broken.parent)
    assert main(["validate", broken.name, "--format", "github"]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("::error file=p/rules/x.yaml,line=5,col=10,title=pushrules [5]::")


def test_warnings_exit_0(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "w", BROKEN.replace("sound: loud", "sound: custom"))
    assert main(["validate", str(root)]) == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["validate", "--format", "xml"])
    assert info.value.code == 2
    assert main(["validate", str(tmp_path / "nope")]) == 2


def test_no_config_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rules").mkdir()
    assert main(["validate", str(tmp_path)]) == 1
    assert "no pushrules.yaml" in capsys.readouterr().out


def test_compile_masks_the_password_and_survives_unset_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACCENGAGE_LOGIN", raising=False)
    monkeypatch.setenv("ACCENGAGE_PASSWORD", "s3cret-value")
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"flightref": "EY5138", "member_id": "765c8", "first_name": "P"}))
    code = main(["compile", "flight-canceled", "--project", str(REPO), "--event", str(event)])
    out = capsys.readouterr().out
    assert code == 0
    [request] = json.loads(out)
    assert request["url"] == "https://api.example.invalid/sendInstantMessage.php"
    user = request["body"]["sendInstantMessage"]["user"]
    assert user["password"] == "********"
    assert "ACCENGAGE_LOGIN" in user["login"]
    assert "s3cret-value" not in out


def test_compile_reports_an_undefined_name(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["compile", "flight-canceled", "--project", str(REPO), "--format", "json"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    [problem] = report["problems"]
    assert problem["file"] == "rules/flight-canceled.yaml"
    assert "member_id" in problem["message"] or "flightref" in problem["message"]


def test_compile_unknown_rule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "nope", "--project", str(REPO)]) == 1
    assert "no rule 'nope'" in capsys.readouterr().err


def test_compile_invalid_rule_prints_its_problems(
    broken: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", "x", "--project", str(broken), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problems"][0]["code"] == 5


def test_compile_event_from_stdin_and_bad_event() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "engine", "compile", "hello-all-apps", "--project", str(REPO)]
    done = subprocess.run(
        [*cmd, "--event", "-"], input="{}", capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 1
    done = subprocess.run(
        [*cmd, "--event", "-"], input="[1]", capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 2
    assert "JSON object" in done.stderr


def test_help_teaches() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "validate", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0
    assert "--format" in done.stdout and "Examples" in done.stdout


def test_compile_with_a_broken_config_shows_the_config_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "x", BROKEN.replace("sound: loud", "text: hi"))
    config = root / "pushrules.yaml"
    config.write_text(config.read_text().replace("{env: ACCENGAGE_PASSWORD}", "hunter2"))
    assert main(["compile", "x", "--project", str(root)]) == 1
    out = capsys.readouterr().out
    assert "pushrules.yaml" in out and "[3]" in out and "hunter2" not in out


def test_every_command_takes_project() -> None:
    """--project DIR is the one way to name the project, for every command."""
    from engine.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert commands
    leaves = list(commands.items())
    while leaves:
        name, command = leaves.pop()
        groups = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
        if groups:  # a group of actions (outbox resend|drop|prune): each action takes it
            leaves += [(f"{name} {sub}", p) for g in groups for sub, p in g.choices.items()]
            continue
        options = {o for action in command._actions for o in action.option_strings}
        assert "--project" in options, f"pushrules {name} has no --project"


#: The commands as ``pushrules --help`` has always listed them.
HELP_ORDER = [
    "validate", "compile", "init", "schema", "fmt", "preview", "test", "explain", "plan",
    "sandbox", "send", "fire", "history", "outbox", "run", "next", "pause", "resume",
]  # fmt: skip


def test_each_group_registers_the_commands_it_is_listed_with(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """COMMAND_GROUPS says which group owns a command, for the parser to import that group
    alone: each group's ``register`` adds exactly its listed commands, in that order, and
    ``--help`` lists them all in the order it always has."""
    for group, commands in COMMAND_GROUPS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(group).register(sub)
        assert tuple(sub.choices) == commands, group
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = re.findall(r"^    (\w+)  ", capsys.readouterr().out, re.MULTILINE)
    assert listed == HELP_ORDER == [c for names in COMMAND_GROUPS.values() for c in names]


@pytest.mark.parametrize(
    ("argv", "commands"),
    [
        (["validate", "--strict"], ["validate", "compile"]),
        (["outbox", "prune"], ["send", "fire", "history", "outbox"]),
        ([], HELP_ORDER),
        (["--help"], HELP_ORDER),
        (["-h", "validate"], HELP_ORDER),
        (["valdate"], HELP_ORDER),
    ],
)
def test_the_parser_holds_the_group_of_the_command_named(
    argv: list[str], commands: list[str]
) -> None:
    """Only the group owning the command; every group with no command, an unknown one or an
    option first, so the root's help and its errors list every command."""
    parser = build_parser(argv)
    assert list(next(a for a in parser._actions if a.dest == "command").choices) == commands


def test_an_unknown_command_is_told_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["valdate"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert (
        "invalid choice: 'valdate' (choose from " + ", ".join(f"'{c}'" for c in HELP_ORDER) + ")"
        in err
    )
