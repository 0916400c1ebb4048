"""The single-pass schema check gives Cerberus's verdict: valid exactly when Cerberus finds no
error, for every schema, on documents generated from the schemas themselves (valid ones and
ones with a mistake put in), mutated example files, arbitrary shapes and the problem table."""

from __future__ import annotations

import functools
import string
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from engine.rules import schemas
from engine.rules.fast_schema import FastSchema
from engine.rules.schemas import SchemaChecker
from engine.rules.yaml_source import load
from tests.helpers import REPO, examples
from tests.test_json_schema import BASE_CONFIG, BASE_RULES, mutated
from tests.test_problems_table import ROWS
from tests.test_yaml_fuzz import documents

CHECKERS: dict[str, SchemaChecker] = {
    "rule": schemas.RULE_CHECKER,
    "project": schemas.PROJECT_CHECKER,
    "rule-test": schemas.RULE_TEST_CHECKER,
    "message": schemas.MESSAGE_TEMPLATE_CHECKER,
    "buttons": schemas.BUTTON_TEMPLATE_CHECKER,
    "target": schemas.TARGET_CHECKER,
}
SCHEMAS: dict[str, tuple[Mapping[str, Any], Any]] = {
    "rule": (schemas.RULE, False),
    "project": (schemas.PROJECT, False),
    "rule-test": (schemas.RULE_TEST, False),
    "message": (schemas.MESSAGE, False),
    "buttons": (schemas.BUTTONS["schema"], False),
    "target": (schemas.TARGET["schema"], schemas.TARGET["allow_unknown"]),
}


def verdicts(doc: Any) -> None:
    """Every checker agrees with Cerberus on ``doc`` (and its targets, for the target one)."""
    if not isinstance(doc, dict):
        return
    docs = [doc]
    for target in doc.get("targets") or [] if isinstance(doc.get("targets"), list) else []:
        if isinstance(target, dict):
            docs.append(target)
            if isinstance(target.get("target"), dict):
                docs.append(target["target"])
    for kind, checker in CHECKERS.items():
        for one in docs if kind == "target" else [doc]:
            errors = checker.cerberus_check(one)
            fast = checker.fast_valid(one)
            assert fast == (not errors), f"{kind}: fast path says {fast}, Cerberus {errors}"


def verdicts_of_text(text: str) -> None:
    loaded = load(text)
    if not any(i.severity == "error" for i in loaded.issues):
        verdicts(loaded.data)


# --- documents made from the schema definitions ------------------------------------------------

SCALAR_TEXTS = ["x", "", "no", "1", "0012", "15m", "1h30m", "2d", "0s", "{{ event.x }}", "=", "a b"]
UNKNOWN_KEYS = ["x", "subjet", "Sound", "data", "use", "id", "memberId", "target"]


#: A value of any shape, for a mistake.
WRONG: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 500),
    st.sampled_from(SCALAR_TEXTS),
    st.just([]),
    st.just({}),
    st.lists(st.sampled_from(SCALAR_TEXTS), max_size=2),
    st.dictionaries(st.sampled_from(UNKNOWN_KEYS), st.sampled_from(SCALAR_TEXTS), max_size=2),
)


def _mistake(valid: st.SearchStrategy[Any], rate: int) -> st.SearchStrategy[Any]:
    """Mostly ``valid``; one time in ``rate`` something else (shrinking towards ``valid``).

    Only the one kept is drawn: drawing both and keeping one (a mistake at every level, thrown
    away 39 times in 40) took a third of these tests' time; a ``flatmap`` would build new
    strategies at every draw, which made them several times slower."""

    @st.composite
    def drawn(draw: st.DrawFn) -> Any:
        return draw(WRONG) if draw(st.integers(0, rate - 1)) == rate - 1 else draw(valid)

    return drawn()


RULE_NAMES = {"type", "nullable", "empty", "allowed", "required", "allow_unknown", "schema"}
RULE_NAMES |= {"valuesrules", "meta", "bounds"}


def _is_rules(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) <= RULE_NAMES


def _is_schema(value: Any) -> bool:
    return isinstance(value, Mapping) and all(_is_rules(r) for r in value.values())


