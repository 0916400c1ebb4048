"""Compiling rules into the exact requests Accengage expects."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.render.compiler import (
    STEP_REQUESTS,
    STEP_TARGETS,
    CompileError,
    FireContext,
    compile_fire,
    compile_steps,
    passes_when,
    run_steps,
)
from engine.rules import template_bounds
from tests.helpers import REPO, load, make_project, write_rule

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
FLIGHT_EVENT = {"flightref": "EY5138", "member_id": "765c8", "first_name": "Patrick"}

# The repaired examples of ACCENGAGE_API.md, without the user object.
EXAMPLE_ONE = {
    "partner": {"id": "my_partner_id"},
    "parentMessageId": "1",
    "message": {
        "subject": "Flight canceled",
        "text": "Hi ${first_name}, the flight number ${flightref} is canceled",
        "sound": "custom",
        "soundName": "test.wav",
        "actionButtonLabel": "Ok",
        "richPushUrl": "http://www.google.com",
        "richPushOpening": "webview",
        "customParams": [
            {"key": "testKey", "value": "testValue"},
            {"key": "testKey2", "value": "testValue2"},
        ],
        "data": {"flightref": "EY5138"},
        "aps": {"alert": "Hello Sir, the flight number ${flightref} is canceled", "badge": 0},
    },
    "targets": [
        {
            "memberId": "765c8",
            "data": {"first_name": "Patrick"},
            "aps": {
                "alert": {
                    "body": "Hello ${first_name}, your flight has been canceled",
                    "action-loc-key": "OK, thank you!",
                },
                "sound": "sound.wav",
                "badge": 2,
            },
        },
        {
            "language": {"operator": "=", "value": "en"},
            "opencount": {"operator": ">", "value": "1"},
            "data": {"first_name": "John"},
        },
    ],
}

EXAMPLE_TWO = {
    "messages": [
        {
            "partner": {"id": "my_first_partner_id"},
            "parentMessageId": "1",
            "message": {"subject": "Hello", "text": "You are receiving a message"},
        },
        {
            "partner": {"id": "my_second_partner_id"},
            "parentMessageId": "2",
            "message": {"subject": "Hello", "text": "You are receiving a message"},
        },
    ],
    "targets": [
        {"language": {"operator": "=", "value": "en"}, "opencount": {"operator": ">", "value": "1"}}
    ],
}

BUTTONS = {
    "template": "category_name",
    "buttons": [
        {
            "id": 1,
            "title": "Confirm",
            "url": "http://google.fr",
            "icon": "ic_action_search",
            "action": "browser",
            "destructive": False,
            "customParams": [
                {"key": "testKey", "value": "testValue"},
                {"key": "testKey2", "value": "testValue2"},
            ],
        },
        {
            "id": 2,
            "url": "http://mobilecrm.accengage.com",
            "icon": "action_settings_light",
            "action": "webView",
        },
    ],
}


def compile_example(rule_id: str, event: dict | None) -> list[dict]:
    ruleset = load(REPO)
    rule = ruleset.rules[rule_id]
    requests = compile_fire(rule, ruleset.project, FireContext(NOW, event))
    return [r.body["sendInstantMessage"] for r in requests]


def test_example_one_compiles_to_the_documented_request() -> None:
    assert compile_example("flight-canceled", FLIGHT_EVENT) == [EXAMPLE_ONE]


def test_example_two_compiles_to_the_multi_application_form() -> None:
    assert compile_example("hello-all-apps", {}) == [EXAMPLE_TWO]


def test_example_three_adds_buttons_from_the_template() -> None:
    expected = json.loads(json.dumps(EXAMPLE_ONE))
    expected["partner"] = {"id": "my_partner_id_android"}
    expected["message"]["interactiveButtons"] = BUTTONS
    [body] = compile_example("flight-canceled-buttons", FLIGHT_EVENT)
    # The documentation's third example is the first with buttons; only the partner differs,
    # since an Accengage partner is one app on one platform and buttons' titles are Android's.
    assert body == expected
    assert json.dumps(body["message"]["interactiveButtons"]) == json.dumps(BUTTONS)


GOOD = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  subject: "{{ event.subject }}"
  text: "Hi ${first_name}"
targets:
  - memberId: 0012
    language: no
    opencount: {operator: ">", value: 1.10}
"""


def rule_from(tmp_path: Path, text: str, name: str = "r"):
    root = make_project(tmp_path / "p")
    write_rule(root, name, text)
    ruleset = load(root)
    assert ruleset.ok, ruleset.problems
    return ruleset.rules[name], ruleset.project


def test_yaml_scalars_are_sent_exactly_as_written(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, GOOD.replace("0012", "0012\n    data: {n: 1e3}"))
    [req] = compile_fire(rule, project, FireContext(NOW, {"subject": "S"}))
    target = req.body["sendInstantMessage"]["targets"][0]
    assert target["memberId"] == "0012"
    assert target["language"] == "no"
    assert target["opencount"] == {"operator": ">", "value": "1.10"}
    assert target["data"] == {"n": "1e3"}


