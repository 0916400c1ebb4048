"""Rule tests run: each case fired as a real fire is decided, with no store, then judged.

A case goes through :func:`engine.outbox.firing.decide`, the function every real fire takes:
its ``when``, the compiler (templates, ``for_each``, requests of 100, Accengage's last check),
an empty expansion, quiet hours. What a store holds (a rule's limit, a pause) is not part of a
test. Each case fails alone: one that raises is reported with its message and the others run.

The API other review tools build on: :func:`load_project_cases` (the project with its cases),
:func:`fire_case` (what one case's fire comes to: its request bodies, or why nothing is sent,
or the error), :func:`judge` (how that differs from what the case expects) and
:func:`run_case` / :func:`run_cases`, both together.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from engine.outbox.firing import Decision, decide
from engine.render.compiler import FireContext
from engine.review.subset import Comparison, compare, show
from engine.rules.cases import Case, CaseFile
from engine.rules.loader import Loader, RuleSet
from engine.rules.problems import Problem, field_path
from engine.rules.project import Project
from engine.rules.rule import Rule
from engine.rules.schedule import parse_timezone
from engine.rules.templating import MISSING, read_values

Because = Literal["when", "quiet_hours", "no_targets"]
Status = Literal["passed", "failed", "not_run"]

_BECAUSE: dict[str, Because] = {"filtered": "when", "empty": "no_targets", "skipped": "quiet_hours"}


def load_project_cases(root: Path) -> RuleSet:
    """The project with its rule tests (``ruleset.cases``) and every problem found."""
    return Loader(root, tests=True).load()


@dataclass(frozen=True, slots=True)
class Fired:
    """What one fire of a case comes to, decided as a real fire is (a limit or a pause aside).

    ``decision.requests`` holds the compiled requests even when quiet hours hold them back.
    """

    rule: str
    at: datetime  # the case's moment, in the rule's timezone
    decision: Decision
    notes: tuple[str, ...] = ()  # what the compiler only logs: for_each items skipped
    #: Why nothing is sent, in words that name what decided it (the values ``when`` read,
    #: the quiet hours); empty when it is sent or fails.
    reason: str = ""

    @property
    def sent(self) -> bool:
        """Whether requests go out at the case's moment."""
        return self.decision.sends_now

    @property
    def because(self) -> Because | None:
        """Why nothing is sent, when it is not for an error."""
        if self.decision.verdict == "send":
            return "quiet_hours" if self.decision.not_before is not None else None
        return _BECAUSE.get(self.decision.verdict)

    @property
    def error(self) -> str | None:
        return self.decision.detail if self.decision.verdict == "failed" else None

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """Each compiled request's ``sendInstantMessage``, sent now or not."""
        return [r.body["sendInstantMessage"] for r in self.decision.requests]

    @property
    def sent_bodies(self) -> list[dict[str, Any]]:
        return self.bodies if self.sent else []

    def words(self) -> str:
        """What became of the fire, in a sentence."""
        if self.error is not None:
            return f"the fire fails: {self.error}"
        if self.sent:
            n = len(self.decision.requests)
            return f"it sends {n} request{'s' if n != 1 else ''}"
        return f"nothing is sent: {self.reason or self.decision.detail}"


def fire_case(project: Project, rule: Rule, case: Case) -> Fired:
    """One fire of ``rule`` with the case's event or item at the case's moment; never raises
    for a fault of the rule or the case (it is in the decision)."""
    at = case.moment(parse_timezone(rule.timezone))
    context = FireContext(now=at, event=case.event, item=case.item)
    notes: list[str] = []
    decision = decide(project, rule, context, at, notes=notes)
    return Fired(rule.id, at, decision, tuple(notes), _reason(rule, context, decision))


