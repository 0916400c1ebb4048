"""`pushrules test` and `pushrules explain` as authors and CI use them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from engine.cli.main import main
from engine.outbox.store import Store
from tests.helpers import REPO, body, make_project, write_rule

PRICE_DROP = (REPO / "rules" / "price-drop.yaml").read_text()


def test_the_repository_rule_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    """What CI runs: every example rule has tests, and they pass."""
    assert main(["test", str(REPO)]) == 0
    captured = capsys.readouterr()
    tested = {Path(line.split()[1]).stem for line in captured.out.splitlines()}
    assert tested == {p.stem for p in (REPO / "rules").glob("*.yaml")}
    assert captured.err.strip().endswith("passed") and "failed" not in captured.err


def test_the_repository_rule_tests_as_junit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", "--project", str(REPO), "--format", "junit"]) == 0
    root = ET.fromstring(capsys.readouterr().out)
    assert root.get("failures") == "0" and root.get("errors") == "0"
    assert len(root.findall("testsuite")) == len(list((REPO / "rule-tests").glob("*.yaml")))


def broken_project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "p")
    write_rule(root, "price-drop", PRICE_DROP)
    (root / "rule-tests").mkdir()
    (root / "rule-tests" / "price-drop.yaml").write_text(
        textwrap.dedent(
            """\
            cases:
              - name: a cheap fare is pushed
                item: {id: o1, destination: Rome, price: 79, followers: [{id: m1, first_name: A}]}
                expect:
                  body:
                    message: {subject: Rome from 79 euros}
              - name: an expensive fare is not
                item: {id: o2, destination: Rome, price: 120, followers: []}
                expect: {sent: false, because: when}
            """
        )
    )
    return root


def test_a_failing_case_shows_file_line_expected_and_actual(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = broken_project(tmp_path)
    assert main(["test", str(root)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "FAIL  rule-tests/price-drop.yaml (1 of 2 cases)",
        'rule-tests/price-drop.yaml:2: FAIL "a cheap fare is pushed" (rule price-drop, at '
        "2026-01-05T12:00+01:00)",
        '  rule-tests/price-drop.yaml:6:28: expect.body.message.subject: expected "Rome from '
        '79 euros", got "Rome from 79 EUR" (request 1 of 1)',
        "    - expected (what the test says)",
        "    + actual (request 1 of 1: the same fields)",
        "      {",
        '        "message": {',
        '    -     "subject": "Rome from 79 euros"',
        '    +     "subject": "Rome from 79 EUR"',
        "        }",
        "      }",
    ]
    assert captured.err.strip() == "2 cases in 1 file: 1 passed, 1 failed"


def test_rule_filter_json_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = broken_project(tmp_path)
    assert main(["test", str(root), "--rule", "price-drop", "--format", "json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in data["files"][0]["cases"]] == ["failed", "passed"]
    assert main(["test", str(root), "--rule", "price-dorp"]) == 1
    assert "no tests of rule 'price-dorp' in rule-tests/ (did you mean 'price-drop'?)" in (
        capsys.readouterr().err
    )
    assert main(["test", str(tmp_path / "nowhere")]) == 2
    assert main(["test", str(root), "--project", str(tmp_path)]) == 2


def test_a_broken_test_file_is_a_problem_and_the_others_still_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = broken_project(tmp_path)
    (root / "rule-tests" / "price-drop.yaml").write_text(
        "cases:\n  - name: ok\n    item: {id: o2, destination: R, price: 120, followers: []}\n"
        "    expect: {sent: false, because: when}\n"
    )
    (root / "rule-tests" / "zz.yaml").write_text("rule: price-drop\ncases: [\n")
    assert main(["test", str(root)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("rule-tests/zz.yaml:3:1: error YAML syntax")
    assert "ok    rule-tests/price-drop.yaml (1 case)" in captured.out
    assert captured.err.strip() == "1 case in 1 file: 1 passed, 1 problem in the project"


# --- explain ---------------------------------------------------------------------------------


def item_file(tmp_path: Path, price: int) -> str:
    path = tmp_path / f"item{price}.json"
    path.write_text(
        json.dumps(
            {
                "id": "o1",
                "destination": "Rome",
                "price": price,
                "followers": [{"id": f"m{i}", "first_name": f"P{i}"} for i in range(150)],
            }
        )
    )
    return str(path)


def test_explain_says_why_not_and_creates_no_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = broken_project(tmp_path)
    argv = ["explain", "price-drop", "--project", str(root), "--at", "2026-12-01 10:00"]
    assert main([*argv, "--item", item_file(tmp_path, 129)]) == 0
    out = capsys.readouterr().out
    assert "STOP     when:         {{ item.price < 100 }} is false" in out
    assert "item.price = 129" in out
    assert "SKIPPED  targets:      not reached: `when` is false" in out
    assert f"not checked: no outbox at {root.resolve() / 'pushrules.db'} yet" in out
    assert out.rstrip().endswith("=> not sent: `when` is false")
    assert not (root / "pushrules.db").exists()


def test_explain_reads_limit_and_pause_from_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = broken_project(tmp_path)
    assert main(["pause", "price-drop", "--project", str(root)]) == 0
    capsys.readouterr()
    argv = ["explain", "price-drop", "--project", str(root), "--item", item_file(tmp_path, 79)]
    assert main([*argv, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    steps = {s["step"]: s for s in data["steps"]}
    assert steps["limit"]["recorded"] == 0 and steps["limit"]["state"] == "ok"
    assert steps["pause"]["paused"] is True and steps["pause"]["state"] == "note"
    assert steps["targets"]["count"] == 150
    assert [s["message_bytes"] < s["limit"] for s in steps["requests"]["sizes"]] == [True, True]
    assert data["sends"] is True
    assert data["verdict"] == "sends 2 requests once the pause is lifted"


def test_explain_past_the_limit_is_held(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = broken_project(tmp_path)
    rule = root / "rules" / "price-drop.yaml"
    rule.write_text(
        PRICE_DROP.replace("limit: {count: 500, per: 1h}", "limit: {count: 1, per: 1h}")
    )
    from engine.outbox.schema import utcnow
    from engine.outbox.store import Fire

    with Store(f"sqlite:///{root / 'pushrules.db'}") as store:
        store.enqueue_many([Fire("price-drop", "k", [("https://x", body("k"))])], now=utcnow())
    argv = ["explain", "price-drop", "--project", str(root), "--item", item_file(tmp_path, 79)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "STOP     limit:        1 fire recorded in the 1h before" in out
    assert "=> not sent: past its limit, the fire (2 requests) is held for a person" in out


def test_explain_with_an_unreachable_store_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = broken_project(tmp_path)
    config = root / "pushrules.yaml"
    config.write_text(
        config.read_text().replace(
            "store: sqlite:///pushrules.db",
            "store: postgresql+psycopg://u:hunter2@127.0.0.1:1/db",
        )
    )
    argv = ["explain", "price-drop", "--project", str(root), "--item", item_file(tmp_path, 79)]
    started = time.monotonic()
    assert main(argv) == 0
    assert time.monotonic() - started < 30
    out = capsys.readouterr().out
    assert "UNKNOWN  pause:        not checked: the store postgresql+psycopg://u:********@" in out
    assert "hunter2" not in out
    assert "(limit and pause not checked: see above)" in out


def test_explain_quiet_hours_inputs_and_sizes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(
        root,
        "night",
        """
        trigger: {cron: "0 9 * * MON"}
        quiet_hours: {from: "21:00", to: "08:00", then: skip}
        apps:
          flights-android: {parentMessageId: "1"}
        message:
          text: "{{ vars.long }}"
        vars: {long: AAAA}
        targets:
          - memberId: "42"
        """,
    )
    rule = root / "rules" / "night.yaml"
    rule.write_text(rule.read_text().replace("AAAA", "A" * 4100))
    argv = ["explain", "night", "--project", str(root)]
    assert main([*argv, "--at", "2026-12-07 23:30"]) == 0
    out = capsys.readouterr().out
    assert "STOP     quiet hours:  23:30 is inside the quiet hours (21:00 to 08:00, then " in out
    assert "2026-12-07T23:30+01:00 is not one of its fire times" in out
    assert "next after 2026-12-07T23:30+01:00: 2026-12-14T09:00+01:00" in out
    assert "OVER: android refuses it" in out
    assert "=> not sent: it falls in the quiet hours, which skip it" in out
    assert main([*argv, "--at", "2026-12-07 09:00"]) == 0
    assert "2026-12-07T09:00+01:00 is one of its fire times" in capsys.readouterr().out
    assert main([*argv, "--at", "Monday"]) == 2
    assert "--at: 'Monday' is not understood" in capsys.readouterr().err


def test_explain_an_input_the_rule_does_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = broken_project(tmp_path)
    event = tmp_path / "event.json"
    event.write_text('{"price": 3}')
    assert main(["explain", "price-drop", "--project", str(root), "--event", str(event)]) == 0
    out = capsys.readouterr().out
    assert "this rule reads item.price: pass --item FILE (not --event" in out
    assert main(["explain", "nope", "--project", str(root)]) == 1
    assert "no rule 'nope' in rules/" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["test", "explain"])
def test_help_has_examples(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine", command, "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0
    assert "Examples:" in done.stdout and f"pushrules {command}" in done.stdout


def test_a_project_without_tests_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    assert main(["test", str(root)]) == 0
    assert capsys.readouterr().err.strip() == (
        "no rule tests in rule-tests/ (writing them: docs/rules.md, section 8)"
    )
