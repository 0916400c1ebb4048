"""The editor schema (``pushrules schema``) and ``pushrules validate`` agree.

Each document is read as an editor reads it (YAML 1.2) and checked with the ``jsonschema``
library against the schema made from engine/rules/schemas.py; the same text is checked by
pushrules. For every document of the corpus (the examples, docs/rules.md, the problem table of
test_problems_table.py, and rules and settings mutated by hypothesis):

- validate takes it => the JSON Schema takes it (an editor never underlines a good file);
- the Cerberus shape check refuses it => the JSON Schema refuses it;
- validate refuses it but the JSON Schema takes it => each of its errors is one that only
  pushrules can check, listed in ``PUSHRULES_ONLY`` with the reason.
"""

from __future__ import annotations

import copy
import datetime
import json
import re
import textwrap
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml as pyyaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from engine.cli.main import main
from engine.rules import schemas
from engine.rules.checks import parse_rule
from engine.rules.fragments import load_fragments
from engine.rules.json_schema import KINDS, json_schema
from engine.rules.project import Project, load_project, parse_project
from engine.rules.yaml_source import load
from tests.helpers import REPO, examples, make_project
from tests.test_problems_table import ROWS

#: What validate checks and JSON Schema cannot: (a pattern of the problem's message, why).
PUSHRULES_ONLY: list[tuple[str, str]] = [
    (r"^no app '", "app aliases are declared in pushrules.yaml, another file"),
    (r"is not a device field", "device_fields are declared in pushrules.yaml"),
    (r"cannot be filled", "${macros} are filled from data and device_fields (another file)"),
    (r"not in languages|languages of|is not one of", "languages are declared in pushrules.yaml"),
    (r"^no template '|^template '.*' has errors", "use: names a template in another file"),
    (
        r"Android only|iOS only|for (iOS|Android)|on (iOS|Android)",
        "an app's platform is in pushrules.yaml",
    ),
    (r"iOS buttons need a template", "an app's platform is in pushrules.yaml"),
    (r"is beyond template", "a category's buttons are in pushrules.yaml or Accengage's list"),
    (r"is used twice", "JSON Schema's uniqueItems compares whole buttons, not one field"),
    (r"works with one app only", "relates two sections of the rule (apps and targets)"),
    (r"cron|would never fire", "a cron expression's meaning (the schedule parser)"),
    (r"^at: ", "a date's meaning (the schedule parser)"),
    (r"Jinja|unknown name|template|undefined", "Jinja is parsed by pushrules"),
    (r"is out of range; write a duration", "a duration's bounds: its value, not its spelling"),
    (r"takes [0-9,]+ bytes", "a message's size once merged for each app"),
]

#: Where YAML 1.1 (pushrules) and YAML 1.2 (editors) read a value differently enough that the
#: two cannot agree (a quoted "yes" is text to both readers of JSON, a boolean to neither).
YAML_VERSION_SPELLINGS = re.compile(r"^(?:0o[0-7]+|\"(?:yes|no|on|off)\"|\"[0-9_:b]+\")$")


@cache
def validator(kind: str) -> Draft202012Validator:
    schema = json_schema(kind)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@lru_cache(maxsize=8)  # _readable, then schema_errors, read each generated text
def editor_view(text: str) -> Any:
    """The data an editor's YAML 1.2 reader makes of ``text`` (dates stay text: no JSON type)."""
    data = YAML(typ="safe", pure=True).load(text)
    return _jsonable(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.date | datetime.datetime):
        return str(value)
    return value


def schema_errors(kind: str, text: str) -> list[str]:
    return [e.message for e in validator(kind).iter_errors(editor_view(text))]


@cache
def example_project() -> tuple[Project, Any]:
    project, problems = load_project(REPO)
    assert project is not None, problems
    fragments, _, _ = load_fragments(REPO)
    return project, fragments


def pushrules_errors(kind: str, text: str) -> list[str]:
    """validate's errors for ``text`` as a rule of the example project, or as its settings."""
    if kind == "config":
        _, problems = parse_project(REPO, text)
    else:
        project, fragments = example_project()
        _, problems = parse_rule("r", "rules/r.yaml", text, project, fragments)
    return [p.message for p in problems if p.is_error]


def shape_errors(kind: str, text: str) -> list[str]:
    """What the Cerberus schemas alone refuse (a file YAML cannot read: nothing)."""
    loaded = load(text)
    if not isinstance(loaded.data, dict) or any(i.severity == "error" for i in loaded.issues):
        return []
    checker = schemas.PROJECT_CHECKER if kind == "config" else schemas.RULE_CHECKER
    return [e.message for e in checker.check(loaded.data) if e.kind != "other"]


def only_pushrules(message: str) -> bool:
    return any(re.search(pattern, message) for pattern, _ in PUSHRULES_ONLY)