def _reason(rule: Rule, context: FireContext, decision: Decision) -> str:
    """Why nothing is sent, naming what decided it."""
    if decision.verdict == "filtered" and rule.when:
        scope = {"event": context.event or {}, "item": context.item or {}, "now": context.now}
        read = ", ".join(
            f"{name} = {'missing' if value is MISSING else show(value)}"
            for name, value in read_values(rule.when, scope)
        )
        return f"`when` is false: {rule.when}" + (f" with {read}" if read else "")
    quiet = rule.quiet_hours
    if quiet is not None and (decision.verdict == "skipped" or decision.not_before is not None):
        window = f"{context.now.strftime('%H:%M')} is in the quiet hours ({quiet.start} to "
        window += f"{quiet.end})"
        if decision.not_before is None:
            return f"{window}, which skip it"
        return f"{window}: it waits until {decision.not_before.isoformat(timespec='minutes')}"
    return ""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One expectation that does not hold, at the line of the test that states it."""

    field: str  # in the case: "expect.body.message.subject"
    line: int | None
    column: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Failure:
    """Mismatches shown with one diff: ``expected`` (what the case names) against ``actual``
    (the same keys of what the fire did), ``label`` saying what ``actual`` is."""

    mismatches: tuple[Mismatch, ...]
    expected: Any
    actual: Any
    label: str


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    status: Status
    fired: Fired | None = None
    failures: tuple[Failure, ...] = ()
    reason: str = ""  # not_run: why the case could not run

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def judge(case: Case, fired: Fired) -> list[Failure]:
    """How what the fire came to differs from what the case expects; empty when it holds."""
    expect = case.expect

    def mismatch(path: tuple[Any, ...], message: str) -> Mismatch:
        line, column = case.where(path)
        return Mismatch(field_path(path), line, column, message)

    def outcome_failure(
        key: str, message: str, named: Iterable[str], extra: Iterable[str] = ()
    ) -> Failure:
        """A failure of the fire as a whole: the keys the case names, and ``extra`` keys of
        what the fire did that say why."""
        wanted = {k: v for k in named if (v := _expected(case, k)) is not None}
        got = {k: _actual(fired, k) for k in dict.fromkeys([*wanted, *extra])}
        return Failure((mismatch(("expect", key), message),), wanted, got, "what the fire does")

    if expect.error is not None:
        if fired.error is None:
            message = f"expected the fire to fail with an error containing '{expect.error}', "
            message += f"but {fired.words()}"
            return [outcome_failure("error", message, ("error",), ("sent", "requests"))]
        if expect.error not in fired.error:
            message = f"the error does not contain '{expect.error}': {fired.error}"
            return [outcome_failure("error", message, ("error",))]
        return []
    named = [k for k in ("sent", "because", "requests") if k in case.doc["expect"]]
    first = (named or ["body"])[0]
    if fired.error is not None:
        return [outcome_failure(first, fired.words(), named or ["sent"], ("error",))]
    if expect.sends != fired.sent:
        if expect.sends:
            message = f"expected a push at {_moment(fired)}, but {fired.words()}"
        else:
            message = f"expected nothing to be sent at {_moment(fired)}, but {fired.words()}"
        return [outcome_failure(first, message, named or ["sent"], ("sent", "because"))]
    if not fired.sent:
        if expect.because is not None and expect.because != fired.because:
            message = f"expected nothing sent because of {expect.because}, and {fired.words()}"
            return [outcome_failure("because", message, ("because",))]
        return []
    count = len(fired.sent_bodies)
    if expect.requests is not None and expect.requests != count:
        message = (
            f"expected {expect.requests} request{'s' if expect.requests != 1 else ''}, the fire "
            f"sends {count} ({_targets_per_request(fired)})"
        )
        return [outcome_failure("requests", message, ("requests",))]
    return list(_body_failures(case, fired, mismatch))


def _body_failures(case: Case, fired: Fired, mismatch: Any) -> Iterator[Failure]:
    """Each request against ``body``: a mapping against every request, a list request by
    request. Requests that fail alike are reported once."""
    body = case.expect.body
    if body is None:
        return
    bodies = fired.sent_bodies
    if isinstance(body, list):
        if len(body) != len(bodies):
            message = (
                f"body lists {len(body)} requests, the fire sends {len(bodies)} "
                f"({_targets_per_request(fired)})"
            )
            yield Failure(
                (mismatch(("expect", "body"), message),),
                {"requests": len(body)},
                {"requests": len(bodies)},
                "what the fire does",
            )
            return
        pairs: list[tuple[int, Any, tuple[Any, ...]]] = [
            (i, body[i], (i,)) for i in range(len(bodies))
        ]
    else:
        pairs = [(i, body, ()) for i in range(len(bodies))]
    seen: dict[tuple[str, ...], list[int]] = {}
    shown: dict[tuple[str, ...], tuple[Comparison, tuple[Any, ...]]] = {}
    for index, expected, inner in pairs:
        result = compare(expected, bodies[index])
        if result.matches:
            continue
        key = (*inner, *(f"{field_path(d.path)}: {d.message}" for d in result.differences))
        seen.setdefault(key, []).append(index)
        shown.setdefault(key, (result, inner))
    groups = list(seen.items())
    for number, (key, indexes) in enumerate(groups[:SHOWN_FAILURES], 1):
        result, inner = shown[key]
        which = _which(indexes, len(bodies))
        found = tuple(
            mismatch(("expect", "body", *inner, *d.path), f"{d.message} ({which})")
            for d in result.differences[:SHOWN_MISMATCHES]
        )
        hidden = len(result.differences) - SHOWN_MISMATCHES
        if hidden > 0:
            note = (
                f"and {hidden} more difference{'s' if hidden != 1 else ''} ({which}): see the diff"
            )
            found = (*found, mismatch(("expect", "body", *inner), note))
        more = len(groups) - SHOWN_FAILURES
        if number == SHOWN_FAILURES and more > 0:
            rest = sum(len(i) for _, i in groups[SHOWN_FAILURES:])
            note = f"and {rest} more request{'s' if rest != 1 else ''} differ in other ways"
            found = (*found, mismatch(("expect", "body"), note))
        yield Failure(found, result.expected, result.actual, which)


#: Requests that differ in different ways shown at most, one diff each; and lines saying what
#: differs in one of them (the diff shows all).
SHOWN_FAILURES = 3
SHOWN_MISMATCHES = 10


def _which(indexes: list[int], total: int) -> str:
    """``request 1 of 2``, ``requests 1 and 3 of 3``, ``each of the 3 requests``."""
    if len(indexes) == 1:
        return f"request {indexes[0] + 1} of {total}"
    if len(indexes) == total:
        return f"each of the {total} requests"
    numbers = [str(i + 1) for i in indexes]
    return f"requests {', '.join(numbers[:-1])} and {numbers[-1]} of {total}"


def _targets_per_request(fired: Fired) -> str:
    counts = [len(b.get("targets", [])) for b in fired.bodies]
    if not counts:
        return "no targets"
    return "targets per request: " + ", ".join(str(c) for c in counts)


def _moment(fired: Fired) -> str:
    return fired.at.isoformat(timespec="minutes")


def _expected(case: Case, key: str) -> Any:
    expect = case.expect
    if key == "sent":
        return expect.sends
    return getattr(expect, key)


def _actual(fired: Fired, key: str) -> Any:
    if key == "sent":
        return fired.sent
    if key == "requests":
        return len(fired.sent_bodies)
    return getattr(fired, key)


def run_case(ruleset: RuleSet, case: Case) -> CaseResult:
    """Fire one case and judge it; a case that cannot run says why, and one that raises fails
    alone with its message."""
    project = ruleset.project
    if project is None:
        return CaseResult(case, "not_run", reason="pushrules.yaml has errors: fix them first")
    rule = ruleset.rules.get(case.rule)
    if rule is None or case.rule in ruleset.stale:
        errors = [p for p in ruleset.problems if p.is_error and _is_rule_file(p.file, case.rule)]
        where = errors[0].file if errors else f"rules/{case.rule}.yaml"
        return CaseResult(
            case,
            "not_run",
            reason=f"rule {case.rule} has errors: fix {where} first (see pushrules validate)",
        )
    try:
        fired = fire_case(project, rule, case)
        failures = judge(case, fired)
    except Exception as exc:  # a fault of ours: this case fails, the others run
        return CaseResult(
            case, "not_run", reason=f"the case could not run: {type(exc).__name__}: {exc}"
        )
    return CaseResult(case, "failed" if failures else "passed", fired, tuple(failures))


def _is_rule_file(rel: str, rule_id: str) -> bool:
    path = Path(rel)
    return path.parts[:1] == ("rules",) and path.stem == rule_id


def run_cases(ruleset: RuleSet, rule: str | None = None) -> list[tuple[CaseFile, list[CaseResult]]]:
    """Every case of the project (or of one rule), file by file."""
    return [
        (found, [run_case(ruleset, case) for case in found.cases])
        for found in ruleset.cases
        if rule is None or found.rule == rule
    ]


def project_problems(ruleset: RuleSet, rule: str | None = None) -> list[Problem]:
    """The errors of the project a test run reports (with ``rule``, those that concern it:
    its file, its tests, pushrules.yaml and the templates)."""
    tests_of = {f.file for f in ruleset.cases if f.rule == rule}
    return [
        p
        for p in ruleset.problems
        if p.is_error
        and (
            rule is None
            or _is_rule_file(p.file, rule)
            or p.file in tests_of
            or not p.file.startswith(("rules/", "rule-tests/"))
            or (p.file.startswith("rule-tests/") and Path(p.file).stem == rule)
        )
    ]
