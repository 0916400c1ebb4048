"""The commands that show what rules do before they run: ``test`` and ``explain``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    fire_input_arguments,
    lazy,
    project_argument,
    rule_to_fire,
    sandbox_store_argument,
)


def register(sub: Any) -> None:
    """test, explain; each loads the compiler when it runs."""
    p = sub.add_parser(
        "test",
        help="run the rule tests of rule-tests/: what each rule sends for given events",
        description="Fire each case of rule-tests/*.yaml as the daemon would (when, quiet "
        "hours, for_each, templates, Accengage's checks) with no store, and compare what it "
        "comes to with what the case expects. A failing case shows its file and line, and "
        "what it expected against what the fire did as a diff of the JSON. Nothing is sent. "
        "Exit 0 every case passes, 1 a case fails or the project has errors, 2 usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules test\n  pushrules test --rule flight-canceled\n"
        "  pushrules test path/to/project --format junit > pushrules-tests.xml\n\n"
        "A case without at: fires on Monday 2026-01-05 at 12:00 in the rule's timezone.\n"
        "Writing tests: docs/rules.md, section 8.",
    )
    p.add_argument("dir", nargs="?", type=Path, help="project folder (default: .)")
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        help="project folder, as every other command takes it (same as DIR)",
    )
    p.add_argument("--rule", metavar="R", help="only the tests of this rule")
    p.add_argument(
        "--format",
        choices=("text", "json", "junit"),
        default="text",
        help="text for people, json for tools, junit for CI dashboards",
    )
    p.set_defaults(func=lazy("engine.cli.review", "cmd_test"))

    p = sub.add_parser(
        "explain",
        help="say step by step why a rule would or would not send at a given moment",
        description="Walk through one fire of a rule at a moment: its trigger and next fire "
        "times, its when condition with the values it read, quiet hours, its limit and any "
        "pause as recorded in the store (read only, never created), the targets it expands to "
        "and the requests with their sizes against the platforms' limits. Nothing is sent.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules explain price-drop --item item.json\n"
        '  echo \'{"member_id": "42"}\' | pushrules explain flight-canceled --event -\n'
        '  pushrules explain monday-digest --at "2026-03-30 23:30"\n'
        "  pushrules explain flight-canceled --event event.json --format json\n\n"
        "--at is read in the rule's timezone unless it has an offset (2026-03-30T23:30+02:00);\n"
        "without --at, the moment is now.",
    )
    p.add_argument("rule", help="rule id: the rule file's name without .yaml")
    project_argument(p)
    fire_input_arguments(p)
    p.add_argument("--format", choices=("text", "json"), default="text")
    sandbox_store_argument(p)
    p.set_defaults(func=lazy("engine.cli.review", "cmd_explain"))


def _quiet_compiler() -> None:
    """These commands report what the compiler logs (for_each items skipped) themselves."""
    import logging

    logging.getLogger("pushrules.compile").setLevel(logging.CRITICAL)


def cmd_test(args: argparse.Namespace) -> int:
    from engine.review import report
    from engine.review.runner import load_project_cases, project_problems, run_cases

    _quiet_compiler()
    if args.dir is not None and args.project is not None and args.dir != args.project:
        print(
            f"pushrules: name the project once: {args.dir} or --project {args.project}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    root: Path = args.project or args.dir or Path(".")
    if not root.is_dir():
        print(f"pushrules: {root} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    ruleset = load_project_cases(root)
    if args.rule is not None and not any(f.rule == args.rule for f in ruleset.cases):
        from engine.rules.problems import did_you_mean

        tested = sorted({f.rule for f in ruleset.cases})
        print(
            f"pushrules: no tests of rule '{args.rule}' in rule-tests/"
            f"{did_you_mean(args.rule, tested)} (rules with tests: {', '.join(tested) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    run = run_cases(ruleset, args.rule)
    problems = project_problems(ruleset, args.rule)
    if args.format == "json":
        print(report.format_run_json(run, problems))
    elif args.format == "junit":
        print(report.format_run_junit(run, problems))
    else:
        text = report.format_run_text(run, problems)
        if text:
            print(text)
        print(report.summary(run, problems), file=sys.stderr)
    return EXIT_OK if report.ok(run, problems) else EXIT_PROBLEMS


def cmd_explain(args: argparse.Namespace) -> int:
    from engine.cli.common import fire_context, load_project_dir
    from engine.review.explain import explain, format_explanation

    _quiet_compiler()
    try:
        ruleset, project = load_project_dir(args.project)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rule = rule_to_fire(ruleset, args.rule, "json" if args.format == "json" else "text")
    if rule is None:
        return EXIT_PROBLEMS
    try:  # --at read as compile reads it: in the rule's timezone unless it has an offset
        context = fire_context(args, rule)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.sandbox:
        from engine.send.runtime import sandboxed

        project = sandboxed(project)
    explanation = explain(project, rule, at=context.now, event=context.event, item=context.item)
    if args.format == "json":
        print(json.dumps(explanation.data(), indent=2, ensure_ascii=False))
    else:
        print(format_explanation(explanation))
    return EXIT_OK
