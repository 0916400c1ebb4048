"""``pushrules plan``: what a change to the rules does, for its review (engine/review/plan.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    UsageError,
    folder_arguments,
    lazy,
    parse_time,
    project_folder,
)

EPILOG = """\
Examples:
  pushrules plan                       this branch's changes, against where it left main
  pushrules plan --base HEAD           what is not committed yet
  pushrules plan --base v1.4 notifications
                                       the project in notifications/, against tag v1.4
  pushrules plan --format markdown     a comment for the pull request (CI)
  pushrules plan --format json         for tools

The old version is read through git: nothing is checked out, uncommitted work is safe.
Default base: the merge base of HEAD with origin/HEAD, origin/main, origin/master, main or
master (the first that exists), else HEAD. In CI, fetch the history (fetch-depth: 0).

Exit codes: 0 planned, 1 the working tree has errors, 2 usage (not a git repository,
unknown revision).
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="what a change does: rules added, removed, changed, and what they would send",
        description="Compare the project at a git revision with the working tree: rules "
        "added, removed, renamed, enabled or disabled; for each changed rule the parts that "
        "changed (trigger, when, apps, message, buttons, targets, limits...), its next fire "
        "times when its schedule changed, and what each of its test cases would send before "
        "and after; problems new and fixed. A template change shows on every rule using it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    folder_arguments(p)
    p.add_argument(
        "--base",
        metavar="REV",
        help="the revision to compare with: a branch, tag or commit (default: see below)",
    )
    p.add_argument(
        "--format",
        choices=("text", "markdown", "json"),
        default="text",
        help="text for people, markdown for a pull request comment, json for tools",
    )
    p.add_argument(
        "--from",
        dest="from_",
        metavar="T",
        help="list fire times after this time, like '2026-03-29 01:00' (UTC) or with an "
        "offset (default: now)",
    )
    p.set_defaults(func=lazy("engine.cli.plan", "cmd_plan"))


def cmd_plan(args: argparse.Namespace) -> int:
    import logging

    from engine.review import revisions
    from engine.review.plan import format_json, format_markdown, format_text, plan_project

    # What the compiler logs of a test case's fire (for_each items skipped) is in its outcome.
    logging.getLogger("pushrules.compile").setLevel(logging.CRITICAL)

    root = project_folder(args)
    start = parse_time(args.from_, "--from")
    try:
        repo = revisions.repository_of(root)
        if args.base is None:
            base = revisions.default_base(repo)
        else:
            base = revisions.Base(revisions.resolve(repo, args.base), args.base)
        if base.label == "HEAD" and args.base is None:
            print(
                "pushrules: no origin/HEAD, main or master here: comparing with HEAD (what is "
                "not committed); name a base with --base REV",
                file=sys.stderr,
            )
        plan = plan_project(
            root,
            base=base.commit,
            base_label=base.label,
            export=lambda folder: revisions.export(repo, base.commit, folder, same_as=root),
            start=start,
        )
    except revisions.RevisionError as exc:
        raise UsageError(str(exc)) from None
    formats = {"text": format_text, "markdown": format_markdown, "json": format_json}
    print(formats[args.format](plan))
    return EXIT_OK if plan.ok else EXIT_PROBLEMS
