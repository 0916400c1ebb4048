"""A project folder -> an immutable :class:`RuleSet`, re-checking only files that changed.

A broken file never hides the problems of, nor stops the loading of, the others. When a file
that was good breaks, its last good version stays in the rule set (the daemon keeps running
it) and its problems are reported. Many files are checked on all cores.

A reload reads only the rule files whose device, inode, size, mtime or ctime changed since
they were read (one ``stat`` each), and re-checks only those whose text changed. An edit the
``stat`` cannot see (the same size within the file system's timestamp granularity) is caught
two ways: a file modified less than :data:`RACY_SECONDS` before it was read is read again by
the next load, whatever its ``stat`` says (git's "racily clean" rule), and ``rehash=True`` reads
every file again (the daemon does it on SIGHUP and when its watcher's periodic re-scan, which
hashes every file, finds a change). The ``stat`` kept is the one taken before reading, so a
file that changes while it is read is read again by the next load; if what was read is a cut
file, its errors keep the rule's last good version meanwhile.

A loaded rule keeps what firing it needs, not the marked YAML it was checked from
(:func:`~engine.rules.checks.compact_rule`): its file's problems are kept as found, and found
again when the file changes. The garbage collector is paused while a load runs: it would
otherwise walk the growing heap of parsed files again and again.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import os
import re
import time
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from engine.rules.cases import CaseFile, ReadCaseFile, check_case_files, read_case_files
from engine.rules.checks import compact_rule, parse_rule, shared_values
from engine.rules.fragments import BUTTONS_DIR, MESSAGES_DIR, Fragments, load_fragments
from engine.rules.problems import Problem
from engine.rules.project import CONFIG_NAME, Project, load_project
from engine.rules.rule import Rule
from engine.rules.yaml_source import Sharing, Unreadable, read_source, yaml_files, yaml_paths

RULES_DIR = Path("rules")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Below this many files to check, starting worker processes costs more than it saves.
PARALLEL_THRESHOLD = 200
#: Files a worker checks and sends back at a time: smaller batches keep less in memory at
#: once and spread the work evenly; larger ones share more of the templates' data.
CHUNK = 250
#: A file modified less than this before it was read may be modified again within the same
#: mtime tick (one or two seconds on some file systems), unseen by ``stat``: it is read again.
RACY_SECONDS = 2.0

StatKey = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns


@dataclass(frozen=True)
class RuleSet:
    """Everything the daemon runs on; swapped whole on reload."""

    root: Path
    project: Project | None
    fragments: Fragments
    rules: Mapping[str, Rule]
    problems: tuple[Problem, ...]
    files: int
    stale: frozenset[str] = field(default_factory=frozenset)  # rules kept at a last good version
    #: Of ``stale``, rules whose file is missing in a load made while files were changing:
    #: kept until a settled load confirms the file is gone.
    vanishing: frozenset[str] = field(default_factory=frozenset)
    #: The ``rule-tests/`` files whose cases can run (read only when asked: see Loader).
    cases: tuple[CaseFile, ...] = ()

    @property
    def ok(self) -> bool:
        return not any(p.is_error for p in self.problems)

    def for_event(self, name: str) -> list[Rule]:
        return [r for r in self.rules.values() if r.enabled and r.event == name]

    def problems_of(self, rule_id: str) -> list[Problem]:
        rel = self.rules[rule_id].file if rule_id in self.rules else None
        return [p for p in self.problems if p.file == rel]


@dataclass(slots=True)
class _Entry:
    text_hash: str
    context: str
    rule: Rule | None
    problems: list[Problem]
    #: The rule was good but not sent back from a worker (problems_only, skip_rules).
    dropped: bool = False
    #: The file's ``stat`` taken before its text was read, or None when that cannot vouch for
    #: the text (it was modified too recently, see :func:`_trusted`): then it is read again.
    stat: StatKey | None = None
    #: A broken file that says ``enabled: false`` in any spelling: its last good version is
    #: kept switched off, not running (see :func:`_asks_off`).
    off: bool = False


#: A top-level ``enabled:`` whose value reads as "off" to a person, quoted or not.
_OFF = re.compile(
    r"^enabled[ \t]*:[ \t]*(['\"]?)(?:false|no|off|0)\1[ \t]*(?:#.*)?$",
    re.IGNORECASE | re.MULTILINE,
)


def _asks_off(text: str) -> bool:
    """Whether a file switches its rule off, read from its text alone: the one intent a broken
    file still carries out (an off switch written `enabled: "false"` is an error, and keeping
    the last good version running would keep the push an operator is trying to stop)."""
    return _OFF.search(text) is not None


def _stat_key(path: str) -> StatKey | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _trusted(before: StatKey | None) -> StatKey | None:
    """The ``stat`` taken before a file was read, to remember with its text; None when the
    file was modified within :data:`RACY_SECONDS` of now, since a second edit in the same
    timestamp tick could leave it unchanged. Any later edit changes it (ctime at least), a
    write during the read included."""
    if before is None or time.time_ns() - max(before[3], before[4]) < RACY_SECONDS * 1e9:
        return None
    return before


@contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a load builds many small objects."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _file_error(rel: str, message: str) -> Problem:
    return Problem(rel, None, None, "", None, "error", message)


def rule_files(root: Path) -> list[Path]:
    """Every rule file under ``rules/``, subfolders included (see :func:`yaml_files`)."""
    directory = root / RULES_DIR
    if not directory.is_dir():
        return []
    return yaml_files(directory, root)


def _rule_paths(root: Path) -> list[tuple[str, str, str]]:
    """(path, path from the root with ``/``, rule id) of each rule file, as text: a reload
    lists thousands, for which ``Path`` objects would cost more than the listing itself."""
    directory = root / RULES_DIR
    if not directory.is_dir():
        return []
    prefix = str(root).rstrip(os.sep) + os.sep
    found = []
    for path in yaml_paths(directory, root):
        rel = path[len(prefix) :] if path.startswith(prefix) else os.path.relpath(path, root)
        name = os.path.basename(path)
        dot = name.rfind(".")  # the stem as Path.stem has it
        stem = name[:dot] if 0 < dot < len(name) - 1 else name
        found.append((path, rel.replace(os.sep, "/"), stem))
    return found


def context_key(root: Path) -> str:
    """A fingerprint of what every rule depends on: the config and the templates."""
    digest = hashlib.blake2b(digest_size=16)
    paths = [root / CONFIG_NAME]
    for folder in (MESSAGES_DIR, BUTTONS_DIR):
        directory = root / folder
        if directory.is_dir():
            paths.extend(yaml_files(directory, root))
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()


class Loader:
    """Loads a project folder, remembering each file's result for the next load."""

    def __init__(
        self,
        root: Path,
        *,
        workers: int | None = None,
        problems_only: bool = False,
        skip_rules: Collection[str] = frozenset(),
        only: frozenset[str] | None = None,
        tests: bool = False,
    ) -> None:
        """``problems_only``: a check that needs no rules back (``validate``) skips sending
        them from the worker processes (it costs more than the checks); ``skip_rules``: the
        same for these files only (paths relative to ``root``). ``only``: check these rule and
        test files alone (paths from the root, like ``rules/x.yaml``), the other rule files
        being only listed (for repeated ids: a pre-commit hook's ``validate`` of the files a
        commit touches reads nothing else). ``tests``: read ``rule-tests/`` too (``validate``,
        ``test``); the daemon and the commands that fire leave them alone, so a broken test
        never shows in the daemon's health."""
        self.root = root
        self.problems_only = problems_only
        self.skip_rules = frozenset(skip_rules)
        self.only = only
        self.tests = tests
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self._entries: dict[str, _Entry] = {}
        self._last_good: dict[str, Rule] = {}

    def sibling(self, root: Path) -> Loader:
        """A new loader of ``root``, another copy of the same project (an older revision of
        it), that takes over what this one has checked: a file with the same path, text,
        configuration and templates is not checked again. It keeps no last good version, so
        its loads are exactly those of a new :class:`Loader` of ``root`` with the same
        settings, only faster."""
        other = Loader(
            root,
            workers=self.workers,
            problems_only=self.problems_only,
            skip_rules=self.skip_rules,
            only=self.only,
            tests=self.tests,
        )
        other._entries = dict(self._entries)
        return other

    def load(self, *, settled: bool = True, rehash: bool = False) -> RuleSet:
        """The project as it is now.

        ``settled``: the files have stayed still for a while (the watcher's debounce), so a
        rule file that is missing is really gone. A load made in the middle of a burst of
        changes (a deploy deleting and re-creating files) keeps a vanished rule at its last
        good version instead, and a later settled load drops it.
        ``rehash``: read every rule file again, even those whose ``stat`` is unchanged.
        """
        with _collector_paused():
            return self._load(settled, rehash)

    def _load(self, settled: bool, rehash: bool) -> RuleSet:
        root = self.root
        context = context_key(root)
        project, problems = load_project(root)
        # Read first: the rules the tests name are needed back from the workers.
        tests = read_case_files(root, self.only) if self.tests else None
        tested = {found.rule for found, _ in tests or () if found is not None}
        fragments, fragment_problems, fragment_files = load_fragments(root)
        problems = [*problems, *fragment_problems]
        paths = _rule_paths(root)
        present: dict[str, str] = {}  # rel -> rule id, of each file usable now, in order
        texts: dict[str, tuple[str, str, StatKey | None]] = {}  # rel -> (text, hash, stat)
        held: set[str] = set()  # rule ids present but unusable now: they keep their last good
        by_id: dict[str, list[str]] = {}
        for _, rel, rule_id in paths:
            by_id.setdefault(rule_id, []).append(rel)
        top = root / RULES_DIR
        for path, rel, rule_id in paths:
            if len(by_id[rule_id]) > 1:
                others = " and ".join(f for f in by_id[rule_id] if f != rel)
                problems.append(
                    _file_error(
                        rel,
                        f"rule id '{rule_id}' is also {others} (the file name, wherever it is "
                        "under rules/, is the rule's id); rename or remove one of them",
                    )
                )
                held.add(rule_id)
                continue
            if not _RULE_ID.match(rule_id):
                problems.append(
                    _file_error(
                        rel,
                        "a rule file name may hold letters, digits, '-', '_' and '.' only (the "
                        "name is the rule's id)",
                    )
                )
                continue
            if self.only is not None and rel not in self.only:
                continue
            before = _stat_key(path)
            entry = self._entries.get(rel)
            if (
                not rehash
                and entry is not None
                and entry.stat is not None
                and entry.stat == before
                and entry.context == context
                and not (entry.dropped and self._wants(rel, rule_id, tested))
            ):
                present[rel] = rule_id  # unchanged since read: its entry stands
                continue
            try:
                text = read_source(Path(path), root, top)
            except Unreadable as exc:
                problems.append(Problem(rel, exc.line, None, "", None, "error", exc.message))
                held.add(rule_id)
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
            present[rel] = rule_id
            texts[rel] = (text, digest, _trusted(before))

        if project is None:
            # Without a valid pushrules.yaml no rule can be checked against apps and platforms.
            self._entries.clear()
            cases, test_files = self._cases(tests, None, {}, problems)
            return RuleSet(
                root,
                None,
                fragments,
                dict(self._last_good),
                tuple(problems),
                1 + fragment_files + len(paths) + test_files,
                frozenset(self._last_good),
                cases=cases,
            )

        todo = [
            rel
            for rel, (_, h, _) in texts.items()
            if (entry := self._entries.get(rel)) is None
            or entry.text_hash != h
            or entry.context != context
            or (entry.dropped and self._wants(rel, present[rel], tested))
        ]
        drop = frozenset(rel for rel in todo if not self._wants(rel, present[rel], tested))
        checked = self._check(todo, present, texts, project, fragments, context, drop)
        for rel, (new_rule, new_problems) in checked.items():
            dropped = new_rule is None and rel in drop and not any(p.is_error for p in new_problems)
            text, text_hash, stat = texts[rel]
            off = new_rule is None and _asks_off(text)
            self._entries[rel] = _Entry(
                text_hash, context, new_rule, new_problems, dropped, stat, off
            )
        for rel, (_, _, stat) in texts.items():
            self._entries[rel].stat = stat  # read again, the same text: vouched for anew
        for gone in set(self._entries) - set(present):
            del self._entries[gone]

        rules: dict[str, Rule] = {}
        stale = set()
        for rel, rule_id in present.items():
            entry = self._entries[rel]
            problems.extend(entry.problems)
            if entry.rule is not None:
                rules[rule_id] = entry.rule
                self._last_good[rule_id] = entry.rule
            elif rule_id in self._last_good:
                kept = self._last_good[rule_id]
                rules[rule_id] = dataclasses.replace(kept, enabled=False) if entry.off else kept
                stale.add(rule_id)
        keep = held if settled else held | set(self._last_good)
        vanishing = set()
        for rule_id in keep - set(rules):
            if rule_id in self._last_good:
                rules[rule_id] = self._last_good[rule_id]
                stale.add(rule_id)
                if rule_id not in held:
                    vanishing.add(rule_id)
        for gone in set(self._last_good) - set(rules):
            del self._last_good[gone]
        cases, test_files = self._cases(tests, set(by_id), rules, problems)
        return RuleSet(
            root,
            project,
            fragments,
            rules,
            tuple(problems),
            1 + fragment_files + len(paths) + test_files,
            frozenset(stale),
            frozenset(vanishing),
            cases,
        )

    def _wants(self, rel: str, rule_id: str, tested: set[str]) -> bool:
        """Whether the rule of file ``rel`` is wanted back from the workers: unless the
        settings say no, and always when a test names it (the tests are checked against it)."""
        return rule_id in tested or not (self.problems_only or rel in self.skip_rules)

    @staticmethod
    def _cases(
        tests: list[ReadCaseFile] | None,
        rule_ids: set[str] | None,
        rules: Mapping[str, Rule],
        problems: list[Problem],
    ) -> tuple[tuple[CaseFile, ...], int]:
        """The rule tests when asked for, their problems added to ``problems``."""
        if tests is None:
            return (), 0
        cases, found = check_case_files(tests, rule_ids, rules)
        problems.extend(found)
        return cases, len(tests)

    def _check(
        self,
        todo: list[str],
        present: Mapping[str, str],
        texts: Mapping[str, tuple[str, str, StatKey | None]],
        project: Project,
        fragments: Fragments,
        context: str,
        drop: frozenset[str],
    ) -> dict[str, tuple[Rule | None, list[Problem]]]:
        """Check the files of ``todo``; the rules of those in ``drop`` are not kept."""
        jobs = [(present[rel], rel, texts[rel][0], f"{texts[rel][1]}-{context}") for rel in todo]
        if len(jobs) < PARALLEL_THRESHOLD or self.workers < 2:
            return dict(_check_jobs(jobs, project, fragments, drop))
        return _check_parallel(jobs, project, fragments, self.workers, drop)


