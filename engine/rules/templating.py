"""Jinja2 for rule texts: sandboxed, strict about undefined names, bounded in time and memory.

``{{ ... }}`` and ``{% ... %}`` are ours, rendered when a rule fires; ``${name}`` is an Accengage
macro that Jinja leaves alone. Values that come from an event are data: rendering is one pass,
so an event field holding ``{{ 7*7 }}`` is sent as those characters, and one holding ``${name}``
is printed with a zero-width space after the ``$``, so Accengage never fills data as a macro.
A null prints as empty text; ``default`` replaces null and empty text too. The limits on time,
memory and nesting are in :mod:`engine.rules.template_bounds`.

Templates are compiled once per distinct source text and cached, so loading 1,000 rules that
share expressions compiles each expression once, and firing a rule compiles nothing.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial, update_wrapper
from typing import Any, cast

import jinja2
from jinja2 import nodes, pass_context
from jinja2.runtime import LoopContext
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter
from jinja2.visitor import NodeTransformer

from engine.errors import PushrulesError
from engine.rules import template_bounds as bounds
from engine.rules.problems import did_you_mean
from engine.rules.template_bounds import MAX_OUTPUT, MAX_SEQUENCE

CONTEXT_NAMES = frozenset({"event", "item", "now", "rule", "vars"})

_MARKERS = ("{{", "{%", "{#")
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)
#: Put between ``$`` and ``{`` in printed values, so data never forms an Accengage macro.
MACRO_BREAK = "\u200b"

#: Internal filters the compiled templates call: loop turns and ``~`` are counted and bounded.
_STEPS_FILTER = "_pushrules_steps"
_CONCAT_FILTER = "_pushrules_concat"


class RenderError(PushrulesError):
    """A template failed when the rule fired; the message says which name or limit.

    ``reference`` is the dotted path the template read when a name was undefined
    (``event.first_name``), so a caller can say which input was missing.
    """

    def __init__(self, message: str, reference: str | None = None) -> None:
        super().__init__(message)
        self.reference = reference


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in templates: a field's width, precision and value are checked first."""

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion:  # !r and !s build the text before format_field sees it
            bounds.refuse_size("a format field", bounds.flat_size(value))
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        bounds.check_format_field(value, format_spec)
        return super().format_field(value, format_spec)