def assert_agree(kind: str, text: str) -> None:
    ours = pushrules_errors(kind, text)
    try:
        theirs = schema_errors(kind, text)
    except YAMLError:  # the editor reports the YAML itself, before any schema
        assert ours, f"validate takes a file YAML 1.2 cannot read\n{text}"
        return
    if not ours:
        assert not theirs, f"validate takes it, the JSON Schema refuses it: {theirs}\n{text}"
        return
    shape = shape_errors(kind, text)
    assert not (shape and not theirs), (
        f"Cerberus refuses it ({shape}), JSON Schema takes it\n{text}"
    )
    if not theirs:
        missed = [m for m in ours if not only_pushrules(m)]
        assert not missed, f"JSON Schema could refuse these, and takes the file: {missed}\n{text}"


# --- the examples, the docs and the problem table ----------------------------------------------


def example_files() -> list[tuple[str, Path]]:
    found = [("config", REPO / "pushrules.yaml")]
    found += [("rule", p) for p in sorted((REPO / "rules").glob("*.yaml"))]
    found += [("template", p) for p in sorted((REPO / "templates/messages").glob("*.yaml"))]
    found += [("buttons", p) for p in sorted((REPO / "templates/buttons").glob("*.yaml"))]
    return found


@pytest.mark.parametrize(("kind", "path"), example_files(), ids=lambda v: str(v))
def test_every_example_file_passes_its_schema(kind: str, path: Path) -> None:
    assert schema_errors(kind, path.read_text()) == []


def docs_rules() -> list[Any]:
    """The rule examples of docs/rules.md: each ```yaml block whose first line names a rule."""
    text = (REPO / "docs/rules.md").read_text()
    blocks = re.findall(r"```yaml\n(# rules/([\w.-]+)\.yaml\n.*?)```", text, re.DOTALL)
    return [pytest.param(body, id=name) for body, name in blocks]


@pytest.mark.parametrize("text", docs_rules())
def test_docs_examples_agree(text: str) -> None:
    assert_agree("rule", text)


@pytest.mark.parametrize(("file", "text", "code", "line", "field"), ROWS)
def test_problem_table_agrees(file: str, text: str, code: Any, line: Any, field: Any) -> None:
    assert_agree("config" if file == "pushrules.yaml" else "rule", text)


def test_the_problem_table_has_rows_each_side() -> None:
    """The table has mistakes the JSON Schema catches and mistakes only validate can: both
    halves of the agreement are exercised."""
    caught = only = 0
    for row in ROWS:
        file, text = row.values[0], row.values[1]
        kind = "config" if file == "pushrules.yaml" else "rule"
        try:
            refused = bool(schema_errors(kind, text))
        except YAMLError:
            continue
        caught += refused
        only += not refused
    assert caught >= 10 and only >= 10


# --- generated documents -------------------------------------------------------------------------

#: Values an author might write, as YAML text (each a valid YAML value in any position).
RAW_VALUES = [
    "no",
    "yes",
    '"no"',
    "true",
    "false",
    "0012",
    '"0012"',
    "1.10",
    "12",
    "0",
    "-1",
    "1_000",
    "~",
    '""',
    "[]",
    "{}",
    "[a, b]",
    "{a: b}",
    "x",
    '"x y"',
    "15m",
    '"21:00"',
    '"25:00"',
    "1h30m",
    "1.5h",
    '"{{ event.x }}"',
    '"Hi {{ event.x }}"',
    "Europe/Paris",
    "Mars/Base",
    "default",
    "custom",
    "ios",
    '"="',
    '">="',
    '{operator: ">", value: "1"}',
    "{env: X}",
    "https://x.example/a",
    "http://x",
    "sqlite:///a.db",
    "127.0.0.1:8750",
    "webView",
    "browser",
    "defer",
    "skip",
    "record",
    "park",
    "1",
    "5",
    "300",
    '"2026-12-24 18:00"',
    '"0 9 * * MON"',
    "flight.canceled",
    "[{key: a, value: b}]",
    "{id: 1, action: close}",
    '{parentMessageId: "1"}',
    '[{memberId: "1"}]',
    '{for_each: "{{ event.p }}", target: {memberId: x}}',
]
KEYS = [
    "subject",
    "subjet",
    "badge",
    "aps",
    "for_each",
    "as",
    "target",
    "segmentId",
    "memberId",
    "then",
    "timezone",
    "every",
    "cron",
    "use",
    "x",
    "data",
    "customParams",
    "id",
    "enabled",
    "count",
    "per",
    "popup",
    "interactiveButtons",
    "message",
    "intake_token",
    "dispatch",
]

