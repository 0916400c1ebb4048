"""Scheduled fires written ahead of their time (``daemon.fire_ahead``): they leave at their
time, a rule changed meanwhile takes back what its old version wrote, and a daemon started
again takes back what it will decide anew, so nothing is sent twice, late, or not at all."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.daemon.clock import Clock
from engine.daemon.scheduler import Scheduler
from engine.outbox.keys import fire_key, scheduled_for
from engine.outbox.states import HELD, PENDING, SENT
from engine.outbox.store import Fire, Store
from engine.rules.rule import Rule
from tests.conftest import StartDaemon
from tests.daemon_process import Daemon, Project, started_before, texts, wait_for
from tests.helpers import URL, body
from tests.test_scheduler import MemoryMarks, make_rule, run

DUE = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
BEFORE = DUE - timedelta(seconds=5)


def write(store: Store, rule: str, at: datetime, *, written: datetime, chunks: int = 1) -> int:
    """A scheduled fire of ``rule`` for ``at``, written at ``written``; its first row id."""
    fire = Fire(rule, fire_key(at), [(URL, body(f"{rule}-{i}")) for i in range(chunks)])
    (result,) = store.enqueue_many([fire], now=written, not_before=max(at, written))
    return result.ids[0]


def keys(store: Store) -> Counter[tuple[str, str]]:
    return Counter((r.rule, r.idem_key) for r in store.history(limit=100))


def test_a_scheduled_key_names_its_instant() -> None:
    assert scheduled_for(fire_key(DUE)) == DUE
    assert scheduled_for("schedule:nonsense") is None
    assert scheduled_for("order-42") is None
    assert scheduled_for("schedule:2026-03-02T09:00:00") is None  # no offset: not ours


def test_only_fires_written_ahead_and_not_yet_due_are_taken_back(store: Store) -> None:
    ahead = write(store, "a", DUE, written=BEFORE, chunks=3)
    on_time = write(store, "b", DUE, written=DUE)  # written at its time: never taken back
    deferred = write(store, "c", BEFORE, written=BEFORE + timedelta(seconds=1))  # quiet hours
    other = write(store, "d", DUE, written=BEFORE)  # a rule not named
    taken = store.withdraw_ahead({"a": BEFORE, "b": BEFORE, "c": BEFORE - timedelta(hours=1)})
    assert taken == 1
    assert store.get(ahead) is None
    assert store.get(ahead + 1) is None and store.get(ahead + 2) is None  # the whole fire
    assert {store.get(i).state for i in (on_time, deferred, other)} == {PENDING}  # type: ignore[union-attr]
    assert store.backlog()[PENDING] == 3  # the counts follow the rows taken back


def test_a_fire_whose_time_is_not_after_the_bound_stays(store: Store) -> None:
    row = write(store, "a", DUE, written=BEFORE)
    assert store.withdraw_ahead({"a": DUE}) == 0  # the mark is at its time: it was handled
    assert store.withdraw_ahead({"a": DUE + timedelta(minutes=1)}) == 0
    assert store.get(row) is not None
    # Rules not named fall to ``otherwise``: a rule no longer scheduled loses its fires.
    assert store.withdraw_ahead({}, datetime.min.replace(tzinfo=UTC)) == 1
    assert store.get(row) is None


def test_a_fire_partly_claimed_or_tried_is_never_taken_back(store: Store) -> None:
    first = write(store, "a", DUE, written=BEFORE, chunks=2)
    # A person sends one of its rows early (`pushrules send`): the fire is on its way.
    [claimed] = store.claim_ids("someone", [first], BEFORE, timedelta(minutes=1))
    assert claimed.id == first
    assert store.withdraw_ahead({"a": BEFORE}) == 0
    assert store.get(first) is not None and store.get(first + 1) is not None


def test_a_fire_held_by_its_rules_limit_is_taken_back_but_not_one_a_person_moved(
    store: Store,
) -> None:
    """A fire past its rule's limit is written held: the rule's new version must decide it
    (its new message, or a limit the author raised), not the old one wait for a person."""
    fire = Fire("a", fire_key(DUE), [(URL, body("old"))])
    (limited,) = store.enqueue_many([fire], now=BEFORE, state=HELD, not_before=DUE)
    fire_b = Fire("b", fire_key(DUE), [(URL, body("b"))])
    (held,) = store.enqueue_many([fire_b], now=BEFORE, not_before=DUE)
    store.hold(ids=held.ids, now=BEFORE + timedelta(seconds=1))  # a person holds it
    fire_c = Fire("c", fire_key(DUE), [(URL, body("c"))])
    (released,) = store.enqueue_many([fire_c], now=BEFORE, state=HELD, not_before=DUE)
    store.release(ids=released.ids, now=BEFORE + timedelta(seconds=1))  # a person lets it go
    bound = BEFORE + timedelta(seconds=2)
    assert store.withdraw_ahead({"a": bound, "b": bound, "c": bound}) == 1
    assert store.get(limited.ids[0]) is None
    assert store.get(held.ids[0]).state == HELD  # type: ignore[union-attr]
    assert store.get(released.ids[0]).state == PENDING  # type: ignore[union-attr]
    assert store.backlog().get(HELD, 0) == 1  # the counts follow


def test_the_new_version_writes_the_fire_again_under_the_same_key(store: Store) -> None:
    write(store, "a", DUE, written=BEFORE)
    assert store.withdraw_ahead({"a": BEFORE + timedelta(seconds=1)}) == 1
    again = write(store, "a", DUE, written=BEFORE + timedelta(seconds=2))
    assert keys(store) == Counter({("a", fire_key(DUE)): 1})
    assert store.get(again).next_attempt_at == DUE  # type: ignore[union-attr]
    assert store.claim("w", 10, BEFORE + timedelta(seconds=3), timedelta(minutes=1)) == []
    assert [r.id for r in store.claim("w", 10, DUE, timedelta(minutes=1))] == [again]


# --------------------------------------------------------------------------- the daemon


def minutely(project: Project, text: str) -> None:
    project.rule("tick", 'cron: "0 9 * * *"\ntimezone: UTC', text)


@pytest.mark.e2e
def test_a_fire_written_ahead_leaves_at_its_time(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    def start(clock: str, attempt: int) -> Daemon:
        project = Project(tmp_path / f"p{attempt}", sandbox.url, timing={"daemon.fire_ahead": "2s"})
        minutely(project, "tick {{ now.isoformat() }}")
        return daemons(project, clock=clock, name=f"run{attempt}")

    daemon = started_before(start, DUE, leads=(4.0, 10.0, 30.0))
    project = daemon.project
    wait_for(lambda: project.rows("tick"), "the fire to be written ahead", log=daemon.log)
    (row,) = project.rows("tick")
    assert row.state == PENDING and row.next_attempt_at == DUE
    assert daemon.clock is not None
    assert datetime.fromisoformat(daemon.clock) <= row.created_at < DUE
    lead = (DUE - datetime.fromisoformat(daemon.clock)).total_seconds()
    wait_for(lambda: texts(sandbox), "the fire at its time", timeout=lead + 10, log=daemon.log)
    received = datetime.fromisoformat(sandbox.requests()[0]["received_at"]).timestamp()
    assert received >= daemon.started_at + lead - 0.05, daemon.log()
    assert daemon.stop() == 0
    assert texts(sandbox) == Counter({"tick 2026-03-02T09:00:00+00:00": 1})
    assert [r.state for r in project.rows("tick")] == [SENT]


@pytest.mark.e2e
def test_a_rule_changed_after_its_fire_was_written_ahead_sends_its_new_version_once(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    def start(clock: str, attempt: int) -> Daemon:
        project = Project(
            tmp_path / f"p{attempt}", sandbox.url, timing={"daemon.fire_ahead": "20s"}
        )
        minutely(project, "old version")
        return daemons(project, clock=clock, name=f"run{attempt}")

    # Time for the edit to be seen and the old fire taken back before 09:00 even when busy.
    daemon = started_before(start, DUE, leads=(8.0, 15.0, 40.0))
    project = daemon.project
    wait_for(lambda: project.rows("tick"), "the old version's fire, ahead", log=daemon.log)
    minutely(project, "new version")
    wait_for(
        lambda: any("took back 1 fire" in m for m in daemon.messages()),
        "the reload to take the old fire back",
        log=daemon.log,
    )
    assert daemon.clock is not None
    lead = (DUE - datetime.fromisoformat(daemon.clock)).total_seconds()
    wait_for(lambda: texts(sandbox), "the fire at its time", timeout=lead + 10, log=daemon.log)
    assert daemon.stop() == 0
    assert texts(sandbox) == Counter({"new version": 1}), daemon.log()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("restart_after", "sent"),
    [(timedelta(seconds=30), 1), (timedelta(minutes=20), 0)],
    ids=["within-catch-up", "past-catch-up"],
)
def test_a_fire_written_ahead_by_a_daemon_that_stopped_is_decided_again(
    tmp_path: Path,
    sandbox: RunningSandbox,
    daemons: StartDaemon,
    restart_after: timedelta,
    sent: int,
) -> None:
    """The first daemon writes the fire ahead and is killed before its time. The next start,
    past that time, takes it back and lets catch-up decide: sent once if within the rule's
    catch_up (10 minutes), skipped as a restart skips any older missed fire; never sent late
    as it was written."""
    project = Project(tmp_path / "p", sandbox.url, timing={"daemon.fire_ahead": "1m"})
    minutely(project, "tick")
    first = daemons(project, clock=(DUE - timedelta(seconds=30)).isoformat(), name="first")
    wait_for(lambda: project.rows("tick"), "the fire written ahead", log=first.log)
    wait_for(lambda: project.mark("tick"), "a mark before it", log=first.log)
    first.signal(signal.SIGKILL)
    first.process.wait(timeout=10)
    assert not texts(sandbox)

    second = daemons(project, clock=(DUE + restart_after).isoformat(), name="second")
    wait_for(
        lambda: any("earlier run wrote ahead" in m for m in second.messages()),
        "the start to take the fire back",
        log=second.log,
    )
    if sent:
        wait_for(lambda: texts(sandbox), "the fire, caught up", log=second.log)
    else:
        wait_for(
            lambda: any("older than catch_up" in m for m in second.messages()),
            "catch-up to skip the fire",
            log=second.log,
        )
    assert second.stop() == 0
    assert sum(texts(sandbox).values()) == sent, second.log()
    assert len(project.rows("tick")) == sent


# --------------------------------------------------------------------------- the scheduler


class Outbox:
    """An outbox in memory for the scheduler: fires by (rule, key) with the version that wrote
    them, and the store's taking back (fires written ahead whose time is after the bound)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[tuple[str, str], tuple[str, datetime]] = {}  # -> (digest, written at)
        self.hold: asyncio.Event | None = None  # set: writes wait for it
        self.writing = asyncio.Event()  # a write began

    async def on_fire(self, rule: Rule, at: datetime, key: str) -> None:
        self.writing.set()
        if self.hold is not None:
            await self.hold.wait()
        self.rows.setdefault((rule.id, key), (rule.digest, self.clock.now()))

    async def withdraw(self, after: Mapping[str, datetime], otherwise: datetime | None) -> int:
        taken = 0
        for (rule, key), (_, written) in list(self.rows.items()):
            at, bound = scheduled_for(key), after.get(rule, otherwise)
            if at is not None and bound is not None and written < at and at > bound:
                del self.rows[(rule, key)]
                taken += 1
        return taken


