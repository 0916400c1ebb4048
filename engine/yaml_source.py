"""YAML as the author wrote it: every node keeps its line and column, every scalar its text.

Rule authors are not developers, so YAML's implicit typing must not change what they meant:
``memberId: 0012`` stays ``"0012"``, ``language: no`` stays ``"no"``. Every scalar is loaded as
:class:`Scalar`, a ``str`` holding the text as written, with the YAML type it would have had
kept aside for the few fields the API types as boolean or integer. Nulls become ``None``.
Duplicate keys are an error instead of a silent overwrite.

Parsing uses libyaml (``CSafeLoader``) when available: it is several times faster than the
pure-Python loader and keeps marks just the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

try:
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_TYPED = {_BOOL, _INT, _FLOAT}
#: ``=`` alone resolves to YAML 1.1's "value" type; for us it is the text "=".
_VALUE = "tag:yaml.org,2002:value"
_KNOWN = {_STR, _NULL, _BOOL, _INT, _FLOAT, _MAP, _SEQ, _VALUE, "tag:yaml.org,2002:timestamp"}

#: Nodes a document may expand to through aliases before it is refused ("billion laughs").
MAX_NODES = 200_000

_constructor = yaml.constructor.SafeConstructor()


class Scalar(str):
    """A scalar as written. ``typed`` is the bool/int/float YAML would have made of a plain one."""

    __slots__ = ("column", "line", "typed")
    line: int
    column: int
    typed: bool | int | float | None

    def __new__(cls, text: str, line: int, column: int, typed: Any = None) -> Scalar:
        obj = super().__new__(cls, text)
        obj.line = line
        obj.column = column
        obj.typed = typed
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (Scalar, (str(self), self.line, self.column, self.typed))


class MarkedMap(dict):
    """A mapping with the position of itself and of each key."""

    __slots__ = ("column", "key_marks", "line")

    def __init__(self, line: int, column: int) -> None:
        super().__init__()
        self.line = line
        self.column = column
        self.key_marks: dict[str, tuple[int, int]] = {}


class MarkedList(list):
    """A sequence with its position."""

    __slots__ = ("column", "line")

    def __init__(self, line: int, column: int) -> None:
        super().__init__()
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class YamlIssue:
    """Something wrong with the YAML itself; positions are 1-based."""

    line: int | None
    column: int | None
    message: str


@dataclass(slots=True)
class Loaded:
    data: Any
    issues: list[YamlIssue]


def load(text: str) -> Loaded:
    """Parse one YAML document. Never raises: YAML errors come back as issues."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        return Loaded(None, [_syntax_issue(exc, mark, text)])
    except yaml.YAMLError as exc:
        return Loaded(None, [YamlIssue(None, None, f"not valid YAML: {exc}")])
    except (UnicodeDecodeError, ValueError) as exc:
        return Loaded(None, [YamlIssue(None, None, f"not readable as text: {exc}")])
    if node is None:
        return Loaded(None, [])
    builder = _Builder(text)
    try:
        data = builder.build(node)
    except _TooLarge:
        return Loaded(
            None,
            [
                YamlIssue(
                    1,
                    1,
                    f"the document expands to more than {MAX_NODES} values through "
                    "aliases (&/*); write the values out instead",
                )
            ],
        )
    return Loaded(data, builder.issues)


#: Characters YAML reads as syntax at the start of a value; such a value must be quoted.
_INDICATORS = {
    "\t": "YAML does not allow tabs: indent with spaces",
    "@": "quote values that start with @",
    "`": "quote values that start with `",
    "*": 'a value starting with * must be quoted, like "*/15 * * * *" (YAML reads * as an alias)',
    "&": "a value starting with & must be quoted (YAML reads & as an anchor)",
    "!": 'a value starting with ! must be quoted, like "!=" (YAML reads ! as a tag)',
    ">": 'a value starting with > must be quoted, like ">="',
    "|": "a value starting with | must be quoted",
    "%": "a value starting with % must be quoted",
    "{": 'Jinja in YAML must be quoted, like "{{ event.id }}"',
}


def _char_at(text: str, mark: Any) -> str:
    lines = text.splitlines()
    if mark is None or mark.line >= len(lines):
        return ""
    line = lines[mark.line]
    return line[mark.column] if mark.column < len(line) else ""


def _syntax_issue(exc: yaml.MarkedYAMLError, mark: Any, text: str) -> YamlIssue:
    problem = exc.problem or exc.context or "syntax error"
    hint = ""
    char = _char_at(text, mark)
    if char not in _INDICATORS:
        char = _char_at(text, exc.context_mark)
    if "expected a single document" in str(exc):
        problem = "the file holds several YAML documents (---); keep one rule per file"
    elif char in _INDICATORS:
        hint = "; " + _INDICATORS[char]
    elif "mapping values are not allowed" in problem:
        hint = (
            "; a value containing ': ' must be quoted, or a key is indented differently from "
            "the keys around it"
        )
    elif "found undefined alias" in problem:
        hint = "; define the anchor (&name) before using it, or quote a value starting with *"
    if mark is None:
        return YamlIssue(None, None, f"YAML syntax: {problem}{hint}")
    return YamlIssue(mark.line + 1, mark.column + 1, f"YAML syntax: {problem}{hint}")


