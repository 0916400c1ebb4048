"""Faults found by reading the fault-isolation work once more: each stays with its own push.

An odd answer from upstream, a store error at a bad moment, or a store URL with a password in it
must cost only the push (or the message) it concerns.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from engine.daemon import scheduler as scheduler_module
from engine.daemon.clock import Clock
from engine.daemon.scheduler import MARK_SCOPE, CatchUp, Scheduler
from engine.outbox.instances import Leadership
from engine.outbox.schema import utcnow
from engine.outbox.states import SENT
from engine.outbox.store import Fire, Store
from engine.rules.loader import Loader
from engine.rules.secrets import SecretRef
from engine.send.dispatch import Credentials, Dispatcher
from engine.send.policy import MESSAGE_ID_MAX, DispatchSettings, parse_answer, parse_return_code
from tests.helpers import REPO, body, make_project, problems
from tests.test_intake import FakeState, post
from tests.test_scheduler import MemoryMarks, Recorder, make_rule


def test_codes_no_column_holds_are_not_codes() -> None:
    assert parse_return_code("99999999999999999999") is None
    assert parse_return_code(2**40) is None
    assert parse_return_code(-(2**31)) == -(2**31)
    assert parse_return_code("2147483647") == 2**31 - 1
    answer = parse_answer(b'{"returnCode": 0, "messageId": "' + b"m" * 1000 + b'"}')
    assert answer is not None and len(answer[2] or "") == MESSAGE_ID_MAX


def test_one_odd_answer_does_not_hold_back_the_results_written_with_it(tmp_path: Path) -> None:
    """A 200 whose returnCode or messageId no column holds used to fail the whole batch of
    results written with it: pushes really sent stayed `sending`, then went in_doubt."""

    def answer(request: httpx.Request) -> httpx.Response:
        marker = request.url.path.strip("/")
        if marker == "huge-code":
            return httpx.Response(200, json={"returnCode": "99999999999999999999"})
        if marker == "long-id":
            return httpx.Response(200, json={"returnCode": 0, "messageId": "m" * 5000})
        return httpx.Response(200, json={"returnCode": 0, "messageId": marker})

    settings = DispatchSettings(
        max_attempts=2, backoff_base=0.01, backoff_max=0.02, lease=timedelta(minutes=5)
    )
    creds = Credentials(SecretRef("env", "HOME"), SecretRef("env", "HOME"))
    base = "http://upstream.invalid"
    markers = ["huge-code", "long-id", *(f"ok{i}" for i in range(8))]
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        store.enqueue_many(
            [Fire("r", m, [(f"{base}/{m}", body(m))]) for m in markers], now=utcnow()
        )

        async def go() -> None:
            transport = httpx.MockTransport(answer)
            async with Dispatcher(store, settings, creds, transport=transport) as d:
                await d.run(asyncio.Event(), drain=True)

        asyncio.run(go())
        rows = {r.idem_key: r for r in store.history()}
    assert all(rows[m].state == SENT for m in markers if m.startswith("ok")), {
        k: r.state for k, r in rows.items()
    }
    assert rows["long-id"].state == SENT
    assert rows["long-id"].message_id == "m" * MESSAGE_ID_MAX
    # An answer with no usable code is this row's problem alone, and not "sending" forever.
    assert rows["huge-code"].state != "sending"


# --- the scheduler's marks cannot be read when it takes the lead ------------------------------


class FlakyMarks(MemoryMarks):
    """Marks whose reads fail a number of times first, as a store that is briefly down."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.writes = 0

    def get_mark(self, scope: str, name: str) -> datetime | None:
        if self.failures:
            self.failures -= 1
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return super().get_mark(scope, name)

    def set_mark(self, scope: str, name: str, at: datetime) -> None:
        self.writes += 1
        super().set_mark(scope, name, at)


