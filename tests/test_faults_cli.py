"""Issue 8, the command line: trials that must not reach production, races with a running
daemon, pauses in force, settings that validate but crash, and the CLI's consistency."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.cli import main
from engine.sandbox import RunningSandbox
from engine.store import Store
from tests.daemon_process import START_TIMEOUT, Daemon, free_port, wait_for
from tests.daemon_process import Project as DaemonProject
from tests.helpers import REPO
from tests.test_cli_send import event_file, project, sandbox  # noqa: F401 (fixtures)

# --- 4. a trial send without credentials never queues -----------------------------------------


@pytest.mark.parametrize("command", ["send", "fire"])
def test_send_without_credentials_refuses_before_queueing(
    command: str,
    project: Path,  # noqa: F811
    sandbox: RunningSandbox,  # noqa: F811
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
    sandbox: RunningSandbox,  # noqa: F811
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

    def start(self, **env: str) -> SandboxDaemon:
        command = [sys.executable, "-m", "engine", "run", "--project", str(self.project.root)]
        command += ["--sandbox", "--sandbox-port", str(free_port()), "--log-format", "json"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.project.root,
            )
        wait_for(
            self._answers, "the daemon to answer /healthz", timeout=START_TIMEOUT, log=self.log
        )
        return self


def _send_sandbox(root: Path, event: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHRULES_", "TEST_"))}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "send",
            "race",
            "--event",
            str(event),
            "--sandbox",
            "--project",
            str(root),
        ],
        env={**env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )


def test_send_sandbox_reports_the_outcome_when_a_running_daemon_sends_the_row(
    tmp_path: Path,
) -> None:
    """Each trial's row is sent by whoever claims it first, the CLI or the daemon; the CLI
    must report that outcome (exit 0, sent), not "still retrying"."""
    trial = DaemonProject(tmp_path / "p", "http://127.0.0.1:9/unused")
    trial.rule("race", "event: race.test", "Race {{ event.n }}")
    event = tmp_path / "event.json"
    event.write_text('{"n": 1}')
    daemon = SandboxDaemon(trial).start()
    trial_store = f"sqlite:///{trial.root / 'pushrules-sandbox.db'}"
    try:
        daemon_won = 0
        deadline = time.monotonic() + 90
        while daemon_won < 2 and time.monotonic() < deadline:
            runs = [_send_sandbox(trial.root, event) for _ in range(6)]
            for run in runs:
                out, err = run.communicate(timeout=60)
                assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{err}\n{daemon.log()}"
                assert "  sent  returnCode 0" in out, out
            with Store(trial_store) as store:
                rows = store.history(rule="race", limit=1000)
            assert {r.state for r in rows} == {"sent"}
            workers = [a.worker or "" for r in rows for a in r.attempt_log]
            assert daemon.process is not None
            daemon_won = sum(w.endswith(f":{daemon.process.pid}") for w in workers)
        assert daemon_won, "the daemon never claimed a trial's row: the race was not exercised"
    finally:
        assert daemon.stop() == 0
