"""Issue 12 point 1: retention. What is pruned, what never is, and that pruning is safe when it
is cut short, when it meets a concurrent operator, and for feeds (no item is ever sent twice
because its key was forgotten while the feed still listed it); with the state counts that
``/healthz`` reads, which must stay exactly a count of the outbox through every move.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.exc import OperationalError

from engine.cli.main import main
from engine.daemon import maintenance as maintenance_module
from engine.daemon.maintenance import Maintenance
from engine.daemon.poller import Poller
from engine.outbox.retention import KINDS, feed_scope, primed_scope, prune
from engine.outbox.schema import outbox
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
from engine.outbox.store import Fire, ResultUpdate, Store
from engine.rules.project import RetentionConfig
from tests.helpers import LEASE, T0, URL, body, make_project, ok
from tests.test_poller import FeedServer, Items, poll_rule
from tests.test_poller import server as server

DAY = timedelta(days=1)
KEEP = RetentionConfig()  # 90 days of everything


def counted(store: Store) -> dict[str, int]:
    """The outbox counted row by row: what ``backlog()`` must equal."""
    counts = dict.fromkeys(STATES, 0)
    with store.engine.connect() as conn:
        for state, n in conn.execute(select(outbox.c.state, func.count()).group_by(outbox.c.state)):
            counts[state] = n
    return counts


def send(store: Store, ids: list[int], state: str, at: datetime) -> None:
    """Claim ``ids`` at ``at`` and record ``state`` for each."""
    rows = store.claim_ids("w", ids, at, LEASE)
    nxt = at + timedelta(minutes=1) if state == RETRYING else None
    store.record_results([ResultUpdate(r.id, ok(at), state, nxt, r.claimed_by) for r in rows])


def one_of_each(store: Store, at: datetime) -> dict[str, int]:
    """A row in every state, all created and last moved at ``at``: state -> row id."""
    ids = store.enqueue_many([Fire("r", f"{s}", [(URL, body(s))]) for s in STATES], now=at)
    rows = {s: r.ids[0] for s, r in zip(STATES, ids, strict=True)}
    results = (SENT, RETRYING, FAILED, DEAD, IN_DOUBT)
    claims = {
        r.id: r.claimed_by for r in store.claim_ids("w", [rows[s] for s in results], at, LEASE)
    }
    store.record_results(
        [
            ResultUpdate(rows[s], ok(at), s, at + DAY if s == RETRYING else None, claims[rows[s]])
            for s in results
        ]
    )
    store.hold(ids=[rows[HELD]], now=at)
    store.drop(rows[DROPPED], now=at)
    store.claim_ids("w", [rows[SENDING]], at, LEASE)
    assert {s: store.get(i).state for s, i in rows.items()} == {s: s for s in STATES}  # type: ignore[union-attr]
    return rows


# --- the state counts -------------------------------------------------------------------------


def test_backlog_is_a_count_of_the_outbox_through_every_move(store: Store) -> None:
    """Every way a row moves (and is deleted) keeps the counts exact; on PostgreSQL with and
    without the counts folded in between."""
    steps: list[Callable[[], object]] = []
    ids: dict[str, list[int]] = {}

    def check() -> None:
        assert store.backlog() == counted(store)

    def enqueue() -> None:
        ids["a"] = store.enqueue("r", "a", [(URL, body(i)) for i in range(6)], now=T0).ids
        ids["held"] = store.enqueue("r", "h", [(URL, body(9))], now=T0, state=HELD).ids
        store.enqueue("r", "a", [(URL, body(0))], now=T0)  # a duplicate adds nothing

    def results() -> None:
        a = ids["a"]
        rows = store.claim("w", 5, T0, LEASE)
        updates = [SENT, RETRYING, FAILED, DEAD, IN_DOUBT]
        store.record_results(
            [
                ResultUpdate(r.id, ok(T0), s, T0 + DAY if s == RETRYING else None, r.claimed_by)
                for r, s in zip(rows, updates, strict=True)
            ]
        )
        assert store.get(a[5]).state == PENDING  # type: ignore[union-attr]

    steps += [enqueue, results]
    steps.append(lambda: store.release(ids=ids["held"], now=T0))
    steps.append(lambda: store.hold(rule="r", now=T0))
    steps.append(lambda: store.drop_unsent(rule="r", now=T0))
    steps.append(lambda: store.resend(ids["a"][2], now=T0))  # failed -> pending
    steps.append(lambda: store.claim_ids("w", [ids["a"][2]], T0, LEASE))
    steps.append(lambda: store.reclaim(T0 + DAY))  # its lease ran out: parked
    steps.append(lambda: store.drop(ids["a"][3], now=T0))  # dead -> dropped
    steps.append(lambda: prune(store, KEEP, T0 + 200 * DAY))  # sent and dropped go
    for step in steps:
        step()
        check()
        if store.dialect == "postgresql":
            assert store.fold_counts() >= 0
            check()
    assert store.backlog()[SENT] == store.backlog()[DROPPED] == 0
    assert sum(store.backlog().values()) == len(store.history(limit=1000)) > 0


def test_folding_while_instances_write_counts_nothing_twice(postgres_store: str) -> None:
    """Writers and folds at once (several instances on one PostgreSQL): the counts stay exact.
    PostgreSQL only: SQLite's counts are kept in place, by one writer at a time, with no fold."""
    with Store(postgres_store) as store:
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for i in range(15):
                    got = store.enqueue(f"r{n}", f"k{i}", [(URL, body(i))] * 2, now=T0)
                    send(store, got.ids, SENT if i % 2 else FAILED, T0)
                    if i % 3 == 0:
                        store.drop_unsent(rule=f"r{n}", now=T0)
            except BaseException as exc:  # reported below
                errors.append(exc)

        def folder() -> None:
            while not stop.is_set():
                store.fold_counts()

        folding = threading.Thread(target=folder)
        folding.start()
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        folding.join()
        assert not errors
        assert store.backlog() == counted(store)
        assert store.backlog()[SENT] == 4 * 7 * 2


