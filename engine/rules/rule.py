"""The rule model: what one checked rule file means, as immutable dataclasses.

The checks that build it from a file live in :mod:`engine.rules.checks`. The model imports
neither Cerberus nor Jinja, so code that only reads rules (the outbox, the scheduler's tests, a
tool) does not load the checking machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model loads neither Cerberus (project's schemas) nor Jinja
    from engine.rules.project import App

DEFAULT_CATCH_UP = timedelta(minutes=10)
TRIGGER_KINDS = ("cron", "every", "at", "event", "poll")


@dataclass(frozen=True, slots=True)
class AppPlan:
    """One app of a rule: its partner, its parent message, and its message after merging."""

    alias: str
    app: App
    parent_key: str  # "parentMessageId" or "parentMessageExternalId"
    parent_value: str
    message: Mapping[str, Any]
    #: Message fields this app sets itself (errors at fire time name where the author wrote it).
    overrides: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class QuietHours:
    start: str  # "HH:MM"
    end: str
    then: str  # "defer" or "skip"


@dataclass(frozen=True, slots=True)
class Limit:
    count: int
    per: timedelta


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    file: str
    description: str
    enabled: bool
    trigger_kind: str
    trigger: Mapping[str, Any]
    timezone: str
    when: str | None
    apps: tuple[AppPlan, ...]
    targets: tuple[Mapping[str, Any], ...]
    vars: Mapping[str, Any] = field(default_factory=dict)
    catch_up: timedelta = DEFAULT_CATCH_UP
    quiet_hours: QuietHours | None = None
    limit: Limit | None = None
    digest: str = ""

    @property
    def event(self) -> str | None:
        return str(self.trigger["event"]) if self.trigger_kind == "event" else None

    @property
    def multi_app(self) -> bool:
        return len(self.apps) > 1


__all__ = [
    "DEFAULT_CATCH_UP",
    "TRIGGER_KINDS",
    "AppPlan",
    "Limit",
    "QuietHours",
    "Rule",
]