def _value(
    rules: Mapping[str, Any], allow_unknown: Any, rate: int = 40, depth: int = 8
) -> st.SearchStrategy[Any]:
    """A value for ``rules``: valid, with a mistake one time in ``rate`` at each level;
    ``depth``: levels left (a schema may nest without end through ``allow_unknown``)."""
    if depth <= 0:
        return _any_value(0)
    names = rules.get("type") or ["string"]
    names = [names] if isinstance(names, str) else list(names)
    choices: list[st.SearchStrategy[Any]] = []
    for name in names:
        if name == "string":
            allowed = rules.get("allowed")
            texts = [t for t in SCALAR_TEXTS if t or rules.get("empty", True)]
            if allowed and rules.get("empty") is True:
                allowed = [*allowed, ""]  # Cerberus does not look at allowed for empty text
            choices.append(st.sampled_from(allowed or [*texts, "true", "5"]))
        elif name == "yamlbool":
            choices.append(st.booleans())
        elif name == "yamlint":
            choices.append(st.integers(-2, 400))
        elif name == "list":
            item = rules.get("schema")
            inner = (
                _value(item, allow_unknown, rate, depth - 1) if _is_rules(item) else _any_value(1)
            )
            choices.append(
                st.lists(inner, min_size=0 if rules.get("empty", True) else 1, max_size=3)
            )
        elif name == "dict":
            inner_unknown = rules.get("allow_unknown", allow_unknown)
            if _is_schema(rules.get("schema")):
                choices.append(_mapping(rules["schema"], inner_unknown, rate, depth - 1))
            elif _is_rules(rules.get("valuesrules")):
                keys = st.sampled_from(["a", "flights-ios", "news-android", "b"])
                values = _value(rules["valuesrules"], allow_unknown, rate, depth - 1)
                least = 0 if rules.get("empty", True) else 1
                choices.append(st.dictionaries(keys, values, min_size=least, max_size=3))
            else:
                choices.append(st.dictionaries(st.sampled_from(UNKNOWN_KEYS), WRONG, max_size=2))
    value = st.one_of(*choices)
    if rules.get("nullable"):
        value = st.one_of(value, st.none())
    return _mistake(value, rate)


def _mapping(
    schema: Mapping[str, Any], allow_unknown: Any, rate: int = 40, depth: int = 8
) -> st.SearchStrategy[Any]:
    """A mapping for ``schema``: its required keys, some others, and one time in ``rate`` a
    key removed or an unknown one added."""
    fields = {k: _value(r, allow_unknown, rate, depth) for k, r in schema.items() if _is_rules(r)}
    required = {k: fields[k] for k, r in schema.items() if r.get("required")}
    optional = {k: v for k, v in fields.items() if k not in required}
    extra: st.SearchStrategy[Any] = st.just({})
    if _is_rules(allow_unknown) and allow_unknown:  # a target's criteria
        extra = st.dictionaries(
            st.sampled_from(["memberId", "language", "opencount", "x"]),
            _value(allow_unknown, allow_unknown, rate, depth - 1),
            max_size=2,
        )

    def put_together(parts: tuple[dict[str, Any], dict[str, Any], str, str]) -> dict[str, Any]:
        base, more, mistake, key = parts
        out = {**more, **base}
        if mistake == "remove" and out:  # a required key missing, or any key
            out.pop(sorted(out)[0])
        elif mistake == "add":
            out[key] = "x"  # an unknown key (or a known one with a value of the wrong type)
        return out

    return st.tuples(
        st.fixed_dictionaries(required, optional=optional),
        extra,
        st.sampled_from(["none"] * (rate - 2) + ["remove", "add"]),
        st.sampled_from(UNKNOWN_KEYS),
    ).map(put_together)


def _dumped(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


@functools.cache
def _document(kind: str) -> st.SearchStrategy[Any]:
    """Built once per kind: hypothesis caches what it learns about a strategy on the object."""
    schema, allow_unknown = SCHEMAS[kind]
    return _mapping(schema, allow_unknown)


@pytest.mark.parametrize("kind", list(SCHEMAS))
@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_documents_made_from_the_schema_get_cerberus_verdict(kind: str, data: Any) -> None:
    doc = data.draw(_document(kind))
    text = _dumped(doc)
    note(text)
    loaded = load(text)
    checker = CHECKERS[kind]
    errors = checker.cerberus_check(loaded.data)
    assert checker.fast_valid(loaded.data) == (not errors), errors


def test_the_generated_documents_are_valid_and_broken_both() -> None:
    """The strategy above makes both kinds, so the comparison is not one-sided."""
    seen = {True: 0, False: 0}

    @settings(max_examples=examples(80), deadline=None, database=None)
    @given(_mapping(schemas.RULE, False))
    def count(doc: Any) -> None:
        seen[schemas.RULE_CHECKER.fast_valid(load(_dumped(doc)).data)] += 1

    count()
    assert seen[True] >= 10 and seen[False] >= 10, seen


# --- the other corpora -------------------------------------------------------------------------


@settings(max_examples=examples(120), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BASE_RULES).flatmap(mutated))
def test_mutated_rules_get_cerberus_verdict(text: str) -> None:
    verdicts_of_text(text)


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(BASE_CONFIG))
def test_mutated_settings_get_cerberus_verdict(text: str) -> None:
    verdicts_of_text(text)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_shape_gets_cerberus_verdict(doc: object) -> None:
    verdicts_of_text(_dumped(doc))