# --- what is pruned ---------------------------------------------------------------------------


def test_only_old_sent_and_dropped_rows_go_with_their_attempts(store: Store) -> None:
    old = one_of_each(store, T0)
    young = store.enqueue("young", "k", [(URL, body(1))], now=T0 + 80 * DAY).ids
    send(store, young, SENT, T0 + 80 * DAY)
    # created long ago but dropped recently: kept, counted from its last move
    late = store.enqueue("late", "k", [(URL, body(2))], now=T0, state=HELD).ids[0]
    store.drop(late, now=T0 + 80 * DAY)
    attempts_before = _attempts(store)

    now = T0 + 100 * DAY
    assert prune(store, KEEP, now, dry_run=True) == {
        "sent": 1,
        "dropped": 1,
        "unmatched_events": 0,
        "marks": 0,
        "feed_keys": 0,
    }
    assert store.get(old[SENT]) is not None  # a dry run deletes nothing
    assert prune(store, KEEP, now)["sent"] == 1

    assert store.get(old[SENT]) is None and store.get(old[DROPPED]) is None
    kept = {s: store.get(i) for s, i in old.items() if s not in (SENT, DROPPED)}
    assert {s: r.state for s, r in kept.items() if r} == {s: s for s in kept}
    assert store.get(young[0]) is not None and store.get(late) is not None
    # the pruned rows' attempts went with them; every other row keeps all of its own
    after = _attempts(store)
    assert old[SENT] in attempts_before and old[SENT] not in after
    assert {k: v for k, v in attempts_before.items() if k != old[SENT]} == after
    assert store.backlog() == counted(store)


def _attempts(store: Store) -> dict[int, int]:
    with store.engine.connect() as conn:
        found = conn.execute(
            text("SELECT outbox_id, count(*) FROM attempts GROUP BY outbox_id")
        ).all()
    return {outbox_id: n for outbox_id, n in found}