def test_event_values_are_data_never_template_code(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, GOOD)
    [req] = compile_fire(rule, project, FireContext(NOW, {"subject": "{{ 7*7 }} {% if 1 %}x"}))
    assert req.body["sendInstantMessage"]["message"]["subject"] == "{{ 7*7 }} {% if 1 %}x"


def test_macros_in_the_rule_are_never_touched_and_event_data_forms_none(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, GOOD)
    [req] = compile_fire(rule, project, FireContext(NOW, {"subject": "${first_name}"}))
    message = req.body["sendInstantMessage"]["message"]
    assert message["text"] == "Hi ${first_name}"
    # The event's characters are kept, with a zero-width space Accengage does not read as a macro.
    assert message["subject"] == "$\u200b{first_name}"


def test_undefined_name_names_rule_field_and_name(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, GOOD)
    with pytest.raises(CompileError) as info:
        compile_fire(rule, project, FireContext(NOW, {}))
    assert info.value.rule == "r"
    assert info.value.field == "message.subject"  # where the author wrote it
    assert "subject" in info.value.message


def test_runaway_template_is_bounded(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, GOOD.replace("{{ event.subject }}", "{{ 'x' * 10**9 }}"))
    with pytest.raises(CompileError, match="limit"):
        compile_fire(rule, project, FireContext(NOW, {}))


FOR_EACH = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Hi ${first_name}, flight {{ event.flight }}"
targets:
  - for_each: "{{ event.passengers }}"
    as: p
    target:
      memberId: "{{ p.id }}"
      data: {first_name: "{{ p.name }}"}
"""


def test_for_each_targets_are_cut_into_requests_of_100(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, FOR_EACH)
    passengers = [{"id": f"m{i}", "name": f"N{i}"} for i in range(250)]
    requests = compile_fire(
        rule, project, FireContext(NOW, {"flight": "AF1", "passengers": passengers})
    )
    sizes = [len(r.body["sendInstantMessage"]["targets"]) for r in requests]
    assert sizes == [100, 100, 50]
    assert [r.chunk for r in requests] == [0, 1, 2]
    messages = {json.dumps(r.body["sendInstantMessage"]["message"]) for r in requests}
    assert len(messages) == 1
    ids = [t["memberId"] for r in requests for t in r.body["sendInstantMessage"]["targets"]]
    assert ids == [p["id"] for p in passengers]
    assert requests[2].body["sendInstantMessage"]["targets"][-1]["data"] == {"first_name": "N249"}


def test_for_each_over_nothing_sends_nothing(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, FOR_EACH)
    assert compile_fire(rule, project, FireContext(NOW, {"flight": "AF1", "passengers": []})) == []


def test_for_each_over_a_non_list_is_an_error(tmp_path: Path) -> None:
    rule, project = rule_from(tmp_path, FOR_EACH)
    with pytest.raises(CompileError, match="must give a list"):
        compile_fire(rule, project, FireContext(NOW, {"flight": "AF1", "passengers": "bob"}))


def test_when_condition(tmp_path: Path) -> None:
    rule, _ = rule_from(
        tmp_path,
        GOOD + 'when: "{{ event.delay_minutes is not defined or event.delay_minutes > 60 }}"\n',
    )
    assert passes_when(rule, FireContext(NOW, {}))
    assert passes_when(rule, FireContext(NOW, {"delay_minutes": 90}))
    assert not passes_when(rule, FireContext(NOW, {"delay_minutes": 30}))


@pytest.mark.parametrize("word", ["false", "False", " no ", "off", "0", "null"])
def test_a_when_giving_a_text_that_reads_no_fails_the_fire_instead_of_sending(
    tmp_path: Path, word: str
) -> None:
    """Jinja holds any text but "" true: an event's "vip": "false" would have sent."""
    rule, _ = rule_from(tmp_path, GOOD + 'when: "{{ event.vip }}"\n')
    with pytest.raises(CompileError, match=r"when: it gave the text .* compare it instead"):
        passes_when(rule, FireContext(NOW, {"vip": word}))
    assert passes_when(rule, FireContext(NOW, {"vip": True}))
    assert passes_when(rule, FireContext(NOW, {"vip": "gold"}))  # a present text: true
    assert not passes_when(rule, FireContext(NOW, {"vip": False}))
    assert not passes_when(rule, FireContext(NOW, {"vip": ""}))


def test_a_when_whose_value_is_a_text_asked_for_is_not_read_as_no(tmp_path: Path) -> None:
    """`and` gives its last value: "no" here is Norwegian, which the author asked for."""
    rule, _ = rule_from(tmp_path, GOOD + 'when: "{{ event.optin and event.lang }}"\n')
    assert passes_when(rule, FireContext(NOW, {"optin": True, "lang": "no"}))


def test_now_and_vars_in_templates(tmp_path: Path) -> None:
    text = GOOD.replace("{{ event.subject }}", "{{ vars.greeting }} {{ now.strftime('%H:%M') }}")
    rule, project = rule_from(tmp_path, text + "vars: {greeting: Morning}\n")
    [req] = compile_fire(rule, project, FireContext(NOW, {}))
    assert req.body["sendInstantMessage"]["message"]["subject"] == "Morning 09:00"