Job = tuple[str, str, str, str]  # rule id, relative path, text, digest


def _check_jobs(
    jobs: list[Job], project: Project, fragments: Fragments, drop: frozenset[str]
) -> Iterator[tuple[str, tuple[Rule | None, list[Problem]]]]:
    """Each job's rule, as a rule set keeps it (None for the files of ``drop``), and problems;
    the rules share one copy of what they share (a template's values, equal values)."""
    shared: Sharing | None = None
    for rule_id, rel, text, digest in jobs:
        rule, problems = parse_rule(rule_id, rel, text, project, fragments, digest)
        if rule is not None and rel not in drop:
            if shared is None:
                shared = shared_values(fragments)
            yield rel, (compact_rule(rule, shared), problems)
        else:
            yield rel, (None, problems)


#: What a load gives its forked workers: the project, templates, files whose rules are not
#: kept, and the chunks of jobs (a worker is sent a chunk's index, not its texts).
_shared: tuple[Project, Fragments, frozenset[str], list[list[Job]]] | None = None


def _check_chunk(index: int) -> list[tuple[str, tuple[Rule | None, list[Problem]]]]:
    assert _shared is not None
    project, fragments, drop, chunks = _shared
    with _collector_paused():
        return list(_check_jobs(chunks[index], project, fragments, drop))


