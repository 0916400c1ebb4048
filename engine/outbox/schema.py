"""The store's tables, the states they index, and the migrations between versions.

An empty database gets the current tables at once (``create_all``) and is stamped with
:data:`SCHEMA_VERSION`; any other is brought up by :data:`MIGRATIONS`, one version at a time,
and ``create_all`` never runs on it: a migration that adds a table would otherwise find it made
already. Migrations carry their own frozen DDL, never these tables, so a later change to a table
cannot change what an earlier migration makes. ``tests/test_store_schema.py`` checks that a
database made at version 1 and migrated equals a fresh one, on SQLite and PostgreSQL.

Not Alembic, yet: the migrations so far add a nullable column or a table, which both dialects do
with a plain ``ALTER TABLE ... ADD COLUMN``/``CREATE TABLE``. Alembic's SQLite batch mode (copy
the table, move the rows) earns its place the first time a column or constraint must change or
go; until then it would add a dependency, a second version table and an ``env.py`` to ship for
two statements.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
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
    func,
    inspect,
    literal_column,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from engine.errors import PushrulesError
from engine.outbox.states import ATTENTION_STATES, DUE_STATES, SENDING

SCHEMA_VERSION: Final = 3

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


def _v2_left_at_and_instances(conn: Connection) -> None:
    """1 -> 2: ``outbox.left_at`` and the ``instances`` table."""
    type_ = "TIMESTAMP WITHOUT TIME ZONE" if conn.dialect.name == "postgresql" else "DATETIME"
    conn.exec_driver_sql(f"ALTER TABLE outbox ADD COLUMN left_at {type_}")
    frozen = MetaData()
    Table(
        "instances",
        frozen,
        Column("id", String(255), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", DateTime, nullable=False),
        Column("alive_until", DateTime, nullable=False),
    )
    frozen.create_all(conn)


def _v3_unmatched_events(conn: Connection) -> None:
    """2 -> 3: the ``unmatched_events`` table. ``checkfirst``: pushrules versions that stamped
    2 while this table was new made it by ``create_all``."""
    frozen = MetaData()
    Table(
        "unmatched_events",
        frozen,
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("event", String(255), nullable=False),
        Column("key", String(MAX_KEY_LENGTH), nullable=False, unique=True),
        Column("received_at", DateTime, nullable=False),
        Column("reason", Text, nullable=False),
        Column("payload", Text, nullable=False),
        Index("ix_unmatched_received", "received_at"),
        sqlite_autoincrement=True,
    )
    frozen.create_all(conn, checkfirst=True)


#: Migrations from version N to N + 1, run in order inside the schema transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _v2_left_at_and_instances,
    2: _v3_unmatched_events,
}


class SchemaError(PushrulesError, RuntimeError):
    """The database is not a store this pushrules can use as it is; the message says why."""


def ensure_schema(conn: Connection) -> None:
    """Create the tables on an empty database, or migrate an older one to this version.

    Runs in the caller's transaction; on PostgreSQL every instance starting at once takes the
    same advisory lock first, so one creates or migrates and the others find it done.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
    present = set(inspect(conn).get_table_names())
    if schema_version_table.name not in present:
        if ours := sorted(present & set(metadata.tables)):
            raise SchemaError(
                f"the database has pushrules tables ({', '.join(ours)}) "
                "but no schema_version: it was not made by pushrules or was damaged; point "
                "`store` in pushrules.yaml at an empty database, or restore this one from a backup"
            )
        metadata.create_all(conn)
        conn.execute(
            schema_version_table.insert().values(version=SCHEMA_VERSION, applied_at=utcnow())
        )
        return
    current = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
    if current is None:
        raise SchemaError(
            "the store's schema_version table is empty: the database was damaged; restore it "
            "from a backup or point `store` in pushrules.yaml at an empty database"
        )
    if current > SCHEMA_VERSION:
        raise SchemaError(
            f"the store's schema is version {current}, newer than this pushrules "
            f"understands ({SCHEMA_VERSION}): upgrade pushrules"
        )
    for version in range(current, SCHEMA_VERSION):
        MIGRATIONS[version](conn)
        conn.execute(schema_version_table.insert().values(version=version + 1, applied_at=utcnow()))


def _check_key(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    if len(value) > MAX_KEY_LENGTH:
        raise ValueError(f"{what} is {len(value)} characters long; at most {MAX_KEY_LENGTH}")


def _aware(value: datetime, what: str) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (UTC)")
    return value
