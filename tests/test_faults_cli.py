"""Issue 8, the command line: trials that must not reach production, races with a running
daemon, pauses in force, settings that validate but crash, and the CLI's consistency."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import main
from engine.sandbox import RunningSandbox
from engine.store import Store
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