class _Bounded(NodeTransformer):
    """Rewrites a parsed template so loop turns are counted and ``~`` is bounded."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = cast(nodes.For, self.generic_visit(node))
        node.iter = nodes.Filter(
            node.iter, _STEPS_FILTER, [], [], None, None, lineno=node.iter.lineno
        )
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = cast(nodes.Concat, self.generic_visit(node))
        return nodes.Filter(
            nodes.List(node.nodes, lineno=node.lineno),
            _CONCAT_FILTER,
            [],
            [],
            None,
            None,
            lineno=node.lineno,
        )


class _BoundedEnvironment(SandboxedEnvironment):
    """A sandbox that refuses to build huge values and counts the work a rendering does."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def _generate(
        self,
        source: nodes.Template,
        name: str | None,
        filename: str | None,
        defer_init: bool = False,
    ) -> str:
        _Bounded().visit(source)
        return super()._generate(source, name, filename, defer_init)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        bounds.step()
        if operator == "**" and _is_number(left) and _is_number(right) and abs(right) > 100:
            raise RenderError(f"{left} ** {right} is too large to compute in a template")
        if operator == "*":
            size = _product_size(left, right)
            if size > MAX_SEQUENCE:
                raise RenderError(
                    f"the template builds text or a list of {size:,} items; "
                    f"the limit is {MAX_SEQUENCE:,}"
                )
        if (
            operator == "+"
            and _is_sized(left)
            and _is_sized(right)
            and len(left) + len(right) > MAX_SEQUENCE
        ):
            raise RenderError(f"the template builds text longer than {MAX_SEQUENCE:,}")
        if operator == "%" and isinstance(left, str):
            bounds.check_percent(left, right)
        return bounds.check_result(
            f"'{operator}'", super().call_binop(context, operator, left, right)
        )

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        bounds.step()
        return super().call_unop(context, operator, arg)

    def getattr(self, obj: Any, attribute: str) -> Any:
        bounds.step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        bounds.step()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """The sandbox's ``str.format``, with every field checked before it is formatted."""
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or (
            value.__name__ not in ("format", "format_map")
        ):
            return None
        owner = value.__self__
        if not isinstance(owner, str):
            return None
        is_map = value.__name__ == "format_map"
        formatter = _BoundedFormatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return str(formatter.vformat(owner, args, kwargs))

        return update_wrapper(wrapper, value)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls in templates (``'x'.center(n)``, macros, ``loop(...)``) stay bounded too."""
        bounds.step()
        name = getattr(__obj, "__name__", "")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and name in bounds.STR_METHODS:
            if name == "join" and args:
                args = (bounds.materialise(args[0]), *args[1:])
            bounds.refuse_size(f"{name}()", bounds.STR_METHODS[name](owner, *args))
        for value in (*args, *kwargs.values()):
            bounds.check_result("an argument", value)
        if isinstance(__obj, LoopContext) and args:
            args = (bounds.counted(args[0]), *args[1:])
        with bounds.nested():
            result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(owner, list | dict | set):
            bounds.check_result(f"{name}()", owner)  # append, extend, update grow the owner
        return bounds.check_result(f"{name}()" if name else "a call", result)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_sized(value: object) -> bool:
    return isinstance(value, str | list | tuple)


def _product_size(left: object, right: object) -> int:
    """Items ``left * right`` would hold; for a list of lists, all their items: ``[big] * n``
    is small in memory, but printing, joining or sorting it costs ``n`` times ``big``."""
    if _is_sized(right) and isinstance(left, int):
        left, right = right, left
    if not (_is_sized(left) and isinstance(right, int)):
        return 0
    if isinstance(left, list | tuple) and any(
        isinstance(i, list | tuple | dict | set) for i in left
    ):
        return bounds.flat_size(left) * right
    return len(left) * right  # type: ignore[arg-type]


def _bounded_range(*args: int) -> range:
    """``range`` with a per-item cap and a per-rendering budget, so nested loops stay bounded."""
    result = range(*args)
    bounds.take_range(len(result))
    return result


#: Text filters: a null value is treated as empty text, as ``{{ value }}`` prints it.
_TEXT_FILTERS = frozenset(
    {
        "capitalize", "center", "e", "escape", "forceescape", "indent", "lower", "replace",
        "string", "striptags", "title", "trim", "truncate", "upper", "urlencode", "urlize",
        "wordwrap",
    }
)  # fmt: skip


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    passes = hasattr(function, "jinja_pass_arg")

    def bounded(*args: Any, **kwargs: Any) -> Any:
        bounds.step()
        head, args = (args[:1], args[1:]) if passes else ((), args)
        if args:
            value = args[0]
            if value is None and name in _TEXT_FILTERS:
                bounds.note_null()
                value = ""
            if name in bounds.MATERIALISE:
                value = bounds.materialise(value)
            if name in bounds.STRINGIFYING:
                bounds.refuse_size(f"the {name} filter", bounds.flat_size(value))
            if name == "format" and isinstance(value, str):
                bounds.check_percent(value, tuple(args[1:]) or kwargs)
            args = (value, *args[1:])
            if name in bounds.FILTERS:
                bounds.refuse_size(f"the {name} filter", bounds.FILTERS[name](*args, **kwargs))
        return bounds.check_result(f"the {name} filter", function(*head, *args, **kwargs))

    # Jinja passes the context or environment first to filters marked so; keep the mark.
    if passes:
        bounded.jinja_pass_arg = function.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


def _is_blank(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, jinja2.Undefined)
        or (isinstance(value, str) and not value.strip())
    )


def _default(value: Any, default_value: Any = "", boolean: bool = False) -> Any:
    """Jinja's ``default``, which also replaces null and empty text, as an author expects:
    ``{{ event.first_name | default("there") }}`` gives "there" for a missing, null or ""
    first name. ``default(x, true)`` still replaces every false value (0, an empty list)."""
    if _is_blank(value) or (boolean and not value):
        return default_value
    return value


@pass_context
def _steps(_context: Any, iterable: Any) -> Any:
    """Every loop turn counts (a pass_context filter, so Jinja never runs it at compile time)."""
    return bounds.counted(iterable)


@pass_context
def _concat(_context: Any, values: list[Any]) -> str:
    """``a ~ b``: null is empty text, and the result is sized before it is built."""
    parts = []
    for value in values:
        if value is None:
            bounds.note_null()
            value = ""
        parts.append(value)
    bounds.refuse_size("'~'", sum(bounds.flat_size(v) for v in parts))
    return "".join(str(v) for v in parts)


def _finalize(value: Any) -> Any:
    """What ``{{ value }}`` prints: null as empty text, never an Accengage macro, never huge."""
    if type(value) is str:  # the common case, kept fast: for_each renders it per target
        if len(value) > MAX_OUTPUT:
            bounds.refuse_size("printing a value", len(value))
        return neutralise_macros(value)
    if value is None:
        bounds.note_null()
        return ""
    if isinstance(value, jinja2.Undefined):
        return value
    bounds.refuse_size("printing a value", bounds.flat_size(value))
    return neutralise_macros(str(value))


def neutralise_macros(text: str) -> str:
    """``${name}`` in data gets a zero-width space after the ``$``: it shows the same, and
    Accengage does not read it as a macro."""
    if "$" not in text:
        return text
    return text.replace("${", "$" + MACRO_BREAK + "{")


def _make_env() -> _BoundedEnvironment:
    env = _BoundedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=_finalize,
    )
    env.globals = {"range": _bounded_range, "dict": dict}
    filters = {**env.filters, "default": _default, "d": _default}
    env.filters = {name: _bounded_filter(name, f) for name, f in filters.items()}
    env.filters[_STEPS_FILTER] = _steps
    env.filters[_CONCAT_FILTER] = _concat
    return env


ENV = _make_env()


def is_template(text: str) -> bool:
    """Whether Jinja would read anything in this text (fast path for the plain majority)."""
    return "{" in text and any(m in text for m in _MARKERS)


#: Names Jinja reads as something else than a variable (constants, operators).
_NOT_NAMES = r"(?!(?:true|false|none|True|False|None|and|or|not|in|is|if|else)\b)"
#: ``{{ name.attr }}``, with filters taking at most one plain literal (``| default('you')``,
#: ``| upper``), the most common templates: valid without asking the parser, reading ``name``.
_SIMPLE_REFERENCE = re.compile(
    r"\{\{\s*" + _NOT_NAMES + r"([A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*"
    r"(?:\s*\|\s*" + _NOT_NAMES + r"[A-Za-z_]\w*"
    r"(?:\(\s*(?:'[^'\\{}]*'|\"[^\"\\{}]*\"|[0-9]+)?\s*\))?)*\s*\}\}"
)


def syntax_problem(text: str, names: frozenset[str] = frozenset()) -> str | None:
    """Why Jinja cannot read this text, in words an author can act on; None when it can."""
    return _syntax_problem(text, names)


@lru_cache(maxsize=16384)
def _syntax_problem(text: str, names: frozenset[str]) -> str | None:
    allowed = CONTEXT_NAMES | names
    if "{%" not in text and "{#" not in text:
        rest = _SIMPLE_REFERENCE.sub("", text)
        if "{{" not in rest and "}}" not in rest:
            used = set(_SIMPLE_REFERENCE.findall(text))
            return _unknown_names(used, allowed)
        read = _expressions_names(text)
        if read is not None:
            return _unknown_names(set(read), allowed)
    try:
        if "{#" in text and _has_comment(text):
            return (
                "'{#' starts a Jinja comment, so the text after it would vanish; to show the "
                "characters, write {{ '{#' }}"
            )
        ast = ENV.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        hint = ""
        if "{%" in text:
            hint = "; to show '{%' literally, write {{ '{%' }}"
        return f"Jinja syntax: {exc.message} (line {exc.lineno} of the text){hint}"
    return _unknown_names(_loaded_names(ast), allowed)


#: One ``{{ ... }}`` of a text, up to the first ``}}`` (a ``-`` of whitespace control stays in
#: it: parsed inside ``{{`` and ``}}`` again, it means the same).
_EXPRESSION_BLOCK = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


def _expressions_names(text: str) -> frozenset[str] | None:
    """The names the ``{{ ... }}`` of a text (with no ``{%`` or ``{#``) read, when each one
    parses alone; None to let the whole text be parsed (a mistake, or a split this cannot
    trust). Texts differ around the same expressions (``Rule 12 for {{ event.name }}``), so
    each expression is parsed once however many texts hold it. Cutting at the first ``}}``
    is safe: a ``}}`` inside a string of the expression leaves the quote unclosed, which does
    not parse, so the whole text is parsed instead."""
    rest = _EXPRESSION_BLOCK.sub("", text)
    if "{{" in rest or "}}" in rest:
        return None
    used: set[str] = set()
    for expression in _EXPRESSION_BLOCK.findall(text):
        names = _expression_names(_WHOLE_NUMBER.sub("0", expression))
        if names is None:
            return None
        used |= names
    return frozenset(used)


#: A whole number Jinja reads as one integer token (not part of a name, a float, ``1_000``,
#: ``0x1f`` or ``012``): any other in its place reads the same names and parses the same, so
#: ``event.score > 12`` and ``event.score > 40`` share one parse (a threshold differs from
#: rule to rule; parsing is 0.5 ms an expression).
_WHOLE_NUMBER = re.compile(r"(?<![\w.])[1-9][0-9]*(?![\w.])")


@lru_cache(maxsize=16384)
def _expression_names(expression: str) -> frozenset[str] | None:
    """The names one ``{{ expression }}`` reads; None when it does not parse alone."""
    try:
        ast = ENV.parse("{{" + expression + "}}")
    except jinja2.TemplateSyntaxError:
        return None
    return frozenset(_loaded_names(ast))


def _loaded_names(ast: nodes.Template) -> set[str]:
    """Names a template reads that it does not set itself (loops, set, macros)."""
    stored = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    return {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"} - stored


def _unknown_names(used: set[str], allowed: frozenset[str]) -> str | None:
    unknown = sorted(used - allowed - set(ENV.globals) - {"loop"})
    if not unknown:
        return None
    name = unknown[0]
    hint = did_you_mean(name, allowed) or (
        f" (a field of the event is written event.{name}, of a poll rule's feed item item.{name})"
    )
    return (
        f"unknown name '{name}' in the template; the names a template can use here "
        f"are {', '.join(sorted(allowed))}{hint}"
    )


def _has_comment(text: str) -> bool:
    return any(token == "comment_begin" for _, token, _ in ENV.lex(text))


@lru_cache(maxsize=65536)
def compile_text(text: str) -> jinja2.Template:
    return ENV.from_string(text)


@lru_cache(maxsize=4096)
def compile_expression(text: str) -> Callable[..., Any]:
    """``"{{ expr }}"`` as a callable giving the expression's value (a list, a boolean...)."""
    match = _WHOLE_EXPRESSION.match(text)
    if not match:
        raise RenderError("must be one Jinja expression written as {{ ... }}")
    return ENV.compile_expression(match.group("expr"), undefined_to_none=False)


