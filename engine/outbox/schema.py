"""The store's tables, the states they index, and the migrations between versions.

An empty database gets the current tables at once (``create_all``) and is stamped with
:data:`SCHEMA_VERSION`; any other is brought up by :data:`MIGRATIONS`, one version at a time,
and ``create_all`` never runs on it: a migration that adds a table would otherwise find it made
already. Migrations carry their own frozen DDL, never these tables, so a later change to a table
cannot change what an earlier migration makes. ``tests/test_store_schema.py`` checks that a
database made at version 1 and migrated equals a fresh one, on SQLite and PostgreSQL.

Not Alembic, yet: the migrations so far add a nullable column, a table, indexes and triggers,
which both dialects do with plain DDL. Alembic's SQLite batch mode (copy the table, move the
rows) earns its place the first time a column or constraint must change or go; until then it
would add a dependency, a second version table and an ``env.py`` to ship for a few statements.
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
from engine.outbox.states import AT_REST, DUE_STATES, STATES

SCHEMA_VERSION: Final = 4

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
# History lists rows newest first one state at a time (the store merges the runs), so each
# list reads ``limit`` entries however long the history; pruning finds old sent rows here, and
# reclaims the rows in flight. ``tests/test_store_plans.py`` checks that claims still take
# ix_outbox_due.
Index("ix_outbox_state", outbox.c.state, outbox.c.created_at, outbox.c.id)
# The same for one rule, rows at rest only: entries scattered by rule cost a page written per
# row, and a row on its way would be written there at enqueue, claim and result. A rule's rows
# on their way are few (the backlog), read off ix_outbox_state. A rule's ``limit`` counts here.
Index(
    "ix_outbox_rule_state",
    outbox.c.rule,
    outbox.c.state,
    outbox.c.created_at,
    outbox.c.id,
    sqlite_where=_states(*AT_REST),
    postgresql_where=_states(*AT_REST),
)

#: Rows by state, kept by triggers on ``outbox`` (see :data:`COUNT_TRIGGERS`): a state's count is
#: the sum of its ``n``. ``/healthz`` and ``/metrics`` read it instead of counting the history.
outbox_counts = Table(
    "outbox_counts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("state", String(16), nullable=False),
    Column("n", BigInteger, nullable=False),
    # PostgreSQL: the appends churn the table, and its pages stay allocated after autovacuum
    # frees them; reading and folding off this index visits the live rows, not the pages.
    Index("ix_outbox_counts_state", "state", "n"),
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
    # When a poll last found the key (refreshed about daily, see engine/daemon/poller.py), not
    # when it was first seen: pruning forgets keys the feed stopped listing long ago.
    Column("seen_at", UTCDateTime, nullable=False),
    Index("ix_seen_keys_seen", "scope", "seen_at"),
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


# -- the state counts' triggers (version 4) ----------------------------------------------------
#
# SQLite has one writer at a time: each row's change moves its state's counter in place. On
# PostgreSQL a counter row updated by every transaction would queue the instances behind one
# row lock (and deadlock two transactions moving different states in turn), so each statement
# appends its net change per state, and :func:`fold_counts` sums the appends now and then.
_COUNTS_V4_SQLITE: Final = (
    """CREATE TRIGGER outbox_counts_insert AFTER INSERT ON outbox BEGIN
    INSERT INTO outbox_counts (state, n) SELECT NEW.state, 0
        WHERE NOT EXISTS (SELECT 1 FROM outbox_counts WHERE state = NEW.state);
    UPDATE outbox_counts SET n = n + 1 WHERE state = NEW.state;
END""",
    """CREATE TRIGGER outbox_counts_update AFTER UPDATE OF state ON outbox
WHEN OLD.state IS NOT NEW.state BEGIN
    INSERT INTO outbox_counts (state, n) SELECT NEW.state, 0
        WHERE NOT EXISTS (SELECT 1 FROM outbox_counts WHERE state = NEW.state);
    UPDATE outbox_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE outbox_counts SET n = n + 1 WHERE state = NEW.state;
