"""How the store's connections behave: SQLite's pragmas, its write lock at BEGIN, busy timeouts."""

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


_READ_ONLY: Final = "pushrules_read_only"