def scheduler_for(outbox: Outbox, ahead: timedelta) -> Scheduler:
    async def no_poll(rule: Rule, at: datetime) -> None:
        return None

    return Scheduler(
        outbox.clock, MemoryMarks(), outbox.on_fire, no_poll, ahead=ahead, withdraw=outbox.withdraw
    )


async def lead(scheduler: Scheduler, rule: Rule) -> None:
    """What a daemon does on becoming the leader: start, the rule's job, catch-up."""
    await scheduler.start()
    scheduler.apply({rule.id: rule})
    await scheduler.catch_up({rule.id: rule})


async def until(probe: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Polls ``probe`` to a deadline (generous for a busy machine; not a measure)."""
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


def test_an_every_rule_shorter_than_fire_ahead_sends_every_fire() -> None:
    """Taken ahead, several fires of ``every: 1s`` come in one run: each is sent, none is
    skipped as coalesced (they are not late, only early)."""
    start = datetime(2026, 3, 2, 9, 0, 0, 500000, tzinfo=UTC)
    outbox = Outbox(Clock.starting_at(start))
    rule = make_rule("often", {"every": "1s"}, tz="UTC")

    async def go() -> None:
        scheduler = scheduler_for(outbox, timedelta(seconds=3))
        await lead(scheduler, rule)
        await until(lambda: len(outbox.rows) >= 4, "four fires written ahead")
        written.extend(sorted(key for _, key in outbox.rows))
        await scheduler.shutdown()
        # Stopping takes back what is written ahead and not due: the next leader decides it.
        assert all(scheduled_for(key) <= outbox.clock.now() for _, key in outbox.rows)  # type: ignore[operator]

    written: list[str] = []
    run(go())
    first = datetime(2026, 3, 2, 9, 0, 1, tzinfo=UTC)
    assert written[:4] == [fire_key(first + timedelta(seconds=i)) for i in range(4)]


def test_a_leader_started_again_writes_again_what_it_took_back() -> None:
    """Leadership lost then won back in one process: the start takes back the fire written
    ahead by the first term and the new term writes it again (it was lost before)."""
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    outbox = Outbox(Clock.starting_at(due - timedelta(seconds=4)))
    rule = make_rule("tick", {"cron": "0 9 * * *"}, tz="UTC")
    key = fire_key(due)

    async def go() -> None:
        scheduler = scheduler_for(outbox, timedelta(seconds=10))
        await lead(scheduler, rule)
        await until(lambda: ("tick", key) in outbox.rows, "the fire written ahead")
        await scheduler.shutdown()
        await lead(scheduler, rule)
        await until(lambda: ("tick", key) in outbox.rows, "the fire written again")
        await scheduler.shutdown()

    run(go())


def test_an_edit_while_the_old_version_writes_its_fire_sends_the_new_version() -> None:
    """The old version's write is under way when the rule changes: it lands, is taken back,
    and the new version's fire takes its place (not refused as its duplicate)."""
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    outbox = Outbox(Clock.starting_at(due - timedelta(seconds=4)))
    old = make_rule("tick", {"cron": "0 9 * * *"}, tz="UTC")
    new = make_rule("tick", {"cron": "0 9 * * *"}, tz="UTC", catch_up=timedelta(minutes=11))
    key = fire_key(due)

    async def go() -> None:
        scheduler = scheduler_for(outbox, timedelta(seconds=10))
        outbox.hold = asyncio.Event()
        await lead(scheduler, old)
        await asyncio.wait_for(outbox.writing.wait(), 10)
        scheduler.apply({"tick": new})
        await asyncio.sleep(0.05)
        outbox.hold.set()  # the old version's write lands after the edit
        await until(
            lambda: outbox.rows.get(("tick", key), ("",))[0] == new.digest,
            "the new version's fire",
        )
        await scheduler.shutdown()

    run(go())


def test_a_leader_that_lost_the_leadership_leaves_what_it_wrote_ahead() -> None:
    """Stopping as a leader takes back what is not due (the next decides it); losing the
    leadership does not: the new leader's own write of that fire was refused as a duplicate."""
    due = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
    rule = make_rule("tick", {"cron": "0 9 * * *"}, tz="UTC")
    key = fire_key(due)
    left: dict[bool, bool] = {}

    async def go(take_back: bool) -> None:
        outbox = Outbox(Clock.starting_at(due - timedelta(seconds=4)))
        scheduler = scheduler_for(outbox, timedelta(seconds=10))
        await lead(scheduler, rule)
        await until(lambda: ("tick", key) in outbox.rows, "the fire written ahead")
        await scheduler.shutdown(take_back=take_back)
        left[take_back] = ("tick", key) in outbox.rows

    run(go(True))
    run(go(False))
    assert left == {True: False, False: True}


def test_fires_held_back_by_a_store_away_at_start_are_not_written_past_catch_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The start's taking back fails for a while: the fires the jobs took meanwhile wait, and
    those that the wait made later than catch_up are skipped, as a restart would, not written
    late."""
    import engine.daemon.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MARKS_RETRY_FIRST", 0.1)
    monkeypatch.setattr(scheduler_module, "MARKS_RETRY_MAX", 0.1)
    start = datetime(2026, 3, 2, 9, 0, 0, 500000, tzinfo=UTC)
    outbox = Outbox(Clock.starting_at(start))
    catch_up = timedelta(seconds=1)
    rule = make_rule("often", {"every": "1s"}, tz="UTC", catch_up=catch_up)
    withdraw = outbox.withdraw
    away_until = time.monotonic() + 3.0

    async def flaky(after: Mapping[str, datetime], otherwise: datetime | None) -> int:
        if time.monotonic() < away_until:
            raise OSError("the store is away")
        return await withdraw(after, otherwise)

    outbox.withdraw = flaky  # type: ignore[method-assign]

    async def go() -> None:
        scheduler = scheduler_for(outbox, timedelta(seconds=1))
        await lead(scheduler, rule)
        await until(lambda: len(outbox.rows) >= 2, "fires written once the store is back")
        await scheduler.shutdown(take_back=False)

    run(go())
    late = {
        key: written - at
        for (_, key), (_, written) in outbox.rows.items()
        if (at := scheduled_for(key)) is not None
    }
    assert late and max(late.values()) <= catch_up + timedelta(milliseconds=300), late
