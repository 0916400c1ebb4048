"""The commands that help while writing files: ``schema`` (for editors) and ``fmt``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    lazy,
    project_argument,
)

#: The folders of a project whose files ``fmt`` lays out (with pushrules.yaml).
PROJECT_FOLDERS = ("rules", "templates", "rule-tests")

#: The kinds of file ``schema`` describes (engine.rules.json_schema.KINDS, named here so that
#: --help does not load the schemas).
SCHEMA_KINDS = ("rule", "template", "buttons", "config", "tests")

SCHEMA_EPILOG = """\
Kinds:
  rule      rules/*.yaml               template  templates/messages/*.yaml
  buttons   templates/buttons/*.yaml   config    pushrules.yaml
  tests     rule-tests/*.yaml

Examples:
  pushrules schema rule                   print the rule schema
  pushrules schema --out schemas         write every kind: schemas/rule.json, ...
  pushrules schema config --out schemas  write one

Then point the editor at them: a first line in a rule file
  # yaml-language-server: $schema=../schemas/rule.json
or, in VS Code with the YAML extension, .vscode/settings.json:
  {"yamlschemas": {"schemas/rule.json": "rules/**/*.yaml"}}
(docs/rules.md, "Your editor checks as you type").
"""

FMT_EPILOG = """\
Examples:
  pushrules fmt                           format every file of the project here
  pushrules fmt rules/flight-canceled.yaml
  pushrules fmt --check                   CI: exit 1 and list the files fmt would change

fmt orders keys as docs/rules.md lists them, indents by 2 spaces, and quotes the values YAML
would misread (no, 0012, 1.10, texts with {{ }}, ${ } or #). Comments and blank lines stay.
It never changes what a file means: a file it cannot format safely (a YAML error) is left as
it is, with the reason. Exit codes: 0 done (or, with --check, nothing to change), 1 a file
would change (--check) or could not be formatted, 2 usage.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "schema",
        help="print or write the JSON Schema of each kind of file, for editors",
        description="Print the JSON Schema (draft 2020-12) of one kind of file, or write every "
        "kind (or the one named) into DIR as KIND.json. Editors that read JSON Schema (VS Code "
        "with the YAML extension, JetBrains IDEs, vim and emacs through the YAML language "
        "server) then complete field names, show what each field means, and underline a "
        "misspelt field or a wrong value as you type. What needs the whole project (app "
        "aliases, templates, ${macros}) or rendering (Jinja) is still for `pushrules validate`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SCHEMA_EPILOG,
    )
    p.add_argument("kind", nargs="?", choices=SCHEMA_KINDS, help="which kind of file")
    p.add_argument("--out", metavar="DIR", type=Path, help="write KIND.json files into DIR")
    p.add_argument(
        "--project",
        metavar="DIR",
        type=Path,
        default=Path("."),
        help="project folder; --out is taken from it when relative (default: .)",
    )
    p.set_defaults(func=lazy("engine.cli.author", "cmd_schema"))

    p = sub.add_parser(
        "fmt",
        help="rewrite rules, templates, tests and pushrules.yaml in one layout",
        description="Rewrite files into pushrules' one layout, so that a pull request shows "
        "what changed and nothing else. PATH is a file or a folder; by default, every "
        "file of the project (pushrules.yaml, rules/, templates/, rule-tests/).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=FMT_EPILOG,
    )
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or folders")
    p.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 listing files to format"
    )
    project_argument(p)
    p.set_defaults(func=lazy("engine.cli.author", "cmd_fmt"))


def cmd_schema(args: argparse.Namespace) -> int:
    from engine.rules.json_schema import json_schema

    if args.out is None:
        if args.kind is None:
            print(
                f"pushrules schema: name a kind ({', '.join(SCHEMA_KINDS)}) to print, or write "
                "them all with --out DIR",
                file=sys.stderr,
            )
            return EXIT_USAGE
        print(schema_text(json_schema(args.kind)), end="")
        return EXIT_OK
    out: Path = args.out if args.out.is_absolute() else args.project / args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for kind in [args.kind] if args.kind else SCHEMA_KINDS:
            path = out / f"{kind}.json"
            path.write_text(schema_text(json_schema(kind)), encoding="utf-8")
            print(f"wrote {path}")
    except OSError as exc:
        print(f"pushrules schema: cannot write into {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


def schema_text(schema: dict[str, Any]) -> str:
    """A schema as written to a file: stable, so a committed copy diffs cleanly."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def cmd_fmt(args: argparse.Namespace) -> int:
    from engine.rules.formatting import FormatError, format_text

    try:
        files = files_to_format(args.paths or [args.project])
    except UsageError as exc:
        print(f"pushrules fmt: {exc}", file=sys.stderr)
        return EXIT_USAGE
    changed: list[str] = []
    failed = 0
    for path, kind in files:
        shown = os.path.relpath(path)
        try:
            text = path.read_text(encoding="utf-8")
            result = format_text(text, kind)
            if result != text and not args.check:
                path.write_text(result, encoding="utf-8")
        except FormatError as exc:
            where = ":" if str(exc)[:1].isdigit() else ": "
            print(f"{shown}{where}{exc} (left as it is)", file=sys.stderr)
            failed += 1
            continue
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            print(f"{shown}: cannot be read or written: {reason}", file=sys.stderr)
            failed += 1
            continue
        if result != text:
            changed.append(shown)
            print(shown if args.check else f"formatted {shown}")
    summary = f"{len(files)} file{'s' if len(files) != 1 else ''} checked: " + (
        f"{len(changed)} to format" if args.check else f"{len(changed)} formatted"
    )
    if failed:
        summary += f", {failed} left as {'it is' if failed == 1 else 'they are'} (see above)"
    print(summary, file=sys.stderr)
    if failed or (args.check and changed):
        return EXIT_PROBLEMS
    return EXIT_OK


def files_to_format(paths: list[Path]) -> list[tuple[Path, str]]:
    """The files pushrules reads among ``paths`` (files, or folders searched whole), each with
    its kind; a file it does not read is named and skipped. UsageError: a path that does not
    exist, or is in no project."""
    from engine.rules.formatting import kind_of
    from engine.rules.project import find_root
    from engine.rules.yaml_source import yaml_files

    found: dict[Path, str] = {}
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        root = find_root(path)
        if root is None:
            raise UsageError(
                f"{path}: no pushrules.yaml in this folder or any above it: not in a project"
            )
        if path.absolute() == root:  # the project: its own folders, not all of the repository
            candidates = [root / "pushrules.yaml"] + [
                p
                for folder in PROJECT_FOLDERS
                if (root / folder).is_dir()
                for p in yaml_files(root / folder, root)
            ]
            candidates = [Path(os.path.relpath(p)) for p in candidates]
        elif path.is_dir():
            candidates = yaml_files(path, root)
        else:
            candidates = [path]
        for candidate in candidates:
            kind = kind_of(candidate.absolute().relative_to(root))
            if kind is not None and candidate.is_file():
                found[candidate] = kind
            elif not path.is_dir():
                print(
                    f"pushrules fmt: {candidate}: not a file pushrules reads (pushrules.yaml, "
                    "rules/, templates/messages/, templates/buttons/, rule-tests/); skipped",
                    file=sys.stderr,
                )
    return sorted(found.items())
