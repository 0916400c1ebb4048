"""Event data is data: a null never becomes the text "None" or an empty target id, a ``${...}``
in data never becomes an Accengage macro, and ``compile`` says which input a rule reads."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.accengage.api import macros
from engine.cli.main import main
from engine.render.compiler import BlankTarget, CompileError, FireContext, compile_fire
from engine.rules.templating import MACRO_BREAK, RenderError, render, syntax_problem
from tests.helpers import load, make_project, write_rule

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


# --- null and empty values (issue 8, point 2) -------------------------------------------------


@pytest.mark.parametrize(
    ("template", "event", "expected"),
    [
        ("Hi {{ event.first_name }}", {"first_name": None}, "Hi "),
        ("Hi {{ event.first_name | upper }}", {"first_name": None}, "Hi "),
        ("{{ 'Hi ' ~ event.first_name }}!", {"first_name": None}, "Hi !"),
        ('Hi {{ event.first_name | default("there") }}', {"first_name": None}, "Hi there"),
        ('Hi {{ event.first_name | default("there") }}', {"first_name": ""}, "Hi there"),
        ('Hi {{ event.first_name | default("there") }}', {}, "Hi there"),
        ('Hi {{ event.first_name | d("there") }}', {"first_name": "Ann"}, "Hi Ann"),
        ("{{ event.n | default(1) }}", {"n": 0}, "0"),
        ("{{ event.n | default(1, true) }}", {"n": 0}, "1"),
    ],
)
def test_null_prints_as_empty_text_and_default_replaces_it(
    template: str, event: dict[str, Any], expected: str
) -> None:
    assert render(template, {"event": event}) == expected


RULE = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Hi ${first_name}"
targets:
  - memberId: "MEMBER"
    data: {first_name: "{{ event.first_name }}"}
"""


def rule_from(tmp_path: Path, text: str, name: str = "r") -> tuple[Any, Any]:
    root = make_project(tmp_path / "p")
    write_rule(root, name, text)
    ruleset = load(root)
    assert ruleset.ok, ruleset.problems
    return ruleset.rules[name], ruleset.project


@pytest.mark.parametrize(
    ("member", "event", "reason"),
    [
        ("{{ event.member_id }}", {"member_id": None}, "event.member_id is null"),
        ("{{ event.member_id }}", {"member_id": ""}, "event.member_id is empty"),
        ("{{ event.member_id }}", {"member_id": "  "}, "event.member_id is empty"),
        ("{{ event.member_id }}", {}, "event.member_id is missing"),
        ("m-{{ event.member_id }}", {"member_id": None}, "event.member_id is null"),
        ("{{ event.member_id | string }}", {"member_id": None}, "event.member_id is null"),
        ("{{ event.member_id | default('') }}", {"member_id": None}, "event.member_id is null"),
    ],
)
def test_a_target_id_from_null_or_empty_fails_naming_rule_field_and_event_key(
    tmp_path: Path, member: str, event: dict[str, Any], reason: str
) -> None:
    rule, project = rule_from(tmp_path, RULE.replace("MEMBER", member))
    with pytest.raises(BlankTarget) as info:
        compile_fire(rule, project, FireContext(NOW, {"first_name": "Ann", **event}))
    assert (info.value.rule, info.value.field) == ("r", "targets[0].memberId")
    assert reason in info.value.message
    assert str(info.value).startswith("rule r, targets[0].memberId: came out empty")


def test_a_criterion_value_from_null_fails_too(tmp_path: Path) -> None:
    text = RULE.replace(
        '  - memberId: "MEMBER"', '  - language: {operator: "=", value: "{{ event.lang }}"}'
    )
    rule, project = rule_from(tmp_path, text)
    with pytest.raises(BlankTarget) as info:
        compile_fire(rule, project, FireContext(NOW, {"first_name": "A", "lang": None}))
    assert info.value.field == "targets[0].language.value"


def test_a_null_first_name_is_sent_as_empty_data_not_none(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, RULE.replace("MEMBER", "{{ event.member_id }}"))
    [request] = compile_fire(
        rule, project, FireContext(NOW, {"member_id": "765c8", "first_name": None})
    )
    [target] = request.body["sendInstantMessage"]["targets"]
    assert target == {"memberId": "765c8", "data": {"first_name": ""}}


FOR_EACH = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Flight {{ event.flight }}"
targets:
  - for_each: "{{ event.passengers }}"
    as: p
    target:
      memberId: "{{ p.id }}"
