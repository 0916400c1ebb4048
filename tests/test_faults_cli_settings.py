"""Issue 8 point 7: every key of pushrules.yaml, given a bad value, is a problem with its line in
``validate`` and a plain refusal (no traceback) in ``run`` and ``send``."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from engine.cli.main import main
from engine.rules.schemas import PROJECT
from tests.daemon_process import free_port
from tests.helpers import write_rule

#: A pushrules.yaml setting every key, one per line: (path in the file, line text).
LINES: list[tuple[tuple[str, ...], str]] = [
    (("accengage",), "accengage:"),
    (("accengage", "url"), "  url: http://127.0.0.1:9/sendInstantMessage.php"),
    (("accengage", "login"), "  login: {env: ACCENGAGE_LOGIN}"),
    (("accengage", "password"), "  password: {env: ACCENGAGE_PASSWORD}"),
    (("apps",), "apps:"),
    (("apps", "flights-ios"), "  flights-ios:"),
    (("apps", "flights-ios", "partner"), "    partner: my_partner_id"),
    (("apps", "flights-ios", "platform"), "    platform: ios"),
    (("timezone",), "timezone: Europe/Paris"),
    (("device_fields",), "device_fields: [memberId]"),
    (("languages",), "languages: [en]"),
    (("button_templates",), "button_templates:"),
    (("button_templates", "category_name"), "  category_name: 2"),
    (("store",), "store: sqlite:///STORE"),
    (("listen",), "listen: 127.0.0.1:PORT"),
    (("intake_token",), "intake_token: {env: INTAKE_TOKEN}"),
    (("dispatch",), "dispatch:"),
    (("dispatch", "concurrency"), "  concurrency: 4"),
    (("dispatch", "rate_per_second"), "  rate_per_second: 100"),
    (("dispatch", "max_attempts"), "  max_attempts: 3"),
    (("dispatch", "timeout"), "  timeout: 10s"),
    (("dispatch", "on_unknown_outcome"), "  on_unknown_outcome: park"),
    (("dispatch", "transport"), "  transport: aiohttp"),
    (("dispatch", "poll_every"), "  poll_every: 500ms"),
    (("intake",), "intake:"),
    (("intake", "max_body"), "  max_body: 4194304"),
    (("daemon",), "daemon:"),
    (("daemon", "watch_every"), "  watch_every: 500ms"),
    (("daemon", "watch_quiet"), "  watch_quiet: 300ms"),
    (("daemon", "watch_max_delay"), "  watch_max_delay: 5s"),
    (("daemon", "leadership_every"), "  leadership_every: 10s"),
    (("daemon", "lock_wait"), "  lock_wait: 2s"),
    (("daemon", "fire_retry"), "  fire_retry: 1s"),
    (("daemon", "fold_every"), "  fold_every: 5s"),
    (("daemon", "fire_ahead"), "  fire_ahead: 5s"),
    (("retention",), "retention:"),
    (("retention", "sent"), "  sent: 30d"),
    (("retention", "dropped"), "  dropped: 90d"),
    (("retention", "unmatched_events"), "  unmatched_events: 90d"),
    (("retention", "feed_keys"), "  feed_keys: forever"),
    (("retention", "marks"), "  marks: 365d"),
]
#: Where the schema says "any name" (an app alias, a button category), the name used above.
NAMES = {"apps": "flights-ios", "button_templates": "category_name"}

#: A bad value for every key of the schema (schema path, with "*" for any name).
BAD: dict[tuple[str, ...], str] = {
    ("accengage",): "https://api.example.invalid",
    ("accengage", "url"): "ftp://api.example.invalid/send",
    ("accengage", "login"): "team@example.com",
    ("accengage", "password"): "hunter2",
    ("apps",): "[flights-ios]",
    ("apps", "*"): "ios",
    ("apps", "*", "partner"): "[1, 2]",
    ("apps", "*", "platform"): "windows",
    ("timezone",): "Mars/Olympus_Mons",
    ("device_fields",): "memberId",
    ("languages",): "{en: 1}",
    ("button_templates",): "[category_name]",
    ("button_templates", "*"): "9",
    ("store",): "mysql://db/pushrules",
    ("listen",): "127.0.0.1:99999",
    ("intake_token",): "s3cret",
    ("dispatch",): "fast",
    ("dispatch", "concurrency"): "0",
    ("dispatch", "rate_per_second"): "-5",
    ("dispatch", "max_attempts"): "0",
    ("dispatch", "timeout"): "1000d",
    ("dispatch", "on_unknown_outcome"): "guess",
    ("dispatch", "transport"): "curl",
    ("intake",): "4MiB",
    ("intake", "max_body"): "100",
    ("dispatch", "poll_every"): "0s",
    ("daemon",): "slow",
    ("daemon", "watch_every"): "5ms",
    ("daemon", "watch_quiet"): "forever",
    ("daemon", "watch_max_delay"): "1h",
    ("daemon", "leadership_every"): "10",
    ("daemon", "lock_wait"): "-2s",
    ("daemon", "fire_retry"): "1m",
    ("daemon", "fold_every"): "50ms",
    ("daemon", "fire_ahead"): "never",
    ("retention",): "90d",
    ("retention", "sent"): "12h",
    ("retention", "dropped"): "never",
    ("retention", "unmatched_events"): "90",
    ("retention", "feed_keys"): "1d",
    ("retention", "marks"): "[90d]",
}

RULE = """
trigger: {event: order.shipped}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Your order {{ event.order }} is on its way"
targets:
  - memberId: "{{ event.member }}"
