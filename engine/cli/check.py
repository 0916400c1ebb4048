"""The commands that check rules without sending: ``validate`` and ``compile``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    fire_context,
    fire_input_arguments,
    lazy,
    print_problems,
    project_argument,
    rule_to_fire,
)
from engine.rules.problems import Problem, format_json

if TYPE_CHECKING:
    from datetime import datetime

    from engine.render.compiler import CompiledRequest, FireContext
    from engine.rules.project import Project
    from engine.rules.rule import Rule


def register(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="check rules, templates and pushrules.yaml; exit 1 on any error",
        description="Check every file of a pushrules project against the Accengage API and the "
        "rule format. Each problem shows file:line:column, its severity, the Accengage return "
        "code the same mistake would earn in production, and what to do. Warnings do not fail "
        "(unless --strict). Given files instead of a folder (what a pre-commit hook passes), "
        "each is checked in its project (the nearest folder above holding pushrules.yaml) and "
        "only their problems are shown, with those of pushrules.yaml that stop every rule.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules validate\n  pushrules validate path/to/project "
        "--format json\n  pushrules validate --project path/to/project\n"
        "  pushrules validate rules/flight-canceled.yaml rules/price-drop.yaml\n"
        "  pushrules validate --strict          warnings fail too (exit 1)",
    )
    p.add_argument(
        "paths",
        nargs="*",
        type=Path,
        metavar="PATH",
        help="the project folder (default: .), or files of a project",
    )
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        help="project folder, as every other command takes it (same as a folder PATH)",
    )
    p.add_argument(
        "--format",
        choices=("text", "json", "github"),
        default="text",
        help="text for people, json for tools, github for workflow annotations",
    )
    p.add_argument("--strict", action="store_true", help="warnings are errors: any of them exits 1")
    p.set_defaults(func=lazy("engine.cli.check", "cmd_validate"))

    p = sub.add_parser(
        "compile",
        help="print the exact requests one firing of a rule would send",
        description="Render a rule for one firing and print a JSON array with one element per "
        'HTTP request: {"url", "body"}. The password is shown as ********; an unset '
        "credential variable does not stop it. Nothing is sent.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules compile flight-canceled --event event.json\n"
        '  echo \'{"member_id": "42"}\' | pushrules compile flight-canceled --event -\n'
        "  pushrules compile daily-digest --at 2026-12-24T09:00:00+01:00",
    )
    p.add_argument("rule", help="rule id: the rule file's name without .yaml")
    project_argument(p)
    fire_input_arguments(p)
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="how problems are printed when the rule is invalid",
    )
    p.set_defaults(func=lazy("engine.cli.check", "cmd_compile"))


def cmd_validate(args: argparse.Namespace) -> int:
    paths: list[Path] = args.paths
    folders = [p for p in paths if p.is_dir()]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"pushrules: {missing[0]} is not a file or folder", file=sys.stderr)
        return EXIT_USAGE
    if folders and (len(paths) > 1 or (args.project and folders[0] != args.project)):
        named = " and ".join(str(p) for p in [*paths, *([args.project] if args.project else [])])
        print(
            f"pushrules: name the project once (a folder, or --project), or files: {named}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if paths and not folders:
        try:
            problems, files = _validate_files(paths, args.project)
        except UsageError as exc:
            print(f"pushrules: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        root: Path = args.project or (folders[0] if folders else Path("."))
        if not root.is_dir():
            print(f"pushrules: {root} is not a folder", file=sys.stderr)
            return EXIT_USAGE
        problems, files = _validate_project(root, args.format == "github")
    if args.strict:
        problems = [replace(p, severity="error") for p in problems]
    print_problems(problems, args.format, files)
    return EXIT_PROBLEMS if any(p.is_error for p in problems) else EXIT_OK


def _validate_project(root: Path, from_here: bool) -> tuple[list[Problem], int]:
    """Every problem of the project; ``from_here``: files named from the working folder."""
    from engine.rules.loader import Loader

    ruleset = Loader(root, problems_only=True, tests=True).load()
    problems = list(ruleset.problems)
    if from_here:
        # Annotations attach to the repository's paths: name the files from here, not DIR.
        problems = [replace(p, file=os.path.relpath(root / p.file)) for p in problems]
    return problems, ruleset.files


def _validate_files(paths: list[Path], project: Path | None) -> tuple[list[Problem], int]:
    """The problems of these files, each checked in its project, named from the working folder;
    with the errors of pushrules.yaml, which stop every rule. UsageError: a file in no project."""
    from engine.rules.loader import Loader
    from engine.rules.project import CONFIG_NAME, find_root

    by_root: dict[Path, set[str]] = {}
    for path in paths:
        root = project.absolute() if project is not None else find_root(path)
        if root is None:
            raise UsageError(
                f"{path}: no {CONFIG_NAME} in its folder or any above it; name the project "
                "with --project DIR"
            )
        try:
            rel = path.absolute().relative_to(root)
        except ValueError:
            raise UsageError(f"{path} is not in the project {project}") from None
        by_root.setdefault(root, set()).add(rel.as_posix())
    problems: list[Problem] = []
    for root, rels in by_root.items():
        ruleset = Loader(root, problems_only=True, only=frozenset(rels), tests=True).load()
        problems += [
            replace(p, file=os.path.relpath(root / p.file))
            for p in ruleset.problems
            if p.file in rels or (p.file == CONFIG_NAME and p.is_error)
        ]
    return problems, len(paths)


def cmd_compile(args: argparse.Namespace) -> int:
    fire = compile_for_command(args, args.format)
    if isinstance(fire, int):
        return fire
    for note in fire.notes:
        print(f"pushrules: {note}", file=sys.stderr)
    print(json.dumps(fire.shown(), indent=2, ensure_ascii=False))
    return EXIT_OK


@dataclass(frozen=True)
class OneFire:
    """One firing of a rule, compiled as ``compile`` prints it and ``preview`` draws it."""

    rule: Rule
    project: Project
    context: FireContext
    #: False when ``when`` is false: nothing would be sent (``requests`` is empty).
    fires: bool
    requests: list[CompiledRequest]
    #: What the requests alone do not say: `when` false, targets to nobody, quiet hours.
    notes: list[str]
    #: The login as shown: its value, or which reference is not set.
    login: str
    #: The end of the rule's quiet hours when the fire falls inside them, else None.
    quiet_until: datetime | None = None

    @property
    def skipped(self) -> bool:
        """Inside quiet hours that drop the push (``then: skip``): nothing would be sent."""
        quiet = self.rule.quiet_hours
        return self.quiet_until is not None and quiet is not None and quiet.then == "skip"

    def shown(self) -> list[dict[str, Any]]:
        """The requests as ``compile`` prints them: url and body, the password masked."""
        from engine.render.compiler import for_display

        return [{"url": r.url, "body": for_display(r.body, self.login)} for r in self.requests]


def compile_for_command(args: argparse.Namespace, fmt: str = "text") -> OneFire | int:
    """The rule ``args.rule`` of ``args.project`` compiled for ``--event``/``--item``/``--at``;
    or, after printing why (the rule's problems, a failed template), the exit code."""
    from engine.outbox.firing import rule_quiet_until
    from engine.render.compiler import CompileError, compile_fire, missing_input, passes_when
    from engine.rules.loader import Loader

    ruleset = Loader(args.project).load()
    rule = rule_to_fire(ruleset, args.rule, fmt)
    if rule is None:
        return EXIT_PROBLEMS
    try:
        context = fire_context(args, rule)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    project = ruleset.project
    assert project is not None
    login = shown_login(project)
    try:
        if not passes_when(rule, context):
            note = (
                f"`when` is false for this {'item' if context.item else 'event'}: "
                "the rule would not fire, nothing would be sent"
            )
            return OneFire(rule, project, context, False, [], [note], login)
        requests = compile_fire(rule, project, context)
        until = rule_quiet_until(rule, context.now)
        notes = fire_notes(rule, context, len(requests), until)
    except CompileError as exc:
        hint = missing_input(exc, event=args.event is not None, item=args.item is not None)
        if hint:
            exc = CompileError(exc.rule, exc.field, hint, exc.code, exc.reference)
        if fmt == "json":
            problem = Problem(rule.file, None, None, exc.field, exc.code, "error", exc.message)
            print(format_json([problem]))
        else:
            print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    return OneFire(rule, project, context, True, requests, notes, login, until)


def shown_login(project: Project) -> str:
    """The login as the compiled requests show it; an unset variable does not stop them."""
    from engine.rules.secrets import MissingSecret

    if project.login is None:
        return ""
    try:
        return project.login.resolve()
    except MissingSecret:
        return f"<{project.login.describe()} is not set>"


def fire_notes(
    rule: Rule, context: FireContext, requests: int, until: datetime | None
) -> list[str]:
    """What would become of a compiled fire that the JSON alone does not say: targets that
    expanded to nobody, quiet hours (ending at ``until``) that defer or skip it."""
    if not requests:
        return [EMPTY_FOR_EACH]
    notes = []
    quiet = rule.quiet_hours
    if quiet is not None and until is not None:
        at = context.now.isoformat(timespec="minutes")
        window = f"quiet hours ({quiet.start} to {quiet.end})"
        if quiet.then == "skip":
            notes.append(f"{at} is inside the rule's {window}: the push would be skipped")
        else:
            notes.append(
                f"{at} is inside the rule's {window}: the push would be deferred to "
                f"{until.isoformat(timespec='minutes')}"
            )
    return notes


#: A fire whose targets expanded to nobody (a ``for_each`` over an empty list, say).
EMPTY_FOR_EACH = (
    "the targets expanded to nobody (a for_each over an empty list?): nothing would be sent"
)
