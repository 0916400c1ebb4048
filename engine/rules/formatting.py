"""One layout for the files authors write (``pushrules fmt``), never changing what they mean.

Keys in the order of the schemas (the order docs/rules.md lists them), 2-space indents, and
quotes around text values that YAML would misread (``no``, ``0012``, ``1.10``) or that hold
``{{ }}``, ``${ }`` or ``#``. Comments and blank lines stay with the key they stand above.

The round trip is ruamel.yaml's, reading every plain value as text (as pushrules does), so a
value is written back exactly as it was. A file YAML cannot read is left alone; and each result
is read back with pushrules' own reader and compared with the original before it is accepted,
so a formatting that would change a value is refused rather than written.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.resolver import VersionedResolver
from ruamel.yaml.scalarstring import (
    DoubleQuotedScalarString,
    FoldedScalarString,
    LiteralScalarString,
)
from ruamel.yaml.tag import Tag
from ruamel.yaml.tokens import CommentToken

from engine.errors import PushrulesError
from engine.rules import schemas
from engine.rules.yaml_source import Scalar, load

#: The kinds of file, by where they are in a project, and the fields of each.
FIELDS: dict[str, Mapping[str, Any]] = {
    "rule": schemas.RULE,
    "template": schemas.MESSAGE,
    "buttons": schemas.BUTTONS["schema"],
    "config": schemas.PROJECT,
    "tests": schemas.RULE_TEST,
}


def kind_of(rel: Path) -> str | None:
    """The kind of a file from its path in the project, or None when pushrules does not read it."""
    if rel.suffix not in (".yaml", ".yml") or any(p.startswith(".") for p in rel.parts):
        return None
    if rel == Path("pushrules.yaml"):
        return "config"
    top = rel.parts[0] if len(rel.parts) > 1 else ""
    if top == "rules":
        return "rule"
    if top == "rule-tests":
        return "tests"
    if rel.parts[:2] == ("templates", "messages") and len(rel.parts) > 2:
        return "template"
    if rel.parts[:2] == ("templates", "buttons") and len(rel.parts) > 2:
        return "buttons"
    return None


class FormatError(PushrulesError):
    """A file left as it is; the message says why (``LINE:COLUMN: ...`` when it has a place)."""


_NULL = Tag(suffix="tag:yaml.org,2002:null")
_NULL_WORDS = frozenset({"", "~", "null", "Null", "NULL"})


class _TextResolver(VersionedResolver):
    """Every plain value is text, as pushrules reads it; only nulls stay null."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is ScalarNode and implicit[0]:
            return _NULL if value in _NULL_WORDS else self.DEFAULT_SCALAR_TAG
        return super().resolve(kind, value, implicit)


def _yaml() -> YAML:
    handler = YAML()
    handler.Resolver = _TextResolver
    handler.preserve_quotes = True
    handler.indent(mapping=2, sequence=4, offset=2)
    handler.width = 1_000_000  # never fold a long value over lines
    # [{memberId: m1}] as written, not ruamel's [memberId: m1]: the same to YAML, not to a reader.
    handler.brace_single_entry_mapping_in_flow_sequence = True
    # A null as ``null``, as in flow style: ruamel writes it empty in block style, and an empty
    # list item is ``- `` (a trailing space; an end-of-line comment after it moved to the next
    # line at the next run: fmt was not stable).
    handler.representer.add_representer(type(None), _represent_null)
    return handler


