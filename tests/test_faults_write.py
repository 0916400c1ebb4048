"""Fault isolation on the write path (issue 7, points 1, 2 and 7).

1. One bad fire fails alone: a poison event, a fire the outbox refuses, or two POSTs sharing an
   Idempotency-Key in one write batch do not fail the fires that arrived with them.
2. A scheduled fire whose write fails is written again, within ``catch_up``, and the mark does
   not move past it meanwhile.
7. Another process holding SQLite's write lock does not stall the daemon's event loop.

The daemon tests drive a real ``pushrules run`` process (tests/daemon_process.py) against the
sandbox Accengage, and hold the write lock from this process with ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from engine.accengage.sandbox import RunningSandbox, SandboxConfig, start_in_thread
from engine.daemon.clock import Clock
from engine.daemon.scheduler import MARK_SCOPE, Scheduler
from engine.outbox import firing
from engine.outbox.batching import Coalescer
from engine.outbox.connections import busy_timeout, is_busy
from engine.outbox.firing import FireRequest, fire_many
from engine.outbox.states import IN_DOUBT, SENDING, SENT
from engine.outbox.store import Store
from engine.render.compiler import FireContext
from tests.conftest import StartDaemon
from tests.daemon_process import HTTP, Daemon, Project, started_before, texts, wait_for
from tests.helpers import load, make_project, write_rule
from tests.test_scheduler import MemoryMarks, make_rule

# --------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """SQLite's write lock on ``path``, held by this process (as a backup or a second
    program would) until the block ends."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def timed_get(url: str) -> tuple[float, httpx.Response]:
    started = time.monotonic()
    response = HTTP.get(url, timeout=30.0)
    return time.monotonic() - started, response


# --------------------------------------------------------------------------- point 1, units


def test_a_batch_failing_because_of_one_item_fails_that_item_only() -> None:
    """Callers coalesced into one flush each get their own result or their own error."""

    async def flush(items: list[int]) -> list[int]:
        await asyncio.sleep(0.01)
        if 13 in items:
            raise ValueError("13 is poison")
        return [i * 10 for i in items]

    async def scenario() -> list[Any]:
        coalescer: Coalescer[int, int] = Coalescer(flush)
        return await asyncio.gather(
            *(coalescer.submit(i) for i in range(10, 16)), return_exceptions=True
        )

    results = asyncio.run(scenario())
    assert results[:3] == [100, 110, 120] and results[4:] == [140, 150]
    assert isinstance(results[3], ValueError) and "poison" in str(results[3])


def test_a_fault_that_is_no_items_goes_to_all_without_a_flush_each() -> None:
    calls: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        calls.append(items)
        raise ConnectionError("database gone")

    async def scenario() -> list[Any]:
        coalescer: Coalescer[int, int] = Coalescer(flush, split=lambda _: False)
        return await asyncio.gather(
            *(coalescer.submit(i) for i in range(5)), return_exceptions=True
        )

    assert all(isinstance(r, ConnectionError) for r in asyncio.run(scenario()))
    assert calls == [[0, 1, 2, 3, 4]]


RULE = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Hi {{ event.member }}"
targets:
  - memberId: "{{ event.member }}"
"""
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture
def one_rule(tmp_path: Path) -> Iterator[tuple[Store, Any, Any]]:
    root = make_project(tmp_path / "p")
    write_rule(root, "r", RULE)
    ruleset = load(root)
    assert ruleset.ok, ruleset.problems
    with Store(f"sqlite:///{tmp_path / 'out.db'}") as store:
        yield store, ruleset.project, ruleset.rules["r"]


def test_a_fire_raising_anything_while_rendering_fails_alone(
    one_rule: tuple[Store, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only CompileError: an unbounded template (RecursionError) or a bug fails its fire."""
    store, project, rule = one_rule
    real = firing.compile_steps

    def compile_steps(rule: Any, project: Any, ctx: FireContext, **kw: Any) -> Any:
        if ctx.event.get("member") == "poison":
            raise RecursionError("maximum recursion depth exceeded")
        return real(rule, project, ctx, **kw)

    monkeypatch.setattr(firing, "compile_steps", compile_steps)
    members = ["a", "poison", "b"]
    requests = [
        FireRequest(rule, FireContext(now=NOW, event={"member": m}), f"event:{m}") for m in members
    ]
    outcomes = fire_many(store, project, requests, now=NOW)
    assert [o.status for o in outcomes] == ["queued", "failed", "queued"]
    assert "RecursionError" in outcomes[1].detail
    assert store.backlog()["pending"] == 2


