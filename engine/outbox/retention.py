"""What the store forgets, and when: ``retention:`` of pushrules.yaml.

Each kind is pruned in batches of a few hundred rows, one transaction each: a crash mid-way
rolls back its batch and nothing else, and a batch holds SQLite's write lock for milliseconds,
so sending goes on between batches. What goes:

* ``sent`` and ``dropped`` outbox rows created *and* last changed longer ago than their
  retention, with their attempts. No other state is ever pruned: pending, retrying and sending
  rows are on their way; held, in_doubt, failed and dead wait for a person. The delete states
  the condition again and (PostgreSQL) the rows are locked when picked, so a row resent
  meanwhile stays.
* events no rule took (``unmatched_events``), by when they were received.
* ``marks``: a scheduled rule's "handled up to" mark not moved for that long (the leader moves
  the marks of the rules it runs every 30 s, so only a rule deleted or disabled that long has
  one this old; back, it starts as a new rule, without catch-up), and pauses that ended that
  long ago.
* ``feed_keys``: keys of a feed that no successful poll has found for that long. The poller
  moves a key's ``seen_at`` to the poll that found it (about daily, ``REFRESH``), and a feed's
  last good read is the ``seen_at`` of its ``feed-primed:`` key, refreshed after its keys. A
  key goes only when ``seen_at < min(last good read, now) - feed_keys``: an item still in the
  feed is never forgotten (so never sent twice), and a feed that stops answering keeps all its
  keys however long it is down. An item that leaves its feed for longer than ``feed_keys`` and
  comes back is new again, and fires. The keys of a rule that is deleted are kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Final

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql.elements import ColumnElement

from engine.outbox.schema import (
    _aware,
    attempts_table,
    marks,
    outbox,
    pauses,
    seen_keys,
    unmatched_events,
)
from engine.outbox.states import DROPPED, SENT
from engine.rules.project import RetentionConfig

#: What ``retention:`` names, in the order a prune takes them.
KINDS: Final = ("sent", "dropped", "unmatched_events", "marks", "feed_keys")
#: Rows per transaction: a few milliseconds of SQLite's write lock.
BATCH: Final = 500
#: A feed's item keys, and its "primed" mark (its first poll is done; its last good read).
FEED_SCOPE: Final = "feed:"
PRIMED_SCOPE: Final = "feed-primed:"
#: How often, at most, a poll moves the ``seen_at`` of keys it finds again; far below the
#: smallest ``feed_keys`` retention (7 days), so a key in the feed is always fresh enough.
REFRESH: Final = timedelta(days=1)
_PRIMED_END: Final = PRIMED_SCOPE[:-1] + chr(ord(PRIMED_SCOPE[-1]) + 1)  # first scope after


def feed_scope(rule_id: str) -> str:
    return FEED_SCOPE + rule_id


def primed_scope(rule_id: str) -> str:
    return PRIMED_SCOPE + rule_id


def retained(config: RetentionConfig, kind: str) -> timedelta | None:
    """How long ``kind`` is kept (None: forever)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    keep: timedelta | None = getattr(config, kind)
    return keep