def _represent_null(representer: Any, _: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def format_text(text: str, kind: str) -> str:
    """``text`` in pushrules' layout; :class:`FormatError` when it must be left as it is."""
    before = load(text)
    errors = [i for i in before.issues if i.severity == "error"]
    if errors:
        first = errors[0]
        where = f"{first.line}:{first.column}: " if first.line is not None else ""
        raise FormatError(f"{where}{first.message}; fix it first (validate shows every problem)")
    if before.data is None:
        return text  # nothing but comments: nothing to lay out
    handler = _yaml()
    try:
        data = handler.load(text)
    except YAMLError as exc:  # pragma: no cover - pushrules' reader refused it above
        raise FormatError(f"YAML: {exc}") from None
    _move_comment_tails(data)
    quoted: set[tuple[Any, ...]] = set()
    # A plain value cut by a ` #` keeps its warning (validate says the text was cut): unquoted.
    cut = {i.line - 1 for i in before.issues if i.line is not None}
    _lay_out(data, {"type": "dict", "schema": FIELDS[kind]}, (), _Quoting(quoted, cut))
    out = io.StringIO()
    handler.dump(data, out)
    # No blank line before the first line or after the last: a comment moved to the first key
    # would otherwise bring the blank line it stood after, and the next run take it away.
    result = _indent_comments(out.getvalue()).strip("\n") + "\n"
    _same_meaning(before.data, result, quoted)
    return result


# --- comments ------------------------------------------------------------------------------


def _slots(node: Any, in_flow: bool = False) -> Iterator[tuple[Any, Any, bool]]:
    """Every (collection, key or index, whether it is written in flow style) in file order."""
    if isinstance(node, CommentedMap | CommentedSeq):
        in_flow = in_flow or bool(node.fa.flow_style())
        keys = node if isinstance(node, CommentedMap) else range(len(node))
        for key in keys:
            yield node, key, in_flow
            yield from _slots(node[key], in_flow)


def _move_comment_tails(data: Any) -> None:
    """Give each full-line comment (and blank line) to the key or item below it.

    ruamel keeps the lines that follow a value's end-of-line comment with that value, and the
    lines above a nested mapping's first key with its parent; moved, they would leave the key
    they describe. Each goes to the next key or item written in block style instead (ruamel
    cannot write a comment inside ``{...}`` or ``[...]``), in front of it, which is where a
    reader sees it; a tail that no such key follows goes to the end of the file.
    """
    slots = list(_slots(data))
    for position, (owner, key, _) in enumerate(slots):
        entry = owner.ca.items.get(key)
        if not entry:
            continue
        value = owner[key]
        if isinstance(owner, CommentedMap) and isinstance(value, CommentedMap) and value:
            _first_key_comments(entry, value)
        index = 2 if isinstance(owner, CommentedMap) else 0
        token = entry[index] if len(entry) > index else None
        if not isinstance(token, CommentToken):
            continue
        own, tail = _split_comment(str(token.value), value)
        if not tail:
            continue
        if own.strip():
            token.value = own
        else:
            entry[index] = None
            if isinstance(value, CommentedMap | CommentedSeq):
                inner = value.ca.comment
                if inner and inner[0] is token:
                    inner[0] = None
        # At its old column, a comment below a ``|`` value could be read as part of it: written
        # at the margin, it is indented as the line below it afterwards (_indent_comments).
        tail = "\n".join(line.lstrip(" \t") for line in tail.split("\n"))
        comment = CommentToken(tail, CommentMark(0), None)
        below = next(((o, k) for o, k, flow in slots[position + 1 :] if not flow), None)
        if below is None:
            if data.ca.comment is None:
                data.ca.comment = [None, None]  # ruamel writes the end only with this
            data.ca.end = [*(data.ca.end or []), comment]
        else:
            target = below[0].ca.items.setdefault(below[1], [None, None, None, None])
            target[1] = [comment, *(target[1] or [])]


def _split_comment(text: str, value: Any) -> tuple[str, str]:
    """A comment token's text as (the value's end-of-line comment, the full lines after it).

    The token of a ``|`` or ``>`` value starts below its last line, so all of it is lines after
    it; any other token starts on the value's line (its comment, or just the line's end).
    """
    if isinstance(value, LiteralScalarString | FoldedScalarString):
        return "", text
    cut = text.find("\n") + 1
    return (text, "") if cut == 0 else (text[:cut], text[cut:])


def _first_key_comments(entry: list[Any], value: CommentedMap) -> None:
    """The lines above a nested mapping's first key go with that key, which may be reordered."""
    above = entry[3] if len(entry) > 3 else None
    if not above:
        return
    entry[3] = None
    first = value.ca.items.setdefault(next(iter(value)), [None, None, None, None])
    first[1] = [*(above if isinstance(above, list) else [above]), *(first[1] or [])]


_COMMENT = re.compile(r"^[ \t]*#")


def _indent_comments(text: str) -> str:
    """Indent each full-line comment as the line it stands above (its column was the old one)."""
    lines = text.split("\n")
    inside = _multiline_scalar_lines(text)
    for number in range(len(lines) - 1, -1, -1):
        line = lines[number]
        if number in inside or not _COMMENT.match(line):
            continue
        below = next(
            (other for other in lines[number + 1 :] if other.strip() and not _COMMENT.match(other)),
            "",
        )
        indent = len(below) - len(below.lstrip(" "))
        lines[number] = " " * indent + line.lstrip(" \t")
    return "\n".join(lines)


def _multiline_scalar_lines(text: str) -> set[int]:
    """Lines (0-based) inside a value written over several lines: a ``#`` there is text."""
    inside: set[int] = set()
    stack = [pyyaml.compose(text, Loader=pyyaml.SafeLoader)]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if isinstance(node, pyyaml.ScalarNode):
            # A ``|`` or ``>`` value ends at the start of the line below it: that line is not in it.
            end = node.end_mark.line + (1 if node.end_mark.column else 0)
            inside.update(range(node.start_mark.line + 1, end))
        elif isinstance(node, pyyaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, pyyaml.MappingNode):
            stack.extend(v for pair in node.value for v in pair)
    return inside


# --- keys and values -----------------------------------------------------------------------

_YAML12_NOT_TEXT = re.compile(
    r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+|[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)"
    r"(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)|true|True|TRUE|false|False"
    r"|FALSE)$"
)
_STR = "tag:yaml.org,2002:str"
#: PyYAML's resolver: what pushrules' reader (YAML 1.1) makes of a plain value.
_YAML11 = pyyaml.resolver.Resolver()


def needs_quotes(text: str) -> bool:
    """Whether a plain text value would be misread: YAML 1.1 (pushrules' reader) or 1.2 (an
    editor's) makes it a boolean, number, date or null, or it holds a template or ``#``."""
    if _YAML12_NOT_TEXT.match(text) or text in _NULL_WORDS:
        return True
    if _YAML11.resolve(pyyaml.ScalarNode, text, (True, False)) != _STR:  # type: ignore[no-untyped-call]
        return True
    return any(mark in text for mark in ("{{", "{%", "{#", "${", "#"))


def _child_rules(rules: Mapping[str, Any] | None, key: Any) -> Mapping[str, Any] | None:
    if rules is None:
        return None
    fields = rules.get("schema")
    if isinstance(fields, Mapping) and rules.get("type") != "list":
        if key in fields:
            return _resolved(fields[key])
        unknown = rules.get("allow_unknown")
        return unknown if isinstance(unknown, Mapping) else None
    if "valuesrules" in rules:
        return _resolved(rules["valuesrules"])
    return None


def _resolved(rules: Mapping[str, Any]) -> Mapping[str, Any]:
    """A field's rules, a for_each's ``target`` being a target of its own."""
    json = rules.get("meta", {}).get("json")
    if isinstance(json, Mapping) and json.get("$ref") == "#/$defs/target":
        return schemas.TARGET
    return rules


def _as_written(rules: Mapping[str, Any] | None) -> bool:
    return rules is not None and bool(rules.get("meta", {}).get("as_written"))


def _is_text(rules: Mapping[str, Any] | None) -> bool:
    if rules is None or _as_written(rules):
        return False
    kinds = rules.get("type", [])
    return "string" in ([kinds] if isinstance(kinds, str) else kinds)


class _Quoting:
    """Where values were quoted (for the meaning check), and the lines not to quote on."""

    def __init__(self, done: set[tuple[Any, ...]], skip_lines: set[int]) -> None:
        self.done = done
        self.skip_lines = skip_lines

    def wanted(self, node: Any, key: Any, rules: Mapping[str, Any] | None) -> bool:
        value = node[key]
        if type(value) is not str or not _is_text(rules) or not needs_quotes(value):
            return False
        try:
            line = node.lc.value(key)[0] if isinstance(node, CommentedMap) else node.lc.item(key)[0]
        except (KeyError, IndexError, TypeError):  # pragma: no cover - ruamel marks every value
            line = None
        return line not in self.skip_lines


def _lay_out(
    node: Any, rules: Mapping[str, Any] | None, path: tuple[Any, ...], quoted: _Quoting
) -> None:
    """Order ``node``'s keys and quote its text values, as its Cerberus ``rules`` describe it."""
    if _as_written(rules):
        return  # every value in it is sent as YAML typed it
    if isinstance(node, CommentedMap):
        fields = rules.get("schema") if rules else None
        if isinstance(fields, Mapping) and rules is not None and rules.get("type") != "list":
            _order(node, list(fields))
        for key in list(node):
            child = _child_rules(rules, key)
            if quoted.wanted(node, key, child):
                node[key] = DoubleQuotedScalarString(node[key])
                quoted.done.add((*path, str(key)))
            else:
                _lay_out(node[key], child, (*path, str(key)), quoted)
    elif isinstance(node, CommentedSeq):
        item_rules = rules.get("schema") if rules else None
        item = _resolved(item_rules) if isinstance(item_rules, Mapping) else None
        for index in range(len(node)):
            if quoted.wanted(node, index, item):
                node[index] = DoubleQuotedScalarString(node[index])
                quoted.done.add((*path, index))
            else:
                _lay_out(node[index], item, (*path, index), quoted)


def _order(node: CommentedMap, known: list[str]) -> None:
    """Keys in the schema's order; a key it does not know stays after the key it followed."""
    rank = {name: position for position, name in enumerate(known)}
    last = -1
    keyed = []
    for position, key in enumerate(node):
        if key in rank:
            last = rank[key]
            keyed.append(((last, 0, position), key))
        else:
            keyed.append(((last, 1, position), key))
    wanted = [key for _, key in sorted(keyed, key=lambda pair: pair[0])]
    if wanted != list(node):
        for key in wanted:
            node.move_to_end(key)


# --- the check that nothing changed --------------------------------------------------------


def _same_meaning(before: Any, text: str, quoted: set[tuple[Any, ...]]) -> None:
    after = load(text)
    if any(i.severity == "error" for i in after.issues) or not _equal(
        before, after.data, (), quoted
    ):
        raise FormatError(
            "formatting would change what this file means, so it is left as it is; please "
            "report it with the file"
        )


def _equal(a: Any, b: Any, path: tuple[Any, ...], quoted: set[tuple[Any, ...]]) -> bool:
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and set(map(str, a)) == set(map(str, b))
            and all(_equal(a[k], b[k], (*path, str(k)), quoted) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(
                _equal(x, y, (*path, i), quoted) for i, (x, y) in enumerate(zip(a, b, strict=True))
            )
        )
    if isinstance(a, Scalar):
        if not isinstance(b, Scalar) or str(a) != str(b):
            return False
        return path in quoted or a.typed == b.typed
    return bool(a == b)
