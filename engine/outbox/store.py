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
    sending --defer (never sent: its rule's quiet hours; due again at their end)-->
        pending | retrying
    held | pending | retrying | in_doubt | failed | dead --drop--> dropped

Timestamps are timezone-aware UTC in Python and naive UTC in the database, which both dialects
store and compare alike. The password never reaches the store: :meth:`Store.enqueue` refuses a
body that carries the ``user`` object.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, cast

from sqlalchemy import (
    Integer,
    String,
    Text,
    bindparam,
    case,
    create_engine,
    event,
    func,
    inspect,
    make_url,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.sql.elements import BindParameter

from engine.errors import PushrulesError
from engine.outbox.connections import (
    _READ_ONLY,
    _postgres_begin,
    _sqlite_begin,
    _sqlite_on_connect,
    use_index_hints,
)
from engine.outbox.instances import (
    INSTANCE_LOCK_PREFIX,
    InFlight,
    InstanceInfo,
    Leadership,
    Liveness,
    _expired,
    _parked_message,
    advisory_key,
    claim_owner,
    instance_gone,
    plan_reclaim,
)
from engine.outbox.keys import SCHEDULE_KEY, scheduled_for
from engine.outbox.marks import Marks
from engine.outbox.retention import Retention
from engine.outbox.schema import (
    SCHEMA_VERSION,
    UTCDateTime,
    _aware,
    _check_key,
    _states,
    attempts_table,
    ensure_schema,
    fold_counts,
    instances,
    outbox,
    outbox_counts,
    pauses,
    schema_version_table,
    utcnow,
)
from engine.outbox.states import (
    AT_REST,
    DROPPABLE,
    DROPPED,
    DUE_STATES,
    HELD,
    IN_DOUBT,
    ON_THE_WAY,
    PENDING,
    RESENDABLE,
    RESULT_STATES,
    RESULT_TARGETS,
    RETRYING,
    SENDING,
    SENT,
    STATES,
)
from engine.rules.secrets import hide_url_password

DEFAULT_URL: Final = "sqlite:///pushrules.db"
#: Names the advisory lock (PostgreSQL) that a limited rule's count-and-write holds.
LIMIT_LOCK_PREFIX: Final = "pushrules-limit:"
#: What a rule's limit counts at rest: a fire in any state but dropped.
_FIRE_STATES_AT_REST: Final = tuple(s for s in AT_REST if s != DROPPED)


# -- statements on the hot path, built once (building one costs more than running it) --------

_ACTIVE_PAUSES = select(pauses.c.rule).where(
    or_(pauses.c.until.is_(None), pauses.c.until > bindparam("now", type_=UTCDateTime))
)


#: SQLite reads due rows off ix_outbox_due, never by state (see connections._SQLiteCompiler).
_BY_DUE: Final = "INDEXED BY ix_outbox_due"
#: And a rule's rows on their way off ix_outbox_state, never through uq_outbox_fire's rule
#: prefix, which would read the rule's whole history.
_BY_STATE: Final = "INDEXED BY ix_outbox_state"


def _claim_statement(*, by_ids: bool, paused: bool) -> Any:
    due = select(outbox.c.id).where(_states(*DUE_STATES))
    if by_ids:
        due = due.where(outbox.c.id.in_(bindparam("ids", expanding=True)))
    else:
        due = due.where(outbox.c.next_attempt_at <= bindparam("now", type_=UTCDateTime))
        due = due.with_hint(outbox, _BY_DUE, "sqlite")
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


@functools.lru_cache(maxsize=256)
def _history_statement(states: tuple[str, ...], by_rule: bool, since: bool) -> Any:
    """The ids of the newest ``limit`` rows in ``states``: one index run per state, merged
    (built once per shape: building it costs more than running it)."""
    runs = []
    for state in states:
        run = select(outbox.c.id, outbox.c.created_at).where(outbox.c.state == state)
        if by_rule:
            run = run.where(outbox.c.rule == bindparam("rule", type_=String))
            if state in AT_REST:  # ix_outbox_rule_state's own condition, word for word
                run = run.where(_states(*AT_REST))
            else:
                run = run.with_hint(outbox, _BY_STATE, "sqlite")
        if since:
            run = run.where(outbox.c.created_at >= bindparam("since", type_=UTCDateTime))
        newest = run.order_by(outbox.c.created_at.desc(), outbox.c.id.desc())
        runs.append(select(newest.limit(bindparam("limit", type_=Integer)).subquery()))
    merged = union_all(*runs).subquery()
    return (
        select(merged.c.id)
        .order_by(merged.c.created_at.desc(), merged.c.id.desc())
        .limit(bindparam("limit", type_=Integer))
    )


_CLAIM_DUE = _claim_statement(by_ids=False, paused=False)
# A fire written ahead (store.py withdraw_ahead): its rows, locked (PostgreSQL) so that a
# claim running meanwhile either got them first or waits, then deleted whole if none has left
# pending; the new version of its rule writes it again under the same key.
_FIRE_ROWS = (
    select(outbox.c.id, outbox.c.state, outbox.c.attempts, outbox.c.created_at, outbox.c.updated_at)
    .where(outbox.c.rule == bindparam("r"), outbox.c.idem_key == bindparam("k"))
    .with_for_update()
)


def _as_written(state: str, attempts: int, created_at: datetime, updated_at: datetime) -> bool:
    """Whether a row of a fire is as its write left it: nobody claimed, tried or moved it."""
    return state in (PENDING, HELD) and attempts == 0 and updated_at == created_at


_DELETE_IDS = outbox.delete().where(outbox.c.id.in_(bindparam("ids", expanding=True)))
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


_IDS: BindParameter[Any] = bindparam("ids", expanding=True)
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
#: A requeue that also moves the row's time: its rule's quiet hours hold it until then.
_DEFER = _REQUEUE.values(next_attempt_at=bindparam("until", type_=UTCDateTime))
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
        body: dict[str, Any] = json.loads(self.body)
        return body


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


class TransitionError(PushrulesError, ValueError):
    """An operator action that the row's state does not allow; the message says why."""


def _require_file(url: str) -> None:
    """A SQLite store's file exists (connecting would create it); StoreUnavailable if not."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = parsed.database
        if not os.path.exists(path):
            raise StoreUnavailable(f"no outbox at {path} yet: nothing is recorded there")


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


def _fire_rows(fire: Fire, state: str, now: datetime, due: datetime) -> list[dict[str, Any]]:
    """The rows of one fire, checked (ValueError: a request the store will not keep)."""
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
    return rows


_Prepared = list[tuple[Fire, list[dict[str, Any]]]]


def _first_of_each(prepared: _Prepared) -> tuple[_Prepared, dict[tuple[str, str], int]]:
    """Each fire once, and where it first comes. The same fire twice in one call (two POSTs
    with one Idempotency-Key, coalesced into one batch) is one fire: the first is written, the
    others find it, as they would had they come a moment later."""
    firsts: dict[tuple[str, str], int] = {}
    for index, (fire, _) in enumerate(prepared):
        firsts.setdefault((fire.rule, fire.idem_key), index)
    return [prepared[index] for index in firsts.values()], firsts


def _results(
    prepared: _Prepared,
    firsts: dict[tuple[str, str], int],
    found: dict[tuple[str, str], EnqueueResult],
) -> list[EnqueueResult]:
    results: list[EnqueueResult] = []
    for index, (fire, _) in enumerate(prepared):
        key = (fire.rule, fire.idem_key)
        first = found[key]
        # Only the first occurrence created the fire; a repeat is a duplicate of it.
        results.append(first if firsts[key] == index else EnqueueResult(first.ids, False))
    return results


def _count_fires(conn: Connection, rule: str, since: datetime) -> int:
    """:meth:`Store.count_fires` in ``conn``'s transaction."""
    fires = (outbox.c.rule == rule, outbox.c.created_at >= since, outbox.c.chunk == 0)
    # Rows at rest through ix_outbox_rule_state (states named, not "!= dropped": each is
    # one range), rows on their way (the backlog) through ix_outbox_state.
    at_rest = select(func.count()).where(
        _states(*AT_REST), outbox.c.state.in_(_FIRE_STATES_AT_REST), *fires
    )
    on_the_way = (
        select(func.count())
        .where(outbox.c.state.in_(ON_THE_WAY), *fires)
        .with_hint(outbox, _BY_STATE, "sqlite")
    )
    q = select(at_rest.scalar_subquery() + on_the_way.scalar_subquery())
    return int(conn.execute(q).scalar() or 0)


def _existing_keys(conn: Connection, rule: str, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` are fires of ``rule`` in the outbox already (by uq_outbox_fire)."""
    there: set[str] = set()
    for start in range(0, len(keys), 500):
        q = select(outbox.c.idem_key).where(
            outbox.c.rule == rule,
            outbox.c.idem_key.in_(keys[start : start + 500]),
            outbox.c.chunk == 0,
        )
        there.update(conn.execute(q).scalars())
    return there


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


class StoreUnavailable(PushrulesError):
    """A store a command only reads is not there to read: no outbox yet, or a schema of another
    version (which only a command that writes may migrate)."""


class Store(Marks, Retention):
    """The outbox and its few companions (attempts, seen keys, pauses) in one database."""

    def __init__(self, url: str = DEFAULT_URL, *, echo: bool = False, create: bool = True) -> None:
        """``create=False``: the store as it is, for a command that only reads it (``explain``):
        never created, nor migrated, a missing SQLite file never made, a PostgreSQL server that
        does not answer given up after a few seconds; :class:`StoreUnavailable` otherwise."""
        self.url = url
        if make_url(url).get_backend_name() not in {"sqlite", "postgresql"}:
            raise ValueError(
                f"store {hide_url_password(url)!r}: only sqlite:///FILE and "
                "postgresql+psycopg://... are supported"
            )
        if not create:
            _require_file(url)
        self.engine: Engine = self._make_engine(url, echo, quick=not create)
        self.dialect = self.engine.dialect.name
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        try:
            if create:
                self._create_schema()
            else:
                self._check_schema()
        except BaseException:
            self.engine.dispose()
            raise

    @staticmethod
    def _make_engine(url: str, echo: bool, *, quick: bool = False) -> Engine:
        if url.startswith("sqlite"):
            if url in {"sqlite://", "sqlite:///:memory:"}:
                raise ValueError("the outbox needs a file: use sqlite:///path/to/pushrules.db")
            engine = create_engine(url, echo=echo, connect_args={"timeout": 15})
            event.listen(engine, "connect", _sqlite_on_connect)
            event.listen(engine, "begin", _sqlite_begin)
            use_index_hints(engine)
            return engine
        if quick:
            engine = create_engine(url, echo=echo, connect_args={"connect_timeout": 5})
        else:
            engine = create_engine(url, echo=echo, pool_pre_ping=True, pool_size=8, max_overflow=8)
        event.listen(engine, "begin", _postgres_begin)
        return engine

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
            ensure_schema(conn)

    def _check_schema(self) -> None:
        """The schema is this version's, read without writing; StoreUnavailable otherwise."""
        where = hide_url_password(self.url)
        with self._read() as conn:
            if schema_version_table.name not in inspect(conn).get_table_names():
                raise StoreUnavailable(f"{where} holds no outbox yet: nothing is recorded there")
            version = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
        if version != SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{where} has schema version {version}, and this pushrules reads version "
                f"{SCHEMA_VERSION}; a command that writes (the daemon, send) brings it up to date"
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
        prepared = [(fire, _fire_rows(fire, state, now, due)) for fire in fires]
        unique, firsts = _first_of_each(prepared)
        with self.engine.begin() as conn:
            found = self._write_fires(conn, unique)
        return _results(prepared, firsts, found)

    def enqueue_limited(
        self,
        fires: Sequence[tuple[Fire, datetime | None]],
        limits: Mapping[str, tuple[int, datetime]],
        *,
        now: datetime,
    ) -> list[tuple[EnqueueResult, str]]:
        """Fires of rules with a ``limit`` (each with its ``not_before``), in one transaction
        that counts each rule's fires and writes them: the first new fires within the rule's
        ``limits[rule]`` (at most that many fires since that instant) are pending, the rest
        held. Returns each fire's result and the state it was written in.

        Counting and writing apart would let several instances (or one daemon's concurrent
        triggers) each read the same count and all send. So the transaction first takes a lock
        per rule, in one order (no deadlock): on PostgreSQL an advisory lock until its end; on
        SQLite the write lock its ``BEGIN IMMEDIATE`` holds already. A fire already in the
        outbox takes no place under the limit: it is a duplicate, written before.
        """
        _aware(now, "now")
        prepared = [
            (fire, _fire_rows(fire, PENDING, now, _aware(nb, "not_before") if nb else now))
            for fire, nb in fires
        ]
        unknown = sorted({fire.rule for fire, _ in prepared} - set(limits))
        if unknown:
            raise ValueError(f"no limit given for rule(s) {', '.join(unknown)}")
        unique, firsts = _first_of_each(prepared)
        states: dict[tuple[str, str], str] = {}
        with self.engine.begin() as conn:
            for rule in sorted({fire.rule for fire, _ in unique}):
                if self.dialect == "postgresql":
                    key = advisory_key(LIMIT_LOCK_PREFIX + rule)
                    conn.execute(select(func.pg_advisory_xact_lock(key)))
                keys = [fire.idem_key for fire, _ in unique if fire.rule == rule]
                there = _existing_keys(conn, rule, keys)
                count, since = limits[rule]
                fired = _count_fires(conn, rule, _aware(since, "since"))
                for idem_key in keys:
                    if idem_key in there:
                        continue
                    states[(rule, idem_key)] = PENDING if fired < count else HELD
                    fired += 1
            for fire, rows in unique:
                state = states.get((fire.rule, fire.idem_key), PENDING)  # a duplicate: unused
                for row in rows:
                    row["state"] = state
            found = self._write_fires(conn, unique)
        results = _results(prepared, firsts, found)
        return [
            (result, states.get((fire.rule, fire.idem_key), PENDING))
            for (fire, _), result in zip(prepared, results, strict=True)
        ]

    def _write_fires(
        self, conn: Connection, unique: list[tuple[Fire, list[dict[str, Any]]]]
    ) -> dict[tuple[str, str], EnqueueResult]:
        """Insert fires (one each) whole, or find each already there, in ``conn``'s transaction."""
        # The same order in every transaction: two concurrent calls sharing fires then wait for
        # each other on PostgreSQL instead of deadlocking.
        ordered = sorted(unique, key=lambda p: (p[0].rule, p[0].idem_key))
        heads = [rows[0] for _, rows in ordered]
        stmt = (
            self._insert(outbox)
            .on_conflict_do_nothing(index_elements=["rule", "idem_key", "chunk"])
            .returning(outbox.c.rule, outbox.c.idem_key, outbox.c.id)
        )
        won = {(r.rule, r.idem_key): r.id for r in conn.execute(stmt, heads)} if heads else {}
        tails = [
            row for fire, rows in unique if (fire.rule, fire.idem_key) in won for row in rows[1:]
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
                ids = [won[key]] + [tail_ids[(*key, cast(int, row["chunk"]))] for row in rows[1:]]
                found[key] = EnqueueResult(ids, True)
            else:
                existing = conn.execute(
                    select(outbox.c.id)
                    .where(outbox.c.rule == fire.rule, outbox.c.idem_key == fire.idem_key)
                    .order_by(outbox.c.chunk)
                ).scalars()
                found[key] = EnqueueResult(list(existing), False)
        return found

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
        """Give back claimed rows that were never sent (a graceful stop). The same statement as
        a reclaim's: a row whose request had left is never given back, whoever asks."""
        if not ids:
            return 0
        params = {"ids": list(ids), "token": claimed_by, "now": now or utcnow()}
        with self.engine.begin() as conn:
            return len(conn.execute(_REQUEUE, params).scalars().all())

    def defer(
        self, groups: Mapping[tuple[str, datetime], Sequence[int]], *, now: datetime
    ) -> set[int]:
        """Give back claimed rows that must not leave yet, each due again at its own time.

        ``groups`` maps (claim token, time) to rows: the dispatcher's rows whose rule is in its
        quiet hours, each due again when they end. As :meth:`unclaim` does, the attempt is not
        counted and a row whose request had left, or whose claim was taken back, is not
        touched. One transaction for the lot. Returns the ids deferred.
        """
        _aware(now, "now")
        deferred: set[int] = set()
        with self.engine.begin() as conn:
            for (token, until), ids in groups.items():
                if ids:
                    _aware(until, "until")
                    params = {"ids": list(ids), "token": token, "now": now, "until": until}
                    deferred.update(conn.execute(_DEFER, params).scalars())
        return deferred

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
                    "worker": u.worker or claim_owner(u.claimed_by) or None,
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
        if rule is not None:  # the states' rows (held, or on their way), not the rule's history
            q = q.where(outbox.c.rule == rule).with_hint(_BY_STATE, outbox, "sqlite")
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
        """Newest rows first (by creation, then id), each with its attempts.

        One index run per state (``ix_outbox_state``; for a rule, ``ix_outbox_rule_state`` for
        rows at rest and the few on their way off ``ix_outbox_state``), each cut at ``limit``
        and merged in one statement: a list costs ``limit`` entries per state however long the
        history, and a state with no row costs one index probe.
        """
        wanted = list(STATES if states is None else dict.fromkeys(states))
        unknown = sorted(set(wanted) - set(STATES))
        if unknown:
            raise ValueError(f"unknown state(s) {', '.join(unknown)}; known: {', '.join(STATES)}")
        if limit <= 0 or not wanted:
            return []
        top = _history_statement(tuple(wanted), rule is not None, since is not None)
        params: dict[str, Any] = {"limit": limit, "rule": rule}
        if since is not None:
            params["since"] = _aware(since, "since")
        with self._read() as conn:
            ids = list(conn.execute(top, params).scalars())
            picked = conn.execute(select(outbox).where(outbox.c.id.in_(ids))).mappings()
            found = {m["id"]: m for m in picked}
            return self._with_attempts(conn, [found[i] for i in ids if i in found])

    def backlog(self) -> dict[str, int]:
        """Rows by state, every state present (zeros included).

        Read from ``outbox_counts``, which triggers keep (see ``schema``): the same answer as
        counting the outbox, at the cost of a handful of rows rather than the whole history.
        """
        counts = dict.fromkeys(STATES, 0)
        with self._read() as conn:
            for state, n in conn.execute(
                select(outbox_counts.c.state, func.sum(outbox_counts.c.n)).group_by(
                    outbox_counts.c.state
                )
            ):
                if state in counts or n:
                    counts[state] = int(n)
        return counts

    def fold_counts(self) -> int:
        """Sum the state counts PostgreSQL's triggers append (a no-op on SQLite); returns the
        rows folded. The daemon's leader calls it every few seconds, so :meth:`backlog` reads
        a few rows, not one per statement since the store began."""
        if self.dialect != "postgresql":
            return 0
        with self.engine.begin() as conn:
            return fold_counts(conn)

    def next_due(self, after: datetime) -> datetime | None:
        """When the earliest pending or retrying row comes due after ``after`` (the dispatcher's
        idle sleep: a fire written ahead, a retry, the end of quiet hours). Rows already due
        are not counted: those of a paused rule stay so, and would wake it for nothing."""
        _aware(after, "after")
        with self._read() as conn:
            return conn.execute(
                select(func.min(outbox.c.next_attempt_at))
                .where(
                    _states(*DUE_STATES),
                    outbox.c.next_attempt_at > bindparam("after", type_=UTCDateTime),
                )
                .with_hint(outbox, _BY_DUE, "sqlite"),
                {"after": after},
            ).scalar()

    # -- fires and marks ---------------------------------------------------------------------

    def count_fires(self, rule: str, since: datetime) -> int:
        """Fires (not requests) of ``rule`` recorded since ``since``: what a rule's limit counts.

        Chunk 0 stands for its fire; a held fire counts too, since it was a fire all the same.
        """
        since = _aware(since, "since")
        with self._read() as conn:
            return _count_fires(conn, rule, since)

    def withdraw_ahead(
        self, after: Mapping[str, datetime], otherwise: datetime | None = None
    ) -> int:
        """Take back scheduled fires written ahead of their time (``daemon.fire_ahead``) whose
        time is after ``after[rule]`` (``otherwise`` for a rule not named; None: leave those
        alone), so that they are decided again. Returns the fires taken back.

        A fire is taken back whole, and only while every row of it is as it was written:
        ``pending`` and never tried, or ``held`` by its rule's ``limit`` and never moved since
        (a person's ``hold`` or ``release`` moves its time). One a person sent early
        (``pushrules send``), held or released, or that is on its way stays. A held fire is
        taken back so the rule's new version decides it: its new message, or a limit raised.
        A fire written at or after its time (quiet hours defer those) is never taken back: its
        time has come, and its rule's mark may be past it.
        """
        bounds = [_aware(at, "after") for at in after.values()]
        if otherwise is not None:
            bounds.append(_aware(otherwise, "otherwise"))
        if not bounds:
            return 0
        floor = min(bounds)
        # The pending and held rows only, through an index by state (tests/test_store_plans.py):
        # the backlog and what waits for a person, however long the history.
        query = select(outbox.c.rule, outbox.c.idem_key, outbox.c.created_at).where(
            _states(PENDING, HELD),
            outbox.c.attempts == 0,
            outbox.c.updated_at == outbox.c.created_at,
            outbox.c.next_attempt_at > bindparam("floor", type_=UTCDateTime),
            outbox.c.idem_key.startswith(SCHEDULE_KEY),
            outbox.c.chunk == 0,
        )
        if otherwise is None:  # these rules' rows by state, not their histories
            query = query.where(outbox.c.rule.in_(list(after))).with_hint(
                outbox, _BY_STATE, "sqlite"
            )
        with self.engine.begin() as conn:
            fires = []
            for rule, key, created_at in conn.execute(query, {"floor": floor}):
                at = scheduled_for(key)
                bound = after.get(rule, otherwise)
                if at is not None and bound is not None and created_at < at and at > bound:
                    fires.append({"r": rule, "k": key})
            taken = 0
            for one in fires:
                rows = conn.execute(_FIRE_ROWS, one).all()
                if rows and all(
                    _as_written(r.state, r.attempts, r.created_at, r.updated_at) for r in rows
                ):
                    conn.execute(_DELETE_IDS, {"ids": [r.id for r in rows]})
                    taken += 1
            return taken

    def leadership(self, name: str = "scheduler") -> Leadership:
        """Who runs the schedules when several daemons share this store (see Leadership)."""
        return Leadership(self, name)


__all__ = [
    "DEFAULT_URL",
    "AttemptResult",
    "AttemptRow",
    "EnqueueResult",
    "Fire",
    "OutboxRow",
    "Reclaimed",
    "ResultUpdate",
    "Store",
    "StoreUnavailable",
    "TransitionError",
    "encode_body",
]
