"""``rule-tests/*.yaml``: the cases a rule author writes to pin down what a rule sends.

One file tests one rule (``rule:``, else the file's stem). Each case gives an event or a feed
item, a moment, and what one fire must come to: a number of requests, a subset of each request
body, nothing sent and why, or an error. This module reads and checks the files, reporting
problems with line and column like every other file of a project; running the cases is review
tooling's business (:mod:`engine.review`), since it takes the compiler.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from engine.rules.problems import Problem, Severity, did_you_mean, field_path
from engine.rules.rule import Rule
from engine.rules.schemas import NOT_SENT_BECAUSE, RULE_TEST_CHECKER
from engine.rules.yaml_source import (
    MarkedList,
    MarkedMap,
    Scalar,
    Unreadable,
    load,
    position,
    read_source,
    yaml_files,
)

TESTS_DIR = Path("rule-tests")
#: When a case gives no ``at``: a fixed moment, so a test means the same on every day it runs
#: (``{{ now }}`` included). A Monday at noon, in the rule's timezone.
DEFAULT_AT = "2026-01-05 12:00"

__all__ = [
    "DEFAULT_AT",
    "NOT_SENT_BECAUSE",
    "TESTS_DIR",
    "Case",
    "CaseFile",
    "Expect",
    "case_files",
    "check_against_rules",
    "check_case_files",
    "json_value",
    "load_case_files",
    "parse_case_file",
    "read_case_files",
]


@dataclass(frozen=True, slots=True)
class Expect:
    """What one fire of a case must come to; None where the case does not say."""

    requests: int | None = None
    #: A mapping every request body must hold (as written, with its marks), or a list of
    #: them, request by request.
    body: Any = None
    sent: bool | None = None
    because: str | None = None
    #: A piece of the error the fire must fail with.
    error: str | None = None

    @property
    def sends(self) -> bool | None:
        """Whether a push must go out at the case's moment; None when the case does not say
        (it expects an error)."""
        if self.error is not None:
            return None
        if self.sent is not None:
            return self.sent
        return self.because is None and self.requests != 0


@dataclass(frozen=True, eq=False)
class Case:
    file: str
    index: int  # its place under cases:, from 0
    name: str
    rule: str
    event: Mapping[str, Any] | None
    item: Mapping[str, Any] | None
    at: str | None  # as written; read in the rule's timezone when it runs
    expect: Expect
    doc: MarkedMap  # the case as written, for the position of what a failure points at

    @property
    def line(self) -> int:
        return self.doc.line

    @property
    def column(self) -> int:
        return self.doc.column

    def where(self, path: tuple[Any, ...]) -> tuple[int | None, int | None]:
        """Line and column of ``path`` inside the case (``("expect", "body", "message")``)."""
        return position(self.doc, path, at_value=True)

    def moment(self, timezone: ZoneInfo) -> datetime:
        """The case's ``at`` (or :data:`DEFAULT_AT`) as an aware time in ``timezone``."""
        from engine.rules.schedule import parse_at

        return parse_at(self.at or DEFAULT_AT, timezone)


@dataclass(frozen=True)
class CaseFile:
    file: str
    rule: str
    cases: tuple[Case, ...]
    #: Where the rule is named (its ``rule:`` line), for a problem about the rule itself.
    rule_line: int | None = None
    rule_column: int | None = None


class _Report:
    """Problems of one test file, positioned from its document."""

    def __init__(self, rel: str, doc: Any) -> None:
        self.rel = rel
        self.doc = doc
        self.problems: list[Problem] = []

    def add(
        self,
        path: tuple[Any, ...],
        message: str,
        severity: Severity = "error",
        *,
        at_value: bool = False,
    ) -> None:
        line, column = position(self.doc, path, at_value=at_value)
        self.problems.append(
            Problem(self.rel, line, column, field_path(path), None, severity, message)
        )


