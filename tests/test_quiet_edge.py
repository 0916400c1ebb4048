"""Quiet hours judged again as rows leave: a row that comes due inside them waits for their end.

A fire is deferred when it is decided inside the quiet hours; these tests are about rows that
come due later, inside them: released from a limit, of a rule resumed at night, or retried.
Each runs on SQLite and PostgreSQL (the shared ``store`` fixture).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.daemon.process import quiet_hook
from engine.outbox.firing import fire
from engine.outbox.states import HELD, PENDING, RETRYING, SENT
from engine.outbox.store import Fire, Store
from engine.render.compiler import FireContext
from engine.rules.loader import RuleSet
from engine.rules.rule import Rule
from engine.send.dispatch import Dispatcher
from tests.helpers import body, load, make_project, write_rule
from tests.test_dispatch import CREDENTIALS, FAST, LOGIN_VAR, PASSWORD_VAR, Scripted

PARIS = ZoneInfo("Europe/Paris")
QUIET = 'quiet_hours: {from: "21:00", to: "08:00", then: %s}\n'
RULE = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Your flight leaves soon"
targets:
  - memberId: "{{ event.member }}"
"""


def paris(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=PARIS)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at.astimezone(UTC)


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOGIN_VAR, "ops@example.com")
    monkeypatch.setenv(PASSWORD_VAR, f"pw-{secrets.token_hex(8)}")


@pytest.fixture
def project(tmp_path: Path) -> Callable[..., RuleSet]:
    """The rules ``quiet`` (21:00-08:00, then ``then``) and ``loud`` (no quiet hours)."""

    def build(then: str = "defer", extra: str = "") -> RuleSet:
        root = make_project(tmp_path / "project")
        write_rule(root, "quiet", RULE + QUIET % then + extra)
        write_rule(root, "loud", RULE)
        ruleset = load(root)
        assert ruleset.ok, ruleset.problems
        return ruleset

    return build


def dispatcher(store: Store, rules: dict[str, Rule], clock: Clock) -> Dispatcher:
    return Dispatcher(store, FAST, CREDENTIALS, clock=clock, quiet=quiet_hook(lambda: rules))


def send_once(store: Store, rules: dict[str, Rule], clock: Clock) -> int:
    async def once() -> int:
        async with dispatcher(store, rules, clock) as d:
            return await d.run_once()

    return asyncio.run(once())


def enqueue(store: Store, url: str, rule: str, at: datetime) -> int:
    [result] = store.enqueue_many([Fire(rule, f"{rule}-1", [(url, body(rule))])], now=at)
    return result.ids[0]


def texts(sandbox: RunningSandbox) -> list[str]:
    return [e["body"]["sendInstantMessage"]["message"]["text"] for e in sandbox.requests()]


