"""Files and reloads that fail alone, on a real ``pushrules run`` process.

Issue 7 points 4, 5 and 9 (a client leaving mid-body), issue 8 points 1 and 8 (signals).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.cli.main import main
from engine.outbox.store import Store
from tests.conftest import StartDaemon
from tests.daemon_process import HTTP, Daemon, Project, wait_for

pytestmark = pytest.mark.e2e


def metric(daemon: Daemon, name: str) -> float:
    text = HTTP.get(daemon.project.url + "/metrics", timeout=5.0).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name} in\n{text}")


def fired(daemon: Daemon, event: str, marker: str) -> list[str]:
    response = daemon.post(event, {"marker": marker})
    assert response.status_code == 202, response.text
    return [r["rule"] for r in response.json()["rules"] if r["status"] == "queued"]


# --- issue 7 point 4 ----------------------------------------------------------------------------


def test_a_deeply_nested_file_added_to_a_running_daemon_fails_alone(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """400 nested ``[``: at start, added while running, or breaking a rule that was good."""
    deep = "description: x\nvars: " + "[" * 400 + "]" * 400 + "\n"
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("other", "event: other", "other {{ event.marker }}")
    victim = project.rule("victim", "event: victim", "victim")
    (project.root / "rules" / "at-start.yaml").write_text(deep)
    daemon = daemons(project)  # it starts: the file is a problem of its own
    status, report = daemon.health()
    assert status == 200 and report["rules"]["loaded"] == 2
    assert any(
        line.startswith("rules/at-start.yaml:2:") for line in report["rules"]["first_errors"]
    )

    (project.root / "rules" / "deep.yaml").write_text(deep)
    victim.write_text(victim.read_text() + "vars: " + "[" * 400 + "]" * 400 + "\n")
    report = daemon.wait_health(
        lambda h: h["rules"]["errors"] == 3, "the deep files' problems in /healthz"
    )
    assert any(
        line.startswith("rules/deep.yaml:2:") and "nested more than" in line
        for line in report["rules"]["first_errors"]
    ), report
    assert report["rules"]["kept_at_last_good_version"] == ["victim"]
    assert fired(daemon, "other", "a") == ["other"]
    assert fired(daemon, "victim", "a") == ["victim"]

    # A later good reload works: a new rule is taken, the deep files repaired are taken.
    project.rule("later", "event: later", "later")
    project.rule("deep", "event: deep", "deep")
    project.rule("victim", "event: victim2", "victim2")
    (project.root / "rules" / "at-start.yaml").unlink()
    daemon.wait_health(
        lambda h: h["rules"]["loaded"] == 4 and not h["rules"]["errors"], "the repair's reload"
    )
    assert fired(daemon, "later", "b") == ["later"]
    assert fired(daemon, "deep", "c") == ["deep"]
    assert fired(daemon, "victim2", "d") == ["victim"]
    assert daemon.stop() == 0


def test_a_failed_reload_shows_in_healthz_and_metrics_until_a_good_one(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("other", "event: other", "other")
    daemon = daemons(project)
    config = project.root / "pushrules.yaml"
    good = config.read_text()
    config.write_text(good.replace("apps:", "apps: [", 1))

    def failed() -> dict | None:  # type: ignore[type-arg]
        status, report = daemon.health()
        return report if status == 503 else None

    report = wait_for(failed, "/healthz to report the failed reload", log=daemon.log)
    assert report["ok"] is False and report["last_reload"]["ok"] is False
    assert any("the last reload failed" in p for p in report["problems"]), report
    assert metric(daemon, 'pushrules_reloads_total{result="error"}') >= 1
    assert fired(daemon, "other", "x") == ["other"]  # the running rules stay

    config.write_text(good)
    daemon.wait_health(lambda h: h["ok"], "/healthz ok after a good reload")
    assert daemon.stop() == 0


# --- issue 7 point 5 ----------------------------------------------------------------------------


def test_delete_and_recreate_churn_loses_no_event(
    tmp_path: Path,
    sandbox: RunningSandbox,
    daemons: StartDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A deploy loop deleting and re-creating a rule file (100 ms gap) for 4 s while events
    arrive: every event answered 202 is in the outbox or recorded as taken by no rule, with
    why, and the churned rule takes every one of its events.

    The files never stay still for ``watch_quiet`` (1 s here, 300 ms by default) during the
    churn, so every reload then is one forced by ``watch_max_delay`` (1 s here, 5 s by default):
    the kind that must keep a rule whose file is missing for the moment. (At 300 ms, a churn
    thread held up a third of a second on a busy machine, or polls landing twice on the
    missing file, looked like a settled folder without the rule, which the daemon rightly
    drops.)"""
    project = Project(
        tmp_path / "project",
        sandbox.url,
        timing={"daemon.watch_quiet": "1s", "daemon.watch_max_delay": "1s"},
    )
    churned = project.rule("churned", "event: churned", "churned {{ event.marker }}")
    daemon = daemons(project)
    text = churned.read_text()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            churned.unlink()
            time.sleep(0.1)
            churned.write_text(text)
            time.sleep(0.15)

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    answers: dict[str, list[str]] = {}
    try:
        deadline = time.monotonic() + 4.0
        n = 0
        while time.monotonic() < deadline:
            key = f"k{n}"
            response = daemon.post("churned", {"marker": key}, key=key)
            assert response.status_code == 202, response.text
            answers[key] = [r["rule"] for r in response.json()["rules"]]
            n += 1
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join()
        churn_ended = datetime.now(UTC)
    # Enough events to span many delete/re-create cycles (about 16 in 4 s), even on a busy
    # machine where each POST takes 0.2 s; and reloads forced mid-churn, or the churn tested
    # nothing.
    assert len(answers) >= 15, len(answers)
    forced = [
        at for at, message in daemon.timed_messages() if at < churn_ended and "reloaded" in message
    ]
    assert len(forced) >= 2, daemon.log()
    # An event no rule listens to is recorded too, with why.
    for _ in range(2):  # a client's retry: one event
        assert daemon.post("nobody", {"marker": "n"}, key="nobody-1").status_code == 202

    lost = sorted(k for k, rules in answers.items() if rules != ["churned"])
    assert lost == [], f"{len(lost)} of {len(answers)} events taken by no rule"
    with Store(project.store_url) as store:
        stored = {row.idem_key for row in store.history(rule="churned", limit=100_000)}
        unmatched = store.unmatched()
    assert stored == {f"event:{k}" for k in answers}
    assert [(u.event, u.key) for u in unmatched] == [("nobody", "event:nobody-1")]
    assert "no enabled rule listens to event 'nobody'" in unmatched[0].reason
    assert json.loads(unmatched[0].payload) == {"marker": "n"}
    assert metric(daemon, "pushrules_events_unmatched_total") == 1

    capsys.readouterr()
    assert main(["history", "--unmatched", "--project", str(project.root)]) == 0
    assert "nobody event:nobody-1: no enabled rule listens" in capsys.readouterr().out
    assert main(["history", "--project", str(project.root)]) == 0
    assert "1 event(s) taken by no rule are not in this list" in capsys.readouterr().err

    # Once the churn stops with the file gone, the rule goes (the folder settled).
    churned.unlink()
    daemon.wait_health(lambda h: h["rules"]["loaded"] == 0, "the deleted rule to go")
    assert daemon.stop() == 0


# --- issue 8 point 1 ----------------------------------------------------------------------------


def test_a_rule_moved_into_a_subfolder_keeps_firing(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    project = Project(tmp_path / "project", sandbox.url)
    path = project.rule("xmas", "event: xmas", "xmas {{ event.marker }}")
    (project.root / "rules" / "seasonal").mkdir()
    project.rule("easter", "event: easter", "easter").rename(
        project.root / "rules" / "seasonal" / "easter.yaml"
    )
    daemon = daemons(project)
    assert fired(daemon, "easter", "a") == ["easter"]

    moved = project.root / "rules" / "seasonal" / "xmas.yaml"
    path.rename(moved)
    moved.write_text(moved.read_text().replace("xmas {{", "moved {{"))
    wait_for(
        lambda: _fires_new_version(daemon, sandbox),
        "the moved rule's new version to fire",
        log=daemon.log,
    )
    assert "xmas" not in daemon.health()[1]["rules"]["kept_at_last_good_version"]
    assert daemon.stop() == 0


def _fires_new_version(daemon: Daemon, sandbox: RunningSandbox) -> bool:
    fired(daemon, "xmas", "m")
    texts = [r["body"]["sendInstantMessage"]["message"]["text"] for r in sandbox.requests()]
    return "moved m" in texts


# --- issue 8 point 8 ----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_the_daemon_cleanly(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon, sig: signal.Signals
) -> None:
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("other", "event: other", "other")
    daemon = daemons(project)
    daemon.signal(sig)
    assert daemon.process is not None
    assert daemon.process.wait(15) == 0
    messages = daemon.messages()
    assert f"{sig.name} received: finishing in-flight sends, then stopping" in messages
    assert "stopped" in messages
    assert not any("Traceback" in m for m in messages), messages


def test_sighup_reloads_and_the_daemon_keeps_serving(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("other", "event: other", "other")
    daemon = daemons(project)
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: (
            "SIGHUP received: reloading" in daemon.messages()
            and any(m.startswith("reloaded in") for m in daemon.messages())
        ),
        "SIGHUP's reload",
        log=daemon.log,
    )
    assert daemon.health()[0] == 200
    assert fired(daemon, "other", "x") == ["other"]
    assert daemon.stop() == 0


# --- issue 7 point 9 (part) ---------------------------------------------------------------------


def test_a_client_leaving_mid_body_is_one_warning_line(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("other", "event: other", "other")
    daemon = daemons(project)
    with socket.create_connection(("127.0.0.1", project.port)) as sock:
        sock.sendall(
            b"POST /events/other HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"marker": "'
        )
        time.sleep(0.2)
    wait_for(
        lambda: any("disconnected after" in m for m in daemon.messages()),
        "the disconnect's log line",
        log=daemon.log,
    )
    assert fired(daemon, "other", "after") == ["other"]
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log(tail=None).splitlines() if line.strip()]
    assert not [line for line in lines if line["level"] == "error"], lines
    assert not any("exception" in line for line in lines), lines
