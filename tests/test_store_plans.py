"""Issue 12 point 2: every query the daemon runs on a timer or per request, and every ``history``
filter, reads an index (or the maintained state counts), never the whole history.

Each case runs the real store call, captures the statements it sends, and asks the database how
it would run each of them (``EXPLAIN QUERY PLAN`` on SQLite; ``EXPLAIN (FORMAT JSON)`` on
PostgreSQL, on an analysed store of a few thousand rows with ``enable_seqscan`` off). A read of
a table that grows with the history (outbox, attempts, seen keys, unmatched events) must be an
index search with a condition; and each index must serve the queries it exists for. SQLite's
plans are exact (its planner has no statistics); PostgreSQL's depend on them, so there any of
the indexes that bound the read by state, rule or id is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from engine.outbox.retention import feed_scope, primed_scope
from engine.outbox.schema import utcnow
from engine.outbox.states import DEAD, IN_DOUBT, PENDING, RETRYING, SENT
from engine.outbox.store import AttemptResult, Fire, ResultUpdate, Store
from tests.conftest import store_url_context

#: Tables that grow with the history.
GROWING = {"outbox", "attempts", "seen_keys", "unmatched_events"}
URL = "https://api.example.invalid/sendInstantMessage.php"
NOW = utcnow().replace(microsecond=0)
DAY = timedelta(days=1)
LEASE = timedelta(minutes=5)


def body(n: int) -> dict[str, Any]:
    return {"sendInstantMessage": {"message": {"text": f"m{n}"}, "targets": [{"memberId": "1"}]}}


def fill(store: Store, rows: int = 2000) -> None:
    """A history of ``rows`` sent requests over 5 rules and 200 days, through the store's own
    calls, with a few rows in each live state, feed keys and unmatched events."""
    for start in range(0, rows, 500):
        at = NOW - timedelta(days=200) + timedelta(days=200 * start / rows)
        fires = [
            Fire(f"rule-{i % 5}", f"k{i}", [(URL, body(i))]) for i in range(start, start + 500)
        ]
        store.enqueue_many(fires, now=at)
        claimed = store.claim("filler", 500, at, LEASE)
        done = AttemptResult(at, 0.05, 200, 0, "sent", "mid")
        store.record_results(
            [ResultUpdate(r.id, done, SENT, claimed_by=r.claimed_by) for r in claimed]
        )
    live = [Fire("rule-1", f"live{i}", [(URL, body(i))]) for i in range(12)]
    store.enqueue_many(live, now=NOW - timedelta(minutes=5))
    rows_ = store.claim("filler", 6, NOW, LEASE)
    failed = AttemptResult(NOW, 0.05, 500, None, None, None, "HTTP 500")
    store.record_results(
        [
            ResultUpdate(rows_[0].id, failed, RETRYING, NOW + DAY, rows_[0].claimed_by),
            ResultUpdate(rows_[1].id, failed, DEAD, claimed_by=rows_[1].claimed_by),
            ResultUpdate(rows_[2].id, failed, IN_DOUBT, claimed_by=rows_[2].claimed_by),
        ]
    )
    store.see_keys(feed_scope("feed"), [f"item-{i}" for i in range(300)], NOW - 100 * DAY)
    store.see_keys(primed_scope("feed"), ["0123456789abcdef"], NOW)
    for i in range(50):
        store.record_unmatched("nobody", f"u{i}", "no rule", "{}", now=NOW - i * 5 * DAY)
    store.fold_counts()


@dataclass(frozen=True)
class Access:
    table: str
    index: str | None  # None: the table itself, read whole
    bounded: bool  # the read has a condition on the index (not a walk of all of it)


class Planner:
    """Captures the statements a store call sends; explains each on a connection of its own."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.captured: list[tuple[str, Any]] = []
        self.explainer: Engine = create_engine(store.url)
        event.listen(store.engine, "before_cursor_execute", self._grab)

    def _grab(self, conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        self.captured.append((statement, params))

    def close(self) -> None:
        event.remove(self.store.engine, "before_cursor_execute", self._grab)
        self.explainer.dispose()

    def accesses(self, call: Callable[[Store], object]) -> list[tuple[str, list[Access]]]:
        """Each statement ``call`` ran (reads and writes that find rows) and what it reads."""
        self.captured.clear()
        call(self.store)
        found = []
        for statement, params in self.captured:
            head = statement.lstrip().split(None, 1)[0].upper()
            if head not in ("SELECT", "UPDATE", "DELETE", "WITH", "INSERT"):
                continue
            if head == "INSERT" and " SELECT " not in statement.upper():
                continue  # a plain insert reads nothing
            first = params[0] if isinstance(params, list) and params else params
            found.append((" ".join(statement.split()), self._explain(statement, first)))
        return found

    def _explain(self, statement: str, params: Any) -> list[Access]:
        with self.explainer.connect() as conn:
            if self.store.dialect == "sqlite":
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params).all()
                return [a for row in rows if (a := _sqlite_access(row[-1])) is not None]
            conn.exec_driver_sql("SET enable_seqscan = off")
            (plan,) = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, params).one()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            leading = self.leading = getattr(self, "leading", None) or _leading_columns(
                self.explainer
            )
            return list(_pg_accesses(plan[0]["Plan"], leading))


