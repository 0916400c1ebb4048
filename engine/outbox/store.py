"""The outbox: every compiled request is a row before anything is sent.

One code path (SQLAlchemy Core) for SQLite, the default, and PostgreSQL, for several instances
sharing one outbox. A fire's requests are written in one transaction under a unique
``(rule, idem_key, chunk)`` key, so a repeated fire inserts nothing; the dispatcher then claims
due rows under a lease, sends them and records each attempt. A row whose process died while its
request was in flight is parked as ``in_doubt`` for a person: the store never resends it alone.

States and moves (``docs`` and the dispatcher rely on these):

    held -----release----> pending <---resend--- in_doubt | failed | dead | dropped
    pending | retrying --hold--> held
    pending | retrying (due, rule not paused) --claim--> sending
    sending --result--> sent | retrying | failed | dead | in_doubt
    sending, never handed to the network --its instance died, or lease expired (reclaim)-->
        pending | retrying
    sending, handed to the network (left_at set) --its instance died, or lease expired
        (reclaim)--> in_doubt
    in_doubt --the same claim's answer, arriving late--> sent | retrying | failed | dead
    sending --unclaim (graceful stop, never sent)--> pending | retrying
    held | pending | retrying | in_doubt | failed | dead --drop--> dropped

Timestamps are timezone-aware UTC in Python and naive UTC in the database, which both dialects
store and compare alike. The password never reaches the store: :meth:`Store.enqueue` refuses a
body that carries the ``user`` object.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    event,
    func,
    literal_column,
    make_url,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from engine.errors import PushrulesError

DEFAULT_URL: Final = "sqlite:///pushrules.db"
SCHEMA_VERSION: Final = 2

HELD, PENDING, SENDING, SENT = "held", "pending", "sending", "sent"
RETRYING, FAILED, DEAD, IN_DOUBT, DROPPED = "retrying", "failed", "dead", "in_doubt", "dropped"
STATES: Final = (HELD, PENDING, SENDING, SENT, RETRYING, FAILED, DEAD, IN_DOUBT, DROPPED)
#: States the dispatcher may claim once ``next_attempt_at`` has come.
DUE_STATES: Final = (PENDING, RETRYING)
#: States a result may be written over: ``in_doubt`` too, when the lease ran out while the
#: request was still in flight and its answer came after all (a known outcome beats a doubt).
RESULT_STATES: Final = (SENDING, IN_DOUBT)
RESENDABLE: Final = (IN_DOUBT, FAILED, DEAD, DROPPED)
DROPPABLE: Final = (HELD, PENDING, RETRYING, IN_DOUBT, FAILED, DEAD)
#: States a person looks at.
ATTENTION_STATES: Final = (HELD, IN_DOUBT, FAILED, DEAD)
#: States a result may set.
RESULT_TARGETS: Final = (SENT, RETRYING, FAILED, DEAD, IN_DOUBT)

MAX_KEY_LENGTH: Final = 1000
#: Every PostgreSQL instance creating the schema at once takes this advisory lock first.
_SCHEMA_LOCK: Final = 0x70757368  # "push"


def _states(*states: str) -> ColumnElement[bool]:
    """``state IN ('a', 'b')`` with literals, not parameters: the planners (SQLite's above all)
    only use a partial index whose WHERE they can match, and it works within executemany."""
    return outbox.c.state.in_([literal_column(f"'{s}'") for s in states])


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC in Python, naive UTC in the database: portable, sortable, comparable."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the store: pass an aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite's rowid must be INTEGER
metadata = MetaData()

schema_version_table = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", UTCDateTime, nullable=False),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("rule", String(255), nullable=False),
    Column("idem_key", Text, nullable=False),
    Column("chunk", Integer, nullable=False),
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=False),
    Column("claimed_by", String(255)),
    Column("claimed_until", UTCDateTime),
    Column("last_http_status", Integer),
    Column("return_code", Integer),
    Column("return_label", Text),
    Column("message_id", String(255)),
    Column("last_error", Text),
    Column("sent_at", UTCDateTime),
    # When the claim's request was about to be handed to the network (committed before the
    # bytes leave); NULL while claimed but not sent, so a dead sender's row can go back to
    # pending instead of in_doubt. Reset by every claim.
    Column("left_at", UTCDateTime),
    UniqueConstraint("rule", "idem_key", "chunk", name="uq_outbox_fire"),
    sqlite_autoincrement=True,  # ids are never reused, even after the newest row is pruned
)
# Claim reads due rows oldest first: a partial index keeps that cheap with a large history.
Index(
    "ix_outbox_due",
    outbox.c.next_attempt_at,
    outbox.c.id,
    sqlite_where=_states(*DUE_STATES),
    postgresql_where=_states(*DUE_STATES),
)
Index(
    "ix_outbox_sending",
    outbox.c.claimed_until,
    sqlite_where=_states(SENDING),
    postgresql_where=_states(SENDING),
)
# Rows that need a person, for the operator's lists. Partial on purpose: an index on every
# state would tempt SQLite's planner (before ANALYZE) away from ix_outbox_due for claims.
Index(
    "ix_outbox_attention",
    outbox.c.state,
    outbox.c.id,
    sqlite_where=_states(*ATTENTION_STATES),
    postgresql_where=_states(*ATTENTION_STATES),
)

attempts_table = Table(
    "attempts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("outbox_id", _ID, ForeignKey("outbox.id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("http_status", Integer),
    Column("return_code", Integer),
    Column("return_label", Text),
    Column("message_id", String(255)),
    Column("error", Text),
    Column("outcome", String(16), nullable=False),
    Column("worker", String(255)),
    Index("ix_attempts_outbox", "outbox_id", "id"),
    sqlite_autoincrement=True,
)

seen_keys = Table(
    "seen_keys",
    metadata,
    Column("scope", String(255), primary_key=True),
    Column("key", String(MAX_KEY_LENGTH), primary_key=True),
    Column("seen_at", UTCDateTime, nullable=False),
)

pauses = Table(
    "pauses",
    metadata,
    Column("rule", String(255), primary_key=True),
    Column("until", UTCDateTime),
    Column("paused_at", UTCDateTime, nullable=False),
)

#: Instants the daemon remembers by name, e.g. ("schedule", rule): considered up to when.
marks = Table(
    "marks",
    metadata,
    Column("scope", String(255), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("at", UTCDateTime, nullable=False),
)

#: Events that no rule took (none listened, or the rule was disabled): kept with why, so an
#: event answered 202 is always somewhere (the outbox, or here) and can be fired again.
unmatched_events = Table(
    "unmatched_events",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("event", String(255), nullable=False),
    Column("key", String(MAX_KEY_LENGTH), nullable=False, unique=True),
    Column("received_at", UTCDateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Index("ix_unmatched_received", "received_at"),
    sqlite_autoincrement=True,
)


@dataclass(frozen=True, slots=True)
class UnmatchedEvent:
    id: int
    event: str
    key: str
    received_at: datetime
    reason: str
    payload: str  # the event's JSON, as received


#: Processes that claim rows, and their sign of life: a row claimed by a dead one is taken back
#: (or parked) at once rather than when its lease runs out. On SQLite ``host``/``pid`` and
#: ``alive_until`` (a heartbeat) tell; on PostgreSQL an advisory lock held by the instance.
instances = Table(
    "instances",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("alive_until", UTCDateTime, nullable=False),
)

# -- statements on the hot path, built once (building one costs more than running it) --------

_ACTIVE_PAUSES = select(pauses.c.rule).where(
    or_(pauses.c.until.is_(None), pauses.c.until > bindparam("now", type_=UTCDateTime))
)


def _claim_statement(*, by_ids: bool, paused: bool) -> Any:
    due = select(outbox.c.id).where(_states(*DUE_STATES))
    if by_ids:
        due = due.where(outbox.c.id.in_(bindparam("ids", expanding=True)))
    else:
        due = due.where(outbox.c.next_attempt_at <= bindparam("now", type_=UTCDateTime))
    if paused:
        due = due.where(outbox.c.rule.not_in(bindparam("paused", expanding=True)))
    due = (
        due.order_by(outbox.c.next_attempt_at, outbox.c.id)
        .limit(bindparam("limit", type_=Integer))
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite holds the write lock instead
    )
    return (
        update(outbox)
        .where(outbox.c.id.in_(due))
        .values(
            state=SENDING,
            attempts=outbox.c.attempts + 1,
            claimed_by=bindparam("token", type_=String),
            claimed_until=bindparam("until", type_=UTCDateTime),
            updated_at=bindparam("now", type_=UTCDateTime),
            left_at=None,
        )
        .returning(*outbox.columns)
    )


_CLAIM_DUE = _claim_statement(by_ids=False, paused=False)
_CLAIM_DUE_PAUSED = _claim_statement(by_ids=False, paused=True)
_CLAIM_IDS = _claim_statement(by_ids=True, paused=False)
_CLAIM_IDS_PAUSED = _claim_statement(by_ids=True, paused=True)

# The attempt's number is the row's count at claim time, read in the same transaction.
_INSERT_ATTEMPT = attempts_table.insert().values(
    outbox_id=bindparam("b_id"),
    number=select(outbox.c.attempts).where(outbox.c.id == bindparam("b_id")).scalar_subquery(),
)
_RECORD_VALUES = {
    "state": bindparam("b_state", type_=String),
    "next_attempt_at": func.coalesce(
        bindparam("b_next", type_=UTCDateTime), outbox.c.next_attempt_at
    ),
    "claimed_until": None,
    "last_http_status": bindparam("b_status", type_=Integer),
    "return_code": bindparam("b_code", type_=Integer),
    "return_label": bindparam("b_label", type_=Text),
    "message_id": func.coalesce(bindparam("b_msgid", type_=String), outbox.c.message_id),
    "last_error": bindparam("b_error", type_=Text),
    "sent_at": func.coalesce(bindparam("b_sent", type_=UTCDateTime), outbox.c.sent_at),
    "attempts": outbox.c.attempts - bindparam("b_uncount", type_=Integer),
    "updated_at": bindparam("b_now", type_=UTCDateTime),
}
_RECORD = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"), _states(*RESULT_STATES))
    .values(_RECORD_VALUES)
)
_RECORD_FENCED = _RECORD.where(outbox.c.claimed_by == bindparam("b_claim", type_=String))


def _add_left_at(conn: Connection) -> None:
    """1 -> 2: ``outbox.left_at`` (the ``instances`` table is new, made by create_all)."""
    type_ = "TIMESTAMP WITHOUT TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    conn.exec_driver_sql(f"ALTER TABLE outbox ADD COLUMN left_at {type_}")


_IDS = bindparam("ids", expanding=True)
_TOKEN = bindparam("token", type_=String)
_NOW = bindparam("now", type_=UTCDateTime)
_MARK_LEAVING = (
    update(outbox)
    .where(outbox.c.id.in_(_IDS), outbox.c.claimed_by == _TOKEN, _states(SENDING))
    .values(left_at=_NOW)
    .returning(outbox.c.id)
)
_IN_FLIGHT = select(
    outbox.c.id, outbox.c.claimed_by, outbox.c.left_at, outbox.c.claimed_until
).where(_states(SENDING))
_REQUEUE = (
    update(outbox)
    .where(
        outbox.c.id.in_(_IDS),
        outbox.c.claimed_by == _TOKEN,
        _states(SENDING),
        outbox.c.left_at.is_(None),
    )
    .values(
        state=case((outbox.c.attempts > 1, RETRYING), else_=PENDING),
        attempts=outbox.c.attempts - 1,
        claimed_until=None,
        updated_at=_NOW,
    )
    .returning(outbox.c.id)
)
_PARK = (
    update(outbox)
    .where(outbox.c.id.in_(_IDS), outbox.c.claimed_by == _TOKEN, _states(SENDING))
    .values(
        state=IN_DOUBT,
        claimed_until=None,
        last_error=bindparam("message", type_=Text),
        updated_at=_NOW,
    )
    .returning(outbox.c.id, outbox.c.attempts)
)
_PARK_LEFT = _PARK.where(outbox.c.left_at.is_not(None))

#: Migrations from version N to N + 1, run in order inside the schema transaction.
MIGRATIONS: dict[int, Any] = {1: _add_left_at}


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one HTTP attempt observed; the dispatcher builds it, the store keeps it."""

    started_at: datetime
    duration_s: float
    http_status: int | None = None
    return_code: int | None = None
    return_label: str | None = None
    message_id: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRow:
    id: int
    number: int
    started_at: datetime
    duration_ms: float
    http_status: int | None
    return_code: int | None
    return_label: str | None
    message_id: str | None
    error: str | None
    outcome: str
    worker: str | None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    rule: str
    idem_key: str
    chunk: int
    url: str
    body: str = field(repr=False)
    state: str
    attempts: int
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime
    claimed_by: str | None
    claimed_until: datetime | None
    last_http_status: int | None
    return_code: int | None
    return_label: str | None
    message_id: str | None
    last_error: str | None
    sent_at: datetime | None
    left_at: datetime | None = None
    attempt_log: tuple[AttemptRow, ...] = ()

    def request(self) -> dict[str, Any]:
        """The stored request body, without ``user``."""
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    ids: list[int]
    created: bool


@dataclass(frozen=True, slots=True)
class Fire:
    """One fire for :meth:`Store.enqueue_many`: all its requests go in or none do."""

    rule: str
    idem_key: str
    requests: Sequence[tuple[str, Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class ResultUpdate:
    """One attempt's outcome for :meth:`Store.record_results`.

    ``claimed_by`` fences the write to the claim that made the attempt, so a late answer
    cannot overwrite a row an operator has resent since. ``count_attempt=False`` gives the
    attempt back (nothing was sent: a missing secret), so it does not bring the row closer to
    ``dead``.
    """

    row_id: int
    attempt: AttemptResult
    new_state: str
    next_attempt_at: datetime | None = None
    claimed_by: str | None = None
    count_attempt: bool = True
    worker: str | None = None


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """What :meth:`Store.reclaim` did: rows parked ``in_doubt``, rows made due again."""

    parked: list[int]
    requeued: list[int]


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


class TransitionError(PushrulesError, ValueError):
    """An operator action that the row's state does not allow; the message says why."""


def encode_body(body: Mapping[str, Any]) -> str:
    """The stored JSON text of a request body; refuses one that carries credentials."""
    if not isinstance(body, Mapping) or set(body) != {"sendInstantMessage"}:
        raise ValueError('a request body must be {"sendInstantMessage": {...}} and nothing else')
    inner = body["sendInstantMessage"]
    if not isinstance(inner, Mapping):
        raise ValueError("sendInstantMessage must be an object")
    if "user" in inner:
        raise ValueError(
            "a request body given to the outbox carries the `user` object: credentials are "
            "added at send time and must never be stored; remove `user` from the body"
        )
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _check_key(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} is {len(value)} characters long; at most {MAX_KEY_LENGTH}")


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (UTC)")
    return value


def _outbox_row(m: RowMapping, log: tuple[AttemptRow, ...] = ()) -> OutboxRow:
    return OutboxRow(**{c.name: m[c.name] for c in outbox.columns}, attempt_log=log)


def _attempt_row(m: RowMapping) -> AttemptRow:
    return AttemptRow(
        id=m["id"],
        number=m["number"],
        started_at=m["started_at"],
        duration_ms=m["duration_ms"],
        http_status=m["http_status"],
        return_code=m["return_code"],
        return_label=m["return_label"],
        message_id=m["message_id"],
        error=m["error"],
        outcome=m["outcome"],
        worker=m["worker"],
    )


#: Milliseconds a SQLite writer waits for the write lock unless :func:`busy_timeout` says less.
DEFAULT_BUSY_MS: Final = 15000
_BUSY_MS: ContextVar[int | None] = ContextVar("pushrules_busy_ms", default=None)


@contextlib.contextmanager
def busy_timeout(seconds: float) -> Iterator[None]:
    """Store calls made inside wait at most ``seconds`` for SQLite's write lock, then raise
    "database is locked" (see :func:`is_busy`) instead of stalling for the default 15 s.

    A context variable, so it holds for this thread or task only (``asyncio.to_thread``
    carries it into the thread). No effect on PostgreSQL, whose writers lock rows, not files.
    """
    token = _BUSY_MS.set(max(1, int(seconds * 1000)))
    try:
        yield
    finally:
        _BUSY_MS.reset(token)


def is_busy(exc: BaseException) -> bool:
    """True if SQLite refused to start a write because another connection held the lock:
    nothing was done, so the call can be made again as it was."""
    return (
        isinstance(exc, OperationalError)
        and "database is locked" in str(exc.orig)
        and str(exc.statement or "").startswith("BEGIN")
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook start transactions (BEGIN IMMEDIATE), not the driver.
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={DEFAULT_BUSY_MS}")
    # FULL: a claim is on disk before its request leaves, so a power cut cannot make a sent
    # row pending again. Results are written in batches, which keeps the fsyncs few.
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock at BEGIN: a claim's read and its update see the same
    # snapshot, and concurrent writers wait (busy_timeout) instead of failing with
    # SQLITE_BUSY_SNAPSHOT. A reader takes no lock, so an operator's ``history`` never holds up
    # the dispatcher.
    read_only = conn.get_execution_options().get(_READ_ONLY, False)
    if not read_only:
        _apply_busy_timeout(conn)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _apply_busy_timeout(conn: Connection) -> None:
    """Set the connection's busy timeout to what :func:`busy_timeout` asks (or the default),
    only when it differs from what this pooled connection has already."""
    wanted = _BUSY_MS.get() or DEFAULT_BUSY_MS
    info = conn.connection.info
    if info.get("busy_ms", DEFAULT_BUSY_MS) != wanted:
        conn.exec_driver_sql(f"PRAGMA busy_timeout={wanted}")
        info["busy_ms"] = wanted


_READ_ONLY: Final = "pushrules_read_only"


class Store:
    """The outbox and its few companions (attempts, seen keys, pauses) in one database."""

    def __init__(self, url: str = DEFAULT_URL, *, echo: bool = False) -> None:
        self.url = url
        if make_url(url).get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError(
                f"store {url!r}: only sqlite:///FILE and postgresql+psycopg://... are supported"
            )
        self.engine: Engine = self._make_engine(url, echo)
        self.dialect = self.engine.dialect.name
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        self._create_schema()

    @staticmethod
    def _make_engine(url: str, echo: bool) -> Engine:
        if url.startswith("sqlite"):
            if url in {"sqlite://", "sqlite:///:memory:"}:
                raise ValueError("the outbox needs a file: use sqlite:///path/to/pushrules.db")
            engine = create_engine(url, echo=echo, connect_args={"timeout": 15})
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_begin)
            return engine
        return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=8, max_overflow=8)

    def close(self) -> None:
        self.engine.dispose()

    def _read(self) -> Connection:
        """A connection for reading only (on SQLite: a plain BEGIN, no write lock)."""
        return self.engine.connect().execution_options(**{_READ_ONLY: True})

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    # -- schema ------------------------------------------------------------------------------

    def _create_schema(self) -> None:
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
            metadata.create_all(conn, checkfirst=True)
            current = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
            if current is None:
                conn.execute(
                    schema_version_table.insert().values(
                        version=SCHEMA_VERSION, applied_at=utcnow()
                    )
                )
                return
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the store's schema is version {current}, newer than this pushrules "
                    f"understands ({SCHEMA_VERSION}): upgrade pushrules"
                )
            for version in range(current, SCHEMA_VERSION):
                MIGRATIONS[version](conn)
                conn.execute(
                    schema_version_table.insert().values(version=version + 1, applied_at=utcnow())
                )

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.max(schema_version_table.c.version))).scalar_one())

    # -- enqueue -----------------------------------------------------------------------------

    def enqueue(
        self,
        rule: str,
        idem_key: str,
        requests: Sequence[tuple[str, Mapping[str, Any]]],
        *,
        now: datetime,
        state: str = PENDING,
        not_before: datetime | None = None,
    ) -> EnqueueResult:
        """Write all requests of one fire in one transaction, or find the fire already there."""
        return self.enqueue_many(
            [Fire(rule, idem_key, requests)], now=now, state=state, not_before=not_before
        )[0]

    def enqueue_many(
        self,
        fires: Sequence[Fire],
        *,
        now: datetime,
        state: str = PENDING,
        not_before: datetime | None = None,
    ) -> list[EnqueueResult]:
        """Several fires in one transaction (throughput); each is created whole or found whole.

        Chunk 0 of a fire is its lock: ``INSERT .. ON CONFLICT DO NOTHING`` on it decides, under
        the unique constraint, which of several concurrent inserters owns the fire; only the
        owner inserts the other chunks, so a fire is never half new.
        """
        _aware(now, "now")
        if state not in (PENDING, HELD):
            raise ValueError(f"a new row is pending or held, not {state!r}")
        due = _aware(not_before, "not_before") if not_before is not None else now
        prepared: list[tuple[Fire, list[dict[str, Any]]]] = []
        for fire in fires:
            _check_key("rule", fire.rule)
            _check_key("idem_key", fire.idem_key)
            if not fire.requests:
                raise ValueError(f"fire {fire.rule}/{fire.idem_key} has no request")
            rows = []
            for chunk, (url, body) in enumerate(fire.requests):
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    raise ValueError(f"request URL {url!r} must start with http:// or https://")
                rows.append(
                    {
                        "rule": fire.rule,
                        "idem_key": fire.idem_key,
                        "chunk": chunk,
                        "url": url,
                        "body": encode_body(body),
                        "state": state,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                        "next_attempt_at": due,
                    }
                )
            prepared.append((fire, rows))
        # The same fire twice in one call (two POSTs with one Idempotency-Key, coalesced into
        # one batch) is one fire: the first is written, the others find it, as they would had
        # they come a moment later.
        firsts: dict[tuple[str, str], int] = {}
        for index, (fire, _) in enumerate(prepared):
            firsts.setdefault((fire.rule, fire.idem_key), index)
        unique = [prepared[index] for index in firsts.values()]

        # The same order in every transaction: two concurrent calls sharing fires then wait for
        # each other on PostgreSQL instead of deadlocking.
        ordered = sorted(unique, key=lambda p: (p[0].rule, p[0].idem_key))
        with self.engine.begin() as conn:
            heads = [rows[0] for _, rows in ordered]
            stmt = (
                self._insert(outbox)
                .on_conflict_do_nothing(index_elements=["rule", "idem_key", "chunk"])
                .returning(outbox.c.rule, outbox.c.idem_key, outbox.c.id)
            )
            won = {(r.rule, r.idem_key): r.id for r in conn.execute(stmt, heads)} if heads else {}
            tails = [
                row
                for fire, rows in unique
                if (fire.rule, fire.idem_key) in won
                for row in rows[1:]
            ]
            tail_ids: dict[tuple[str, str, int], int] = {}
            if tails:
                ins = outbox.insert().returning(
                    outbox.c.rule, outbox.c.idem_key, outbox.c.chunk, outbox.c.id
                )
                for r in conn.execute(ins, tails):
                    tail_ids[(r.rule, r.idem_key, r.chunk)] = r.id
            found: dict[tuple[str, str], EnqueueResult] = {}
            for fire, rows in unique:
                key = (fire.rule, fire.idem_key)
                if key in won:
                    ids = [won[key]] + [tail_ids[(*key, row["chunk"])] for row in rows[1:]]
                    found[key] = EnqueueResult(ids, True)
                else:
                    existing = conn.execute(
                        select(outbox.c.id)
                        .where(outbox.c.rule == fire.rule, outbox.c.idem_key == fire.idem_key)
                        .order_by(outbox.c.chunk)
                    ).scalars()
                    found[key] = EnqueueResult(list(existing), False)
        results: list[EnqueueResult] = []
        for index, (fire, _) in enumerate(prepared):
            key = (fire.rule, fire.idem_key)
            first = found[key]
            # Only the first occurrence created the fire; a repeat is a duplicate of it.
            results.append(first if firsts[key] == index else EnqueueResult(first.ids, False))
        return results

    # -- claim -------------------------------------------------------------------------------

    def _claim(
        self,
        worker: str,
        now: datetime,
        lease: timedelta,
        *,
        limit: int,
        ids: Sequence[int] | None,
    ) -> list[OutboxRow]:
        _aware(now, "now")
        if limit <= 0 or (ids is not None and not ids):
            return []
        params: dict[str, Any] = {
            "now": now,
            "limit": limit,
            "token": f"{worker}#{secrets.token_hex(4)}",  # fences results to this very claim
            "until": now + lease,
        }
        with self.engine.begin() as conn:
            paused = set(conn.execute(_ACTIVE_PAUSES, {"now": now}).scalars())
            if "*" in paused:
                return []
            params["paused"] = sorted(paused)
            if ids is None:
                stmt = _CLAIM_DUE_PAUSED if paused else _CLAIM_DUE
            else:
                stmt = _CLAIM_IDS_PAUSED if paused else _CLAIM_IDS
                params["ids"] = list(ids)
            rows = [_outbox_row(m) for m in conn.execute(stmt, params).mappings()]
        rows.sort(key=lambda r: (r.next_attempt_at, r.id))
        return rows

    def claim(self, worker: str, limit: int, now: datetime, lease: timedelta) -> list[OutboxRow]:
        """Move up to ``limit`` due rows to ``sending`` under a lease, oldest first.

        Rows of paused rules stay where they are. Each claimed row's ``attempts`` already counts
        the attempt about to be made, so a crash mid-request still counts.
        """
        return self._claim(worker, now, lease, limit=limit, ids=None)

    def claim_ids(
        self, worker: str, ids: Sequence[int], now: datetime, lease: timedelta
    ) -> list[OutboxRow]:
        """Claim these rows if they are pending or retrying, due or not (``send`` / ``fire``)."""
        return self._claim(worker, now, lease, limit=len(ids), ids=ids)

    def unclaim(self, ids: Sequence[int], claimed_by: str, *, now: datetime | None = None) -> int:
        """Give back claimed rows that were never sent (a graceful stop)."""
        if not ids:
            return 0
        with self.engine.begin() as conn:
            res = conn.execute(
                update(outbox)
                .where(
                    outbox.c.id.in_(list(ids)),
                    outbox.c.state == SENDING,
                    outbox.c.claimed_by == claimed_by,
                )
                .values(
                    state=case((outbox.c.attempts > 1, RETRYING), else_=PENDING),
                    attempts=outbox.c.attempts - 1,
                    claimed_until=None,
                    updated_at=now or utcnow(),
                )
            )
            return res.rowcount

    # -- results -----------------------------------------------------------------------------

    def record_result(
        self,
        row_id: int,
        attempt: AttemptResult,
        new_state: str,
        next_attempt_at: datetime | None = None,
        *,
        claimed_by: str | None = None,
        count_attempt: bool = True,
        worker: str | None = None,
    ) -> bool:
        """Write one attempt and the row's new state in one transaction; False if fenced out."""
        update_ = ResultUpdate(
            row_id, attempt, new_state, next_attempt_at, claimed_by, count_attempt, worker
        )
        return self.record_results([update_]) == 1

    def record_results(self, updates: Sequence[ResultUpdate]) -> int:
        """Write many results in one transaction; returns how many rows took their new state.

        Every attempt goes into the history; a row whose claim is no longer the one that made
        the attempt (resent and claimed again meanwhile) keeps its state.
        """
        if not updates:
            return 0
        history: list[dict[str, Any]] = []
        fenced: list[dict[str, Any]] = []
        unfenced: list[dict[str, Any]] = []
        for u in updates:
            if u.new_state not in RESULT_TARGETS:
                raise ValueError(f"a result cannot move a row to {u.new_state!r}")
            if u.new_state == RETRYING and u.next_attempt_at is None:
                raise ValueError("a retrying row needs next_attempt_at")
            a = u.attempt
            _aware(a.started_at, "attempt.started_at")
            finished = a.started_at + timedelta(seconds=a.duration_s)
            history.append(
                {
                    "b_id": u.row_id,
                    "started_at": a.started_at,
                    "duration_ms": round(a.duration_s * 1000.0, 3),
                    "http_status": a.http_status,
                    "return_code": a.return_code,
                    "return_label": a.return_label,
                    "message_id": a.message_id,
                    "error": a.error,
                    "outcome": u.new_state,
                    "worker": u.worker or (u.claimed_by or "").split("#")[0] or None,
                }
            )
            params = {
                "b_id": u.row_id,
                "b_claim": u.claimed_by,
                "b_state": u.new_state,
                "b_next": u.next_attempt_at if u.new_state == RETRYING else None,
                "b_status": a.http_status,
                "b_code": a.return_code,
                "b_label": a.return_label,
                "b_msgid": a.message_id,
                "b_error": a.error,
                "b_sent": finished if u.new_state == SENT else None,
                "b_uncount": 0 if u.count_attempt else 1,
                "b_now": finished,
            }
            (fenced if u.claimed_by is not None else unfenced).append(params)

        applied = 0
        with self.engine.begin() as conn:
            conn.execute(_INSERT_ATTEMPT, history)
            if fenced:
                applied += self._update_many(conn, _RECORD_FENCED, fenced)
            if unfenced:
                applied += self._update_many(conn, _RECORD, unfenced)
        return applied

    def _update_many(self, conn: Connection, stmt: Any, params: list[dict[str, Any]]) -> int:
        if len(params) == 1 or not self.engine.dialect.supports_sane_multi_rowcount:
            return sum(conn.execute(stmt, p).rowcount for p in params)
        return conn.execute(stmt, params).rowcount

    def mark_leaving(self, claims: Mapping[str, Sequence[int]], now: datetime) -> set[int]:
        """Record, durably, that these claimed rows' requests are about to leave.

        ``claims`` maps a claim token to its rows. Returns the ids still held by that claim: only
        those may be sent. A row taken back meanwhile (its instance deemed dead) is not marked,
        so it is never sent by two instances. One transaction for the lot: the dispatcher
        group-commits the requests it is about to send together.
        """
        _aware(now, "now")
        marked: set[int] = set()
        with self.engine.begin() as conn:
            for token, ids in claims.items():
                if ids:
                    params = {"ids": list(ids), "token": token, "now": now}
                    marked.update(conn.execute(_MARK_LEAVING, params).scalars())
        return marked

    def liveness(self, instance: str, ttl: timedelta = timedelta(seconds=15)) -> Liveness:
        """This process's sign of life for the others sharing the store (see Liveness)."""
        return Liveness(self, instance, ttl)

    def recover(self, now: datetime) -> list[int]:
        """:meth:`reclaim` for callers that only want the ids parked ``in_doubt``."""
        return self.reclaim(now).parked

    def reclaim(
        self, now: datetime, *, me: str | None = None, stopping: str | None = None
    ) -> Reclaimed:
        """Take back the rows of senders that died, and of leases that ran out.

        A ``sending`` row is acted on when the instance that claimed it is registered and gone
        (see :class:`Liveness`), or when its lease ran out. If its request was never handed to
        the network (no ``left_at``) it goes back to pending (or retrying), its attempt given
        back: nothing was sent, so sending it is safe. Otherwise, or if its claimer never
        registered (so never recorded departures), it is parked ``in_doubt``: whether
        Accengage got it is unknown, so a person decides (``resend`` or ``drop``). ``me`` is the
        caller's own instance, never deemed gone; ``stopping`` one that is closing down, whose
        rows still ``sending`` (abandoned requests) are settled now. Every write is fenced to
        the claim that was read, so two instances reclaiming at once, or a sender deemed dead by
        mistake, cannot make a row be sent twice.
        """
        _aware(now, "now")
        with self._read() as conn:
            flights = [
                InFlight(r.id, r.claimed_by or "", r.left_at is not None, _expired(r, now))
                for r in conn.execute(_IN_FLIGHT)
            ]
            known = [InstanceInfo(**m) for m in conn.execute(select(instances)).mappings()]
            gone = self._gone(conn, known, me, now)
        if stopping is not None:
            gone.add(stopping)
        plan = plan_reclaim(flights, {i.id for i in known}, gone)
        if not plan and not gone:
            return Reclaimed([], [])
        requeued: list[int] = []
        parked: list[int] = []
        with self.engine.begin() as conn:
            for token, ids in plan.requeue.items():
                params = {"ids": ids, "token": token, "now": now}
                requeued.extend(conn.execute(_REQUEUE, params).scalars())
            for (token, need_left), ids in plan.park.items():
                owner = claim_owner(token)
                message = _parked_message(owner, owner in gone)
                stmt = _PARK_LEFT if need_left else _PARK
                params = {"ids": ids, "token": token, "now": now, "message": message}
                done = conn.execute(stmt, params).all()
                if done:
                    conn.execute(
                        attempts_table.insert(),
                        [
                            {
                                "outbox_id": p.id,
                                "number": p.attempts,
                                "started_at": now,
                                "duration_ms": 0.0,
                                "error": message,
                                "outcome": IN_DOUBT,
                                "worker": owner or None,
                            }
                            for p in done
                        ],
                    )
                    parked.extend(p.id for p in done)
            if gone:
                conn.execute(instances.delete().where(instances.c.id.in_(sorted(gone))))
        return Reclaimed(sorted(parked), sorted(requeued))

    def _gone(
        self, conn: Connection, known: Sequence[InstanceInfo], me: str | None, now: datetime
    ) -> set[str]:
        """The registered instances that are dead (see :class:`Liveness` for how each tells)."""
        if self.dialect != "postgresql":
            host, pid, real = socket.gethostname(), os.getpid(), utcnow()
            return {i.id for i in known if instance_gone(i, me=me, host=host, pid=pid, now=real)}
        gone = set()
        for info in known:
            if info.id == me:
                continue
            # Free means its holder's session ended; taken shared for this transaction only.
            key = advisory_key(INSTANCE_LOCK_PREFIX + info.id)
            if conn.execute(select(func.pg_try_advisory_xact_lock_shared(key))).scalar():
                gone.add(info.id)
        return gone

    # -- operator actions --------------------------------------------------------------------

    def _transition(
        self, row_id: int, allowed: Sequence[str], values: dict[str, Any], verb: str
    ) -> OutboxRow:
        with self.engine.begin() as conn:
            res = conn.execute(
                update(outbox)
                .where(outbox.c.id == row_id, outbox.c.state.in_(allowed))
                .values(values)
            )
            if res.rowcount == 0:
                state = conn.execute(select(outbox.c.state).where(outbox.c.id == row_id)).scalar()
                if state is None:
                    raise TransitionError(f"there is no outbox row {row_id}")
                raise TransitionError(
                    f"row {row_id} is {state}: only {', '.join(allowed)} rows can be {verb}"
                )
        row = self.get(row_id)
        assert row is not None
        return row

    def resend(self, row_id: int, *, now: datetime | None = None) -> OutboxRow:
        """Send a parked or given-up row again, with a fresh attempt budget (history is kept)."""
        now = now or utcnow()
        values = {
            "state": PENDING,
            "attempts": 0,
            "next_attempt_at": now,
            "claimed_by": None,
            "claimed_until": None,
            "updated_at": now,
        }
        return self._transition(row_id, RESENDABLE, values, "resent")

    def drop(self, row_id: int, *, now: datetime | None = None) -> OutboxRow:
        """Give up on a row for good (it stays in the history as ``dropped``)."""
        values = {"state": DROPPED, "claimed_until": None, "updated_at": now or utcnow()}
        return self._transition(row_id, DROPPABLE, values, "dropped")

    def _move(
        self,
        from_states: Sequence[str],
        to_state: str,
        rule: str | None,
        ids: Sequence[int] | None,
        now: datetime | None,
    ) -> int:
        """Move rows in ``from_states`` (all, one rule's, or these ids) at once."""
        q = update(outbox).where(outbox.c.state.in_(list(from_states)))
        if rule is not None:
            q = q.where(outbox.c.rule == rule)
        if ids is not None:
            q = q.where(outbox.c.id.in_(list(ids)))
        values: dict[str, Any] = {"state": to_state, "updated_at": now or utcnow()}
        if to_state == DROPPED:
            values["claimed_until"] = None
        with self.engine.begin() as conn:
            return conn.execute(q.values(values)).rowcount

    def release(
        self,
        *,
        rule: str | None = None,
        ids: Sequence[int] | None = None,
        now: datetime | None = None,
    ) -> int:
        """Move held rows (all, one rule's, or these ids) to pending."""
        return self._move((HELD,), PENDING, rule, ids, now)

    def hold(
        self,
        *,
        rule: str | None = None,
        ids: Sequence[int] | None = None,
        now: datetime | None = None,
    ) -> int:
        """Move not-yet-sent rows (pending, retrying) to held."""
        return self._move(DUE_STATES, HELD, rule, ids, now)

    def drop_unsent(self, *, rule: str | None = None, now: datetime | None = None) -> int:
        """Give up on everything not sent yet (held, pending, retrying), in one statement:
        a runaway rule can leave thousands of rows behind."""
        return self._move((HELD, *DUE_STATES), DROPPED, rule, None, now)

    # -- reading -----------------------------------------------------------------------------

    def _with_attempts(self, conn: Connection, rows: list[RowMapping]) -> list[OutboxRow]:
        if not rows:
            return []
        logs: dict[int, list[AttemptRow]] = {}
        ids = [m["id"] for m in rows]
        for start in range(0, len(ids), 500):
            q = (
                select(attempts_table)
                .where(attempts_table.c.outbox_id.in_(ids[start : start + 500]))
                .order_by(attempts_table.c.id)
            )
            for a in conn.execute(q).mappings():
                logs.setdefault(a["outbox_id"], []).append(_attempt_row(a))
        return [_outbox_row(m, tuple(logs.get(m["id"], ()))) for m in rows]

    def get(self, row_id: int) -> OutboxRow | None:
        rows = self.get_many([row_id])
        return rows[0] if rows else None

    def get_many(self, ids: Iterable[int], *, attempts: bool = True) -> list[OutboxRow]:
        """These rows, in the order asked (unknown ids are left out)."""
        wanted = list(ids)
        if not wanted:
            return []
        with self._read() as conn:
            found = list(conn.execute(select(outbox).where(outbox.c.id.in_(wanted))).mappings())
            rows = self._with_attempts(conn, found) if attempts else [_outbox_row(m) for m in found]
        by_id = {r.id: r for r in rows}
        return [by_id[i] for i in wanted if i in by_id]

    def history(
        self,
        rule: str | None = None,
        states: Iterable[str] | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[OutboxRow]:
        """Newest rows first, each with its attempts."""
        q = select(outbox)
        if rule is not None:
            q = q.where(outbox.c.rule == rule)
        if states is not None:
            wanted = list(states)
            unknown = sorted(set(wanted) - set(STATES))
            if unknown:
                raise ValueError(
                    f"unknown state(s) {', '.join(unknown)}; known: {', '.join(STATES)}"
                )
            q = q.where(outbox.c.state.in_(wanted))
        if since is not None:
            q = q.where(outbox.c.created_at >= _aware(since, "since"))
        q = q.order_by(outbox.c.id.desc()).limit(limit)
        with self._read() as conn:
            return self._with_attempts(conn, list(conn.execute(q).mappings()))

    def backlog(self) -> dict[str, int]:
        """Rows by state, every state present (zeros included)."""
        counts = dict.fromkeys(STATES, 0)
        with self._read() as conn:
            for state, n in conn.execute(
                select(outbox.c.state, func.count()).group_by(outbox.c.state)
            ):
                counts[state] = n
        return counts

    def next_due(self) -> datetime | None:
        """When the earliest pending or retrying row is due (the dispatcher's idle sleep)."""
        with self._read() as conn:
            return conn.execute(
                select(func.min(outbox.c.next_attempt_at)).where(_states(*DUE_STATES))
            ).scalar()

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

    def prune_seen(self, scope: str, before: datetime) -> int:
        """Forget keys of ``scope`` seen before ``before`` (a feed's old items)."""
        with self.engine.begin() as conn:
            res = conn.execute(
                seen_keys.delete().where(
                    seen_keys.c.scope == scope, seen_keys.c.seen_at < _aware(before, "before")
                )
            )
            return res.rowcount

    # -- fires and marks ---------------------------------------------------------------------

    def count_fires(self, rule: str, since: datetime) -> int:
        """Fires (not requests) of ``rule`` recorded since ``since``: what a rule's limit counts.

        Chunk 0 stands for its fire; a held fire counts too, since it was a fire all the same.
        """
        q = select(func.count()).where(
            outbox.c.rule == rule,
            outbox.c.chunk == 0,
            outbox.c.created_at >= _aware(since, "since"),
            outbox.c.state != DROPPED,
        )
        with self._read() as conn:
            return int(conn.execute(q).scalar() or 0)

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
        rows = [{"scope": scope, "name": n, "at": _aware(at, "at")} for n, at in values.items()]
        for row in rows:
            _check_key("name", row["name"])
        stmt = self._insert(marks)
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope", "name"], set_={"at": stmt.excluded.at}
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, rows)

    def leadership(self, name: str = "scheduler") -> Leadership:
        """Who runs the schedules when several daemons share this store (see Leadership)."""
        return Leadership(self, name)

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
        q = q.order_by(unmatched_events.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [UnmatchedEvent(**m) for m in conn.execute(q).mappings()]


class Leadership:
    """One leader among daemons sharing a store: it alone runs schedules and polls feeds.

    On PostgreSQL a session advisory lock, held on a connection of its own for as long as the
    leader lives: when its process dies the connection closes and another instance takes over
    at its next try. SQLite serves one host, so every instance is the leader there (a second
    one on the same file would still send each fire once, thanks to the idempotency keys).
    """

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._key = advisory_key(name)
        self._conn: Connection | None = None
        self.held = store.dialect != "postgresql"

    def try_acquire(self) -> bool:
        """Become the leader if nobody is; True while this instance leads."""
        if self.held:
            return self._alive()
        conn = self._store.engine.connect()
        try:
            got = bool(conn.execute(select(func.pg_try_advisory_lock(self._key))).scalar())
            conn.commit()
        except SQLAlchemyError:
            conn.close()
            raise
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
                self._conn.execute(select(func.pg_advisory_unlock(self._key)))
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


__all__ = [
    "DEAD",
    "DEFAULT_URL",
    "DROPPED",
    "FAILED",
    "HELD",
    "IN_DOUBT",
    "PENDING",
    "RETRYING",
    "SENDING",
    "SENT",
    "STATES",
    "AttemptResult",
    "AttemptRow",
    "EnqueueResult",
    "Fire",
    "InFlight",
    "InstanceInfo",
    "Leadership",
    "Liveness",
    "OutboxRow",
    "ReclaimPlan",
    "Reclaimed",
    "ResultUpdate",
    "Store",
    "TransitionError",
    "busy_timeout",
    "claim_owner",
    "encode_body",
    "instance_gone",
    "is_busy",
    "plan_reclaim",
    "process_info",
    "utcnow",
]