def test_a_row_due_inside_quiet_hours_waits_for_their_end(
    store: Store,
    sandbox: RunningSandbox,
    project: Callable[..., RuleSet],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """And a row of another rule in the same batch leaves at once."""
    ruleset = dict(project().rules)
    quiet = enqueue(store, sandbox.url, "quiet", paris(26, 23))
    loud = enqueue(store, sandbox.url, "loud", paris(26, 23))
    clock = Clock(paris(26, 23))
    with caplog.at_level(logging.INFO, logger="pushrules.dispatch"):
        assert send_once(store, ruleset, clock) == 2
    assert texts(sandbox) == ["loud"]
    assert "rule quiet: 1 row(s) wait for the end of its quiet hours at 2026-11-27T08:00" in (
        caplog.text
    )
    row = store.get(quiet)
    assert row is not None and store.get(loud).state == SENT
    assert (row.state, row.attempts, row.attempt_log) == (PENDING, 0, ())
    assert row.next_attempt_at == paris(27, 8) and row.claimed_until is None
    clock.at = paris(27, 8)
    send_once(store, ruleset, clock)
    assert texts(sandbox) == ["loud", "quiet"]
    assert store.get(quiet).state == SENT


@pytest.mark.parametrize("then", ["defer", "skip"])
def test_rows_released_at_night_leave_when_the_quiet_hours_end(
    store: Store,
    sandbox: RunningSandbox,
    project: Callable[..., RuleSet],
    then: str,
) -> None:
    """A person releasing rows held by the limit at 23:00 does not wake anyone: they wait.
    Even a rule that skips fires inside its quiet hours keeps them: skip is for new fires."""
    loaded = project(then, "limit: {count: 1, per: 1h}\n")
    assert loaded.project is not None
    ruleset, rule = dict(loaded.rules), loaded.rules["quiet"]
    to_sandbox = dataclasses.replace(loaded.project, url=sandbox.url)

    def fire_at(at: datetime, member: str) -> tuple[int, ...]:
        context = FireContext(now=at, event={"member": member})
        outcome = fire(store, to_sandbox, rule, context, f"event:{member}", now=at.astimezone(UTC))
        return outcome.ids

    clock = Clock(paris(26, 20))
    fire_at(paris(26, 20), "first")
    send_once(store, ruleset, clock)
    [held] = fire_at(paris(26, 20, 30), "second")
    assert store.get(held).state == HELD
    store.release(rule="quiet", now=paris(26, 23).astimezone(UTC))
    clock.at = paris(26, 23)
    send_once(store, ruleset, clock)
    assert len(sandbox.requests()) == 1
    row = store.get(held)
    assert row is not None and (row.state, row.next_attempt_at) == (PENDING, paris(27, 8))
    clock.at = paris(27, 8)
    send_once(store, ruleset, clock)
    assert len(sandbox.requests()) == 2 and store.get(held).state == SENT


def test_a_retry_landing_inside_quiet_hours_waits(
    store: Store, project: Callable[..., RuleSet]
) -> None:
    """Its first attempt stays counted and in the history; waiting adds no attempt."""
    server = Scripted((503, {"Retry-After": "1800"}, b"busy"))
    try:
        ruleset = dict(project().rules)
        row_id = enqueue(store, server.url, "quiet", paris(26, 20, 45))
        clock = Clock(paris(26, 20, 45))
        send_once(store, ruleset, clock)
        row = store.get(row_id)
        assert row is not None and (row.state, row.next_attempt_at) == (RETRYING, paris(26, 21, 15))
        clock.at = paris(26, 21, 15)
        send_once(store, ruleset, clock)
        row = store.get(row_id)
        assert row is not None and len(server.bodies) == 1
        assert (row.state, row.attempts, len(row.attempt_log)) == (RETRYING, 1, 1)
        assert row.next_attempt_at == paris(27, 8)
        clock.at = paris(27, 8)
        send_once(store, ruleset, clock)
        assert len(server.bodies) == 2 and store.get(row_id).state == SENT
    finally:
        server.stop()


def test_the_daemons_hook_reads_the_current_rules(project: Callable[..., RuleSet]) -> None:
    """In the rule's zone, across midnight and a change of time; None for a rule without quiet
    hours, or removed."""
    current = dict(project().rules)
    hook = quiet_hook(lambda: current)
    assert hook("quiet", paris(26, 23).astimezone(UTC)) == paris(27, 8)
    assert hook("quiet", paris(27, 7, 59).astimezone(UTC)) == paris(27, 8)
    assert hook("quiet", paris(27, 8).astimezone(UTC)) is None
    autumn = datetime(2026, 10, 24, 23, 0, tzinfo=PARIS)  # summer time; winter time at 08:00
    assert hook("quiet", autumn.astimezone(UTC)) == datetime(2026, 10, 25, 7, 0, tzinfo=UTC)
    assert hook("loud", paris(26, 23).astimezone(UTC)) is None
    del current["quiet"]
    assert hook("quiet", paris(26, 23).astimezone(UTC)) is None


def test_in_the_hour_dst_repeats_quiet_rows_wait_for_the_second_end_and_starve_nobody(
    store: Store, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """Paris, 2026-10-25: 02:00-03:00 is lived twice. Quiet 22:00-02:30, at the second 02:10
    (01:10 UTC): quiet until the second 02:30 (01:30 UTC). The end was the first 02:30, in the
    past: the rows came back due at once, claimed and given back in a loop ahead of the rest."""
    root = make_project(tmp_path / "project")
    write_rule(root, "quiet", RULE + 'quiet_hours: {from: "22:00", to: "02:30"}\n')
    write_rule(root, "loud", RULE)
    rules = dict(load(root).rules)
    now = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)
    clock = Clock(now)
    fires = [Fire("quiet", f"q-{n}", [(sandbox.url, body("quiet"))]) for n in range(3)]
    store.enqueue_many(fires, now=now.replace(minute=0))
    store.enqueue_many([Fire("loud", "l-1", [(sandbox.url, body("loud"))])], now=now)

    async def claims() -> None:
        async with dispatcher(store, rules, clock) as d:
            for _ in range(5):
                await d.run_once(limit=2)

    asyncio.run(claims())
    assert texts(sandbox) == ["loud"]
    ends = {r.next_attempt_at for r in store.history(rule="quiet", limit=10)}
    assert ends == {datetime(2026, 10, 25, 1, 30, tzinfo=UTC)}


def test_quiet_hours_ending_in_the_spring_gap_end_when_the_gap_does() -> None:
    """Paris 2026-03-29: 02:00-03:00 does not exist. Quiet 22:00-02:30 ends at 03:00, as a
    fixed time of `at:` or cron in the gap does; a fire at 01:50 was deferred to 03:30, after a
    fire at 03:10 that was no longer quiet."""
    from engine.outbox.firing import quiet_until
    from engine.rules.rule import QuietHours

    paris = ZoneInfo("Europe/Paris")
    quiet = QuietHours("22:00", "02:30", "defer")
    assert quiet_until(quiet, datetime(2026, 3, 29, 3, 10, tzinfo=paris)) is None
    end = quiet_until(quiet, datetime(2026, 3, 29, 1, 50, tzinfo=paris))
    assert end == datetime(2026, 3, 29, 3, 0, tzinfo=paris)
