"""Problems found in a project, and the three ways they are printed (text, json, github).

A problem says where (file, line, column, field path), how bad (error or warning), which
Accengage return code the same mistake would earn in production, and what to do.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int | None
    column: int | None
    field: str
    code: int | None
    severity: Severity
    message: str

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.file, self.line or 0, self.column or 0, self.field)


def field_path(path: Iterable[object]) -> str:
    """``("targets", 1, "language")`` -> ``targets[1].language``."""
    out = ""
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        else:
            out += f".{step}" if out else str(step)
    return out


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice a misspelt name most likely meant (a different case counts), or None."""
    options = sorted(o for o in choices if o != name)
    lowered = {o.lower(): o for o in options}
    if name.lower() in lowered:
        return lowered[name.lower()]
    matches = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix for a misspelt name, or ''."""
    match = closest(name, choices)
    return f" (did you mean '{match}'?)" if match else ""


def has_errors(problems: Iterable[Problem]) -> bool:
    return any(p.is_error for p in problems)


def format_text(problems: Sequence[Problem]) -> str:
    lines = []
    for p in sorted(problems, key=Problem.sort_key):
        where = p.file
        if p.line is not None:
            where += f":{p.line}"
            if p.column is not None:
                where += f":{p.column}"
        code = f" [{p.code}]" if p.code is not None else ""
        field = f" {p.field}:" if p.field else ""
        lines.append(f"{where}: {p.severity}{code}{field} {p.message}")
    return "\n".join(lines)


def summary(problems: Sequence[Problem], files: int) -> str:
    errors = sum(p.is_error for p in problems)
    warnings = len(problems) - errors
    return (
        f"{files} file{'s' if files != 1 else ''} checked: "
        f"{errors} error{'s' if errors != 1 else ''}, "
        f"{warnings} warning{'s' if warnings != 1 else ''}"
    )


def format_json(problems: Sequence[Problem]) -> str:
    return json.dumps(
        {
            "ok": not has_errors(problems),
            "problems": [asdict(p) for p in sorted(problems, key=Problem.sort_key)],
        },
        indent=2,
    )


def _escape_property(value: str) -> str:
    return (
        value.replace("%", "%25")
        .replace("\r", "%0D")
        .replace("\n", "%0A")
        .replace(":", "%3A")
        .replace(",", "%2C")
    )


def _escape_data(value: str) -> str:
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def format_github(problems: Sequence[Problem]) -> str:
    """GitHub Actions workflow commands, so problems show on the pull request's lines."""
    lines = []
    for p in sorted(problems, key=Problem.sort_key):
        props = [f"file={_escape_property(p.file)}"]
        if p.line is not None:
            props.append(f"line={p.line}")
        if p.column is not None:
            props.append(f"col={p.column}")
        title = "pushrules" + (f" [{p.code}]" if p.code is not None else "")
        props.append(f"title={_escape_property(title)}")
        message = f"{p.field}: {p.message}" if p.field else p.message
        lines.append(f"::{p.severity} {','.join(props)}::{_escape_data(message)}")
    return "\n".join(lines)
