"""``pushrules plan``: what a change to a project does, rule by rule, for its review.

Two versions of a project (an older git revision and the working tree), each loaded by the one
:class:`~engine.rules.loader.Loader`, are compared: rules added, removed, renamed, enabled or
disabled; for a changed rule, the parts that changed (a template shows on every rule that uses
it, since rules are compared after templates are merged), its next fire times when its schedule
changed, and what each of its test cases would send before and after; problems new and fixed.

:func:`compare` is pure, given both rule sets; :func:`plan_project` is the I/O around it.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from engine.rules.cases import Case, CaseFile
from engine.rules.fragments import Fragments
from engine.rules.loader import RULES_DIR, Loader, RuleSet, context_key, rule_files
from engine.rules.problems import Problem
from engine.rules.problems import format_text as problems_text
from engine.rules.rule import Rule
from engine.rules.schedule import SCHEDULED, next_fires
from engine.rules.templating import is_template, timezone_reads
from engine.rules.yaml_source import Scalar, Unreadable, load, read_source

#: The parts of a rule a change is reported in, in this order. ``limits`` covers ``limit``,
#: ``quiet_hours`` and ``catch_up``; ``other`` keys the rule format does not know;
#: ``timezone`` the rule's resolved timezone where it moves more than the schedule (that shows
#: as ``trigger``, with its fire times): see :func:`_timezone_reads`.
PARTS = (
    "trigger",
    "timezone",
    "when",
    "apps",
    "message",
    "buttons",
    "targets",
    "limits",
    "vars",
    "description",
    "enabled",
    "other",
)
#: Fire times listed before and after a schedule change.
NEXT_COUNT = 5
BUTTONS = "interactiveButtons"

_KEY_PARTS = {
    "trigger": "trigger",
    "when": "when",
    "apps": "apps",
    "message": "message",
    "targets": "targets",
    "limit": "limits",
    "quiet_hours": "limits",
    "catch_up": "limits",
    "vars": "vars",
    "description": "description",
    "enabled": "enabled",
}

#: The outcome of each test case of rule ``rule_id`` (the cases are the working tree's) when
#: run on ``ruleset``, in the same order whatever the rule set: ``(case name, outcome)`` pairs,
#: the outcome JSON data (see :func:`case_outcome`).
CaseOutcomes = Callable[[RuleSet, str], Sequence[tuple[str, Any]]]


def no_cases(ruleset: RuleSet, rule_id: str) -> list[tuple[str, Any]]:
    """No test cases."""
    return []


def rule_test_outcomes(files: Iterable[CaseFile]) -> CaseOutcomes:
    """The outcomes of the cases of ``files`` (the working tree's ``rule-tests/``), on either
    version of the project."""
    by_rule: dict[str, list[Case]] = {}
    for found in files:
        by_rule.setdefault(found.rule, []).extend(found.cases)

    def outcomes(ruleset: RuleSet, rule_id: str) -> list[tuple[str, Any]]:
        return [(c.name, case_outcome(ruleset, rule_id, c)) for c in by_rule.get(rule_id, ())]

    return outcomes


def case_outcome(ruleset: RuleSet, rule_id: str, case: Case) -> dict[str, Any]:
    """What the fire of ``case`` comes to with the rule of ``ruleset``, decided as the rule
    tests decide it (as a real fire, with no store): ``{"requests": [...]}`` (the request
    bodies) when it sends; ``{"not_sent": why}``, with the requests quiet hours hold back;
    ``{"error": message}``; with ``"notes"`` when ``for_each`` items were skipped. Never
    raises: one case fails alone."""
    from engine.review.runner import fire_case

    rule = ruleset.rules.get(rule_id)
    if ruleset.project is None or rule is None:
        return {"error": "the rule cannot fire: it, or pushrules.yaml, has errors"}
    try:
        fired = fire_case(ruleset.project, rule, case)
    except Exception as exc:  # a fault of ours: this case says so, the others run
        return {"error": f"the case could not run: {type(exc).__name__}: {exc}"}
    outcome: dict[str, Any]
    if fired.error is not None:
        outcome = {"error": fired.error}
    elif fired.sent:
        outcome = {"requests": fired.bodies}
    else:
        outcome = {"not_sent": fired.reason or fired.decision.detail}
        if fired.bodies:
            outcome["requests"] = fired.bodies
    if fired.notes:
        outcome["notes"] = list(fired.notes)
    return outcome


@dataclass(frozen=True, slots=True)
class CaseDiff:
    name: str
    diff: tuple[Mapping[str, Any], ...]  # see json_diff


@dataclass(frozen=True, slots=True)
class RuleChange:
    rule: str
    parts: tuple[str, ...]
    enabled: tuple[bool | None, bool | None]  # None: the file cannot be read as a rule
    next_before: tuple[str, ...] = ()
    next_after: tuple[str, ...] = ()
    cases: tuple[CaseDiff, ...] = ()
    #: With the ``timezone`` part: the resolved timezone before and after, and what of the
    #: rule reads it (``quiet hours``, ``now``, ``rule.timezone``).
    timezone: tuple[str, str] | None = None
    timezone_reads: tuple[str, ...] = ()

    @property
    def toggled(self) -> bool:
        before, after = self.enabled
        return before is not None and after is not None and before != after

    @property
    def kind(self) -> str:
        """``changed``, ``enabled`` or ``disabled``, as the summary names it."""
        if not self.toggled:
            return "changed"
        state = "enabled" if self.enabled[1] else "disabled"
        return state if self.parts == ("enabled",) else f"changed, {state}"

    @property
    def what(self) -> str:
        """The parts that changed, for people (``enabled`` is said by :attr:`kind`): the
        timezone with its change and what it moves, since the rule file may not show it."""
        return ", ".join(
            self._timezone_words() if p == "timezone" else p
            for p in self.parts
            if not (p == "enabled" and self.toggled)
        )

    def _timezone_words(self) -> str:
        if self.timezone is None:
            return "timezone"
        before, after = self.timezone
        return f"timezone: {before} -> {after} ({', '.join(self.timezone_reads)})"


@dataclass(frozen=True)
class Plan:
    base: str  # the commit compared with
    base_label: str  # how it was chosen, for people
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    renamed: tuple[tuple[str, str], ...] = ()
    changed: tuple[RuleChange, ...] = ()
    new_problems: tuple[Problem, ...] = ()
    fixed_problems: tuple[Problem, ...] = ()
    ok: bool = True  # the working tree has no errors

    @property
    def empty(self) -> bool:
        return not (
            self.added
            or self.removed
            or self.renamed
            or self.changed
            or self.new_problems
            or self.fixed_problems
        )

    def to_json(self) -> dict[str, Any]:
        """The shape other tools read (documented in docs/rules.md)."""
        return {
            "base": self.base,
            "added": list(self.added),
            "removed": list(self.removed),
            "renamed": [{"from": old, "to": new} for old, new in self.renamed],
            "changed": [_change_json(c) for c in self.changed],
            "problems": {
                "new": [asdict(p) for p in self.new_problems],
                "fixed": [asdict(p) for p in self.fixed_problems],
            },
        }


def _change_json(change: RuleChange) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rule": change.rule,
        "parts": list(change.parts),
        "enabled": list(change.enabled),
        "next_before": list(change.next_before),
        "next_after": list(change.next_after),
        "cases": [{"name": k.name, "diff": list(k.diff)} for k in change.cases],
    }
    if change.timezone is not None:  # only with the part: other changes keep their shape
        before, after = change.timezone
        out["timezone"] = {
            "before": before,
            "after": after,
            "reads": list(change.timezone_reads),
        }
    return out


# --- one version of the project --------------------------------------------------------------


@dataclass
class Side:
    """One version of the project: its rule set, and its rule files by rule id."""

    ruleset: RuleSet
    files: Mapping[str, str]  # rule id -> its file, relative to the project (the first)
    all_files: tuple[str, ...] = ()  # every rule file, a rule id's second file included
    _docs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ruleset: RuleSet) -> Side:
        rels = [path.relative_to(ruleset.root).as_posix() for path in rule_files(ruleset.root)]
        files: dict[str, str] = {}
        for rel in rels:
            files.setdefault(Path(rel).stem, rel)
        return cls(ruleset, files, tuple(rels))

    def source(self, rule_id: str) -> Any:
        """The rule file as written (its YAML, before any check): a mapping, or the text
        itself when it is not YAML, or None when it cannot be read."""
        if rule_id not in self._docs:
            root = self.ruleset.root
            try:
                text = read_source(root / self.files[rule_id], root, root / RULES_DIR)
            except Unreadable:
                self._docs[rule_id] = None
            else:
                loaded = load(text)
                errors = any(i.severity == "error" for i in loaded.issues)
                self._docs[rule_id] = text if errors else loaded.data
        return self._docs[rule_id]


def empty_side(root: Path) -> Side:
    """A project that did not exist yet."""
    return Side(RuleSet(root, None, Fragments(), {}, (), 0), {}, ())


# --- comparing -------------------------------------------------------------------------------


def compare(
    before: Side,
    after: Side,
    *,
    base: str,
    base_label: str,
    start: datetime,
    cases: CaseOutcomes = no_cases,
    unchanged: frozenset[str] = frozenset(),
) -> Plan:
    """The plan of going from ``before`` to ``after``; ``start``: fire times are listed after
    it. ``unchanged``: rule ids known to be the same on both sides (not compared)."""
    old_ids, new_ids = set(before.files), set(after.files)
    renamed = _renames(before, after, sorted(old_ids - new_ids), sorted(new_ids - old_ids))
    gone = {old for old, _ in renamed}
    came = {new for _, new in renamed}
    pairs = [(i, i) for i in sorted(old_ids & new_ids)] + list(renamed)
    changed = []
    for old_id, new_id in sorted(pairs, key=lambda pair: pair[1]):
        if old_id == new_id and old_id in unchanged:
            continue
        change = _rule_change(before, after, old_id, new_id, start, cases)
        if change is not None:
            changed.append(change)
    moved = {before.files[o]: after.files[n] for o, n in pairs if before.files[o] != after.files[n]}
    new, fixed = _problem_changes(before.ruleset.problems, after.ruleset.problems, moved)
    if after.ruleset.project is None:
        # Without valid settings no rule is checked: its old problems are hidden, not fixed.
        fixed = tuple(p for p in fixed if PurePosixPath(p.file).parts[:1] != (str(RULES_DIR),))
    return Plan(
        base=base,
        base_label=base_label,
        added=tuple(sorted(new_ids - old_ids - came)),
        removed=tuple(sorted(old_ids - new_ids - gone)),
        renamed=tuple(renamed),
        changed=tuple(changed),
        new_problems=new,
        fixed_problems=fixed,
        ok=after.ruleset.ok,
    )


#: How alike a removed and an added rule must be to be one rule renamed and edited: the share
#: of their values (each leaf of the YAML data with its path) they have in common, as git calls
#: a file renamed when about half of its lines are the same. Past RENAME_PAIRS removed x added
#: pairs, only renames without edits are found (the comparison is quadratic).
RENAME_SIMILARITY = 0.6
RENAME_PAIRS = 100_000


def _renames(
    before: Side, after: Side, removed: list[str], added: list[str]
) -> list[tuple[str, str]]:
    """Removed rules whose content (as YAML data, comments and layout aside) is an added rule's;
    then, of those left, the pairs most alike, when alike enough: renamed and edited."""
    old_docs = {i: _plain(d) for i in removed if (d := before.source(i)) is not None}
    new_docs = {i: _plain(d) for i in added if (d := after.source(i)) is not None}
    by_content: dict[str, list[str]] = {}
    for rule_id, doc in new_docs.items():
        by_content.setdefault(_content_key(doc), []).append(rule_id)
    found = []
    for rule_id, doc in old_docs.items():
        matches = by_content.get(_content_key(doc))
        if matches:
            found.append((rule_id, matches.pop(0)))
    taken = {old for old, _ in found} | {new for _, new in found}
    olds = {i: Counter(_leaves(d)) for i, d in old_docs.items() if i not in taken}
    news = {i: Counter(_leaves(d)) for i, d in new_docs.items() if i not in taken}
    if olds and news and len(olds) * len(news) <= RENAME_PAIRS:
        found.extend(_alike(olds, news))
    return sorted(found)


def _leaves(value: Any, path: str = "") -> Iterable[str]:
    """Each scalar of plain data with where it is: ``message.subject="Hi"``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield f"{path}={json.dumps(value, default=str)}"


def _alike(
    olds: Mapping[str, Counter[str]], news: Mapping[str, Counter[str]]
) -> list[tuple[str, str]]:
    """The pairs at least RENAME_SIMILARITY alike, the most alike first, each rule once."""
    scored = []
    for old, old_leaves in olds.items():
        for new, new_leaves in news.items():
            size = old_leaves.total() + new_leaves.total()
            ratio = 2 * (old_leaves & new_leaves).total() / size if size else 0.0
            if ratio >= RENAME_SIMILARITY:
                scored.append((-ratio, old, new))
    paired: list[tuple[str, str]] = []
    used: set[str] = set()
    for _, old, new in sorted(scored):
        if old not in used and new not in used:
            paired.append((old, new))
            used.update((old, new))
    return paired


def _content_key(plain: Any) -> str:
    return json.dumps(plain, sort_keys=True, default=str)


def _rule_change(
    before: Side,
    after: Side,
    old_id: str,
    new_id: str,
    start: datetime,
    cases: CaseOutcomes,
) -> RuleChange | None:
    old = before.ruleset.rules.get(old_id)
    new = after.ruleset.rules.get(new_id)
    timezone: tuple[str, str] | None = None
    reads: tuple[str, ...] = ()
    if old is not None and new is not None:
        parts = _changed(_model_parts(old), _model_parts(new))
        if old.timezone != new.timezone:
            reads = _timezone_reads(old, new)
        if reads:
            timezone = (old.timezone, new.timezone)
            parts = [p for p in PARTS if p in parts or p == "timezone"]
    else:
        parts = _changed(_source_parts(before.source(old_id)), _source_parts(after.source(new_id)))
    if not parts:
        return None
    next_before: list[str] = []
    next_after: list[str] = []
    if "trigger" in parts:
        next_before, next_after = _upcoming(old, start), _upcoming(new, start)
    diffs: list[CaseDiff] = []
    if old_id == new_id:  # the same cases, run on each version, in the same order
        was = cases(before.ruleset, old_id)
        now = cases(after.ruleset, new_id)
        for (name, old_outcome), (_, new_outcome) in zip(was, now, strict=True):
            diffs.append(CaseDiff(name, tuple(json_diff(old_outcome, new_outcome))))
    return RuleChange(
        new_id,
        tuple(parts),
        (_enabled(old, before, old_id), _enabled(new, after, new_id)),
        tuple(next_before),
        tuple(next_after),
        tuple(diffs),
        timezone,
        reads,
    )


def _changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    return [part for part in PARTS if before.get(part) != after.get(part)]


#: How :func:`_timezone_reads` names a rule's quiet hours, judged in its timezone.
QUIET_HOURS = "quiet hours"


def _timezone_reads(old: Rule, new: Rule) -> tuple[str, ...]:
    """What of a rule, on either version, reads its timezone besides the schedule: its quiet
    hours, and ``now`` or ``rule.timezone`` in any of its templates (``when``, message,
    targets, trigger, vars). A rule reading none of them sends the same in any timezone."""
    found: set[str] = set()
    for rule in (old, new):
        if rule.quiet_hours is not None:
            found.add(QUIET_HOURS)
        found.update(*(timezone_reads(text) for text in _rule_texts(rule) if is_template(text)))
    return tuple(r for r in (QUIET_HOURS, "now", "rule.timezone") if r in found)


def _rule_texts(rule: Rule) -> Iterable[str]:
    """Every text of a checked rule, templates merged: the ones that may be templates."""
    values: list[Any] = [rule.when, rule.trigger, rule.targets, rule.vars]
    values += [p.message for p in rule.apps]
    while values:
        value = values.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, Mapping):
            values.extend(value.values())
        elif isinstance(value, list | tuple):
            values.extend(value)


