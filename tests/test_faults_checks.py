"""Issue 8, points 9-12: one definition of the API's rules, and problems that guide.

9: the validator, the compiler's last check and the sandbox (over HTTP) agree on button ids,
``${macros}`` and customParams. 10: a problem of the message several apps share is reported
once. 11: every independent mistake of a rule in one run, each at its own line. 12: hints that
name what the author wrote.
"""

from __future__ import annotations

import copy
import json
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.accengage import api
from engine.accengage.request_check import check_request
from engine.accengage.sandbox import RunningSandbox, SandboxConfig, start_in_thread
from engine.cli.main import main
from engine.render.compiler import CompileError, FireContext, compile_fire
from engine.rules.checks import parse_rule
from engine.rules.loader import RuleSet
from engine.rules.problems import Problem
from engine.rules.rule import Rule
from engine.rules.yaml_source import load as load_yaml
from engine.rules.yaml_source import native
from tests.helpers import REPO, examples, load, make_project, problems, write_rule

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AGREE = settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    """The repository's example project: its apps, device_fields, languages and templates."""
    return load(make_project(tmp_path_factory.mktemp("project")))


@pytest.fixture(scope="module")
def sandbox() -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxConfig()) as running:
        yield running


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


def validate(ruleset: RuleSet, text: str) -> tuple[Rule | None, list[Problem]]:
    assert ruleset.project is not None
    return parse_rule(
        "r", "rules/r.yaml", textwrap.dedent(text), ruleset.project, ruleset.fragments
    )


def error_codes(found: list[Problem]) -> set[int | None]:
    return {p.code for p in found if p.is_error}


def sandbox_code(http: httpx.Client, sandbox: RunningSandbox, body: dict[str, Any]) -> int:
    answer = http.post(sandbox.url, json=api.with_user(body, "ops@example.com", "secret"))
    return int(answer.json()["returnCode"])


def compile_code(rule: Rule, ruleset: RuleSet) -> tuple[int, list[dict[str, Any]]]:
    """0 and the bodies when the compiler's last check lets the fire through, else its code."""
    assert ruleset.project is not None
    try:
        requests = compile_fire(rule, ruleset.project, FireContext(NOW, {}))
    except CompileError as exc:
        assert exc.code is not None, exc
        return exc.code, []
    return 0, [r.body for r in requests]


def yaml_value(value: Any) -> str:
    """A value written in a rule (JSON is YAML)."""
    return json.dumps(value, ensure_ascii=False)


def as_sent(text: str) -> Any:
    """A value written in a rule, as the compiler sends it (YAML's number as a number)."""
    return native(load_yaml(f"v: {text}").data["v"])


def as_text(text: str) -> Any:
    """A value written in a rule, every scalar as its text (the compiler sends customParams'
    ``2`` as ``"2"``)."""
    return load_yaml(f"v: {text}").data["v"]


# --- 9: one definition, three agreeing users --------------------------------------------------

BUTTON_RULE = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: Your flight is canceled
  interactiveButtons:
    template: yes_no_category
    buttons:
      - {id: ID, action: close}
targets:
  - memberId: "765c8"
