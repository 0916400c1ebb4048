"""Rendering that fails alone: every runaway template is refused fast, within bounded memory,
as a render problem naming the rule and field; honest templates still render.

Each attack here once ran for seconds and built gigabytes, or raised RecursionError on every
fire. ``bounded`` runs one with tracemalloc on and checks both its time and its peak memory.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.render.compiler import CompileError, FireContext, compile_fire
from engine.rules import template_bounds
from engine.rules.templating import RenderError, render
from tests.helpers import examples, load, make_project, write_rule

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
#: What a refused template may cost at most, in processor time (generous: tracemalloc is on).
#: Processor time, not elapsed time: the budget the engine enforces is processor time, and the
#: elapsed time of a test on a machine busy with other work says nothing of the template.
SECONDS = 3.0
MEGABYTES = 40


def bounded(call: Callable[[], Any]) -> BaseException | None:
    """Run ``call``; the exception it raised (None if none), after checking time and memory."""
    tracemalloc.start()
    started = time.thread_time()
    raised: BaseException | None = None
    try:
        call()
    except BaseException as exc:  # a RecursionError or MemoryError is the bug itself
        raised = exc
    finally:
        elapsed = time.thread_time() - started
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    assert peak < MEGABYTES, f"allocated {peak:.0f} MB"
    return raised


ATTACKS = {
    "loop calls itself": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "macro calls itself": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(1) }}",
    "% format width": "{{ '%02000000000d' % 1 }}",
    "% format precision": "{{ '%.900000000f' % 1.0 }}",
    "% format star width": "{{ '%*d' % (900000000, 1) }}",
    "format filter width": "{{ '%0900000000d' | format(1) }}",
    "str.format precision": "{{ '{:.900000000f}'.format(1.0) }}",
    "str.format nested width": "{{ '{:{w}}'.format('x', w=900000000) }}",
    "str.replace": "{{ ('x' * 100000).replace('x', 'y' * 100000) }}",
    "replace filter": "{{ ('x' * 100000) | replace('x', 'y' * 100000) }}",
    "str.join of repeats": "{{ ''.join(['x' * 100000] * 100000) }}",
    "join filter of repeats": "{{ (['x' * 100000] * 100000) | join }}",
    "str.join into a separator": "{{ ('x' * 100000).join('y' * 100000) }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "translate": "{{ ('x' * 100000).translate({120: 'y' * 100000}) }}",
    "indent per line": "{{ ('\n' * 99999) | indent(99999) }}",
    "wordwrap string": "{{ ('x ' * 40000) | wordwrap(1, wrapstring='y' * 100000) }}",
    "batch fill": "{{ [1] | batch(900000000, 'x') | list }}",
    "slice count": "{{ [1] | slice(900000000) | list }}",
    "sum of lists": "{{ ([[1] * 100000] * 100000) | sum(start=[]) }}",
    "sum of picked lists": "{{ ([{'l': [1] * 100000}] * 100000) | sum(attribute='l', start=[]) }}",
    "sorting repeated lists": "{{ ([[1] * 100000] * 100000) | sort | length }}",
    "format !r of a nested list": "{% set b = [1] * 100000 %}{% set c = [b, b, b, b, b, b, b, "
    "b] %}{% set d = [c, c, c, c, c, c, c, c] %}{{ '{!r}'.format([d, d, d, d, d, d, d, d]) }}",
    "printing a nested list": "{{ [[1] * 100000] * 100000 }}",
    "tojson of a nested list": "{{ ([[1] * 100000] * 100000) | tojson }}",
    "~ doubling": "{% set s = 'x' * 65536 %}{% set s = s ~ s %}{% set s = s ~ s %}"
    "{% set s = s ~ s %}{% set s = s ~ s %}{% set s = s ~ s %}{{ s | length }}",
    "~ of a nested list": "{{ 'a' ~ [[1] * 100000] * 100000 }}",
    "list.extend doubling": "{% set l = [1] * 65536 %}{% for i in range(40) %}"
    "{{ l.extend(l) }}{% endfor %}",
    "nested loops over text": "{% for a in 'x' * 10000 %}{% for b in 'x' * 10000 %}"
    "{% endfor %}{% endfor %}",
    "squaring a number": "{% macro sq(x, n) %}{{ sq(x * x, n - 1) if n else x | string "
    "| length }}{% endmacro %}{{ sq(3, 40) }}",
    "power of a power": "{{ ((10 ** 100) ** 100) ** 100 }}",
}


@pytest.mark.parametrize("template", ATTACKS.values(), ids=ATTACKS.keys())
def test_each_attack_fails_fast_as_a_render_problem(template: str) -> None:
    raised = bounded(lambda: render(template, {"event": {}}))
    assert isinstance(raised, RenderError), repr(raised)


def tree(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"name": "leaf", "children": []}
    for level in range(levels):
        node = {"name": f"n{level}", "children": [node]}
    return node


TREE = "{% for n in [event.tree] recursive %}{{ n.name }}>{{ loop(n.children) }}{% endfor %}"


def test_a_deep_event_tree_is_a_render_problem_and_a_reasonable_one_renders() -> None:
    raised = bounded(lambda: render(TREE, {"event": {"tree": tree(200)}}))
    assert isinstance(raised, RenderError) and "nest more than 50 levels" in str(raised)
    expected = "".join(f"n{i}>" for i in reversed(range(40))) + "leaf>"
    assert render(TREE, {"event": {"tree": tree(40)}}) == expected


def test_recursion_never_leaves_the_render_even_deep_in_the_callers_stack() -> None:
    """Called from close to Python's recursion limit (a deep daemon stack), the bound or the
    last-resort catch still gives a RenderError, never a RecursionError."""
    margin = 120

    def descend(depth: int) -> BaseException | None:
        if depth > 0:
            return descend(depth - 1)
        try:
            render(TREE, {"event": {"tree": tree(45)}})
        except BaseException as exc:
            return exc
        return None

    frames = len(_stack())
    raised = descend(sys.getrecursionlimit() - frames - margin)
    assert isinstance(raised, RenderError), repr(raised)


def _stack() -> list[Any]:
    frame, out = sys._getframe(), []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


def test_printing_deeply_nested_event_data_is_a_render_problem() -> None:
    nested: Any = []
    for _ in range(5000):
        nested = [nested]
    raised = bounded(lambda: render("{{ event.x }}", {"event": {"x": nested}}))
    assert isinstance(raised, RenderError)


HONEST = (
    "{% for o in event.offers if o.price < 100 -%}\n"
    "{{ loop.index }}. {{ o.destination | title }}: {{ '%.2f' | format(o.price) }} EUR "
    "{{ '{:>6}'.format(o.code) }}\n"
    "{%- for tag in o.tags %} #{{ tag | lower | replace(' ', '') }}{% endfor %}\n"
    "{% endfor %}{{ ', '.join(event.offers | map(attribute='code') | list) | truncate(60) }}"
)


def test_an_honest_template_of_reasonable_size_renders() -> None:
    offers = [
        {"destination": f"city {i}", "price": i % 150, "code": f"C{i}", "tags": ["Sun Fun", "X"]}
        for i in range(400)
    ]
    out = render(HONEST, {"event": {"offers": offers}})
    assert out.startswith("1. City 0: 0.00 EUR     C0 #sunfun #x\n2. City 1: 1.00 EUR     C1")
    assert out.count("\n") == sum(1 for o in offers if o["price"] < 100)
    assert out.endswith("...")


@settings(max_examples=examples(60), deadline=None)
@given(width=st.integers(min_value=0, max_value=10**12), spec=st.sampled_from("dsf"))
def test_any_format_width_renders_exactly_or_is_refused_fast(width: int, spec: str) -> None:
    """Widths up to the limit behave as Python's; past it, a render problem, never a build."""
    value = "'1'" if spec == "s" else "1"
    template = f"{{{{ '%0{width}{spec}' % {value} }}}}"
    started = time.thread_time()
    try:
        out = render(template, {})
    except RenderError:
        assert width > template_bounds.MAX_SEQUENCE
    else:
        assert width <= template_bounds.MAX_SEQUENCE
        assert out == f"%0{width}{spec}" % (1 if spec != "s" else "1")
    assert time.thread_time() - started < SECONDS