def _sqlite_access(detail: str) -> Access | None:
    words = detail.split()
    if len(words) < 2 or words[0] not in ("SCAN", "SEARCH"):
        return None
    table = words[1]
    if " INTEGER PRIMARY KEY " in f" {detail} ":
        return Access(table, "PRIMARY KEY", words[0] == "SEARCH")
    index = words[words.index("INDEX") + 1] if "INDEX" in words else None
    return Access(table, index, words[0] == "SEARCH")


def _pg_accesses(node: dict[str, Any], leading: dict[str, str]) -> Iterator[Access]:
    """Each read of a table in a PostgreSQL plan. A read through an index is bounded only if
    its condition holds the index's first column: a condition on later columns alone walks
    the whole index."""
    relation = node.get("Relation Name")
    kind = node.get("Node Type", "")
    index = node.get("Index Name")
    if relation is not None and kind == "Seq Scan":
        yield Access(relation, None, False)
    elif relation is not None and "Index" in kind and "Bitmap" not in kind:
        yield Access(relation, index, _bounded(node, leading))
    elif kind == "Bitmap Heap Scan":
        for child in node.get("Plans", []):
            yield Access(relation or "", child.get("Index Name"), _bounded(child, leading))
        return
    for child in node.get("Plans", []):
        yield from _pg_accesses(child, leading)


def _bounded(node: dict[str, Any], leading: dict[str, str]) -> bool:
    condition = node.get("Index Cond", "")
    first = leading.get(node.get("Index Name", ""), "?")
    return f"({first} " in condition or f"({first})" in condition


def _leading_columns(engine: Engine) -> dict[str, str]:
    """Index name -> its first column, on PostgreSQL."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT i.relname, a.attname FROM pg_index x "
            "JOIN pg_class i ON i.oid = x.indexrelid "
            "JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0] "
            "WHERE i.relnamespace = current_schema()::regnamespace"
        ).all()
    return {name: column for name, column in rows}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def planner(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Planner]:
    """One filled store per kind for the whole module. PostgreSQL's is analysed, as autovacuum
    keeps it in production; SQLite's is not, as nothing runs ANALYZE on it in production."""
    for url in store_url_context(request.param, tmp_path_factory.mktemp("plans")):
        with Store(url) as store:
            fill(store)
            if store.dialect == "postgresql":
                with store.engine.begin() as conn:
                    conn.exec_driver_sql("ANALYZE")
            planner = Planner(store)
            try:
                yield planner
            finally:
                planner.close()


@dataclass(frozen=True)
class Case:
    call: Callable[[Store], object]
    sqlite: set[str]  # the indexes SQLite reads growing tables through: exactly these
    postgres: set[str]  # those PostgreSQL may choose among


PK = "PRIMARY KEY"
PG_PK = {"outbox_pkey", "attempts_pkey"}
BY_STATE = {"ix_outbox_state", "ix_outbox_rule_state", "ix_outbox_due"}
ROWS = {PK, "ix_attempts_outbox"}
#: A rule's rows at rest, and its few on their way (the backlog).
BY_RULE = {"ix_outbox_rule_state", "ix_outbox_state"}
PG_ROWS = PG_PK | {"ix_attempts_outbox"}
SINCE = NOW - 60 * DAY

