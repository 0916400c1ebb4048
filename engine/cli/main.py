"""The ``pushrules`` command line: validate and compile rules, send, inspect, run the daemon.

Exit codes, for CI and scripts: 0 success, 1 problems found or the operation failed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import __version__
from engine.errors import PushrulesError
from engine.rules.problems import Problem, format_github, format_json, format_text, summary

if TYPE_CHECKING:  # the modules behind commands load when a command runs (fast --help)
    from engine.render.compiler import FireContext
    from engine.rules.loader import RuleSet
    from engine.rules.project import Project
    from engine.rules.rule import Rule

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
#: engine.accengage.sandbox.DEFAULT_PORT, kept here so --help does not load the server.
SANDBOX_PORT = 8751

EPILOG = """\
Typical use:
  pushrules validate                  check every rule, template and pushrules.yaml here
  pushrules validate --format github  annotate a pull request from CI
  pushrules compile flight-canceled --event event.json
                                      show the exact JSON a rule would send
  pushrules send flight-canceled --event event.json --sandbox
                                      try it for real against a fake Accengage
  pushrules run --sandbox             the whole daemon, on a fake Accengage
  pushrules history --status in_doubt,failed,dead
                                      what needs a person

Exit codes: 0 ok, 1 problems found or the operation failed, 2 usage error
(send, fire: 75 when requests still retry and were left to the daemon).
Docs: docs/rules.md (writing rules), docs/operations.md (running the daemon).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, exiting 2 on usage errors (its default) with a pointer to --help."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pushrules",
        description="Declarative push notification rules for Accengage: YAML rules in git, "
        "validated against the API, compiled and sent by a daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pushrules {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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
    p.add_argument("dir", nargs="?", type=Path, help="project folder (default: .)")
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        help="project folder, as every other command takes it (same as DIR)",
    )
    p.add_argument(
        "--format",
        choices=("text", "json", "github"),
        default="text",
        help="text for people, json for tools, github for workflow annotations",
    )
    p.set_defaults(func=cmd_validate)

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
    _project_argument(p)
    fire_input_arguments(p)
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="how problems are printed when the rule is invalid",
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "sandbox",
        help="serve a fake Accengage endpoint on loopback for trials and tests",
        description="Serve POST /sendInstantMessage.php on loopback. Each request is checked as "
        "Accengage would check it and answered with the documented return codes; every request "
        "is recorded (GET /requests) and faults can be injected here or via POST /_faults.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules sandbox\n  pushrules sandbox --fail-rate 0.2 --latency 50"
        "\n  pushrules sandbox --code 11          # every valid request: message limit exceeded",
    )
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (loopback only)")
    p.add_argument(
        "--port", type=int, default=SANDBOX_PORT, help=f"default {SANDBOX_PORT}; 0 picks a free one"
    )
    p.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="share of requests answered HTTP 503, from 0 to 1",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="MS",
        help="delay before each answer, in milliseconds",
    )
    p.add_argument(
        "--code", type=int, metavar="N", help="answer this return code to every valid request"
    )
    p.add_argument(
        "--record", type=Path, metavar="FILE", help="append each request to FILE as JSON lines"
    )
    p.add_argument("--seed", type=int, help="makes --fail-rate repeatable")
    p.set_defaults(func=cmd_sandbox)

    _sending_commands(sub)
    _daemon_commands(sub)
    return parser


