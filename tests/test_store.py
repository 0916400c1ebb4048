"""The outbox store, on SQLite and on PostgreSQL alike.

PostgreSQL isolation: each test gets its own schema, ``pushrules_test_<random>``, reached through
``options=-csearch_path=<schema>`` in the store URL and dropped afterwards, so parallel runs of
the suite (or of several engineers' suites) on one database never see each other's tables.
The ``store_url`` and ``store`` fixtures and the schema helpers live in tests/conftest.py.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from engine.outbox.schema import SCHEMA_VERSION, utcnow
from engine.outbox.states import (
    DEAD,
    DROPPED,
    FAILED,
    HELD,
    IN_DOUBT,
    PENDING,
    RETRYING,
    SENDING,
    SENT,
    STATES,
)
from engine.outbox.store import AttemptResult, Fire, Store, TransitionError
from tests.conftest import store_url_context
from tests.helpers import LEASE, T0, URL, body, ok


def requests(n: int = 1, marker: str = "m") -> list[tuple[str, dict[str, Any]]]:
    return [(URL, body(f"{marker}-{i}")) for i in range(n)]


# --- enqueue ---------------------------------------------------------------------------------


def test_enqueue_writes_every_chunk_once(store: Store) -> None:
    first = store.enqueue("flight", "evt-1", requests(3), now=T0)
    assert first.created and len(first.ids) == 3
    again = store.enqueue("flight", "evt-1", requests(5), now=T0 + timedelta(hours=1))
    assert not again.created and again.ids == first.ids
    other = store.enqueue("flight", "evt-2", requests(1), now=T0)
    assert other.created and set(other.ids).isdisjoint(first.ids)
    same_key_other_rule = store.enqueue("promo", "evt-1", requests(1), now=T0)
    assert same_key_other_rule.created
    assert store.backlog()[PENDING] == 5
    rows = store.get_many(first.ids)
    assert [r.chunk for r in rows] == [0, 1, 2]
    assert rows[1].request() == body("m-1")
    assert rows[0].state == PENDING and rows[0].attempts == 0
    assert rows[0].created_at == T0 and rows[0].next_attempt_at == T0


def test_enqueue_refuses_credentials_and_bad_input(store: Store) -> None:
    with_user = body()
    with_user["sendInstantMessage"]["user"] = {"login": "l", "password": "secret"}
    with pytest.raises(ValueError, match="user"):
        store.enqueue("r", "k", [(URL, body()), (URL, with_user)], now=T0)
    with pytest.raises(ValueError, match="sendInstantMessage"):
        store.enqueue("r", "k", [(URL, {"message": {}})], now=T0)
    with pytest.raises(ValueError, match="http"):
        store.enqueue("r", "k", [("ftp://x", body())], now=T0)
    with pytest.raises(ValueError, match="no request"):
        store.enqueue("r", "k", [], now=T0)
    with pytest.raises(ValueError, match="aware"):
        store.enqueue("r", "k", requests(), now=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="pending or held"):
        store.enqueue("r", "k", requests(), now=T0, state=SENT)
    assert sum(store.backlog().values()) == 0  # nothing half-written


def test_enqueue_many_mixes_new_and_known_fires(store: Store) -> None:
    store.enqueue("r", "a", requests(2), now=T0)
    results = store.enqueue_many(
        [Fire("r", "a", requests(2)), Fire("r", "b", requests(3)), Fire("s", "a", requests(1))],
        now=T0,
    )
    assert [r.created for r in results] == [False, True, True]
    assert [len(r.ids) for r in results] == [2, 3, 1]
    assert store.backlog()[PENDING] == 6
    # The same fire twice in one call is one fire: written once, the repeat a duplicate of it.
    twice = store.enqueue_many([Fire("r", "x", requests()), Fire("r", "x", requests())], now=T0)
    assert [r.created for r in twice] == [True, False] and twice[0].ids == twice[1].ids
    assert store.backlog()[PENDING] == 7


def test_concurrent_enqueue_creates_each_fire_once(store: Store) -> None:
    keys = [f"evt-{i}" for i in range(15)]
    barrier = threading.Barrier(6)

    def worker(_: int) -> list[tuple[str, list[int], bool]]:
        barrier.wait()
        out = []
        for key in keys:
            r = store.enqueue("flight", key, requests(2, key), now=T0)
            out.append((key, r.ids, r.created))
        return out

    with ThreadPoolExecutor(6) as pool:
        results = [row for chunk in pool.map(worker, range(6)) for row in chunk]
    created = Counter(key for key, _, was_created in results if was_created)
    assert created == dict.fromkeys(keys, 1)
    ids_by_key: dict[str, set[tuple[int, ...]]] = {}
    for key, ids, _ in results:
        ids_by_key.setdefault(key, set()).add(tuple(ids))
    assert all(len(v) == 1 for v in ids_by_key.values())  # every thread saw the same ids
    assert store.backlog()[PENDING] == 2 * len(keys)


# --- claim -----------------------------------------------------------------------------------


def test_claim_takes_due_rows_oldest_first(store: Store) -> None:
    late = store.enqueue("r", "late", requests(), now=T0 + timedelta(seconds=5)).ids[0]
    early = store.enqueue("r", "early", requests(), now=T0).ids[0]
    later = store.enqueue("r", "later", requests(), now=T0, not_before=T0 + timedelta(hours=1))
    held = store.enqueue("r", "held", requests(), now=T0, state=HELD).ids[0]

    rows = store.claim("w1", 10, T0 + timedelta(minutes=1), LEASE)
    assert [r.id for r in rows] == [early, late]
    assert all(r.state == SENDING and r.attempts == 1 for r in rows)
    assert rows[0].claimed_by is not None and rows[0].claimed_by.startswith("w1#")
    assert rows[0].claimed_until == T0 + timedelta(minutes=1) + LEASE
    assert store.claim("w1", 10, T0 + timedelta(minutes=1), LEASE) == []

    assert store.release(rule="r") == 1
    assert [r.id for r in store.claim("w1", 10, T0 + timedelta(minutes=2), LEASE)] == [held]
    assert [r.id for r in store.claim("w1", 10, T0 + timedelta(hours=2), LEASE)] == later.ids


def test_claim_ids_ignores_schedule_but_not_state(store: Store) -> None:
    a = store.enqueue("r", "a", requests(), now=T0, not_before=T0 + timedelta(days=1)).ids[0]
    b = store.enqueue("r", "b", requests(), now=T0, state=HELD).ids[0]
    c = store.enqueue("r", "c", requests(), now=T0).ids[0]
    rows = store.claim_ids("w", [a, b, c, 999], T0, LEASE)
    assert sorted(r.id for r in rows) == [a, c]
    assert store.claim_ids("w", [a, c], T0, LEASE) == []  # already sending


def test_claim_never_hands_one_row_to_two_workers(store: Store) -> None:
    total = 240
    store.enqueue_many([Fire("r", f"k{i}", requests()) for i in range(total)], now=T0)
    barrier = threading.Barrier(6)

    def worker(n: int) -> list[int]:
        barrier.wait()
        taken: list[int] = []
        while True:
            rows = store.claim(f"w{n}", 7, T0 + timedelta(seconds=1), LEASE)
            if not rows:
                return taken
            taken.extend(r.id for r in rows)

    with ThreadPoolExecutor(6) as pool:
        per_worker = list(pool.map(worker, range(6)))
    every = [i for ids in per_worker for i in ids]
    assert len(every) == total and len(set(every)) == total
    assert store.backlog()[SENDING] == total


def test_claim_skips_paused_rules(store: Store) -> None:
    store.enqueue("quiet", "a", requests(), now=T0)
    loud = store.enqueue("loud", "a", requests(), now=T0).ids
    store.pause("quiet", until=T0 + timedelta(hours=1), now=T0)
    assert [r.id for r in store.claim("w", 10, T0, LEASE)] == loud
    store.pause("*", now=T0)
    store.enqueue("loud", "b", requests(), now=T0)
    assert store.claim("w", 10, T0 + timedelta(hours=2), LEASE) == []
    assert store.resume("*")
    assert [r.rule for r in store.claim("w", 10, T0 + timedelta(hours=2), LEASE)] == [
        "quiet",
        "loud",
    ]


def test_unclaim_gives_rows_back_untouched(store: Store) -> None:
    ids = store.enqueue("r", "a", requests(2), now=T0).ids
    rows = store.claim("w", 10, T0, LEASE)
    claim = rows[0].claimed_by
    assert claim is not None
    assert store.unclaim(ids, "someone-else#0") == 0
    assert store.unclaim(ids, claim) == 2
    again = store.get_many(ids)
    assert [(r.state, r.attempts, r.claimed_until) for r in again] == [(PENDING, 0, None)] * 2


# --- results ---------------------------------------------------------------------------------


def test_record_result_moves_the_row_and_keeps_every_attempt(store: Store) -> None:
    row_id = store.enqueue("r", "a", requests(), now=T0).ids[0]
    [row] = store.claim("w", 1, T0, LEASE)
    retry_at = T0 + timedelta(seconds=30)
    busy = AttemptResult(T0, 0.2, 200, 1, "A database error occurred", None, "code 1: retry")
    assert store.record_result(row_id, busy, RETRYING, retry_at, claimed_by=row.claimed_by)
    r = store.get(row_id)
    assert r is not None
    assert (r.state, r.next_attempt_at, r.return_code, r.claimed_until) == (
        RETRYING,
        retry_at,
        1,
        None,
    )
    assert store.claim("w", 1, T0 + timedelta(seconds=10), LEASE) == []  # not due yet
    [row] = store.claim("w", 1, retry_at, LEASE)
    assert row.attempts == 2
    done_at = retry_at + timedelta(seconds=1)
    assert store.record_result(
        row_id, ok(done_at, message_id="m-77"), SENT, claimed_by=row.claimed_by
    )
    r = store.get(row_id)
    assert r is not None
    assert (r.state, r.message_id, r.return_code, r.last_error, r.attempts) == (
        SENT,
        "m-77",
        0,
        None,
        2,
    )
    assert r.sent_at == done_at + timedelta(seconds=0.05)
    assert [(a.number, a.outcome, a.return_code) for a in r.attempt_log] == [
        (1, RETRYING, 1),
        (2, SENT, 0),
    ]
    assert r.attempt_log[0].error == "code 1: retry"
    assert r.attempt_log[1].duration_ms == pytest.approx(50.0)
    assert r.attempt_log[1].worker == "w"
    with pytest.raises(ValueError, match="next_attempt_at"):
        store.record_result(row_id, ok(), RETRYING)
    with pytest.raises(ValueError, match="cannot move"):
        store.record_result(row_id, ok(), PENDING)


def test_a_late_answer_cannot_overwrite_a_newer_claim(store: Store) -> None:
    row_id = store.enqueue("r", "a", requests(), now=T0).ids[0]
    [first] = store.claim("w", 1, T0, LEASE)
    assert store.reclaim(T0 + 2 * LEASE).parked == [row_id]
    store.resend(row_id, now=T0 + 2 * LEASE)
    [second] = store.claim("w", 1, T0 + 2 * LEASE, LEASE)
    assert first.claimed_by != second.claimed_by
    # The first attempt's answer arrives now: history keeps it, the row does not move.
    assert not store.record_result(row_id, ok(), SENT, claimed_by=first.claimed_by)
    r = store.get(row_id)
    assert r is not None and r.state == SENDING
    assert [a.outcome for a in r.attempt_log] == [IN_DOUBT, SENT]


def test_an_answer_after_the_lease_ran_out_replaces_the_doubt(store: Store) -> None:
    row_id = store.enqueue("r", "a", requests(), now=T0).ids[0]
    [row] = store.claim("w", 1, T0, LEASE)
    store.reclaim(T0 + 2 * LEASE)
    assert store.record_result(row_id, ok(message_id="9"), SENT, claimed_by=row.claimed_by)
    r = store.get(row_id)
    assert r is not None and (r.state, r.message_id) == (SENT, "9")


def test_an_attempt_that_sent_nothing_can_be_given_back(store: Store) -> None:
    row_id = store.enqueue("r", "a", requests(), now=T0).ids[0]
    [row] = store.claim("w", 1, T0, LEASE)
    missing = AttemptResult(T0, 0.0, error="environment variable X is not set")
    store.record_result(
        row_id,
        missing,
        RETRYING,
        T0 + timedelta(minutes=1),
        claimed_by=row.claimed_by,
        count_attempt=False,
    )
    r = store.get(row_id)
    assert r is not None and (r.attempts, r.last_error) == (0, "environment variable X is not set")
    assert len(r.attempt_log) == 1


def test_recover_parks_expired_leases_in_doubt(store: Store) -> None:
    ids = store.enqueue("r", "a", requests(3), now=T0).ids
    store.claim("w", 2, T0, timedelta(minutes=1))
    assert store.reclaim(T0 + timedelta(seconds=30)).parked == []  # leases still running
    parked = store.reclaim(T0 + timedelta(minutes=2)).parked
    assert parked == ids[:2]
    rows = store.get_many(ids)
    assert [r.state for r in rows] == [IN_DOUBT, IN_DOUBT, PENDING]
    assert rows[0].last_error is not None and "resend or drop" in rows[0].last_error
    assert rows[0].attempt_log[-1].outcome == IN_DOUBT
    # Parked rows are never claimed again by themselves.
    assert [r.id for r in store.claim("w", 10, T0 + timedelta(hours=1), LEASE)] == ids[2:]
    assert store.reclaim(T0 + timedelta(hours=1)).parked == []


# --- operator actions ------------------------------------------------------------------------


def test_resend_and_drop(store: Store) -> None:
    a, b, c = store.enqueue("r", "a", requests(3), now=T0).ids
    rows = store.claim("w", 3, T0, LEASE)
    claims = {r.id: r.claimed_by for r in rows}
    store.record_result(a, ok(), FAILED, claimed_by=claims[a])
    store.record_result(b, ok(), SENT, claimed_by=claims[b])
    store.record_result(c, ok(), DEAD, claimed_by=claims[c])

    later = T0 + timedelta(minutes=5)
    again = store.resend(a, now=later)
    assert (again.state, again.attempts, again.next_attempt_at) == (PENDING, 0, later)
    assert len(again.attempt_log) == 1  # the history stays
    with pytest.raises(TransitionError, match=r"row \d+ is sent"):
        store.resend(b)
    with pytest.raises(TransitionError, match="no outbox row 4242"):
        store.resend(4242)
    dropped = store.drop(c)
    assert dropped.state == DROPPED
    with pytest.raises(TransitionError, match="is sent"):
        store.drop(b)
    assert store.drop(a).state == DROPPED
    assert store.resend(a).state == PENDING  # an operator can undo a drop
    [row] = store.claim("w", 5, utcnow(), LEASE)
    with pytest.raises(TransitionError, match="sending"):
        store.drop(row.id)


def test_hold_and_release(store: Store) -> None:
    store.enqueue("r", "a", requests(2), now=T0)
    store.enqueue("s", "a", requests(1), now=T0)
    assert store.hold(rule="r") == 2
    assert store.backlog()[HELD] == 2
    assert [r.rule for r in store.claim("w", 10, T0, LEASE)] == ["s"]
    assert store.release() == 2
    assert store.backlog()[PENDING] == 2


def test_history_and_backlog(store: Store) -> None:
    a = store.enqueue("flight", "a", requests(2), now=T0).ids
    store.enqueue("promo", "b", requests(1), now=T0 + timedelta(hours=1))
    [row] = store.claim("w", 1, T0 + timedelta(hours=2), LEASE)
    store.record_result(row.id, ok(), SENT, claimed_by=row.claimed_by)

    every = store.history()
    assert [r.id for r in every] == sorted((r.id for r in every), reverse=True)
    assert {r.rule for r in store.history(rule="flight")} == {"flight"}
    sent = store.history(states=[SENT])
    assert [r.id for r in sent] == [a[0]] and len(sent[0].attempt_log) == 1
    assert [r.rule for r in store.history(since=T0 + timedelta(minutes=30))] == ["promo"]
    assert len(store.history(limit=1)) == 1
    with pytest.raises(ValueError, match="unknown state"):
        store.history(states=["lost"])
    counts = store.backlog()
    assert set(counts) == set(STATES)
    assert (counts[SENT], counts[PENDING], counts[FAILED]) == (1, 2, 0)
    assert store.next_due(T0 - timedelta(seconds=1)) == T0
    later = store.next_due(T0)  # rows already due do not count: the next one to come due
    assert later is not None and later > T0


# --- seen keys and pauses --------------------------------------------------------------------


def test_mark_seen(store: Store) -> None:
    assert store.mark_seen("feed:flights", "item-1", now=T0)
    assert not store.mark_seen("feed:flights", "item-1")
    assert store.mark_seen("feed:promos", "item-1")
    assert store.mark_seen("feed:flights", "item-2", now=T0 + timedelta(days=2))
    assert store.prune_seen("feed:flights", T0 + timedelta(days=1)) == 1
    assert store.mark_seen("feed:flights", "item-1")  # forgotten, so new again
    with pytest.raises(ValueError, match="key"):
        store.mark_seen("feed", "")


def test_mark_seen_is_race_safe(store: Store) -> None:
    barrier = threading.Barrier(6)

    def worker(_: int) -> list[bool]:
        barrier.wait()
        return [store.mark_seen("feed", f"k{i}") for i in range(20)]

    with ThreadPoolExecutor(6) as pool:
        firsts = [x for xs in pool.map(worker, range(6)) for x in xs]
    assert firsts.count(True) == 20


def test_pauses(store: Store) -> None:
    assert store.paused() == {}
    store.pause("flight", now=T0)
    store.pause("promo", until=T0 + timedelta(hours=1), now=T0)
    assert store.paused(T0) == {"flight": None, "promo": T0 + timedelta(hours=1)}
    assert store.paused(T0 + timedelta(hours=2)) == {"flight": None}  # expired
    store.pause("flight", until=T0 + timedelta(minutes=5), now=T0)  # replaced, not added
    assert store.paused(T0)["flight"] == T0 + timedelta(minutes=5)
    assert store.resume("flight") and not store.resume("flight")
    store.pause("*")
    assert "*" in store.paused()


# --- schema and storage ----------------------------------------------------------------------


def test_schema_version_is_kept(store_url: str) -> None:
    with Store(store_url) as s:
        assert s.schema_version() == SCHEMA_VERSION
        with s.engine.begin() as conn:
            conn.execute(
                text("INSERT INTO schema_version VALUES (99, :t)"), {"t": T0.replace(tzinfo=None)}
            )
    with pytest.raises(RuntimeError, match="newer"):
        Store(store_url)


def test_sqlite_runs_in_wal_with_a_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Store(f"sqlite:///{path}") as s:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 15000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        s.enqueue("r", "a", requests(), now=T0)
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with pytest.raises(ValueError, match="file"):
        Store("sqlite://")
    with pytest.raises(ValueError, match="supported"):
        Store("mysql+pymysql://nobody@127.0.0.1/x")


def test_timestamps_come_back_aware_utc(store: Store) -> None:
    from zoneinfo import ZoneInfo

    paris = T0.astimezone(ZoneInfo("Europe/Paris"))
    row_id = store.enqueue("r", "a", requests(), now=paris).ids[0]
    r = store.get(row_id)
    assert r is not None and r.created_at == T0 and r.created_at.tzinfo is UTC


# --- fires, marks, leadership ------------------------------------------------------------------


def test_count_fires_counts_fires_not_requests(store: Store) -> None:
    store.enqueue("promo", "a", requests(3), now=T0)
    store.enqueue("promo", "b", requests(1), now=T0 + timedelta(minutes=30))
    store.enqueue("other", "c", requests(1), now=T0 + timedelta(minutes=30))
    assert store.count_fires("promo", T0) == 2
    assert store.count_fires("promo", T0 + timedelta(minutes=1)) == 1
    assert store.count_fires("promo", T0 + timedelta(hours=1)) == 0


def test_marks_are_upserted(store: Store) -> None:
    assert store.get_mark("schedule", "digest") is None
    store.set_mark("schedule", "digest", T0)
    store.set_mark("schedule", "digest", T0 + timedelta(seconds=5))
    assert store.get_mark("schedule", "digest") == T0 + timedelta(seconds=5)
    assert store.get_mark("schedule", "other") is None


def test_one_leader_at_a_time_on_postgres(tmp_path: Path) -> None:
    for url in store_url_context("postgres", tmp_path):
        first, second = Store(url), Store(url)
        name = f"test-{secrets.token_hex(4)}"
        try:
            a, b = first.leadership(name), second.leadership(name)
            assert a.try_acquire()
            assert not b.try_acquire()
            assert a.try_acquire()  # still leading
            a.release()
            assert b.try_acquire()
            b.release()
        finally:
            first.close()
            second.close()


def test_two_schemas_of_one_database_have_a_leader_each(tmp_path: Path) -> None:
    """Advisory locks belong to the whole database: two deployments whose outboxes live in two
    schemas of one database (or two test runs at once) must not take each other's leadership."""
    here, there = (tmp_path / "a", tmp_path / "b")
    for a_url in store_url_context("postgres", here):
        for b_url in store_url_context("postgres", there):
            a, b = Store(a_url), Store(b_url)
            try:
                first, second = a.leadership(), b.leadership()
                assert first.try_acquire()
                assert second.try_acquire()  # another schema: its own leader
                assert not a.leadership().try_acquire()  # the same schema: one at a time
                first.release()
                second.release()
            finally:
                a.close()
                b.close()


def test_every_sqlite_instance_leads(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        assert store.leadership().try_acquire()
        assert store.leadership().try_acquire()


def test_set_marks_writes_many_at_once(store: Store) -> None:
    store.set_mark("schedule", "a", T0)
    store.set_marks("schedule", {"a": T0 + timedelta(seconds=1), "b": T0})
    assert store.get_mark("schedule", "a") == T0 + timedelta(seconds=1)
    assert store.get_mark("schedule", "b") == T0


def test_drop_unsent_drops_held_pending_and_retrying_of_one_rule(store: Store) -> None:
    held = store.enqueue("r", "a", requests(2), now=T0, state="held").ids
    pending = store.enqueue("r", "b", requests(1), now=T0).ids
    other = store.enqueue("other", "c", requests(1), now=T0).ids
    assert store.drop_unsent(rule="r") == 3
    assert {store.get(i).state for i in [*held, *pending]} == {"dropped"}
    assert store.get(other[0]).state == "pending"
