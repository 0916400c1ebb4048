"""send, fire, history and outbox over real HTTP to the sandbox, as an operator runs them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.cli.main import main
from engine.outbox.store import Fire, Store
from tests.helpers import body, make_project, write_rule

PASSWORD = "pw-Zq81-never-shown"
RULE = """
trigger: {event: order.shipped}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Your order {{ event.order }} is on its way"
targets:
  - memberId: "{{ event.member }}"
"""


@pytest.fixture
def project(tmp_path: Path, sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    text = config.read_text().replace(
        "https://api.example.invalid/sendInstantMessage.php", sandbox.url
    )
    config.write_text(text.replace("sqlite:///pushrules.db", f"sqlite:///{tmp_path}/out.db"))
    write_rule(root, "shipped", RULE)
    monkeypatch.setenv("ACCENGAGE_LOGIN", "team@example.com")
    monkeypatch.setenv("ACCENGAGE_PASSWORD", PASSWORD)
    return root


def quiet_rule(project: Path, start: int, end: int) -> datetime:
    """Rule ``quiet``, quiet from ``start`` to ``end`` hours from now (the project's zone, Paris):
    a window placed around now, or away from it, whatever the time of day the test runs.
    Returns now there."""
    here = datetime.now(ZoneInfo("Europe/Paris"))
    span = f"{here + timedelta(hours=start):%H:%M}", f"{here + timedelta(hours=end):%H:%M}"
    write_rule(project, "quiet", RULE + f'quiet_hours: {{from: "{span[0]}", to: "{span[1]}"}}\n')
    return here


def event_file(tmp_path: Path, **fields: str) -> str:
    path = tmp_path / f"event-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(fields))
    return str(path)


def test_fire_twice_with_one_key_sends_once(
    project: Path, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    data = event_file(tmp_path, order="A1", member="765c8")
    args = ["fire", "order.shipped", "--data", data, "--key", "k-1", "--project", str(project)]
    assert main(args) == 0
    assert main(args) == 0
    assert len(sandbox.requests()) == 1
    body = sandbox.requests()[0]["body"]["sendInstantMessage"]
    assert body["message"]["text"] == "Your order A1 is on its way"
    assert body["user"] == {"login": "team@example.com", "password": PASSWORD}


def test_send_prints_the_outcome_and_history_records_it(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = event_file(tmp_path, order="B2", member="765c8")
    assert main(["send", "shipped", "--event", data, "--project", str(project)]) == 0
    out = capsys.readouterr().out
    assert "sent" in out and "returnCode 0" in out
    assert main(["history", "--project", str(project), "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["rule"], row["state"], row["returnCode"]) == ("shipped", "sent", 0)
    assert row["messageId"]


def test_a_permanent_code_fails_with_its_meaning(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sandbox.set_faults(code=5)
    data = event_file(tmp_path, order="C3", member="765c8")
    assert main(["send", "shipped", "--event", data, "--project", str(project)]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "No or bad message" in out
    assert len(sandbox.requests()) == 1  # not retried


def test_what_still_retries_is_left_to_the_daemon(
    project: Path, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    sandbox.set_faults(code=11)  # message limit exceeded: retryable
    data = event_file(tmp_path, order="D4", member="765c8")
    args = ["send", "shipped", "--event", data, "--wait", "0", "--project", str(project)]
    assert main(args) == 75
    assert main(["history", "--project", str(project), "--status", "retrying"]) == 0


def test_outbox_resend_and_drop(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sandbox.set_faults(code=5)
    for order in ("E5", "F6"):
        data = event_file(tmp_path, order=order, member="765c8")
        main(["send", "shipped", "--event", data, "--project", str(project)])
    capsys.readouterr()
    main(["history", "--project", str(project), "--status", "failed", "--format", "json"])
    first, second = sorted(r["id"] for r in json.loads(capsys.readouterr().out))
    sandbox.set_faults(code=None)
    assert main(["outbox", "resend", str(first), "--project", str(project)]) == 0
    assert main(["outbox", "drop", str(second), "--project", str(project)]) == 0
    assert main(["outbox", "drop", str(second), "--project", str(project)]) == 1
    assert "only" in capsys.readouterr().err
    main(["history", "--project", str(project), "--format", "json"])
    states = {r["id"]: r["state"] for r in json.loads(capsys.readouterr().out)}
    assert states == {first: "sent", second: "dropped"}


def test_the_password_is_never_printed_or_stored(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = event_file(tmp_path, order="G7", member="765c8")
    main(["send", "shipped", "--event", data, "--project", str(project)])
    main(["compile", "shipped", "--event", data, "--project", str(project)])
    main(["history", "--project", str(project), "--format", "json"])
    main(["history", "--project", str(project)])
    sandbox.set_faults(code=3)
    main(["send", "shipped", "--event", data, "--project", str(project)])
    printed = capsys.readouterr()
    assert PASSWORD not in printed.out + printed.err
    for path in tmp_path.glob("out.db*"):
        assert PASSWORD.encode() not in path.read_bytes()


def test_dry_run_records_nothing(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = event_file(tmp_path, order="H8", member="765c8")
    assert main(["send", "shipped", "--event", data, "--dry-run", "--project", str(project)]) == 0
    [request] = json.loads(capsys.readouterr().out)
    assert request["body"]["sendInstantMessage"]["user"]["password"] == "********"
    assert sandbox.requests() == []
    assert not (tmp_path / "out.db").exists()


def test_fire_an_event_nobody_listens_to(project: Path, capsys) -> None:
    assert main(["fire", "nobody.listens", "--project", str(project)]) == 1
    assert "order.shipped" in capsys.readouterr().err


def test_sandbox_trials_keep_their_own_outbox(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = event_file(tmp_path, order="S1", member="765c8")
    assert main(["send", "shipped", "--event", data, "--sandbox", "--project", str(project)]) == 0
    assert (project / "pushrules-sandbox.db").exists()
    assert not (tmp_path / "out.db").exists()  # the real outbox was not touched
    capsys.readouterr()
    assert main(["history", "--sandbox", "--project", str(project), "--format", "json"]) == 0
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["sent"]


def test_a_paused_rule_keeps_its_fires_until_resumed(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pause", "shipped", "--project", str(project)]) == 0
    data = event_file(tmp_path, order="P1", member="765c8")
    assert main(["send", "shipped", "--event", data, "--project", str(project)]) == 0
    assert "paused" in capsys.readouterr().err
    assert sandbox.requests() == []
    assert main(["resume", "shipped", "--drop-unsent", "--project", str(project)]) == 0
    assert "1 unsent request(s) dropped" in capsys.readouterr().out
    main(["history", "--project", str(project), "--format", "json"])
    assert [r["state"] for r in json.loads(capsys.readouterr().out)] == ["dropped"]


def test_quiet_hours_defer_is_left_to_the_daemon(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_rule(project, "quiet", RULE + 'quiet_hours: {from: "00:00", to: "23:59"}\n')
    data = event_file(tmp_path, order="Q1", member="765c8")
    assert (
        main(
            [
                "send",
                "quiet",
                "--event",
                data,
                "--at",
                "2026-11-26T12:00:00+00:00",
                "--project",
                str(project),
            ]
        )
        == 0
    )
    assert "the daemon sends it then" in capsys.readouterr().err
    assert sandbox.requests() == []


def test_the_same_key_run_again_leaves_a_deferred_push_waiting(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A script retrying its `send --key` must not send at once what quiet hours deferred."""
    # Quiet two to four hours from now: not now, so the waiting row itself is what is said.
    here = quiet_rule(project, 2, 4)
    data = event_file(tmp_path, order="Q2", member="765c8")
    inside = (here + timedelta(hours=3)).replace(microsecond=0)
    args = ["send", "quiet", "--event", data, "--key", "k-q", "--at", inside.isoformat()]
    assert main([*args, "--project", str(project)]) == 0
    assert "the daemon sends it then" in capsys.readouterr().err
    assert main([*args, "--project", str(project)]) == 0
    err = capsys.readouterr().err
    assert "duplicate" in err and "waits in the outbox until" in err
    assert sandbox.requests() == []
    main(["history", "--project", str(project), "--format", "json"])
    [row] = json.loads(capsys.readouterr().out)
    assert row["state"] == "pending" and row["attempts"] == 0


def test_pausing_a_misspelt_rule_is_refused(project: Path, capsys) -> None:
    assert main(["pause", "shiped", "--project", str(project)]) == 2
    assert "did you mean 'shipped'" in capsys.readouterr().err


def test_piped_history_is_one_line_a_row(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Output that is not a terminal (a pipe, a file, this test) is a header and one line a
    row, columns aligned and nothing folded, so grep and sort see whole rows."""
    sandbox.set_faults(code=5)
    long_key = "order-" + "x" * 180  # a row wider than any terminal
    for order, key in (("H8", long_key), ("I9", "short")):
        data = event_file(tmp_path, order=order, member="765c8")
        main(["send", "shipped", "--event", data, "--key", key, "--project", str(project)])
    capsys.readouterr()
    assert main(["history", "--project", str(project)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "id", "rule", "key", "part", "state", "tries", "code", "label", "messageId", "created",
        "(UTC)",
    ]  # fmt: skip
    assert len(rows) == 2
    assert any(long_key in row for row in rows)
    for row in rows:
        assert row.split()[1:5] == ["shipped", row.split()[2], "1", "failed"]
        assert "No or bad message" in row
        assert row.index("failed") == header.index("state")


def test_outbox_resend_of_a_trial_row_never_posts_to_the_real_accengage_url(
    project: Path, sandbox: RunningSandbox, capsys: pytest.CaptureFixture[str]
) -> None:
    """Here `sandbox` is pushrules.yaml's accengage.url, "the real Accengage". A row of the
    trial outbox, written for a trial sandbox gone since, resent with --sandbox, goes to a
    sandbox of the command's own."""
    trial = Store(f"sqlite:///{project / 'pushrules-sandbox.db'}")
    gone = "http://127.0.0.1:9/sendInstantMessage.php"
    (written,) = trial.enqueue_many(
        [Fire("shipped", "trial-1", [(gone, body("trial"))])], now=datetime.now(UTC)
    )
    trial.hold(ids=written.ids)
    trial.drop(written.ids[0])  # a row a person can resend
    trial.close()
    args = ["outbox", "resend", str(written.ids[0]), "--sandbox", "--wait", "5"]
    assert main([*args, "--project", str(project)]) == 0
    assert sandbox.requests() == []
    assert "sent" in capsys.readouterr().out


def test_the_same_key_run_again_inside_quiet_hours_sends_nothing(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row the first run left due (its rule was paused then) is not sent by a retry that
    comes inside the rule's quiet hours: the daemon would hold it until they end."""
    here = quiet_rule(project, -1, 1)
    data = event_file(tmp_path, order="Q3", member="765c8")
    args = ["send", "quiet", "--event", data, "--key", "k-q3", "--project", str(project)]
    assert main(["pause", "quiet", "--project", str(project)]) == 0
    outside = (here - timedelta(hours=2)).replace(microsecond=0)  # before the quiet hours
    assert main([*args, "--at", outside.isoformat()]) == 0
    assert main(["resume", "quiet", "--project", str(project)]) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert "quiet hours" in capsys.readouterr().err
    assert sandbox.requests() == []


def test_the_same_key_run_again_inside_quiet_hours_of_a_fire_already_sent_says_nothing_waits(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    here = quiet_rule(project, -1, 1)
    data = event_file(tmp_path, order="Q9", member="765c8")
    args = ["send", "quiet", "--event", data, "--key", "k-q9", "--project", str(project)]
    outside = (here - timedelta(hours=2)).replace(microsecond=0)
    assert main([*args, "--at", outside.isoformat()]) == 0
    assert len(sandbox.requests()) == 1  # sent at once: outside its quiet hours
    capsys.readouterr()
    assert main(args) == 0  # the same key again, now inside the quiet hours
    assert "the daemon sends it then" not in capsys.readouterr().err  # it was sent already
    assert len(sandbox.requests()) == 1


def test_history_since_takes_the_times_history_json_prints(
    project: Path, sandbox: RunningSandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = event_file(tmp_path, order="B2", member="765c8")
    assert main(["send", "shipped", "--event", data, "--project", str(project)]) == 0
    capsys.readouterr()
    assert main(["history", "--project", str(project), "--format", "json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    created = row["created_at"]  # with microseconds
    for since in (created, created[:10]):  # the row's own time; its day alone
        code = main(["history", "--project", str(project), "--since", since, "--format", "json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert len(json.loads(captured.out)) == 1
