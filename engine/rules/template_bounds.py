"""What one rendering may cost, and the checks that keep it there.

A rule's template is code its author wrote, and event data is whatever arrived; neither may
stall the daemon or exhaust its memory. So every known way to build a large value is checked
*before* the value is built (a width, a format field, a ``replace``, a ``join``), every loop
turn, call and lookup is counted, nesting is capped well below Python's own recursion limit,
and a fire as a whole gets a budget of processor time. Each check raises ``BoundExceeded``
(turned into a render problem by :mod:`engine.rules.templating`), so the worst template fails only
its own fire, fast. Nothing here uses threads or signals: the checks run inside the sandbox's
hooks, in the thread that renders.
"""

from __future__ import annotations

import contextvars
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from engine.errors import PushrulesError

#: Characters one rendering may produce.
MAX_OUTPUT = 100_000
#: Items one ``range`` may hold, and loop steps one rendering may take over ranges.
MAX_RANGE = 10_000
#: Length of a string or list one operation may build.
MAX_SEQUENCE = 100_000
#: Loop turns, calls, lookups and operators one text may take.
MAX_STEPS = 250_000
#: How deeply macros and recursive loops may call themselves. Each level costs Python about
#: six frames; 50 levels stay far below Python's limit of 1,000 wherever rendering runs.
MAX_DEPTH = 50
#: Processor seconds rendering one fire (its ``when``, or all its texts and targets) may use.
FIRE_SECONDS = 5.0
#: A bigint larger than this many bits is refused (``str()`` of it would fail anyway).
MAX_INT_BITS = 20_000


class BoundExceeded(PushrulesError):
    """A template went past one of the limits; the message says which, in an author's words."""


@dataclass(slots=True)
class Budget:
    """What is left for the text being rendered, and for the fire it belongs to."""

    deadline: float  # time.thread_time() value past which the fire stops
    steps: int = MAX_STEPS
    ranges: int = MAX_RANGE
    depth: int = 0
    nulls: int = 0  # values printed as '' because they were null (None)
    tick: int = 0
    left: float | None = None  # seconds left when paused (see resumed)

    def start_text(self) -> None:
        self.steps, self.ranges, self.depth, self.nulls = MAX_STEPS, MAX_RANGE, 0, 0


_budget: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "pushrules_render_budget", default=None
)


@contextmanager
def fire_budget(seconds: float | None = None) -> Iterator[Budget]:
    """One budget for everything rendered inside (nested uses share the outermost one)."""
    active = _budget.get()
    if active is not None:
        yield active
        return
    budget = Budget(deadline=time.thread_time() + (FIRE_SECONDS if seconds is None else seconds))
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def new_budget() -> Budget:
    """A fire's budget to render it in steps, each inside :func:`resumed`."""
    return Budget(deadline=time.thread_time() + FIRE_SECONDS, left=FIRE_SECONDS)


@contextmanager
def resumed(budget: Budget) -> Iterator[Budget]:
    """``budget`` in force again, for one step of a fire rendered in steps: what the thread
    did between two steps (answering others) is not counted against it, and a step may run in
    another thread than the previous one. Inside another fire's budget, that one is shared."""
    active = _budget.get()
    if active is not None:
        yield active
        return
    if budget.left is not None:
        budget.deadline = time.thread_time() + budget.left
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        budget.left = budget.deadline - time.thread_time()
        _budget.reset(token)


def enter() -> tuple[Budget, contextvars.Token[Budget | None] | None]:
    """The active budget, or a new one for a rendering outside any fire (then ``leave`` it)."""
    active = _budget.get()
    if active is not None:
        return active, None
    budget = Budget(deadline=time.thread_time() + FIRE_SECONDS)
    return budget, _budget.set(budget)


def leave(token: contextvars.Token[Budget | None] | None) -> None:
    if token is not None:
        _budget.reset(token)


def step(count: int = 1) -> None:
    """Count work; past the text's steps or the fire's time, stop the rendering."""
    budget = _budget.get()
    if budget is None:
        return
    budget.steps -= count
    if budget.steps < 0:
        raise BoundExceeded(
            f"the template takes more than {MAX_STEPS:,} steps (loop turns, calls, lookups); "
            "loop over less data or simplify it"
        )
    budget.tick += 1
    if budget.tick & 255 == 0:
        check_time(budget)