def parse_case_file(rel: str, text: str) -> tuple[CaseFile | None, list[Problem]]:
    """One test file's text: its cases that can run, and the problems of the others.

    A case with a problem is left out and the file's other cases stay; a problem of the file
    as a whole (YAML, no cases) leaves it None.
    """
    loaded = load(text)
    problems = [
        Problem(rel, i.line, i.column, "", None, i.severity, i.message) for i in loaded.issues
    ]
    if any(p.is_error for p in problems):
        return None, problems
    doc = loaded.data
    out = _Report(rel, doc)
    if not isinstance(doc, MarkedMap):
        out.add(
            (),
            "a rule test must be a mapping with cases: (and rule: when the file is not named "
            "after its rule)"
            if doc is not None
            else "the file is empty; a rule test needs cases:",
        )
        return None, [*problems, *out.problems]
    refused: dict[int, set[tuple[Any, ...]]] = {}  # case -> paths inside it the schema refused
    whole = False
    for err in RULE_TEST_CHECKER.check(doc):
        out.add(err.path, err.message, at_value=err.kind in ("type", "allowed"))
        if len(err.path) >= 2 and err.path[0] == "cases" and isinstance(err.path[1], int):
            refused.setdefault(err.path[1], set()).add(tuple(err.path[2:]))
        else:
            whole = True
    rule = str(doc.get("rule") or Path(rel).stem)
    cases = doc.get("cases")
    if whole or not isinstance(cases, MarkedList):
        return None, [*problems, *out.problems]
    names: dict[str, int] = {}
    kept = []
    for index, case_doc in enumerate(cases):
        if not isinstance(case_doc, MarkedMap) or () in refused.get(index, ()):
            continue
        before = len(out.problems)
        case = _case(rel, rule, index, case_doc, refused.get(index, set()), names, out)
        if case is not None and index not in refused and len(out.problems) == before:
            kept.append(case)
    mark = doc.key_marks.get("rule", (None, None))
    found = CaseFile(rel, rule, tuple(kept), *mark)
    return found, [*problems, *out.problems]


def _case(
    rel: str,
    rule: str,
    index: int,
    doc: MarkedMap,
    refused: set[tuple[Any, ...]],
    names: dict[str, int],
    out: _Report,
) -> Case | None:
    """One case checked for what the schema cannot say; None when it cannot be built (the
    schema refused its name or expect, reported already)."""
    path: tuple[Any, ...] = ("cases", index)

    def usable(*key: str) -> bool:
        return key[0] in doc and not any(r[: len(key)] == key for r in refused)

    if usable("name"):
        name = str(doc["name"])
        if name in names:
            out.add(
                (*path, "name"),
                f"another case of this file is named '{name}' (line {names[name]}); give each "
                "case its own name, so a report can tell them apart",
                at_value=True,
            )
        else:
            names[name] = doc.key_marks["name"][0]
    if "event" in doc and "item" in doc:
        out.add(
            (*path, "item"),
            "a case gives an event or a feed item, not both: event: for a rule fired by an "
            "event, item: for a rule that polls a feed",
        )
    at = doc.get("at") if usable("at") else None
    if at is not None:
        from engine.rules.schedule import TriggerError, parse_at

        try:
            parse_at(str(at), ZoneInfo("UTC"))
        except TriggerError as exc:
            out.add((*path, "at"), str(exc).removeprefix("at: "), at_value=True)
    if not usable("name") or "expect" not in doc or ("expect",) in refused:
        return None
    kept = {r[1:] for r in refused if r[:1] == ("expect",)}
    expect = _expect(doc["expect"], (*path, "expect"), kept, out)
    return Case(
        file=rel,
        index=index,
        name=str(doc["name"]),
        rule=rule,
        event=json_value(doc["event"]) if usable("event") else None,
        item=json_value(doc["item"]) if usable("item") else None,
        at=str(at) if at is not None else None,
        expect=expect,
        doc=doc,
    )


