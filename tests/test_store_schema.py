"""The store's schema: made fresh on an empty database, migrated on any other, and both ways
give the same tables, columns, indexes and constraints on SQLite and PostgreSQL.

The version-1 database is made from a frozen copy of version 1's tables (as commit 2572739's
``engine/store.py`` defined them), written out here so that no later edit of the current tables
can change what "version 1" means.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
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
    UniqueConstraint,
    create_engine,
    inspect,
    literal_column,
    text,
)
from sqlalchemy.engine import Connection, Engine

from engine.cli.main import main
from engine.outbox import schema
from engine.outbox.schema import SCHEMA_VERSION, SchemaError
from engine.outbox.store import Store
from tests.conftest import store_url_context
from tests.helpers import make_project

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _version_1() -> MetaData:
    """Version 1's tables, frozen."""
    md = MetaData()
    id_ = BigInteger().with_variant(Integer, "sqlite")
    Table(
        "schema_version",
        md,
        Column("version", Integer, primary_key=True, autoincrement=False),
        Column("applied_at", DateTime, nullable=False),
    )
    outbox = Table(
        "outbox",
        md,
        Column("id", id_, primary_key=True, autoincrement=True),
        Column("rule", String(255), nullable=False),
        Column("idem_key", Text, nullable=False),
        Column("chunk", Integer, nullable=False),
        Column("url", Text, nullable=False),
        Column("body", Text, nullable=False),
        Column("state", String(16), nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("created_at", DateTime, nullable=False),
        Column("updated_at", DateTime, nullable=False),
        Column("next_attempt_at", DateTime, nullable=False),
        Column("claimed_by", String(255)),
        Column("claimed_until", DateTime),
        Column("last_http_status", Integer),
        Column("return_code", Integer),
        Column("return_label", Text),
        Column("message_id", String(255)),
        Column("last_error", Text),
        Column("sent_at", DateTime),
        UniqueConstraint("rule", "idem_key", "chunk", name="uq_outbox_fire"),
        sqlite_autoincrement=True,
    )

    def states(*names: str) -> Any:
        return outbox.c.state.in_([literal_column(f"'{s}'") for s in names])

    due, attention = ("pending", "retrying"), ("held", "in_doubt", "failed", "dead")
    Index(
        "ix_outbox_due",
        outbox.c.next_attempt_at,
        outbox.c.id,
        sqlite_where=states(*due),
        postgresql_where=states(*due),
    )
    Index(
        "ix_outbox_sending",
        outbox.c.claimed_until,
        sqlite_where=states("sending"),
        postgresql_where=states("sending"),
    )
    Index(
        "ix_outbox_attention",
        outbox.c.state,
        outbox.c.id,
        sqlite_where=states(*attention),
        postgresql_where=states(*attention),
    )
    Table(
        "attempts",
        md,
        Column("id", id_, primary_key=True, autoincrement=True),
        Column("outbox_id", id_, ForeignKey("outbox.id", ondelete="CASCADE"), nullable=False),
        Column("number", Integer, nullable=False),
        Column("started_at", DateTime, nullable=False),
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
    Table(
        "seen_keys",
        md,
        Column("scope", String(255), primary_key=True),
        Column("key", String(1000), primary_key=True),
        Column("seen_at", DateTime, nullable=False),
    )
    Table(
        "pauses",
        md,
        Column("rule", String(255), primary_key=True),
        Column("until", DateTime),
        Column("paused_at", DateTime, nullable=False),
    )
    Table(
        "marks",
        md,
        Column("scope", String(255), primary_key=True),
        Column("name", String(255), primary_key=True),
        Column("at", DateTime, nullable=False),
    )
    return md


def make_old(url: str, version: int, md: MetaData) -> None:
    """A database as a pushrules at ``version`` left it: ``md``'s tables, stamped."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            md.create_all(conn)
            conn.execute(
                text("INSERT INTO schema_version VALUES (:v, :t)"),
                {"v": version, "t": T0.replace(tzinfo=None)},
            )
    finally:
        engine.dispose()


def shape(engine: Engine) -> dict[str, Any]:
    """Everything a schema is made of, as the database itself reports it."""
    found = inspect(engine)
    out: dict[str, Any] = {}
    for table in sorted(found.get_table_names()):
        out[table] = {
            "columns": {
                c["name"]: (str(c["type"]), c["nullable"]) for c in found.get_columns(table)
            },
            "primary_key": found.get_pk_constraint(table)["constrained_columns"],
            "indexes": sorted(
                (
                    i["name"],
                    tuple(i["column_names"]),
                    bool(i["unique"]),
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in found.get_indexes(table)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"])) for u in found.get_unique_constraints(table)
            ),
            "foreign_keys": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in found.get_foreign_keys(table)
            ),
        }
    return out


def routines(engine: Engine) -> dict[str, str]:
    """Triggers (and on PostgreSQL their functions) by name, with their definitions: the
    inspector does not report them, and the state counts depend on them."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            found = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name")
            )
            return {name: " ".join(sql.split()) for name, sql in found}
        triggers = conn.execute(
            text(
                "SELECT t.tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE c.relnamespace = current_schema()::regnamespace AND NOT t.tgisinternal"
            )
        )
        functions = conn.execute(
            text(
                "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p "
                "WHERE p.pronamespace = current_schema()::regnamespace"
            )
        )
        schema_name = conn.execute(text("SELECT current_schema()")).scalar_one()
        return {
            name: definition.replace(schema_name, "SCHEMA")
            for name, definition in [*triggers, *functions]
        }