def check_time(budget: Budget | None = None) -> None:
    budget = budget or _budget.get()
    if budget is not None and time.thread_time() > budget.deadline:
        raise BoundExceeded(
            f"rendering this fire took more than {FIRE_SECONDS:g} s of processor time; "
            "the template or its for_each list does too much work"
        )


def take_range(length: int) -> None:
    budget = _budget.get()
    left = (budget.ranges if budget is not None else MAX_RANGE) - length
    if length > MAX_RANGE or left < 0:
        raise BoundExceeded(
            f"the template's loops over range() take more than {MAX_RANGE:,} steps in all"
        )
    if budget is not None:
        budget.ranges = left


@contextmanager
def nested() -> Iterator[None]:
    """One level of macro or recursive-loop nesting."""
    budget = _budget.get()
    if budget is None:
        yield
        return
    budget.depth += 1
    try:
        if budget.depth > MAX_DEPTH:
            raise BoundExceeded(
                f"macros or recursive loops nest more than {MAX_DEPTH} levels deep; "
                "the data is nested too deeply, or a macro calls itself without end"
            )
        yield
    finally:
        budget.depth -= 1


def counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """An iterable whose every item counts as a step (a loop turn)."""
    for value in iterable:
        step()
        yield value


def note_null() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.nulls += 1


# --- sizes ---------------------------------------------------------------------------------


def flat_size(value: Any, limit: int = MAX_SEQUENCE) -> int:
    """A lower bound of ``len(str(value))``, walking containers without building text.

    Stops counting a little past ``limit``: a list of 100,000 references to one list of
    100,000 items is small in memory but 10 GB as text, and this finds that in 100,000 steps.
    """
    total = 0
    stack = [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes):
            total += len(item)
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += max(1, item.bit_length() // 3)
        else:
            total += 1
    return total


def refuse_size(what: str, size: int) -> None:
    if size > MAX_SEQUENCE:
        raise BoundExceeded(f"{what} would build more than {MAX_SEQUENCE:,} characters or items")


def check_result(what: str, value: Any) -> Any:
    """After building: sized values and big integers stay under the limits."""
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
        if len(value) > MAX_SEQUENCE:
            raise BoundExceeded(f"{what} built {len(value):,} items; the limit is {MAX_SEQUENCE:,}")
    elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise BoundExceeded(f"{what} built a number too large for a push")
    return value


#: ``%`` conversions: flags, then width and precision (digits or ``*``).
_PERCENT = re.compile(
    r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<precision>\*|\d*))?[hlL]?"
    r"(?P<type>[diouxXeEfFgGcrsa%])"
)


def check_percent(template: str, values: Any) -> None:
    """``'%09999999d' % 1`` would allocate the width at once: refuse large widths first."""
    star = False
    for match in _PERCENT.finditer(template):
        for part in ("width", "precision"):
            number = match.group(part)
            if number == "*":
                star = True
            elif number and int(number) > MAX_SEQUENCE:
                raise BoundExceeded(
                    f"a % format {part} of {int(number):,}; the limit is {MAX_SEQUENCE:,}"
                )
    items = values if isinstance(values, tuple) else (values,)
    if star and any(
        isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SEQUENCE for v in items
    ):
        raise BoundExceeded(f"a % format width over {MAX_SEQUENCE:,}")
    refuse_size("the % format", len(template) + sum(flat_size(v) for v in items))


#: A format spec: [[fill]align][sign][z][#][0][width][grouping][.precision][type].
_SPEC = re.compile(r"^(?:.?[<>=^])?[+\- ]?z?#?0?(?P<width>\d*)[,_]?(?:\.(?P<precision>\d*))?")


def check_format_field(value: Any, spec: str) -> None:
    """One ``{...}`` field of ``str.format``: its width, precision and value stay small."""
    match = _SPEC.match(spec)
    if match:
        for part in ("width", "precision"):
            number = match.group(part)
            if number and int(number) > MAX_SEQUENCE:
                raise BoundExceeded(
                    f"a format {part} of {int(number):,}; the limit is {MAX_SEQUENCE:,}"
                )
    refuse_size("a format field", flat_size(value))


# --- functions that multiply sizes -----------------------------------------------------------


def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _replace_size(text: str, old: Any, new: Any, count: Any) -> int:
    old, new = _text(old), _text(new)
    hits = len(text) + 1 if old == "" else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(0, len(new) - len(old))