@settings(max_examples=examples(200), deadline=None)
@given(st.text(alphabet=string.printable + "{}[]:-&*!|>'\"#%@`\t", max_size=200))
def test_any_text_gets_cerberus_verdict(text: str) -> None:
    verdicts_of_text(text)


@pytest.mark.parametrize(("file", "text", "code", "line", "field"), ROWS)
def test_problem_table_gets_cerberus_verdict(
    file: str, text: str, code: Any, line: Any, field: Any
) -> None:
    verdicts_of_text(text)


def example_files() -> list[Path]:
    folders = ["rules", "templates/messages", "templates/buttons", "rule-tests"]
    return [
        REPO / "pushrules.yaml",
        *(p for f in folders for p in sorted((REPO / f).glob("*.yaml"))),
    ]


@pytest.mark.parametrize("path", example_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_example_files_pass_the_single_pass(path: Path) -> None:
    """Each example file is valid for its own schema without Cerberus, and every checker
    agrees with Cerberus on it."""
    kind = {
        "rules": "rule",
        "messages": "message",
        "buttons": "buttons",
        "rule-tests": "rule-test",
    }.get(path.parent.name, "project")
    doc = load(path.read_text()).data
    assert CHECKERS[kind].fast_valid(doc)
    verdicts(doc)


# --- what the single pass does not know, Cerberus decides ---------------------------------------


def test_a_rule_the_single_pass_does_not_know_leaves_the_verdict_to_cerberus() -> None:
    doc = load("name: abc\n").data
    types = schemas.TYPE_CHECKS
    unknown_rule = FastSchema({"name": {"type": "string", "regex": "^a"}}, False, types, any)
    unknown_type = FastSchema({"name": {"type": "number"}}, False, types, any)
    known = FastSchema({"name": {"type": "string"}}, False, types, any)
    assert not unknown_rule.valid(doc)
    assert not unknown_type.valid(doc)
    assert known.valid(doc)
    assert not known.valid(["not", "a", "mapping"])


def test_a_valid_project_never_loads_cerberus() -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from engine.rules.loader import Loader\n"
        "rs = Loader(Path(sys.argv[1]), workers=1).load()\n"
        "print(rs.ok, 'cerberus' in sys.modules)\n"
    )

    def run() -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(REPO)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    assert run() == "True False"


def test_a_refused_document_gets_cerberus_words() -> None:
    checker = SchemaChecker({"sound": {"type": "string", "allowed": ["default"]}})
    assert checker.check(load("sound: loud\n").data)[0].kind == "allowed"


# --- any schema made of the rules the single pass knows ------------------------------------------

FIELD_NAMES = ["a", "b", "c"]


def _rules_sets(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """A rules set of ``type``, ``nullable``, ``empty``, ``allowed``, ``required``,
    ``allow_unknown``, ``schema`` and ``valuesrules``, nested ``depth`` levels at most."""
    optional: dict[str, st.SearchStrategy[Any]] = {
        "type": st.one_of(
            st.sampled_from(["string", "dict", "list", "yamlbool", "yamlint"]),
            st.lists(
                st.sampled_from(["string", "dict", "list", "yamlint"]), min_size=1, max_size=2
            ),
        ),
        "nullable": st.booleans(),
        "empty": st.booleans(),
        "allowed": st.lists(st.sampled_from(["x", "", "1", "yes"]), min_size=1, max_size=3),
        "required": st.booleans(),
    }
    if depth > 0:
        inner = _rules_sets(depth - 1)
        optional["allow_unknown"] = st.one_of(st.booleans(), inner)
        optional["schema"] = st.one_of(inner, st.dictionaries(st.sampled_from(FIELD_NAMES), inner))
        optional["valuesrules"] = inner
    return st.fixed_dictionaries({}, optional=optional)


@functools.cache  # the same for a depth: built once, not at each example that draws from it
def _any_value(depth: int) -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(0, 2), st.sampled_from(["x", "", "yes"]))
    if depth == 0:
        return leaf
    inner = _any_value(depth - 1)
    return st.one_of(
        leaf,
        st.lists(inner, max_size=2),
        st.dictionaries(st.sampled_from(FIELD_NAMES), inner, max_size=3),
    )


