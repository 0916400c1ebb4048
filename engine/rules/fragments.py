"""Reusable pieces a rule pulls with ``use: NAME``: message templates and button sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from engine.accengage import api as accengage
from engine.rules.problems import Problem, field_path
from engine.rules.schemas import BUTTON_TEMPLATE_CHECKER, MESSAGE_TEMPLATE_CHECKER, SchemaChecker
from engine.rules.yaml_source import MarkedMap, Unreadable, load, position, read_source, yaml_files

MESSAGES_DIR = Path("templates/messages")
BUTTONS_DIR = Path("templates/buttons")


@dataclass(frozen=True)
class Fragments:
    messages: Mapping[str, MarkedMap] = field(default_factory=dict)
    buttons: Mapping[str, MarkedMap] = field(default_factory=dict)
    broken: frozenset[str] = frozenset()  # "messages/NAME" or "buttons/NAME" with errors


def load_fragments(root: Path) -> tuple[Fragments, list[Problem], int]:
    """Both template folders; a broken template is reported and left out, the rest load."""
    problems: list[Problem] = []
    messages, count_m = _load_dir(root, MESSAGES_DIR, MESSAGE_TEMPLATE_CHECKER, problems, ())
    buttons, count_b = _load_dir(
        root, BUTTONS_DIR, BUTTON_TEMPLATE_CHECKER, problems, ("interactiveButtons",)
    )
    broken = frozenset(
        f"{Path(p.file).parts[1]}/{Path(p.file).stem}" for p in problems if p.is_error
    )
    return Fragments(messages, buttons, broken), problems, count_m + count_b


def _load_dir(
    root: Path,
    folder: Path,
    checker: SchemaChecker,
    problems: list[Problem],
    within: tuple[str, ...],
) -> tuple[dict[str, MarkedMap], int]:
    """``within``: where in a message this folder's templates go (for their return codes)."""
    found: dict[str, MarkedMap] = {}
    seen: dict[str, str] = {}  # template name -> its file
    directory = root / folder
    if not directory.is_dir():
        return found, 0
    paths = yaml_files(directory, root)
    for path in paths:
        rel = str(folder / path.relative_to(directory))
        if path.stem in seen:
            problems.append(
                Problem(
                    rel,
                    None,
                    None,
                    "",
                    None,
                    "error",
                    f"template name '{path.stem}' is also {seen[path.stem]}; rename one of them",
                )
            )
            continue
        seen[path.stem] = rel
        try:
            text = read_source(path, root, directory)
        except Unreadable as exc:
            problems.append(Problem(rel, exc.line, None, "", None, "error", exc.message))
            continue
        loaded = load(text)
        issues = [
            Problem(rel, i.line, i.column, "", None, i.severity, i.message) for i in loaded.issues
        ]
        doc = loaded.data
        if not any(p.is_error for p in issues) and not isinstance(doc, MarkedMap):
            issues.append(
                Problem(
                    rel,
                    1,
                    1,
                    "",
                    None,
                    "error",
                    "a template must be a mapping of fields (name: value lines)",
                )
            )
        if not any(p.is_error for p in issues):
            for err in checker.check(doc):
                line, column = position(doc, err.path, at_value=err.kind in ("type", "allowed"))
                err_code = accengage.message_field_code(
                    (*within, *err.path), unknown=err.kind == "unknown"
                )
                issues.append(
                    Problem(rel, line, column, field_path(err.path), err_code, "error", err.message)
                )
        problems.extend(issues)
        if not any(p.is_error for p in issues):
            found[path.stem] = doc
    return found, len(paths)