def test_marks_that_cannot_be_read_at_first_still_catch_up_the_missed_fire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reading no marks used to move every mark to now: the fire missed while stopped was gone
    for good. Now catch-up waits for the marks, and no mark moves meanwhile."""
    monkeypatch.setattr(scheduler_module, "MARKS_RETRY_FIRST", 0.05)
    now = datetime.now(UTC)
    marks = FlakyMarks(failures=3)
    marks.values[(MARK_SCOPE, "minutely")] = now - timedelta(minutes=3)

    async def scenario() -> list[CatchUp]:
        rec = Recorder()
        sched = Scheduler(Clock(), marks, rec.on_fire, rec.on_poll)
        rule = make_rule("minutely", {"cron": "* * * * *"})
        await sched.start()
        try:
            sched.apply({"minutely": rule})
            return await sched.catch_up({"minutely": rule})
        finally:
            await sched.shutdown()

    results = asyncio.run(scenario())
    assert marks.failures == 0
    fired = [r for r in results if r.action == "fired"]
    assert len(fired) == 1, results  # the newest missed fire, young enough to send


# --- a store URL's password in messages -------------------------------------------------------


def test_a_store_url_typo_does_not_print_its_password(tmp_path: Path) -> None:
    """`postgres://` (not `postgresql+psycopg://`) is a common typo; its message quotes the URL,
    and that message reaches validate, the logs and the unauthenticated /healthz."""
    root = make_project(tmp_path / "p")
    config = root / "pushrules.yaml"
    text = config.read_text().replace(
        "store: sqlite:///pushrules.db", "store: postgres://pushrules:s3cr3t-pw@db/pushrules"
    )
    assert "s3cr3t-pw" in text
    config.write_text(text)
    found = [p for p in problems(root) if p.field == "store"]
    assert found and "is not a store URL" in found[0].message, found
    assert all("s3cr3t-pw" not in p.message for p in found)
    assert "pushrules:********@db" in found[0].message
    with pytest.raises(ValueError) as info:
        Store("mysql://pushrules:s3cr3t-pw@db/pushrules")
    assert "s3cr3t-pw" not in str(info.value) and "only sqlite" in str(info.value)


# --- the answer to an event whose fires are stored --------------------------------------------


def test_an_event_whose_fires_are_stored_is_answered_202_when_the_pauses_cannot_be_read() -> None:
    """The pauses are read only to word the answer, after the fires are committed; failing to
    read them used to answer 500 with no event id, so a client that sent no Idempotency-Key
    would send the event again, and everyone in it would get the push twice."""

    class PausesAway(FakeState):
        def paused(self) -> dict[str, Any]:
            raise OperationalError("SELECT", {}, Exception("database is locked"))

    state = PausesAway(Loader(REPO, workers=1).load())
    response = post(state)
    assert response.status_code == 202, response.text
    assert response.json()["event_id"]
    assert [r["status"] for r in response.json()["rules"]] == ["queued"]


# --- the leader's database is briefly away ----------------------------------------------------


def test_a_store_that_cannot_be_reached_means_not_leading_not_a_crash() -> None:
    """try_acquire used to raise the driver's error, which ended the daemon's leadership task
    and so the whole daemon (exit 1): a short PostgreSQL outage stopped every instance."""

    class Away:
        dialect = "postgresql"

        class engine:
            @staticmethod
            def connect() -> Any:
                raise OperationalError("connect", {}, Exception("connection refused"))

    leadership = Leadership(Away(), "pushrules-leader")  # type: ignore[arg-type]
    assert leadership.try_acquire() is False
    assert leadership.try_acquire() is False  # and again at the next round, no state left


# --- a graceful stop gives back only rows that never left -------------------------------------


def test_unclaim_never_gives_back_a_row_whose_request_left(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        fires = [Fire("r", k, [("http://upstream.invalid/x", body(k))]) for k in ("a", "b")]
        store.enqueue_many(fires, now=utcnow())
        claimed = store.claim("w", 10, utcnow(), timedelta(minutes=5))
        token = claimed[0].claimed_by or ""
        left, stayed = claimed[0].id, claimed[1].id
        assert store.mark_leaving({token: [left]}, utcnow()) == {left}
        assert store.unclaim([left, stayed], token) == 1
        states = {r.id: r.state for r in store.history()}
    assert states == {left: "sending", stayed: "pending"}


# --- the CLI waiting on a row it may not take -------------------------------------------------


def test_waiting_on_a_due_row_that_cannot_be_claimed_does_not_spin(tmp_path: Path) -> None:
    """A retrying row of a paused rule is due but not claimable: ``deliver`` used to ask the
    store again at once, thousands of times a second, until ``--wait`` ran out."""
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        [result] = store.enqueue_many(
            [Fire("r", "k", [("http://upstream.invalid/x", body("k"))])], now=utcnow()
        )
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE outbox SET state = 'retrying', attempts = 1"))
        store.pause("r")
        calls = 0
        claim_ids = store.claim_ids

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return claim_ids(*args, **kwargs)

        store.claim_ids = counting  # type: ignore[method-assign]
        creds = Credentials(SecretRef("env", "HOME"), SecretRef("env", "HOME"))
        settings = DispatchSettings(poll_every=0.2)

        async def go() -> None:
            transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"returnCode": 0}))
            async with Dispatcher(store, settings, creds, transport=transport) as d:
                await d.deliver(result.ids, wait=1.0)

        asyncio.run(go())
        row = store.get(result.ids[0])
    assert row is not None and row.state == "retrying"  # paused: left for later
    assert calls <= 8, f"{calls} claims in one second"
