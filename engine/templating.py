"""Jinja2 for rule texts: sandboxed, strict about undefined names, bounded in time and memory.

``{{ ... }}`` and ``{% ... %}`` are ours, rendered when a rule fires; ``${name}`` is an Accengage
macro that Jinja leaves alone. Values that come from an event are data: rendering is one pass,
so an event field holding ``{{ 7*7 }}`` is sent as those characters.

Templates are compiled once per distinct source text and cached, so loading 1,000 rules that
share expressions compiles each expression once, and firing a rule compiles nothing.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

#: Characters one rendering may produce.
MAX_OUTPUT = 100_000
#: Items one ``range`` may hold, and loop steps one rendering may take over ranges.
MAX_RANGE = 10_000
#: Length of a string or list that ``*`` or ``+`` may build.
MAX_SEQUENCE = 100_000

CONTEXT_NAMES = frozenset({"event", "item", "now", "rule", "vars"})

_MARKERS = ("{{", "{%", "{#")
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)


class RenderError(Exception):
    """A template failed when the rule fired; the message says which name or limit."""


class _BoundedEnvironment(SandboxedEnvironment):
    """A sandbox that also refuses to build huge strings and lists."""

    intercepted_binops = frozenset({"*", "+", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
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
        return super().call_binop(context, operator, left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls in templates (``'x'.center(n)``, ``'{:>9}'.format(...)``) stay bounded too."""
        name = getattr(__obj, "__name__", "")
        # The sandbox wraps str.format; the string it formats is behind __wrapped__.
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            _check_width(name, (owner, *args))
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(f"{name}()" if name else "a call", result)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_sized(value: object) -> bool:
    return isinstance(value, str | list | tuple)


def _product_size(left: object, right: object) -> int:
    if _is_sized(left) and isinstance(right, int):
        return len(left) * right  # type: ignore[arg-type]
    if _is_sized(right) and isinstance(left, int):
        return len(right) * left  # type: ignore[arg-type]
    return 0


_range_budget: contextvars.ContextVar[int] = contextvars.ContextVar("range_budget", default=0)


def _bounded_range(*args: int) -> range:
    """``range`` with a per-item cap and a per-rendering budget, so nested loops stay bounded."""
    result = range(*args)
    left = _range_budget.get() - len(result)
    if len(result) > MAX_RANGE or left < 0:
        raise RenderError(
            f"the template's loops over range() take more than {MAX_RANGE:,} steps in all"
        )
    _range_budget.set(left)
    return result


#: Filters and str methods whose first argument is a width: the result is at least that long.
_WIDTH_FUNCTIONS = frozenset({"center", "indent", "ljust", "rjust", "zfill"})
_FORMAT_WIDTH = re.compile(r"\d{6,}")


def _check_width(name: str, args: tuple[Any, ...]) -> None:
    """Refuse before building: a huge width or format field would allocate it at once."""
    if name in _WIDTH_FUNCTIONS:
        widths = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
        if any(w > MAX_SEQUENCE for w in widths):
            raise RenderError(f"{name}() with a width over {MAX_SEQUENCE:,} characters")
    elif name == "format" and any(isinstance(a, str) and _FORMAT_WIDTH.search(a) for a in args):
        raise RenderError(f"a format width over {MAX_SEQUENCE:,} characters")


def _check_size(name: str, result: Any) -> Any:
    if _is_sized(result) and len(result) > MAX_SEQUENCE:
        raise RenderError(f"{name} built {len(result):,} items; the limit is {MAX_SEQUENCE:,}")
    return result


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_width(name, args[1:] if name == "indent" else args)
        return _check_size(f"the {name} filter", function(*args, **kwargs))

    # Jinja passes the context or environment first to filters marked so; keep the mark.
    if hasattr(function, "jinja_pass_arg"):
        bounded.jinja_pass_arg = function.jinja_pass_arg  # type: ignore[attr-defined]
    return bounded


def _make_env() -> _BoundedEnvironment:
    env = _BoundedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    env.globals = {"range": _bounded_range, "dict": dict}
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    return env


ENV = _make_env()


def is_template(text: str) -> bool:
    """Whether Jinja would read anything in this text (fast path for the plain majority)."""
    return "{" in text and any(m in text for m in _MARKERS)


#: ``{{ name.attr }}`` alone, the most common template: valid without asking the parser.
_SIMPLE_REFERENCE = re.compile(r"\{\{\s*([A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*\s*\}\}")


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


def _loaded_names(ast: nodes.Template) -> set[str]:
    """Names a template reads that it does not set itself (loops, set, macros)."""
    stored = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    return {n.name for n in ast.find_all(nodes.Name) if n.ctx == "load"} - stored


def _unknown_names(used: set[str], allowed: frozenset[str]) -> str | None:
    unknown = sorted(used - allowed - set(ENV.globals) - {"loop"})
    if not unknown:
        return None
    return (
        f"unknown name '{unknown[0]}' in the template; the names a template can use here "
        f"are {', '.join(sorted(allowed))}"
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


def render(text: str, context: Mapping[str, Any]) -> str:
    """Render one text, bounded in output size; undefined names and limits raise RenderError."""
    if not is_template(text):
        return text
    template = compile_text(text)
    _range_budget.set(MAX_RANGE)
    try:
        return _collect(template.generate(context))
    except RenderError:
        raise
    except jinja2.UndefinedError as exc:
        raise RenderError(_undefined_words(exc)) from None
    except jinja2.TemplateError as exc:
        raise RenderError(f"template error: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
        raise RenderError(f"template error: {exc}") from None


def evaluate(text: str, context: Mapping[str, Any]) -> Any:
    """The value of a ``{{ expr }}`` text (for ``when`` and ``for_each``)."""
    expression = compile_expression(text)
    _range_budget.set(MAX_RANGE)
    try:
        value = expression(**context)
    except RenderError:
        raise
    except jinja2.UndefinedError as exc:
        raise RenderError(_undefined_words(exc)) from None
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise RenderError(f"template error: {exc}") from None
    if isinstance(value, jinja2.Undefined):
        try:
            str(value)
        except jinja2.UndefinedError as exc:
            raise RenderError(_undefined_words(exc)) from None
    return value


def _collect(chunks: Iterator[str]) -> str:
    out: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise RenderError(f"the template renders more than {MAX_OUTPUT:,} characters")
        out.append(chunk)
    return "".join(out)


def _undefined_words(exc: jinja2.UndefinedError) -> str:
    text = str(exc.message or exc)
    match = re.search(r"'([^']+)' is undefined", text)
    if match:
        return f"'{match.group(1)}' is undefined (not in the event, item or vars given)"
    match = re.search(r"has no attribute '([^']+)'", text)
    if match:
        return f"'{match.group(1)}' is undefined (the event, item or vars given has no such field)"
    return text