def test_per_app_override_is_deep_merged(tmp_path: Path) -> None:
    text = GOOD.replace(
        '  flights-ios: {parentMessageId: "1"}',
        '  flights-ios: {parentMessageId: "1", message: {badge: "+1"}}\n'
        "  flights-android:\n"
        "    parentMessageExternalId: ext-2\n"
        "    message: {bigPicture: cat.png, data: {b: '2'}}",
    ).replace('  text: "Hi ${first_name}"', '  text: "Hi ${first_name}"\n  data: {a: "1"}')
    rule, project = rule_from(tmp_path, text)
    [req] = compile_fire(rule, project, FireContext(NOW, {"subject": "S"}))
    ios, android = req.body["sendInstantMessage"]["messages"]
    assert ios["message"]["badge"] == "+1"
    assert "bigPicture" not in ios["message"]
    assert android["parentMessageExternalId"] == "ext-2"
    assert android["message"]["data"] == {"a": "1", "b": "2"}
    assert android["message"]["bigPicture"] == "cat.png"
    assert "badge" not in android["message"]


def test_rendered_values_pass_the_api_check_before_anything_is_sent(tmp_path: Path) -> None:
    text = GOOD.replace(
        '  text: "Hi ${first_name}"', '  text: "Hi ${first_name}"\n  language: "{{ event.lang }}"'
    )
    rule, project = rule_from(tmp_path, text)
    [req] = compile_fire(rule, project, FireContext(NOW, {"subject": "S", "lang": "fr"}))
    assert req.body["sendInstantMessage"]["message"]["language"] == "fr"
    with pytest.raises(CompileError) as info:
        compile_fire(rule, project, FireContext(NOW, {"subject": "S", "lang": "de"}))
    assert info.value.code == 17


def test_render_errors_name_the_app_override_where_it_was_written(tmp_path: Path) -> None:
    text = GOOD.replace(
        '  flights-ios: {parentMessageId: "1"}',
        '  flights-ios: {parentMessageId: "1", message: {subject: "{{ event.ios_subject }}"}}',
    )
    rule, project = rule_from(tmp_path, text)
    with pytest.raises(CompileError) as info:
        compile_fire(rule, project, FireContext(NOW, {"subject": "S"}))
    assert info.value.field == "apps.flights-ios.message.subject"


def test_a_big_for_each_compiles_in_steps_to_what_compiling_at_once_gives(
    tmp_path: Path,
) -> None:
    rule, project = rule_from(tmp_path, FOR_EACH)
    passengers = [{"id": f"m{i}", "name": f"N{i}"} for i in range(1_234)]
    ctx = FireContext(NOW, {"flight": "AF1", "passengers": passengers})
    steps = compile_steps(rule, project, ctx)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            stepped = done.value
            break
        pauses += 1
    at_once = compile_fire(rule, project, ctx)
    assert [r.body for r in stepped] == [r.body for r in at_once]
    assert len(stepped) == 13
    # A pause every STEP_TARGETS targets, then every STEP_REQUESTS last checks.
    assert pauses == 1_234 // STEP_TARGETS + 13 // STEP_REQUESTS


def test_the_fire_budget_counts_its_steps_not_the_time_between_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two steps the daemon answers others on the same thread: that time is not the
    fire's. Processor time spent inside the steps still runs the budget out."""
    clock = [1000.0]
    monkeypatch.setattr(template_bounds.time, "thread_time", lambda: clock[0])
    rule, project = rule_from(tmp_path, FOR_EACH)
    people = [{"id": f"m{i}", "name": f"N{i}"} for i in range(3 * STEP_TARGETS)]
    steps = compile_steps(rule, project, FireContext(NOW, {"flight": "AF1", "passengers": people}))
    next(steps)
    clock[0] += 10 * template_bounds.FIRE_SECONDS  # others' work, between two steps
    assert run_steps(steps)  # compiled: the budget did not count it

    class Slow:
        """An item whose every read costs a second of processor time."""

        @property
        def id(self) -> str:
            clock[0] += 1.0
            return "m"

        name = "N"

    slow = {"flight": "AF1", "passengers": [Slow() for _ in range(100)]}
    with pytest.raises(CompileError, match="processor time"):
        run_steps(compile_steps(rule, project, FireContext(NOW, slow)))


@pytest.mark.parametrize(
    "when", ['{{ event["vip"] }}', "{{ event.vip | lower }}", "{{ event.vip | default('no') }}"]
)
def test_a_when_of_one_value_filtered_or_indexed_giving_no_fails_too(
    tmp_path: Path, when: str
) -> None:
    rule, _ = rule_from(tmp_path, GOOD + f"when: {json.dumps(when)}\n")
    with pytest.raises(CompileError, match="compare it instead"):
        passes_when(rule, FireContext(NOW, {"vip": "false"}))