"""

button_ids = st.one_of(
    st.integers(-2, 4),
    st.text(alphabet="0123 a+-.²٣", max_size=3),
    st.sampled_from([True, None, 1.0, 2.5, "1e2", "01", "one", "first", ""]),
)


@AGREE
@given(button_ids)
def test_button_ids_agree(
    ruleset: RuleSet, sandbox: RunningSandbox, http: httpx.Client, ident: Any
) -> None:
    written = yaml_value(ident)
    rule, found = validate(ruleset, BUTTON_RULE.replace("ID", written))
    if rule is not None:
        code, bodies = compile_code(rule, ruleset)
        assert code == 0, (ident, code)
        assert [sandbox_code(http, sandbox, b) for b in bodies] == [0]
        return
    assert error_codes(found) == {24}, (ident, found)
    # The same rule with a good id, then the id as written: what compile would send.
    twin, _ = validate(ruleset, BUTTON_RULE.replace("ID", "1"))
    assert twin is not None
    twin.apps[0].message["interactiveButtons"]["buttons"][0]["id"] = as_sent(written)
    code, _ = compile_code(twin, ruleset)
    assert code == 24, (ident, code)
    body = {
        "sendInstantMessage": {**_good_body(ruleset), "message": _with_button(as_sent(written))}
    }
    assert sandbox_code(http, sandbox, body) == 24, ident


def _good_body(ruleset: RuleSet) -> dict[str, Any]:
    rule, _ = validate(ruleset, BUTTON_RULE.replace("ID", "1"))
    assert rule is not None
    _, [body] = compile_code(rule, ruleset)
    return body["sendInstantMessage"]


def _with_button(ident: Any) -> dict[str, Any]:
    return {
        "text": "Your flight is canceled",
        "interactiveButtons": {
            "template": "yes_no_category",
            "buttons": [{"id": ident, "action": "close"}],
        },
    }


MACRO_RULE = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: TEXT
targets:
  - memberId: "765c8"
"""

macro_texts = (
    st.lists(
        st.sampled_from(["${", "}", "first_name", "First_name", "seat", " ", "$", "{", "x"]),
        max_size=8,
    )
    .map("".join)
    .filter(lambda t: not any(m in t for m in ("{{", "{%", "{#")))
)


@AGREE
@given(macro_texts)
def test_macros_agree(
    ruleset: RuleSet, sandbox: RunningSandbox, http: httpx.Client, text: str
) -> None:
    """Device 765c8 of the sandbox holds every device field of the project, so all three
    fill exactly the project's device fields."""
    rule, found = validate(ruleset, MACRO_RULE.replace("TEXT", yaml_value(text)))
    validator = 15 if 15 in error_codes(found) else 0
    assert error_codes(found) <= {15}, found
    twin, _ = validate(ruleset, MACRO_RULE.replace("TEXT", "Hello"))
    assert twin is not None
    twin.apps[0].message["text"] = text
    code, _ = compile_code(twin, ruleset)
    body = {"sendInstantMessage": {**_good_body(ruleset), "message": {"text": text}}}
    assert (validator, code, sandbox_code(http, sandbox, body)) == (validator,) * 3, text
    assert (rule is None) == bool(validator)


PARAMS_RULE = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: Hello
  customParams: PARAMS
targets:
  - memberId: "765c8"
"""

param_values = st.one_of(st.text(alphabet="ab1", max_size=2), st.integers(0, 9), st.none())
custom_params = st.lists(
    st.dictionaries(st.sampled_from(["key", "value", "x"]), param_values, max_size=3)
    | st.sampled_from([[], "kv", 3]),
    max_size=3,
)


@AGREE
@given(custom_params)
def test_custom_params_agree(
    ruleset: RuleSet, sandbox: RunningSandbox, http: httpx.Client, params: list[Any]
) -> None:
    """The list form, as the API has it. YAML's numbers are text to the rule (``value: 2`` is
    sent as ``"2"``); anything else the validator refuses, the API refuses with the same code."""
    written = yaml_value(params)
    rule, found = validate(ruleset, PARAMS_RULE.replace("PARAMS", written))
    if rule is not None:
        code, bodies = compile_code(rule, ruleset)
        assert code == 0, (params, code)
        assert [sandbox_code(http, sandbox, b) for b in bodies] == [0]
        return
    message = {"text": "Hello", "customParams": as_text(written)}
    body = {"sendInstantMessage": {**_good_body(ruleset), "message": message}}
    answer = check_request(api.with_user(body, "login", "password"), {}, device_fields=())
    assert answer[0] in error_codes(found), (params, answer, found)
    assert sandbox_code(http, sandbox, body) == answer[0]


# --- 10: a problem of the shared message, once ------------------------------------------------

THREE_APPS = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
  news-ios: {parentMessageId: "2"}
  flights-android: {parentMessageId: "3"}
message:
  text: Hello
  language: de
  contentAvailable: true
targets:
  - memberId: "42"
"""


