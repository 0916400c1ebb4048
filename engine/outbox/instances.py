"""Instances and leadership: who is alive, whose claims go back or are parked, who leads."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    func,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from engine.outbox.schema import instances, utcnow
from engine.rules.secrets import hide_url_password

if TYPE_CHECKING:
    from engine.outbox.store import Store

log = logging.getLogger("pushrules.store")


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """A registered sender, as the ``instances`` table has it."""

    id: str
    host: str
    pid: int
    started_at: datetime
    alive_until: datetime


@dataclass(frozen=True, slots=True)
class InFlight:
    """A ``sending`` row, as :meth:`Store.reclaim` sees it."""

    id: int
    claimed_by: str
    left: bool
    lease_over: bool


@dataclass(frozen=True, slots=True)
class ReclaimPlan:
    """Claim token -> rows to make due again; (token, fenced on left_at) -> rows to park."""

    requeue: dict[str, list[int]] = field(default_factory=dict)
    park: dict[tuple[str, bool], list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.requeue or self.park)


#: When this process started, at the latest (real time): an instance with our pid registered
#: before it belongs to a previous process.
_PROCESS_STARTED: Final = datetime.now(UTC)
#: Prefix of the advisory lock key of an instance's liveness on PostgreSQL.
INSTANCE_LOCK_PREFIX: Final = "pushrules-instance:"


def claim_owner(claimed_by: str | None) -> str:
    """The instance a claim token belongs to: the part before its last ``#``."""
    if not claimed_by:
        return ""
    owner, sep, _ = claimed_by.rpartition("#")
    return owner if sep else claimed_by