@pytest.mark.slow
@settings(max_examples=examples(250), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(FIELD_NAMES), _rules_sets(2), min_size=1),
    st.one_of(st.booleans(), _rules_sets(1)),
    st.data(),
)
def test_any_schema_of_known_rules_gets_cerberus_verdict(
    schema: dict[str, Any], allow_unknown: Any, data: Any
) -> None:
    from cerberus import SchemaError as BadSchema

    raw = data.draw(
        st.one_of(
            _mapping(schema, allow_unknown, rate=5, depth=3),
            st.dictionaries(st.sampled_from(FIELD_NAMES), _any_value(3), max_size=3),
        )
    )
    try:
        checker = SchemaChecker(schema, allow_unknown=allow_unknown)
        doc = load(_dumped(raw)).data
        errors = checker.cerberus_check(doc)
    except (BadSchema, RuntimeError):
        # A schema Cerberus itself refuses is no one's schema; RuntimeError: a mapping's
        # schema met a list (its field names read as rules), a mistake of the schema too.
        return
    note(f"{schema=}\n{allow_unknown=}\n{doc=}\n{errors=}")
    assert checker.fast_valid(doc) == (not errors)


#: Where Cerberus's rules interact: (schema, allow_unknown, document).
EDGES: list[tuple[dict[str, Any], Any, str]] = [
    ({"a": {"type": "string", "empty": True, "allowed": ["x"]}}, False, 'a: ""'),
    ({"a": {"type": "string", "empty": False, "allowed": [""]}}, False, 'a: ""'),
    ({"a": {"type": "string", "allowed": ["x"]}}, False, 'a: ""'),
    ({"a": {"type": "list", "empty": True, "allowed": ["x"]}}, False, "a: []"),
    ({"a": {"type": "list", "allowed": ["x"]}}, False, "a: [x, y]"),
    ({"a": {"type": "integer"}}, False, "a: 1"),
    ({"a": {"type": "string", "nullable": True}}, False, "a: ~"),
    ({"a": {"type": "string"}}, False, "a: ~"),
    ({"a": {"nullable": True, "allowed": ["x"]}}, False, "a: ~"),
    ({"a": {"type": "dict", "schema": {"b": {"required": True}}}}, False, "a: {}"),
    ({"a": {"type": "dict", "schema": {"b": {}}}}, True, "a: {c: 1}"),
    ({"a": {"type": "dict", "schema": {"b": {}}, "allow_unknown": False}}, True, "a: {c: 1}"),
    ({"a": {"type": "list", "schema": {"type": "dict", "schema": {}}}}, True, "a: [{c: 1}]"),
    (
        {"a": {"type": "dict", "valuesrules": {"type": "dict", "schema": {}}}},
        True,
        "a: {k: {c: 1}}",
    ),
    ({"a": {}}, {}, "b: 1"),
    ({"a": {}}, {"type": "string"}, "b: 1"),
    ({"a": {}}, {"type": "dict", "schema": {}}, "b: {c: {d: 1}}"),
    ({"a": {}}, {"type": "dict", "schema": {}}, "b: {c: x}"),
    ({"a": {"required": True, "nullable": True}}, False, "a: ~"),
    ({"a": {"type": "yamlint", "bounds": schemas.Bounds(1, 5)}}, False, "a: 6"),
    ({"a": {"type": "string", "bounds": schemas.Bounds(1, 60, "s")}}, False, "a: 2m"),
]


@pytest.mark.parametrize(("schema", "allow_unknown", "text"), EDGES)
def test_where_rules_meet_the_verdict_is_cerberus(
    schema: dict[str, Any], allow_unknown: Any, text: str
) -> None:
    checker = SchemaChecker(schema, allow_unknown=allow_unknown)
    doc = load(text).data
    assert checker.fast_valid(doc) == (not checker.cerberus_check(doc))
