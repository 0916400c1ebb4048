"""The idempotency keys whose shape the outbox knows: a scheduled fire's names its instant.

A fire is keyed by ``(rule, key)``; an event's key is the sender's, a feed item's is made
from the item. A scheduled fire's key is made from the instant it is for, so every instance
and every restart computes the same one, and the store can tell, from the key alone, whether
a row was written ahead of its fire's time (``daemon.fire_ahead``).
"""

from __future__ import annotations

from datetime import UTC, datetime

SCHEDULE_KEY = "schedule:"


def fire_key(scheduled_at: datetime) -> str:
    """The idempotency key of a scheduled fire: UTC, so every instance computes the same."""
    if scheduled_at.utcoffset() is None:
        raise ValueError(f"a fire time must be timezone-aware, got {scheduled_at!r}")
    return f"{SCHEDULE_KEY}{scheduled_at.astimezone(UTC).isoformat()}"


def scheduled_for(key: str) -> datetime | None:
    """The instant a scheduled fire's key names; None for any other key."""
    if not key.startswith(SCHEDULE_KEY):
        return None
    try:
        at = datetime.fromisoformat(key[len(SCHEDULE_KEY) :])
    except ValueError:
        return None
    return at if at.utcoffset() is not None else None