def advisory_key(name: str) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, stable for a name."""
    key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")
    return key - (1 << 63)


def process_info(pid: int) -> tuple[bool, datetime | None]:
    """Whether a process of this id runs on this host (a zombie does not), and when it started
    if the system says (Linux's /proc), so a pid taken again by a later process is told apart."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except OSError:
        return True, None  # someone else's process: it runs
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        if fields[0] == "Z":
            return False, None
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        return True, _boot_time() + timedelta(seconds=ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return True, None


@functools.cache
def _boot_time() -> datetime:
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            if line.startswith("btime "):
                return datetime.fromtimestamp(int(line.split()[1]), UTC)
    raise ValueError("no btime in /proc/stat")


def instance_gone(
    info: InstanceInfo,
    *,
    me: str | None,
    host: str,
    pid: int,
    now: datetime,
    process: Callable[[int], tuple[bool, datetime | None]] = process_info,
    since: datetime = _PROCESS_STARTED,
) -> bool:
    """Whether a SQLite-registered instance is dead.

    On this host its process tells: gone, a zombie, or its pid now another process's (one that
    started after the instance registered; ours, if the instance registered before this process
    started, as after a container restart that keeps pid 1). Elsewhere, or when the system
    cannot tell, its heartbeat (``alive_until``, real time) ran out.
    """
    if info.id == me:
        return False
    if info.host == host:
        if info.pid == pid:
            return info.started_at < since
        running, started = process(info.pid)
        if not running:
            return True
        if started is not None:  # btime has whole seconds: a second of slack
            return started > info.started_at + timedelta(seconds=1)
    return info.alive_until < now


def _expired(row: Any, now: datetime) -> bool:
    return row.claimed_until is not None and row.claimed_until < now


def plan_reclaim(flights: Iterable[InFlight], registered: set[str], gone: set[str]) -> ReclaimPlan:
    """Which in-flight rows go back to pending and which are parked, by claim.

    A registered claimer records departures, so its rows that never left are safe to send
    again; an unregistered one (an older pushrules) did not, so its rows are all parked.
    """
    plan = ReclaimPlan()
    for f in flights:
        owner = claim_owner(f.claimed_by)
        if not (owner in gone or f.lease_over):
            continue
        if owner not in registered and owner not in gone:
            plan.park.setdefault((f.claimed_by, False), []).append(f.id)
        elif f.left:
            plan.park.setdefault((f.claimed_by, True), []).append(f.id)
        else:
            plan.requeue.setdefault(f.claimed_by, []).append(f.id)
    return plan


def _parked_message(owner: str, gone: bool) -> str:
    if gone:
        return (
            f"the instance sending it ({owner}) stopped after handing the request to the "
            "network: Accengage may or may not have it; check whether the push arrived, then "
            "resend or drop"
        )
    return (
        "the lease ran out while the request was in flight (the process that sent it died "
        "or lost the database): Accengage may or may not have it; check, then resend or drop"
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return hide_url_password(text.splitlines()[0] if text else type(exc).__name__)


class Leadership:
    """One leader among daemons sharing a store: it alone runs schedules and polls feeds.

    On PostgreSQL a session advisory lock, held on a connection of its own for as long as the
    leader lives: when its process dies the connection closes and another instance takes over
    at its next try. The lock is named after the store's schema too: advisory locks belong to
    the whole database, and two outboxes in two schemas of one database are two deployments,
    each with its own leader. SQLite serves one host, so every instance is the leader there (a
    second one on the same file would still send each fire once, thanks to the idempotency keys).
    """

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = name
        self._key: int | None = None  # known once connected: it depends on the schema
        self._conn: Connection | None = None
        self.held = store.dialect != "postgresql"

    def try_acquire(self) -> bool:
        """Become the leader if nobody is; True while this instance leads."""
        if self.held:
            return self._alive()
        try:
            conn = self._store.engine.connect()
        except SQLAlchemyError as exc:  # a store that cannot be reached cannot be led from
            log.warning("cannot try for the scheduler leadership now: %s", _first_line(exc))
            return False
        try:
            if self._key is None:
                schema = conn.execute(select(func.current_schema())).scalar()
                self._key = advisory_key(f"{schema}/{self._name}")
            got = bool(conn.execute(select(func.pg_try_advisory_lock(self._key))).scalar())
            conn.commit()
        except SQLAlchemyError as exc:
            conn.close()
            log.warning("cannot try for the scheduler leadership now: %s", _first_line(exc))
            return False
        if got:
            self._conn = conn
            self.held = True
        else:
            conn.close()
        return got

    def _alive(self) -> bool:
        if self._conn is None:
            return True
        try:
            self._conn.execute(select(1))
            self._conn.commit()
            return True
        except SQLAlchemyError:
            self._conn = None
            self.held = False
            return False

    def release(self) -> None:
        if self._conn is not None:
            try:
                self._conn.execute(select(func.pg_advisory_unlock(self._key)))  # set: connected
                self._conn.commit()
            finally:
                self._conn.close()
                self._conn = None
        self.held = self._store.dialect != "postgresql"


class Liveness:
    """One instance's sign of life, so the others act on its rows at once when it dies.

    Registered in the ``instances`` table by :meth:`beat`, which the dispatcher calls every
    few seconds. On PostgreSQL the instance also holds a session advisory lock of its own on a
    connection kept open: when its process dies the connection closes, the lock is free, and
    the next :meth:`Store.reclaim` of any instance sees it (TCP keepalives bound the wait when
    a whole host vanishes). On SQLite, one host's file, the row's host and pid tell (a pid that
    no longer runs is dead), with ``alive_until`` (``now + ttl`` at each beat) for the rest.
    Mistaking a live instance for dead costs no duplicate: every move is fenced to the claim.
    """

    def __init__(self, store: Store, instance: str, ttl: timedelta) -> None:
        self._store = store
        self.instance = instance
        self._ttl = ttl
        self._key = advisory_key(INSTANCE_LOCK_PREFIX + instance)
        self._conn: Connection | None = None
        self._started: datetime | None = None

    def beat(self) -> bool:
        """Register, or say again that this instance lives; False if it cannot (yet).

        Real time, not the daemon's clock: liveness is about processes, not fire times."""
        if self._store.dialect == "postgresql" and not self._locked():
            return False
        now = utcnow()
        self._started = self._started or now
        values = {
            "id": self.instance,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started,
            "alive_until": now + self._ttl,
        }
        stmt = self._store._insert(instances).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["id"], set_={"alive_until": values["alive_until"]}
        )
        with self._store.engine.begin() as conn:
            conn.execute(stmt)
        return True

    def _locked(self) -> bool:
        """Hold the instance's advisory lock, taking it again on a new connection if lost."""
        if self._conn is not None:
            try:
                self._conn.execute(select(1))
                self._conn.commit()
                return True
            except SQLAlchemyError:
                self._drop_connection()
        conn = self._store.engine.connect()
        try:
            for setting in ("tcp_keepalives_idle = 5", "tcp_keepalives_interval = 2"):
                conn.exec_driver_sql(f"SET {setting}")
            conn.exec_driver_sql("SET tcp_keepalives_count = 3")
            got = bool(conn.execute(select(func.pg_try_advisory_lock(self._key))).scalar())
            conn.commit()
        except SQLAlchemyError:
            conn.invalidate()
            conn.close()
            raise
        if not got:  # an old session of ours still holds it: try again at the next beat
            conn.close()
            return False
        self._conn = conn
        return True

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.invalidate()  # closes the session, which frees the lock
                self._conn.close()
            self._conn = None

    def end(self) -> None:
        """Unregister (a clean stop): rows are all given back or written by now."""
        try:
            with self._store.engine.begin() as conn:
                conn.execute(instances.delete().where(instances.c.id == self.instance))
        finally:
            self._drop_connection()
