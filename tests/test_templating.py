"""The Jinja sandbox: strict names, data never code, every known way to exhaust memory refused."""

from __future__ import annotations

import jinja2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from engine.rules import templating
from engine.rules.templating import RenderError, render, syntax_problem

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
    " | d(", " is ", "\\", "#",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=10).map("".join), st.booleans())
def test_each_expression_alone_says_what_the_whole_text_says(text: str, as_p: bool) -> None:
    """Expressions are parsed one by one and cached, the plainest ones not even parsed; the
    verdict, and the names reported, are those of parsing the whole text (texts with {% or {#
    always are)."""
    assume("{%" not in text and "{#" not in text)  # those take the parser's own path
    names = frozenset({"p"}) if as_p else frozenset()
    templating._syntax_problem.cache_clear()
    assert syntax_problem(text, names) == whole_text_problem(text, names)


def test_literal_markers_are_fine_when_escaped() -> None:
    assert syntax_problem("Deal {{ '{#' }}1 today") is None
    assert render("Deal {{ '{#' }}1", {}) == "Deal {#1"


def test_templates_compile_once() -> None:
    templating.compile_text.cache_clear()
    for _ in range(3):
        render("{{ event.a }}-once", {"event": {"a": 1}})
    assert templating.compile_text.cache_info().misses == 1