def test_pruning_goes_by_batches_and_a_kind_kept_forever_stays(store: Store) -> None:
    ids = store.enqueue_many([Fire("r", f"k{i}", [(URL, body(i))]) for i in range(25)], now=T0)
    send(store, [r.ids[0] for r in ids], SENT, T0)
    store.drop_unsent(now=T0)
    now = T0 + 100 * DAY
    assert store.prune_batch("sent", 90 * DAY, now, limit=10) == 10
    assert store.backlog()[SENT] == 15
    forever = RetentionConfig(sent=None)
    assert prune(store, forever, now, batch=10)["sent"] is None
    assert store.backlog()[SENT] == 15
    assert prune(store, KEEP, now, batch=10)["sent"] == 15
    assert store.backlog()[SENT] == 0


def test_events_marks_and_ended_pauses_go_when_old(store: Store) -> None:
    now = T0 + 100 * DAY
    for i, age in enumerate((95, 91, 10)):
        store.record_unmatched("nobody", f"e{i}", "no rule", "{}", now=now - age * DAY)
    store.set_mark("schedule", "deleted-rule", now - 120 * DAY)
    store.set_mark("schedule", "running-rule", now - timedelta(seconds=30))
    store.pause("ended-long-ago", now - 95 * DAY, now=now - 96 * DAY)
    store.pause("until-resumed", None, now=now - 200 * DAY)
    store.pause("ends-tomorrow", now + DAY, now=now - 200 * DAY)
    assert prune(store, KEEP, now, dry_run=True)["unmatched_events"] == 2
    done = prune(store, KEEP, now)
    assert (done["unmatched_events"], done["marks"]) == (2, 2)
    assert [e.key for e in store.unmatched()] == ["e2"]
    assert store.get_mark("schedule", "deleted-rule") is None
    assert store.get_mark("schedule", "running-rule") is not None
    assert set(store.paused(now)) == {"until-resumed", "ends-tomorrow"}


# --- faults -----------------------------------------------------------------------------------


