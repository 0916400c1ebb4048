"""Issue 12, part 4: big fan-outs. A fire of thousands of targets is decided in steps on the
daemon's event loop, written to the outbox all or nothing, and a crash while it is written
leaves nothing behind that a retry of the same event would not complete exactly once."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from engine.accengage.sandbox import RunningSandbox
from engine.daemon.collector import CollectorHold
from engine.daemon.intake import LARGE_BODY
from engine.daemon.process import in_steps
from engine.outbox.firing import FireRequest, decide_steps, record
from engine.outbox.store import Store
from engine.render.compiler import FireContext
from tests.conftest import StartDaemon
from tests.daemon_process import Project, wait_for
from tests.helpers import load, make_project, write_rule
from tests.test_intake import ruleset  # noqa: F401 (a fixture)

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
TARGETS = 10_000  # 100 requests: what holds for them holds for 1,000

FAN_OUT = """
trigger: {event: flight.changed}
apps:
  flights-android: {parentMessageId: "4"}
message:
  text: "${first_name}, flight {{ event.flight }} leaves at {{ event.at }}"
targets:
  - for_each: "{{ event.members }}"
    as: m
    target:
      memberId: "{{ m.id }}"
      data: {first_name: "{{ m.name }}"}
"""


@pytest.fixture
def fan_out(tmp_path: Path) -> tuple[Any, Any]:
    root = make_project(tmp_path / "p")
    write_rule(root, "fan-out", FAN_OUT)
    loaded = load(root)
    assert loaded.ok, loaded.problems
    return loaded.rules["fan-out"], loaded.project


def members(count: int) -> list[dict[str, str]]:
    return [{"id": f"m{i:05d}", "name": f"Member {i}"} for i in range(count)]


def decided(project: Any, rule: Any, key: str, count: int = TARGETS) -> Any:
    """The fire as the daemon decides it: in steps, on an event loop."""
    ctx = FireContext(NOW, {"flight": "AF1", "at": "18:05", "members": members(count)})
    decision = asyncio.run(in_steps(decide_steps(project, rule, ctx, NOW)))
    return FireRequest(rule, ctx, key), decision


class CrashBeforeCommit:
    """Every outbox row of a fire inserted in its transaction, then the process 'dies' (an
    exception) before the commit; until :meth:`off`."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine
        self.inserts = 0
        event.listen(self.engine, "after_cursor_execute", self._crash)

    def _crash(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO OUTBOX"):
            self.inserts += 1
            if self.inserts == 2:  # chunk 0 (the fire's lock), then all the other chunks
                raise RuntimeError("the daemon died while writing the fire")

    def off(self) -> None:
        if event.contains(self.engine, "after_cursor_execute", self._crash):
            event.remove(self.engine, "after_cursor_execute", self._crash)


@pytest.fixture
def crash(store: Store) -> Iterator[CrashBeforeCommit]:
    injected = CrashBeforeCommit(store)
    yield injected
    injected.off()


def test_a_crash_while_a_fan_out_is_written_leaves_nothing_and_its_retry_writes_it_once(
    store: Store, fan_out: tuple[Any, Any], crash: CrashBeforeCommit
) -> None:
    rule, project = fan_out
    one = decided(project, rule, "event:big")
    assert one[1].verdict == "send" and len(one[1].requests) == TARGETS // 100

    with pytest.raises(RuntimeError, match="died"):
        record(store, [one], now=NOW)
    assert crash.inserts == 2, "the crash came once every row was inserted"
    assert sum(store.backlog().values()) == 0
    assert store.history(rule="fan-out") == []

    crash.off()  # the daemon is back; the client sends the event again, same key
    [outcome] = record(store, [decided(project, rule, "event:big")], now=NOW)
    assert outcome.status == "queued" and len(outcome.ids) == TARGETS // 100
    rows = store.get_many(outcome.ids, attempts=False)
    assert [r.chunk for r in rows] == list(range(TARGETS // 100))
    sent_to = [t["memberId"] for r in rows for t in r.request()["sendInstantMessage"]["targets"]]
    assert sent_to == [m["id"] for m in members(TARGETS)]

    [again] = record(store, [decided(project, rule, "event:big")], now=NOW)
    assert again.status == "duplicate" and again.ids == outcome.ids
    assert store.backlog()["pending"] == TARGETS // 100


def test_a_fan_out_decided_in_steps_is_the_fan_out_decided_at_once(
    fan_out: tuple[Any, Any],
) -> None:
    from engine.outbox.firing import decide

    rule, project = fan_out
    _, stepped = decided(project, rule, "k", 1_050)
    ctx = FireContext(NOW, {"flight": "AF1", "at": "18:05", "members": members(1_050)})
    at_once = decide(project, rule, ctx, NOW)
    assert stepped.verdict == at_once.verdict == "send"
    assert [r.body for r in stepped.requests] == [r.body for r in at_once.requests]


# --- the event loop's side ----------------------------------------------------------------------


def test_work_in_steps_lets_others_run_between_two_and_says_when_it_is_long() -> None:
    seen: list[str] = []
    longs: list[str] = []

    def work(steps: int) -> Iterator[None]:
        for _ in range(steps):
            seen.append("step")
            yield
        return f"{steps} steps"  # type: ignore[misc]

    async def other() -> None:
        for _ in range(3):
            seen.append("other")
            await asyncio.sleep(0)

    async def scenario() -> list[Any]:
        return await asyncio.gather(
            in_steps(work(3), lambda: longs.append("3 steps")),  # type: ignore[arg-type]
            other(),
            in_steps(work(0), lambda: longs.append("no step")),  # type: ignore[arg-type]
        )

    results = asyncio.run(scenario())
    assert results[0] == "3 steps" and results[2] == "0 steps"
    assert seen[:3] == ["step", "other", "step"], "the other task ran between two steps"
    assert longs == ["3 steps"]  # once, and never for work done in one go


def test_a_step_gives_way_while_a_health_check_runs() -> None:
    async def scenario() -> list[str]:
        seen: list[str] = []
        checking = [3]

        def give_way() -> bool:
            checking[0] -= 1
            seen.append("waited")
            return checking[0] > 0

        def work() -> Iterator[None]:
            seen.append("step 1")
            yield
            seen.append("step 2")

        await in_steps(work(), give_way=give_way)  # type: ignore[arg-type]
        return seen

    assert asyncio.run(scenario()) == ["step 1", "waited", "waited", "waited", "step 2"]


def test_the_collector_is_held_off_by_nested_holds_and_runs_again_after_the_last() -> None:
    assert gc.isenabled()
    with CollectorHold() as outer:
        assert gc.isenabled(), "not held before start()"
        outer.start()
        assert not gc.isenabled()
        with CollectorHold() as inner:
            inner.start()
            inner.start()  # once per hold
        assert not gc.isenabled(), "the outer hold still holds it"
    assert gc.isenabled()
    gc.disable()
    try:
        with CollectorHold() as hold:
            hold.start()
        assert not gc.isenabled(), "a collector someone else disabled stays disabled"
    finally:
        gc.enable()


def test_a_large_event_is_parsed_and_fired_with_the_collector_held(
    ruleset: Any,  # noqa: F811 (the fixture)
) -> None:
    from tests.test_intake import FakeState, big_event, post

    class Watching(FakeState):  # type: ignore[misc]
        async def fire_event(self, name: str, payload: dict[str, Any], key: str) -> Any:
            held.append(not gc.isenabled())
            return await super().fire_event(name, payload, key)

    held: list[bool] = []
    state = Watching(ruleset)
    assert post(state, big_event(100)).status_code == 202
    assert post(state, big_event(LARGE_BODY)).status_code == 202
    assert held == [False, True]
    assert gc.isenabled()


# --- a real daemon ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_running_daemon_takes_a_fan_out_bigger_than_1_mib_when_intake_max_body_allows_it(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """intake.max_body of pushrules.yaml raises the limit (1 MiB by default); the event's 30,000
    targets are sent once each, in 300 requests; a body past the setting is refused, naming it."""
    project = Project(tmp_path / "p", sandbox.url)
    config = project.root / "pushrules.yaml"
    config.write_text(config.read_text() + "intake:\n  max_body: 2097152\n")
    text = FAN_OUT.replace("flights-android", "app-ios").replace("flight.changed", "changed")
    (project.root / "rules" / "fan-out.yaml").write_text(text)
    daemon = daemons(project)

    count = 30_000
    body = json.dumps({"flight": "AF1", "at": "18:05", "members": members(count)}).encode()
    assert 1024 * 1024 < len(body) < 2 * 1024 * 1024
    answer = daemon.post("changed", body, key="big")
    assert answer.status_code == 202, answer.text
    assert answer.json()["rules"][0]["detail"] == "300 requests queued"
    wait_for(lambda: len(sandbox.requests()) == 300, "the 300 requests", log=daemon.log)
    received = [
        t["memberId"]
        for r in sandbox.requests()
        for t in r["body"]["sendInstantMessage"]["targets"]
    ]
    assert sorted(received) == [m["id"] for m in members(count)]

    again = daemon.post("changed", body, key="big")
    assert again.json()["rules"][0]["status"] == "duplicate"
    too_big = daemon.post("changed", body + b" " * (2 * 1024 * 1024), key="bigger")
    assert too_big.status_code == 413
    assert "intake.max_body in pushrules.yaml" in too_big.json()["error"]
    assert daemon.health()[0] == 200


def test_a_prune_round_while_a_fan_out_is_written_loses_and_doubles_nothing(
    store: Store, fan_out: tuple[Any, Any]
) -> None:
    """The daemon's pruning (small batches, in a thread) running while a fire of 10,000
    targets is written: each waits its turn for the store, the fire lands whole and once, every
    old row goes, and the maintained counts equal the rows."""
    import threading
    import time
    from datetime import timedelta

    from engine.daemon.maintenance import Maintenance
    from engine.outbox.states import SENT
    from engine.outbox.store import Fire, ResultUpdate
    from engine.rules.project import RetentionConfig
    from tests.helpers import URL, body, ok

    day = timedelta(days=1)
    old = store.enqueue_many([Fire("old", f"k{i}", [(URL, body(i))]) for i in range(600)], now=NOW)
    ids = [i for fire in old for i in fire.ids]
    rows = store.claim_ids("w", ids, NOW, timedelta(minutes=5))
    store.record_results([ResultUpdate(r.id, ok(NOW), SENT, None, r.claimed_by) for r in rows])
    later = NOW + 100 * day
    housekeeping = Maintenance(store, RetentionConfig, lambda: later, pause=0, batch=50)
    rule, project = fan_out
    fire = decided(project, rule, "event:big")
    rounds: list[dict[str, int]] = []
    writing = threading.Event()

    def prune() -> None:
        writing.wait(30)
        while sum(r.get("sent", 0) for r in rounds) < 600:
            rounds.append(asyncio.run(housekeeping.prune_round()))

    def hold_the_write(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        """Inside the fire's transaction, once its first rows are in: the pruner starts and
        the write goes on a little later, so the two meet."""
        if statement.lstrip().upper().startswith("INSERT INTO OUTBOX") and not writing.is_set():
            writing.set()
            time.sleep(0.3)

    pruner = threading.Thread(target=prune)
    pruner.start()
    event.listen(store.engine, "after_cursor_execute", hold_the_write)
    try:
        [outcome] = record(store, [fire], now=later)
    finally:
        event.remove(store.engine, "after_cursor_execute", hold_the_write)
    pruner.join(60)
    assert not pruner.is_alive(), "the prune rounds never finished"
    assert outcome.status == "queued" and len(outcome.ids) == TARGETS // 100
    assert store.history(rule="old") == []
    assert sum(r.get("sent", 0) for r in rounds) == 600
    backlog = store.backlog()
    assert backlog["pending"] == TARGETS // 100 and backlog[SENT] == 0
    assert sum(backlog.values()) == len(store.history(limit=10_000))
