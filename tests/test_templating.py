"""The Jinja sandbox: strict names, data never code, every known way to exhaust memory refused."""

from __future__ import annotations

from collections import OrderedDict, defaultdict

import jinja2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.rules import templating
from engine.rules.templating import RenderError, render, syntax_problem
from tests.helpers import examples

HUGE = [
    "{{ 'x' * 10**9 }}",
    "{{ [1] * 10**8 }}",
    "{{ ('a' | center(10 ** 8)) | length }}",
    "{{ 'a'.center(10**8) }}",
    "{{ 'a'.ljust(10**8) }}",
    "{{ '%100000000s' | format('x') }}",
    "{{ '{:>100000000}'.format('x') }}",
    "{{ 'x' | indent(10**8) }}",
    "{{ 'ab' | replace('a', 'aaaaaaaaaa') | replace('a', 'aaaaaaaaaa') | replace('a', "
    "'aaaaaaaaaa') | replace('a', 'aaaaaaaaaa') | replace('a', 'aaaaaaaaaa') }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for i in range(5000) %}{% for j in range(5000) %}{% endfor %}{% endfor %}",
    "{% for i in range(9000) %}{{ 'x' * 20 }}{% endfor %}",
    "{{ 2 ** 10000 }}",
]


@pytest.mark.parametrize("template", HUGE)
def test_runaway_templates_are_refused(template: str) -> None:
    with pytest.raises(RenderError):
        render(template, {})


def test_ordinary_templates_render() -> None:
    context = {"event": {"name": "ann", "items": [1, 2, 3]}}
    assert render("{{ event.name | upper }} {{ event['items'] | join(',') }}", context) == (
        "ANN 1,2,3"
    )
    assert render("{{ '{:>3}'.format('x') }}|{{ 'x'.center(5) }}", {}) == "  x|  x  "
    assert render("{% for i in range(3) %}{{ loop.index }}{% endfor %}", {}) == "123"


def test_event_data_is_never_rendered_again() -> None:
    assert render("{{ event.x }}", {"event": {"x": "{{ 7*7 }}"}}) == "{{ 7*7 }}"


def test_macros_written_in_the_text_pass_through_untouched() -> None:
    assert render("Hi ${first_name} {{ event.x }}", {"event": {"x": "y"}}) == "Hi ${first_name} y"


def test_undefined_names_are_errors() -> None:
    with pytest.raises(RenderError, match="undefined"):
        render("{{ event.missing }}", {"event": {}})


def test_sandbox_blocks_unsafe_attributes() -> None:
    with pytest.raises(RenderError):
        render("{{ event.__class__.__mro__[1].__subclasses__() }}", {"event": {}})


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Deal {#1 today}", "{{ '{#' }}"),
        ("Save 50{% off", "{{ '{%' }}"),
        ("{{ event.x }", "Jinja syntax"),
        ("{{ user.name }}", "unknown name 'user'"),
    ],
)
def test_syntax_problems_say_what_to_do(text: str, words: str) -> None:
    problem = syntax_problem(text)
    assert problem is not None and words in problem


def whole_text_problem(text: str, names: frozenset[str]) -> str | None:
    """What syntax_problem says, from the whole text's parse alone (no shortcut)."""
    allowed = templating.CONTEXT_NAMES | names
    try:
        ast = templating.ENV.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return f"Jinja syntax: {exc.message} (line {exc.lineno} of the text)"
    return templating._unknown_names(templating._loaded_names(ast), allowed)


PIECES = [
    "{{", "}}", "{{-", "-}}", "{{+", " event.x ", " p.name ", " user ", "'}}'", '"{{"', " - ",
    " + 1 ", " | default('x') ", " or ", " is defined ", "(", ")", "Hi ", "\n", "$", "{", "}",
    " now.strftime('%d') ", " 1 > ", "[", "]", "p", ":", "'", " true ", " none ", " not ", "in",
    ".if", ".x", " | upper", "|", " default", "('50% off')", '("a")', "(12)", "(-1)", "()",
    " | d(", " is ", "\\", "#", "12", "012", "0x1f", "1_0", "1.5", "e5", ".3", "x2",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@settings(max_examples=examples(600), deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=10).map("".join), st.booleans())
def test_each_expression_alone_says_what_the_whole_text_says(text: str, as_p: bool) -> None:
    """Expressions are parsed one by one and cached, the plainest ones not even parsed; the
    verdict, and the names reported, are those of parsing the whole text (texts with {% or {#
    always are)."""
    assume("{%" not in text and "{#" not in text)  # those take the parser's own path
    names = frozenset({"p"}) if as_p else frozenset()
    templating._syntax_problem.cache_clear()
    assert syntax_problem(text, names) == whole_text_problem(text, names)