def is_expression(text: str) -> bool:
    return bool(_WHOLE_EXPRESSION.match(text)) and text.count("{{") == 1


#: ``{{ name.attr.attr }}`` and nothing else: Jinja's code for it is ``str(finalize(getattr(..)))``
#: on the name's value, which :func:`render_detail` runs itself, saving Jinja's context (most
#: of the cost of a ``for_each`` target's ``{{ p.id }}``). Jinja's constants are not names.
_LONE_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_]\w*)((?:\s*\.\s*[A-Za-z_]\w*)*)\s*\}\}", re.ASCII)
_CONSTANTS = frozenset({"true", "false", "none", "True", "False", "None"})
_FALL_BACK = object()


@lru_cache(maxsize=16384)
def _lone_reference(text: str) -> tuple[str, tuple[str, ...]] | None:
    match = _LONE_REFERENCE.fullmatch(text)
    if match is None or match.group(1) in _CONSTANTS:
        return None
    attributes = tuple(a.strip() for a in match.group(2).split(".")[1:])
    return match.group(1), attributes


@lru_cache(maxsize=4096)
def gives_one_value(text: str) -> bool:
    """Whether ``{{ expression }}`` gives one value read, filtered or not (``event.vip``,
    ``event["vip"] | lower``), rather than picking among several (``a and b``, ``a or b``,
    ``a if c else b``), whose result is a value the author asked for."""
    try:
        body = ENV.parse(text).body
    except (jinja2.TemplateSyntaxError, RecursionError):
        return False
    if len(body) != 1 or not isinstance(body[0], nodes.Output) or len(body[0].nodes) != 1:
        return False
    return not isinstance(body[0].nodes[0], nodes.And | nodes.Or | nodes.CondExpr)


