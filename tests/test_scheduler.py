"""The scheduler: pure catch-up planning, then a real AsyncIOScheduler on a (shifted) clock."""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from engine.daemon.clock import SYSTEM, Clock
from engine.daemon.scheduler import (
    MARK_SCOPE,
    CatchUp,
    ClockTrigger,
    Marks,
    RuleTrigger,
    Scheduler,
    fire_key,
    job_kind,
    plan_catch_up,
)
from engine.outbox.store import Store
from engine.rules.rule import TRIGGER_KINDS, Rule
from engine.rules.schedule import AtSchedule, Schedule, schedule_for
from tests.helpers import load, make_project, write_rule

PARIS = ZoneInfo("Europe/Paris")
KEY = re.compile(r"^schedule:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


def make_rule(
    rule_id: str,
    trigger: Mapping[str, Any],
    *,
    enabled: bool = True,
    catch_up: timedelta = timedelta(minutes=10),
    tz: str = "Europe/Paris",
) -> Rule:
    kind = next(k for k in TRIGGER_KINDS if k in trigger)
    return Rule(
        id=rule_id,
        file=f"rules/{rule_id}.yaml",
        description="",
        enabled=enabled,
        trigger_kind=kind,
        trigger=dict(trigger),
        timezone=tz,
        when=None,
        apps=(),
        targets=(),
        catch_up=catch_up,
        digest=f"{sorted(trigger.items())!r}/{enabled}/{catch_up}",
    )


class MemoryMarks:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], datetime] = {}
        self.lock = threading.Lock()

    def get_mark(self, scope: str, name: str) -> datetime | None:
        with self.lock:
            return self.values.get((scope, name))

    def set_mark(self, scope: str, name: str, at: datetime) -> None:
        assert at.utcoffset() == timedelta(0), "marks are UTC"
        with self.lock:
            self.values[(scope, name)] = at


@pytest.fixture(params=["memory", "store"])
def marks(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Marks]:
    if request.param == "memory":
        yield MemoryMarks()
        return
    store = Store(f"sqlite:///{tmp_path}/s.db")
    try:
        yield store  # type: ignore[misc]
    finally:
        store.close()


class Recorder:
    """on_fire / on_poll that remember their calls and can wait for a number of them."""

    def __init__(
        self, action: Callable[[int], Awaitable[None]] | None = None, clock: Clock = SYSTEM
    ) -> None:
        self.fires: list[tuple[str, datetime, str]] = []
        self.polls: list[tuple[str, datetime]] = []
        self.clock_times: list[datetime] = []  # what the clock showed at each call
        self.clock = clock
        self.action = action
        self._changed = asyncio.Event()

    async def on_fire(self, rule: Rule, at: datetime, key: str) -> None:
        self.clock_times.append(self.clock.now())
        self.fires.append((rule.id, at, key))
        self._changed.set()
        if self.action is not None:
            await self.action(len(self.fires))

    async def on_poll(self, rule: Rule, at: datetime) -> None:
        self.polls.append((rule.id, at))
        self._changed.set()

    async def wait_fires(self, count: int, timeout: float = 15.0) -> None:
        """Until ``count`` fires came; a deadline, generous for a busy machine, not a measure."""

        async def wait() -> None:
            while len(self.fires) < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def clock_at(moment: datetime) -> Clock:
    return Clock.starting_at(moment)


def cron(expr: str, tz: ZoneInfo = PARIS) -> Schedule:
    return schedule_for({"cron": expr}, tz)


# --------------------------------------------------------------------------- pure parts


def test_fire_key_is_utc_whatever_the_zone() -> None:
    paris = datetime(2026, 3, 29, 3, 0, tzinfo=PARIS)
    assert fire_key(paris) == "schedule:2026-03-29T01:00:00+00:00"
    assert fire_key(paris.astimezone(UTC)) == fire_key(paris)
    with pytest.raises(ValueError):
        fire_key(datetime(2026, 3, 29, 3, 0))


def test_job_kind() -> None:
    assert job_kind(make_rule("a", {"cron": "0 9 * * *"})) == "fire"
    assert job_kind(make_rule("b", {"every": "5m"})) == "fire"
    assert job_kind(make_rule("c", {"at": "2026-12-24 18:00"})) == "fire"
    assert job_kind(make_rule("d", {"poll": {"url": "http://x", "every": "5m"}})) == "poll"
    assert job_kind(make_rule("e", {"event": "x"})) is None
    assert job_kind(make_rule("f", {"cron": "0 9 * * *"}, enabled=False)) is None


