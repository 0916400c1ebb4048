"""rule-tests/ files as `pushrules validate` checks them: one row per mistake, with its line,
column and field, and the message an author acts on; the cases that can run still load."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.rules.loader import Loader, RuleSet
from tests.helpers import make_project, write_rule

RULE = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Hi {{ event.first_name }}"
targets:
  - memberId: "{{ event.member_id }}"
"""

POLL = """
trigger:
  poll: {url: "https://example.com/f.json", every: 5m, key: id}
apps:
  flights-android: {parentMessageId: "1"}
message:
  text: "{{ item.title }}"
targets:
  - memberId: "42"
"""

CRON = """
trigger: {cron: "0 9 * * MON"}
apps:
  flights-android: {parentMessageId: "1"}
message:
  text: Good morning
targets:
  - memberId: "42"
"""


def project(tmp_path: Path, tests: dict[str, str]) -> RuleSet:
    root = make_project(tmp_path / "p")
    write_rule(root, "canceled", RULE)
    write_rule(root, "feed", POLL)
    write_rule(root, "digest", CRON)
    (root / "rule-tests").mkdir()
    for name, text in tests.items():
        path = root / "rule-tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return Loader(root, workers=1, tests=True).load()


def case(lines: str) -> str:
    """A test of rule ``canceled`` whose first case (from line 2) is ``lines``."""
    return "cases:\n" + textwrap.indent(textwrap.dedent(lines).lstrip("\n"), "  ")


GOOD = """
- name: a push names the passenger
  event: {member_id: m1, first_name: Ana}
  expect: {requests: 1}
"""

ROWS = [
    pytest.param(
        case(GOOD.replace("expect:", "expected:")),
        (4, 5, "cases[0].expected", "'expected' is not a known field (did you mean 'expect'?)"),
        id="unknown-key",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{sent: false, because: quiet_hour}")),
        (4, 36, "cases[0].expect.because", "(did you mean 'quiet_hours'?); use one of: when"),
        id="unknown-because",
    ),
    pytest.param(
        case(GOOD + "  item: {id: 1}\n"),
        (5, 5, "cases[0].item", "an event or a feed item, not both"),
        id="event-and-item",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{}")),
        (4, 5, "cases[0].expect", "say what the fire must come to"),
        id="expects-nothing",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{requests: 1, error: undefined}")),
        (4, 27, "cases[0].expect.error", "remove requests, or the error: line"),
        id="error-and-requests",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{sent: false, requests: 2}")),
        (4, 14, "cases[0].expect.sent", "sent: false says nothing is sent"),
        id="sent-false-with-requests",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{sent: true, because: when}")),
        (4, 26, "cases[0].expect.because", "it goes with sent: false"),
        id="because-with-sent",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{requests: 2, body: [{}, {}, {}]}")),
        (4, 27, "cases[0].expect.body", "body lists 3 requests but requests: says 2"),
        id="body-list-length",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{body: {user: {login: x}}}")),
        (4, 21, "cases[0].expect.body.user", "user (the credentials) is added when sending"),
        id="body-with-user",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{body: {sendInstantMessage: {message: {}}}}")),
        (4, 21, "cases[0].expect.body.sendInstantMessage", "write its fields"),
        id="body-wrapped",
    ),
    pytest.param(
        case(GOOD.replace("{requests: 1}", "{requests: many}")),
        (4, 24, "cases[0].expect.requests", "must be a whole number"),
        id="requests-not-a-number",
    ),
    pytest.param(
        case(GOOD + '  at: "01/12/2026 10:00"\n'),
        (5, 9, "cases[0].at", "'01/12/2026 10:00' is not understood: write a local date"),
        id="bad-at",
    ),
    pytest.param(
        case(GOOD + GOOD),
        (6, 11, "cases[1].name", "another case of this file is named 'a push names the passenger'"),
        id="duplicate-name",
    ),
    pytest.param(
        case(GOOD.replace("event:", "item:")),
        (3, 5, "cases[0].item", "rule canceled is fired by an event: write event:, not item:"),
        id="item-for-an-event-rule",
    ),
    pytest.param(
        "rule: canceld\n" + case(GOOD),
        (1, 1, "rule", "no rule 'canceld' in rules/ (did you mean 'canceled'?)"),
        id="unknown-rule",
    ),
    pytest.param(
        "cases: []\n",
        (1, 1, "cases", "must not be empty"),
        id="no-cases",
    ),
    pytest.param(
        "cases:\n  - name: x\n    expect: {requests: 1\n",
        (4, 1, "", "YAML syntax"),
        id="yaml-syntax",
    ),
]