"""


def test_for_each_skips_items_with_a_blank_id_and_says_how_many(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rule, project = rule_from(tmp_path, FOR_EACH)
    passengers = [{"id": "a"}, {"id": None}, {"name": "no id"}, {"id": ""}, None, {"id": "b"}]
    with caplog.at_level(logging.WARNING, logger="pushrules.compile"):
        [request] = compile_fire(
            rule, project, FireContext(NOW, {"flight": "AF1", "passengers": passengers})
        )
    ids = [t["memberId"] for t in request.body["sendInstantMessage"]["targets"]]
    assert ids == ["a", "b"]
    [record] = caplog.records
    assert record.getMessage() == (
        "rule r, targets[0].for_each: 4 of 6 for_each items skipped: their "
        "targets[0].target.memberId came out empty (the first: p.id is null)"
    )


def test_for_each_where_every_id_is_blank_fails_the_fire(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, FOR_EACH)
    with pytest.raises(CompileError) as info:
        compile_fire(rule, project, FireContext(NOW, {"flight": "F", "passengers": [{"id": None}]}))
    assert info.value.field == "targets[0].for_each"
    assert "all 1 of 1 for_each items skipped" in info.value.message


# --- ${...} in data (issue 7, point 9) ---------------------------------------------------------


def test_a_macro_in_event_data_is_sent_as_text_not_refused_or_filled(tmp_path: Path) -> None:
    """Before, ``${password}`` in an event's value became a macro: Accengage would fill it
    from the device database, or (as here, nothing filling it) refuse the whole send."""
    rule, project = rule_from(tmp_path, RULE.replace("MEMBER", "m1"))
    [request] = compile_fire(rule, project, FireContext(NOW, {"first_name": "${password}"}))
    body = request.body["sendInstantMessage"]
    assert body["targets"][0]["data"] == {"first_name": f"${MACRO_BREAK}{{password}}"}
    assert body["message"]["text"] == "Hi ${first_name}"  # the author's macro is untouched


@pytest.mark.parametrize(
    ("template", "event"),
    [
        ("{{ event.x }}", {"x": "${email}"}),
        ("${{ event.x }}", {"x": "{email}"}),  # '$' written, '{' from data
        ("{{ event.a }}{{ event.b }}", {"a": "$", "b": "{email}"}),
        ("{{ event.a ~ event.b }}", {"a": "$", "b": "{email}"}),
        ("{% set s %}{{ event.a }}{email}{% endset %}{{ s }}", {"a": "$"}),
    ],
)
def test_data_never_forms_a_macro(template: str, event: dict[str, str]) -> None:
    out = render(template, {"event": event})
    assert macros(out) == []
    assert out.replace(MACRO_BREAK, "") == "${email}"


@given(value=st.text(alphabet="${}ab \n", max_size=40))
def test_any_event_text_renders_as_itself_without_a_macro(value: str) -> None:
    out = render("Hi ${first_name}: {{ event.x }}", {"event": {"x": value}})
    assert out.replace(MACRO_BREAK, "") == f"Hi ${{first_name}}: {value}"
    assert macros(out) == ["first_name"]


# --- compile says which input a rule reads (issue 8, point 12) ------------------------------


POLL = """
trigger:
  poll: {url: "http://127.0.0.1:1/feed.json", every: 5m, items: offers, key: "{{ item.id }}"}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "{{ item.destination }}"
targets:
  - memberId: "m1"
"""


def test_compile_without_event_says_pass_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "greet", RULE.replace("MEMBER", "m1"))
    assert main(["compile", "greet", "--project", str(root)]) == 1
    assert capsys.readouterr().err.strip() == (
        "pushrules: rule greet, targets[0].data.first_name: this rule reads "
        "event.first_name: pass --event FILE"
    )


def test_compile_of_a_poll_rule_with_event_says_pass_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "offers", POLL)
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"destination": "Oslo"}))
    assert main(["compile", "offers", "--project", str(root), "--event", str(event)]) == 1
    assert capsys.readouterr().err.strip() == (
        "pushrules: rule offers, message.text: this rule reads item.destination: "
        "pass --item FILE (not --event: this rule reads a feed item)"
    )
    assert main(["compile", "offers", "--project", str(root), "--item", str(event)]) == 0
    assert '"text": "Oslo"' in capsys.readouterr().out


def test_a_top_level_name_that_is_an_event_field_suggests_event_dot_name() -> None:
    problem = syntax_problem("Hi {{ first_name }}")
    assert problem is not None and "event.first_name" in problem
    typo = syntax_problem("Hi {{ evnt.first_name }}")
    assert typo is not None and typo.endswith("(did you mean 'event'?)")
    with pytest.raises(RenderError, match=r"write event\.first_name"):
        render(
            "{% for first_name in [] %}{% endfor %}Hi {{ first_name }}",
            {"event": {"first_name": "A"}},
        )
