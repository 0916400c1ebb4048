"""``pushrules``: the root parser, and turning any user-facing error into a message.

Each group of commands registers its own subcommands (``COMMAND_GROUPS``); this module knows
only their names, to import just the group that runs a command (the other groups' imports cost
a pre-commit hook's ``validate`` as much as its checks). Exit codes, for CI and scripts: 0
success, 1 problems found or the operation failed, 2 usage.
"""

from __future__ import annotations

import gc
import importlib
import logging
import sys
from collections.abc import Sequence

from engine import __version__
from engine.cli.common import EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, CommandParser, UsageError
from engine.errors import PushrulesError

#: The modules that register commands, each with the commands its ``register`` adds, in the
#: order ``--help`` lists them (a test checks both against the modules).
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "engine.cli.check": ("validate", "compile"),
    "engine.cli.author": ("init", "schema", "fmt"),
    "engine.cli.preview": ("preview",),
    "engine.cli.review": ("test", "explain"),
    "engine.cli.plan": ("plan",),
    "engine.cli.sandbox": ("sandbox",),
    "engine.cli.send": ("send", "fire", "history", "outbox"),
    "engine.cli.daemon": ("run", "next", "pause", "resume"),
}

EPILOG = """\
Typical use:
  pushrules init my-rules             start a rules repository (README.md inside says how)
  pushrules validate                  check every rule, template and pushrules.yaml here
  pushrules validate --format github  annotate a pull request from CI
  pushrules fmt --check               list files not in pushrules' one layout
  pushrules plan --format markdown    what a pull request changes, rule by rule
  pushrules compile flight-canceled --event event.json
                                      show the exact JSON a rule would send
  pushrules preview flight-canceled --event event.json
                                      see the push as people will, in a browser
  pushrules test                      run the rule tests of rule-tests/
  pushrules explain flight-canceled --event event.json --at "2026-12-01 23:30"
                                      why the rule would, or would not, send then
  pushrules send flight-canceled --event event.json --sandbox
                                      try it for real against a fake Accengage
  pushrules run --sandbox             the whole daemon, on a fake Accengage
  pushrules history --status in_doubt,failed,dead
                                      what needs a person

Exit codes: 0 ok, 1 problems found or the operation failed, 2 usage error
(send, fire: 75 when requests still retry and were left to the daemon).
Docs: docs/rules.md (writing rules), docs/operations.md (running the daemon).
"""


def groups_for(argv: Sequence[str] | None) -> list[str]:
    """The groups to register for ``argv``: the one owning the command it names first, or all
    of them when it names none (an option first, such as ``--help``) or one no group owns,
    since the root's help and its "invalid choice" error list every command."""
    if argv and not argv[0].startswith("-"):
        for group, commands in COMMAND_GROUPS.items():
            if argv[0] in commands:
                return [group]
    return list(COMMAND_GROUPS)


def build_parser(argv: Sequence[str] | None = None) -> CommandParser:
    """The root parser, with the command groups :func:`groups_for` ``argv`` wants (all of
    them without ``argv``)."""
    import argparse

    parser = CommandParser(
        prog="pushrules",
        description="Declarative push notification rules for Accengage: YAML rules in git, "
        "validated against the API, compiled and sent by a daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pushrules {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for group in groups_for(argv):
        importlib.import_module(group).register(sub)
    return parser


def run() -> int:
    """The ``pushrules`` program: :func:`main`, leaving what it made to the process's end
    without the interpreter's last garbage collection, which walks every object still alive
    (20 ms after a ``validate`` of 1,000 rules). Objects are still freed and
    files closed; only reference cycles are left to the exit."""
    code = main()
    gc.freeze()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