def store_shape(url: str) -> tuple[dict[str, Any], int]:
    with Store(url) as store:
        return {**shape(store.engine), "routines": routines(store.engine)}, store.schema_version()


@pytest.fixture(params=["sqlite", "postgres"])
def two_urls(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two empty databases of one kind."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for a in store_url_context(request.param, tmp_path / "a"):
        for b in store_url_context(request.param, tmp_path / "b"):
            yield a, b


def test_a_version_1_database_migrated_equals_a_fresh_one(two_urls: tuple[str, str]) -> None:
    old, fresh = two_urls
    make_old(old, 1, _version_1())
    migrated, version = store_shape(old)
    made, fresh_version = store_shape(fresh)
    assert version == fresh_version == SCHEMA_VERSION
    assert migrated == made
    # the partial indexes' WHERE is compared too (both dialects report it)
    partial = {"ix_outbox_due", "ix_outbox_rule_state"}
    assert all(where for name, _, _, where in made["outbox"]["indexes"] if name in partial)
    assert {"outbox_counts_insert", "outbox_counts_update", "outbox_counts_delete"} <= set(
        made["routines"]
    )


def test_a_version_2_database_without_unmatched_events_gets_it(
    two_urls: tuple[str, str],
) -> None:
    """Version 2 was stamped before ``unmatched_events`` existed: a migration adds it."""
    old, fresh = two_urls
    v2 = _version_1()
    Table(
        "instances",
        v2,
        Column("id", String(255), primary_key=True),
        Column("host", String(255), nullable=False),
        Column("pid", Integer, nullable=False),
        Column("started_at", DateTime, nullable=False),
        Column("alive_until", DateTime, nullable=False),
    )
    v2.tables["outbox"].append_column(Column("left_at", DateTime))
    make_old(old, 2, v2)
    migrated, version = store_shape(old)
    assert version == SCHEMA_VERSION
    assert migrated == store_shape(fresh)[0]
    with Store(old) as store:  # and it works
        store.record_unmatched("signup", "k1", "no rule listens", "{}", now=T0)
        assert [e.key for e in store.unmatched()] == ["k1"]


def test_migrations_keep_rows_and_run_once(two_urls: tuple[str, str]) -> None:
    old, _ = two_urls
    make_old(old, 1, _version_1())
    engine = create_engine(old)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox (rule, idem_key, chunk, url, body, state, attempts, "
                "created_at, updated_at, next_attempt_at) VALUES ('r', 'k', 0, 'http://x', "
                "'{}', 'pending', 0, :t, :t, :t)"
            ),
            {"t": T0.replace(tzinfo=None)},
        )
    engine.dispose()
    for _ in range(2):
        with Store(old) as store:
            assert [(r.rule, r.state, r.left_at) for r in store.history()] == [
                ("r", "pending", None)
            ]
            with store.engine.connect() as conn:
                stamped = conn.execute(text("SELECT version FROM schema_version ORDER BY 1"))
                assert [v for (v,) in stamped] == [1, 2, 3, 4]


