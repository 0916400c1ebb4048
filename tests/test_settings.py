"""Issue 9: pushrules.yaml is read once into typed settings that remember where each setting
is written, so a problem met at run time points at the line to fix."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.cli.main import main
from engine.rules.project import DaemonConfig, DispatchConfig, load_project
from engine.rules.schemas import DAEMON, DISPATCH
from engine.send.policy import DispatchSettings
from engine.send.runtime import dispatch_settings
from tests.helpers import REPO, make_project
from tests.test_cli_send import event_file, project  # noqa: F401 (fixtures)


def line_of(path: Path, text: str) -> int:
    """The 1-based line of the first line of ``path`` holding ``text``."""
    lines = path.read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def test_settings_know_the_line_of_each_setting(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    loaded, problems = load_project(root)
    assert loaded is not None, problems
    assert loaded.where("accengage.password") == f"pushrules.yaml:{line_of(config, 'password:')}"
    assert loaded.where("store") == f"pushrules.yaml:{line_of(config, 'store:')}"
    assert loaded.where("intake_token.nothing") == "pushrules.yaml"  # not written: the file


def test_where_a_setting_is_written_does_not_change_what_the_settings_mean(
    tmp_path: Path,
) -> None:
    """A reload compares settings: a comment added above them is no change."""
    root = make_project(tmp_path / "p")
    a, _ = load_project(root)
    text = (REPO / "pushrules.yaml").read_text()
    (root / "pushrules.yaml").write_text("# a comment\n\n" + text)
    b, _ = load_project(root)
    assert a is not None and b is not None
    assert a.lines != b.lines
    assert a == b


def test_the_typed_dispatch_settings_are_the_schema_s() -> None:
    """One list of dispatch settings: the schema's table and the typed object agree."""
    assert {f.name for f in dataclasses.fields(DispatchConfig)} == set(DISPATCH)
    assert {f.name for f in dataclasses.fields(DaemonConfig)} == set(DAEMON)