def test_plan_catch_up_fires_newest_young_and_skips_the_rest() -> None:
    now = datetime(2026, 3, 1, 12, 3, 30, tzinfo=UTC)
    missed = [datetime(2026, 3, 1, 11, m, tzinfo=UTC) for m in (56, 57, 58, 59)] + [
        datetime(2026, 3, 1, 12, m, tzinfo=UTC) for m in (0, 1, 2, 3)
    ]
    plan = plan_catch_up("r", missed, now, timedelta(minutes=5))
    assert [c.action for c in plan] == ["skipped"] * 7 + ["fired"]
    assert plan[-1].scheduled_at == datetime(2026, 3, 1, 12, 3, tzinfo=UTC)
    assert "older than catch_up" in plan[0].reason  # 11:56, 7m30s old
    assert "older than catch_up" in plan[2].reason  # 11:58, 5m30s old
    assert "coalesced" in plan[3].reason  # 11:59, 4m30s old: a later one goes instead
    assert plan_catch_up("r", missed[:1], now, timedelta(minutes=5))[0].action == "skipped"
    assert plan_catch_up("r", [], now, timedelta(minutes=5)) == []


def test_clock_trigger_hands_apscheduler_real_instants() -> None:
    # Pure: APScheduler passes the real "now", so a fixed one needs no waiting nor window.
    real_now = datetime(2026, 11, 29, 12, 0, 0, 250000, tzinfo=UTC)
    clock = Clock(datetime(2026, 3, 29, 1, 59, 58, tzinfo=PARIS) - real_now)
    trigger = ClockTrigger(RuleTrigger(schedule_for({"cron": "30 2 * * *"}, PARIS)), clock)
    real_fire = trigger.get_next_fire_time(None, real_now)
    assert real_fire is not None
    assert clock.from_real(real_fire) == datetime(2026, 3, 29, 3, 0, tzinfo=PARIS)
    assert real_fire - real_now == timedelta(seconds=2)
    assert trigger.covered_from == clock.from_real(real_now)
    following = trigger.get_next_fire_time(real_fire, real_fire)
    assert following is not None
    assert clock.from_real(following) == datetime(2026, 3, 30, 2, 30, tzinfo=PARIS)


# --------------------------------------------------------------- the APScheduler trigger


def test_rule_trigger_next_fire_time() -> None:
    trigger = RuleTrigger(cron("0 9 * * *", PARIS))
    now = datetime(2026, 3, 28, 9, 0, tzinfo=PARIS)
    first = trigger.get_next_fire_time(None, now)
    assert first == now  # due now, like APScheduler's own triggers
    second = trigger.get_next_fire_time(first, now)
    assert second.isoformat() == "2026-03-29T09:00:00+02:00"
    # a fixed offset, so APScheduler never compares by wall clock in a repeated hour
    assert isinstance(second.tzinfo, timezone)
    assert "0 9 * * *" in repr(trigger) and str(trigger) == "cron '0 9 * * *' in Europe/Paris"


