"""The commands around the daemon: ``run``, ``next``, ``pause``, ``resume``."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from engine.accengage.api import SANDBOX_PORT
from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    lazy,
    load_project_dir,
    load_settings,
    number,
    parse_time,
    project_argument,
    sandbox_store_argument,
)
from engine.rules.schedule import (
    SCHEDULED,
    TriggerError,
    next_fires,
    parse_duration,
    parse_timezone,
)

if TYPE_CHECKING:
    from engine.outbox.store import Store
    from engine.rules.loader import RuleSet
    from engine.rules.project import Project


def register(sub: Any) -> None:
    """run, next, pause, resume."""
    p = sub.add_parser(
        "run",
        help="run the daemon: schedules, events, feeds, sending",
        description="Run the long-lived process: schedules (cron, every, at), polled feeds, "
        "the event intake (POST /events/NAME), /healthz and /metrics, and the dispatcher "
        "sending the outbox. Reloads on file changes and on SIGHUP; SIGTERM finishes in-flight "
        "sends, then exits 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules run --sandbox          # try it: a fake Accengage on "
        "loopback\n  pushrules run --log-format json  # in production, for a log collector\n\n"
        "Then: curl -X POST localhost:8750/events/flight.canceled -d @event.json",
    )
    project_argument(p)
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="also start a sandbox Accengage endpoint and send to it",
    )
    p.add_argument(
        "--sandbox-port",
        type=number(int, 0, 65535),
        default=SANDBOX_PORT,
        metavar="PORT",
        help=f"the sandbox's port (default {SANDBOX_PORT})",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where the intake listens (default: listen in pushrules.yaml)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text for a terminal, json lines for a log collector",
    )
    p.set_defaults(func=lazy("engine.cli.daemon", "cmd_run"))

    p = sub.add_parser(
        "next",
        help="when scheduled rules fire next",
        description="The coming fire times of cron, every and at rules, in each rule's "
        "timezone, with its UTC offset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules next\n  pushrules next monday-digest --count 5 "
        "--from 2026-03-28T00:00:00+01:00 --format json",
    )
    p.add_argument("rule", nargs="?", help="one rule (default: every scheduled rule)")
    project_argument(p)
    p.add_argument(
        "--from",
        dest="from_",
        metavar="T",
        help="start, like '2026-03-29 01:00' in the rule's timezone (the project's for every "
        "rule), or with an offset (default: now)",
    )
    p.add_argument(
        "--count", type=number(int, 1, 1000), default=3, help="fire times per rule (default 3)"
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=lazy("engine.cli.daemon", "cmd_next"))

    for name, text, description, examples in (
        (
            "pause",
            "stop sending a rule's pushes (or all) at once",
            "An emergency stop that needs no commit: held in the store, so every running "
            "daemon honours it within a second, and a restart too. Fires that come while "
            "paused are kept in the outbox, not sent, until resumed or dropped.",
            "  pushrules pause flight-canceled\n"
            "  pushrules pause --all --for 2h      # every rule, lifted by itself after 2 hours\n"
            "  pushrules pause monday-digest --sandbox",
        ),
        (
            "resume",
            "lift a pause and release the fires it held",
            "Lift a pause made by `pushrules pause`: the fires kept in the outbox while paused, "
            "and those held past the rule's limit, are sent by the daemon at once, or when "
            "the rule's quiet hours end if they hold now (or dropped "
            "with --drop-unsent). A rule cannot be resumed alone while `pause --all` is in "
            "force: `resume --all` lifts that.",
            "  pushrules resume flight-canceled\n"
            "  pushrules resume --all\n"
            "  pushrules resume flight-canceled --drop-unsent   # lift it, send nothing it kept",
        ),
    ):
        p = sub.add_parser(
            name,
            help=text,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"Examples:\n{examples}",
        )
        p.add_argument("rule", nargs="?", help="rule id")
        p.add_argument("--all", action="store_true", help="every rule")
        project_argument(p)
        if name == "pause":
            p.add_argument(
                "--for",
                dest="for_",
                metavar="DURATION",
                help="resume by itself after this long (15m, 2h, 1d)",
            )
        else:
            p.add_argument(
                "--drop-unsent",
                action="store_true",
                help="drop what the rule has not sent yet (held past its limit, or kept while "
                "paused) instead of sending it",
            )
        sandbox_store_argument(p)
        p.set_defaults(func=lazy("engine.cli.daemon", f"cmd_{name}"))


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
        ruleset, project = load_project_dir(args.project)
        # In the zone the answer speaks: the rule's, or the project's for every rule.
        named = ruleset.rules.get(args.rule) if args.rule else None
        zone = named.timezone if named is not None else project.timezone
        start = parse_time(args.from_, "--from", zone)
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
        times = next_fires(rule.trigger, rule.timezone, start, args.count)
        result[rule.id] = [t.isoformat() for t in times]
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
        print(f"{rule_id}  ({_INVALID})")
    return EXIT_OK


#: What ``next`` says of a rule whose file has errors (the loader keeps its last good version).
_INVALID = (
    "invalid: see `pushrules validate`; this version never fires, and a running daemon keeps "
    "firing its last good version (switched off if the file says enabled: false)"
)


def invalid_rules(ruleset: RuleSet) -> list[str]:
    """Rules whose file has errors: this version is not in the rule set and never fires (a
    running daemon keeps the last good one)."""
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
        return _INVALID
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
        print(
            f"{released} held request(s) released: the daemon sends them now (or when the "
            "rule's quiet hours end, if they hold now)"
        )
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