def test_a_migration_may_create_a_table(
    two_urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next version adds a table with a plain CREATE TABLE: on an old database nothing
    else may have made it first (``create_all`` runs on empty databases only)."""
    old, fresh = two_urls
    with Store(old):
        pass  # at the current version
    added = Table("extra", schema.metadata, Column("id", Integer, primary_key=True))
    try:

        def create_extra(conn: Connection) -> None:
            conn.exec_driver_sql("CREATE TABLE extra (id INTEGER NOT NULL, PRIMARY KEY (id))")

        monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        monkeypatch.setitem(schema.MIGRATIONS, SCHEMA_VERSION, create_extra)
        with Store(old) as store:
            assert "extra" in inspect(store.engine).get_table_names()
            assert store.schema_version() == SCHEMA_VERSION + 1
        with Store(fresh) as store:
            assert store.schema_version() == SCHEMA_VERSION + 1
    finally:
        schema.metadata.remove(added)


def test_a_database_with_tables_but_no_version_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE outbox (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaError, match=r"outbox.*no schema_version.*empty database"):
        Store(url)


def test_the_command_line_says_what_to_do_with_a_store_it_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback: the message, and exit 1."""
    project = make_project(tmp_path / "p")
    db = project / "pushrules.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE outbox (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    assert main(["history", "--project", str(project)]) == 1
    err = capsys.readouterr().err
    assert "no schema_version" in err and "Traceback" not in err


def test_version_4_counts_the_rows_already_there_and_moves_primed_marks(
    two_urls: tuple[str, str],
) -> None:
    """The state counts start from the rows a store already has; a feed's primed mark, kept
    under a NUL prefix among its keys before (SQLite only: PostgreSQL could not store it),
    moves to its own scope with its time, so the feed is not taken for a new one."""
    old, _ = two_urls
    make_old(old, 1, _version_1())
    states = ["sent"] * 3 + ["pending", "dead", "dropped", "dropped", "in_doubt"]
    engine = create_engine(old)
    with engine.begin() as conn:
        for i, state in enumerate(states):
            conn.execute(
                text(
                    "INSERT INTO outbox (rule, idem_key, chunk, url, body, state, attempts, "
                    "created_at, updated_at, next_attempt_at) VALUES ('r', :k, 0, 'http://x', "
                    "'{}', :s, 0, :t, :t, :t)"
                ),
                {"k": f"k{i}", "s": state, "t": T0.replace(tzinfo=None)},
            )
        if engine.dialect.name == "sqlite":
            conn.execute(
                text("INSERT INTO seen_keys VALUES (:s, :k, :t)"),
                [
                    {"s": "feed:offers", "k": "\x00primed:0123456789abcdef", "t": T0},
                    {"s": "feed:offers", "k": "item-1", "t": T0},
                ],
            )
    engine.dispose()
    with Store(old) as store:
        assert store.backlog() == {
            **dict.fromkeys(("held", "sending", "retrying", "failed"), 0),
            "sent": 3,
            "pending": 1,
            "dead": 1,
            "dropped": 2,
            "in_doubt": 1,
        }
        store.drop_unsent(now=T0)
        assert store.backlog()["dropped"] == 3 and store.backlog()["pending"] == 0
        if store.dialect == "sqlite":
            assert store.see_keys("feed-primed:offers", ["0123456789abcdef"], T0) == []
            assert store.see_keys("feed:offers", ["item-1", "\x00primed:0123456789abcdef"], T0) == [
                "\x00primed:0123456789abcdef"
            ]
