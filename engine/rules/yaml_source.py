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

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK
from typing import Any, Literal, cast

import yaml

from engine.errors import PushrulesError

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

try:
    _Base: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Base = yaml.SafeLoader

_WILDCARDS: list[tuple[str, Any]] = _Base.yaml_implicit_resolvers.get(None, [])
#: The safe loader's implicit resolvers by a plain scalar's first character, wildcards added.
_RESOLVERS: dict[str, list[tuple[str, Any]]] = {
    first: [*resolvers, *_WILDCARDS]
    for first, resolvers in _Base.yaml_implicit_resolvers.items()
    if first is not None
}


#: The tag of each plain scalar resolved lately: keys and common values recur in every file.
_PLAIN_TAGS: dict[str, str] = {}
_PLAIN_TAGS_MAX = 8192


class _Loader(_Base):  # type: ignore[misc]
    """The safe loader with its tag resolution done in one lookup: the loader calls it for
    every node, and the stock one (for path resolvers the safe loader never has) costs about a
    third of composing a document."""

    def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
        if kind is yaml.ScalarNode:
            if implicit[0]:
                tag = _PLAIN_TAGS.get(value)
                if tag is None:
                    tag = _resolve_plain(value)
                    if len(_PLAIN_TAGS) >= _PLAIN_TAGS_MAX:
                        _PLAIN_TAGS.clear()
                    _PLAIN_TAGS[value] = tag
                return tag
            return _STR
        return _SEQ if kind is yaml.SequenceNode else _MAP

    def descend_resolver(self, current_node: Any, current_index: Any) -> None:
        """Nothing: the stock one, called around every node, looks for path resolvers the
        safe loader never has (7% of composing a rule)."""

    def ascend_resolver(self) -> None:
        """Nothing, as :meth:`descend_resolver`."""


def _resolve_plain(value: str) -> str:
    """The tag YAML gives a plain scalar (the safe loader's implicit resolvers)."""
    for tag, pattern in _RESOLVERS.get(value[:1], _WILDCARDS):
        if pattern.match(value):
            return tag
    return _STR


#: Nodes a document may expand to through aliases before it is refused ("billion laughs").
MAX_NODES = 200_000
#: Nesting a document may have. A rule is a dozen levels deep at most; 400 nested ``[`` would
#: otherwise recurse past Python's limit in whatever walks the data.
MAX_DEPTH = 64
#: Bytes a project file may hold. The biggest real rule is a few KB; a file this large is a
#: mistake (a generated dump, a wrong file), and parsing it would stall every reload.
MAX_FILE_BYTES = 2 * 1024 * 1024
#: Fields whose text reaches a phone: a `` #`` after a plain value there cuts the text.
TEXT_FIELDS = frozenset({"subject", "text", "longText", "alert", "title", "labels"})

_constructor = yaml.constructor.SafeConstructor()
_SCALAR, _SEQUENCE = yaml.ScalarNode, yaml.SequenceNode


#: A ``str`` subclass's instance made without a call to its ``__new__`` (the builder makes
#: one for every key and scalar of a file: it sets the fields itself).
_new_str = str.__new__


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


class MarkedMap(dict[Any, Any]):
    """A mapping with the position of itself and of each key."""

    __slots__ = ("column", "key_marks", "line")

    def __init__(self, line: int, column: int) -> None:
        super().__init__()
        self.line = line
        self.column = column
        self.key_marks: dict[str, tuple[int, int]] = {}


class MarkedList(list[Any]):
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
    severity: Literal["error", "warning"] = "error"


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
    except RecursionError:  # the pure-Python composer recurses per level; libyaml does not
        return Loaded(None, [YamlIssue(1, 1, _too_deep_message())])
    if node is None:
        return Loaded(None, [])
    builder = _Builder(text)
    try:
        data = builder.build(node, 1)
    except _TooLarge as exc:
        return Loaded(None, [YamlIssue(exc.line, exc.column, exc.message)])
    return Loaded(data, builder.issues)


