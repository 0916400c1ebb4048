"""What the daemon remembers beside the outbox: seen keys, marks, pauses, unmatched events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import (
    bindparam,
    or_,
    select,
)
from sqlalchemy.engine import Connection, Engine

from engine.outbox.schema import (
    _aware,
    _check_key,
    marks,
    pauses,
    seen_keys,
    unmatched_events,
    utcnow,
)

#: Keys written per statement: within every driver's limit on bound parameters.
_BATCH: Final = 500


@dataclass(frozen=True, slots=True)
class UnmatchedEvent:
    id: int
    event: str
    key: str
    received_at: datetime
    reason: str
    payload: str  # the event's JSON, as received


class Marks:
    """Seen keys, marks, pauses and unmatched events: what the daemon remembers beside the
    outbox. A part of :class:`engine.outbox.store.Store`, which provides the engine."""

    engine: Engine
    _insert: Any

    def _read(self) -> Connection:
        raise NotImplementedError  # Store's

    # -- seen keys ---------------------------------------------------------------------------

    def mark_seen(self, scope: str, key: str, *, now: datetime | None = None) -> bool:
        """Remember ``key`` in ``scope``; True the first time only (race-safe)."""
        _check_key("scope", scope)
        _check_key("key", key)
        stmt = (
            self._insert(seen_keys)
            .on_conflict_do_nothing(index_elements=["scope", "key"])
            .returning(seen_keys.c.key)
        )
        with self.engine.begin() as conn:
            new = conn.execute(stmt, {"scope": scope, "key": key, "seen_at": now or utcnow()})
            return new.first() is not None

    def see_keys(self, scope: str, keys: Sequence[str], now: datetime) -> list[str]:
        """Record that a poll at ``now`` found ``keys`` of ``scope``, in one transaction;
        returns the keys never seen before, in the order given.

        A key seen before has its ``seen_at`` moved to ``now`` (never back): retention forgets
        only keys that polls stopped finding (see ``engine/outbox/retention.py``).
        """
        _check_key("scope", scope)
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            _check_key("key", key)
        _aware(now, "now")
        if not wanted:
            return []
        insert = (
            self._insert(seen_keys)
            .on_conflict_do_nothing(index_elements=["scope", "key"])
            .returning(seen_keys.c.key)
        )
        touch = seen_keys.update().where(
            seen_keys.c.scope == scope,
            seen_keys.c.key.in_(bindparam("keys", expanding=True)),
            seen_keys.c.seen_at < now,
        )
        new: set[str] = set()
        with self.engine.begin() as conn:
            for start in range(0, len(wanted), _BATCH):
                part = wanted[start : start + _BATCH]
                rows = [{"scope": scope, "key": key, "seen_at": now} for key in part]
                added = set(conn.execute(insert, rows).scalars())
                new |= added
                old = [key for key in part if key not in added]
                if old:
                    conn.execute(touch.values(seen_at=now), {"keys": old})
        return [key for key in wanted if key in new]

    def unseen_keys(self, scope: str, keys: Sequence[str]) -> list[str]:
        """The keys of ``scope`` never recorded, in the order given; writes nothing (a poll asks
        before it fires, and records only what it fired: see engine/daemon/poller.py)."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return []
        known: set[str] = set()
        query = select(seen_keys.c.key).where(
            seen_keys.c.scope == scope, seen_keys.c.key.in_(bindparam("keys", expanding=True))
        )
        with self._read() as conn:
            for start in range(0, len(wanted), _BATCH):
                part = wanted[start : start + _BATCH]
                known.update(conn.execute(query, {"keys": part}).scalars())
        return [key for key in wanted if key not in known]

    def prune_seen(self, scope: str, before: datetime) -> int:
        """Forget keys of ``scope`` seen before ``before`` (a feed's old items)."""
        with self.engine.begin() as conn:
            res = conn.execute(
                seen_keys.delete().where(
                    seen_keys.c.scope == scope, seen_keys.c.seen_at < _aware(before, "before")
                )
            )
            return res.rowcount

    # -- marks ------------------------------------------------------------------------------

    def get_mark(self, scope: str, name: str) -> datetime | None:
        with self._read() as conn:
            return conn.execute(
                select(marks.c.at).where(marks.c.scope == scope, marks.c.name == name)
            ).scalar()

    def set_mark(self, scope: str, name: str, at: datetime) -> None:
        """Remember an instant (upsert)."""
        _check_key("scope", scope)
        _check_key("name", name)
        values = {"scope": scope, "name": name, "at": _aware(at, "at")}
        stmt = self._insert(marks).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope", "name"], set_={"at": values["at"]}
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def set_marks(self, scope: str, values: Mapping[str, datetime]) -> None:
        """Several instants of one scope in one transaction."""
        if not values:
            return
        for name in values:
            _check_key("name", name)
        rows = [{"scope": scope, "name": n, "at": _aware(at, "at")} for n, at in values.items()]
        stmt = self._insert(marks)
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope", "name"], set_={"at": stmt.excluded.at}
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    # -- pauses ------------------------------------------------------------------------------

    def pause(
        self, rule: str, until: datetime | None = None, *, now: datetime | None = None
    ) -> None:
        """Pause one rule, or every rule with ``"*"``, until a time or until resumed.

        Claims skip paused rules' rows, so a pause stops sending at once; rows stay pending.
        """
        _check_key("rule", rule)
        if until is not None:
            _aware(until, "until")
        values = {"rule": rule, "until": until, "paused_at": now or utcnow()}
        stmt = self._insert(pauses).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["rule"], set_={"until": until, "paused_at": values["paused_at"]}
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def resume(self, rule: str) -> bool:
        """Lift a pause; False if the rule was not paused."""
        with self.engine.begin() as conn:
            return conn.execute(pauses.delete().where(pauses.c.rule == rule)).rowcount > 0

    def paused(self, now: datetime | None = None) -> dict[str, datetime | None]:
        """Pauses in force: rule (or ``"*"``) -> until (None: until resumed)."""
        now = now or utcnow()
        q = select(pauses.c.rule, pauses.c.until).where(
            or_(pauses.c.until.is_(None), pauses.c.until > now)
        )
        with self._read() as conn:
            return {r.rule: r.until for r in conn.execute(q.order_by(pauses.c.rule))}

    def paused_since(self, rule: str, now: datetime | None = None) -> datetime | None:
        """When the pause in force on ``rule`` (or ``"*"``) began; None if it has none."""
        now = now or utcnow()
        q = select(pauses.c.paused_at).where(
            pauses.c.rule == rule, or_(pauses.c.until.is_(None), pauses.c.until > now)
        )
        with self._read() as conn:
            return conn.execute(q).scalar()

    # -- events no rule took -----------------------------------------------------------------

    def record_unmatched(
        self, event: str, key: str, reason: str, payload: str, *, now: datetime | None = None
    ) -> bool:
        """Remember an event that no rule took; True when new (a retried key adds nothing)."""
        _check_key("key", key)
        stmt = (
            self._insert(unmatched_events)
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(unmatched_events.c.id)
        )
        values = {
            "event": event[:255],
            "key": key,
            "received_at": now or utcnow(),
            "reason": reason,
            "payload": payload,
        }
        with self.engine.begin() as conn:
            return conn.execute(stmt, values).first() is not None

    def unmatched(self, since: datetime | None = None, limit: int = 100) -> list[UnmatchedEvent]:
        """Events no rule took, newest first."""
        q = select(unmatched_events)
        if since is not None:
            q = q.where(unmatched_events.c.received_at >= _aware(since, "since"))
        # By ix_unmatched_received, newest first: a ``since`` that matches little reads little.
        q = q.order_by(unmatched_events.c.received_at.desc(), unmatched_events.c.id.desc())
        q = q.limit(limit)
        with self._read() as conn:
            return [UnmatchedEvent(**m) for m in conn.execute(q).mappings()]


__all__ = ["Marks", "UnmatchedEvent"]
