"""Issue 8, the command line: trials that must not reach production, races with a running
daemon, pauses in force, settings that validate but crash, and the CLI's consistency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.cli.main import main
from engine.outbox.store import Store
from tests import zygote
from tests.daemon_process import Daemon, free_port
from tests.daemon_process import Project as DaemonProject
from tests.helpers import REPO, make_project, write_rule
from tests.test_cli import broken  # noqa: F401 (fixture)
from tests.test_cli_send import event_file, project  # noqa: F401 (fixtures)

# --- 4. a trial send without credentials never queues -----------------------------------------


@pytest.mark.parametrize("command", ["send", "fire"])
def test_send_without_credentials_refuses_before_queueing(
    command: str,
    project: Path,  # noqa: F811
    sandbox: RunningSandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("ACCENGAGE_PASSWORD")
    data = event_file(tmp_path, order="N1", member="765c8")
    what = (
        ["send", "shipped", "--event", data]
        if command == "send"
        else [
            "fire",
            "order.shipped",
            "--data",
            data,
        ]
    )
    assert main([*what, "--project", str(project)]) == 1
    err = capsys.readouterr().err
    assert "ACCENGAGE_PASSWORD" in err and "nothing was queued" in err
    assert sandbox.requests() == []
    store_file = tmp_path / "out.db"
    if store_file.exists():  # nothing written: no row a later daemon could send, stale
        with Store(f"sqlite:///{store_file}") as store:
            assert store.history(limit=10) == []


def test_outbox_resend_without_credentials_refuses(
    project: Path,  # noqa: F811
    sandbox: RunningSandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sandbox.set_faults(code=5)
    data = event_file(tmp_path, order="N2", member="765c8")
    assert main(["send", "shipped", "--event", data, "--project", str(project)]) == 1
    capsys.readouterr()
    main(["history", "--project", str(project), "--format", "json"])
    [row] = json.loads(capsys.readouterr().out)
    monkeypatch.delenv("ACCENGAGE_LOGIN")
    assert main(["outbox", "resend", str(row["id"]), "--project", str(project)]) == 1
    assert "ACCENGAGE_LOGIN" in capsys.readouterr().err
    main(["history", "--project", str(project), "--format", "json"])
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["failed"]


def test_sandbox_send_needs_no_credentials(
    project: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ACCENGAGE_PASSWORD")
    data = event_file(tmp_path, order="N3", member="765c8")
    assert main(["send", "shipped", "--event", data, "--sandbox", "--project", str(project)]) == 0


# --- 5. send --sandbox beside a running run --sandbox ---------------------------------------


class SandboxDaemon(Daemon):
    """``pushrules run --sandbox``: its own sandbox endpoint, the trial outbox of the project."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--sandbox", "--sandbox-port", str(free_port())]


def _send_sandbox(root: Path, event: Path, log: Path) -> subprocess.Popen[bytes] | zygote.Forked:
    """``pushrules send race --sandbox`` in a process of its own, its output in ``log``: forked
    from the preloaded fork server (tests/zygote.py) like the daemons, since the test runs
    rounds of three until the daemon wins one (a new interpreter each: 0.5 s of CPU)."""
    argv = ["send", "race", "--event", str(event), "--sandbox", "--project", str(root)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHRULES_", "TEST_"))}
    if not zygote.exec_only():
        return zygote.Forked(argv, env, root, log)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "engine", *argv],
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
        )


