"""The commands around the daemon: ``run``, ``next``, ``pause``, ``resume``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from engine.cli.main import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    load_project_dir,
    load_settings,
    parse_time,
)
from engine.rules.schedule import (
    TriggerError,
    fire_times,
    parse_duration,
    parse_timezone,
    schedule_for,
)

if TYPE_CHECKING:
    from engine.outbox.store import Store
    from engine.rules.loader import RuleSet
    from engine.rules.project import Project

SCHEDULED = ("cron", "every", "at")


def cmd_run(args: argparse.Namespace) -> int:
    from engine.daemon import logs
    from engine.daemon.clock import Clock
    from engine.daemon.process import Options, run

    logs.configure(args.log_format)
    try:
        clock = Clock.from_environment()
    except ValueError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = Options(
        root=args.project,
        sandbox=args.sandbox,
        sandbox_port=args.sandbox_port,
        listen=args.listen,
        clock=clock,
    )
    return run(options)


def cmd_next(args: argparse.Namespace) -> int:
    """The coming fire times of scheduled rules, in each rule's timezone."""
    try:
        ruleset, _ = load_project_dir(args.project)
        start = parse_time(args.from_)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rules = [r for r in ruleset.rules.values() if r.trigger_kind in SCHEDULED]
    invalid = invalid_rules(ruleset)
    if args.rule:
        rules = [r for r in rules if r.id == args.rule]
        if not rules:
            print(
                f"pushrules: rule '{args.rule}': {_not_scheduled(ruleset, args.rule)}",
                file=sys.stderr,
            )
            return EXIT_PROBLEMS
        invalid = []
    result: dict[str, list[str]] = {}
    for rule in sorted(rules, key=lambda r: r.id):
        tz = parse_timezone(rule.timezone)
        schedule = schedule_for(rule.trigger, tz)
        times = fire_times(schedule, start.astimezone(tz), args.count)
        result[rule.id] = [t.astimezone(tz).isoformat() for t in times]
    if args.format == "json":
        print(json.dumps(result, indent=2))
        if invalid:
            print(
                f"invalid, not listed: {', '.join(invalid)} (see `pushrules validate`)",
                file=sys.stderr,
            )
        return EXIT_OK
    for rule_id, moments in result.items():
        state = "" if ruleset.rules[rule_id].enabled else "  (disabled)"
        print(f"{rule_id}{state}")
        for moment in moments or ["never again"]:
            print(f"  {moment}")
    for rule_id in invalid:
        print(f"{rule_id}  (invalid: see `pushrules validate`; it does not fire until fixed)")
    return EXIT_OK


def invalid_rules(ruleset: RuleSet) -> list[str]:
    """Rules whose file has errors: they are not in the rule set, and do not fire."""
    from pathlib import PurePosixPath

    return sorted(
        {
            PurePosixPath(p.file).stem
            for p in ruleset.problems
            if p.is_error and p.file.startswith("rules/")
        }
        - set(ruleset.rules)
    )


def _not_scheduled(ruleset: RuleSet, rule_id: str) -> str:
    """Why ``next`` has no fire times for a rule: its trigger, its errors, or no such rule."""
    from engine.rules.problems import did_you_mean

    if rule_id in ruleset.rules:
        return f"it fires on {ruleset.rules[rule_id].trigger_kind}, not on a schedule"
    if rule_id in invalid_rules(ruleset):
        return "invalid: see `pushrules validate`; it does not fire until fixed"
    known = sorted(ruleset.rules) + invalid_rules(ruleset)
    return f"no such rule in rules/{did_you_mean(rule_id, known)}"


def _pause_target(args: argparse.Namespace, *, must_exist: bool) -> tuple[Project, str]:
    """The settings and the rule (or "*") that pause and resume act on; UsageError when the
    command names neither, or a rule the project does not have (a typo would pause nothing)."""
    from engine.rules.loader import rule_files
    from engine.rules.problems import did_you_mean

    if bool(args.rule) == bool(args.all):
        raise UsageError("name one RULE, or --all")
    project = load_settings(args.project, sandbox=args.sandbox)
    if args.all:
        return project, "*"
    known = [path.stem for path in rule_files(args.project)]
    if must_exist and args.rule not in known:
        raise UsageError(f"no rule '{args.rule}' in rules/{did_you_mean(args.rule, known)}")
    return project, args.rule


def cmd_pause(args: argparse.Namespace) -> int:
    from engine.send.runtime import open_store

    try:
        project, target = _pause_target(args, must_exist=True)
        until = datetime.now(UTC) + parse_duration(args.for_) if args.for_ else None
    except (UsageError, TriggerError) as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with open_store(project) as store:
        store.pause(target, until)
    what = "every rule" if args.all else f"rule {args.rule}"
    when = f"until {local_time(until, project)}" if until else "until `pushrules resume`"
    print(f"{what} paused {when}: its fires are kept in the outbox, not sent")
    return EXIT_OK


def cmd_resume(args: argparse.Namespace) -> int:
    from engine.send.runtime import open_store

    try:
        project, _ = _pause_target(args, must_exist=False)  # its file may be gone
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rule = None if args.all else args.rule
    with open_store(project) as store:
        if not args.all and args.rule not in store.paused() and "*" in store.paused():
            # Lifting nothing would leave the rule paused by --all while saying all is well.
            print(f"pushrules: {all_paused(store, project)}", file=sys.stderr)
            return EXIT_PROBLEMS
        if args.all:
            lifted = [name for name in store.paused() if store.resume(name)]
        else:
            lifted = [args.rule] if store.resume(args.rule) else []
        if args.drop_unsent:
            # Everything of the rule not sent yet: held past a limit, or kept during the pause.
            dropped = store.drop_unsent(rule=rule)
            released = 0
        else:
            released = store.release(rule=rule)
            dropped = 0
        still = None if args.all or "*" not in store.paused() else all_paused(store, project)
    if lifted:
        print(f"resumed: {', '.join(lifted)}")
    if released:
        print(f"{released} held request(s) released: the daemon sends them now")
    if dropped:
        print(f"{dropped} unsent request(s) dropped")
    if still:
        print(f"pushrules: {args.rule} stays paused: {still}", file=sys.stderr)
        return EXIT_PROBLEMS
    if not (lifted or released or dropped):
        print("nothing was paused or held", file=sys.stderr)
    return EXIT_OK


def local_time(moment: datetime, project: Project) -> str:
    """A time as an operator of the project reads it: in its timezone, with the offset."""
    return moment.astimezone(parse_timezone(project.timezone)).isoformat(timespec="seconds")


def all_paused(store: Store, project: Project) -> str:
    """What is in force when every rule is paused, and how to lift it."""
    since = store.paused_since("*")
    until = store.paused().get("*")
    started = f" since {local_time(since, project)}" if since else ""
    ends = f" until {local_time(until, project)}" if until else ""
    return (
        f"all rules are paused{started}{ends}; `pushrules resume --all` lifts it "
        "(a single rule cannot be resumed while all are paused)"
    )
