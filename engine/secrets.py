"""Secrets by reference: ``{env: NAME}`` or ``{file: PATH}``, read when needed, never printed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MASK = "********"


class MissingSecret(Exception):
    """A referenced secret cannot be read; the message names the reference, never a value."""


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives. ``repr`` and ``str`` show the reference only."""

    kind: str  # "env" or "file"
    name: str
    base: Path | None = None  # folder a relative ``file`` path is taken from

    def resolve(self) -> str:
        if self.kind == "env":
            value = os.environ.get(self.name)
            if value is None:
                raise MissingSecret(f"environment variable {self.name} is not set")
            return value
        path = Path(self.name)
        if self.base is not None and not path.is_absolute():
            path = self.base / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MissingSecret(f"secret file {self.name} cannot be read: {exc.strerror}") from None

    def describe(self) -> str:
        return f"{{{self.kind}: {self.name}}}"

    def __str__(self) -> str:
        return self.describe()
