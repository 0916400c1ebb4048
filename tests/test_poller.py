"""The feed poller: pure item and key extraction, then real HTTP on loopback and a real store."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.daemon.clock import Clock
from engine.daemon.poller import FeedError, Poller, PollResult, item_key, items_at
from engine.daemon.scheduler import Scheduler
from engine.outbox.store import Store
from engine.rules.rule import Rule
from tests.test_scheduler import MemoryMarks, make_rule

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- a feed on loopback


class Route:
    def __init__(self) -> None:
        self.status = 200
        self.body = b"[]"
        self.delay = 0.0
        self.hits = 0

    def json(self, value: Any) -> None:
        self.status, self.body = 200, json.dumps(value).encode()


class FeedServer:
    """A scripted HTTP server in a thread: each path answers what its Route says."""

    def __init__(self) -> None:
        routes: dict[str, Route] = {}
        self.routes = routes

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                route.hits += 1
                if route.delay:
                    time.sleep(route.delay)
                try:
                    self.send_response(route.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body)
                except OSError:
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def route(self, path: str) -> Route:
        return self.routes.setdefault(path, Route())

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[FeedServer]:
    feed = FeedServer()
    feed.thread.start()
    try:
        yield feed
    finally:
        feed.httpd.shutdown()
        feed.httpd.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path}/s.db")
    try:
        yield s
    finally:
        s.close()


class Items:
    """on_item that records what it is given."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.fail = fail or set()

    async def __call__(self, rule: Rule, item: Mapping[str, Any], key: str) -> None:
        if key in self.fail:
            self.fail.discard(key)
            raise RuntimeError("outbox is locked")
        self.calls.append((rule.id, dict(item), key))

    @property
    def keys(self) -> list[str]:
        return [key for _, _, key in self.calls]


def poll_rule(url: str, rule_id: str = "offers", **poll: Any) -> Rule:
    return make_rule(rule_id, {"poll": {"url": url, "every": "5m", **poll}})


def polls(poller: Poller, rule: Rule, count: int = 1) -> list[PollResult]:
    async def go() -> list[PollResult]:
        try:
            return [await poller.poll(rule, NOW) for _ in range(count)]
        finally:
            await poller.aclose()

    return asyncio.run(go())


async def apoll(poller: Poller, rule: Rule) -> PollResult:
    return await poller.poll(rule, NOW)


def offers(*ids: int) -> dict[str, Any]:
    return {"offers": [{"id": i, "price": 10 * i} for i in ids]}


# --------------------------------------------------------------------------- pure parts


def test_items_at_follows_a_dot_path_and_says_what_is_missing() -> None:
    body = {"data": {"offers": [1, 2], "pages": [{"items": [3]}]}}
    assert items_at(body, "data.offers") == [1, 2]
    assert items_at(body, "data.pages.0.items") == [3]
    assert items_at([4], None) == [4]
    with pytest.raises(
        FeedError, match=r"no 'offer' at data of the feed \(keys there: offers, pages\)"
    ):
        items_at(body, "data.offer")
    with pytest.raises(FeedError, match=r"'data' is an object, not a list"):
        items_at(body, "data")
    with pytest.raises(FeedError, match=r"top level .*poll\.items"):
        items_at(body, None)


def test_item_key_from_a_template_or_a_field_path() -> None:
    item = {"id": 7, "ref": {"code": "AB"}, "kind": "fare"}
    ctx = {"item": item}
    assert item_key("id", item, ctx) == "7"
    assert item_key("ref.code", item, ctx) == "AB"
    assert item_key("{{ item.kind }}-{{ item.id }}", item, ctx) == "fare-7"
    with pytest.raises(ValueError, match="no field 'missing'"):
        item_key("missing", item, ctx)
    with pytest.raises(ValueError, match="empty"):
        item_key("{{ '' }}", item, ctx)


# --------------------------------------------------------------------------- polling