#: What ``getattr`` finds on a plain dict: for any other name the sandbox's lookup fails over
#: to the item, which is then all it does (a JSON event's dicts, their ``.id``).
_DICT_NAMES = frozenset(dir(dict))


def _follow(value: Any, attributes: tuple[str, ...]) -> Any:
    """The sandbox's lookups of ``name.a.b``; :data:`_FALL_BACK` when one finds nothing, so
    Jinja itself renders the text and raises its own error, word for word."""
    for attribute in attributes:
        if type(value) is dict and attribute not in _DICT_NAMES:
            bounds.step()  # as the sandbox's getattr counts it
            value = value.get(attribute, _FALL_BACK)
            if value is _FALL_BACK:
                return _FALL_BACK
            continue
        value = ENV.getattr(value, attribute)
        if isinstance(value, jinja2.Undefined):
            return _FALL_BACK
    return value


@dataclass(frozen=True, slots=True)
class Rendered:
    """A rendered text, and how many null (None) values it printed as empty text."""

    text: str
    nulls: int = 0


def render(text: str, context: Mapping[str, Any]) -> str:
    """Render one text, bounded in size and work; undefined names and limits raise RenderError."""
    return render_detail(text, context).text


def render_detail(text: str, context: Mapping[str, Any]) -> Rendered:
    """:func:`render`, also saying whether a null was printed (a target id must not be)."""
    if not is_template(text):
        return Rendered(text)
    return _render(text, _lone_reference(text), context)