@pytest.mark.e2e
def test_send_sandbox_reports_the_outcome_when_a_running_daemon_sends_the_row(
    tmp_path: Path,
) -> None:
    """Each trial's row is sent by whoever claims it first, the CLI or the daemon; the CLI
    must report that outcome (exit 0, sent), not "still retrying"."""
    # The daemon looks for rows it did not queue every 10 ms, so it often claims a trial's row
    # between the CLI's enqueue and its own claim.
    trial = DaemonProject(
        tmp_path / "p", "http://127.0.0.1:9/unused", timing={"dispatch.poll_every": "10ms"}
    )
    trial.rule("race", "event: race.test", "Race {{ event.n }}")
    event = tmp_path / "event.json"
    event.write_text('{"n": 1}')
    daemon = SandboxDaemon(trial).start()
    trial_store = f"sqlite:///{trial.root / 'pushrules-sandbox.db'}"
    try:
        daemon_won = 0
        deadline = time.monotonic() + 90
        # Rounds of three sends until the daemon has taken a row; each CLI's report is checked
        # either way.
        rounds = 0
        while not daemon_won and time.monotonic() < deadline:
            rounds += 1
            logs = [tmp_path / f"send-{rounds}-{n}.log" for n in range(3)]
            runs = [_send_sandbox(trial.root, event, log) for log in logs]
            for run, log in zip(runs, logs, strict=True):
                code = run.wait(timeout=60)
                out = log.read_text()
                assert code == 0, f"exit {code}\n{out}\n{daemon.log()}"
                assert "  sent  returnCode 0" in out, out
            with Store(trial_store) as store:
                rows = store.history(rule="race", limit=1000)
            assert {r.state for r in rows} == {"sent"}
            workers = [a.worker or "" for r in rows for a in r.attempt_log]
            assert daemon.process is not None
            daemon_won = sum(w.endswith(f":{daemon.process.pid}") for w in workers)
        assert daemon_won, "the daemon never claimed a trial's row: the race was not exercised"
        print(f"the daemon sent {daemon_won} trial row(s) in {rounds} round(s) of 3")
    finally:
        assert daemon.stop() == 0


# --- 6. a pause in force is said, in the CLI, the intake's answer and history -----------------


def test_resume_of_one_rule_under_pause_all_says_what_is_in_force(
    project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["pause", "--all", "--project", str(project)]) == 0
    capsys.readouterr()
    assert main(["resume", "shipped", "--project", str(project)]) == 1
    err = capsys.readouterr().err
    assert "all rules are paused since" in err and "`pushrules resume --all` lifts it" in err
    assert "+01:00" in err or "+02:00" in err  # the project's timezone, Europe/Paris
    # The rule paused on its own too: its pause is lifted, the one of --all still holds it.
    assert main(["pause", "shipped", "--project", str(project)]) == 0
    assert main(["resume", "shipped", "--project", str(project)]) == 1
    captured = capsys.readouterr()
    assert "resumed: shipped" in captured.out and "stays paused" in captured.err
    assert main(["resume", "--all", "--project", str(project)]) == 0


def test_pause_for_prints_its_end_in_the_projects_timezone(
    project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["pause", "shipped", "--for", "2h", "--project", str(project)]) == 0
    out = capsys.readouterr().out
    end = datetime.fromisoformat(out.split("until ")[1].split(": ")[0])
    paris = end.astimezone(ZoneInfo("Europe/Paris"))
    assert end.utcoffset() == paris.utcoffset() != timedelta(0), out
    assert abs(end - datetime.now(UTC) - timedelta(hours=2)) < timedelta(minutes=1)