class _TooLarge(Exception):
    pass


class _Builder:
    """Turns composed nodes into Scalar / MarkedMap / MarkedList, collecting issues."""

    def __init__(self, text: str = "") -> None:
        self.issues: list[YamlIssue] = []
        self.count = 0
        self.seen: dict[int, tuple[Any, int]] = {}
        self.text = text
        #: Keys of the mappings being built, innermost last (for hints that name the key).
        self.keys: list[str] = []

    def build(self, node: yaml.Node) -> Any:
        done = self.seen.get(id(node))
        if done is not None:
            # An alias: the same node again. Reuse it, but count what it expands to, so that
            # nested aliases cannot blow up whoever walks the data later.
            self.count += done[1]
            if self.count > MAX_NODES:
                raise _TooLarge
            return done[0]
        before = self.count
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if node.tag not in _KNOWN:
            if node.tag.startswith("!"):
                message = (
                    f'a value starting with ! must be quoted, like "{node.tag}" (YAML reads '
                    "! as a tag)"
                )
            else:
                message = f"YAML tag {node.tag} is not supported; remove it"
            self.issues.append(YamlIssue(line, column, message))
        if isinstance(node, yaml.ScalarNode):
            result = self._scalar(node, line, column)
        elif isinstance(node, yaml.SequenceNode):
            result = MarkedList(line, column)
            result.extend(self.build(item) for item in node.value)
        else:
            result = self._mapping(node, line, column)
        self.seen[id(node)] = (result, self.count - before)
        return result

    def _scalar(self, node: yaml.ScalarNode, line: int, column: int) -> Scalar | None:
        tag = node.tag
        if tag == _NULL:
            return None
        typed = None
        if tag in _TYPED:
            try:
                typed = _constructor.construct_object(node)
            except (yaml.YAMLError, ValueError):
                typed = None
        return Scalar(node.value, line, column, typed)

    def _mapping(self, node: yaml.MappingNode, line: int, column: int) -> MarkedMap:
        result = MarkedMap(line, column)
        for key_node, value_node in node.value:
            kline, kcol = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if not isinstance(key_node, yaml.ScalarNode):
                message = "a key must be a plain name"
                if isinstance(key_node, yaml.MappingNode):
                    owner = self.keys[-1] if self.keys else None
                    message = (
                        "this reads as a mapping inside a mapping: Jinja in YAML must be quoted; "
                        f"write {_quoted_hint(owner, node, self.text)}"
                    )
                self.issues.append(YamlIssue(kline, kcol, message))
                continue
            if key_node.tag == "tag:yaml.org,2002:merge":
                self.issues.append(
                    YamlIssue(
                        kline,
                        kcol,
                        "merge keys (<<) are not supported; use `use:` "
                        "templates or write the keys out",
                    )
                )
                continue
            key = key_node.value
            if key in result:
                first = result.key_marks[key][0]
                self.issues.append(
                    YamlIssue(
                        kline,
                        kcol,
                        f"duplicate key '{key}' (first set on line {first}); remove one of them",
                    )
                )
                continue
            result.key_marks[key] = (kline, kcol)
            self.keys.append(key)
            try:
                result[Scalar(key, kline, kcol)] = self.build(value_node)
            finally:
                self.keys.pop()
        return result


def _quoted_hint(key: str | None, node: yaml.Node, text: str) -> str:
    """The author's own unquoted ``{{ ... }}`` value, quoted, under the author's own key."""
    source = text[node.start_mark.index : node.end_mark.index]
    if "\n" in source or not source:
        source = "{{ ... }}"
    quoted = f'"{source}"' if '"' not in source else f"'{source}'"
    if '"' in source and "'" in source:
        quoted = '"{{ ... }}"'
    return f"{key}: {quoted}" if key is not None else quoted


def position(
    doc: Any, path: tuple[Any, ...], *, at_value: bool = False
) -> tuple[int | None, int | None]:
    """Line and column of the node at ``path``, or of its nearest existing ancestor.

    For a key that exists, the key's own position is given (where the author looks), or with
    ``at_value`` the position of its value when that value is a scalar (a wrong value).
    """
    node = doc
    best: tuple[int | None, int | None] = (getattr(doc, "line", None), getattr(doc, "column", None))
    for step in path:
        if isinstance(node, MarkedMap):
            if step not in node:
                break
            best = node.key_marks.get(step, best)
            node = node[step]
        elif isinstance(node, MarkedList) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
            best = (getattr(node, "line", best[0]), getattr(node, "column", best[1]))
        else:
            break
    else:
        if at_value and isinstance(node, Scalar):
            return node.line, node.column
    return best


def native(value: Any) -> Any:
    """The data with the YAML types kept aside put back: ``12`` an int, ``true`` a bool, any
    other scalar its text. For the few places that want YAML's types (vars, aps, settings)."""
    if isinstance(value, Scalar):
        return value.typed if value.typed is not None else str(value)
    if isinstance(value, dict):
        return {str(k): native(v) for k, v in value.items()}
    if isinstance(value, list):
        return [native(v) for v in value]
    return value