def prepare(text: str) -> Callable[[Mapping[str, Any]], Rendered]:
    """:func:`render_detail` of one text with its reading done once: what a ``for_each``
    target's texts are rendered with, once per item."""
    if not is_template(text):
        done = Rendered(text)
        return lambda _context: done
    return partial(_render, text, _lone_reference(text))


def _render(
    text: str, reference: tuple[str, tuple[str, ...]] | None, context: Mapping[str, Any]
) -> Rendered:
    budget, token = bounds.enter()
    try:
        if reference is not None and reference[0] in context:
            budget.start_text()
            value = _follow(context[reference[0]], reference[1])
            if value is not _FALL_BACK:
                out = str(_finalize(value))  # one piece: of _collect, its size check applies
                if len(out) > MAX_OUTPUT:
                    raise RenderError(f"the template renders more than {MAX_OUTPUT:,} characters")
                return Rendered(out, budget.nulls)
        template = compile_text(text)
        budget.start_text()
        return Rendered(_collect(template.generate(context)), budget.nulls)
    except _CAUGHT as exc:
        raise _render_error(exc, text, context) from None
    finally:
        bounds.leave(token)


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    """The value of a ``{{ expr }}`` text (for ``when`` and ``for_each``)."""
    budget, token = bounds.enter()
    try:
        expression = compile_expression(text)
        budget.start_text()
        value = expression(**context)
        if isinstance(value, jinja2.Undefined):
            str(value)  # a StrictUndefined raises here, naming the missing name
        return value
    except _CAUGHT as exc:
        raise _render_error(exc, text, context) from None
    finally:
        bounds.leave(token)


