"""Does a request body hold what a rule test names? Subset matching, and the views to diff.

A mapping matches when every key it names matches (other keys of the request are ignored); a
list matches a list of the same length, element by element; a scalar matches the value's text
(``badge: 0`` matches ``0``, ``memberId: 765c8`` matches ``"765c8"``). Beside the verdict come
two views for a readable diff: what the test names, and the request cut down to the same keys.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.rules.cases import json_value
from engine.rules.problems import did_you_mean, field_path


@dataclass(frozen=True, slots=True)
class Difference:
    path: tuple[Any, ...]  # inside the body, like ("message", "subject")
    message: str  # in words: 'expected "Flight cancelled", got "Flight canceled"'


@dataclass(frozen=True, slots=True)
class Comparison:
    expected: Any  # what the test names, as JSON values
    actual: Any  # the request, cut down to what the test names
    differences: tuple[Difference, ...]

    @property
    def matches(self) -> bool:
        return not self.differences


def show(value: Any, indent: int | None = None) -> str:
    """A value as JSON, the way the request spells it; characters that print as nothing (the
    zero-width space that keeps data from forming a ``${macro}``) are written as escapes, so
    two texts that differ never look alike."""
    return visible(json.dumps(value, ensure_ascii=False, indent=indent))


def visible(text: str) -> str:
    return "".join(
        f"\\u{ord(c):04x}" if c not in " \n" and unicodedata.category(c) in _INVISIBLE else c
        for c in text
    )


#: Unicode categories that print as nothing or as a blank: format, separators, controls.
_INVISIBLE = frozenset({"Cf", "Zs", "Zl", "Zp", "Cc"})


def _first_difference(expected: str, actual: str) -> str:
    """Where two long texts part: `` (from character 58: "8 December" against "7 December")``,
    so a one-letter slip in a long text is found at once."""
    if len(expected) < 30 and len(actual) < 30:
        return ""
    at = next(
        (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
        min(len(expected), len(actual)),
    )
    return (
        f" (from character {at + 1}: {show(expected[at : at + 16])} against "
        f"{show(actual[at : at + 16])})"
    )


def text_of(value: Any) -> str:
    """A request value's text, what a test's scalar is compared with."""
    return value if isinstance(value, str) else show(value)


def scalar_matches(expected: Any, actual: Any) -> bool:
    """``expected`` (a scalar as the author wrote it) against a request's scalar value: the
    same text, or the same number or truth value however it is written (``1.50``, ``True``)."""
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(actual, dict | list):
        return False
    text = str(expected)
    if text == text_of(actual):
        return True
    if isinstance(actual, bool):
        return text.lower() == ("true" if actual else "false")
    if isinstance(actual, int | float) and _NUMBER.fullmatch(text):
        return float(text) == actual
    return False


_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def compare(expected: Any, actual: Any, path: tuple[Any, ...] = ()) -> Comparison:
    """Match ``expected`` (as written in the test) against ``actual`` (a compiled value)."""
    if isinstance(expected, Mapping):
        return _mapping(expected, actual, path)
    if isinstance(expected, list):
        return _list(expected, actual, path)
    if scalar_matches(expected, actual):
        return Comparison(actual, actual, ())
    wanted = json_value(expected)
    if isinstance(actual, dict | list):
        message = f"expected {show(wanted)}, got {_kind(actual)}"
    else:
        message = f"expected {show(wanted)}, got {show(actual)}"
        if isinstance(wanted, str) and isinstance(actual, str):
            message += _first_difference(wanted, actual)
    return Comparison(wanted, actual, (Difference(path, message),))


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping" + (f" ({', '.join(value)})" if value else "")
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return show(value)


def _mapping(expected: Mapping[Any, Any], actual: Any, path: tuple[Any, ...]) -> Comparison:
    if not isinstance(actual, Mapping):
        message = f"expected a mapping, got {_kind(actual)}"
        return Comparison(json_value(expected), actual, (Difference(path, message),))
    wanted: dict[str, Any] = {}
    got: dict[str, Any] = {}
    found: list[Difference] = []
    for key, value in expected.items():
        name = str(key)
        if name not in actual:
            wanted[name] = json_value(value)
            where = f"'{field_path(path)}'" if path else "the request"
            found.append(
                Difference(
                    (*path, name),
                    f"{where} has no field '{name}'{did_you_mean(name, actual)}; it has: "
                    f"{', '.join(actual) or 'nothing'}",
                )
            )
            continue
        inner = compare(value, actual[name], (*path, name))
        wanted[name] = inner.expected
        got[name] = inner.actual
        found.extend(inner.differences)
    return Comparison(wanted, got, tuple(found))


def _list(expected: list[Any], actual: Any, path: tuple[Any, ...]) -> Comparison:
    if not isinstance(actual, list):
        message = f"expected a list of {len(expected)}, got {_kind(actual)}"
        return Comparison(json_value(expected), actual, (Difference(path, message),))
    if len(expected) != len(actual):
        message = (
            f"expected {len(expected)} item{'s' if len(expected) != 1 else ''}, "
            f"the request has {len(actual)}"
        )
        return Comparison(json_value(expected), _cut(actual), (Difference(path, message),))
    parts = [
        compare(e, a, (*path, i)) for i, (e, a) in enumerate(zip(expected, actual, strict=True))
    ]
    return Comparison(
        [p.expected for p in parts],
        [p.actual for p in parts],
        tuple(d for p in parts for d in p.differences),
    )


#: Items of a list of the wrong length shown in full; the rest are counted.
SHOWN_ITEMS = 10


def _cut(actual: list[Any]) -> list[Any]:
    """A list of the wrong length, shown whole (its items are what the author must see), up
    to :data:`SHOWN_ITEMS`."""
    if len(actual) <= SHOWN_ITEMS:
        return actual
    return [*actual[:SHOWN_ITEMS], f"... and {len(actual) - SHOWN_ITEMS} more"]