def _check_parallel(
    jobs: list[Job], project: Project, fragments: Fragments, workers: int, drop: frozenset[str]
) -> dict[str, tuple[Rule | None, list[Problem]]]:
    """Check on several cores; forked workers inherit the project and templates. The rules of
    the files in ``drop`` are not kept.

    When no rule is kept (``validate``), this process takes a share of the files itself
    instead of waiting. When rules are kept (the daemon), workers parse them all: the garbage
    of parsing would otherwise stay in this long-lived process's heap as fragmented memory.
    """
    import multiprocessing  # here: a load of a few files never starts a worker
    from concurrent.futures import ProcessPoolExecutor

    global _shared
    keeps = any(job[1] not in drop for job in jobs)
    helpers = workers if keeps else workers - 1
    own = [] if keeps else jobs[::workers]  # interleaved: a run of big files is shared out
    rest = jobs if keeps else [job for index, job in enumerate(jobs) if index % workers]
    count = max(helpers, -(-len(rest) // CHUNK))
    chunks = [rest[i::count] for i in range(count)]
    # Forked after this, the workers have the chunks: sending one is sending its index. Its
    # texts, pickled by the pool's threads, waited for this process's share to let go of the
    # interpreter lock: the worker started 35 ms after this process.
    _shared = (project, fragments, drop, chunks)
    try:
        context = multiprocessing.get_context("fork")
    except ValueError:  # pragma: no cover - no fork on this platform
        return dict(_check_jobs(jobs, project, fragments, drop))
    # Objects alive now are never collected in the workers: the pages holding them stay
    # shared with this process instead of being copied when a collection touches them.
    gc.freeze()
    try:
        with ProcessPoolExecutor(max_workers=helpers, mp_context=context) as pool:
            futures = [pool.submit(_check_chunk, index) for index in range(len(chunks))]
            out = dict(_check_jobs(own, project, fragments, drop))
            for future in futures:
                out.update(future.result())
    finally:
        gc.unfreeze()
        _shared = None
    return out


def load_ruleset(root: Path) -> RuleSet:
    return Loader(root).load()