#: What a template may raise: each becomes a RenderError (RecursionError is a RuntimeError).
_CAUGHT = (
    RenderError,
    bounds.BoundExceeded,
    jinja2.TemplateError,
    RecursionError,
    MemoryError,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    AttributeError,
)


def _render_error(exc: Exception, text: str, context: Mapping[str, Any]) -> RenderError:
    """Whatever went wrong inside a template, as a RenderError an author can act on."""
    if isinstance(exc, RenderError):
        return exc
    if isinstance(exc, bounds.BoundExceeded):
        return RenderError(str(exc))
    if isinstance(exc, jinja2.UndefinedError):
        return _undefined(exc, text, context)
    if isinstance(exc, RecursionError):
        return RenderError(
            "the template or its data nests too deeply to render (macros, recursive loops or "
            "nested lists); flatten the data or limit the nesting"
        )
    if isinstance(exc, MemoryError):
        return RenderError("the template needs more memory than a push may use")
    return RenderError(f"template error: {exc}")


def _collect(chunks: Iterable[str]) -> str:
    """Join the output, bounded; a ``$`` and a ``{`` from two different pieces (a value and the
    text around it) are kept apart, so no ``${macro}`` is formed from data."""
    out: list[str] = []
    size = 0
    for chunk in chunks:
        if not chunk:
            continue
        if out and chunk[0] == "{" and out[-1][-1] == "$":
            chunk = MACRO_BREAK + chunk
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise RenderError(f"the template renders more than {MAX_OUTPUT:,} characters")
        out.append(chunk)
    return "".join(out)


fire_budget = bounds.fire_budget
check_time = bounds.check_time

_OWNERS = {"event": "the event", "item": "the feed item", "vars": "the rule's vars"}


def _undefined(exc: jinja2.UndefinedError, text: str, context: Mapping[str, Any]) -> RenderError:
    """Name the missing input the way the author wrote it: ``event.first_name``."""
    message = str(exc.message or exc)
    top = re.search(r"'([^']+)' is undefined", message)
    if top:
        name = top.group(1)
        hint = " (not in the event, item or vars given)"
        for owner in ("event", "item"):
            data = context.get(owner)
            if isinstance(data, Mapping) and name in data:
                hint = f"; {_OWNERS[owner]} has a field '{name}': write {owner}.{name}"
                break
        return RenderError(f"'{name}' is undefined{hint}", name)
    field = re.search(r"has no attribute '([^']+)'", message)
    if not field:
        return RenderError(message)
    name = field.group(1)
    reference = next((r for r in references(text) if r.rsplit(".", 1)[-1] == name), None)
    if reference is None:
        return RenderError(
            f"'{name}' is undefined (the event, item or vars given has no such field)"
        )
    root = reference.split(".", 1)[0]
    owner = _OWNERS.get(root, f"'{reference.rsplit('.', 1)[0]}'")
    return RenderError(f"{reference} is undefined: {owner} has no field '{name}'", reference)