def test_a_shared_message_problem_is_reported_once(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "three", THREE_APPS)
    found = problems(root)
    assert [(p.line, p.code) for p in found if p.code == 17] == [(8, 17)]
    [ios_only] = [p for p in found if p.field == "message.contentAvailable"]
    # Only the Android app cannot take it; the problem names it, and is reported once.
    assert "'flights-android'" in ios_only.message
    assert "flights-ios" not in ios_only.message


def test_a_for_each_inside_a_for_each_target_is_refused_where_it_is_written(
    tmp_path: Path,
) -> None:
    """Found by the editor schema's agreement test: validate took a for_each key under a
    for_each's target (any value), which would have gone to Accengage as a criterion."""
    root = make_project(tmp_path / "p")
    text = (
        "trigger: {event: route.fare}\n"
        "apps: {flights-ios: {parentMessageId: '1'}}\n"
        "message: {text: New fare}\n"
        "targets:\n"
        "  - for_each: '{{ event.followers }}'\n"
        "    as: member\n"
        "    target:\n"
        "      memberId: '{{ member.id }}'\n"
        "      for_each: no\n"
    )
    write_rule(root, "nested", text)
    [p] = [p for p in problems(root) if p.is_error]
    assert (p.line, p.column, p.code, p.field) == (9, 7, 9, "targets[0].target.for_each")
    assert "cannot hold for_each" in p.message


def test_android_only_field_names_every_ios_app_once(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "three", THREE_APPS.replace("contentAvailable: true", "longText: Long"))
    [p] = [p for p in problems(root) if p.field == "message.longText"]
    assert "apps 'flights-ios' and 'news-ios'" in p.message