def test_first_poll_records_then_a_new_item_fires_once(server: FeedServer, store: Store) -> None:
    feed = server.route("/offers")
    feed.json(offers(1, 2))
    got = Items()
    poller = Poller(store, got, Clock())
    rule = poll_rule(server.url("/offers"), items="offers", key="{{ item.id }}")

    async def scenario() -> list[PollResult]:
        results = [await apoll(poller, rule)]
        feed.json(offers(1, 2, 3))
        results.append(await apoll(poller, rule))
        results.append(await apoll(poller, rule))
        await poller.aclose()
        return results

    first, second, third = asyncio.run(scenario())
    assert first.ok and first.recorded and first.items == 2 and first.sent == 0
    assert second.ok and not second.recorded and second.new == 1 and second.sent == 1
    assert got.calls == [("offers", {"id": 3, "price": 30}, "item:3")]
    assert third.ok and third.new == 0 and third.sent == 0
    status = poller.status()["offers"]
    assert status.url == server.url("/offers")
    assert status.items_seen_last == 3 and status.new_items_last == 0
    assert status.consecutive_failures == 0 and status.last_ok_at is not None


def test_on_first_poll_send_fires_the_first_batch(server: FeedServer, store: Store) -> None:
    server.route("/offers").json(offers(1, 2))
    got = Items()
    rule = poll_rule(server.url("/offers"), items="offers", key="id", on_first_poll="send")
    first, again = polls(Poller(store, got, Clock()), rule, 2)
    assert first.sent == 2 and not first.recorded
    assert got.keys == ["item:1", "item:2"]
    assert again.sent == 0