BASE_RULES = [
    (REPO / "rules" / name).read_text()
    for name in ("flight-canceled-buttons.yaml", "monday-digest.yaml", "price-drop.yaml")
] + [
    textwrap.dedent(
        """\
        description: Every switch of a rule
        enabled: true
        trigger: {every: 15m, timezone: Europe/Paris}
        when: "{{ vars.flag }}"
        vars: {flag: true}
        catch_up: 30m
        quiet_hours: {from: "21:00", to: "08:00", then: skip}
        limit: {count: 5, per: 1h}
        apps:
          flights-android:
            parentMessageExternalId: x
            message:
              popup: {okButtonLabel: OK}
              interactiveButtons:
                template: category_name
                buttons:
                  - {id: 1, action: browser, url: "https://e.example", destructive: false}
        message:
          text: Hello
          sound: default
          customParams: {a: b}
        targets:
          - segmentId: "12"
        """
    )
]
BASE_CONFIG = (REPO / "pushrules.yaml").read_text() + textwrap.dedent(
    """\
    intake_token: {file: token.txt}
    dispatch: {concurrency: 4, rate_per_second: 10, max_attempts: 5, timeout: 10s,
               on_unknown_outcome: park}
    """
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


SENTINEL = "@@raw@@"


@cache
def _parsed(base: str) -> Any:
    return pyyaml.safe_load(base)


@st.composite
def mutated(draw: st.DrawFn, base: str) -> str:
    """``base`` with one to three mistakes, or none: a value replaced, a key or item removed, a
    key added or misspelt."""
    data = copy.deepcopy(_parsed(base))  # parsed once: 11 ms a draw with PyYAML
    raws: list[str] = []
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_paths(data)))
        parent: Any = data
        for step in path[:-1]:
            parent = parent[step]
        target = parent[path[-1]] if path else data
        action = draw(st.sampled_from(["replace", "remove", "add", "rename"]))
        if action == "add" and isinstance(target, dict):
            target[draw(st.sampled_from(KEYS))] = f"{SENTINEL}{len(raws)}"
            raws.append(draw(st.sampled_from(RAW_VALUES)))
        elif not path:
            continue
        elif action == "remove":
            del parent[path[-1]]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KEYS))] = parent.pop(path[-1])
        else:
            parent[path[-1]] = f"{SENTINEL}{len(raws)}"
            raws.append(draw(st.sampled_from(RAW_VALUES)))
    text = pyyaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10_000)
    for index, raw in enumerate(raws):
        text = text.replace(f"'{SENTINEL}{index}'", raw, 1)
    return text


def _readable(text: str) -> bool:
    """Both readers take the text, with no value whose reading depends on the YAML version."""
    try:
        editor_view(text)
    except YAMLError:
        return False
    return not any(
        YAML_VERSION_SPELLINGS.match(v.strip()) for v in re.findall(r": (.*)$", text, re.M)
    )


@pytest.mark.slow
@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASE_RULES).flatmap(mutated))
def test_generated_rules_agree(text: str) -> None:
    if _readable(text):
        assert_agree("rule", text)


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(BASE_CONFIG))
def test_generated_settings_agree(text: str) -> None:
    if _readable(text):
        assert_agree("config", text)


# --- the command -----------------------------------------------------------------------------


def test_schema_prints_one_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "rule"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    sound = printed["$defs"]["message"]["properties"]["sound"]
    assert sound["enum"] == ["None", "default", "custom"]
    assert sound["title"] == "Sound"
    assert printed["additionalProperties"] is False


def test_schema_without_kind_or_out_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 2
    assert "--out" in capsys.readouterr().err


def test_schema_out_writes_every_kind(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p")
    assert main(["schema", "--out", "schemas", "--project", str(root)]) == 0
    written = sorted(p.name for p in (root / "schemas").iterdir())
    assert written == sorted(f"{kind}.json" for kind in KINDS)


def test_committed_schemas_are_current() -> None:
    """schemas/ is what the example files' modelines point at: regenerate it with
    `pushrules schema --out schemas` when engine/rules/schemas.py changes."""
    from engine.cli.author import schema_text

    for kind in KINDS:
        committed = (REPO / "schemas" / f"{kind}.json").read_text()
        assert committed == schema_text(json_schema(kind)), "run: pushrules schema --out schemas"


def test_example_files_carry_the_modeline() -> None:
    for kind, path in example_files():
        first = path.read_text().splitlines()[0]
        schema = Path(re.sub(r".*\$schema=", "", first))
        assert first.startswith("# yaml-language-server: $schema="), path
        assert (path.parent / schema).resolve() == (REPO / "schemas" / f"{kind}.json").resolve()


#: Rule-test files (rule-tests/), which the random agreement tests do not generate: each
#: line is one an author writes, and the editor must say what validate says of it.
CASE_BASE = "cases:\n  - name: a\n    event: {x: 1}\n"


@pytest.mark.parametrize(
    ("line", "valid"),
    [
        ("    expect: {sent: true}\n", True),
        ("    expect: {sent: no, because: when}\n", True),
        ("    expect: {sent: false, because: when}\n", True),
        ("    expect: {error: ''}\n", False),
        ("    expect: {error: 'template error'}\n", True),
    ],
)
def test_the_editor_schema_agrees_on_rule_test_files(line: str, valid: bool) -> None:
    from engine.rules.cases import parse_case_file

    _, problems = parse_case_file("rule-tests/t.yaml", CASE_BASE + line)
    ours = [p.message for p in problems if p.is_error]
    theirs = schema_errors("tests", CASE_BASE + line)
    assert (not ours, not theirs) == (valid, valid), (ours, theirs)