def test_expressions_differing_in_numbers_share_a_parse_not_a_verdict() -> None:
    """An expression is parsed once for every whole number in its place; a number Jinja reads
    otherwise (``012`` is two tokens) or a name with digits is not taken for one."""
    templating._syntax_problem.cache_clear()
    templating._expression_names.cache_clear()
    assert syntax_problem("Score {{ event.score > 12 }}") is None
    assert syntax_problem("Score {{ event.score > 40 }}") is None
    assert templating._expression_names.cache_info().misses == 1
    problem = syntax_problem("Score {{ event.score > 012 }}")
    assert problem is not None and problem.startswith("Jinja syntax:")
    problem = syntax_problem("Score {{ score12 > 12 }}")
    assert problem is not None and "unknown name 'score12'" in problem


def test_literal_markers_are_fine_when_escaped() -> None:
    assert syntax_problem("Deal {{ '{#' }}1 today") is None
    assert render("Deal {{ '{#' }}1", {}) == "Deal {#1"


def test_templates_compile_once() -> None:
    templating.compile_text.cache_clear()
    for _ in range(3):
        render("{{ event.a }}-once", {"event": {"a": 1}})
    assert templating.compile_text.cache_info().misses == 1


class _Thing:
    id = "attr"

    def __str__(self) -> str:
        return "a thing"


LONE = [
    "{{ p.id }}",
    "{{p.id}}",
    "{{ p . id }}",
    "{{ p }}",
    "{{ p.id.x }}",
    "{{ p.__class__ }}",
    "{{ p.items }}",  # a dict's method, not its item
]
VALUES = [
    {"id": "m1"},
    {"id": 7},
    {"id": 2.50},
    {"id": True},
    {"id": None},
    {"id": ""},
    {"id": "${first_name}"},
    {"id": "$"},
    {"id": {"x": "{y"}},
    {"id": [1, None]},
    {"id": "x" * 100_001},
    {"other": 1},
    {"items": 1},
    OrderedDict(id="ordered"),
    defaultdict(str),
    _Thing(),
    "text",
    3,
    None,
]


def _outcome(text: str, context: dict[str, object]) -> object:
    try:
        rendered = templating.render_detail(text, context)
    except RenderError as exc:
        return ("error", str(exc), exc.reference)
    return (rendered.text, rendered.nulls)


@pytest.mark.parametrize("text", LONE)
def test_a_lone_reference_renders_as_jinja_does(text: str) -> None:
    """``{{ p.id }}`` alone is rendered without Jinja (a for_each target's usual id), and says
    exactly what Jinja says of ``{{ (p.id) }}``, the same expression it cannot shortcut."""
    through_jinja = text.replace("{{", "{{ (").replace("}}", ") }}")
    for value in VALUES:
        context = {"p": value, "event": {}}
        expected = _outcome(through_jinja, context)
        assert _outcome(text, context) == expected, (text, value)
        prepared = templating.prepare(text)
        try:
            got: object = (prepared(context).text, prepared(context).nulls)
        except RenderError as exc:
            got = ("error", str(exc), exc.reference)
        assert got == expected, (text, value)


@pytest.mark.parametrize("text", ["{{ p.id }}", "{{p.id}}", "{{ p . id }}", "{{ p.id.x }}"])
def test_a_lone_reference_that_resolves_needs_no_jinja_template(text: str, monkeypatch) -> None:
    compiled: list[str] = []
    real = templating.compile_text
    monkeypatch.setattr(templating, "compile_text", lambda t: compiled.append(t) or real(t))
    assert templating.render_detail(text, {"p": {"id": {"x": "m1"}}}).text
    assert compiled == []


@pytest.mark.parametrize("text", ["{{ true }}", "{{ none }}", "{{ range }}", "{{ q.id }}"])
def test_what_looks_like_a_reference_but_is_not_one_goes_to_jinja(text: str) -> None:
    context = {"p": {"id": 1}}
    through_jinja = text.replace("{{", "{{ (").replace("}}", ") }}")
    assert _outcome(text, context) == _outcome(through_jinja, context)


@pytest.mark.parametrize(
    ("text", "reads"),
    [
        ("{{ now.hour >= 18 }}", ("now",)),
        ("{% if now.weekday() < 5 %}weekday{% endif %}", ("now",)),
        ("{{ rule.timezone }} {{ rule['timezone'] }}", ("rule.timezone",)),
        ("{{ rule }}", ("rule.timezone",)),
        ("{{ rule.id }} for {{ now }}", ("now",)),
        ("{{ rule.id ~ rule.description }}", ()),
        ("{% set now = 3 %}{{ now }} {{ event.now }}", ()),
        ("{{ now", ()),
    ],
)
def test_timezone_reads_are_now_and_the_rules_timezone(text: str, reads: tuple[str, ...]) -> None:
    """What a template gives in the rule's timezone: ``now``, and ``rule`` but for its id and
    description; names the template sets itself, or an event's field, are not them."""
    assert templating.timezone_reads(text) == reads