@pytest.mark.parametrize(("variable", "setting"), [("ACCENGAGE_PASSWORD", "password:")])
def test_an_unset_credential_names_its_setting_and_line(
    variable: str,
    setting: str,
    project: Path,  # noqa: F811
    sandbox: RunningSandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv(variable)
    data = event_file(tmp_path, order="N1", member="765c8")
    assert main(["send", "shipped", "--event", data, "--project", str(project)]) == 1
    err = capsys.readouterr().err
    line = line_of(project / "pushrules.yaml", setting)
    assert f"accengage.password, pushrules.yaml:{line}" in err, err
    assert "Traceback" not in err
    assert sandbox.requests() == []


def test_dispatch_values_are_typed_as_the_schema_says(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    config.write_text(
        config.read_text()
        + "dispatch:\n  concurrency: 4\n  rate_per_second: 20\n  max_attempts: 3\n"
        + "  timeout: 45s\n  on_unknown_outcome: retry\n  transport: httpcore\n"
    )
    loaded, problems = load_project(root)
    assert loaded is not None, problems
    assert loaded.dispatch == DispatchConfig(4, 20, 3, timedelta(seconds=45), "retry", "httpcore")
    assert type(loaded.dispatch.concurrency) is int
    assert type(loaded.dispatch.on_unknown_outcome) is str  # not the YAML reader's marked text
    assert loaded.where("dispatch.timeout") == f"pushrules.yaml:{line_of(config, 'timeout:')}"
    settings = dispatch_settings(loaded)
    assert (settings.concurrency, settings.rate_per_second, settings.max_attempts) == (4, 20, 3)
    assert settings.on_unknown_outcome == "retry"
    assert settings.transport == "httpcore"
    assert settings.timeout.read == 45.0
    assert settings.deadline == 90.0  # twice the timeout, above the default 60 s
    assert settings.lease >= timedelta(seconds=2 * settings.deadline)


def test_each_dispatch_setting_of_the_file_is_a_setting_of_the_dispatcher() -> None:
    """The runtime passes every key of ``dispatch:`` on by name: a key added to the schema
    without a dispatcher setting of that name fails here, not in production."""
    known = {f.name for f in dataclasses.fields(DispatchSettings)}
    assert set(DISPATCH) <= known, set(DISPATCH) - known


def test_timing_settings_take_milliseconds_and_default_to_the_daemon_s_own(
    tmp_path: Path,
) -> None:
    """``daemon:`` and ``dispatch.poll_every`` are durations that may be written in ms; left
    out, each is the value the daemon always had."""
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    default, problems = load_project(root)
    assert default is not None, problems
    assert default.daemon == DaemonConfig()
    assert default.daemon.leadership_every == timedelta(seconds=10)
    assert default.daemon.watch_every == timedelta(milliseconds=500)
    assert dispatch_settings(default).poll_every == 0.5

    config.write_text(
        config.read_text()
        + "dispatch:\n  poll_every: 50ms\n"
        + "daemon:\n  watch_every: 100ms\n  watch_quiet: 1s500ms\n  watch_max_delay: 2s\n"
        + "  leadership_every: 1s\n  lock_wait: 500ms\n  fire_retry: 200ms\n  fold_every: 500ms\n"
        + "  fire_ahead: none\n"
    )
    loaded, problems = load_project(root)
    assert loaded is not None, problems
    assert loaded.daemon == DaemonConfig(
        watch_every=timedelta(milliseconds=100),
        watch_quiet=timedelta(milliseconds=1500),
        watch_max_delay=timedelta(seconds=2),
        leadership_every=timedelta(seconds=1),
        lock_wait=timedelta(milliseconds=500),
        fire_retry=timedelta(milliseconds=200),
        fold_every=timedelta(milliseconds=500),
        fire_ahead=timedelta(0),
    )
    assert dispatch_settings(loaded).poll_every == 0.05
    assert loaded.where("daemon.fire_retry") == f"pushrules.yaml:{line_of(config, 'fire_retry:')}"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("daemon:\n  watch_every", "5ms", "5ms is out of range; write a duration from 10ms to 1m"),
        ("daemon:\n  leadership_every", "1h", "from 100ms to 10m"),
        ("daemon:\n  fire_retry", "0.5s", "whole numbers"),
        ("daemon:\n  fold_every", "50ms", "from 100ms to 10m"),
        ("daemon:\n  fire_ahead", "2m", "from 10ms to 1m, or none"),
        ("dispatch:\n  poll_every", "2m", "from 10ms to 1m"),
        ("dispatch:\n  timeout", "500ms", "unknown unit 'ms'"),  # whole seconds there
    ],
)
def test_a_timing_setting_out_of_its_bounds_is_a_problem_on_its_line(
    setting: str, value: str, message: str, tmp_path: Path
) -> None:
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    config.write_text(config.read_text() + f"{setting}: {value}\n")
    loaded, problems = load_project(root)
    assert loaded is None
    [problem] = problems
    assert message in problem.message, problem
    assert problem.line == len(config.read_text().splitlines())


def test_intake_max_body_is_a_whole_number_of_bytes_within_bounds(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    base = (REPO / "pushrules.yaml").read_text()
    loaded, _ = load_project(root)
    assert loaded is not None and loaded.intake.max_body == 1024 * 1024  # the default
    (root / "pushrules.yaml").write_text(base + "intake:\n  max_body: 16777216\n")
    loaded, problems = load_project(root)
    assert loaded is not None, problems
    assert loaded.intake.max_body == 16 * 1024 * 1024
    assert type(loaded.intake.max_body) is int
    for bad, words in (
        ("100", "100 is out of range; write a whole number from 1024 to 67108864"),
        ("67108865", "67108865 is out of range; write a whole number from 1024 to 67108864"),
        ("16MiB", "must be a whole number"),
    ):
        (root / "pushrules.yaml").write_text(base + f"intake:\n  max_body: {bad}\n")
        loaded, problems = load_project(root)
        assert loaded is None
        (problem,) = problems
        assert problem.field == "intake.max_body"
        assert problem.line == len(base.splitlines()) + 2
        assert problem.message == words