def test_a_fire_the_outbox_refuses_fails_alone(one_rule: tuple[Store, Any, Any]) -> None:
    store, project, rule = one_rule
    keys = ["event:a", "event:" + "x" * 1200, "event:b"]  # the middle key is too long to keep
    requests = [FireRequest(rule, FireContext(now=NOW, event={"member": "m"}), k) for k in keys]
    outcomes = fire_many(store, project, requests, now=NOW)
    assert [o.status for o in outcomes] == ["queued", "failed", "queued"]
    assert "idem_key" in outcomes[1].detail and "1000" in outcomes[1].detail
    assert store.backlog()["pending"] == 2


def test_the_same_fire_twice_in_one_batch_is_one_fire(one_rule: tuple[Store, Any, Any]) -> None:
    store, project, rule = one_rule
    ctx = FireContext(now=NOW, event={"member": "m"})
    requests = [FireRequest(rule, ctx, "event:same"), FireRequest(rule, ctx, "event:other")] * 3
    outcomes = fire_many(store, project, requests, now=NOW)
    assert [o.status for o in outcomes] == ["queued", "queued"] + ["duplicate"] * 4
    assert outcomes[2].ids == outcomes[0].ids and outcomes[3].ids == outcomes[1].ids
    assert store.backlog()["pending"] == 2


def test_a_short_busy_timeout_fails_fast_and_says_so(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'out.db'}") as store:
        with write_lock(tmp_path / "out.db"):
            started = time.monotonic()
            with busy_timeout(0.2), pytest.raises(Exception) as caught:
                store.set_mark("s", "n", NOW)
            assert time.monotonic() - started < 2
            assert is_busy(caught.value)
        store.set_mark("s", "n", NOW)  # the default wait applies again outside the block
        assert store.get_mark("s", "n") == NOW


