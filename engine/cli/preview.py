"""``preview``: one firing of a rule drawn as the people who receive it will see it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from engine.cli.common import (
    EXIT_OK,
    UsageError,
    fire_input_arguments,
    lazy,
    project_argument,
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "preview",
        help="write an HTML page showing a rule's push as people will see it",
        description="Compile one firing of a rule, as `pushrules compile` does, and write one\n"
        "self-contained HTML page (it loads nothing from the network) showing, per app, the\n"
        "push on an iOS or Android lock screen: title, text with ${macros} filled from the\n"
        "target's and message's data (those only the device database fills stay ${name}\n"
        "chips), badge, sound, pictures, the buttons and what each does; then the compiled\n"
        "JSON. Where `when` is false or the targets expand to nobody, the page says so.\n"
        "Nothing is sent. Exit codes as compile: 0 page written, 1 the rule is unknown or\n"
        "invalid or a template failed (no page), 2 usage (bad input, --out not writable).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  pushrules preview flight-canceled --event event.json\n"
        "      writes preview-flight-canceled.html here and prints its path\n"
        '  echo \'{"member_id": "42", "first_name": "Ana", "flightref": "AF12"}\' \\\n'
        "    | pushrules preview flight-canceled --event - --out push.html\n"
        "  pushrules preview monday-digest --at 2026-12-21T09:00:00+01:00 --out - > digest.html",
    )
    p.add_argument("rule", help="rule id: the rule file's name without .yaml")
    project_argument(p)
    fire_input_arguments(p)
    p.add_argument(
        "--out",
        metavar="FILE",
        help="where to write the page (default: preview-RULE.html in the current folder; "
        "- for standard output)",
    )
    p.set_defaults(func=lazy("engine.cli.preview", "cmd_preview"))


def cmd_preview(args: argparse.Namespace) -> int:
    from engine.cli.check import compile_for_command
    from engine.render.preview import page_view, render_page

    fire = compile_for_command(args)
    if isinstance(fire, int):
        return fire
    for note in fire.notes:
        print(f"pushrules: {note}", file=sys.stderr)
    page = render_page(
        page_view(
            fire.rule,
            fire.project,
            fire.context,
            fire.requests,
            fire.login,
            fire.notes,
            fire.fires,
            quiet_until=fire.quiet_until,
            skipped=fire.skipped,
        )
    )
    if args.out == "-":
        sys.stdout.write(page)
        return EXIT_OK
    out = Path(args.out) if args.out else Path(f"preview-{fire.rule.id}.html")
    write_page(out, page)
    print(out)
    return EXIT_OK


def write_page(path: Path, page: str) -> None:
    """Write ``page`` whole or not at all: a failed write leaves no half page behind."""
    folder = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as exc:
        raise UsageError(f"cannot write the page to {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o644)  # a page to open and share, not a secret
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(page)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise UsageError(f"cannot write the page to {path}: {exc.strerror}") from None