def _join_size(separator: str, items: list[Any]) -> int:
    total = len(separator) * max(0, len(items) - 1)
    for item in items:
        total += len(item) if isinstance(item, str) else flat_size(item)
        if total > MAX_SEQUENCE:
            break
    return total


def _width_size(text: str, width: Any) -> int:
    return max(len(text), _int(width))


def _translate_size(text: str, table: Any) -> int:
    longest = 1
    if isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(text) * max(longest, 1)


def _expandtabs_size(text: str, tabsize: Any = 8) -> int:
    return len(text) + text.count("\t") * max(_int(tabsize, 8), 0)


#: ``str`` methods whose result can be far larger than their inputs: (text, args) -> size.
STR_METHODS: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *_: _width_size(s, width),
    "ljust": lambda s, width=0, *_: _width_size(s, width),
    "rjust": lambda s, width=0, *_: _width_size(s, width),
    "zfill": lambda s, width=0, *_: _width_size(s, width),
    "expandtabs": lambda s, tabsize=8, *_: _expandtabs_size(s, tabsize),
    "replace": lambda s, old="", new="", count=-1, *_: _replace_size(s, old, new, count),
    "join": lambda s, items=(), *_: _join_size(s, list(items)),
    "translate": lambda s, table=None, *_: _translate_size(s, table),
}


def _indent_size(s: Any, width: Any = 4, *_: Any) -> int:
    text = str(s)
    pad = len(width) if isinstance(width, str) else _int(width)
    return len(text) + (text.count("\n") + 1) * pad


def _wordwrap_size(s: Any, width: Any = 79, _b: Any = True, wrapstring: Any = None, *_: Any) -> int:
    text = str(s)
    breaks = min(
        len(text),
        len(text) // max(_int(width, 79), 1) + sum(text.count(c) for c in " -\n\t") + 1,
    )
    return len(text) + breaks * max(len(_text(wrapstring)), 1)


def _urlize_size(s: Any, *args: Any, **kwargs: Any) -> int:
    text = str(s)
    extra = sum(len(a) for a in (*args, *kwargs.values()) if isinstance(a, str))
    return 3 * len(text) + (len(text) // 4 + 1) * (extra + 40)


def _sum_size(iterable: Any, attribute: Any = None, start: Any = 0, *_: Any) -> int:
    if not isinstance(start, str | list | tuple):
        return 0  # numbers: the honest use
    if attribute is not None:
        return MAX_SEQUENCE + 1  # adding up lists picked from items: too costly to foresee
    return len(start) + sum(len(i) for i in iterable if isinstance(i, str | list | tuple))


def _count_size(_value: Any, count: Any = 0, fill_with: Any = None, *_: Any) -> int:
    return _int(count) if fill_with is not None else 0


def _slice_size(_value: Any, slices: Any = 0, *_: Any) -> int:
    return _int(slices)


#: Jinja filters whose result can be far larger than their inputs: (value, args) -> size.
#: ``join`` and ``sum`` receive their list already materialised (see ``materialise``).
FILTERS: dict[str, Callable[..., int]] = {
    "center": lambda s, width=80, *_: _width_size(str(s), width),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": lambda s, old="", new="", count=None, *_: _replace_size(
        str(s), old, new, -1 if count is None else count
    ),
    "join": lambda items, d="", *_: _join_size(_text(d), list(items)),
    "urlize": _urlize_size,
    "sum": lambda items, attribute=None, start=0: _sum_size(items, attribute, start),
    "batch": _count_size,
    "slice": _slice_size,
}

#: Filters that turn their value into text: a huge nested value is refused before that.
STRINGIFYING = frozenset(
    {
        "capitalize", "center", "e", "escape", "forceescape", "indent", "lower", "pprint",
        "replace", "string", "striptags", "title", "tojson", "trim", "truncate", "upper",
        "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr",
    }
)  # fmt: skip

#: Filters whose first argument is consumed as a list: a generator is listed once, so the
#: estimate and the filter see the same items.
MATERIALISE = frozenset({"join", "sum"})


def materialise(value: Any) -> Any:
    if isinstance(value, str | bytes | Mapping | list | tuple):
        return value
    items = []
    for item in value:
        items.append(item)
        if len(items) > MAX_SEQUENCE:
            raise BoundExceeded(f"a list of more than {MAX_SEQUENCE:,} items")
    return items
