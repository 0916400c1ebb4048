"""Scheduled rules: APScheduler says when; the store remembers what fired.

Jobs live in memory and are rebuilt from the rules, which stay the single source of truth:
one job per enabled ``cron`` / ``every`` / ``at`` rule (a *fire*) or ``poll`` rule (a *turn*
to fetch its feed). :meth:`Scheduler.apply` touches only the jobs whose rule's ``digest``
changed, so a reload does not shift the phase of the others.

Why the job options are what they are (APScheduler 3.11, measured):

* Fire times are computed by :mod:`engine.rules.schedule` on the injected clock and handed to
  APScheduler as the real instants they happen at (:class:`ClockTrigger`); the scheduled time
  given to ``on_fire`` is mapped back to the clock.
* APScheduler is used through its public API only: a job per rule, whose coroutine is a
  *wake-up*. A run takes from the rule's schedule every fire due since the previous run took
  its own (:meth:`_Entry.claim_due`), so APScheduler need not say which run times were due:
  ``coalesce=True`` (one run per wake-up), ``misfire_grace_time=None`` (APScheduler never drops
  a run; lateness is judged against the rule's ``catch_up`` here, and logged) and
  ``max_instances`` effectively unlimited (a refused run would leave its fires to the next
  wake-up, maybe a day later). A listener logs the run errors, misses and refusals these
  options rule out. Runs are tracked, so :meth:`Scheduler.shutdown` lets them finish.
* The job stays tiny: ``on_fire`` only writes the fire to the store. Fires of one rule queue
  behind a per-rule lock, in order; a poll turn that finds the previous poll of its feed still
  running is skipped (the next turn sees the same feed).
* Of the fires a run takes, the newest is sent if it is at most the rule's ``catch_up`` late;
  the others are logged as skipped. A late poll turn polls once, however late.

Marks: ``marks.set_mark("schedule", rule_id, t)`` means "every fire of this rule up to t was
handled". After each fire, every 30 s and at shutdown the mark moves to now, but never past a
fire that is due and not yet handled, so :meth:`Scheduler.catch_up` on the next start sees it.
Marks do not move before :meth:`Scheduler.catch_up` has read them once.

A fire whose write fails (the store locked or unreachable) is not handled: it stays pending,
so the mark stays before it, and it is written again with backoff (1 s doubling to 30 s) until
it lands or is ``catch_up`` late; then it is given up, logged as an error, as a restart's
catch-up would. :meth:`Scheduler.waiting_writes` lists such fires for ``/healthz``. A stop
leaves them pending: the next start's catch-up writes them.

Start order for the daemon: ``await start()``, ``apply(rules)``, ``await catch_up(rules)``.
Catch-up covers (mark, the instant each job took over]; the jobs cover the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Literal, Protocol, TypeVar

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from engine.daemon.clock import Clock
from engine.outbox.batching import Coalescer, never
from engine.outbox.keys import fire_key
from engine.rules.rule import Rule
from engine.rules.schedule import (
    MISSED_LIMIT,
    Schedule,
    TriggerError,
    missed_fires,
    parse_timezone,
    schedule_for,
)

__all__ = [
    "MARK_SCOPE",
    "CatchUp",
    "Changes",
    "ClockTrigger",
    "FireCallback",
    "Marks",
    "PollCallback",
    "RuleTrigger",
    "Scheduler",
    "WaitingWrite",
    "fire_key",
    "job_kind",
    "name_some",
    "plan_catch_up",
]

log = logging.getLogger("pushrules.scheduler")
T = TypeVar("T")

FireCallback = Callable[[Rule, datetime, str], Awaitable[None]]
"""(rule, scheduled time on the clock as an aware UTC datetime, idempotency key)."""
PollCallback = Callable[[Rule, datetime], Awaitable[object]]
"""A poll rule's turn to fetch its feed (the poller's result, if any, is ignored)."""
WithdrawCallback = Callable[[Mapping[str, datetime], datetime | None], Awaitable[int]]
"""Take back the fires written ahead of their time whose time is after ``after[rule]`` (or
``otherwise`` for the rules not named; None: those are left alone); returns how many."""

MARK_SCOPE = "schedule"
#: Waits between attempts to read the marks at catch-up (seconds), doubling up to the max.
MARKS_RETRY_FIRST = 1.0
MARKS_RETRY_MAX = 30.0
FIRE_KINDS = ("cron", "every", "at")
MARK_EVERY = timedelta(seconds=30)
#: Seconds before a failed fire write is tried again, doubling up to RETRY_MAX.
RETRY_BASE, RETRY_MAX = 1.0, 30.0
#: Fires skipped at once are logged one by one up to this many per rule, then summed up.
LOG_EACH_SKIPPED = 5
#: Effectively "never refuse a run": APScheduler drops a refused run for good.
_MAX_INSTANCES = 1_000_000
#: How long a replaced rule version's replacement time is remembered (see Scheduler._replaced).
REPLACED_KEPT = timedelta(days=1)
#: Tries to take back what a replaced rule wrote ahead, a retry wait apart (doubling).
WITHDRAW_TRIES = 4
#: Fire runs going on at once. A minute's 5,000 cron rules start together: a fire's compiled
#: requests live until it is in the outbox, so had all of them been decided before the first
#: write, the daemon would have held the 5,000 at once (and each run its suspended task: 70 MB
#: more at the peak, issue 12). The others wait their turn in a queue; the first fires are
#: written, and sent, while the next are decided.
FIRE_RUNS_AT_ONCE = 200
_TICK = timedelta(microseconds=1)

JobKind = Literal["fire", "poll"]


class Marks(Protocol):
    """Instants remembered by name (engine/outbox/store.py's Store); aware UTC datetimes."""

    def get_mark(self, scope: str, name: str) -> datetime | None: ...

    def set_mark(self, scope: str, name: str, at: datetime) -> None: ...


@dataclass(frozen=True, slots=True)
class Changes:
    """What :meth:`Scheduler.apply` did to the jobs (rule ids, sorted)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


@dataclass(slots=True)
class WaitingWrite:
    """A scheduled fire whose write failed and is being tried again (clock instants, UTC)."""

    rule: str
    scheduled_at: datetime
    attempts: int
    last_error: str
    next_try: datetime
    gives_up_at: datetime

    def report(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "scheduled_at": self.scheduled_at.isoformat(),
            "failed_attempts": self.attempts,
            "last_error": self.last_error,
            "next_try": self.next_try.isoformat(),
            "gives_up_at": self.gives_up_at.isoformat(),
        }


def retry_delay(failures: int, base: float, most: float) -> float:
    """Seconds before the next try of a fire write that failed ``failures`` times (>= 1)."""
    return min(most, base * 2.0 ** min(failures - 1, 30))


@dataclass(frozen=True, slots=True)
class CatchUp:
    """One fire missed while the scheduler was not running, and what became of it.

    ``action`` is ``fired`` (handed to ``on_fire``), ``skipped``, or ``failed`` (``on_fire``
    raised; ``reason`` says what).
    """

    rule: str
    scheduled_at: datetime  # aware UTC, on the clock
    action: Literal["fired", "skipped", "failed"]
    reason: str


# --------------------------------------------------------------------------- pure helpers


def job_kind(rule: Rule) -> JobKind | None:
    """Which job a rule needs, if any: disabled and event rules have none."""
    if not rule.enabled:
        return None
    if rule.trigger_kind in FIRE_KINDS:
        return "fire"
    if rule.trigger_kind == "poll":
        return "poll"
    return None


def rule_schedule(rule: Rule) -> Schedule:
    """The rule's schedule (for ``poll``, its ``every``); ``every`` counts from the epoch, so
    its phase, and so its fire keys, are the same on every instance and after a restart."""
    return schedule_for(rule.trigger, parse_timezone(rule.timezone))


def name_some(ids: Iterable[str], most: int = 10) -> str:
    """Rule ids for a log line, sorted, at most ``most`` named: a shared template edited
    changes thousands of rules at once."""
    names = sorted(ids)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def describe_age(age: timedelta) -> str:
    seconds = max(0, int(age.total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def plan_catch_up(
    rule_id: str, missed: Sequence[datetime], now: datetime, catch_up: timedelta
) -> list[CatchUp]:
    """Missed fires (oldest first) -> what to do: the newest is fired if younger than
    ``catch_up``; sending the others would only repeat the same push."""
    plan: list[CatchUp] = []
    for index, at in enumerate(missed):
        at = at.astimezone(UTC)
        age = now - at
        too_old = age >= catch_up
        if too_old:
            reason = (
                f"missed by {describe_age(age)}, older than catch_up ({describe_age(catch_up)})"
            )
        elif index == len(missed) - 1:
            plan.append(CatchUp(rule_id, at, "fired", f"missed by {describe_age(age)}"))
            continue
        else:
            newest = missed[-1].astimezone(UTC).isoformat()
            reason = f"coalesced: the later fire due at {newest} is sent instead"
        plan.append(CatchUp(rule_id, at, "skipped", reason))
    return plan


def log_skipped(rule_id: str, skipped: Sequence[tuple[datetime, str]], context: str) -> None:
    """One WARNING per skipped fire, summed up past a few so an outage does not flood the log."""
    for at, reason in skipped[:LOG_EACH_SKIPPED]:
        log.warning(
            "rule %s: fire due at %s skipped (%s): %s", rule_id, at.isoformat(), context, reason
        )
    rest = skipped[LOG_EACH_SKIPPED:]
    if rest:
        log.warning(
            "rule %s: %d more fires skipped (%s), due from %s to %s",
            rule_id,
            len(rest),
            context,
            rest[0][0].isoformat(),
            rest[-1][0].isoformat(),
        )


# --------------------------------------------------------------------------- APScheduler glue


class RuleTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """Runs a :class:`Schedule` under APScheduler 3.

    Fire times are handed over with a fixed UTC offset (the rule's local offset at
    that instant): APScheduler compares and subtracts them with its own ``now``,
    and with a shared IANA tzinfo Python would do that by wall clock, wrongly in
    the repeated autumn hour.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        # Like APScheduler's own triggers: the first fire is due at ``now`` inclusive,
        # later ones strictly after the previous fire (missed runs are APScheduler's).
        # In UTC: subtracting from a local time would be wall-clock arithmetic.
        after = (
            previous_fire_time
            if previous_fire_time is not None
            else now.astimezone(UTC) - timedelta(microseconds=1)
        )
        fire = self.schedule.next_after(after)
        if fire is None:
            return None
        offset = fire.utcoffset()
        assert offset is not None
        return fire.astimezone(timezone(offset))

    def __str__(self) -> str:
        return str(self.schedule)

    def __repr__(self) -> str:
        return f"<RuleTrigger ({self.schedule})>"


class ClockTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """Computes fire times on the injected clock; gives APScheduler the real instants.

    ``covered_from`` is the clock instant of the first computation: the job fires every fire
    from then on (inclusive), so catch-up needs to look only before it.
    """

    def __init__(self, inner: RuleTrigger, clock: Clock, ahead: timedelta = timedelta(0)) -> None:
        self.inner = inner
        self.clock = clock
        #: APScheduler runs the job this long before each fire (``daemon.fire_ahead``).
        self.ahead = ahead
        self.covered_from: datetime | None = None

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        clock_now = self.clock.from_real(now)
        if previous_fire_time is None and self.covered_from is None:
            self.covered_from = clock_now.astimezone(UTC)
        previous = None
        if previous_fire_time is not None:
            previous = self.clock.from_real(previous_fire_time) + self.ahead
        fire = self.inner.get_next_fire_time(previous, clock_now)
        # A first fire closer than ``ahead`` gets a run time already past: APScheduler runs it
        # at once (misfire_grace_time=None).
        return None if fire is None else self.clock.to_real(fire) - self.ahead

    def __str__(self) -> str:
        return str(self.inner)

    def __repr__(self) -> str:
        return f"<ClockTrigger {self.inner!r} offset={self.clock.offset}>"


@dataclass(slots=True)
class _Entry:
    rule: Rule
    kind: JobKind
    schedule: Schedule
    trigger: ClockTrigger
    tz: tzinfo
    #: Fires up to here (a clock instant, UTC) are claimed by a run of the job; None before
    #: the job's first run, when it starts at ``trigger.covered_from``.
    claimed_until: datetime | None = None

    def claim_due(self, now: datetime) -> list[datetime]:
        """The fires due by ``now`` that no run has taken yet, oldest first; they are this
        run's. Synchronous, so two runs of one job never take the same fire."""
        since = self.first_unclaimed_after()
        if since is None:
            return []
        due = missed_fires(self.schedule, since, now)
        self.claimed_until = max(since, now.astimezone(UTC))
        return [at.astimezone(UTC) for at in due]

    def first_unclaimed_after(self) -> datetime | None:
        """Where the fires not yet taken begin (exclusive); None before the job runs."""
        if self.claimed_until is not None:
            return self.claimed_until
        covered = self.trigger.covered_from
        return None if covered is None else covered - _TICK


# --------------------------------------------------------------------------- the scheduler


class Scheduler:
    """Runs the scheduled rules of a rule set; see the module docstring for the guarantees."""

    def __init__(
        self,
        clock: Clock,
        marks: Marks,
        on_fire: FireCallback,
        on_poll: PollCallback,
        *,
        mark_every: timedelta = MARK_EVERY,
        on_retry: Callable[[str], None] | None = None,
        retry_base: float = RETRY_BASE,
        retry_max: float = RETRY_MAX,
        ahead: timedelta = timedelta(0),
        withdraw: WithdrawCallback | None = None,
    ) -> None:
        """``ahead``: how long before its time a fire is decided and written (its requests
        leave at that time). ``withdraw`` takes back what was written ahead by a rule version
        no longer in force (the store's); without it nothing is written ahead."""
        self._clock = clock
        self._ahead = ahead if withdraw is not None else timedelta(0)
        self._withdraw = withdraw
        #: Set once what earlier runs wrote ahead is settled (catch-up): fires wait for it.
        self._settled = asyncio.Event()
        #: Per rule, set once what its replaced version wrote ahead is taken back.
        self._withdrawals: dict[str, asyncio.Event] = {}
        #: (rule, digest) of a version replaced or removed -> when (clock): its fires from then
        #: on are the new version's (or nobody's), however late its runs reach them.
        self._replaced: dict[tuple[str, str], datetime] = {}

        self._marks = marks
        self._mark_writes: Coalescer[dict[str, datetime], None] = Coalescer(
            self._flush_marks, split=never
        )
        self._on_retry = on_retry
        self._retry_base = retry_base
        self._retry_max = retry_max
        self._waiting: dict[tuple[str, datetime], WaitingWrite] = {}
        self._retries: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._on_fire = on_fire
        self._on_poll = on_poll
        self._mark_every = mark_every
        self._running: set[asyncio.Task[Any]] = set()
        self._queued: deque[_Entry] = deque()  # fire runs waiting for a worker
        self._fire_workers: set[asyncio.Task[None]] = set()
        self._aps = AsyncIOScheduler(timezone=UTC)
        self._aps.add_listener(
            self._on_job_event, EVENT_JOB_ERROR | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES
        )
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending: dict[str, list[datetime]] = {}  # fires due and not yet handled
        self._polling: set[str] = set()
        self._caught_up = False
        self._marker: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start on the running loop; jobs added by an earlier :meth:`apply` begin now."""
        # Fires left pending by an earlier stop are the coming catch-up's now, and so are the
        # runs it left queued.
        self._pending.clear()
        self._queued.clear()
        self._stopping.clear()
        self._withdrawals.clear()
        if self._withdraw is None:
            self._settled.set()
        else:
            self._settled.clear()  # catch-up settles what was written ahead first
        # Jobs made anew, as for a leader starting for the first time: a term that ended (the
        # leadership lost, then won back) leaves its jobs having taken fires it may not have
        # written, which this start's take-back and catch-up must see as not taken.
        for entry in list(self._entries.values()):
            self._entries.pop(entry.rule.id)
            with contextlib.suppress(JobLookupError):
                self._aps.remove_job(entry.rule.id)
            self._add(self._entry(entry.rule))
        self._aps.start()
        self._marker = asyncio.get_running_loop().create_task(self._mark_periodically())

    async def settled(self) -> bool:
        """Waits until catch-up has taken back what earlier runs wrote ahead (True), or the
        scheduler stops first (False)."""
        return await self._until_or_stopped(self._settled)

    async def _until_or_stopped(self, event: asyncio.Event) -> bool:
        if event.is_set():
            return True
        waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return event.is_set()

    async def shutdown(self, *, timeout: float = 30.0, take_back: bool = True) -> None:
        """No new runs; running ones finish (cancelled past ``timeout``); marks are written;
        with ``take_back``, fires written ahead whose time has not come are taken back. Only
        a leader that still holds the leadership may take back: one that lost it would delete
        what the new leader wrote ahead (its own write of a fire refused as a duplicate)."""
        if not self._aps.running:
            return
        self._aps.pause()  # synchronous: no job is submitted from here on
        await asyncio.sleep(0)  # a run submitted just before starts, so it is awaited below
        self._stopping.set()  # fires waiting to be written again stay pending, unmarked
        if self._marker is not None:
            self._marker.cancel()
            await asyncio.gather(self._marker, return_exceptions=True)
            self._marker = None
        running = self._running | self._retries
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            for task in late:
                log.warning(
                    "%s did not finish within %gs of shutdown and was cancelled; a fire it "
                    "held stays unmarked, so the next start's catch-up reconsiders it",
                    task.get_name(),
                    timeout,
                )
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._aps.shutdown(wait=False)
        await asyncio.sleep(0)  # AsyncIOScheduler shuts down in a loop callback
        await self._write_marks(self._fire_rules())
        if take_back:
            await self._take_back_coming()

    async def _take_back_coming(self) -> None:
        """What this leader wrote ahead and whose time has not come goes back, so that no
        instance sends it after this one stopped: the next leader decides it (its job, or its
        catch-up under the rule's catch_up). Best effort: a leader that dies cannot do this,
        and the next one takes back at its start what its time has passed since."""
        if self._withdraw is None or not self._settled.is_set():
            return
        now = self._clock.now()
        try:
            taken = await self._withdraw(dict.fromkeys(self._fire_rules(), now), None)
        except Exception as exc:
            log.warning(
                "could not take back the fires written ahead of their time (%s: %s): they "
                "leave as written, by whichever instance sends then",
                type(exc).__name__,
                exc,
            )
            return
        if taken:
            log.info("took back %d fire(s) written ahead: the next leader decides them", taken)

    # -- jobs -------------------------------------------------------------------------------

    def apply(self, rules: Mapping[str, Rule]) -> Changes:
        """Make the jobs match ``rules``, touching only those whose rule's digest changed."""
        wanted = {rule_id: r for rule_id, r in rules.items() if job_kind(r) is not None}
        changes = Changes()
        now = self._clock.now()
        for key, at in list(self._replaced.items()):  # kept a day: runs end well before
            if now - at > REPLACED_KEPT:
                del self._replaced[key]
        replaced = [
            rule_id
            for rule_id, entry in self._entries.items()
            if entry.kind == "fire"
            and (rule_id not in wanted or wanted[rule_id].digest != entry.rule.digest)
        ]
        for rule_id in sorted(set(self._entries) - set(wanted)):
            self._remove(rule_id)
            changes.removed.append(rule_id)
        for rule_id in sorted(wanted):
            rule = wanted[rule_id]
            current = self._entries.get(rule_id)
            if current is not None and current.rule.digest == rule.digest:
                current.rule = rule
                changes.unchanged.append(rule_id)
                continue
            try:
                entry = self._entry(rule)
            except (TriggerError, ValueError) as exc:
                log.error("rule %s is not scheduled: its trigger is not usable: %s", rule_id, exc)
                if current is not None:
                    self._remove(rule_id)
                    changes.removed.append(rule_id)
                continue
            if current is not None:
                self._remove(rule_id)
                changes.rescheduled.append(rule_id)
            else:
                changes.added.append(rule_id)
            self._add(entry)
        self._take_back(replaced, now)
        if changes.added or changes.removed or changes.rescheduled:
            log.info(
                "schedules: %d added, %d removed, %d rescheduled, %d unchanged",
                len(changes.added),
                len(changes.removed),
                len(changes.rescheduled),
                len(changes.unchanged),
            )
        return changes

    def _take_back(self, rule_ids: Sequence[str], now: datetime) -> None:
        """Fires written ahead by versions of these rules now replaced or gone are taken back,
        in the background; each rule's next fires wait for it, so the new version's fire is
        never refused as a duplicate of the old one's. Before catch-up, the start's own
        settling covers every rule."""
        if self._withdraw is None or not rule_ids or not self._settled.is_set():
            return
        gates = {rule_id: asyncio.Event() for rule_id in rule_ids}
        self._withdrawals.update(gates)
        task = asyncio.get_running_loop().create_task(
            self._withdraw_replaced(gates, now), name="take back fires written ahead"
        )
        self._running.add(task)  # held, and waited for at shutdown
        task.add_done_callback(self._running.discard)

    async def _withdraw_replaced(self, gates: Mapping[str, asyncio.Event], now: datetime) -> None:
        """``now``: when the rules were replaced; their fires after it are the new versions'."""
        assert self._withdraw is not None
        for rule_id in gates:  # a write of the old version under way lands first
            async with self._locks.setdefault(rule_id, asyncio.Lock()):
                pass
        delay = self._retry_base
        try:
            for attempt in range(1, WITHDRAW_TRIES + 1):
                try:
                    taken = await self._withdraw(dict.fromkeys(gates, now), None)
                except Exception as exc:
                    if attempt == WITHDRAW_TRIES:
                        log.error(
                            "could not take back the fires that rules %s wrote ahead before "
                            "they changed (%s: %s): those not yet sent leave as written",
                            name_some(gates),
                            type(exc).__name__,
                            exc,
                        )
                        return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._retry_max)
                    continue
                if taken:
                    log.info(
                        "took back %d fire(s) written ahead by the previous version of %s",
                        taken,
                        name_some(gates),
                    )
                return
        finally:
            for rule_id, gate in gates.items():
                gate.set()
                if self._withdrawals.get(rule_id) is gate:
                    del self._withdrawals[rule_id]

    def next_fires(self) -> dict[str, datetime | None]:
        """Next fire (or poll) per scheduled rule, on the clock, in the rule's timezone."""
        out: dict[str, datetime | None] = {}
        for rule_id, entry in sorted(self._entries.items()):
            nxt = self._next_run(rule_id)
            if nxt is None and not self._aps.running:
                nxt = entry.schedule.next_after(self._clock.now() - _TICK)
            out[rule_id] = None if nxt is None else nxt.astimezone(entry.tz)
        return out

    def _entry(self, rule: Rule) -> _Entry:
        kind = job_kind(rule)
        assert kind is not None
        schedule = rule_schedule(rule)
        ahead = self._ahead if kind == "fire" else timedelta(0)
        trigger = ClockTrigger(RuleTrigger(schedule), self._clock, ahead)
        return _Entry(rule, kind, schedule, trigger, parse_timezone(rule.timezone))

    def _add(self, entry: _Entry) -> None:
        rule = entry.rule
        self._entries[rule.id] = entry
        self._replaced.pop((rule.id, rule.digest), None)  # a version back in force
        self._aps.add_job(
            self._run,
            trigger=entry.trigger,
            args=(entry,),
            id=rule.id,
            name=f"rule {rule.id} ({entry.kind})",
            # A run is a wake-up: it takes every fire due since the previous run from the
            # schedule itself, so one run per wake-up is enough, APScheduler must never drop
            # one as missed (lateness is judged against the rule's catch_up, and logged), and
            # never refuse one because another still runs (it would be lost until the next).
            coalesce=True,
            misfire_grace_time=None,
            max_instances=_MAX_INSTANCES,
            replace_existing=True,
        )

    def _remove(self, rule_id: str) -> None:
        entry = self._entries.pop(rule_id, None)
        if entry is not None:
            self._replaced[(rule_id, entry.rule.digest)] = self._clock.now()
        # An ``at`` job is already gone after its only fire.
        with contextlib.suppress(JobLookupError):
            self._aps.remove_job(rule_id)

    def _next_run(self, rule_id: str) -> datetime | None:
        """The job's next run on the clock; None once it has no more, or before start."""
        job = self._aps.get_job(rule_id)
        real = getattr(job, "next_run_time", None) if job is not None else None
        if real is None:
            return None
        entry = self._entries.get(rule_id)
        return self._clock.from_real(real) + (entry.trigger.ahead if entry else timedelta(0))

    async def _run(self, entry: _Entry) -> None:
        """One APScheduler run: takes the fires due since the previous run and handles them.

        Never raises, so a bad callback cannot stop the schedule. ``entry.rule`` is the
        version in force now (a reload that keeps the digest updates it in place). A fire run
        only joins the queue that FIRE_RUNS_AT_ONCE workers take from, so APScheduler's task
        ends at once; a queued run has not taken its fires yet, so they stay due and no mark
        moves past them meanwhile.
        """
        if entry.kind == "fire":
            self._queued.append(entry)
            if len(self._fire_workers) < FIRE_RUNS_AT_ONCE:
                self._start_fire_worker()
            return
        task = asyncio.current_task()
        if task is not None:  # so that shutdown lets it finish
            self._running.add(task)
        try:
            await self._run_now(entry)
        finally:
            if task is not None:
                self._running.discard(task)

    def _start_fire_worker(self) -> None:
        """A task taking queued fire runs until none is left; shutdown waits for it."""
        task = asyncio.get_running_loop().create_task(self._fire_worker(), name="fire runs")
        for tasks in (self._fire_workers, self._running):
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _fire_worker(self) -> None:
        while self._queued:
            await self._run_now(self._queued.popleft())

    async def _run_now(self, entry: _Entry) -> None:
        rule = entry.rule
        horizon = self._clock.now()
        replaced = self._replaced.get((rule.id, rule.digest))
        if replaced is not None:  # a run of a replaced job: only what was due before that
            horizon = min(horizon, replaced - _TICK)
        elif entry.kind == "fire":
            horizon += entry.trigger.ahead
        try:
            times = entry.claim_due(horizon)
            if not times:
                return
            if entry.kind == "poll":
                await self._poll(rule, times[-1])
            else:
                await self._fire_due(rule, times)
        except Exception:
            log.exception("rule %s: the scheduled job failed; it runs again next time", rule.id)

    def _on_job_event(self, event: JobEvent) -> None:
        """APScheduler dropped or failed a run, which the job options should rule out; the
        fires it held stay unclaimed, so the next run or the next start's catch-up has them."""
        what = {
            EVENT_JOB_ERROR: "failed",
            EVENT_JOB_MISSED: "was missed",
            EVENT_JOB_MAX_INSTANCES: "was refused (too many running)",
        }.get(event.code, f"had event {event.code}")
        error = getattr(event, "exception", None) if isinstance(event, JobExecutionEvent) else None
        log.error(
            "rule %s: a scheduled run %s%s; the fires it would have handled are taken by the "
            "next run, or by catch-up at the next start",
            event.job_id,
            what,
            f" ({type(error).__name__}: {error})" if error is not None else "",
        )

    async def _fire_due(self, rule: Rule, times: Sequence[datetime]) -> None:
        """Fires already due: the newest is sent unless later than catch_up, the older ones
        coalesced into it. Fires taken ahead of their time (``fire_ahead``) are each sent in
        turn: none of them is late, an ``every: 1s`` takes several at once."""
        now = self._clock.now()
        due = [at for at in times if at <= now]
        coming = [at for at in times if at > now]
        if due:
            *older, newest = due
            skipped = [
                (at, f"coalesced: the later fire due at {newest.isoformat()} is sent instead")
                for at in older
            ]
            late = now - newest
            if late > rule.catch_up:
                skipped.append(
                    (
                        newest,
                        f"late by {describe_age(late)}, more than catch_up "
                        f"({describe_age(rule.catch_up)}); was the process suspended?",
                    )
                )
            if skipped:
                log_skipped(rule.id, skipped, "the scheduler ran late")
            if late <= rule.catch_up:
                await self._deliver(rule, newest)
        for at in coming:
            await self._deliver(rule, at)
        await self._write_marks([rule.id])

    async def _deliver(self, rule: Rule, at: datetime) -> str | None:
        """Hand one fire to ``on_fire``, after the rule's earlier fires; the error, if any."""
        key = fire_key(at)
        pending = self._pending.setdefault(rule.id, [])
        pending.append(at)
        lock = self._locks.setdefault(rule.id, asyncio.Lock())
        try:
            if self._withdraw is not None:
                # What earlier runs, or this rule's replaced version, wrote ahead goes first.
                gate = self._withdrawals.get(rule.id)
                if not await self._until_or_stopped(self._settled) or (
                    gate is not None and not await self._until_or_stopped(gate)
                ):
                    return "the scheduler stopped first"  # pending: catch-up has it next time
            late = self._clock.now() - at
            if late > rule.catch_up:  # waited past it (a store away at start): as a restart
                log_skipped(
                    rule.id,
                    [(at, f"late by {describe_age(late)}, more than catch_up")],
                    "its write waited for the store",
                )
                self._settle(rule.id, at)
                return None
            async with lock:
                if self._superseded(rule, at):
                    log.info(
                        "rule %s: the fire due at %s is left to the rule's new version (or to "
                        "nobody, the rule being gone)",
                        rule.id,
                        at.isoformat(),
                    )
                else:
                    await self._on_fire(rule, at, key)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if self._stopping.is_set():
                log.warning(
                    "rule %s: writing the fire due at %s failed while stopping (%s); it stays "
                    "unmarked, so the next start's catch-up writes it",
                    rule.id,
                    at.isoformat(),
                    error,
                )
            elif not self._retry_later(rule, at, key, error):
                self._give_up(rule, at, key, error)
            return error  # pending until it lands or is given up: the mark stays before it
        # Not in ``finally``: a fire cancelled mid-way stays pending, so its mark stays before
        # it and the next start reconsiders it.
        pending.remove(at)
        return None

    def _superseded(self, rule: Rule, at: datetime) -> bool:
        """Whether the fire due at ``at`` belongs to a later version of the rule (or to none):
        this version was replaced or removed at or before ``at``."""
        replaced = self._replaced.get((rule.id, rule.digest))
        return replaced is not None and at >= replaced

    def _retry_later(self, rule: Rule, at: datetime, key: str, error: str) -> bool:
        """Start trying the write again in the background; False if it is too late for that."""
        gives_up_at = at + rule.catch_up
        now = self._clock.now()
        if now >= gives_up_at:
            return False
        waiting = WaitingWrite(rule.id, at, 1, error, now, gives_up_at)
        self._waiting[(rule.id, at)] = waiting
        log.warning(
            "rule %s: writing the fire due at %s failed (%s); it is tried again with backoff "
            "until it lands or %s (its catch_up), and its mark stays before it",
            rule.id,
            at.isoformat(),
            error,
            gives_up_at.isoformat(),
        )
        task = asyncio.get_running_loop().create_task(
            self._retry(rule, waiting, key), name=f"retry of rule {rule.id}'s fire at {at}"
        )
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        return True

    async def _retry(self, rule: Rule, waiting: WaitingWrite, key: str) -> None:
        at = waiting.scheduled_at
        try:
            while True:
                now = self._clock.now()
                if now >= waiting.gives_up_at:
                    self._give_up(rule, at, key, waiting.last_error)
                    return
                delay = retry_delay(waiting.attempts, self._retry_base, self._retry_max)
                delay = min(delay, (waiting.gives_up_at - now).total_seconds())
                waiting.next_try = now + timedelta(seconds=delay)
                if await self._stopped_within(delay):
                    return  # stays pending, so unmarked: the next start's catch-up has it
                if self._on_retry is not None:
                    self._on_retry(rule.id)
                try:
                    async with self._locks.setdefault(rule.id, asyncio.Lock()):
                        if self._superseded(rule, at):
                            self._settle(rule.id, at)  # the new version has it, or nobody
                            return
                        await self._on_fire(rule, at, key)
                except Exception as exc:
                    waiting.attempts += 1
                    waiting.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "rule %s: writing the fire due at %s failed again (attempt %d: %s)",
                        rule.id,
                        at.isoformat(),
                        waiting.attempts,
                        waiting.last_error,
                    )
                    continue
                log.info(
                    "rule %s: the fire due at %s is written, after %d failed attempt(s)",
                    rule.id,
                    at.isoformat(),
                    waiting.attempts,
                )
                self._settle(rule.id, at)
                await self._write_marks([rule.id])
                return
        finally:
            self._waiting.pop((rule.id, at), None)

    def _settle(self, rule_id: str, at: datetime) -> None:
        """The fire is no longer pending: the mark may move past it."""
        with contextlib.suppress(ValueError):  # a start after a stop forgot it already
            self._pending.get(rule_id, []).remove(at)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _give_up(self, rule: Rule, at: datetime, key: str, error: str) -> None:
        """Past ``catch_up``: a restart would skip it too, so the mark may move past it now."""
        self._settle(rule.id, at)
        log.error(
            "rule %s: the fire due at %s could not be written within its catch_up (%s) and is "
            "given up (last error: %s); to send it by hand (at most once): "
            "pushrules send %s --at %s --key %s",
            rule.id,
            at.isoformat(),
            describe_age(rule.catch_up),
            error,
            rule.id,
            at.isoformat(),
            key,
        )

    def waiting_writes(self) -> list[dict[str, Any]]:
        """Fires due whose write failed and is being tried again, oldest first."""
        # A copy first: /healthz calls this from a worker thread while the loop changes it.
        waiting = list(self._waiting.values())
        return [w.report() for w in sorted(waiting, key=lambda w: (w.scheduled_at, w.rule))]

    async def _poll(self, rule: Rule, at: datetime) -> None:
        if rule.id in self._polling:
            log.warning(
                "rule %s: the previous poll of its feed is still running, this turn (%s) is "
                "skipped; if it keeps happening, lower the feed's timeout or raise poll.every",
                rule.id,
                at.isoformat(),
            )
            return
        self._polling.add(rule.id)
        try:
            await self._on_poll(rule, at)
        except Exception:
            log.exception("rule %s: polling its feed failed; it is polled again next turn", rule.id)
        finally:
            self._polling.discard(rule.id)

    # -- catch-up and marks ---------------------------------------------------------------------

    async def catch_up(self, rules: Mapping[str, Rule]) -> list[CatchUp]:
        """Fires missed since each rule's mark: the newest sent if young, the rest logged.

        Sending uses the key the fire would have had on time, so a fire that did go out
        before a crash is ignored by the store. A rule without a mark is new: nothing to do.
        """
        scheduled = [r for r in rules.values() if job_kind(r) == "fire"]
        marks = await self._read_marks_until_read([r.id for r in scheduled])
        now = self._clock.now()
        if marks is None or not await self._take_back_earlier(
            marks, [r.id for r in scheduled], now
        ):
            return []  # stopped first: nothing moved, the next start catches up
        results: list[CatchUp] = []
        for rule in scheduled:
            mark = marks.get(rule.id)
            if mark is None:
                continue
            try:
                plan = plan_catch_up(
                    rule.id,
                    missed_fires(rule_schedule(rule), mark, self._until(rule, now)),
                    now,
                    rule.catch_up,
                )
            except (TriggerError, ValueError) as exc:
                log.error("rule %s: cannot compute its missed fires: %s", rule.id, exc)
                continue
            results.extend(await self._carry_out(rule, plan))
        self._caught_up = True
        await self._write_marks([r.id for r in scheduled], now=now)
        return results

    async def _take_back_earlier(
        self, marks: Mapping[str, datetime], scheduled: Sequence[str], now: datetime
    ) -> bool:
        """Take back what earlier runs wrote ahead and catch-up will decide again: fires after
        their rule's mark (catch-up's, or the jobs'), every fire of a rule no longer scheduled
        (it would not be sent had it waited). Tried until it is done, as reading the marks:
        until then no fire is written, so none is refused as a duplicate of one taken back.
        False if the scheduler stopped first."""
        if self._withdraw is None:
            return True
        after = {rule_id: marks.get(rule_id, now) for rule_id in scheduled}
        withdraw = self._withdraw
        taken = await self._until_done(
            lambda: withdraw(after, datetime.min.replace(tzinfo=UTC)),
            "take back the fires written ahead by an earlier run (fires wait meanwhile)",
        )
        if taken is None:
            return False
        if taken:
            log.info("took back %d fire(s) an earlier run wrote ahead: decided again now", taken)
        self._settled.set()
        return True

    def _until(self, rule: Rule, now: datetime) -> datetime:
        """Catch-up ends where the rule's current job began (it fires from there on)."""
        entry = self._entries.get(rule.id)
        covered = None
        if entry is not None and entry.rule.digest == rule.digest:
            covered = entry.trigger.covered_from
        return now if covered is None else min(now, covered - _TICK)

    async def _carry_out(self, rule: Rule, plan: Sequence[CatchUp]) -> list[CatchUp]:
        done: list[CatchUp] = []
        for item in plan:
            if item.action == "fired":
                log.info(
                    "rule %s: catching up the fire due at %s (%s)",
                    rule.id,
                    item.scheduled_at.isoformat(),
                    item.reason,
                )
                error = await self._deliver(rule, item.scheduled_at)
                if error is not None:
                    if (rule.id, item.scheduled_at) in self._waiting:
                        error += "; it is tried again until it lands or catch_up runs out"
                    item = CatchUp(rule.id, item.scheduled_at, "failed", error)
            done.append(item)
        skipped = [(c.scheduled_at, c.reason) for c in done if c.action == "skipped"]
        if skipped:
            context = "missed while the scheduler was stopped"
            if len(plan) >= MISSED_LIMIT:
                context += "; older ones not even listed"
            log_skipped(rule.id, skipped, context)
        return done

    async def _read_marks_until_read(self, rule_ids: Sequence[str]) -> dict[str, datetime] | None:
        """The marks, however long the store takes to give them (None: the scheduler stopped
        first). Reading none instead would move every mark to now and lose the fires missed
        while stopped; until they are read, no mark moves (``_caught_up`` stays false), so a
        stop meanwhile loses nothing either."""
        return await self._until_done(
            lambda: asyncio.to_thread(self._read_marks, rule_ids),
            "read the scheduler's marks (fires missed while stopped are caught up once they "
            "can be read)",
        )

    async def _until_done(self, attempt: Callable[[], Awaitable[T]], failed: str) -> T | None:
        """``attempt()``'s result, tried again for as long as it fails (waits of 1 s doubling
        up to 30 s, each logged); None if the scheduler stops first."""
        delay = MARKS_RETRY_FIRST
        while True:
            try:
                return await attempt()
            except Exception as exc:
                log.error(
                    "could not %s: %s: %s; trying again in %g s",
                    failed,
                    type(exc).__name__,
                    exc,
                    delay,
                )
            if await self._stopped_within(delay):
                return None
            delay = min(delay * 2, MARKS_RETRY_MAX)

    def _read_marks(self, rule_ids: Iterable[str]) -> dict[str, datetime]:
        found = {rule_id: self._marks.get_mark(MARK_SCOPE, rule_id) for rule_id in rule_ids}
        return {k: v for k, v in found.items() if v is not None}

    def _fire_rules(self) -> list[str]:
        return [rule_id for rule_id, e in self._entries.items() if e.kind == "fire"]

    def safe_mark(self, rule_id: str, now: datetime) -> datetime:
        """``now``, or just before the oldest fire of the rule that is due and not handled."""
        bound = now
        for at in self._pending.get(rule_id, ()):
            bound = min(bound, at - _TICK)
        entry = self._entries.get(rule_id)
        since = None if entry is None else entry.first_unclaimed_after()
        nxt = None if entry is None or since is None else entry.schedule.next_after(since)
        if nxt is not None and nxt <= now:  # due, not yet taken by a run (a busy loop)
            # In UTC: subtracting in the rule's zone would be wall-clock arithmetic.
            nxt = nxt.astimezone(UTC)
            bound = min(bound, nxt - _TICK)
        return bound.astimezone(UTC)

    async def _write_marks(self, rule_ids: Sequence[str], *, now: datetime | None = None) -> None:
        if not self._caught_up or not rule_ids:
            return
        moment = now or self._clock.now()
        values = {rule_id: self.safe_mark(rule_id, moment) for rule_id in rule_ids}
        try:
            await self._mark_writes.submit(values)
        except Exception as exc:
            log.warning(
                "could not record how far the schedules were handled (%s: %s); if the process "
                "stops now, the next start may report fires since the previous record as missed",
                type(exc).__name__,
                exc,
            )

    def _set_marks(self, values: Mapping[str, datetime]) -> None:
        set_marks = getattr(self._marks, "set_marks", None)
        if set_marks is not None:  # one transaction for all (the Store has it)
            set_marks(MARK_SCOPE, values)
            return
        for rule_id, at in values.items():
            self._marks.set_mark(MARK_SCOPE, rule_id, at)

    async def _flush_marks(self, batch: list[dict[str, datetime]]) -> list[None]:
        """Marks asked for while a write ran go together in the next write."""
        merged: dict[str, datetime] = {}
        for values in batch:
            for rule_id, at in values.items():
                merged[rule_id] = max(at, merged.get(rule_id, at))
        await asyncio.to_thread(self._set_marks, merged)
        return [None] * len(batch)

    async def _mark_periodically(self) -> None:
        interval = self._mark_every.total_seconds()
        while True:
            await asyncio.sleep(interval)
            await self._write_marks(self._fire_rules())