def _path(node: nodes.Node) -> str | None:
    """``event.a['b']`` -> ``"event.a.b"``; None for anything but names and plain lookups."""
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Getattr):
        base = _path(node.node)
        return f"{base}.{node.attr}" if base else None
    if (
        isinstance(node, nodes.Getitem)
        and isinstance(node.arg, nodes.Const)
        and isinstance(node.arg.value, str)
    ):
        base = _path(node.node)
        return f"{base}.{node.arg.value}" if base else None
    return None


@lru_cache(maxsize=4096)
def references(text: str) -> tuple[str, ...]:
    """The dotted inputs a template reads (``event.member_id``), shortest first."""
    try:
        ast = ENV.parse(text)
    except (jinja2.TemplateSyntaxError, RecursionError):
        return ()
    found = {p for n in ast.find_all((nodes.Getattr, nodes.Getitem)) if (p := _path(n))}
    return tuple(sorted(found, key=lambda p: (p.count("."), p)))


#: The ``rule`` fields a template may read that do not depend on the rule's timezone.
_ZONELESS_RULE_FIELDS = frozenset({"rule.id", "rule.description"})


@lru_cache(maxsize=4096)
def timezone_reads(text: str) -> tuple[str, ...]:
    """Which of ``now`` and ``rule.timezone`` a template reads: both are the rule's timezone
    (``now`` is the fire's moment there), so a change of that timezone changes what the
    template gives. ``rule`` read whole counts as ``rule.timezone``; ``rule.id`` does not."""
    try:
        ast = ENV.parse(text)
    except (jinja2.TemplateSyntaxError, RecursionError):
        return ()
    names = _loaded_names(ast)
    found = ["now"] if "now" in names else []
    if "rule" in names:
        uses = sum(n.name == "rule" and n.ctx == "load" for n in ast.find_all(nodes.Name))
        zoneless = sum(
            isinstance(n, nodes.Getattr | nodes.Getitem)
            and isinstance(n.node, nodes.Name)
            and _path(n) in _ZONELESS_RULE_FIELDS
            for n in ast.find_all((nodes.Getattr, nodes.Getitem))
        )
        if uses > zoneless:
            found.append("rule.timezone")
    return tuple(found)


def blank_references(text: str, context: Mapping[str, Any]) -> list[str]:
    """Which of the inputs a template reads are null, missing or empty, in words:
    ``["event.member_id is null"]``. Used to say why a target id came out empty."""
    found: list[str] = []
    for reference in references(text):
        if any(reference.startswith(f"{f.split(' ')[0]}.") for f in found):
            continue  # event.a is missing: event.a.b need not be said too
        value: Any = context
        state = None
        for part in reference.split("."):
            if not isinstance(value, Mapping):
                value = None
                break
            if part not in value:
                state = "missing"
                break
            value = value[part]
        if state is None:
            if value is None:
                state = "null"
            elif isinstance(value, str) and not value.strip():
                state = "empty"
        if state:
            found.append(f"{reference} is {state}")
    return found


class _Missing:
    """What :func:`read_values` gives for an input the context does not have."""

    def __repr__(self) -> str:
        return "missing"


MISSING = _Missing()


def read_values(text: str, context: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The inputs a template reads and their values in ``context`` (:data:`MISSING` when
    absent), for saying why a ``when`` came out as it did: ``[("item.price", 129)]``.
    Only the deepest of nested references is given (``event.a.b``, not ``event.a`` too)."""
    found = references(text)
    deepest = [r for r in found if not any(o.startswith(f"{r}.") for o in found)]
    out: list[tuple[str, Any]] = []
    for reference in deepest:
        value: Any = context
        for part in reference.split("."):
            if isinstance(value, Mapping):
                value = value.get(part, MISSING)
            elif value is not MISSING and not part.startswith("_"):
                value = getattr(value, part, MISSING)
            if value is MISSING:
                break
        out.append((reference, value))
    return out
