"""The commands that check rules without sending: ``validate`` and ``compile``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    fire_context,
    fire_input_arguments,
    folder_arguments,
    lazy,
    print_problems,
    project_argument,
    project_folder,
    rule_to_fire,
)
from engine.rules.problems import Problem, format_json

if TYPE_CHECKING:
    from engine.render.compiler import CompiledRequest, FireContext
    from engine.rules.project import Project
    from engine.rules.rule import Rule


def register(sub: Any) -> None:
    p = sub.add_parser(
        "validate",
        help="check rules, templates and pushrules.yaml; exit 1 on any error",
        description="Check every file of a pushrules project against the Accengage API and the "
        "rule format. Each problem shows file:line:column, its severity, the Accengage return "
        "code the same mistake would earn in production, and what to do. Warnings do not fail.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules validate\n  pushrules validate path/to/project "
        "--format json\n  pushrules validate --project path/to/project",
    )
    folder_arguments(p)
    p.add_argument(
        "--format",
        choices=("text", "json", "github"),
        default="text",
        help="text for people, json for tools, github for workflow annotations",
    )
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
    from engine.rules.loader import Loader

    root = project_folder(args)
    ruleset = Loader(root, problems_only=True).load()
    problems = list(ruleset.problems)
    if args.format == "github":
        # Annotations attach to the repository's paths: name the files from here, not DIR.
        problems = [replace(p, file=os.path.relpath(root / p.file)) for p in problems]
    print_problems(problems, args.format, ruleset.files)
    return EXIT_OK if ruleset.ok else EXIT_PROBLEMS


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

    def shown(self) -> list[dict[str, Any]]:
        """The requests as ``compile`` prints them: url and body, the password masked."""
        from engine.render.compiler import for_display

        return [{"url": r.url, "body": for_display(r.body, self.login)} for r in self.requests]


def compile_for_command(args: argparse.Namespace, fmt: str = "text") -> OneFire | int:
    """The rule ``args.rule`` of ``args.project`` compiled for ``--event``/``--item``/``--at``;
    or, after printing why (the rule's problems, a failed template), the exit code."""
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
        notes = fire_notes(rule, context, len(requests))
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
    return OneFire(rule, project, context, True, requests, notes, login)


def shown_login(project: Project) -> str:
    """The login as the compiled requests show it; an unset variable does not stop them."""
    from engine.rules.secrets import MissingSecret

    if project.login is None:
        return ""
    try:
        return project.login.resolve()
    except MissingSecret:
        return f"<{project.login.describe()} is not set>"


def fire_notes(rule: Rule, context: FireContext, requests: int) -> list[str]:
    """What would become of a compiled fire that the JSON alone does not say: targets that
    expanded to nobody, quiet hours that defer or skip it."""
    from engine.outbox.firing import quiet_until

    if not requests:
        return [EMPTY_FOR_EACH]
    notes = []
    quiet = rule.quiet_hours
    until = quiet_until(quiet, context.now) if quiet is not None else None
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