def test_github_format_posts_one_annotation_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "three", THREE_APPS.replace("  contentAvailable: true\n", ""))
    monkeypatch.chdir(root)
    assert main(["validate", ".", "--format", "github"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len([line for line in lines if line.startswith("::error")]) == 1, lines


# --- 11: every independent mistake in one run -------------------------------------------------

BASE = """
trigger: {event: flight.canceled}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: Hello
targets:
  - memberId: "42"
"""

# (rule, the (line, field) of each mistake): each mistake alone is reported at that place.
SEVERAL = [
    pytest.param(
        BASE.replace("{event: flight.canceled}", '{cron: "61 * * * *", timezone: Europe/Pariss}'),
        {(1, "trigger.cron"), (1, "trigger.timezone")},
        id="bad-timezone-and-bad-cron",
    ),
    pytest.param(
        BASE.replace("  text: Hello", "  text: Hello\n  sound: loud\n  language: de"),
        {(6, "message.sound"), (7, "message.language")},
        id="sound-and-language",
    ),
    pytest.param(
        BASE.replace("  text: Hello", "  subjet: Hi\n  text: Hello")
        .replace("flights-ios:", "flight-ios:")
        .replace("targets:", 'quiet_hours: {from: "25:00", to: "07:00"}\ntargets:'),
        {(3, "apps.flight-ios"), (5, "message.subjet"), (7, "quiet_hours.from")},
        id="unknown-field-unknown-app-bad-quiet-hours",
    ),
    pytest.param(
        BASE.replace(
            "  text: Hello",
            "  text: Hello ${seat}\n"
            "  interactiveButtons:\n"
            "    template: yes_no_category\n"
            "    buttons:\n"
            "      - {id: 1, action: browse}\n"
            "      - {id: [2]}",
        ),
        {
            (5, "message.text"),
            (9, "message.interactiveButtons.buttons[0].action"),
            (10, "message.interactiveButtons.buttons[1].id"),
        },
        id="macro-button-action-button-id",
    ),
    pytest.param(
        BASE.replace(
            '  - memberId: "42"', '  - memberId: "42"\n    opencount: {operator: "~", value: "1"}'
        ).replace("targets:", "when: event.delay > 60\nlimit: {count: 0, per: 1h}\ntargets:"),
        {(6, "when"), (7, "limit.count"), (10, "targets[0].opencount.operator")},
        id="operator-limit-when",
    ),
    pytest.param(
        BASE.replace("{event: flight.canceled}", "{every: 5 minutes, timezone: UTC+2}").replace(
            '  - memberId: "42"', '  - memberId: "42"\n    segmentId: [1]\n    nickname: x'
        ),
        {
            (1, "trigger.every"),
            (1, "trigger.timezone"),
            (8, "targets[0].segmentId"),
            (9, "targets[0].nickname"),
        },
        id="every-timezone-segment-criterion",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SEVERAL)
def test_every_independent_mistake_in_one_run(
    tmp_path: Path, text: str, expected: set[tuple[int, str]]
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", text)
    found = [(p.line, p.field) for p in problems(root, severity="error")]
    assert sorted(found) == sorted(expected), problems(root)


def _leaf_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    inner: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            inner += _leaf_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            inner += _leaf_paths(value, (*prefix, index))
    return [prefix, *inner] if prefix else inner


EXAMPLES = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "rules").glob("*.yaml"))]
DAMAGE = [None, True, -1, 2.5, "", "x", "${q}", "{{ event.x }}", [], [1], {}, {"a": "1"}]


@settings(max_examples=examples(150), deadline=None)
@given(st.data())
def test_damaged_example_rules_give_problems_never_an_exception(
    ruleset: RuleSet, data: st.DataObject
) -> None:
    """Checks now run past the shape check, on what it did not refuse: whatever the damage,
    problems come out, not an exception."""
    doc = copy.deepcopy(data.draw(st.sampled_from(EXAMPLES)))
    for _ in range(data.draw(st.integers(1, 3))):
        *parents, last = data.draw(st.sampled_from(_leaf_paths(doc)))
        node = doc
        for step in parents:
            node = node[step]
        node[last] = copy.deepcopy(data.draw(st.sampled_from(DAMAGE)))
    rule, found = validate(ruleset, yaml.safe_dump(doc))
    assert rule is not None or any(p.is_error for p in found)


# --- 12: hints that point the right way ---------------------------------------------------------


def test_misspelt_macro_points_at_the_existing_name(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", BASE.replace("text: Hello", 'text: "Hi ${First_name}"'))
    [p] = problems(root)
    assert (p.line, p.code) == (5, 15)
    assert "did you mean ${first_name}?" in p.message
    assert "device_fields" not in p.message


def test_misspelt_macro_in_a_target_alert_points_at_its_data(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    target = (
        '  - memberId: "42"\n    data: {seat_number: 12A}\n    aps: {alert: "Seat ${seat_numbr}"}'
    )
    write_rule(root, "r", BASE.replace('  - memberId: "42"', target))
    [p] = problems(root)
    assert (p.line, p.code) == (9, 15)
    assert "did you mean ${seat_number}?" in p.message


def test_unfillable_macro_without_a_close_name_keeps_the_advice(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", BASE.replace("text: Hello", 'text: "Seat ${seat}"'))
    [p] = problems(root)
    assert "add seat to the message's data" in p.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("when: {{ event.delay > 60 }}", 'write when: "{{ event.delay > 60 }}"'),
        ("description: {{ event.id }}", 'write description: "{{ event.id }}"'),
    ],
)
def test_unquoted_jinja_hint_shows_the_authors_own_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", BASE.replace("targets:", f"{line}\ntargets:"))
    [p] = problems(root)
    assert p.line == 6
    assert expected in p.message
    assert "memberId" not in p.message


def test_unquoted_jinja_in_a_target_shows_its_criterion(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", BASE.replace('memberId: "42"', "language: {{ event.lang }}"))
    [p] = problems(root)
    assert 'write language: "{{ event.lang }}"' in p.message