class KilledWhileRecording:
    """The store of a process killed once it has fired a poll's items, before it recorded
    their keys: ``see_keys`` never returns (here: raises) for the feed's keys."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def unseen_keys(self, scope: str, keys: Any) -> list[str]:
        return self.store.unseen_keys(scope, keys)

    def see_keys(self, scope: str, keys: Any, now: datetime) -> list[str]:
        if scope.startswith("feed:"):
            raise RuntimeError("killed")
        return self.store.see_keys(scope, keys, now)


def test_a_poll_killed_before_it_records_its_fired_items_loses_none(
    server: FeedServer, store: Store
) -> None:
    """The leader killed between firing a poll's items and recording their keys: the next
    poll, by whichever instance leads, fires them again (the outbox refuses each as a
    duplicate of its key), where recording first lost them for good."""
    feed = server.route("/offers")
    feed.json(offers(1))
    rule = poll_rule(server.url("/offers"), items="offers", key="id")
    polls(Poller(store, Items(), Clock()), rule)  # primes the feed
    feed.json(offers(1, 2, 3))
    dying = Items()
    (killed,) = polls(Poller(KilledWhileRecording(store), dying, Clock()), rule)  # type: ignore[arg-type]
    assert dying.keys == ["item:2", "item:3"] and not killed.ok
    after = Items()
    (next_leader,) = polls(Poller(store, after, Clock()), rule)
    assert after.keys == ["item:2", "item:3"] and next_leader.new == 2
    (later,) = polls(Poller(store, Items(), Clock()), rule)
    assert later.new == 0


def test_an_item_whose_firing_raised_is_tried_again_by_the_next_leader_too(
    server: FeedServer, store: Store
) -> None:
    server.route("/offers").json(offers(1, 2))
    rule = poll_rule(server.url("/offers"), items="offers", key="id", on_first_poll="send")
    failing = Items(fail={"item:2"})
    (first,) = polls(Poller(store, failing, Clock()), rule)
    assert failing.keys == ["item:1"] and first.sent == 1
    other = Items()  # another instance: it never knew this process's retry list
    polls(Poller(store, other, Clock()), rule)
    assert other.keys == ["item:2"]


class Killed(BaseException):
    """The process ends here (SIGKILL, power): nothing after it runs."""


def test_a_poll_killed_while_it_fires_its_items_loses_none(
    server: FeedServer, store: Store
) -> None:
    feed = server.route("/offers")
    feed.json(offers(1))
    rule = poll_rule(server.url("/offers"), items="offers", key="id")
    polls(Poller(store, Items(), Clock()), rule)  # primes the feed
    feed.json(offers(1, 2, 3))

    async def dies(rule: Rule, item: Mapping[str, Any], key: str) -> None:
        raise Killed

    with pytest.raises(Killed):
        polls(Poller(store, dies, Clock()), rule)
    after = Items()
    polls(Poller(store, after, Clock()), rule)
    assert after.keys == ["item:2", "item:3"]


@pytest.mark.parametrize(
    ("items", "body", "key", "expected"),
    [
        ("data.offers", {"data": {"offers": [{"id": "a"}, {"id": "b"}]}}, "id", ["a", "b"]),
        (None, [{"ref": {"code": "X1"}}, {"ref": {"code": "X2"}}], "ref.code", ["X1", "X2"]),
        ("offers", offers(1, 2), "{{ item.id }}-{{ item.price }}", ["1-10", "2-20"]),
        ("offers", offers(5), "{{ rule.id }}/{{ item.id }}", ["offers/5"]),
    ],
)
def test_items_path_and_key_forms(
    server: FeedServer,
    store: Store,
    items: str | None,
    body: Any,
    key: str,
    expected: list[str],
) -> None:
    server.route("/feed").json(body)
    got = Items()
    extra = {"items": items} if items else {}
    rule = poll_rule(server.url("/feed"), key=key, on_first_poll="send", **extra)
    (result,) = polls(Poller(store, got, Clock()), rule)
    assert result.ok, result.error
    assert got.keys == [f"item:{k}" for k in expected]


def test_items_that_are_not_objects_or_have_no_key_are_skipped(
    server: FeedServer, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    server.route("/feed").json({"offers": [{"id": 1}, "junk", {"name": "no id"}, {"id": 2}]})
    got = Items()
    rule = poll_rule(server.url("/feed"), items="offers", key="id", on_first_poll="send")
    with caplog.at_level(logging.WARNING, logger="pushrules.poller"):
        (result,) = polls(Poller(store, got, Clock()), rule)
    assert result.ok and result.skipped == 2
    assert got.keys == ["item:1", "item:2"]
    assert "2 items" in caplog.text and "offers" in caplog.text and "item 1 is text" in caplog.text


FAILURES = {
    "timeout": (lambda r: setattr(r, "delay", 1.0), "no complete answer within 0.3s"),
    "http 500": (lambda r: setattr(r, "status", 500), "HTTP 500"),
    "not json": (lambda r: setattr(r, "body", b"<html>oops</html>"), "not JSON"),
    "no list": (lambda r: r.json({"error": "maintenance"}), "no 'offers' at the top level"),
    "too large": (lambda r: r.json(offers(*range(200))), "larger than 2,000 bytes"),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_a_failing_feed_is_counted_and_the_next_good_poll_recovers(
    server: FeedServer, store: Store, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    feed = server.route("/offers")
    feed.json(offers(1))
    got = Items()
    poller = Poller(store, got, Clock(), timeout=0.3, max_bytes=2000)
    rule = poll_rule(server.url("/offers"), items="offers", key="id")
    break_feed, reason = FAILURES[kind]

    async def scenario() -> tuple[PollResult, PollResult, PollResult]:
        assert (await apoll(poller, rule)).recorded
        break_feed(feed)
        bad = await apoll(poller, rule)
        worse = await apoll(poller, rule)
        failing = poller.status()["offers"]
        assert failing.consecutive_failures == 2
        assert failing.last_error is not None and reason in failing.last_error
        assert failing.last_error_at is not None
        feed.delay, feed.status = 0.0, 200
        feed.json(offers(1, 2))
        good = await apoll(poller, rule)
        await poller.aclose()
        return bad, worse, good

    with caplog.at_level(logging.WARNING, logger="pushrules.poller"):
        bad, worse, good = asyncio.run(scenario())
    assert not bad.ok and not worse.ok and bad.error is not None and reason in bad.error
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
    assert "offers" in warning.getMessage() and server.url("/offers") in warning.getMessage()
    assert good.ok and good.sent == 1 and got.keys == ["item:2"]
    status = poller.status()["offers"]
    assert status.consecutive_failures == 0 and status.last_error is not None  # kept for history


def test_an_unreachable_feed_does_not_raise(store: Store) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    rule = poll_rule(f"http://127.0.0.1:{port}/feed", key="id")
    (result,) = polls(Poller(store, Items(), Clock(), timeout=1), rule)
    assert not result.ok and result.error is not None and "Connect" in result.error


def test_a_restart_does_not_resend(server: FeedServer, tmp_path: Path) -> None:
    feed = server.route("/offers")
    feed.json(offers(1, 2))
    url = f"sqlite:///{tmp_path}/s.db"
    rule = poll_rule(server.url("/offers"), items="offers", key="id")
    before, after = Items(), Items()

    with Store(url) as store:
        polls(Poller(store, before, Clock()), rule, 1)
        feed.json(offers(1, 2, 3))
        polls(Poller(store, before, Clock()), rule, 1)
    assert before.keys == ["item:3"]

    with Store(url) as store:  # a new process: nothing in memory
        (again,) = polls(Poller(store, after, Clock()), rule)
        assert again.ok and again.new == 0 and after.keys == []
        feed.json(offers(1, 2, 3, 4))
        (later,) = polls(Poller(store, after, Clock()), rule)
    assert not later.recorded and after.keys == ["item:4"]


def test_a_failed_fire_is_retried_at_the_next_poll(server: FeedServer, store: Store) -> None:
    server.route("/offers").json(offers(1))
    got = Items(fail={"item:1"})
    rule = poll_rule(server.url("/offers"), items="offers", key="id", on_first_poll="send")
    first, second, third = polls(Poller(store, got, Clock()), rule, 3)
    assert first.ok and first.sent == 0
    assert second.sent == 1 and got.keys == ["item:1"]
    assert third.sent == 0


def test_pointing_a_rule_at_another_feed_records_it_first(server: FeedServer, store: Store) -> None:
    server.route("/a").json(offers(1))
    server.route("/b").json(offers(7, 8))
    got = Items()
    poller = Poller(store, got, Clock())

    async def scenario() -> PollResult:
        await apoll(poller, poll_rule(server.url("/a"), items="offers", key="id"))
        moved = await apoll(poller, poll_rule(server.url("/b"), items="offers", key="id"))
        await poller.aclose()
        return moved

    moved = asyncio.run(scenario())
    assert moved.recorded and got.calls == []


def test_the_scheduler_drives_the_poller(server: FeedServer, store: Store) -> None:
    feed = server.route("/offers")
    feed.json(offers(1))
    got = Items()

    async def scenario() -> None:
        poller = Poller(store, got, Clock())
        sched = Scheduler(Clock(), MemoryMarks(), _no_fire, poller.poll)
        await sched.start()
        try:
            rule = make_rule(
                "offers",
                {
                    "poll": {
                        "url": server.url("/offers"),
                        "every": "1s",
                        "items": "offers",
                        "key": "id",
                    }
                },
            )
            sched.apply({"offers": rule})
            await _until(
                lambda: "offers" in poller.status() and poller.status()["offers"].last_ok_at
            )
            feed.json(offers(1, 2))
            await _until(lambda: got.keys == ["item:2"])
        finally:
            await sched.shutdown()
            await poller.aclose()

    asyncio.run(scenario())
    assert got.keys == ["item:2"]


async def _no_fire(rule: Rule, at: datetime, key: str) -> None:
    raise AssertionError("a poll rule does not fire on its own")


async def _until(condition: Any, timeout: float = 3.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)
