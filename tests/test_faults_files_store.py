"""The store's record of events no rule took, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import create_engine, inspect

from engine.outbox.store import Store


def test_an_unmatched_event_is_recorded_once_with_why(store: Store) -> None:
    at = datetime(2026, 3, 10, 8, 0, tzinfo=UTC)
    assert store.record_unmatched("typo", "event:a", "no rule listens", '{"x": 1}', now=at)
    assert not store.record_unmatched("typo", "event:a", "no rule listens", '{"x": 1}', now=at)
    store.record_unmatched("other", "event:b", "disabled", "{}", now=at + timedelta(minutes=5))
    events = store.unmatched()
    assert [(e.event, e.key, e.reason) for e in events] == [
        ("other", "event:b", "disabled"),
        ("typo", "event:a", "no rule listens"),
    ]
    assert events[1].received_at == at and events[1].payload == '{"x": 1}'
    assert [e.key for e in store.unmatched(since=at + timedelta(minutes=1))] == ["event:b"]


def test_an_existing_database_gets_the_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with Store(url):
        pass
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE unmatched_events")
        conn.exec_driver_sql("UPDATE schema_version SET version = 2")  # stamped 2 then
    engine.dispose()
    with Store(url) as store:  # as a database made before the table existed
        assert store.record_unmatched("e", "event:k", "why", "{}")
    engine = create_engine(url)
    assert "unmatched_events" in inspect(engine).get_table_names()
    engine.dispose()