# --- through the compiler: the rule and the field are named --------------------------------

RULE = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  subject: Offers
  text: "TEXT"
targets:
  - memberId: "m1"
"""


def rule_from(tmp_path: Path, text: str) -> tuple[Any, Any]:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", text)
    ruleset = load(root)
    assert ruleset.ok, ruleset.problems
    return ruleset.rules["r"], ruleset.project


@pytest.mark.parametrize("name", ["loop calls itself", "% format width", "str.replace"])
def test_a_runaway_template_is_a_compile_error_naming_rule_and_field(
    tmp_path: Path, name: str
) -> None:
    rule, project = rule_from(tmp_path, RULE.replace('"TEXT"', repr(ATTACKS[name])))
    raised = bounded(lambda: compile_fire(rule, project, FireContext(NOW, {})))
    assert isinstance(raised, CompileError), repr(raised)
    assert (raised.rule, raised.field) == ("r", "message.text")
    assert str(raised).startswith("rule r, message.text: ")


FOR_EACH = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Hi"
targets:
  - for_each: "{{ event.people }}"
    as: p
    target:
      memberId: "{{ p.id }}"
      data:
        busy: "{% for i in range(9000) %}{{ p.id | upper | lower | trim }}{% endfor %}"
"""


def test_one_fire_has_a_budget_of_processor_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each target's text is within its own limits; together, thousands of them are not."""
    rule, project = rule_from(tmp_path, FOR_EACH)
    monkeypatch.setattr(template_bounds, "FIRE_SECONDS", 0.3)
    event = {"people": [{"id": f"m{i}"} for i in range(100_000)]}
    started = time.thread_time()
    with pytest.raises(CompileError) as info:
        compile_fire(rule, project, FireContext(NOW, event))
    assert time.thread_time() - started < SECONDS
    assert info.value.rule == "r"
    # The budget runs out inside a target's text or between two targets: either way the
    # for_each of targets[0] is named.
    assert info.value.field in ("targets[0].target.data.busy", "targets[0].for_each")
    assert "processor time" in info.value.message
    few = {"people": [{"id": "a"}, {"id": "b"}]}
    [request] = compile_fire(rule, project, FireContext(NOW, few))  # a fresh budget per fire
    assert [t["memberId"] for t in request.body["sendInstantMessage"]["targets"]] == ["a", "b"]