@contextlib.contextmanager
def table_lock(url: str, *, at_most: float = 10.0) -> Iterator[None]:
    """PostgreSQL: another session holding ``LOCK TABLE outbox IN EXCLUSIVE MODE`` (readers
    pass, writers wait) until the block ends, or ``at_most`` seconds, whichever comes first:
    a store call that waits for it without limit then returns late instead of hanging."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("LOCK TABLE outbox IN EXCLUSIVE MODE")
                locked.set()
                release.wait(at_most)
                conn.rollback()
        finally:
            locked.set()
            engine.dispose()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert locked.wait(10), "could not take the table lock"
    try:
        yield
    finally:
        release.set()
        holder.join(10)


@pytest.mark.postgres
def test_a_short_busy_timeout_fails_fast_on_postgresql_too(postgres_store: str) -> None:
    """Inside busy_timeout a lock held by another session fails the write within the limit,
    as busy (nothing written, so made again as it was); outside it the write waits."""
    request = [("https://example.test/push", {"sendInstantMessage": {"n": 1}})]
    with Store(postgres_store) as store:
        with table_lock(postgres_store, at_most=5):
            started = time.monotonic()
            with busy_timeout(0.3), pytest.raises(OperationalError) as caught:
                store.enqueue("r", "k", request, now=NOW)
            assert 0.25 < time.monotonic() - started < 1.5
            assert is_busy(caught.value)
        assert store.enqueue("r", "k", request, now=NOW).created  # nothing was left behind

        # Outside the block the limit is gone, also on the pooled connection that had it.
        with table_lock(postgres_store, at_most=1.0):
            started = time.monotonic()
            assert store.enqueue("r", "k2", request, now=NOW).created
            assert time.monotonic() - started > 0.8


# --------------------------------------------------------------------------- point 1, daemon

EVENT_RULE = "event: order"
#: Renders for any n but 0: the poison event divides by zero at render time.
EVENT_TEXT = "order {{ event.id }} share {{ 100 // event.n }}"


@pytest.mark.e2e
def test_one_poison_event_and_shared_keys_fail_no_innocent_event(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    project = Project(tmp_path / "p", sandbox.url)
    project.rule("order", EVENT_RULE, EVENT_TEXT)
    daemon = daemons(project)

    good = [({"id": f"g{i}", "n": 1 + i % 7}, f"good-{i}") for i in range(100)]
    shared = [({"id": "shared", "n": 1}, "shared-key")] * 20  # one client retrying eagerly
    poison = [({"id": "poison", "n": 0}, "poison-key")]
    posts = good[:50] + shared[:10] + poison + good[50:] + shared[10:]
    with ThreadPoolExecutor(max_workers=24) as pool:
        answers = list(pool.map(lambda p: daemon.post("order", p[0], key=p[1]), posts))
    by_key: dict[str, list[httpx.Response]] = {}
    for (_, key), answer in zip(posts, answers, strict=True):
        by_key.setdefault(key, []).append(answer)

    for i in range(100):
        (answer,) = by_key[f"good-{i}"]
        assert answer.status_code == 202, answer.text
        assert answer.json()["rules"][0]["status"] == "queued"
    shared_answers = by_key["shared-key"]
    assert [a.status_code for a in shared_answers] == [202] * 20, [a.text for a in shared_answers]
    statuses = Counter(a.json()["rules"][0]["status"] for a in shared_answers)
    assert statuses == {"queued": 1, "duplicate": 19}
    (refused,) = by_key["poison-key"]
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert "rule order" in error and "division" in error, error
    assert refused.json()["rules"][0]["status"] == "failed"

    expected = {f"order g{i} share {100 // (1 + i % 7)}" for i in range(100)} | {
        "order shared share 100"
    }
    wait_for(
        lambda: set(texts(sandbox)) >= expected,
        "every accepted event to reach the sandbox",
        timeout=30,
        log=daemon.log,
    )
    time.sleep(0.5)  # anything sent twice would arrive now
    sent = texts(sandbox)
    assert set(sent) == expected and set(sent.values()) == {1}
    rows = project.rows("order")
    assert len(rows) == 101 and {r.state for r in rows} == {SENT}


# --------------------------------------------------------------------------- point 2, daemon


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in a Prometheus exposition (0 when absent)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.M)
    return sum(float(v) for v in pattern.findall(text))


def raw_mark(conn: sqlite3.Connection, rule: str) -> datetime | None:
    row = conn.execute(
        "SELECT at FROM marks WHERE scope = 'schedule' AND name = ?", (rule,)
    ).fetchone()
    return None if row is None else datetime.fromisoformat(row[0]).replace(tzinfo=UTC)


#: Daemons facing a lock held by another process: a fire write gives up after 500 ms (2 s by
#: default), so the retries these tests wait for come sooner.
#: Each fire is written at its time (not ahead), after the test has taken the lock.
LOCKED = {"daemon.lock_wait": "500ms", "daemon.fire_ahead": "none"}


def ticking(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon, store_url: str | None = None
) -> Callable[[str, int], Daemon]:
    """Starts a daemon on a fresh project with an every-minute cron rule (see started_before:
    each attempt has its own project, so a slow start leaves nothing behind; on SQLite its own
    store too)."""

    def start(clock: str, attempt: int) -> Daemon:
        project = Project(tmp_path / f"p{attempt}", sandbox.url, timing=LOCKED, store_url=store_url)
        project.rule("tick", 'cron: "* * * * *"\ntimezone: UTC', "tick at {{ now }}")
        return daemons(project, clock=clock, name=f"run{attempt}")

    return start


@pytest.mark.e2e
def test_a_cron_fire_written_while_the_store_is_locked_lands_once(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """The write fails while another process holds the lock; the fire stays pending (health,
    metrics), its mark stays before it, and it lands once the lock is released."""
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    daemon = started_before(ticking(tmp_path, sandbox, daemons), due)
    project = daemon.project
    key = f"schedule:{due.isoformat()}"
    db = project.root / "store.db"

    with write_lock(db) as lock:
        waiting = retried_tick(daemon, due)
        assert "locked" in waiting["last_error"]
        assert waiting["gives_up_at"] == (due + timedelta(minutes=10)).isoformat()
        seconds, response = timed_get(project.url + "/metrics")
        assert seconds < 1.0
        assert metric(response.text, "pushrules_fire_writes_waiting") == 1
        assert metric(response.text, "pushrules_fire_write_retries_total") >= 1
        # Read through the lock's own connection: a Store would wait for the lock.
        assert lock.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        mark = raw_mark(lock, "tick")
        assert mark is None or mark < due

    def landed() -> bool:
        # The mark first: one past the fire must mean the fire was in the outbox already.
        mark = project.mark("tick")
        rows = project.rows("tick")
        if mark is not None and mark >= due:
            assert rows, f"mark {mark} moved past the unwritten fire"
        return bool(rows)

    wait_for(landed, "the fire to land once the lock is gone", timeout=40, log=daemon.log)
    wait_for(lambda: texts(sandbox), "the fire to be sent", timeout=15, log=daemon.log)
    rows = project.rows("tick")
    assert [(r.idem_key, r.chunk) for r in rows] == [(key, 0)]
    assert sum(texts(sandbox).values()) == 1
    # The fire leaves fire_writes_waiting once its mark is written too: on a busy machine that
    # may come after the send.
    daemon.wait_health(lambda h: h["fire_writes_waiting"] == [], "the fire to stop waiting")
    _, response = timed_get(project.url + "/metrics")
    assert metric(response.text, "pushrules_fire_write_retries_total") >= 2
    assert metric(response.text, "pushrules_fire_writes_waiting") == 0
    assert any("is written, after" in m for m in daemon.messages())
    wait_for(
        lambda: (project.mark("tick") or due) > due, "the mark to move past the fire", timeout=40
    )


def retried_tick(daemon: Daemon, due: datetime) -> dict[str, Any]:
    """The /healthz entry of rule tick's fire due at ``due``, once its locked write has been
    retried and reported."""
    report = daemon.wait_health(
        lambda h: any(w["failed_attempts"] >= 2 for w in h["fire_writes_waiting"]),
        "the locked fire write to be retried and reported",
        timeout=25,
    )
    (waiting,) = report["fire_writes_waiting"]
    assert waiting["rule"] == "tick" and waiting["scheduled_at"] == due.isoformat()
    return dict(waiting)


@pytest.mark.e2e
@pytest.mark.postgres
def test_a_cron_fire_written_while_a_postgresql_table_is_locked_lands_once(
    # The schema before the daemons: torn down after them, never dropped under one running.
    tmp_path: Path,
    sandbox: RunningSandbox,
    postgres_store: str,
    daemons: StartDaemon,
) -> None:
    """On PostgreSQL the write gives up after lock_wait too: the fire is retried and listed
    as waiting while the lock is held, not written late when it ends."""
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    daemon = started_before(ticking(tmp_path, sandbox, daemons, postgres_store), due)
    project = daemon.project
    with table_lock(postgres_store, at_most=30):
        waiting = retried_tick(daemon, due)
        assert "lock timeout" in waiting["last_error"]
        assert project.rows("tick") == []  # a reader passes an EXCLUSIVE lock
    wait_for(lambda: texts(sandbox), "the fire to be sent", timeout=30, log=daemon.log)
    assert [(r.idem_key, r.chunk) for r in project.rows("tick")] == [
        (f"schedule:{due.isoformat()}", 0)
    ]
    assert sum(texts(sandbox).values()) == 1


@pytest.mark.e2e
def test_a_fire_left_unwritten_at_stop_is_caught_up_at_the_next_start(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    first = started_before(ticking(tmp_path, sandbox, daemons), due)
    project = first.project
    with write_lock(project.root / "store.db"):
        first.wait_health(
            lambda h: h["fire_writes_waiting"], "the fire write to fail and wait", timeout=20
        )
        first.signal(signal.SIGTERM)
        wait_for(
            lambda: any("SIGTERM received" in m for m in first.messages()),
            "the daemon to begin stopping",
            log=first.log,
        )
        # Stopping, its mark write waiting on the lock. No write attempt starts once it stops,
        # and one already waiting for the lock gives up within lock_wait (0.5 s): held three
        # times that, the fire cannot land before the daemon has left it unwritten.
        time.sleep(1.5)
    assert first.stop(timeout=30) == 0
    assert project.rows("tick") == []
    mark = project.mark("tick")
    assert mark is not None and mark < due

    # Started again 20 s (of its clock) after the fire was due: well within catch_up.
    daemons(project, clock=(due + timedelta(seconds=20)).isoformat())
    wait_for(lambda: project.rows("tick"), "catch-up to write the fire", timeout=20)
    assert [r.idem_key for r in project.rows("tick")] == [f"schedule:{due.isoformat()}"]


# --------------------------------------------------------------------------- point 7, daemon


@pytest.mark.e2e
def test_the_loop_stays_responsive_while_another_process_holds_the_lock(
    tmp_path: Path, daemons: StartDaemon
) -> None:
    """/healthz within a second, an event answered quickly (503 "retry"), and a send that was
    in flight when the lock was taken ends sent, not in_doubt."""
    with start_in_thread(SandboxConfig(latency_ms=1500)) as slow:
        project = Project(tmp_path / "p", slow.url)
        project.rule("ping", "event: ping", "ping {{ event.n }}")
        daemon = daemons(project)
        assert daemon.post("ping", {"n": 1}, key="first").status_code == 202
        wait_for(
            lambda: [r for r in project.rows("ping") if r.state == SENDING],
            "the first send to be in flight",
            log=daemon.log,
        )
        with write_lock(project.root / "store.db"):
            lock_taken = time.monotonic()
            health_times = []
            # Past the first answer (1.5 s), whose result write meets the lock, and past a
            # fire write's wait for it (lock_wait, 2 s: a loop blocked that long would show).
            while time.monotonic() - lock_taken < 3.0:
                seconds, response = timed_get(project.url + "/healthz")
                health_times.append(seconds)
                assert response.status_code == 200, response.text
                time.sleep(0.2)
            started = time.monotonic()
            answer = daemon.post("ping", {"n": 2}, key="second")
            post_seconds = time.monotonic() - started
            assert answer.status_code in (202, 503), answer.text
            if answer.status_code == 503:
                assert "retry" in answer.json()["error"]
                assert answer.headers["retry-after"]
        assert max(health_times) < 1.0, health_times
        assert post_seconds < 4.0
        if answer.status_code == 503:
            assert daemon.post("ping", {"n": 2}, key="second").status_code == 202

        wait_for(
            lambda: (
                {r.state for r in project.rows("ping")} == {SENT} and len(project.rows("ping")) == 2
            ),
            "both events to be sent",
            timeout=40,
            log=daemon.log,
        )
        assert all(r.state != IN_DOUBT for r in project.rows("ping"))
        assert texts(slow) == {"ping 1": 1, "ping 2": 1}


@pytest.mark.e2e
@pytest.mark.postgres
def test_an_event_is_answered_503_within_lock_wait_on_postgresql(
    # The schema before the daemons: torn down after them, never dropped under one running.
    tmp_path: Path,
    sandbox: RunningSandbox,
    postgres_store: str,
    daemons: StartDaemon,
) -> None:
    """Another session holding a table lock the write needs: the event is answered 503
    "retry" after ``lock_wait``, not when the lock is released, and the retry lands once."""
    project = Project(
        tmp_path / "p", sandbox.url, timing={"daemon.lock_wait": "500ms"}, store_url=postgres_store
    )
    project.rule("ping", "event: ping", "ping {{ event.n }}")
    daemon = daemons(project)
    assert daemon.post("ping", {"n": 1}, key="first").status_code == 202
    with table_lock(postgres_store, at_most=8):
        started = time.monotonic()
        answer = daemon.post("ping", {"n": 2}, key="second")
        post_seconds = time.monotonic() - started
        assert answer.status_code == 503, (post_seconds, answer.text)
        assert "retry" in answer.json()["error"] and answer.headers["retry-after"] == "5"
        assert post_seconds < 3.0
        seconds, response = timed_get(project.url + "/healthz")
        assert response.status_code == 200 and seconds < 1.0, response.text
    assert daemon.post("ping", {"n": 2}, key="second").status_code == 202
    wait_for(lambda: texts(sandbox) == {"ping 1": 1, "ping 2": 1}, "both events to be sent")
    # Expected under a held lock: one line saying so, not a traceback per event.
    [said] = [m for m in daemon.messages() if "could not be recorded" in m]
    assert "locked by another writer" in said and "Traceback" not in daemon.log(tail=None)


# --------------------------------------------------------------------------- point 2, unit


def test_a_fire_never_written_is_retried_then_given_up_past_catch_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Until catch_up runs out the fire is retried, listed, and holds the mark before it; then
    it is given up with an error saying how to send it by hand, and the mark moves on."""
    tries: list[datetime] = []
    retried: list[str] = []

    async def on_fire(rule: Any, at: datetime, key: str) -> None:
        tries.append(at)
        raise RuntimeError("database is locked")

    async def on_poll(rule: Any, at: datetime) -> None:
        return None

    async def scenario() -> None:
        marks = MemoryMarks()
        sched = Scheduler(
            Clock(),
            marks,
            on_fire,
            on_poll,
            on_retry=retried.append,
            retry_base=0.2,
            retry_max=0.4,
            mark_every=timedelta(seconds=0.1),
        )
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        rules = {"once": make_rule("once", {"at": due.isoformat()}, catch_up=timedelta(seconds=2))}
        await sched.start()
        try:
            sched.apply(rules)
            await sched.catch_up(rules)
            while not sched.waiting_writes():
                await asyncio.sleep(0.05)
            (waiting,) = sched.waiting_writes()
            assert waiting["scheduled_at"] == due.isoformat()
            assert "database is locked" in waiting["last_error"]
            while sched.waiting_writes():
                mark = marks.get_mark(MARK_SCOPE, "once")
                assert mark is None or mark < due
                await asyncio.sleep(0.05)
            # Given up: a periodic mark write (every 0.1 s) moves the mark past it.
            async with asyncio.timeout(5):
                while (marks.get_mark(MARK_SCOPE, "once") or due) <= due:
                    await asyncio.sleep(0.05)
        finally:
            await sched.shutdown()

    with caplog.at_level(logging.WARNING, logger="pushrules.scheduler"):
        asyncio.run(asyncio.wait_for(scenario(), 15))
    assert len(tries) >= 4 and len(set(tries)) == 1
    assert retried and set(retried) == {"once"} and len(retried) == len(tries) - 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "given up" in errors[0] and "pushrules send once" in errors[0]