"""


def schema_paths(
    schema: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every key the pushrules.yaml schema knows, nested ones included ("*": any name)."""
    for key, rules in schema.items():
        path = (*prefix, key)
        yield path
        if rules.get("type") == "dict" and isinstance(rules.get("schema"), Mapping):
            yield from schema_paths(rules["schema"], path)
        values = rules.get("valuesrules")
        if isinstance(values, Mapping):
            yield (*path, "*")
            if isinstance(values.get("schema"), Mapping):
                yield from schema_paths(values["schema"], (*path, "*"))


def file_path(path: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(NAMES[path[i - 1]] if part == "*" else part for i, part in enumerate(path))


def config_with(path: tuple[str, ...], bad: str, store: Path, port: int) -> tuple[str, int]:
    """pushrules.yaml with ``bad`` at ``path`` (its block dropped); the text and that line."""
    where = file_path(path)
    lines, line_number = [], 0
    for at, text in LINES:
        if at[: len(where)] == where and len(at) > len(where):
            continue
        if at == where:
            key = text.split(":")[0]
            text = f"{key}: {bad}"
            line_number = len(lines) + 1
        lines.append(text.replace("STORE", str(store)).replace("PORT", str(port)))
    assert line_number, path
    return "\n".join(lines) + "\n", line_number


def test_every_key_of_the_schema_has_a_bad_value_here() -> None:
    assert set(schema_paths(PROJECT)) == set(BAD)


def test_the_good_configuration_is_clean(tmp_path: Path) -> None:
    root = _project(tmp_path, None)
    assert main(["validate", str(root)]) == 0


def _project(tmp_path: Path, path: tuple[str, ...] | None) -> Path:
    name = "good" if path is None else "-".join(p.strip("*") or "any" for p in path)
    root = tmp_path / name
    (root / "rules").mkdir(parents=True)
    text, _ = config_with(path or ("timezone",), "UTC", tmp_path / f"{name}.db", free_port())
    if path is not None:
        text, _ = config_with(path, BAD[path], tmp_path / f"{name}.db", free_port())
    (root / "pushrules.yaml").write_text(text)
    write_rule(root, "shipped", RULE)
    return root


@pytest.mark.parametrize("path", list(BAD), ids=lambda p: ".".join(p))
def test_a_bad_value_is_a_problem_on_its_line_and_no_command_crashes(
    path: tuple[str, ...],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _project(tmp_path, path)
    _, line = config_with(path, BAD[path], tmp_path / "x.db", 1)
    monkeypatch.setenv("ACCENGAGE_LOGIN", "team@example.com")
    monkeypatch.setenv("ACCENGAGE_PASSWORD", "pw")
    assert main(["validate", str(root), "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    lines = [
        (p["line"], p["severity"]) for p in report["problems"] if p["file"] == "pushrules.yaml"
    ]
    assert (line, "error") in lines, report

    event = tmp_path / "event.json"
    event.write_text('{"order": "A1", "member": "765c8"}')
    for command in (["send", "shipped", "--event", str(event)], ["next"], ["history"]):
        code = main([*command, "--project", str(root)])  # an exception fails the test
        err = capsys.readouterr().err
        assert code in (1, 2) and "pushrules.yaml" in err, (command, code, err)

    # ``run`` in this process (a subprocess each costs more than the rest of the test): an
    # exception fails the test as above, and a daemon that started anyway ends in its thread,
    # where it cannot install its signal handlers.
    for name in [n for n in os.environ if n.startswith("PUSHRULES_")]:
        monkeypatch.delenv(name)
    code, err = run_in_thread(["run", "--project", str(root)], capsys)
    assert code == 1, err
    assert "Traceback" not in err
    assert f"pushrules.yaml:{line}:" in err, err


def run_in_thread(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[Any, str]:
    """``main(args)``'s result (or the exception it raised) and its stderr; the logging set
    up by ``run`` is put back afterwards, so later tests log as before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(main(args))
        except BaseException as exc:  # reported through the result, asserted by the caller
            result.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    try:
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "run did not refuse to start"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, was in levels.items():
            logging.getLogger(name).setLevel(was)
    return result[0], capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["history"], ["pause", "shipped"], ["send", "shipped", "--event", "EVENT"]]
)
def test_an_unreachable_store_is_a_message_not_a_traceback(
    command: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = _project(tmp_path, None)
    config = root / "pushrules.yaml"
    unreachable = f"postgresql+psycopg://pushrules:hunter2@127.0.0.1:{free_port()}/nowhere"
    text = "\n".join(
        f"store: {unreachable}" if line.startswith("store:") else line
        for line in config.read_text().splitlines()
    )
    config.write_text(text + "\n")
    monkeypatch.setenv("ACCENGAGE_LOGIN", "team@example.com")
    monkeypatch.setenv("ACCENGAGE_PASSWORD", "pw")
    event = tmp_path / "event.json"
    event.write_text('{"order": "A1", "member": "765c8"}')
    args = [str(event) if a == "EVENT" else a for a in command]
    assert main([*args, "--project", str(root)]) == 1
    err = capsys.readouterr().err
    assert "the store (store: in pushrules.yaml) cannot be used" in err, err
    assert "hunter2" not in err


@pytest.mark.parametrize(
    "url",
    [
        "https://ops:Pr0dPass@api.example.invalid/sendInstantMessage.php",
        "https://ops@api.example.invalid/sendInstantMessage.php",  # sent as HTTP Basic auth
    ],
)
def test_a_user_or_password_in_the_accengage_url_is_an_error_that_hides_it(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _project(tmp_path, None)
    text, line = config_with(("accengage", "url"), url, tmp_path / "x.db", 1)
    (root / "pushrules.yaml").write_text(text)
    assert main(["validate", str(root)]) == 1
    out = capsys.readouterr()
    assert f"pushrules.yaml:{line}:" in out.out + out.err
    assert "accengage.login" in out.out + out.err
    assert "Pr0dPass" not in out.out + out.err
    event = tmp_path / "event.json"
    event.write_text('{"order": "A1", "member": "765c8"}')
    assert main(["compile", "shipped", "--event", str(event), "--project", str(root)]) != 0
    assert "Pr0dPass" not in "".join(capsys.readouterr())


def test_a_url_with_an_at_sign_after_its_host_is_fine(tmp_path: Path) -> None:
    root = _project(tmp_path, None)
    url = "https://api.example.invalid?team=a@b"
    text, _ = config_with(("accengage", "url"), url, tmp_path / "x.db", 1)
    (root / "pushrules.yaml").write_text(text)
    assert main(["validate", str(root)]) == 0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://ops:Pr0dPass@db/pushrules",
        "postgresql+psycopg://ops@db/pushrules?sslmode=require&password=Pr0dPass",  # libpq's form
    ],
)
def test_a_password_in_the_store_url_is_a_warning_that_hides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    root = _project(tmp_path, None)
    text, line = config_with(("store",), url, root, 1)
    (root / "pushrules.yaml").write_text(text)
    assert main(["validate", str(root)]) == 0  # a warning: the daemon runs on it as it did
    out = "".join(capsys.readouterr())
    assert f"pushrules.yaml:{line}:" in out and "PGPASSWORD" in out
    assert "Pr0dPass" not in out