class Retention:
    """Pruning, one batch at a time. A part of :class:`engine.outbox.store.Store`."""

    engine: Engine
    dialect: str

    def _read(self) -> Connection:
        raise NotImplementedError  # Store's

    def prune_batch(self, kind: str, keep: timedelta, now: datetime, limit: int = BATCH) -> int:
        """Forget up to ``limit`` rows of ``kind`` older than ``keep``, in one transaction;
        returns how many went (fewer than ``limit``: nothing more to do for now)."""
        _aware(now, "now")
        before = now - keep
        with self.engine.begin() as conn:
            if kind in ("sent", "dropped"):
                return self._prune_rows(conn, SENT if kind == "sent" else DROPPED, before, limit)
            if kind == "unmatched_events":
                return _prune_unmatched(conn, before, limit)
            if kind == "marks":
                return _prune_marks(conn, before)
            if kind == "feed_keys":
                return _prune_feed_keys(conn, keep, now, limit)
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")

    def prunable(self, kind: str, keep: timedelta, now: datetime) -> int:
        """How many rows of ``kind`` a prune at ``now`` would forget (``--dry-run``)."""
        _aware(now, "now")
        before = now - keep
        with self._read() as conn:
            if kind in ("sent", "dropped"):
                state = SENT if kind == "sent" else DROPPED
                q = select(func.count()).where(_old_rows(state, before))
                return int(conn.execute(q).scalar_one())
            if kind == "unmatched_events":
                q = select(func.count()).where(unmatched_events.c.received_at < before)
                return int(conn.execute(q).scalar_one())
            if kind == "marks":
                old = conn.execute(select(func.count()).where(marks.c.at < before)).scalar_one()
                ended = conn.execute(select(func.count()).where(_ended(before))).scalar_one()
                return int(old) + int(ended)
            if kind == "feed_keys":
                total = 0
                for scope, cut in _feeds(conn, keep, now):
                    q = select(func.count()).where(_old_keys(scope, cut))
                    total += int(conn.execute(q).scalar_one())
                return total
        raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")

    def _prune_rows(self, conn: Connection, state: str, before: datetime, limit: int) -> int:
        """Old rows of a finished state and their attempts. Picked through ix_outbox_state
        (oldest first) and, on PostgreSQL, locked (rows another transaction holds are left for
        the next batch); deleted only if still in that state and unchanged since ``before``."""
        pick = (
            select(outbox.c.id)
            .where(_old_rows(state, before))
            .order_by(outbox.c.created_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        ids = list(conn.execute(pick).scalars())
        if not ids:
            return 0
        conn.execute(attempts_table.delete().where(attempts_table.c.outbox_id.in_(ids)))
        gone = conn.execute(
            outbox.delete().where(
                outbox.c.id.in_(ids), outbox.c.state == state, outbox.c.updated_at < before
            )
        )
        return gone.rowcount


def _old_rows(state: str, before: datetime) -> ColumnElement[bool]:
    return and_(outbox.c.state == state, outbox.c.created_at < before, outbox.c.updated_at < before)


def _ended(before: datetime) -> ColumnElement[bool]:
    return and_(pauses.c.until.is_not(None), pauses.c.until < before)


def _prune_unmatched(conn: Connection, before: datetime, limit: int) -> int:
    ids = list(
        conn.execute(
            select(unmatched_events.c.id)
            .where(unmatched_events.c.received_at < before)
            .order_by(unmatched_events.c.received_at)
            .limit(limit)
        ).scalars()
    )
    if not ids:
        return 0
    return conn.execute(unmatched_events.delete().where(unmatched_events.c.id.in_(ids))).rowcount


def _prune_marks(conn: Connection, before: datetime) -> int:
    """A table of one row per rule: in one statement each."""
    old = conn.execute(marks.delete().where(marks.c.at < before)).rowcount
    return old + conn.execute(pauses.delete().where(_ended(before))).rowcount


def _feeds(conn: Connection, keep: timedelta, now: datetime) -> Iterator[tuple[str, datetime]]:
    """(a feed's key scope, the instant before which its keys may go), for every feed read
    at least once: ``min(last good read, now) - keep``."""
    reads = conn.execute(
        select(seen_keys.c.scope, func.max(seen_keys.c.seen_at))
        .where(seen_keys.c.scope >= PRIMED_SCOPE, seen_keys.c.scope < _PRIMED_END)
        .group_by(seen_keys.c.scope)
        .order_by(seen_keys.c.scope)
    ).all()
    for scope, last_read in reads:
        yield FEED_SCOPE + scope[len(PRIMED_SCOPE) :], min(last_read, now) - keep


def _old_keys(scope: str, before: datetime) -> ColumnElement[bool]:
    return and_(seen_keys.c.scope == scope, seen_keys.c.seen_at < before)


def _prune_feed_keys(conn: Connection, keep: timedelta, now: datetime, limit: int) -> int:
    done = 0
    for scope, before in list(_feeds(conn, keep, now)):
        if done >= limit:
            break
        keys = list(
            conn.execute(
                select(seen_keys.c.key).where(_old_keys(scope, before)).limit(limit - done)
            ).scalars()
        )
        if keys:
            done += conn.execute(
                seen_keys.delete().where(_old_keys(scope, before), seen_keys.c.key.in_(keys))
            ).rowcount
    return done


def prune(
    store: Retention,
    config: RetentionConfig,
    now: datetime,
    *,
    dry_run: bool = False,
    batch: int = BATCH,
) -> dict[str, int | None]:
    """Everything retention allows now, batch after batch (``pushrules outbox prune``): rows
    forgotten by kind, None for a kind kept forever. ``dry_run`` counts and forgets nothing."""
    done: dict[str, int | None] = {}
    for kind in KINDS:
        keep = retained(config, kind)
        if keep is None:
            done[kind] = None
        elif dry_run:
            done[kind] = store.prunable(kind, keep, now)
        else:
            total = 0
            while True:
                n = store.prune_batch(kind, keep, now, batch)
                total += n
                if n < batch:
                    break
            done[kind] = total
    return done


__all__ = [
    "BATCH",
    "FEED_SCOPE",
    "KINDS",
    "PRIMED_SCOPE",
    "REFRESH",
    "Retention",
    "feed_scope",
    "primed_scope",
    "prune",
    "retained",
]