def _expect(
    doc: MarkedMap, path: tuple[Any, ...], refused: set[tuple[Any, ...]], out: _Report
) -> Expect:
    """What the case expects; a key the schema refused is left out of the checks."""
    named = [k for k in ("requests", "body", "sent", "because", "error") if k in doc]
    if refused:
        kept = MarkedMap(doc.line, doc.column)
        kept.key_marks.update(doc.key_marks)
        kept.update((k, v) for k, v in doc.items() if not any(r[:1] == (k,) for r in refused))
        doc = kept

    def number(value: Any) -> int | None:  # the schema made sure it is a whole number
        typed = value.typed if isinstance(value, Scalar) else None
        return typed if isinstance(typed, int) else None

    sent = doc.get("sent")
    expect = Expect(
        requests=number(doc.get("requests")),
        body=doc.get("body"),
        sent=bool(sent.typed) if isinstance(sent, Scalar) else None,
        because=str(doc["because"]) if "because" in doc else None,
        error=str(doc["error"]) if "error" in doc else None,
    )
    if not named:
        out.add(
            path,
            "say what the fire must come to: requests: N, body: {...}, sent: false with "
            f"because: ({', '.join(NOT_SENT_BECAUSE)}), or error: 'part of the message'",
        )
        return expect
    given = [k for k in named if k in doc]
    if expect.error is not None and len(given) > 1:
        others = ", ".join(k for k in given if k != "error")
        out.add(
            (*path, "error"),
            f"error: expects the fire to fail, so nothing is sent: remove {others}, or the "
            "error: line",
        )
        return expect
    sends_something = bool(expect.requests) or expect.body is not None
    if expect.sent is False and sends_something:
        out.add(
            (*path, "sent"),
            "sent: false says nothing is sent, but requests or body expect requests; keep one",
        )
    if expect.because is not None and (expect.sent is True or sends_something):
        out.add(
            (*path, "because"),
            "because: says why nothing is sent; it goes with sent: false, not with sent: true, "
            "requests or body",
        )
    if expect.requests == 0 and expect.sent is True:
        out.add((*path, "requests"), "requests: 0 sends nothing, but sent: true expects a push")
    _check_body(expect, (*path, "body"), out)
    return expect


def _check_body(expect: Expect, path: tuple[Any, ...], out: _Report) -> None:
    body = expect.body
    if body is None:
        return
    bodies = body if isinstance(body, MarkedList) else [body]
    for index, one in enumerate(bodies):
        where = (*path, index) if isinstance(body, MarkedList) else path
        if not isinstance(one, MarkedMap):
            out.add(
                where,
                "each element of a body list is a mapping: what one request must hold, request "
                "by request",
                at_value=True,
            )
        elif "user" in one:
            out.add(
                (*where, "user"),
                "user (the credentials) is added when sending, never compiled: leave it out",
            )
        elif "sendInstantMessage" in one:
            out.add(
                (*where, "sendInstantMessage"),
                "body is already what goes inside sendInstantMessage: write its fields "
                "(message, targets...) directly",
            )
    if isinstance(body, MarkedList):
        if not body:
            out.add(path, "an empty body list expects no request: write requests: 0 instead")
        elif expect.requests is not None and expect.requests != len(body):
            out.add(
                path,
                f"body lists {len(body)} request{'s' if len(body) != 1 else ''} but requests: "
                f"says {expect.requests}; a body list holds one mapping per request (a mapping "
                "alone is checked against every request)",
            )


_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_FLOAT = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def json_value(value: Any) -> Any:
    """An event or item as written, read the way JSON reads its values: ``42`` and ``4.5``
    numbers, ``true``/``false``, ``null``; everything else text. (YAML alone would turn
    ``0012`` into 10, ``no`` into false and ``12:30`` into 750.)"""
    if isinstance(value, Scalar):
        text = str(value)
        if isinstance(value.typed, bool) and text.lower() in ("true", "false"):
            return value.typed
        if value.typed is not None and not isinstance(value.typed, bool):
            if _INT.fullmatch(text):
                return int(text)
            if _FLOAT.fullmatch(text):
                return float(text)
        return text
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value


