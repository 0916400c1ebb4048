"""What every group of commands shares: exit codes, common options, reading the command line's
inputs, loading the project, printing problems.

Light on purpose: each group registers its parsers at every start, so nothing here (or at the
top of a group's module) may load the store, the daemon or the HTTP client.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import PushrulesError
from engine.rules.problems import Problem, format_github, format_json, format_text, summary

if TYPE_CHECKING:
    from engine.render.compiler import FireContext
    from engine.rules.loader import RuleSet
    from engine.rules.project import Project
    from engine.rules.rule import Rule

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


class CommandParser(argparse.ArgumentParser):
    """argparse, exiting 2 on usage errors (its default) with a pointer to --help."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


class UsageError(PushrulesError):
    """Bad input on the command line: exit 2 with the message."""


def lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command run by a function loaded only when that command runs (fast --help, validate)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return run


def number(
    kind: Callable[[str], float], low: float, high: float | None = None
) -> Callable[[str], Any]:
    """An option's type: a number of ``kind`` from ``low`` to ``high``, refused by argparse
    with the range otherwise (``next --count 0`` printed "never again" for a daily rule)."""
    word = "a whole number" if kind is int else "a number"
    span = f"from {low:g} to {high:g}" if high is not None else f"of {low:g} or more"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}") from None
        if not low <= value or (high is not None and not value <= high):  # NaN too
            raise argparse.ArgumentTypeError(f"{text} is out of range: write {word} {span}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def project_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        default=Path("."),
        help="project folder holding pushrules.yaml (default: .)",
    )


def folder_arguments(p: argparse.ArgumentParser) -> None:
    """A project folder named as ``DIR`` or ``--project DIR`` (a command a CI job runs on a
    folder, like plan); read it with :func:`project_folder`."""
    p.add_argument("dir", nargs="?", type=Path, help="project folder (default: .)")
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        help="project folder, as every other command takes it (same as DIR)",
    )


def project_folder(args: argparse.Namespace, *, exists: bool = True) -> Path:
    """The folder of :func:`folder_arguments`; UsageError when named twice or not a folder
    (``exists=False``: or not there yet, for a command that makes it)."""
    if args.dir is not None and args.project is not None and args.dir != args.project:
        raise UsageError(f"name the project once: {args.dir} or --project {args.project}")
    root: Path = args.project or args.dir or Path(".")
    if not root.is_dir() and (exists or root.exists()):
        raise UsageError(f"{root} is not a folder")
    return root


def sandbox_store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="act on the outbox of --sandbox trials (pushrules-sandbox.db), not the real one",
    )


def fire_input_arguments(p: argparse.ArgumentParser) -> None:
    """What one firing of a rule sees: its event or feed item, and its time (compile, send)."""
    p.add_argument("--event", metavar="FILE", help="event payload, a JSON object (- for stdin)")
    p.add_argument(
        "--item", metavar="FILE", help="feed item for a poll rule, a JSON object (- for stdin)"
    )
    p.add_argument(
        "--at",
        metavar="T",
        help="fire time for `now`, like '2026-12-24 18:00' in the rule's timezone, or with an "
        "offset (default: the current time)",
    )


def read_event(source: str | None, what: str = "event") -> dict[str, Any] | None:
    """An event payload or feed item from a file or stdin; it must be a JSON object."""
    if source is None:
        return None
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the event file {source}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"the event in {source} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f"the event in {source} must be a JSON object ({{...}})")
    return value


def parse_time(text: str | None, option: str = "--at", timezone: str = "UTC") -> datetime:
    """A time from the command line, read as ``at:`` is: a local time in ``timezone`` unless
    the text names an offset (``2026-12-24 09:00``, ``2026-12-24T09:00+01:00``); now if None.
    Commands pass the zone their output speaks (a rule's, the project's; history's UTC)."""
    from engine.rules.schedule import TriggerError, parse_at, parse_timezone

    if text is None:
        return datetime.now(UTC)
    zone = parse_timezone(timezone)
    try:  # any ISO 8601 form (what history --format json prints, a date alone, ...)
        return parse_at(datetime.fromisoformat(text.strip()), zone)
    except ValueError:
        pass
    try:
        return parse_at(text, zone)
    except TriggerError as exc:
        raise UsageError(f"{option}{str(exc).removeprefix('at')}") from None


def load_project_dir(project_dir: Path) -> tuple[RuleSet, Project]:
    """The rule set and project of a command that fires rules; UsageError when pushrules.yaml
    has errors."""
    from engine.rules.loader import Loader

    ruleset = Loader(project_dir).load()
    if ruleset.project is None:
        raise UsageError("the project is invalid:\n" + format_text(ruleset.problems))
    return ruleset, ruleset.project


def load_settings(project_dir: Path, *, sandbox: bool = False) -> Project:
    """pushrules.yaml alone, for commands on the outbox (history, outbox, pause, resume): no
    need to check a thousand rules to read a store URL. With ``sandbox``, the settings as
    ``--sandbox`` trials see them (their own store)."""
    from engine.rules.project import load_project

    project, problems = load_project(project_dir)
    if project is None:
        raise UsageError("pushrules.yaml is invalid:\n" + format_text(problems))
    if sandbox:
        from engine.send.runtime import sandboxed

        return sandboxed(project)
    return project


def fire_context(args: argparse.Namespace, rule: Rule) -> FireContext:
    """The context of ``--event``/``--item``/``--at``; UsageError on bad input."""
    from engine.render.compiler import FireContext
    from engine.rules.schedule import TriggerError, parse_at, parse_timezone

    event = read_event(args.event)
    item = read_event(args.item, "item")
    tz = parse_timezone(rule.timezone)
    try:
        # As explain and rule tests read it: a time without an offset is the rule's local time.
        at = parse_at(args.at, tz) if args.at is not None else datetime.now(tz)
    except TriggerError as exc:
        raise UsageError(f"--{exc}") from None
    return FireContext(now=at, event=event, item=item)


def rule_file_of(rel: str, rule_id: str) -> bool:
    """Whether ``rel`` is a file of rule ``rule_id`` (in rules/ or any subfolder of it)."""
    path = Path(rel)
    return path.parts[:1] == ("rules",) and path.stem == rule_id


def rule_to_fire(ruleset: RuleSet, rule_id: str, fmt: str = "text") -> Rule | None:
    """The rule, or None after printing why it cannot fire: unknown, or it (or the project
    configuration it needs) has errors."""
    own = [
        p
        for p in ruleset.problems
        if p.is_error and (rule_file_of(p.file, rule_id) or not p.file.startswith("rules/"))
    ]
    rule = ruleset.rules.get(rule_id)
    if (
        ruleset.project is not None
        and rule is None
        and not any(rule_file_of(p.file, rule_id) for p in ruleset.problems)
    ):
        known = ", ".join(sorted(ruleset.rules)) or "none"
        print(f"pushrules: no rule '{rule_id}' in rules/ (known: {known})", file=sys.stderr)
        return None
    if ruleset.project is None or rule is None or own:
        print_problems(own, fmt, ruleset.files)
        return None
    return rule


# --- problems -----------------------------------------------------------------------------


def print_problems(problems: Sequence[Problem], fmt: str, files: int) -> None:
    if fmt == "json":
        print(format_json(problems))
    elif fmt == "github":
        if problems:
            print(format_github(problems))
        print(summary(problems, files), file=sys.stderr)
    else:
        if problems:
            print(format_text(problems))
        print(summary(problems, files), file=sys.stderr)
