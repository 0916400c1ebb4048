"""The commands that help while writing files: ``init`` (a new rules repository), ``schema``
(for editors) and ``fmt``.

``init`` writes the files of ``scaffold/`` beside this module (package data, not code) and the
schemas of ``schema``; a scaffold file stored as ``dot-NAME`` is written as ``.NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    folder_arguments,
    lazy,
    project_argument,
    project_folder,
)

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

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


INIT_EPILOG = """\
Examples:
  pushrules init my-rules     a new folder my-rules/ holding a project that validates
  pushrules init              here, in an empty folder (a fresh `git init` counts as empty)
  pushrules init --force      here, beside files already there: adds the missing ones and
                              never replaces a file (it names each one it left as it was)

It writes pushrules.yaml (credentials as {env: ...}), a rule, a message template, a button
template, a rule test and a sample event; schemas/ for editors (as `pushrules schema --out
schemas`); .pre-commit-config.yaml with pushrules' hooks; .github/workflows/pushrules.yml
(validate, test and plan on each pull request); .gitignore (the outbox databases, preview
pages); and README.md, which walks a rule author through a first change.
Exit codes: 0 written, 1 a file could not be written, 2 usage (a folder not empty).
More: docs/rules.md, section 12.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="start a rules repository: settings, a rule, templates, a test, hooks, CI",
        description="Write a new rules repository into DIR (default: the current folder),\n"
        "ready to validate and test: the files a rule author edits, one example of each, and\n"
        "the checks that run before each commit and on each pull request.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=INIT_EPILOG,
    )
    folder_arguments(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder that is not empty: add the missing files, keep the others",
    )
    p.set_defaults(func=lazy("engine.cli.author", "cmd_init"))

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
        for name, text in schema_files([args.kind] if args.kind else SCHEMA_KINDS).items():
            path = out / name
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    except OSError as exc:
        print(f"pushrules schema: cannot write into {out}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    return EXIT_OK


def schema_text(schema: dict[str, Any]) -> str:
    """A schema as written to a file: stable, so a committed copy diffs cleanly."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def schema_files(kinds: Sequence[str] = SCHEMA_KINDS) -> dict[str, str]:
    """The files of ``schema --out``: ``KIND.json`` -> its text (``init`` writes them too)."""
    from engine.rules.json_schema import json_schema

    return {f"{kind}.json": schema_text(json_schema(kind)) for kind in kinds}


# --- init ------------------------------------------------------------------------------------

#: A scaffold file stored under this prefix is written as a dot file: hidden files are easily
#: lost as package data (globs skip them), so ``dot-gitignore`` becomes ``.gitignore``.
DOT_PREFIX = "dot-"

#: Replaced by pushrules' version in the scaffold's files (the pins of CI and pre-commit).
VERSION_MARK = "@VERSION@"

#: The scaffold's folder of editor schemas; its files point at it on their first line.
SCHEMA_FOLDER = "schemas"


def scaffold_files() -> dict[str, str]:
    """Every file of a new rules repository: its path there (``/``-separated) -> its text."""
    from importlib.resources import files

    from engine import __version__

    found: dict[str, str] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.name.startswith((".", "__")):  # an editor's or Python's leftovers
                continue
            name = entry.name
            if name.startswith(DOT_PREFIX):
                name = "." + name[len(DOT_PREFIX) :]
            if entry.is_dir():
                walk(entry, f"{prefix}{name}/")
            else:
                text = entry.read_text(encoding="utf-8")
                found[prefix + name] = text.replace(VERSION_MARK, __version__)

    walk(files("engine.cli") / "scaffold", "")
    for name, text in schema_files().items():
        found[f"{SCHEMA_FOLDER}/{name}"] = text
    return dict(sorted(found.items()))


def write_new_files(root: Path, files: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Write each of ``files`` under ``root`` that is not there yet, never replacing one (the
    file is created exclusively, so not even a file that appears meanwhile). The paths
    written, the paths skipped as already there, and the failures (``path: why``)."""
    written: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    for rel, text in files.items():
        path = root / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file where the folder goes, no permission...
            failed.append(f"{rel}: {exc.strerror or exc}")
            continue
        try:
            handle = path.open("x", encoding="utf-8", newline="\n")
        except FileExistsError:
            skipped.append(rel)
            continue
        except OSError as exc:
            failed.append(f"{rel}: {exc.strerror or exc}")
            continue
        try:
            with handle:
                handle.write(text)
        except OSError as exc:
            path.unlink(missing_ok=True)  # never half a file
            failed.append(f"{rel}: {exc.strerror or exc}")
            continue
        written.append(rel)
    return written, skipped, failed


def cmd_init(args: argparse.Namespace) -> int:
    root = project_folder(args, exists=False)
    try:
        present = [p.name for p in root.iterdir() if p.name != ".git"] if root.exists() else []
    except OSError as exc:
        raise UsageError(f"cannot read the folder {root}: {exc.strerror or exc}") from None
    present.sort()
    if present and not args.force:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise UsageError(
            f"{root} is not empty ({shown}): name a new folder (pushrules init my-rules), or "
            "add --force to write the files that are missing and keep every file already there"
        )
    files = scaffold_files()
    written, skipped, failed = write_new_files(root, files)
    for rel in written:
        print(f"wrote {os.path.normpath(root / rel)}")
    for rel in skipped:
        print(
            f"skipped {os.path.normpath(root / rel)}: already there, left as it is", file=sys.stderr
        )
    if ".gitignore" in skipped:
        missing = ignore_lines_missing(root / ".gitignore", files[".gitignore"])
        if missing:
            print(f"  add to .gitignore: {' '.join(missing)}", file=sys.stderr)
    for failure in failed:
        print(f"pushrules init: cannot write {root / failure}", file=sys.stderr)
    if failed:
        return EXIT_PROBLEMS
    print(next_steps(root, kept=bool(skipped)))
    return EXIT_OK


def ignore_lines_missing(gitignore: Path, scaffold: str) -> list[str]:
    """The patterns of the scaffold's .gitignore (``scaffold``) that ``gitignore`` lacks."""
    wanted = [line for line in scaffold.splitlines() if line and not line.startswith("#")]
    try:
        have = set(gitignore.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError):
        return wanted
    return [line for line in wanted if line not in have]


def next_steps(root: Path, *, kept: bool) -> str:
    """What to do after ``init``, as commands to type."""
    steps = []
    if root.absolute() != Path.cwd():
        steps.append(f"cd {root}")
    if not any(
        (folder / ".git").exists() for folder in [root.absolute(), *root.absolute().parents]
    ):
        steps.append("git init")
    steps += [
        "set repo: in .pre-commit-config.yaml to where your team keeps pushrules",
        "pip install pre-commit && pre-commit install",
        "pushrules validate && pushrules test",
    ]
    lines = ["", "Next (README.md walks through a first change):"]
    lines += [f"  {step}" for step in steps]
    if kept:
        lines.append(
            "Files already there were kept: `pushrules validate` says whether the new ones fit."
        )
    return "\n".join(lines)


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
            kind = kind_of(Path(os.path.relpath(candidate, root)))  # both normalised
            if kind is not None and candidate.is_file():
                found[candidate] = kind
            elif not path.is_dir():
                print(
                    f"pushrules fmt: {candidate}: not a file pushrules reads (pushrules.yaml, "
                    "rules/, templates/messages/, templates/buttons/, rule-tests/); skipped",
                    file=sys.stderr,
                )
    return sorted(found.items())
