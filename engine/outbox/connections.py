"""How the store's connections behave: SQLite's pragmas, its write lock at BEGIN, busy timeouts
(SQLite's busy timeout, PostgreSQL's lock timeout)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Final

from sqlalchemy.dialects.sqlite.base import SQLiteCompiler
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

#: Milliseconds a SQLite writer waits for the write lock unless :func:`busy_timeout` says less.
DEFAULT_BUSY_MS: Final = 15000
#: PostgreSQL's SQLSTATE for a lock not granted in time (lock_not_available).
LOCK_NOT_AVAILABLE: Final = "55P03"
_BUSY_MS: ContextVar[int | None] = ContextVar("pushrules_busy_ms", default=None)


@contextlib.contextmanager
def busy_timeout(seconds: float) -> Iterator[None]:
    """Store calls made inside wait at most ``seconds`` for a lock, then fail (see
    :func:`is_busy`) instead of stalling: on SQLite for the write lock ("database is locked",
    instead of the default 15 s), on PostgreSQL for any lock a statement needs (``lock_timeout``
    for each transaction begun inside, instead of no limit: a ``LOCK TABLE`` by another session
    would hold an event's answer as long as it lasts).

    A context variable, so it holds for this thread or task only (``asyncio.to_thread``
    carries it into the thread): the dispatcher's calls never inherit the intake's limit.
    """
    token = _BUSY_MS.set(max(1, int(seconds * 1000)))
    try:
        yield
    finally:
        _BUSY_MS.reset(token)


def is_busy(exc: BaseException) -> bool:
    """True if the store refused a transaction because another connection held a lock past
    :func:`busy_timeout`: nothing of it was done, so the call can be made again as it was.

    SQLite refuses at BEGIN, before any statement. PostgreSQL may refuse any statement, but
    the error aborts the whole transaction, which the store's ``engine.begin()`` rolls back.
    Either way only the failed transaction is undone: a retry is safe for a call whose
    writes are one transaction (the dispatcher's store calls are).
    """
    if not isinstance(exc, OperationalError):
        return False
    if getattr(exc.orig, "sqlstate", None) == LOCK_NOT_AVAILABLE:
        return True
    return "database is locked" in str(exc.orig) and str(exc.statement or "").startswith("BEGIN")


class _SQLiteCompiler(SQLiteCompiler):
    """SQLite's compiler, writing a statement's ``with_hint(table, "INDEXED BY ...", "sqlite")``
    after the table (SQLAlchemy's own leaves SQLite's hints out).

    Without statistics SQLite's planner takes any equality on an index's first column for a
    bargain: it would count every pending row through ``ix_outbox_state`` rather than read
    the few due ones off ``ix_outbox_due``. A hint pins the plan, and a query the hinted index
    cannot serve fails loudly instead of slowing down.
    """

    def get_from_hint_text(self, table: Any, text: str | None) -> str | None:
        return text


def use_index_hints(engine: Engine) -> None:
    """Make ``engine`` (SQLite) render ``INDEXED BY`` hints; before its first statement."""
    engine.dialect.statement_compiler = _SQLiteCompiler


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


def _postgres_begin(conn: Connection) -> None:
    # psycopg opens the transaction at its first statement, this one: the limit is the
    # transaction's own and ends with it, so a pooled connection carries nothing to the next
    # caller. Outside busy_timeout nothing is sent (no round trip, PostgreSQL's default wait).
    wanted = _BUSY_MS.get()
    if wanted is not None:
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{wanted}ms'")


_READ_ONLY: Final = "pushrules_read_only"