def test_rule_trigger_through_the_repeated_hour() -> None:
    trigger = RuleTrigger(cron("*/30 * * * *", PARIS))
    previous = datetime(2026, 10, 25, 2, 30, tzinfo=PARIS)  # CEST
    fires = []
    for _ in range(3):
        previous = trigger.get_next_fire_time(previous, previous)
        fires.append(previous.isoformat())
    assert fires == [
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


def test_rule_trigger_first_fire_due_now_in_the_repeated_hour() -> None:
    trigger = RuleTrigger(cron("*/30 * * * *", PARIS))
    now = datetime(2026, 10, 25, 2, 0, tzinfo=PARIS, fold=1)  # 02:00 CET, second pass
    first = trigger.get_next_fire_time(None, now)
    assert first.isoformat() == "2026-10-25T02:00:00+01:00"


def test_rule_trigger_one_off_in_the_past() -> None:
    trigger = RuleTrigger(schedule_for({"at": "2026-01-01 00:00"}, PARIS))
    assert trigger.get_next_fire_time(None, datetime(2026, 6, 1, tzinfo=UTC)) is None


def test_rule_trigger_pickles() -> None:
    trigger = RuleTrigger(cron("0 9 * * MON", PARIS))
    copy = pickle.loads(pickle.dumps(trigger))
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert copy.get_next_fire_time(None, now) == trigger.get_next_fire_time(None, now)


def test_rule_trigger_in_a_background_scheduler() -> None:
    ran = threading.Event()
    calls: list[datetime] = []
    when = datetime.now(UTC) + timedelta(milliseconds=300)
    scheduler = BackgroundScheduler(timezone=PARIS)
    scheduler.add_job(
        lambda: (calls.append(datetime.now(UTC)), ran.set()),
        RuleTrigger(AtSchedule(when, PARIS)),
        id="once",
    )
    cron_job = scheduler.add_job(lambda: None, RuleTrigger(cron("0 9 1 1 *", PARIS)), id="yearly")
    scheduler.start()
    try:
        assert cron_job.next_run_time.month == 1 and cron_job.next_run_time.hour == 9
        assert ran.wait(5)
        for _ in range(50):  # APScheduler drops a one-off after its run, in its own thread
            if scheduler.get_job("once") is None:
                break
            time.sleep(0.05)
        assert len(calls) == 1 and calls[0] >= when
        assert scheduler.get_job("once") is None  # a one-off is done after its fire
    finally:
        scheduler.shutdown(wait=False)


# --------------------------------------------------------------------------- jobs


def test_apply_touches_only_rules_whose_digest_changed() -> None:
    async def scenario() -> None:
        rec = Recorder()
        sched = Scheduler(Clock(), MemoryMarks(), rec.on_fire, rec.on_poll)
        await sched.start()
        try:
            poll = {"poll": {"url": "http://127.0.0.1:9/x", "every": "5m", "key": "id"}}
            first = {
                "daily": make_rule("daily", {"cron": "0 9 * * *"}),
                "hourly": make_rule("hourly", {"every": "1h"}),
                "on-event": make_rule("on-event", {"event": "x"}),
                "off": make_rule("off", {"cron": "0 9 * * *"}, enabled=False),
                "feed": make_rule("feed", poll),
            }
            changes = sched.apply(first)
            assert changes.added == ["daily", "feed", "hourly"]
            assert changes.removed == changes.rescheduled == changes.unchanged == []
            assert {j.id for j in sched._aps.get_jobs()} == {"daily", "feed", "hourly"}
            daily_job = sched._aps.get_job("daily")
            daily_next = daily_job.next_run_time
            hourly_next = sched._aps.get_job("hourly").next_run_time

            second = dict(first)
            # `every` counts from the epoch, so another interval could meet 1h's next run;
            # half past never falls on 1h's whole hours.
            second["hourly"] = make_rule("hourly", {"cron": "30 * * * *"})
            second["off"] = make_rule("off", {"cron": "0 9 * * *"})
            del second["feed"]
            changes = sched.apply(second)
            assert changes.added == ["off"]
            assert changes.removed == ["feed"]
            assert changes.rescheduled == ["hourly"]
            assert changes.unchanged == ["daily"]
            # The unchanged job is the same job, with the same next run time object.
            assert sched._aps.get_job("daily") is daily_job
            assert daily_job.next_run_time is daily_next
            assert sched._aps.get_job("hourly").next_run_time != hourly_next
            assert sched._aps.get_job("feed") is None

            third = dict(second)
            third["daily"] = make_rule("daily", {"cron": "0 9 * * *"}, enabled=False)
            changes = sched.apply(third)
            assert changes.removed == ["daily"]
            assert sched._aps.get_job("daily") is None
            assert set(sched.next_fires()) == {"hourly", "off"}
        finally:
            await sched.shutdown()

    run(scenario())


def test_next_fires_before_start_and_in_the_rule_timezone() -> None:
    clock = clock_at(datetime(2026, 3, 29, 1, 0, tzinfo=PARIS))
    sched = Scheduler(clock, MemoryMarks(), Recorder().on_fire, Recorder().on_poll)
    sched.apply({"nightly": make_rule("nightly", {"cron": "30 2 * * *"})})
    nxt = sched.next_fires()["nightly"]
    assert nxt == datetime(2026, 3, 29, 3, 0, tzinfo=PARIS)
    assert nxt is not None and nxt.tzinfo == PARIS


def test_rules_loaded_from_yaml_are_scheduled(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project")
    body = """
        apps:
          news-ios: {parentMessageId: "3"}
        message: {subject: Hi, text: Hello}
        targets:
          - language: fr
    """
    write_rule(root, "nightly", 'trigger:\n  cron: "30 2 * * *"\n' + textwrap.dedent(body))
    feed = "trigger:\n  poll: {url: 'http://127.0.0.1:9/f', every: 5m, key: id}\n"
    write_rule(root, "feed", feed + textwrap.dedent(body))
    rules = load(root).rules
    clock = clock_at(datetime(2026, 3, 29, 1, 0, tzinfo=PARIS))
    sched = Scheduler(clock, MemoryMarks(), Recorder().on_fire, Recorder().on_poll)
    assert sched.apply(rules).added == ["feed", "nightly"]
    nxt = sched.next_fires()
    assert nxt["nightly"] == datetime(2026, 3, 29, 3, 0, tzinfo=PARIS)
    assert nxt["feed"] == datetime(2026, 3, 29, 1, 5, tzinfo=PARIS)
    assert sched.apply(load(root).rules).unchanged == ["feed", "nightly"]


def test_every_second_fires_with_utc_keys_and_survives_a_raising_callback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fail_first(count: int) -> None:
        if count == 1:
            raise RuntimeError("store is locked")

    async def scenario() -> None:
        rec = Recorder(fail_first)
        sched = Scheduler(Clock(), MemoryMarks(), rec.on_fire, rec.on_poll)
        await sched.start()
        try:
            sched.apply({"tick": make_rule("tick", {"every": "1s"})})
            await rec.wait_fires(3)  # later fires came although the first raised
        finally:
            await sched.shutdown()
        times = [at for _, at, _ in rec.fires]
        at1 = times[0]
        assert times.count(at1) == 2  # the failed write was tried again, with the same key
        at2 = sorted(set(times))[1]
        assert {r for r, _, _ in rec.fires} == {"tick"}
        assert at1.tzinfo is UTC and at1.microsecond == 0
        assert at2 - at1 == timedelta(seconds=1)
        keys = {at: key for _, at, key in rec.fires}
        assert KEY.match(keys[at1]) and keys[at1] == fire_key(at1) and keys[at2] == fire_key(at2)
        # The fire times are now's, in UTC: an error of an hour's offset would show.
        assert timedelta(0) <= datetime.now(UTC) - at2 < timedelta(minutes=1)

    with caplog.at_level(logging.WARNING, logger="pushrules.scheduler"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.name == "pushrules.scheduler"]
    assert any(
        "rule tick" in m and "store is locked" in m and "tried again" in m for m in warnings
    ), warnings


def test_shifted_clock_fires_the_skipped_dst_time_at_the_end_of_the_gap() -> None:
    async def scenario() -> None:
        clock = clock_at(datetime(2026, 3, 29, 1, 59, 59, tzinfo=PARIS))
        rec = Recorder(clock=clock)
        sched = Scheduler(clock, MemoryMarks(), rec.on_fire, rec.on_poll)
        await sched.start()
        try:
            sched.apply({"nightly": make_rule("nightly", {"cron": "30 2 * * *"})})
            assert sched.next_fires()["nightly"] == datetime(2026, 3, 29, 3, 0, tzinfo=PARIS)
            await rec.wait_fires(1)
            after = sched.next_fires()["nightly"]
        finally:
            await sched.shutdown()
        rule_id, at, key = rec.fires[0]
        assert rule_id == "nightly"
        assert at == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00+02:00 on the clock
        assert at.tzinfo is UTC
        assert key == "schedule:2026-03-29T01:00:00+00:00"
        assert rec.clock_times[0] >= at  # on time by the clock, never early
        assert after == datetime(2026, 3, 30, 2, 30, tzinfo=PARIS)

    run(scenario())


def test_shutdown_lets_a_running_fire_finish_and_records_marks(tmp_path: Path) -> None:
    finished: list[int] = []

    async def slow(count: int) -> None:
        await asyncio.sleep(0.4)
        finished.append(count)

    async def scenario() -> None:
        rec = Recorder(slow)
        sched = Scheduler(Clock(), marks, rec.on_fire, rec.on_poll)
        await sched.start()
        sched.apply({"tick": make_rule("tick", {"every": "1s"})})
        assert await sched.catch_up({}) == []
        await rec.wait_fires(1)
        await sched.shutdown()
        assert finished == [1]  # the running fire was not cancelled
        calls = len(rec.fires)
        await asyncio.sleep(1.1)
        assert len(rec.fires) == calls  # and nothing ran after shutdown
        mark = marks.get_mark(MARK_SCOPE, "tick")
        assert mark is not None and mark >= rec.fires[0][1]

    with Store(f"sqlite:///{tmp_path}/s.db") as marks:
        run(scenario())


def test_marks_never_pass_a_fire_that_is_not_handled_yet(marks: Marks) -> None:
    release = asyncio.Event()

    async def held(_: int) -> None:
        await release.wait()

    async def scenario() -> None:
        rec = Recorder(held)
        sched = Scheduler(
            Clock(), marks, rec.on_fire, rec.on_poll, mark_every=timedelta(seconds=0.1)
        )
        await sched.start()
        try:
            sched.apply(
                {
                    "tick": make_rule("tick", {"every": "1s"}),
                    "yearly": make_rule("yearly", {"cron": "0 9 1 1 *"}),
                }
            )
            await sched.catch_up({})
            await rec.wait_fires(1)
            due = rec.fires[0][1]
            await asyncio.sleep(0.3)  # periodic marks while the fire is held
            held_mark = marks.get_mark(MARK_SCOPE, "tick")
            assert held_mark is not None and held_mark < due
            yearly = marks.get_mark(MARK_SCOPE, "yearly")
            # A rule with nothing due is marked up to now (within a loaded machine's stall).
            assert yearly is not None and datetime.now(UTC) - yearly < timedelta(seconds=10)
            release.set()
            # Handled, the fire lets the mark pass it: at the next periodic write (0.1 s),
            # later on a busy machine.
            for _ in range(100):
                done_mark = marks.get_mark(MARK_SCOPE, "tick")
                if done_mark is not None and done_mark >= due:
                    break
                await asyncio.sleep(0.05)
            assert done_mark is not None and done_mark >= due
        finally:
            release.set()
            await sched.shutdown()

    run(scenario())


def test_a_poll_rule_gets_its_turns() -> None:
    async def scenario() -> None:
        rec = Recorder()
        sched = Scheduler(Clock(), MemoryMarks(), rec.on_fire, rec.on_poll)
        await sched.start()
        try:
            poll = {"poll": {"url": "http://127.0.0.1:9/x", "every": "1s", "key": "id"}}
            sched.apply({"feed": make_rule("feed", poll)})
            for _ in range(40):
                if rec.polls:
                    break
                await asyncio.sleep(0.05)
        finally:
            await sched.shutdown()
        assert rec.polls and rec.polls[0][0] == "feed"
        assert rec.polls[0][1].tzinfo is UTC
        assert rec.fires == []

    run(scenario())


# --------------------------------------------------------------------------- catch-up


def catch_up_once(
    clock: Clock, marks: Marks, rules: Mapping[str, Rule], rec: Recorder
) -> list[CatchUp]:
    async def scenario() -> list[CatchUp]:
        sched = Scheduler(clock, marks, rec.on_fire, rec.on_poll)
        return await sched.catch_up(rules)

    return run(scenario())  # type: ignore[no-any-return]


def test_catch_up_fires_the_newest_missed_fire_when_young(marks: Marks) -> None:
    clock = clock_at(datetime(2026, 3, 1, 12, 3, tzinfo=PARIS))
    marks.set_mark(MARK_SCOPE, "noon", datetime(2026, 3, 1, 10, 50, tzinfo=UTC))
    rec = Recorder()
    rules = {"noon": make_rule("noon", {"cron": "0 12 * * *"})}
    result = catch_up_once(clock, marks, rules, rec)
    due = datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
    assert result == [CatchUp("noon", due, "fired", result[0].reason)]
    assert rec.fires == [("noon", due, "schedule:2026-03-01T11:00:00+00:00")]
    mark = marks.get_mark(MARK_SCOPE, "noon")
    assert mark is not None and mark >= datetime(2026, 3, 1, 11, 3, tzinfo=UTC)
    # Started again at once: nothing left to catch up.
    assert catch_up_once(clock, marks, rules, Recorder()) == []


def test_catch_up_skips_a_fire_older_than_catch_up(
    marks: Marks, caplog: pytest.LogCaptureFixture
) -> None:
    clock = clock_at(datetime(2026, 3, 1, 12, 30, tzinfo=PARIS))
    marks.set_mark(MARK_SCOPE, "noon", datetime(2026, 3, 1, 10, 50, tzinfo=UTC))
    rec = Recorder()
    rules = {"noon": make_rule("noon", {"cron": "0 12 * * *"})}
    with caplog.at_level(logging.WARNING, logger="pushrules.scheduler"):
        result = catch_up_once(clock, marks, rules, rec)
    assert [(c.action, c.scheduled_at) for c in result] == [
        ("skipped", datetime(2026, 3, 1, 11, 0, tzinfo=UTC))
    ]
    assert "older than catch_up" in result[0].reason
    assert rec.fires == []
    message = caplog.records[-1].getMessage()
    assert caplog.records[-1].levelno == logging.WARNING
    assert "noon" in message and "2026-03-01T11:00:00+00:00" in message
    assert "older than catch_up" in message


def test_catch_up_coalesces_many_missed_fires(marks: Marks) -> None:
    clock = clock_at(datetime(2026, 3, 1, 12, 3, 30, tzinfo=UTC))
    marks.set_mark(MARK_SCOPE, "minutely", datetime(2026, 3, 1, 11, 55, tzinfo=UTC))
    rec = Recorder()
    rule = make_rule("minutely", {"every": "1m"}, catch_up=timedelta(minutes=5))
    result = catch_up_once(clock, marks, {"minutely": rule}, rec)
    assert len(result) == 8  # 11:56 ... 12:03
    assert [c.action for c in result].count("fired") == 1
    assert rec.fires == [
        ("minutely", datetime(2026, 3, 1, 12, 3, tzinfo=UTC), "schedule:2026-03-01T12:03:00+00:00")
    ]
    skipped = [c for c in result if c.action == "skipped"]
    assert ["older than catch_up" in c.reason for c in skipped] == [True] * 3 + [False] * 4
    assert all(c.reason.startswith("coalesced") for c in skipped[3:])


def test_catch_up_ignores_new_disabled_and_event_rules(marks: Marks) -> None:
    clock = clock_at(datetime(2026, 3, 1, 12, 3, tzinfo=PARIS))
    marks.set_mark(MARK_SCOPE, "off", datetime(2026, 3, 1, 10, 50, tzinfo=UTC))
    rules = {
        "new": make_rule("new", {"cron": "0 12 * * *"}),
        "off": make_rule("off", {"cron": "0 12 * * *"}, enabled=False),
        "ev": make_rule("ev", {"event": "x"}),
        "once": make_rule("once", {"at": "2026-03-01 12:01"}),
    }
    rec = Recorder()
    assert catch_up_once(clock, marks, rules, rec) == []
    assert rec.fires == []
    new_mark = marks.get_mark(MARK_SCOPE, "new")
    assert new_mark is not None  # from now on the rule has a history
    assert marks.get_mark(MARK_SCOPE, "off") == datetime(2026, 3, 1, 10, 50, tzinfo=UTC)
    assert marks.get_mark(MARK_SCOPE, "ev") is None


def test_catch_up_sends_a_missed_one_off(marks: Marks) -> None:
    clock = clock_at(datetime(2026, 3, 1, 12, 3, tzinfo=PARIS))
    marks.set_mark(MARK_SCOPE, "once", datetime(2026, 3, 1, 10, 50, tzinfo=UTC))
    rec = Recorder()
    result = catch_up_once(
        clock, marks, {"once": make_rule("once", {"at": "2026-03-01 12:01"})}, rec
    )
    assert [c.action for c in result] == ["fired"]
    assert rec.fires[0][1] == datetime(2026, 3, 1, 11, 1, tzinfo=UTC)


def test_catch_up_reports_a_failing_callback(marks: Marks) -> None:
    async def boom(_: int) -> None:
        raise RuntimeError("no store")

    clock = clock_at(datetime(2026, 3, 1, 12, 3, tzinfo=PARIS))
    marks.set_mark(MARK_SCOPE, "noon", datetime(2026, 3, 1, 10, 50, tzinfo=UTC))
    result = catch_up_once(
        clock, marks, {"noon": make_rule("noon", {"cron": "0 12 * * *"})}, Recorder(boom)
    )
    assert [c.action for c in result] == ["failed"]
    assert "no store" in result[0].reason


def test_catch_up_stops_where_the_running_job_took_over(marks: Marks) -> None:
    """Fires from the job's start on are the job's: catch-up neither repeats nor reports them."""

    async def scenario() -> list[CatchUp]:
        rec = Recorder()
        sched = Scheduler(Clock(), marks, rec.on_fire, rec.on_poll)
        await sched.start()
        try:
            sched.apply({"tick": make_rule("tick", {"every": "1s"})})
            await rec.wait_fires(1)
            result = await sched.catch_up({"tick": make_rule("tick", {"every": "1s"})})
            covered = sched._entries["tick"].trigger.covered_from
        finally:
            await sched.shutdown()
        assert covered is not None
        assert all(c.scheduled_at < covered for c in result)
        assert [c.action for c in result][-1:] == ["fired"]
        return result

    marks.set_mark(MARK_SCOPE, "tick", datetime.now(UTC) - timedelta(seconds=5))
    result = run(scenario())
    assert 3 <= len(result) <= 6