END""",
    """CREATE TRIGGER outbox_counts_delete AFTER DELETE ON outbox BEGIN
    UPDATE outbox_counts SET n = n - 1 WHERE state = OLD.state;
END""",
)
_COUNTS_V4_POSTGRESQL: Final = (
    # search_path pinned to the schema's: the trigger finds outbox_counts whoever writes.
    """CREATE FUNCTION outbox_counts_track() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO outbox_counts (state, n) SELECT state, count(*) FROM new_rows GROUP BY state;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO outbox_counts (state, n) SELECT state, -count(*) FROM old_rows GROUP BY state;
    ELSE
        INSERT INTO outbox_counts (state, n)
        SELECT state, sum(d)::bigint FROM (
            SELECT state, 1 AS d FROM new_rows UNION ALL SELECT state, -1 FROM old_rows
        ) AS moves GROUP BY state HAVING sum(d) <> 0;
    END IF;
    RETURN NULL;
END $$""",
    """CREATE TRIGGER outbox_counts_insert AFTER INSERT ON outbox
REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION outbox_counts_track()""",
    """CREATE TRIGGER outbox_counts_update AFTER UPDATE ON outbox
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION outbox_counts_track()""",
    """CREATE TRIGGER outbox_counts_delete AFTER DELETE ON outbox
REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION outbox_counts_track()""",
)
#: The triggers a fresh store gets: version 4's until a migration changes them (it then carries
#: its own copy, as ``_v4_flat_queries`` does).
COUNT_TRIGGERS: Final = {"sqlite": _COUNTS_V4_SQLITE, "postgresql": _COUNTS_V4_POSTGRESQL}


def _create_count_triggers(conn: Connection, ddl: dict[str, tuple[str, ...]]) -> None:
    for statement in ddl[conn.dialect.name]:
        conn.exec_driver_sql(statement)


def _seed_counts(conn: Connection) -> None:
    """One row per state with its count now (after the triggers: on PostgreSQL creating them
    locked the table against writers, so no row is counted twice or missed)."""
    counted = conn.execute(select(outbox.c.state, func.count()).group_by(outbox.c.state))
    found = {state: n for state, n in counted}
    rows = [{"state": s, "n": found.pop(s, 0)} for s in STATES]
    rows += [{"state": s, "n": n} for s, n in sorted(found.items())]
    conn.execute(outbox_counts.insert(), rows)


def fold_counts(conn: Connection) -> int:
    """Sum the appended counts into one row per state (PostgreSQL; SQLite's are in place).

    One statement: what it deletes is exactly what it sums, so appends committed meanwhile are
    left for the next fold and two folds at once count nothing twice. Returns rows folded.
    """
    if conn.dialect.name != "postgresql":
        return 0
    # "state IS NOT NULL" is every row (the column is NOT NULL), said so the planner can take
    # ix_outbox_counts_state rather than read every page the table ever grew to.
    return int(
        conn.exec_driver_sql(
            "WITH gone AS (DELETE FROM outbox_counts WHERE state IS NOT NULL RETURNING state, n), "
            "summed AS (INSERT INTO outbox_counts (state, n) SELECT state, sum(n)::bigint "
            "FROM gone GROUP BY state HAVING sum(n) <> 0 RETURNING 1) "
            "SELECT count(*) FROM gone"
        ).scalar_one()
    )


#: The scope of a feed's "primed" marks before version 4 kept them among its item keys, under
#: a NUL prefix that PostgreSQL cannot store; they now have a scope of their own.
_OLD_PRIMED: Final = "\x00primed:"


def _v4_flat_queries(conn: Connection) -> None:
    """3 -> 4: indexes for history and limits, maintained state counts, seen keys by age.

    What version 4 makes is dropped first if there: a store stamped with an older version by a
    pushrules that made the tables with ``create_all`` (see ``_v3_unmatched_events``) may have
    it already, and it is all derived (indexes, counts recounted here).
    """
    postgres = conn.dialect.name == "postgresql"
    for statement in (
        "DROP TRIGGER IF EXISTS outbox_counts_insert" + (" ON outbox" if postgres else ""),
        "DROP TRIGGER IF EXISTS outbox_counts_update" + (" ON outbox" if postgres else ""),
        "DROP TRIGGER IF EXISTS outbox_counts_delete" + (" ON outbox" if postgres else ""),
        *(["DROP FUNCTION IF EXISTS outbox_counts_track()"] if postgres else []),
        "DROP TABLE IF EXISTS outbox_counts",
        "DROP INDEX IF EXISTS ix_outbox_state",
        "DROP INDEX IF EXISTS ix_outbox_rule_state",
        "DROP INDEX IF EXISTS ix_seen_keys_seen",
        "CREATE INDEX ix_outbox_state ON outbox (state, created_at, id)",
        "CREATE INDEX ix_outbox_rule_state ON outbox (rule, state, created_at, id) "
        "WHERE state IN ('held', 'sent', 'failed', 'dead', 'in_doubt', 'dropped')",
        # ix_outbox_state serves what these served (rows needing a person, rows in flight)
        "DROP INDEX IF EXISTS ix_outbox_attention",
        "DROP INDEX IF EXISTS ix_outbox_sending",
        "CREATE INDEX ix_seen_keys_seen ON seen_keys (scope, seen_at)",
        f"CREATE TABLE outbox_counts (id {'BIGSERIAL' if postgres else 'INTEGER'} NOT NULL, "
        "state VARCHAR(16) NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (id))",
        "CREATE INDEX ix_outbox_counts_state ON outbox_counts (state, n)",
    ):
        conn.exec_driver_sql(statement)
    _create_count_triggers(conn, {"sqlite": _COUNTS_V4_SQLITE, "postgresql": _COUNTS_V4_POSTGRESQL})
    frozen = MetaData()
    old_outbox = Table("outbox", frozen, Column("state", String(16)))
    counts = Table("outbox_counts", frozen, Column("state", String(16)), Column("n", BigInteger))
    counted = conn.execute(select(old_outbox.c.state, func.count()).group_by(old_outbox.c.state))
    found = {state: n for state, n in counted}
    frozen_states: tuple[str, ...] = ("held", "pending", "sending", "sent", "retrying")
    frozen_states += ("failed", "dead", "in_doubt", "dropped")
    seed = [{"state": s, "n": found.pop(s, 0)} for s in frozen_states]
    conn.execute(counts.insert(), seed + [{"state": s, "n": n} for s, n in found.items()])
    if not postgres:  # PostgreSQL never stored one
        _v4_move_primed(conn)


def _v4_move_primed(conn: Connection) -> None:
    """Feed "primed" marks from ``feed:R``/``\\0primed:HASH`` to ``feed-primed:R``/``HASH``."""
    rows = conn.exec_driver_sql(
        "SELECT scope, key, seen_at FROM seen_keys WHERE key >= ? AND key < ?",
        (_OLD_PRIMED, _OLD_PRIMED[:-1] + ";"),
    ).all()
    for scope, key, seen_at in rows:
        if not (scope.startswith("feed:") and key.startswith(_OLD_PRIMED)):
            continue
        conn.exec_driver_sql(
            "INSERT OR IGNORE INTO seen_keys (scope, key, seen_at) VALUES (?, ?, ?)",
            ("feed-primed:" + scope[len("feed:") :], key[len(_OLD_PRIMED) :], seen_at),
        )
        conn.exec_driver_sql("DELETE FROM seen_keys WHERE scope = ? AND key = ?", (scope, key))


#: Migrations from version N to N + 1, run in order inside the schema transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _v2_left_at_and_instances,
    2: _v3_unmatched_events,
    3: _v4_flat_queries,
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
        _create_count_triggers(conn, COUNT_TRIGGERS)
        _seed_counts(conn)
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