def _lazy(module: str, name: str) -> Any:
    """A command run by a module loaded only when that command runs (fast --help, validate)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), name)(args))

    return run


def _daemon_commands(sub: Any) -> None:
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
    _project_argument(p)
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="also start a sandbox Accengage endpoint and send to it",
    )
    p.add_argument(
        "--sandbox-port",
        type=int,
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
    p.set_defaults(func=_lazy("engine.cli.daemon", "cmd_run"))

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
    _project_argument(p)
    p.add_argument("--from", dest="from_", metavar="ISO8601", help="start (default: now)")
    p.add_argument("--count", type=int, default=3, help="fire times per rule (default 3)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_lazy("engine.cli.daemon", "cmd_next"))

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
            "and those held past the rule's limit, are sent by the daemon at once (or dropped "
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
        _project_argument(p)
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
        _sandbox_store_argument(p)
        p.set_defaults(func=_lazy("engine.cli.daemon", f"cmd_{name}"))


def _sandbox_store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sandbox",
        action="store_true",
        help="act on the outbox of --sandbox trials (pushrules-sandbox.db), not the real one",
    )


def _sending_commands(sub: Any) -> None:
    """send, fire, history, outbox: implemented in engine.cli.send, loaded when run."""

    def lazy(name: str) -> Any:
        return _lazy("engine.cli.send", name)

    def sending(p: argparse.ArgumentParser) -> None:
        _project_argument(p)
        p.add_argument(
            "--key",
            metavar="K",
            help="idempotency key: the same key sends once (default: a new one each time)",
        )
        p.add_argument(
            "--wait",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="how long to keep retrying before leaving it to the daemon (default 30)",
        )
        p.add_argument(
            "--dry-run", action="store_true", help="show the requests; record and send nothing"
        )
        p.add_argument(
            "--sandbox",
            action="store_true",
            help="send to a sandbox endpoint started on loopback, not to Accengage",
        )

    p = sub.add_parser(
        "send",
        help="fire one rule now and wait for Accengage's answer",
        description="Compile one firing of a rule, record it in the outbox, send it, and wait "
        "for the outcome (retrying within --wait). What still retries after that stays in the "
        "outbox for the daemon. Exit 0 all sent, 1 failed or needs a person, 75 left to the "
        "daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules send flight-canceled --event event.json --sandbox\n"
        "  pushrules send monday-digest --key digest-2026-w48   # at most once for that key",
    )
    p.add_argument("rule", help="rule id: the rule file's name without .yaml")
    fire_input_arguments(p)
    sending(p)
    p.set_defaults(func=lazy("cmd_send"))

    p = sub.add_parser(
        "fire",
        help="fire an event: every rule listening to it sends",
        description="Do what POST /events/EVENT does on the daemon, from the command line: "
        "every enabled rule listening to EVENT fires with the payload, then the requests are "
        "sent and their outcome printed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  pushrules fire flight.canceled --data event.json --key AF1234-11-26",
    )
    p.add_argument("event", help="event name, like flight.canceled")
    p.add_argument("--data", metavar="FILE", help="event payload, a JSON object (- for stdin)")
    sending(p)
    p.set_defaults(func=lazy("cmd_fire"))

    p = sub.add_parser(
        "history",
        help="what was sent, when, and what Accengage answered",
        description="List outbox rows, newest first: one per HTTP request, with its state, "
        "attempts, return code and message id.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules history --rule flight-canceled --since 2h\n"
        "  pushrules history --status in_doubt,failed,dead --format json",
    )
    _project_argument(p)
    p.add_argument("--rule", metavar="R", help="only this rule")
    p.add_argument(
        "--status",
        metavar="S",
        help="only these states, comma-separated: pending, "
        "sending, sent, retrying, failed, dead, in_doubt, held, dropped",
    )
    p.add_argument(
        "--since", metavar="T", help="a duration back from now (2h, 1d) or an ISO 8601 time"
    )
    p.add_argument("--limit", type=int, default=100, help="rows at most (default 100)")
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text: a table for people; json: every row with its attempts, for tools",
    )
    p.add_argument(
        "--unmatched",
        action="store_true",
        help="events the daemon answered but no rule took, with why (instead of the outbox)",
    )
    _sandbox_store_argument(p)
    p.set_defaults(func=lazy("cmd_history"))

    p = sub.add_parser(
        "outbox",
        help="resend or drop requests that need a person (in_doubt, failed, dead)",
        description="resend: queue the rows again and send them now (their history is kept). "
        "drop: give up on them for good. Check `pushrules history --status in_doubt` first: "
        "an in_doubt request may already have reached users.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules history --status in_doubt,failed,dead   # find the ids\n"
        "  pushrules outbox resend 42 43\n  pushrules outbox drop 44\n"
        "  pushrules outbox resend 7 --sandbox   # a row of the --sandbox trials",
    )
    p.add_argument("action", choices=("resend", "drop"))
    p.add_argument("ids", type=int, nargs="+", metavar="ID", help="outbox row ids (history)")
    _project_argument(p)
    p.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="resend: how long to keep retrying (default 30)",
    )
    _sandbox_store_argument(p)
    p.set_defaults(func=lazy("cmd_outbox"))


def fire_input_arguments(p: argparse.ArgumentParser) -> None:
    """What one firing of a rule sees: its event or feed item, and its time (compile, send)."""
    p.add_argument("--event", metavar="FILE", help="event payload, a JSON object (- for stdin)")
    p.add_argument(
        "--item", metavar="FILE", help="feed item for a poll rule, a JSON object (- for stdin)"
    )
    p.add_argument(
        "--at", metavar="ISO8601", help="fire time for `now` (default: the current time)"
    )


def _project_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        default=Path("."),
        help="project folder holding pushrules.yaml (default: .)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # the daemon configures its own logging
        logging.basicConfig(level=logging.WARNING, format="pushrules: %(message)s")
        # Commands print each fire's outcome themselves; the log would say it twice.
        logging.getLogger("pushrules.fire").setLevel(logging.CRITICAL)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PushrulesError as exc:  # every error meant for a user: its message is the answer
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except Exception as exc:
        message = store_problem(exc)
        if message is None:
            raise  # a bug: its traceback is what a report needs
        print(f"pushrules: {message}", file=sys.stderr)
        return EXIT_PROBLEMS


def store_problem(exc: BaseException) -> str | None:
    """What to tell the user about a database driver's ``exc`` (not ours, so not a
    :class:`PushrulesError`), or None when it is a bug."""
    sa = sys.modules.get("sqlalchemy.exc")
    if sa is not None and isinstance(exc, sa.OperationalError | sa.ArgumentError):
        # The driver's first line says why (refused, no such file); the URL may hold a password.
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        from engine.rules.secrets import hide_url_password

        reason = hide_url_password(reason)
        return (
            f"the store (store: in pushrules.yaml) cannot be used: {reason}; check that it is "
            "reachable and the URL right"
        )
    return None


# --- validate ------------------------------------------------------------------------------


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


def cmd_validate(args: argparse.Namespace) -> int:
    from engine.rules.loader import Loader

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
    ruleset = Loader(root, problems_only=True).load()
    problems = list(ruleset.problems)
    if args.format == "github":
        # Annotations attach to the repository's paths: name the files from here, not DIR.
        problems = [replace(p, file=os.path.relpath(root / p.file)) for p in problems]
    print_problems(problems, args.format, ruleset.files)
    return EXIT_OK if ruleset.ok else EXIT_PROBLEMS


# --- compile -------------------------------------------------------------------------------


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


def parse_time(text: str | None, option: str = "--at") -> datetime:
    """An ISO 8601 time from the command line (UTC when it names no offset); now if None."""
    if text is None:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not an ISO 8601 time like 2026-12-24T09:00:00+01:00"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class UsageError(PushrulesError):
    """Bad input on the command line: exit 2 with the message."""


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
    from engine.rules.schedule import parse_timezone

    event = read_event(args.event)
    item = read_event(args.item, "item")
    at = parse_time(args.at).astimezone(parse_timezone(rule.timezone))
    return FireContext(now=at, event=event, item=item)


def _rule_file_of(rel: str, rule_id: str) -> bool:
    """Whether ``rel`` is a file of rule ``rule_id`` (in rules/ or any subfolder of it)."""
    path = Path(rel)
    return path.parts[:1] == ("rules",) and path.stem == rule_id


def rule_to_fire(ruleset: RuleSet, rule_id: str, fmt: str = "text") -> Rule | None:
    """The rule, or None after printing why it cannot fire: unknown, or it (or the project
    configuration it needs) has errors."""
    own = [
        p
        for p in ruleset.problems
        if p.is_error and (_rule_file_of(p.file, rule_id) or not p.file.startswith("rules/"))
    ]
    rule = ruleset.rules.get(rule_id)
    if (
        ruleset.project is not None
        and rule is None
        and not any(_rule_file_of(p.file, rule_id) for p in ruleset.problems)
    ):
        known = ", ".join(sorted(ruleset.rules)) or "none"
        print(f"pushrules: no rule '{rule_id}' in rules/ (known: {known})", file=sys.stderr)
        return None
    if ruleset.project is None or rule is None or own:
        print_problems(own, fmt, ruleset.files)
        return None
    return rule


def cmd_compile(args: argparse.Namespace) -> int:
    from engine.render.compiler import (
        CompileError,
        compile_fire,
        for_display,
        missing_input,
        passes_when,
    )
    from engine.rules.loader import Loader
    from engine.rules.secrets import MissingSecret

    ruleset = Loader(args.project).load()
    rule = rule_to_fire(ruleset, args.rule, args.format)
    if rule is None:
        return EXIT_PROBLEMS
    try:
        context = fire_context(args, rule)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    project = ruleset.project
    assert project is not None
    try:
        if not passes_when(rule, context):
            print(
                f"pushrules: `when` is false for this {'item' if context.item else 'event'}: "
                "the rule would not fire, nothing would be sent",
                file=sys.stderr,
            )
            print("[]")
            return EXIT_OK
        requests = compile_fire(rule, project, context)
        for note in fire_notes(rule, context, len(requests)):
            print(f"pushrules: {note}", file=sys.stderr)
    except CompileError as exc:
        hint = missing_input(exc, event=args.event is not None, item=args.item is not None)
        if hint:
            exc = CompileError(exc.rule, exc.field, hint, exc.code, exc.reference)
        if args.format == "json":
            problem = Problem(rule.file, None, None, exc.field, exc.code, "error", exc.message)
            print(format_json([problem]))
        else:
            print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    try:
        login = project.login.resolve() if project.login else ""
    except MissingSecret:
        login = f"<{project.login.describe()} is not set>" if project.login else ""
    output = [{"url": r.url, "body": for_display(r.body, login)} for r in requests]
    print(json.dumps(output, indent=2, ensure_ascii=False))
    return EXIT_OK


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


# --- sandbox -------------------------------------------------------------------------------


def cmd_sandbox(args: argparse.Namespace) -> int:
    """Serve the sandbox in the foreground; 2 on a bad option, 1 when the port is taken."""
    from engine.accengage.sandbox import SandboxConfig, serve

    try:
        config = SandboxConfig(
            fail_rate=args.fail_rate,
            latency_ms=args.latency,
            code=args.code,
            record_path=args.record,
            seed=args.seed,
        )
    except ValueError as problem:
        print(f"pushrules sandbox: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        serve(config, args.host, args.port)
    except OSError as problem:
        print(
            f"pushrules sandbox: cannot listen on {args.host}:{args.port}: {problem}",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    return EXIT_OK