@pytest.mark.e2e
def test_a_post_to_a_paused_rule_answers_paused_and_history_says_why_it_waits(
    tmp_path: Path,
    sandbox: RunningSandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    live = DaemonProject(tmp_path / "live", sandbox.url)
    live.rule("held-back", "event: paused.test", "Held {{ event.n }}")
    live.rule("free", "event: free.test", "Free {{ event.n }}")
    root = str(live.root)
    daemon = Daemon(live).start()
    try:
        assert main(["pause", "held-back", "--project", root]) == 0
        answer = daemon.post("paused.test", {"n": 1}).json()
        [rule] = answer["rules"]
        assert rule["status"] == "paused", rule
        assert "pushrules resume held-back" in rule["detail"]
        assert daemon.post("free.test", {"n": 2}).json()["rules"][0]["status"] == "queued"
        waiting = _history(root, "held-back", capsys)
        assert waiting["state"] == "pending"
        assert waiting["waiting"].startswith("rule paused")
        assert main(["pause", "--all", "--project", root]) == 0
        assert daemon.post("free.test", {"n": 3}).json()["rules"][0]["status"] == "paused"
        assert "all rules paused" in _history(root, "free", capsys)["waiting"]
    finally:
        assert daemon.stop() == 0


def _history(root: str, rule: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The newest outbox row of ``rule``, as ``history --format json`` shows it."""
    capsys.readouterr()
    assert main(["history", "--rule", rule, "--format", "json", "--project", root]) == 0
    return json.loads(capsys.readouterr().out)[0]  # type: ignore[no-any-return]


# --- 13. the command line says the same things the same way ----------------------------------

CRON_RULE = """
trigger: {cron: "0 9 * * *"}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Good morning"
targets:
  - memberId: "765c8"
"""

FOR_EACH_RULE = """
trigger: {event: flight.boarding}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Boarding now"
targets:
  - for_each: "{{ event.passengers }}"
    as: p
    target: {memberId: "{{ p }}"}
"""


def test_validate_takes_project_like_every_command(
    broken: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["validate", "--project", str(REPO)]) == 0
    assert main(["validate", "--project", str(broken), "--format", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["problems"][0]["code"] == 5
    assert main(["validate", str(REPO), "--project", str(broken)]) == 2


def test_next_names_an_invalid_or_unknown_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "morning", CRON_RULE)
    write_rule(root, "broken-morning", CRON_RULE.replace('"0 9 * * *"', '"0 25 * * *"'))
    assert main(["next", "broken-morning", "--project", str(root)]) == 1
    assert "invalid: see `pushrules validate`" in capsys.readouterr().err
    assert main(["next", "mornin", "--project", str(root)]) == 1
    assert "did you mean 'morning'" in capsys.readouterr().err
    assert main(["next", "--project", str(root)]) == 0
    out = capsys.readouterr().out
    assert "morning\n" in out and "broken-morning  (invalid: see `pushrules validate`" in out
    # A running daemon keeps the last good version firing: next must not say it stops.
    assert "keeps firing its last good version" in out


@pytest.mark.parametrize(
    ("start", "first"),
    [
        ("2026-03-29 01:00", "2026-03-29T03:00:00+02:00"),  # the rule's time, Paris
        ("2026-03-29T01:00+01:00", "2026-03-29T03:00:00+02:00"),  # the same moment
        ("2026-03-29T01:00Z", "2026-03-30T02:30:00+02:00"),  # 03:00 in Paris: past 02:30
    ],
)
def test_next_from_reads_a_time_without_offset_in_the_rules_timezone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], start: str, first: str
) -> None:
    """As explain --at and a rule test's at: read it; it was read as UTC (another day here:
    02:30 is skipped by the spring change, so the fire of the 29th is at 03:00)."""
    root = make_project(tmp_path / "p")
    write_rule(root, "night", CRON_RULE.replace('"0 9 * * *"', '"30 2 * * *"'))
    args = ["next", "night", "--from", start, "--count", "1", "--project", str(root)]
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1].strip() == first
    assert main(["next", "--from", "garbage", "--project", str(root)]) == 2
    assert "--from: 'garbage' is not understood" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("resume", "Lift a pause"),
        ("pause", "Examples:\n  pushrules pause"),
        ("resume", "Examples:\n  pushrules resume"),
        ("outbox", "Examples:\n  pushrules history"),
        ("history", "text: a table for people"),
    ],
)
def test_help_describes_each_command_with_examples(
    command: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert expected in capsys.readouterr().out


def test_history_does_not_create_an_outbox(
    project: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["history", "--project", str(project)]) == 0
    assert "no outbox yet" in capsys.readouterr().err
    assert main(["history", "--project", str(project), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not (tmp_path / "out.db").exists()


def test_an_empty_for_each_says_so_in_compile_and_send(
    project: Path,  # noqa: F811
    sandbox: RunningSandbox,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_rule(project, "boarding", FOR_EACH_RULE)
    event = tmp_path / "nobody.json"
    event.write_text('{"passengers": []}')
    args = ["boarding", "--event", str(event), "--project", str(project)]
    assert main(["compile", *args]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [] and "for_each over an empty list" in captured.err
    assert main(["send", *args]) == 0
    assert "for_each over an empty list" in capsys.readouterr().err
    assert sandbox.requests() == []


@pytest.mark.parametrize(
    ("then", "says"), [("defer", "deferred to 2026-11-27T07:00"), ("skip", "skipped")]
)
def test_compile_inside_quiet_hours_says_what_would_happen(
    then: str,
    says: str,
    project: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_rule(
        project, "night", CRON_RULE + f'quiet_hours: {{from: "21:00", to: "07:00", then: {then}}}\n'
    )
    at = "2026-11-26T23:30:00+01:00"
    assert main(["compile", "night", "--at", at, "--project", str(project)]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 1
    assert "inside the rule's quiet hours (21:00 to 07:00)" in captured.err
    assert says in captured.err
    assert (
        main(["compile", "night", "--at", "2026-11-26T12:00:00+01:00", "--project", str(project)])
        == 0
    )
    assert "quiet hours" not in capsys.readouterr().err


def test_compile_reads_at_in_the_rules_timezone_as_explain_does(
    project: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--at "2026-11-26 23:30"` is 23:30 where the rule runs (Europe/Paris), not in UTC: the
    same moment explain and rule tests mean, so a quiet-hours check agrees across commands."""
    rule = CRON_RULE.replace('"Good morning"', '"{{ now.isoformat() }}"')
    rule = rule.replace('{cron: "0 9 * * *"}', '{cron: "0 9 * * *", timezone: Europe/Paris}')
    rule += 'quiet_hours: {from: "23:00", to: "23:45", then: skip}\n'
    write_rule(project, "night", rule)
    argv = ["compile", "night", "--project", str(project), "--at"]
    assert main([*argv, "2026-11-26 23:30"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["body"]["sendInstantMessage"]["message"]["text"] == (
        "2026-11-26T23:30:00+01:00"
    )
    assert "inside the rule's quiet hours" in captured.err
    # With an offset, the offset wins: 23:30 UTC is 00:30 in Paris, outside the quiet hours.
    assert main([*argv, "2026-11-26T23:30:00+00:00"]) == 0
    captured = capsys.readouterr()
    assert "2026-11-27T00:30:00+01:00" in captured.out
    assert "quiet hours" not in captured.err
    assert main([*argv, "Monday"]) == 2
    assert "--at: 'Monday' is not understood" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["next", "--count", "0"], "--count: 0 is out of range: write a whole number from 1"),
        (["next", "--count", "three"], "--count: 'three' is not a whole number"),
        (["history", "--limit", "-1"], "--limit: -1 is out of range"),
        (["send", "r", "--wait", "-5"], "--wait: -5 is out of range: write a number from 0"),
        (["sandbox", "--fail-rate", "2"], "--fail-rate: 2 is out of range: write a number from 0"),
        (["sandbox", "--latency", "nan"], "--latency: nan is out of range"),
        (["run", "--sandbox-port", "70000"], "--sandbox-port: 70000 is out of range"),
    ],
)
def test_a_number_out_of_its_range_is_refused_with_the_range(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`next --count 0` printed "never again" for a daily rule: a person reads a dead rule."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-27", "2026-03-27T00:00:00+01:00"),  # a date alone: its midnight
        ("2026-03-27T00:00:00.123+01:00", "2026-03-27T00:00:00.123000+01:00"),
        ("2026-03-27T00+01:00", "2026-03-27T00:00:00+01:00"),
        ("2026-03-27 08:30", "2026-03-27T08:30:00+01:00"),  # local, in the zone given
        ("2026-03-27T08:30Z", "2026-03-27T09:30:00+01:00"),
    ],
)
def test_a_time_option_takes_every_iso_form_and_reads_a_local_one_in_its_zone(
    text: str, expected: str
) -> None:
    from engine.cli.common import parse_time

    assert parse_time(text, "--from", "Europe/Paris").isoformat() == expected
