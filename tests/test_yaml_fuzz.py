"""Arbitrary YAML and rule shapes give problems, never an exception."""

from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.rules.checks import parse_rule
from engine.rules.fragments import Fragments
from engine.rules.project import parse_project
from engine.rules.yaml_source import Scalar, _Loader, load
from tests.helpers import REPO, examples

PROJECT, _ = parse_project(REPO, (REPO / "pushrules.yaml").read_text())
assert PROJECT is not None
FRAGMENTS = Fragments()

KEYS = [
    "trigger",
    "apps",
    "message",
    "targets",
    "when",
    "vars",
    "limit",
    "quiet_hours",
    "catch_up",
    "event",
    "cron",
    "every",
    "at",
    "poll",
    "subject",
    "text",
    "sound",
    "badge",
    "popup",
    "interactiveButtons",
    "buttons",
    "id",
    "template",
    "use",
    "customParams",
    "data",
    "aps",
    "alert",
    "memberId",
    "language",
    "operator",
    "value",
    "for_each",
    "as",
    "target",
    "flights-ios",
    "news-android",
    "parentMessageId",
    "contentAvailable",
    "segmentId",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.sampled_from(
        [
            "",
            "custom",
            "{{ event.x }}",
            "{{",
            "{% if %}",
            "${x}",
            "{#",
            "0 9 * * *",
            "5m",
            "=",
            ">",
            "yes_no_category",
            "1",
            "no",
            "0012",
        ]
    ),
    st.text(max_size=20),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=6
        ),
    ),
    max_leaves=30,
)


def check(text: str) -> None:
    rule, problems = parse_rule("fuzz", "rules/fuzz.yaml", text, PROJECT, FRAGMENTS)
    assert rule is not None or any(p.is_error for p in problems)
    for p in problems:
        assert p.severity in ("error", "warning")
        assert p.message


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_any_rule_shape_gives_problems_not_exceptions(doc: object) -> None:
    check(yaml.safe_dump(doc, allow_unicode=True))


@settings(max_examples=examples(300), deadline=None)
@given(st.text(alphabet=string.printable + "{}[]:-&*!|>'\"#%@`\t", max_size=200))
def test_any_text_gives_problems_not_exceptions(text: str) -> None:
    check(text)


@settings(max_examples=examples(200), deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), scalars, max_size=8))
def test_scalars_keep_their_text_and_their_yaml_type(doc: dict) -> None:
    loaded = load(yaml.safe_dump(doc))
    assert not loaded.issues
    assert set(loaded.data) == set(doc)
    for key, original in doc.items():
        value = loaded.data[key]
        if original is None:
            assert value is None
        elif isinstance(original, str):
            assert value == original and isinstance(value, Scalar)
        elif isinstance(original, bool):
            assert value.typed is original
        elif isinstance(original, int):
            assert value.typed == original
        elif original == original:  # a float that is not NaN
            assert value.typed == original


def _tags(node: yaml.Node | None) -> object:
    if node is None or isinstance(node, yaml.ScalarNode):
        return node and (node.tag, node.value)
    if isinstance(node, yaml.SequenceNode):
        return (node.tag, [_tags(item) for item in node.value])
    return (node.tag, [(_tags(k), _tags(v)) for k, v in node.value])


@settings(max_examples=examples(200), deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, st.lists(scalars)), max_size=8))
def test_the_loader_tags_nodes_as_the_safe_loader(doc: dict) -> None:
    """Our loader's shortcuts (tags remembered, no path resolvers) change no tag, the first
    time a value is seen or later."""
    text = "plain: [0012, no, 1.10, 2026-12-24, ~, '1', <<, =]\n" + (
        yaml.safe_dump(doc) if doc else ""
    )
    for _ in range(2):
        assert _tags(yaml.compose(text, Loader=_Loader)) == _tags(
            yaml.compose(text, Loader=yaml.SafeLoader)
        )


def test_plain_scalars_are_text_as_written() -> None:
    loaded = load("a: 0012\nb: no\nc: 1.10\nd: 2026-12-24\ne: ~\n")
    assert loaded.data == {"a": "0012", "b": "no", "c": "1.10", "d": "2026-12-24", "e": None}
    assert loaded.data["a"].typed == 10  # YAML 1.1 reads 0012 as octal: why text is kept
    assert loaded.data["b"].typed is False