def test_a_prune_cut_short_mid_batch_loses_nothing(store: Store) -> None:
    """The process dies between deleting a batch's attempts and its rows: the transaction
    rolls back whole, and the next prune does the job."""
    rows = one_of_each(store, T0)
    before = (_attempts(store), store.backlog())

    def crash(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM OUTBOX"):
            raise KeyboardInterrupt("killed")

    event.listen(store.engine, "before_cursor_execute", crash)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.prune_batch("sent", 90 * DAY, T0 + 100 * DAY)
    finally:
        event.remove(store.engine, "before_cursor_execute", crash)
    assert (_attempts(store), store.backlog()) == before
    assert store.get(rows[SENT]) is not None
    assert store.prune_batch("sent", 90 * DAY, T0 + 100 * DAY) == 1
    assert store.get(rows[SENT]) is None


def test_a_row_an_operator_holds_is_not_pruned_under_them(postgres_store: str) -> None:
    """PostgreSQL: a dropped row an operator is resending (its row locked) is skipped by the
    batch, and stays pending once resent. (SQLite writers take the whole store in turn: there
    is nothing to interleave.)"""
    with Store(postgres_store) as store:
        kept, gone = [
            r.ids[0]
            for r in store.enqueue_many(
                [Fire("r", k, [(URL, body(k))]) for k in ("kept", "gone")], now=T0
            )
        ]
        store.drop_unsent(now=T0)
        operator = create_engine(postgres_store)
        try:
            with operator.begin() as conn:
                conn.execute(select(outbox.c.id).where(outbox.c.id == kept).with_for_update())
                assert store.prune_batch("dropped", 90 * DAY, T0 + 100 * DAY) == 1
                conn.execute(outbox.update().where(outbox.c.id == kept).values(state=PENDING))
        finally:
            operator.dispose()
        assert store.get(gone) is None
        assert store.get(kept).state == PENDING  # type: ignore[union-attr]
        assert store.prune_batch("dropped", 90 * DAY, T0 + 100 * DAY) == 0
        assert store.backlog() == counted(store)


# --- feed keys --------------------------------------------------------------------------------


def test_feed_keys_go_only_when_polls_stopped_finding_them(store: Store) -> None:
    scope, primed = feed_scope("offers"), primed_scope("offers")
    store.see_keys(scope, ["gone-long-ago", "still-there"], T0)
    store.see_keys(primed, ["cfg"], T0)
    now = T0 + 100 * DAY
    # the feed has not answered since T0: its keys stay, however old
    assert prune(store, KEEP, now)["feed_keys"] == 0
    # it answers again, still listing one of them
    assert store.see_keys(scope, ["still-there"], now) == []
    store.see_keys(primed, ["cfg"], now)
    assert prune(store, KEEP, now)["feed_keys"] == 1
    assert store.see_keys(scope, ["still-there"], now) == []  # not new: kept
    assert store.see_keys(scope, ["gone-long-ago"], now) == ["gone-long-ago"]  # forgotten
    # another feed's keys are its own business
    store.see_keys(feed_scope("other"), ["x"], T0)
    assert prune(store, KEEP, now)["feed_keys"] == 0


def test_see_keys_tells_new_keys_and_never_moves_seen_at_back(store: Store) -> None:
    scope = feed_scope("offers")
    assert store.see_keys(scope, ["a", "b", "a"], T0) == ["a", "b"]
    assert store.see_keys(scope, ["b", "c"], T0 + DAY) == ["c"]
    store.see_keys(scope, ["b"], T0)  # an older poll (another instance) arriving late
    with store.engine.connect() as conn:
        seen = dict(conn.execute(text("SELECT key, seen_at FROM seen_keys")).all())
    assert str(seen["a"]).startswith("2026-03-01") and str(seen["b"]).startswith("2026-03-02")
    many = [f"k{i}" for i in range(1200)]  # more than one statement's worth
    assert store.see_keys(scope, many, T0) == many


class SteppedClock:
    """A clock tests move by hand."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


def test_a_feed_item_listed_for_months_fires_once_through_prunes(
    server: FeedServer,
    store_url: str,
) -> None:
    """A poll every 12 hours for two months with a prune after each, retention 7 days, the
    daemon restarted every 10 days: the item the feed keeps listing never fires again; one that
    leaves the feed for longer than the retention and comes back is new again (as
    docs/operations.md says). On PostgreSQL too, which could not store a feed's primed mark
    before schema 4."""
    feed = server.route("/offers")
    feed.json({"offers": [{"id": "always"}, {"id": "briefly"}]})
    rule = poll_rule(server.url("/offers"), items="offers", key="id")
    got = Items()
    clock = SteppedClock(T0)
    week = RetentionConfig(feed_keys=7 * DAY)

    async def months() -> None:
        with Store(store_url) as store:
            for restart in range(6):  # a new process every 10 days: nothing kept in memory
                poller = Poller(store, got, clock)  # type: ignore[arg-type]
                try:
                    for step in range(restart * 20, restart * 20 + 20):
                        clock.at = T0 + step * timedelta(hours=12)
                        if step == 4:
                            feed.json({"offers": [{"id": "always"}]})  # "briefly" leaves
                        if step == 2 * 20:
                            feed.json({"offers": [{"id": "always"}, {"id": "briefly"}]})
                        result = await poller.poll(rule, clock.at)
                        assert result.ok, result.error
                        prune(store, week, clock.at)
                finally:
                    await poller.aclose()

    asyncio.run(months())
    assert got.keys == ["item:briefly"]  # the first poll recorded both; "briefly" came back


# --- the daemon's housekeeping ---------------------------------------------------------------


class FlakyStore:
    """Counts folds and prunes; fails the prunes it is told to."""

    def __init__(self, fail: int = 0, rows: int = 0) -> None:
        self.fail = fail
        self.rows = rows
        self.folds = 0
        self.batches: list[str] = []

    def fold_counts(self) -> int:
        self.folds += 1
        return 0

    def prune_batch(self, kind: str, keep: timedelta, now: datetime, limit: int = 500) -> int:
        self.batches.append(kind)
        if self.fail:
            self.fail -= 1
            raise OperationalError("DELETE", {}, Exception("database is locked"))
        n, self.rows = min(self.rows, limit), self.rows - min(self.rows, limit)
        return n if kind == "sent" else 0


def test_a_store_error_ends_the_round_and_the_next_one_starts_over() -> None:
    store = FlakyStore(fail=1, rows=7)
    failures: list[int] = []
    pruned: list[tuple[str, int]] = []
    housekeeping = Maintenance(
        store,
        lambda: KEEP,
        lambda: T0,
        on_pruned=lambda kind, n: pruned.append((kind, n)),
        on_failed=lambda: failures.append(1),
        pause=0,
        batch=5,
    )
    assert asyncio.run(housekeeping.prune_round()) == {"sent": 0}
    assert failures == [1] and "database is locked" in (housekeeping.status.last_error or "")
    assert asyncio.run(housekeeping.prune_round()) == dict.fromkeys(KINDS, 0) | {"sent": 7}
    assert pruned == [("sent", 5), ("sent", 2)]
    assert store.batches.count("sent") == 3  # the failed one, then 5 and 2
    assert housekeeping.status.last_finished_at == T0


def test_only_the_leader_folds_and_prunes_and_nothing_stops_it() -> None:
    store = FlakyStore(fail=1_000_000)
    leading = {"now": False}

    async def go() -> None:
        stop = asyncio.Event()
        housekeeping = Maintenance(
            store, lambda: KEEP, lambda: T0, fold_every=0, prune_every=0, pause=0
        )
        task = asyncio.create_task(housekeeping.run(stop, lambda: leading["now"]))
        for _ in range(20):
            await asyncio.sleep(0)
        assert (store.folds, store.batches) == (0, [])
        leading["now"] = True
        while len(store.batches) < 3:  # every round fails; the loop goes on
            await asyncio.sleep(0)
        stop.set()
        await task

    asyncio.run(go())
    assert store.folds >= 3


def test_a_prune_batch_waits_little_for_sqlites_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fire holding the write lock makes the round give up quickly, not wait 15 s."""
    monkeypatch.setattr(maintenance_module, "WRITE_WAIT", 0.05)
    url = f"sqlite:///{tmp_path / 'o.db'}"
    with Store(url) as store:
        store.enqueue("r", "k", [(URL, body(1))], now=T0)
        store.drop_unsent(now=T0)
        housekeeping = Maintenance(store, lambda: KEEP, lambda: T0 + 100 * DAY, pause=0)
        with store.engine.begin():  # BEGIN IMMEDIATE: the lock a writer holds
            done = asyncio.run(housekeeping.prune_round())
        assert done == {"sent": 0}
        assert "locked" in (housekeeping.status.last_error or "")
        assert asyncio.run(housekeeping.prune_round())["dropped"] == 1


# --- the command ------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    config.write_text(
        config.read_text().replace("store: sqlite:///pushrules.db", "")
        + f"store: sqlite:///{tmp_path / 'out.db'}\nretention:\n  sent: 30d\n  marks: forever\n"
    )
    yield root


def test_outbox_prune_counts_then_prunes(
    project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["outbox", "prune", "--project", str(project)]) == 0
    assert "no outbox yet" in capsys.readouterr().err
    with Store(f"sqlite:///{tmp_path / 'out.db'}") as store:
        now = datetime.now(UTC)
        old = store.enqueue("r", "old", [(URL, body(1))], now=now - 40 * DAY).ids
        send(store, old, SENT, now - 40 * DAY)
        store.enqueue("r", "held", [(URL, body(2))], now=now - 400 * DAY, state=HELD)
    assert main(["outbox", "prune", "--dry-run", "--project", str(project)]) == 0
    out, err = capsys.readouterr()
    assert "sent rows (with their attempts)" in out and "kept 30d" in out and "1 would go" in out
    assert "kept forever" in out and "dry run: nothing was deleted" in err
    assert main(["outbox", "prune", "--project", str(project)]) == 0
    assert "1 pruned" in capsys.readouterr().out
    with Store(f"sqlite:///{tmp_path / 'out.db'}") as store:
        assert store.backlog()[SENT] == 0 and store.backlog()[HELD] == 1