def check_against_rules(
    found: CaseFile, rule_ids: Collection[str], rules: Mapping[str, Rule]
) -> tuple[CaseFile | None, list[Problem]]:
    """A test file against the project's rules: the rule must exist (``rule_ids``: every rule
    file's id, valid or not), and each case give what its trigger reads. Cases that do not are
    left out; a file whose rule does not exist is None."""
    problems: list[Problem] = []
    if found.rule not in rule_ids:
        named = found.rule_line is not None
        how = (
            "check rule:"
            if named
            else "name the rule with rule: at the top, or name this file after it"
        )
        problems.append(
            Problem(
                found.file,
                found.rule_line,
                found.rule_column,
                "rule" if named else "",
                None,
                "error",
                f"no rule '{found.rule}' in rules/{did_you_mean(found.rule, rule_ids)}: {how} "
                f"(known: {', '.join(sorted(rule_ids)) or 'none'})",
            )
        )
        return None, problems
    rule = rules.get(found.rule)
    if rule is None:
        return found, problems  # its file has errors, reported there; its cases say so
    kept = []
    for case in found.cases:
        problem = _input_problem(case, rule)
        if problem is None:
            kept.append(case)
        else:
            problems.append(problem)
    return CaseFile(found.file, found.rule, tuple(kept), found.rule_line, found.rule_column), (
        problems
    )


def _input_problem(case: Case, rule: Rule) -> Problem | None:
    """A case giving an input its rule never reads: it would be silently ignored."""
    kind = rule.trigger_kind
    given = "event" if case.event is not None else "item" if case.item is not None else None
    if given is None:
        return None
    wanted = {"event": "event", "poll": "item"}.get(kind)
    if given == wanted:
        return None
    if wanted is None:
        message = (
            f"rule {rule.id} fires on a schedule ({kind}): it reads no {given}; remove {given}: "
            "(at: sets the moment it fires)"
        )
    else:
        what = "an event" if wanted == "event" else "a feed item (poll)"
        message = f"rule {rule.id} is fired by {what}: write {wanted}:, not {given}:"
    line, column = case.doc.key_marks[given]
    return Problem(
        case.file, line, column, field_path(("cases", case.index, given)), None, "error", message
    )


def case_files(root: Path) -> list[Path]:
    """Every test file under ``rule-tests/``, subfolders included."""
    directory = root / TESTS_DIR
    if not directory.is_dir():
        return []
    return yaml_files(directory, root)


#: A test file read and checked on its own: the file (None when it cannot be used at all) and
#: its problems.
ReadCaseFile = tuple[CaseFile | None, list[Problem]]


def read_case_files(root: Path, only: Collection[str] | None = None) -> list[ReadCaseFile]:
    """Every test file of the project (``only``: of these, paths from the root), each checked
    on its own and failing alone. Read before the rules are checked, so the loader knows which
    rules the tests name."""
    read: list[ReadCaseFile] = []
    for path in case_files(root):
        rel = path.relative_to(root).as_posix()
        if only is not None and rel not in only:
            continue
        try:
            text = read_source(path, root, root / TESTS_DIR)
        except Unreadable as exc:
            read.append((None, [Problem(rel, exc.line, None, "", None, "error", exc.message)]))
            continue
        read.append(parse_case_file(rel, text))
    return read


def check_case_files(
    read: list[ReadCaseFile], rule_ids: Collection[str] | None, rules: Mapping[str, Rule]
) -> tuple[tuple[CaseFile, ...], list[Problem]]:
    """The files of :func:`read_case_files` against the rules: the files that can run, and
    every problem. ``rule_ids`` None: the rules could not be read (pushrules.yaml has errors),
    so the files are checked on their own only."""
    found: list[CaseFile] = []
    problems: list[Problem] = []
    for parsed, own in read:
        problems.extend(own)
        if parsed is None:
            continue
        if rule_ids is not None:
            parsed, cross = check_against_rules(parsed, rule_ids, rules)
            problems.extend(cross)
        if parsed is not None:
            found.append(parsed)
    return tuple(found), problems


def load_case_files(
    root: Path, rule_ids: Collection[str] | None, rules: Mapping[str, Rule]
) -> tuple[tuple[CaseFile, ...], list[Problem], int]:
    """Every test file of the project, each failing alone: the files that can run, the
    problems, and how many files were read. ``rule_ids`` None: the rules could not be read
    (pushrules.yaml has errors), so the files are checked on their own only."""
    read = read_case_files(root)
    found, problems = check_case_files(read, rule_ids, rules)
    return found, problems, len(read)