@pytest.mark.e2e
def test_healthz_answers_503_while_the_store_cannot_be_written(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """A full disk (here: a file-size limit on the daemon, so its reads work and its writes
    fail): events were answered 503, yet /healthz said 200 ok. Not a lock (which is waited out
    and stays 200): a store that cannot take writes is a daemon that cannot send."""
    import resource
    import subprocess
    import sys

    project = Project(tmp_path / "p", sandbox.url)
    project.rule("ping", "event: ping", "ping {{ event.n }}")
    env = {"ACCENGAGE_LOGIN": "test-login", "ACCENGAGE_PASSWORD": "test-password"}
    argv = [sys.executable, "-m", "engine", "run", "--project", str(project.root)]

    def run(limit: int | None) -> subprocess.Popen[bytes]:
        def full_disk() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        process = subprocess.Popen(  # output to a pipe: the limit would cut a log file too
            argv,
            env={**os.environ, **env},
            cwd=project.root,
            preexec_fn=full_disk,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: _answers(project.url), "the daemon to answer /healthz", timeout=30)
        return process

    first = run(None)  # makes the store, then stops
    first.terminate()
    first.communicate(timeout=30)
    daemon = run(40 * 1024)
    try:
        codes = []  # until the store's files reach the limit
        while 503 not in codes and len(codes) < 200:
            post = HTTP.post(f"{project.url}/events/ping", json={"n": len(codes)}, timeout=10)
            codes.append(post.status_code)
        assert codes[-1] == 503 and set(codes) <= {202, 503}, codes
        health = HTTP.get(f"{project.url}/healthz", timeout=5)
        assert health.status_code == 503, health.text
        assert any("cannot be written" in p for p in health.json()["problems"])
    finally:
        daemon.terminate()
        daemon.communicate(timeout=30)


def _answers(url: str) -> bool:
    try:
        HTTP.get(url + "/healthz", timeout=1.0)
    except httpx.HTTPError:
        return False
    return True


@pytest.mark.e2e
def test_a_refusal_to_start_is_a_json_line_under_log_format_json(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """A store newer than the code is refused, its message a log line like the others (it was
    printed as plain text, which a JSON log collector drops)."""
    import subprocess
    import sys

    from engine.outbox.schema import SCHEMA_VERSION

    project = Project(tmp_path / "p", sandbox.url)
    Store(project.store_url).close()
    with sqlite3.connect(project.root / "store.db") as conn:
        conn.execute(
            "INSERT INTO schema_version VALUES (?, '2026-01-01 00:00:00')", (SCHEMA_VERSION + 1,)
        )
    env = {**os.environ, "ACCENGAGE_LOGIN": "l", "ACCENGAGE_PASSWORD": "p"}
    argv = [sys.executable, "-m", "engine", "run", "--project", str(project.root)]
    done = subprocess.run(
        [*argv, "--log-format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is JSON
    assert any("newer than this pushrules" in e["message"] for e in entries), lines
