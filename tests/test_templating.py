"""The Jinja sandbox: strict names, data never code, every known way to exhaust memory refused."""

from __future__ import annotations

import pytest

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


def test_literal_markers_are_fine_when_escaped() -> None:
    assert syntax_problem("Deal {{ '{#' }}1 today") is None
    assert render("Deal {{ '{#' }}1", {}) == "Deal {#1"


def test_templates_compile_once() -> None:
    templating.compile_text.cache_clear()
    for _ in range(3):
        render("{{ event.a }}-once", {"event": {"a": 1}})
    assert templating.compile_text.cache_info().misses == 1
