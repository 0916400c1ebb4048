"""The leader's housekeeping, off the hot path: state counts folded, retention applied.

Every few seconds (``daemon.fold_every``) the leader folds the state counts PostgreSQL's
triggers append (so ``/healthz`` reads a few rows); every ten minutes it prunes what
``retention:`` lets go (see engine/outbox/retention.py), one batch of a few hundred rows per
transaction in a worker thread, with a pause between batches so that fires and results
waiting for SQLite's write lock go first. A batch waits at most :data:`WRITE_WAIT` for that
lock. Any store error ends the round, logged and counted, and the next round starts over:
pruning never stops sending, and a batch cut short rolls back whole. Only the leader prunes
(the deletes are safe from several instances at once, which ``pushrules outbox prune`` beside
a daemon relies on; one is enough).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Protocol

from engine.outbox.connections import busy_timeout
from engine.outbox.retention import BATCH, KINDS, retained
from engine.rules.project import DaemonConfig, RetentionConfig
from engine.rules.secrets import hide_url_password

log = logging.getLogger("pushrules.retention")

#: Seconds between two folds of the state counts (and between two looks at the prune clock):
#: ``daemon.fold_every``'s default.
FOLD_EVERY: Final = DaemonConfig().fold_every.total_seconds()
#: Seconds between two prune rounds; the first comes one fold after this instance leads.
PRUNE_EVERY: Final = 600.0
#: Seconds between two batches of a round.
PAUSE: Final = 0.05
#: Seconds a batch waits for SQLite's write lock before the round gives up until the next.
WRITE_WAIT: Final = 1.0


class Prunable(Protocol):
    """engine/outbox/store.py's Store, as housekeeping uses it."""

    def fold_counts(self) -> int: ...

    def prune_batch(self, kind: str, keep: timedelta, now: datetime, limit: int = BATCH) -> int: ...


@dataclass(slots=True)
class PruneStatus:
    """The last prune round, for /healthz."""

    last_started_at: datetime | None = None
    last_finished_at: datetime | None = None
    last_pruned: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_error_at: datetime | None = None


class Maintenance:
    """Folds and prunes while ``leading()`` says this instance leads."""

    def __init__(
        self,
        store: Prunable,
        retention: Callable[[], RetentionConfig],
        clock: Callable[[], datetime],
        *,
        on_pruned: Callable[[str, int], None] | None = None,
        on_failed: Callable[[], None] | None = None,
        fold_every: float = FOLD_EVERY,
        prune_every: float = PRUNE_EVERY,
        pause: float = PAUSE,
        batch: int = BATCH,
    ) -> None:
        self._store = store
        self._retention = retention  # read at each round: a reload's new retention applies
        self._clock = clock
        self._on_pruned = on_pruned or (lambda kind, n: None)
        self._on_failed = on_failed or (lambda: None)
        self._fold_every = fold_every
        self._prune_every = prune_every
        self._pause = pause
        self._batch = batch
        self.status = PruneStatus()

    async def run(self, stop: asyncio.Event, leading: Callable[[], bool]) -> None:
        """Until ``stop``; never raises (a bug here must not stop the daemon)."""
        next_round: float | None = None
        while not stop.is_set():
            try:
                if leading():
                    await self.fold()
                    now = time.monotonic()
                    if next_round is None:
                        next_round = now + self._fold_every
                    elif now >= next_round:
                        await self.prune_round(stop)
                        next_round = time.monotonic() + self._prune_every
                else:
                    next_round = None
            except Exception:
                log.exception("housekeeping failed unexpectedly; tried again shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._fold_every)

    async def fold(self) -> None:
        try:
            await asyncio.to_thread(self._fold)
        except Exception as exc:
            log.debug("could not fold the outbox state counts now: %s", _first_line(exc))

    def _fold(self) -> int:
        with busy_timeout(WRITE_WAIT):
            return self._store.fold_counts()

    async def prune_round(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        """One round: each kind batch by batch until nothing is left or the store fails."""
        now = self._clock()
        config = self._retention()
        status = self.status
        status.last_started_at = now
        pruned: dict[str, int] = {}
        for kind in KINDS:
            keep = retained(config, kind)
            if keep is None:
                continue
            pruned[kind] = 0
            while stop is None or not stop.is_set():
                try:
                    n = await asyncio.to_thread(self._prune, kind, keep, now)
                except Exception as exc:
                    status.last_error = f"{kind}: {_first_line(exc)}"
                    status.last_error_at = self._clock()
                    status.last_pruned = pruned
                    self._on_failed()
                    log.warning(
                        "pruning stopped for this round (%s); sending goes on, and the next "
                        "round in %.0f s starts again",
                        status.last_error,
                        self._prune_every,
                    )
                    return pruned
                pruned[kind] += n
                if n:
                    self._on_pruned(kind, n)
                if n < self._batch:
                    break
                await asyncio.sleep(self._pause)
        status.last_finished_at = self._clock()
        status.last_pruned = pruned
        if any(pruned.values()):
            log.info(
                "pruned by retention: %s",
                ", ".join(f"{n} {kind}" for kind, n in pruned.items() if n),
            )
        return pruned

    def _prune(self, kind: str, keep: timedelta, now: datetime) -> int:
        with busy_timeout(WRITE_WAIT):
            return self._store.prune_batch(kind, keep, now, self._batch)


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return hide_url_password(text.splitlines()[0] if text else type(exc).__name__)
