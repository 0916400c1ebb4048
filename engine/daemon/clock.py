"""Time, injected: the daemon asks a clock, so tests can start it at any instant.

A clock runs at real speed from a chosen start (``PUSHRULES_CLOCK``, an ISO 8601 instant, for
tests and rehearsals: "start as if it were 2026-03-29 01:59:50 in Paris"). It never runs
faster than real time, so timers set on the event loop and APScheduler still line up with it:
a fire time on this clock is ``offset`` away from the real instant it happens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

CLOCK_VARIABLE = "PUSHRULES_CLOCK"


@dataclass(frozen=True, slots=True)
class Clock:
    """Real time shifted by ``offset`` (zero in production)."""

    offset: timedelta = timedelta(0)

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def to_real(self, moment: datetime) -> datetime:
        """The real instant at which this clock shows ``moment``."""
        return moment - self.offset

    def from_real(self, moment: datetime) -> datetime:
        return moment + self.offset

    @classmethod
    def starting_at(cls, start: datetime) -> Clock:
        if start.tzinfo is None:
            raise ValueError("a clock start needs a UTC offset, like 2026-03-29T01:59:50+01:00")
        return cls(start - datetime.now(UTC))

    @classmethod
    def from_environment(cls) -> Clock:
        """The system clock, or one starting at ``$PUSHRULES_CLOCK`` when it is set."""
        value = os.environ.get(CLOCK_VARIABLE)
        if not value:
            return cls()
        try:
            start = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"{CLOCK_VARIABLE}={value!r} is not an ISO 8601 instant like "
                "2026-03-29T01:59:50+01:00"
            ) from None
        return cls.starting_at(start)


SYSTEM = Clock()