CASES: dict[str, Case] = {
    # what /healthz and /metrics read: the maintained counts, no growing table at all
    "backlog": Case(lambda s: s.backlog(), set(), set()),
    # the dispatcher, all the time
    "claim": Case(
        lambda s: s.claim("w", 16, NOW - DAY, LEASE), {PK, "ix_outbox_due"}, PG_PK | BY_STATE
    ),
    "next_due": Case(
        lambda s: s.next_due(NOW - DAY), {"ix_outbox_due"}, {"ix_outbox_due", "ix_outbox_state"}
    ),
    "reclaim": Case(lambda s: s.reclaim(NOW), {"ix_outbox_state"}, BY_STATE),
    "mark_leaving": Case(lambda s: s.mark_leaving({"w#1": [1, 2]}, NOW), {PK}, PG_PK | BY_STATE),
    "record a result": Case(
        lambda s: s.record_results(
            [ResultUpdate(1, AttemptResult(NOW, 0.1, 200, 0, "ok"), SENT, claimed_by="w#0")]
        ),
        {PK},
        PG_PK,
    ),
    # pause and resume of one rule: its held rows and those on their way, not its history
    "drop_unsent --rule": Case(
        lambda s: s.drop_unsent(rule="rule-4", now=NOW),
        {"ix_outbox_state"},
        {"ix_outbox_rule_state", "ix_outbox_state", "ix_outbox_due"},
    ),
    "release --rule": Case(
        lambda s: s.release(rule="rule-4", now=NOW),
        {"ix_outbox_state"},
        {"ix_outbox_rule_state", "ix_outbox_state"},
    ),
    # firing: a rule's limit, a duplicate fire
    "count_fires": Case(
        lambda s: s.count_fires("rule-3", NOW - DAY),
        {"ix_outbox_rule_state", "ix_outbox_state"},
        {"ix_outbox_rule_state", "ix_outbox_state"},
    ),
    "enqueue a duplicate": Case(
        lambda s: s.enqueue("rule-3", "k3", [(URL, body(3))], now=NOW),
        {"sqlite_autoindex_outbox_1"},  # SQLite's name for uq_outbox_fire
        {"uq_outbox_fire"},
    ),
    # history, every filter
    "history": Case(lambda s: s.history(), {"ix_outbox_state"} | ROWS, BY_STATE | PG_ROWS),
    "history --rule": Case(lambda s: s.history(rule="rule-3"), BY_RULE | ROWS, BY_STATE | PG_ROWS),
    "history --status retrying": Case(
        lambda s: s.history(states=[RETRYING]), {"ix_outbox_state"} | ROWS, BY_STATE | PG_ROWS
    ),
    "history --status sent": Case(
        lambda s: s.history(states=[SENT]), {"ix_outbox_state"} | ROWS, BY_STATE | PG_ROWS
    ),
    "history --since": Case(
        lambda s: s.history(since=SINCE), {"ix_outbox_state"} | ROWS, BY_STATE | PG_ROWS
    ),
    "history --rule --status": Case(
        lambda s: s.history(rule="rule-1", states=[PENDING, DEAD]),
        BY_RULE | ROWS,
        BY_STATE | PG_ROWS,
    ),
    "history --rule --since": Case(
        lambda s: s.history(rule="rule-3", since=SINCE),
        BY_RULE | ROWS,
        BY_STATE | PG_ROWS,
    ),
    "history --unmatched --since": Case(
        lambda s: s.unmatched(since=SINCE), {"ix_unmatched_received"}, {"ix_unmatched_received"}
    ),
    # the poller
    "a poll's keys": Case(
        lambda s: s.see_keys(feed_scope("feed"), ["item-1", "new"], NOW),
        {"sqlite_autoindex_seen_keys_1"},
        {"seen_keys_pkey"},
    ),
    "a poll's new keys (read before it fires)": Case(
        lambda s: s.unseen_keys(feed_scope("feed"), ["item-1", "new"]),
        {"sqlite_autoindex_seen_keys_1"},
        {"seen_keys_pkey"},
    ),
    "fold counts": Case(lambda s: s.fold_counts(), set(), set()),
    # fires written ahead, taken back at a reload (these rules) and at a leader's start (all):
    # pending rows only, the backlog, whatever the history
    "take back, reload": Case(
        lambda s: s.withdraw_ahead({"rule-1": NOW}), {"ix_outbox_state"}, BY_STATE
    ),
    "take back, start": Case(
        lambda s: s.withdraw_ahead({"rule-1": NOW - DAY}, NOW - 400 * DAY),
        {"ix_outbox_state"},
        BY_STATE,
    ),
    # the leader's batches (nothing is old enough for these: one probe each)
    "prune sent": Case(
        lambda s: s.prune_batch("sent", 365 * DAY, NOW), {"ix_outbox_state"}, {"ix_outbox_state"}
    ),
    "prune dropped": Case(
        lambda s: s.prune_batch("dropped", 90 * DAY, NOW), {"ix_outbox_state"}, {"ix_outbox_state"}
    ),
    "prune unmatched events": Case(
        lambda s: s.prune_batch("unmatched_events", 365 * DAY, NOW),
        {"ix_unmatched_received"},
        {"ix_unmatched_received"},
    ),
    "prune feed keys": Case(
        lambda s: s.prune_batch("feed_keys", 365 * DAY, NOW),
        {"ix_seen_keys_seen"},
        {"ix_seen_keys_seen", "seen_keys_pkey"},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_query_reads_an_index_not_the_history(planner: Planner, name: str) -> None:
    case = CASES[name]
    expected = case.sqlite if planner.store.dialect == "sqlite" else case.postgres
    used: set[str] = set()
    for statement, accesses in planner.accesses(case.call):
        for access in accesses:
            if access.table not in GROWING:
                continue
            assert access.index is not None and access.bounded, (
                f"{name}: {statement}\nreads {access.table} whole: {accesses}"
            )
            used.add(access.index)
    if planner.store.dialect == "sqlite":
        assert used == expected, name
    else:
        assert used <= expected, name
        assert bool(used) == bool(expected), name


def test_a_prune_batch_deletes_through_ix_outbox_state(planner: Planner) -> None:
    """The batch that deletes old sent rows (nothing is old enough here, so nothing goes)."""
    before = planner.store.backlog()
    plans = planner.accesses(lambda s: s.prune_batch("sent", 365 * DAY, NOW))
    picked = [a for _, accesses in plans for a in accesses if a.table == "outbox"]
    assert picked and all(a.bounded for a in picked)
    assert "ix_outbox_state" in {a.index for a in picked}
    assert planner.store.backlog() == before


def test_sqlite_claims_stay_on_ix_outbox_due_with_a_pending_backlog(tmp_path: Path) -> None:
    """Without statistics SQLite would count every pending row through ix_outbox_state (an
    equality on its first column looks cheap): the hint keeps claims and the idle sleep's
    question on the due index, whatever the planner guesses."""
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        planner = Planner(store)
        try:
            for call in (
                lambda s: s.claim("w", 16, NOW, LEASE),
                lambda s: s.next_due(NOW),
            ):
                (statement, accesses), *_ = [p for p in planner.accesses(call) if "outbox" in p[0]]
                assert "INDEXED BY ix_outbox_due" in statement
                assert any(a.index == "ix_outbox_due" for a in accesses)
        finally:
            planner.close()


def test_the_check_sees_a_whole_read(planner: Planner) -> None:
    """The check itself can fail: a query no index serves is reported as a read of it all."""

    def by_body(s: Store) -> object:
        with s.engine.connect() as conn:
            return conn.exec_driver_sql("SELECT id FROM outbox WHERE body = 'x'").all()

    ((_, accesses),) = planner.accesses(by_body)
    assert [a for a in accesses if a.table == "outbox" and not a.bounded]


def test_the_state_counts_are_read_and_folded_off_their_index(store_url: str) -> None:
    """PostgreSQL's appends churn ``outbox_counts``, and the pages autovacuum frees stay
    allocated: after a busy spell of 50,000 appends, folded and vacuumed, /healthz's read and
    the leader's fold go through ix_outbox_counts_state, not through every page. (SQLite keeps
    one row per state, moved in place: its read takes the index all the same.)"""
    with Store(store_url) as store:
        store.enqueue("r", "k", [(URL, body(1))], now=NOW)
        postgres = store.dialect == "postgresql"
        if postgres:
            with store.engine.begin() as conn:
                conn.exec_driver_sql(
                    "INSERT INTO outbox_counts (state, n) "
                    "SELECT 'sent', 0 FROM generate_series(1, 50000)"
                )
            store.fold_counts()
            with store.engine.connect() as conn:
                conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                    "VACUUM ANALYZE outbox_counts"
                )
        planner = Planner(store)
        try:
            calls = [lambda s: s.backlog()] + ([lambda s: s.fold_counts()] if postgres else [])
            for call in calls:
                statement, accesses = planner.accesses(call)[0]
                assert "outbox_counts" in statement
                assert {a.index for a in accesses} == {"ix_outbox_counts_state"}, statement
        finally:
            planner.close()
        assert store.backlog()["pending"] == 1
