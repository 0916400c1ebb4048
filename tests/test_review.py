"""Rule tests run: each case decided as a real fire is, judged against what it expects, and
each failing alone; subset matching of request bodies; the reports."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.outbox.firing import fire
from engine.outbox.store import Store
from engine.render.compiler import FireContext
from engine.review import report
from engine.review.runner import CaseResult, load_project_cases, run_case, run_cases
from engine.review.subset import compare
from engine.rules.loader import RuleSet
from engine.rules.schedule import parse_timezone
from tests.helpers import make_project, write_rule

RULE = """
trigger: {event: flight.canceled}
when: "{{ event.delay is not defined or event.delay > 60 }}"
quiet_hours: {from: "21:00", to: "07:00", then: defer}
apps:
  flights-android: {parentMessageId: "1"}
message:
  subject: Flight canceled
  text: "Hi ${first_name}, flight {{ event.flightref }} is canceled"
  data: {flightref: "{{ event.flightref }}"}
targets:
  - for_each: "{{ event.passengers }}"
    as: p
    target:
      memberId: "{{ p.id }}"
      data: {first_name: "{{ p.name }}"}
"""

EVENT = "{flightref: EY1, passengers: [{id: m1, name: Ana}, {id: m2, name: Ben}]}"


def project(tmp_path: Path, cases: str, rule: str = RULE) -> RuleSet:
    root = make_project(tmp_path / "p")
    write_rule(root, "canceled", rule)
    (root / "rule-tests").mkdir(exist_ok=True)
    (root / "rule-tests" / "canceled.yaml").write_text(
        "cases:\n" + textwrap.indent(textwrap.dedent(cases).lstrip("\n"), "  ")
    )
    ruleset = load_project_cases(root)
    assert ruleset.ok, ruleset.problems
    return ruleset


def results(ruleset: RuleSet) -> dict[str, CaseResult]:
    return {r.case.name: r for _, rs in run_cases(ruleset) for r in rs}


def test_every_expectation_of_the_format_holds_when_it_should(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        f"""
        - name: sent by day
          event: {EVENT}
          at: "2026-12-01 10:00"
          expect:
            requests: 1
            body:
              message: {{subject: Flight canceled, data: {{flightref: EY1}}}}
              targets: [{{memberId: m1, data: {{first_name: Ana}}}}, {{memberId: m2}}]
        - name: deferred at night
          event: {EVENT}
          at: "2026-12-01 23:30"
          expect: {{sent: false, because: quiet_hours}}
        - name: a short delay is filtered
          event: {{flightref: EY1, delay: 30, passengers: []}}
          expect: {{sent: false, because: when}}
        - name: nobody aboard
          event: {{flightref: EY1, passengers: []}}
          expect: {{sent: false, because: no_targets}}
        - name: requests 0 means nothing sent
          event: {{flightref: EY1, passengers: []}}
          expect: {{requests: 0}}
        - name: a missing flight number fails
          event: {{passengers: [{{id: m1, name: Ana}}]}}
          expect: {{error: event.flightref is undefined}}
        """,
    )
    found = results(ruleset)
    assert {name: r.status for name, r in found.items()} == dict.fromkeys(found, "passed")
    night = found["deferred at night"].fired
    assert night is not None and night.because == "quiet_hours"
    # What quiet hours hold back is compiled all the same, for a reviewer to see.
    assert night.bodies[0]["targets"][0]["memberId"] == "m1"


def test_each_expectation_fails_when_the_fire_differs(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        f"""
        - name: wrong subject
          event: {EVENT}
          expect:
            body: {{message: {{subject: Flight cancelled}}}}
        - name: expects night but it is day
          event: {EVENT}
          expect: {{sent: false, because: quiet_hours}}
        - name: wrong reason
          event: {{flightref: EY1, passengers: []}}
          expect: {{sent: false, because: when}}
        - name: wrong count
          event: {EVENT}
          expect: {{requests: 2}}
        - name: expects an error that does not come
          event: {EVENT}
          expect: {{error: undefined}}
        - name: another error
          event: {{passengers: []}}
          expect: {{error: "is null"}}
        - name: fails unexpectedly
          event: {{passengers: []}}
          expect: {{requests: 1}}
        - name: expects a push at night
          event: {EVENT}
          at: "2026-12-01 23:30"
          expect: {{requests: 1}}
        - name: expects a push for a short delay
          event: {{flightref: EY1, delay: 30, passengers: []}}
          expect: {{requests: 1}}
        """,
    )
    found = results(ruleset)
    assert all(r.status == "failed" for r in found.values()), found
    messages = {name: r.failures[0].mismatches[0] for name, r in found.items()}
    subject = messages["wrong subject"]
    assert (subject.field, subject.line, subject.column) == ("expect.body.message.subject", 5, 33)
    assert subject.message == (
        'expected "Flight cancelled", got "Flight canceled" (request 1 of 1)'
    )
    assert messages["expects night but it is day"].message == (
        "expected nothing to be sent at 2026-01-05T12:00+01:00, but it sends 1 request"
    )
    assert messages["wrong reason"].message.startswith(
        "expected nothing sent because of when, and nothing is sent: the targets expanded"
    )
    assert messages["wrong count"].message == (
        "expected 2 requests, the fire sends 1 (targets per request: 2)"
    )
    assert "but it sends 1 request" in messages["expects an error that does not come"].message
    assert messages["another error"].message.startswith("the error does not contain 'is null'")
    assert messages["fails unexpectedly"].message.startswith(
        "the fire fails: rule canceled, message.text: event.flightref is undefined"
    )
    # Why nothing is sent names what decided it.
    assert messages["expects a push at night"].message == (
        "expected a push at 2026-12-01T23:30+01:00, but nothing is sent: 23:30 is in the quiet "
        "hours (21:00 to 07:00): it waits until 2026-12-02T07:00+01:00"
    )
    assert messages["expects a push for a short delay"].message.endswith(
        "nothing is sent: `when` is false: {{ event.delay is not defined or event.delay > 60 }} "
        "with event.delay = 30"
    )
    diff = found["wrong subject"].failures[0]
    assert diff.expected == {"message": {"subject": "Flight cancelled"}}
    assert diff.actual == {"message": {"subject": "Flight canceled"}}


def test_a_case_decides_as_a_real_fire_does(tmp_path: Path) -> None:
    """The runner takes the fire's own decision: the same rule and inputs, through the store's
    path, come to the same outcome."""
    ruleset = project(
        tmp_path,
        f"""
        - name: day
          event: {EVENT}
          expect: {{requests: 1}}
        - name: night
          event: {EVENT}
          at: "2026-12-01 23:30"
          expect: {{sent: false}}
        - name: filtered
          event: {{flightref: EY1, delay: 5, passengers: []}}
          expect: {{sent: false}}
        - name: nobody
          event: {{flightref: EY1, passengers: []}}
          expect: {{sent: false}}
        - name: broken
          event: {{passengers: []}}
          expect: {{error: undefined}}
        """,
    )
    assert ruleset.project is not None
    rule = ruleset.rules["canceled"]
    tz = parse_timezone(rule.timezone)
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        for result in results(ruleset).values():
            assert result.passed, result
            case, fired = result.case, result.fired
            assert fired is not None
            at = case.moment(tz)
            context = FireContext(now=at, event=case.event, item=case.item)
            real = fire(store, ruleset.project, rule, context, case.name, now=at)
            wanted = {
                "day": "queued",
                "night": "queued",
                "filtered": "filtered",
                "nobody": "empty",
                "broken": "failed",
            }[case.name]
            assert real.status == wanted
            assert (real.not_before is not None) == (fired.because == "quiet_hours")
            if real.status == "failed":
                assert real.detail == fired.error


def test_a_crashing_case_fails_alone_with_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ruleset = project(
        tmp_path,
        f"""
        - name: crashes
          event: {{flightref: BOOM, passengers: [{{id: m1, name: Ana}}]}}
          expect: {{requests: 1}}
        - name: judging crashes
          event: {{flightref: JUDGE, passengers: [{{id: m1, name: Ana}}]}}
          expect: {{requests: 1}}
        - name: fine
          event: {EVENT}
          expect: {{requests: 1}}
        """,
    )
    from engine.outbox import firing
    from engine.review import runner

    real_compile, real_judge = firing.compile_steps, runner.judge

    def compile_steps(rule, project, ctx, **kw):  # type: ignore[no-untyped-def]
        if ctx.event and ctx.event.get("flightref") == "BOOM":
            raise RuntimeError("boom")
        return real_compile(rule, project, ctx, **kw)

    def judge(case, fired):  # type: ignore[no-untyped-def]
        if case.name == "judging crashes":
            raise KeyError("oops")
        return real_judge(case, fired)

    monkeypatch.setattr(firing, "compile_steps", compile_steps)
    monkeypatch.setattr(runner, "judge", judge)
    found = results(ruleset)
    assert found["fine"].passed
    crashed = found["crashes"]
    assert crashed.status == "failed"
    assert "rendering failed: RuntimeError: boom" in crashed.failures[0].mismatches[0].message
    assert found["judging crashes"].status == "not_run"
    assert found["judging crashes"].reason == "the case could not run: KeyError: 'oops'"


def test_a_case_of_a_broken_rule_says_so_and_does_not_run(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "canceled", RULE.replace("subject:", "subjet:"))
    (root / "rule-tests").mkdir()
    (root / "rule-tests" / "canceled.yaml").write_text(
        "cases:\n  - name: x\n    expect: {requests: 1}\n"
    )
    ruleset = load_project_cases(root)
    [(_, [result])] = run_cases(ruleset)
    assert result.status == "not_run"
    assert result.reason == (
        "rule canceled has errors: fix rules/canceled.yaml first (see pushrules validate)"
    )


def test_a_mapping_body_holds_for_every_request_and_a_list_request_by_request(
    tmp_path: Path,
) -> None:
    passengers = ", ".join(f"{{id: m{i}, name: P{i}}}" for i in range(150))
    ruleset = project(
        tmp_path,
        f"""
        - name: every request says canceled
          event: {{flightref: EY1, passengers: [{passengers}]}}
          expect:
            requests: 2
            body: {{message: {{subject: Flight canceled}}}}
        - name: every request says it wrong
          event: {{flightref: EY1, passengers: [{passengers}]}}
          expect:
            body: {{message: {{subject: Flight cancelled}}}}
        - name: request by request
          event: {{flightref: EY1, passengers: [{passengers}]}}
          expect:
            body:
              - {{targets: [{", ".join(f"{{memberId: m{i}}}" for i in range(100))}]}}
              - {{message: {{subject: Flight canceled}}}}
        """,
    )
    found = results(ruleset)
    assert found["every request says canceled"].passed
    wrong = found["every request says it wrong"]
    assert len(wrong.failures) == 1  # the same mismatch in both requests is said once
    assert wrong.failures[0].label == "each of the 2 requests"
    assert found["request by request"].passed


@pytest.mark.parametrize(
    ("expected", "actual", "matches"),
    [
        ("0", 0, True),
        ("765c8", "765c8", True),
        ("true", True, True),
        ("1.50", 1.5, True),
        ("1", "1.0", False),
        (None, None, True),
        (None, "", False),
        ("x", {"x": 1}, False),
        ({"a": "1"}, {"a": "1", "b": "2"}, True),
        ({"a": "1", "c": "3"}, {"a": "1", "b": "2"}, False),
        (["1", "2"], ["1", "2"], True),
        (["1"], ["1", "2"], False),
        ([{"k": "v"}], [{"k": "v", "other": "x"}], True),
    ],
)
def test_subset_matching(expected: object, actual: object, matches: bool) -> None:
    assert compare(expected, actual).matches is matches


def test_subset_mismatches_say_where_and_what() -> None:
    result = compare(
        {"message": {"subjet": "x", "text": "a long text that goes on and on, then: yes"}},
        {"message": {"subject": "x", "text": "a long text that goes on and on, then: no"}},
    )
    assert [(d.path, d.message) for d in result.differences] == [
        (
            ("message", "subjet"),
            "'message' has no field 'subjet' (did you mean 'subject'?); it has: subject, text",
        ),
        (
            ("message", "text"),
            'expected "a long text that goes on and on, then: yes", got "a long text that goes '
            'on and on, then: no" (from character 40: "yes" against "no")',
        ),
    ]
    # The view of the request holds only what the test names.
    assert result.actual == {"message": {"text": "a long text that goes on and on, then: no"}}


def test_an_invisible_character_is_shown_in_the_diff(tmp_path: Path) -> None:
    """A name from the event that looks like a macro is sent with a zero-width space: the
    diff must not show two lines that look the same."""
    ruleset = project(
        tmp_path,
        """
        - name: a macro-looking name
          event: {flightref: "${x}", passengers: [{id: m1, name: Ana}]}
          expect:
            body: {message: {data: {flightref: "${x}"}}}
        """,
    )
    [result] = results(ruleset).values()
    text = "\n".join(report.format_case(result))
    assert '-       "flightref": "${x}"' in text
    assert '+       "flightref": "$\\u200b{x}"' in text


def test_text_report_names_file_line_and_shows_the_diff(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        f"""
        - name: wrong subject
          event: {EVENT}
          expect:
            body: {{message: {{subject: Flight cancelled}}}}
        """,
    )
    run = run_cases(ruleset)
    text = report.format_run_text(run, [])
    assert text.splitlines() == [
        "FAIL  rule-tests/canceled.yaml (1 of 1 cases)",
        'rule-tests/canceled.yaml:2: FAIL "wrong subject" (rule canceled, at '
        "2026-01-05T12:00+01:00)",
        '  rule-tests/canceled.yaml:5:33: expect.body.message.subject: expected "Flight '
        'cancelled", got "Flight canceled" (request 1 of 1)',
        "    - expected (what the test says)",
        "    + actual (request 1 of 1: the same fields)",
        "      {",
        '        "message": {',
        '    -     "subject": "Flight cancelled"',
        '    +     "subject": "Flight canceled"',
        "        }",
        "      }",
    ]
    assert report.summary(run, []) == "1 case in 1 file: 0 passed, 1 failed"


def test_junit_is_valid_escaped_xml_one_suite_per_file(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        f"""
        - name: 'passes <&> "quoted"'
          event: {EVENT}
          expect: {{requests: 1}}
        - name: "fails \\x01"
          event: {{flightref: "a<b>", passengers: [{{id: m1, name: Ana}}]}}
          expect: {{body: {{message: {{data: {{flightref: x}}}}}}}}
        """,
    )
    run = run_cases(ruleset)
    broken = Path("rule-tests/other.yaml")
    from engine.rules.problems import Problem

    problems = [Problem(str(broken), 1, 2, "", None, "error", "YAML syntax: <bad> & worse")]
    xml = report.format_run_junit(run, problems)
    root = ET.fromstring(xml)  # parses: valid XML
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("3", "1", "1")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"pushrules validate", "rule-tests/canceled.yaml"}
    cases = suites["rule-tests/canceled.yaml"].findall("testcase")
    assert [c.get("name") for c in cases] == ['passes <&> "quoted"', "fails \ufffd"]
    assert cases[0].find("failure") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.text is not None
    assert failure.get("message", "").startswith("rule-tests/canceled.yaml:7:49:")
    assert '-       "flightref": "x"' in failure.text
    assert '+       "flightref": "a<b>"' in failure.text
    error = suites["pushrules validate"].find("testcase/error")
    assert error is not None and "<bad> & worse" in (error.get("message") or "")


def test_json_report_holds_outcomes_and_failures(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        f"""
        - name: at night
          event: {EVENT}
          at: "2026-12-01 23:30"
          expect: {{requests: 1}}
        """,
    )
    data = json.loads(report.format_run_json(run_cases(ruleset), []))
    assert data["ok"] is False
    assert data["summary"] == {"files": 1, "cases": 1, "passed": 0, "failed": 1, "not_run": 0}
    [case] = data["files"][0]["cases"]
    assert case["outcome"]["because"] == "quiet_hours"
    assert case["outcome"]["requests"][0]["targets"][1] == {
        "memberId": "m2",
        "data": {"first_name": "Ben"},
    }
    [failure] = case["failures"]
    assert failure["expected"] == {"requests": 1}
    assert failure["actual"] == {"requests": 0, "sent": False, "because": "quiet_hours"}
    assert failure["mismatches"][0]["line"] == 5


def test_run_case_is_usable_alone(tmp_path: Path) -> None:
    """The API another review tool builds on: one case, one result with the bodies."""
    ruleset = project(
        tmp_path,
        f"""
        - name: one
          event: {EVENT}
          expect: {{requests: 1}}
        """,
    )
    [found] = ruleset.cases
    result = run_case(ruleset, found.cases[0])
    assert result.passed and result.fired is not None
    assert result.fired.sent and result.fired.error is None
    assert result.fired.at == datetime(2026, 1, 5, 11, 0, tzinfo=UTC)
    assert result.fired.bodies[0]["partner"] == {"id": "my_partner_id_android"}


def test_requests_that_differ_in_many_ways_are_shown_three_at_a_time(tmp_path: Path) -> None:
    passengers = ", ".join(f"{{id: m{i}, name: P{i}}}" for i in range(550))
    nobody = ", ".join(["{memberId: nobody}"] * 100)
    ruleset = project(
        tmp_path,
        f"""
        - name: every target differs
          event: {{flightref: EY1, passengers: [{passengers}]}}
          expect:
            body: {{targets: [{nobody}]}}
        """,
    )
    [result] = results(ruleset).values()
    assert [f.label for f in result.failures] == [
        "request 1 of 6",
        "request 2 of 6",
        "request 3 of 6",
    ]
    first = [m.message for m in result.failures[0].mismatches]
    assert len(first) == 11
    assert first[0] == 'expected "nobody", got "m0" (request 1 of 6)'
    assert first[-1] == "and 90 more differences (request 1 of 6): see the diff"
    last = result.failures[-1].mismatches[-1]
    assert (last.field, last.message) == (
        "expect.body",
        "and 3 more requests differ in other ways",
    )


def test_a_body_list_points_at_its_own_element(tmp_path: Path) -> None:
    ruleset = project(
        tmp_path,
        """
        - name: a list of expectations, request by request
          event: {flightref: EY1, passengers: [{id: a, name: A}]}
          expect:
            body: [{targets: [{memberId: b}]}]
        """,
    )
    [result] = results(ruleset).values()
    mismatch = result.failures[0].mismatches[0]
    assert (mismatch.field, mismatch.line) == ("expect.body[0].targets[0].memberId", 5)