def _too_deep_message() -> str:
    return (
        f"nested more than {MAX_DEPTH} levels deep ([ or {{ inside one another); a rule "
        "needs a dozen at most: look for unclosed or repeated brackets"
    )


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
    """The document is refused whole: too many values or too deep; says where and why."""

    def __init__(self, line: int, column: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.message = message


class _Builder:
    """Turns composed nodes into Scalar / MarkedMap / MarkedList, collecting issues."""

    def __init__(self, text: str = "") -> None:
        self.issues: list[YamlIssue] = []
        self.count = 0
        self.aliased = False  # whether an alias has been expanded (for the "too large" message)
        #: Each node built (by id), with the values it counts for, when the text may share
        #: one between places: an alias needs an anchor, and an anchor a ``&``.
        self.seen: dict[int, tuple[Any, int]] | None = {} if "&" in text else None
        self.text = text
        self._lines: list[str] | None = None

    @property
    def lines(self) -> list[str]:
        """The text's lines, split when a check first needs them (most documents never do)."""
        if self._lines is None:
            self._lines = self.text.splitlines()
        return self._lines

    def _too_many(self, node: yaml.Node) -> _TooLarge:
        if self.aliased:
            message = (
                f"the document expands to more than {MAX_NODES} values through aliases (&/*); "
                "write the values out instead"
            )
        else:
            message = (
                f"the file holds more than {MAX_NODES} values; a rule needs far fewer: split it, "
                "or check that it is the file you meant"
            )
        return _TooLarge(node.start_mark.line + 1, node.start_mark.column + 1, message)

    def build(self, node: yaml.Node, depth: int, owner: str | None = None) -> Any:
        """``owner``: the key whose value ``node`` is (for hints that name it)."""
        seen = self.seen
        if seen is not None and (done := seen.get(id(node))) is not None:
            # An alias: the same node again. Reuse it, but count what it expands to, so that
            # nested aliases cannot blow up whoever walks the data later.
            self.count += done[1]
            self.aliased = True
            if self.count > MAX_NODES:
                raise self._too_many(node)
            return done[0]
        before = self.count
        self.count = before + 1
        if before >= MAX_NODES:
            raise self._too_many(node)
        mark = node.start_mark
        line, column = mark.line + 1, mark.column + 1
        if depth > MAX_DEPTH:
            raise _TooLarge(line, column, _too_deep_message())
        tag = node.tag
        if tag not in _KNOWN:
            if tag.startswith("!"):
                message = (
                    f'a value starting with ! must be quoted, like "{tag}" (YAML reads ! as a tag)'
                )
            else:
                message = f"YAML tag {tag} is not supported; remove it"
            self.issues.append(YamlIssue(line, column, message))
        kind = type(node)
        result: Scalar | MarkedList | MarkedMap | None
        if kind is _SCALAR:
            if tag == _NULL:
                result = None
            else:
                typed = None
                if tag in _TYPED:
                    try:
                        # The tag's own constructor: construct_object would also remember the
                        # node in the shared constructor, for ever (a leak growing with reloads).
                        typed = _constructor.yaml_constructors[tag](_constructor, node)
                    except (yaml.YAMLError, ValueError):
                        typed = None
                result = _new_str(Scalar, node.value)  # Scalar(node.value, line, column, typed)
                result.line = line
                result.column = column
                result.typed = typed
        elif kind is _SEQUENCE:
            items = MarkedList(line, column)
            inner = depth + 1
            items.extend([self.build(item, inner, owner) for item in node.value])
            result = items
        else:
            # The composer makes only these three kinds of node.
            result = self._mapping(cast(yaml.MappingNode, node), line, column, depth, owner)
        if seen is not None:
            seen[id(node)] = (result, self.count - before)
        return result

    def _mapping(
        self, node: yaml.MappingNode, line: int, column: int, depth: int, owner: str | None
    ) -> MarkedMap:
        result = MarkedMap(line, column)
        marks = result.key_marks
        inner = depth + 1
        # A text value (most are) is made here, as build would make it, without the call.
        inline = self.seen is None and inner <= MAX_DEPTH
        for key_node, value_node in node.value:
            mark = key_node.start_mark
            kline, kcol = mark.line + 1, mark.column + 1
            if type(key_node) is not _SCALAR:
                message = "a key must be a plain name"
                if isinstance(key_node, yaml.MappingNode):
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
            if key in marks:
                first = marks[key][0]
                self.issues.append(
                    YamlIssue(
                        kline,
                        kcol,
                        f"duplicate key '{key}' (first set on line {first}); remove one of them",
                    )
                )
                continue
            marks[key] = (kline, kcol)
            if key in TEXT_FIELDS:
                self._check_cut_text(key, value_node)
            marked = _new_str(Scalar, key)  # Scalar(key, kline, kcol)
            marked.line = kline
            marked.column = kcol
            marked.typed = None
            if inline and type(value_node) is _SCALAR and value_node.tag == _STR:
                if self.count >= MAX_NODES:
                    raise self._too_many(value_node)
                self.count += 1
                mark = value_node.start_mark
                value = _new_str(Scalar, value_node.value)
                value.line = mark.line + 1
                value.column = mark.column + 1
                value.typed = None
                result[marked] = value
            else:
                result[marked] = self.build(value_node, inner, key)
        return result

    def _check_cut_text(self, key: str, node: yaml.Node) -> None:
        """Warn where a `` #`` after a plain value starts a comment the author meant as text."""
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        lead = "- " if isinstance(node, yaml.SequenceNode) else f"{key}: "
        for item in items:
            if not isinstance(item, yaml.ScalarNode) or item.style:  # "" or None: plain
                continue
            end = item.end_mark
            if end.line >= len(self.lines):
                continue
            found = _COMMENT_AFTER.match(self.lines[end.line], end.column)
            if found is None:
                continue
            comment = found.group(1)
            self.issues.append(
                YamlIssue(
                    end.line + 1,
                    found.start(1) + 1,
                    f"{key}: YAML reads '{comment}' as a comment, so only "
                    f"'{item.value}' is sent; quote the whole value to keep it, like "
                    f"{lead}{_quoted(item.value + ' ' + comment)} (or put a comment on a line "
                    "of its own)",
                    "warning",
                )
            )


#: Spaces then ``#`` then the rest of the line, right after a plain scalar.
_COMMENT_AFTER = re.compile(r"[ \t]+(#.*?)\s*$")


def _quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


#: Text at most this long is interned when kept: names, keys and short values repeat across
#: rules, and one copy of each is enough. Longer text is mostly a rule's own.
_INTERN_UP_TO = 64


@dataclass(slots=True)
class Sharing:
    """What the compact rules of one load share, so that a value many rules hold is kept once
    (5,000 rules held 14 MB of mappings, lists and text, of which 5 MB were distinct).

    ``templates`` (see :func:`share`): the compact copy of each mapping and list of the
    templates, by id, with the value itself (which keeps its id from being reused).
    ``equal``: one copy of each value compacted so far, by what it holds; a mapping or list is
    keyed by the ids of its items' own shared copies, which this keeps alive.

    Kept data is never changed (a rule is frozen, its mappings read-only), so rules can hold
    the same mapping.
    """

    templates: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    equal: dict[Any, Any] = field(default_factory=dict)

    def one(self, key: Any, value: Any) -> Any:
        """The copy kept for ``key``: ``value`` if it is the first."""
        return self.equal.setdefault(key, value)


def compact(value: Any, shared: Sharing) -> Any:
    """Marked data as a loaded rule keeps it: mappings and lists plain, text a plain ``str``
    (short text interned), no positions. A scalar YAML gives a type (``12``, ``true``) stays a
    :class:`Scalar`, whose type the compiler sends. A checked rule's positions are no longer
    needed: its problems are found before it is kept, and found again when its file changes.

    Equal values come back as one object (see :class:`Sharing`), and the values of a ``use:``
    template as the template's one compact copy.
    """
    if isinstance(value, Scalar):
        text = str(value)
        if value.typed is not None:
            return shared.one((Scalar, text, type(value.typed), value.typed), value)
        return sys.intern(text) if len(text) <= _INTERN_UP_TO else shared.one(text, text)
    if isinstance(value, dict):
        done = shared.templates.get(id(value))
        if done is not None:
            return done[1]
        items = {
            (sys.intern(str(k)) if isinstance(k, str) else k): compact(v, shared)
            for k, v in value.items()
        }
        return shared.one((dict, *((k, id(v)) for k, v in items.items())), items)
    if isinstance(value, list):
        done = shared.templates.get(id(value))
        if done is not None:
            return done[1]
        kept = [compact(v, shared) for v in value]
        return shared.one((list, *(id(v) for v in kept)), kept)
    return value


def share(value: Any, shared: Sharing) -> None:
    """Record in ``shared`` the compact form of each mapping and list in ``value``, by id."""
    if isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            share(item, shared)
        shared.templates[id(value)] = (value, compact(value, shared))


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


# --- reading project files (the I/O edge) ------------------------------------------------------


class Unreadable(PushrulesError):
    """A project file that cannot be used as text; the message says why and what to do."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def inside(path: Path, root: Path, top: Path) -> bool:
    """Whether ``path``, links resolved, is in the project ``root`` or in ``top`` (the folder
    being read, which may itself be a link, e.g. a mounted ``rules/``)."""
    real = path.resolve()
    return real.is_relative_to(root.resolve()) or real.is_relative_to(top.resolve())


def yaml_files(directory: Path, root: Path | None = None) -> list[Path]:
    """Every ``*.yaml`` / ``*.yml`` under ``directory``, in subfolders too, in a stable order
    (see :func:`yaml_paths`)."""
    return [Path(path) for path in yaml_paths(directory, root)]


def yaml_paths(directory: Path, root: Path | None = None) -> list[str]:
    """Every ``*.yaml`` / ``*.yml`` under ``directory``, in subfolders too, in a stable order,
    as text (a reload lists thousands: ``Path`` objects would cost more than the listing).

    Names starting with ``.`` are skipped: editor swap files, ``.git``, and the ``..data``
    folders of a Kubernetes ConfigMap (whose files are also linked one level up). Linked
    folders are entered once each, so a link loop ends. With ``root``, a linked folder that
    leads out of the project is not entered but listed itself, so that reading it reports it
    (a link to ``/`` must not make every reload walk the whole disk).
    """
    found: list[tuple[tuple[str, ...], str]] = []  # (parts below directory, path)
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[tuple[str, ...], str]] = [((), str(directory))]
    while stack:
        parts, folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as listing:
                entries = [(e.name, e.path, e.is_dir(), e.is_symlink()) for e in listing]
        except OSError:
            continue
        for name, path, is_dir, is_link in entries:
            if name.startswith("."):
                continue
            below = (*parts, name)
            if is_dir and is_link and root is not None and not inside(Path(path), root, directory):
                found.append((below, path))
            elif is_dir:
                stack.append((below, path))
            elif name.endswith((".yaml", ".yml")):
                found.append((below, path))
    return [path for _, path in sorted(found)]


def read_source(path: Path, root: Path, top: Path, limit: int = MAX_FILE_BYTES) -> str:
    """A project file's text; :class:`Unreadable` when it is too big, not UTF-8, gone, or
    reached through a link leading out of the project (``root``, or ``top``, the folder being
    read): a rule must not read ``/etc/...`` through a link.

    Only a link is resolved (a reload reads every file, and resolving costs more than
    reading): :func:`yaml_files` does not enter folders that lead out of the project. Read
    with the ``os`` calls themselves: ``Path.is_symlink`` and a buffered ``open`` took three
    times as long as the reading (0.04 ms a file, a tenth of checking a rule).
    """
    what = "this file"
    try:
        if S_ISLNK(os.lstat(path).st_mode):
            what = "this folder" if path.is_dir() else what
            if not inside(path, root, top):
                raise Unreadable(
                    f"{what} is a link to {path.resolve()}, outside the project; copy it into "
                    "the project"
                )
        data = _read_bytes(path, limit)
        if len(data) > limit:
            size = os.stat(path).st_size
            raise Unreadable(
                f"this file is {size:,} bytes, more than the {limit:,} a project file may hold; "
                "a rule is a few KB: check that it is the file you meant, or split it"
            )
    except FileNotFoundError:
        raise Unreadable(f"{what} was removed while being read") from None
    except OSError as exc:
        raise Unreadable(f"{what} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise Unreadable(
            f"this file is not UTF-8 text (byte 0x{data[exc.start]:02x}); save it as UTF-8", line
        ) from None


def _read_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes, ``limit + 1`` at most (more than ``limit``: too big). Asked for in a
    read of the file's size (not the limit, which would allocate the whole limit for each
    file), and read on while a read gives more: a file grown since, or a short read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        want = min(os.fstat(fd).st_size, limit) + 1
        data = b""
        while len(data) < want:
            chunk = os.read(fd, want - len(data))
            if not chunk:
                break
            data += chunk
            if len(data) == want and want <= limit:
                want = limit + 1  # grown since its size was read: read on, to the limit
        return data
    finally:
        os.close(fd)