def _model_parts(rule: Rule) -> dict[str, Any]:
    """What a checked rule means, by part: templates merged; the timezone resolved, and part
    of the trigger when it places the fires (the rest it moves is the ``timezone`` part, see
    :func:`_rule_change`)."""
    timezone = rule.timezone if rule.trigger_kind in SCHEDULED else None
    return {
        "trigger": (rule.trigger_kind, _plain(rule.trigger), timezone),
        "when": rule.when,
        "apps": [
            (p.alias, p.app.partner, p.app.platform, p.parent_key, p.parent_value)
            for p in rule.apps
        ],
        "message": [
            (p.alias, _plain({k: v for k, v in p.message.items() if k != BUTTONS}))
            for p in rule.apps
        ],
        "buttons": [(p.alias, _plain(p.message.get(BUTTONS))) for p in rule.apps],
        "targets": _plain(rule.targets),
        "limits": (rule.limit, rule.quiet_hours, rule.catch_up),
        "vars": _plain(rule.vars),
        "description": rule.description,
        "enabled": rule.enabled,
    }


def _source_parts(doc: Any) -> dict[str, Any]:
    """A rule file as written, by part, for a version that does not check (no templates
    merged: they cannot be known to apply). Anything but a mapping counts as empty."""
    parts: dict[str, dict[str, Any]] = {}

    def put(part: str, key: str, value: Any) -> None:
        parts.setdefault(part, {})[key] = _plain(value)

    for key, value in doc.items() if isinstance(doc, dict) else ():
        name = str(key)
        if name == "message" and isinstance(value, dict):
            put("message", name, {k: v for k, v in value.items() if k != BUTTONS})
            put("buttons", name, value.get(BUTTONS))
        elif name == "apps" and isinstance(value, dict):
            for alias, settings in value.items():
                where = f"apps.{alias}"
                if isinstance(settings, dict) and isinstance(settings.get("message"), dict):
                    message = settings["message"]
                    put("message", where, {k: v for k, v in message.items() if k != BUTTONS})
                    put("buttons", where, message.get(BUTTONS))
                    put("apps", where, {k: v for k, v in settings.items() if k != "message"})
                else:
                    put("apps", where, settings)
        else:
            put(_KEY_PARTS.get(name, "other"), name, value)
    return parts