@pytest.mark.parametrize(("text", "wanted"), ROWS)
def test_each_mistake_is_one_problem_at_its_line(
    tmp_path: Path, text: str, wanted: tuple[int, int, str, str]
) -> None:
    ruleset = project(tmp_path, {"canceled.yaml": text})
    errors = [p for p in ruleset.problems if p.is_error]
    if wanted[2] == "cases[0].expected":  # misspelt: also the expect it should have been
        assert [(p.line, p.field) for p in errors] == [(2, "cases[0].expect"), (4, wanted[2])]
        errors = errors[1:]
    assert [(p.file, p.line, p.column, p.field) for p in errors] == [
        ("rule-tests/canceled.yaml", *wanted[:3])
    ], errors
    assert wanted[3] in errors[0].message, errors[0].message
    assert not ruleset.ok


def test_inputs_a_rule_never_reads_are_refused(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        {
            "feed.yaml": case(GOOD),  # an event for a feed rule
            "digest.yaml": case(GOOD),  # an event for a cron rule
        },
    )
    messages = {p.file: p.message for p in ruleset.problems}
    assert messages == {
        "rule-tests/feed.yaml": "rule feed is fired by a feed item (poll): write item:, not event:",
        "rule-tests/digest.yaml": "rule digest fires on a schedule (cron): it reads no event; "
        "remove event: (at: sets the moment it fires)",
    }


def test_a_bad_case_fails_alone_and_a_bad_file_does_not_stop_the_others(tmp_path: Path) -> None:
    bad_case = GOOD.replace("name: a push names the passenger", "name: broken").replace(
        "{requests: 1}", "{because: never}"
    )
    ruleset = project(
        tmp_path,
        {
            "canceled.yaml": case(GOOD + bad_case),
            "broken.yaml": "cases: [\n",
            "deeper/canceled-more.yaml": "rule: canceled\n" + case(GOOD),
        },
    )
    assert {p.file for p in ruleset.problems} == {
        "rule-tests/canceled.yaml",
        "rule-tests/broken.yaml",
    }
    loaded = {f.file: [c.name for c in f.cases] for f in ruleset.cases}
    assert loaded == {
        "rule-tests/canceled.yaml": ["a push names the passenger"],
        "rule-tests/deeper/canceled-more.yaml": ["a push names the passenger"],
    }
    assert ruleset.files == 1 + 3 + 3 + 3  # config, templates, rules, tests


def test_event_values_are_read_as_json_reads_them(tmp_path: Path) -> None:
    text = case(
        """
        - name: typed
          event: {a: 0012, b: no, c: "12:30", d: 12:30, e: 42, f: 4.5, g: true, h: null, i: -3}
          expect: {requests: 1}
        """
    )
    ruleset = project(tmp_path, {"canceled.yaml": text})
    [found] = ruleset.cases
    assert found.cases[0].event == {
        "a": "0012",
        "b": "no",
        "c": "12:30",
        "d": "12:30",
        "e": 42,
        "f": 4.5,
        "g": True,
        "h": None,
        "i": -3,
    }


def test_the_loader_reads_tests_only_when_asked(tmp_path: Path) -> None:
    """The daemon and the firing commands never see a test file, broken or not."""
    project(tmp_path, {"canceled.yaml": "cases: [\n"})
    ruleset = Loader(tmp_path / "p", workers=1).load()
    assert ruleset.ok and ruleset.cases == ()


def test_validate_reports_test_files_like_any_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine.cli.main import main

    project(tmp_path, {"canceled.yaml": case(GOOD.replace("expect:", "expected:"))})
    assert main(["validate", str(tmp_path / "p")]) == 1
    out = capsys.readouterr().out
    assert "rule-tests/canceled.yaml:4:5: error cases[0].expected: 'expected' is not a " in out


def test_the_rule_defaults_to_the_file_stem_and_a_wrong_stem_says_how_to_fix_it(
    tmp_path: Path,
) -> None:
    ruleset = project(tmp_path, {"cancelled.yaml": case(GOOD)})
    [problem] = ruleset.problems
    assert (problem.line, problem.field) == (None, "")
    assert problem.message.startswith(
        "no rule 'cancelled' in rules/ (did you mean 'canceled'?): name the rule with rule: at "
        "the top, or name this file after it"
    )


def test_write_rule_helper_still_makes_valid_rules(tmp_path: Path) -> None:
    root = make_project(tmp_path / "q")
    write_rule(root, "canceled", RULE)
    assert Loader(root, workers=1, tests=True).load().ok