def _plain(value: Any) -> Any:
    """Comparable data: a scalar is its text as written (what the request carries: quoting
    it, or not, is no change), mappings and lists their items, the rest as it is."""
    if isinstance(value, Scalar):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _enabled(rule: Rule | None, side: Side, rule_id: str) -> bool | None:
    if rule is not None:
        return rule.enabled
    doc = side.source(rule_id)
    if not isinstance(doc, dict):
        return None
    value = doc.get("enabled")
    if value is None:
        return True
    typed = value.typed if isinstance(value, Scalar) else value
    return typed if isinstance(typed, bool) else None


def _upcoming(rule: Rule | None, start: datetime) -> list[str]:
    if rule is None or rule.trigger_kind not in SCHEDULED:
        return []
    return [t.isoformat() for t in next_fires(rule.trigger, rule.timezone, start, NEXT_COUNT)]


def json_diff(before: Any, after: Any, path: str = "") -> list[dict[str, Any]]:
    """Where two JSON values differ, as ``{"path", "before", "after"}`` entries (no
    ``before`` for what was added, no ``after`` for what was removed). Lists compare by
    position; ``path`` reads like ``requests[0].sendInstantMessage.message.subject``."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[dict[str, Any]] = []
        for key in [*before, *(k for k in after if k not in before)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in after:
                out.append({"path": sub, "before": before[key]})
            elif key not in before:
                out.append({"path": sub, "after": after[key]})
            else:
                out.extend(json_diff(before[key], after[key], sub))
        return out
    if isinstance(before, list) and isinstance(after, list):
        out = []
        for index in range(max(len(before), len(after))):
            sub = f"{path}[{index}]"
            if index >= len(after):
                out.append({"path": sub, "before": before[index]})
            elif index >= len(before):
                out.append({"path": sub, "after": after[index]})
            else:
                out.extend(json_diff(before[index], after[index], sub))
        return out
    if type(before) is type(after) and before == after:
        return []
    return [{"path": path, "before": before, "after": after}]


_LINE = re.compile(r"\bline \d+")


def _problem_changes(
    before: Iterable[Problem], after: Iterable[Problem], moved: Mapping[str, str]
) -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    """Problems only in ``after`` (new) and only in ``before`` (fixed). A problem is the same
    when its file (``moved``: renamed rule files), field, code, severity and message are: one
    whose line merely moved, because lines were added above it, is neither new nor fixed."""

    old = Counter(_problem_key(p, moved) for p in before)
    new = Counter(_problem_key(p, {}) for p in after)
    return _not_in(after, old, {}), _not_in(before, new, moved)


def _problem_key(problem: Problem, files: Mapping[str, str]) -> tuple[Any, ...]:
    message = _LINE.sub("line N", problem.message)
    file = files.get(problem.file, problem.file)
    return (file, problem.field, problem.code, problem.severity, message)


def _not_in(
    ours: Iterable[Problem], theirs: Counter[tuple[Any, ...]], files: Mapping[str, str]
) -> tuple[Problem, ...]:
    """Problems of ``ours`` left once each of ``theirs`` has taken its equal (a problem
    found twice where it was once before is new once)."""
    left = Counter(theirs)
    out = []
    for problem in sorted(ours, key=Problem.sort_key):
        key = _problem_key(problem, files)
        if left[key] > 0:
            left[key] -= 1
        else:
            out.append(problem)
    return tuple(out)


# --- the I/O edge ----------------------------------------------------------------------------


def plan_project(
    root: Path,
    *,
    base: str,
    base_label: str,
    export: Callable[[Path], bool],
    start: datetime,
    cases: CaseOutcomes | None = None,
    reuse: bool = True,
) -> Plan:
    """The plan of the working tree at ``root`` against the version ``export`` writes into the
    folder it is given (False: the project did not exist then). ``cases``: by default, the
    working tree's rule tests (:func:`rule_test_outcomes`).

    ``reuse``: a rule file whose bytes, and the configuration and templates, are the same on
    both sides is checked once (its problems count on both sides) and not compared, since it
    cannot have changed. The plan is that of two full loads compared in full (``reuse=False``).
    """
    with tempfile.TemporaryDirectory(prefix="pushrules-plan-") as folder:
        base_root = Path(folder) / "project"
        existed = export(base_root)
        same = same_rule_files(root, base_root) if existed and reuse else frozenset()
        # Rule tests are read (their problems count, as validate's do) on both sides.
        loader = Loader(root, skip_rules=same, tests=True)
        after = Side.of(loader.load())
        if existed:
            old = (loader.sibling(base_root) if reuse else Loader(base_root, tests=True)).load()
            # A message naming the project's folder names the one under review, not a copy.
            problems = tuple(
                replace(p, message=p.message.replace(str(base_root), str(root)))
                for p in old.problems
            )
            before = Side.of(replace(old, problems=problems))
        else:
            before = empty_side(base_root)
        # A rule id with a file that differs (or a second file) anywhere is compared.
        differ = {Path(rel).stem for side in (before, after) for rel in side.all_files} - {
            Path(rel).stem for rel in same
        }
        unchanged = frozenset(Path(rel).stem for rel in same) - differ
        return compare(
            before,
            after,
            base=base,
            base_label=base_label,
            start=start,
            cases=rule_test_outcomes(after.ruleset.cases) if cases is None else cases,
            unchanged=unchanged,
        )


def same_rule_files(root: Path, other: Path) -> frozenset[str]:
    """The rule files (relative paths) whose bytes are the same in ``root`` and ``other``,
    when the configuration and templates are too (else none: every rule may read them)."""
    if context_key(root) != context_key(other):
        return frozenset()
    same = set()
    for path in rule_files(root):
        rel = path.relative_to(root)
        try:
            if path.read_bytes() == (other / rel).read_bytes():
                same.add(rel.as_posix())
        except OSError:
            continue  # gone, or unreadable: the loader says why
    return frozenset(same)


# --- output ----------------------------------------------------------------------------------


#: Markdown is posted on a pull request: past these, the rest is counted, not shown.
MAX_ROWS = 50
MAX_DETAILS = 30
MAX_DIFF_LINES = 20
MAX_PROBLEMS = 30
MAX_VALUE = 120


def _value(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def diff_lines(diff: Iterable[Mapping[str, Any]]) -> list[str]:
    """A JSON diff as ``-``/``+`` lines, as a diff reads."""
    lines = []
    for entry in diff:
        path = entry["path"] or "(all)"
        if "before" in entry:
            lines.append(f"- {path}: {_value(entry['before'])}")
        if "after" in entry:
            lines.append(f"+ {path}: {_value(entry['after'])}")
    return lines


def format_json(plan: Plan) -> str:
    return json.dumps(plan.to_json(), indent=2, ensure_ascii=False)


def format_text(plan: Plan) -> str:
    """For a terminal: everything, nothing cut."""
    out = [f"pushrules plan: the working tree against {plan.base[:12]} ({plan.base_label})"]
    if plan.empty:
        out.append("no change to any rule, no problem new or fixed")
    out.extend(f"added      {rule}" for rule in plan.added)
    out.extend(f"removed    {rule}" for rule in plan.removed)
    out.extend(f"renamed    {old} -> {new}" for old, new in plan.renamed)
    for change in plan.changed:
        what = f": {change.what}" if change.what else ""
        out.append(f"{change.kind:<10} {change.rule}{what}")
        out.extend(_next_lines(change, "  "))
        for case in change.cases:
            if case.diff:
                out.append(f"  test case {case.name}:")
                out.extend(f"    {line}" for line in diff_lines(case.diff))
        if _unchanged_cases(change):
            out.append(f"  {_unchanged_cases(change)}")
    for title, problems in (("new", plan.new_problems), ("fixed", plan.fixed_problems)):
        if problems:
            out.append(f"{len(problems)} {title} problem{'s' if len(problems) != 1 else ''}:")
            out.extend(f"  {line}" for line in problems_text(problems).splitlines())
    if not plan.ok:
        out.append("the working tree has errors: see `pushrules validate`")
    return "\n".join(out)


def _next_lines(change: RuleChange, indent: str) -> list[str]:
    if not (change.next_before or change.next_after):
        return []
    before, after = _next_columns(change)
    width = max(len(t) for t in [*before, "next fires before"])
    lines = [f"{indent}{'next fires before':<{width}}  after"]
    lines += [f"{indent}{b:<{width}}  {a}".rstrip() for b, a in zip(before, after, strict=True)]
    return lines


def _next_columns(change: RuleChange) -> tuple[list[str], list[str]]:
    """Fire times before and after, side by side; ``none`` where a version has none (not
    scheduled, or no fire to come)."""
    rows = max(len(change.next_before), len(change.next_after))

    def column(times: Sequence[str]) -> list[str]:
        return [*(times or ["none"]), *[""] * rows][:rows]

    return column(change.next_before), column(change.next_after)


def format_markdown(plan: Plan) -> str:
    """For a pull request comment: a summary table, then details folded, long parts cut."""
    out = [f"### pushrules plan\n\nAgainst `{plan.base[:12]}` ({plan.base_label}).\n"]
    rows = [(f"`{rule}`", "added", "") for rule in plan.added]
    rows += [(f"`{rule}`", "removed", "") for rule in plan.removed]
    rows += [(f"`{old}` → `{new}`", "renamed", "") for old, new in plan.renamed]
    rows += [(f"`{c.rule}`", c.kind, c.what) for c in plan.changed]
    if rows:
        out.append("| rule | change | what changed |\n| --- | --- | --- |")
        out.extend(f"| {rule} | {kind} | {parts} |" for rule, kind, parts in rows[:MAX_ROWS])
        if len(rows) > MAX_ROWS:
            out.append(f"| … | {len(rows) - MAX_ROWS} more rules | |")
        out.append("")
    else:
        out.append("No rule changes.\n")
    out.append(_problem_summary(plan) + "\n")
    for change in plan.changed[:MAX_DETAILS]:
        details = _markdown_details(change)
        if details:
            summary = f"<code>{change.rule}</code>: {change.what or change.kind}"
            out.append(f"<details><summary>{summary}</summary>\n\n{details}\n</details>\n")
    if len(plan.changed) > MAX_DETAILS:
        more = len(plan.changed) - MAX_DETAILS
        out.append(f"Details of {more} more changed rules cut: run `pushrules plan` to see them.\n")
    for title, problems in (("new", plan.new_problems), ("fixed", plan.fixed_problems)):
        if problems:
            shown = problems_text(problems[:MAX_PROBLEMS])
            cut = len(problems) - MAX_PROBLEMS
            tail = f"\n… {cut} more cut" if cut > 0 else ""
            noun = "problem" if len(problems) == 1 else "problems"
            out.append(
                f"<details><summary>{len(problems)} {title} {noun}</summary>\n\n"
                f"```text\n{shown}{tail}\n```\n</details>\n"
            )
    return "\n".join(out).rstrip() + "\n"


def _problem_summary(plan: Plan) -> str:
    errors = sum(p.is_error for p in plan.new_problems)
    new = len(plan.new_problems)
    text = f"Problems: {new} new" + (
        f" ({errors} error{'s' if errors != 1 else ''})" if new else ""
    )
    text += f", {len(plan.fixed_problems)} fixed."
    if not plan.ok:
        text += " **The working tree has errors**: `pushrules validate` lists them."
    return text


def _markdown_details(change: RuleChange) -> str:
    parts = []
    if change.next_before or change.next_after:
        parts.append("| next fires before | after |\n| --- | --- |")
        parts.extend(f"| {b} | {a} |" for b, a in zip(*_next_columns(change), strict=True))
        parts.append("")
    for case in change.cases:
        if not case.diff:
            continue
        lines = diff_lines(case.diff)
        shown = lines[:MAX_DIFF_LINES]
        if len(lines) > MAX_DIFF_LINES:
            shown.append(f"… {len(lines) - MAX_DIFF_LINES} more lines cut")
        body = "\n".join(shown)
        parts.append(f"Test case `{case.name}`:\n\n```diff\n{body}\n```\n")
    if _unchanged_cases(change):
        parts.append(_unchanged_cases(change)[0].upper() + _unchanged_cases(change)[1:] + ".\n")
    return "\n".join(parts)


def _unchanged_cases(change: RuleChange) -> str:
    """``its 3 test cases: no change``, ``2 other test cases: no change``, or ''."""
    same = sum(not case.diff for case in change.cases)
    if not same:
        return ""
    noun = "test case" if same == 1 else "test cases"
    if same == len(change.cases):
        return f"its {'one' if same == 1 else same} {noun}: no change"
    return f"{same} other {noun}: no change"
