"""The dispatcher: its pure classification, then real HTTP on loopback against the sandbox.

A few answers the sandbox does not give (429 with Retry-After, a numeric ``returnCode``, garbage,
an answer echoing the request) come from a small scripted app served the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from engine.accengage.api import ROUTE
from engine.accengage.sandbox import RunningSandbox, SandboxConfig, start_in_thread
from engine.outbox.schema import utcnow
from engine.outbox.states import DEAD, FAILED, IN_DOUBT, PENDING, RETRYING, SENT
from engine.outbox.store import Fire, OutboxRow, Store
from engine.rules.project import Project
from engine.rules.secrets import Masker, SecretRef
from engine.send.dispatch import Credentials, Dispatcher
from engine.send.policy import (
    DispatchSettings,
    Transport,
    redact,
    with_user,
)
from engine.send.runtime import (
    SANDBOX_LOGIN,
    SANDBOX_PASSWORD,
    credentials,
    make_dispatcher,
    sandboxed,
)
from tests.conftest import store_url_context
from tests.helpers import body

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LOGIN_VAR = "PUSHRULES_TEST_LOGIN"
PASSWORD_VAR = "PUSHRULES_TEST_PASSWORD"
CREDENTIALS = Credentials(SecretRef("env", LOGIN_VAR), SecretRef("env", PASSWORD_VAR))
#: Quick retries and short timeouts, so the tests wait little.
FAST = DispatchSettings(
    concurrency=4,
    backoff_base=0.05,
    backoff_max=0.2,
    max_attempts=30,
    timeout=httpx.Timeout(connect=1.0, read=1.0, write=1.0, pool=1.0),
    deadline=3.0,
    lease=timedelta(seconds=30),
    poll_every=0.05,
)


def marker_of(entry: dict[str, Any]) -> str:
    return entry["body"]["sendInstantMessage"]["message"]["text"]


def enqueue(store: Store, url: str, n: int, prefix: str = "m") -> list[int]:
    fires = [Fire("rule", f"{prefix}-{i}", [(url, body(f"{prefix}-{i}"))]) for i in range(n)]
    return [i for r in store.enqueue_many(fires, now=utcnow()) for i in r.ids]


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> str:
    value = f"pw-{secrets.token_hex(8)}"
    monkeypatch.setenv(LOGIN_VAR, "ops@example.com")
    monkeypatch.setenv(PASSWORD_VAR, value)
    return value


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'outbox.db'}")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxConfig(seed=1)) as running:
        yield running


def run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


async def deliver(
    store: Store,
    ids: list[int],
    wait: float = 3.0,
    settings: DispatchSettings = FAST,
    transport: Transport | None = None,
) -> list[OutboxRow]:
    if transport is not None:
        settings = dataclasses.replace(settings, transport=transport)
    async with Dispatcher(store, settings, CREDENTIALS) as d:
        return await d.deliver(ids, wait)


#: The transports a dispatcher can send with: every test of a network fault runs on each.
TRANSPORTS: tuple[Transport, ...] = ("httpcore", "aiohttp")
each_transport = pytest.mark.parametrize("transport", TRANSPORTS)


# --- a scripted endpoint for answers the sandbox does not give -------------------------------


Answer = tuple[int, dict[str, str], bytes]
OK: Answer = (200, {}, b'{"returnCode": "0", "returnLabel": "sent", "messageId": "1"}')


class Scripted:
    """Answers from ``script`` in order, then OK; keeps every body it got."""

    def __init__(self, *script: Answer | Callable[[bytes], Answer]) -> None:
        self.script = list(script)
        self.bodies: list[bytes] = []
        self.times: list[float] = []
        app = Starlette(routes=[Route(ROUTE, self._handle, methods=["POST"])])
        sock = socket.create_server(("127.0.0.1", 0))
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", access_log=False, lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._sock = sock
        self._thread.start()
        while not self._server.started:
            time.sleep(0.005)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}{ROUTE}"

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        self.bodies.append(raw)
        self.times.append(time.monotonic())
        step = self.script.pop(0) if self.script else OK
        status, headers, content = step(raw) if callable(step) else step
        return Response(content, status_code=status, headers=headers)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    started: list[Scripted] = []

    def start(*script: Answer | Callable[[bytes], Answer]) -> Scripted:
        s = Scripted(*script)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_credentials_show_references_only(password: str) -> None:
    assert password not in repr(CREDENTIALS) and password not in str(CREDENTIALS)
    assert "PUSHRULES_TEST_PASSWORD" in repr(CREDENTIALS)
    sent = json.loads(with_user(json.dumps(body("x")), "l", password))
    assert next(iter(sent["sendInstantMessage"])) == "user"
    assert redact(f'echo "{password}"', Masker([password])) == 'echo "********"'
    assert redact('a"b', Masker(['a"b'])) == "********"


# --- over HTTP, against the sandbox ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@each_transport
def test_sandbox_down_then_up_delivers_each_request_once(
    store: Store, password: str, transport: Transport
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}{ROUTE}"
    ids = enqueue(store, url, 12)
    settings = dataclasses.replace(FAST, transport=transport)

    async def scenario() -> list[OutboxRow]:
        async with Dispatcher(store, settings, CREDENTIALS) as d:
            assert await d.run_once(100) == 12  # the sandbox is down: nothing reaches it
            rows = store.get_many(ids)
            assert {r.state for r in rows} == {RETRYING}
            assert "did not reach Accengage" in (rows[0].last_error or "")
            with start_in_thread(SandboxConfig(), port=port) as sandbox:
                done = await d.deliver(ids, wait=5)
                received = Counter(marker_of(e) for e in sandbox.requests())
            assert received == {f"m-{i}": 1 for i in range(12)}
            assert d.metrics.accepted == 12
            assert d.metrics.value("pushrules_sends_total", return_code="none") >= 12
            return done

    rows = run(scenario)
    assert {r.state for r in rows} == {SENT}
    assert all(r.attempts >= 2 and r.message_id for r in rows)
    assert all(r.attempt_log[0].error and r.attempt_log[-1].outcome == SENT for r in rows)


def test_permanent_code_is_recorded_and_not_retried(
    store: Store, sandbox: RunningSandbox, password: str
) -> None:
    sandbox.set_faults(code=5)
    ids = enqueue(store, sandbox.url, 1)
    [row] = run(lambda: deliver(store, ids))
    assert (row.state, row.return_code, row.attempts) == (FAILED, 5, 1)
    assert row.return_label is not None and row.return_label.startswith("No or bad message")
    assert "code 5 (No or bad message)" in (row.last_error or "")
    assert len(sandbox.requests()) == 1


def test_code_1_is_retried(store: Store, sandbox: RunningSandbox, password: str) -> None:
    sandbox.set_faults(code=1)
    ids = enqueue(store, sandbox.url, 1)

    def clear_fault(row: OutboxRow, attempt: Any, state: str) -> None:
        sandbox.set_faults(code=None)

    async def scenario() -> list[OutboxRow]:
        async with Dispatcher(store, FAST, CREDENTIALS, on_attempt=clear_fault) as d:
            return await d.deliver(ids, wait=5)

    [row] = run(scenario)
    assert row.state == SENT
    assert [(a.outcome, a.return_code) for a in row.attempt_log] == [(RETRYING, 1), (SENT, 0)]
    assert len(sandbox.requests()) == 2


def test_503s_are_retried_until_delivered(
    store: Store, sandbox: RunningSandbox, password: str
) -> None:
    sandbox.set_faults(fail_rate=0.5)
    ids = enqueue(store, sandbox.url, 20)
    rows = run(lambda: deliver(store, ids, wait=10))
    assert {r.state for r in rows} == {SENT}
    statuses = Counter(e["http_status"] for e in sandbox.requests())
    assert statuses[200] == 20 and statuses[503] > 0
    assert Counter(marker_of(e) for e in sandbox.requests() if e["http_status"] == 200) == {
        f"m-{i}": 1 for i in range(20)
    }


def test_retry_after_is_honoured(store: Store, scripted: Callable[..., Scripted]) -> None:
    server = scripted((429, {"Retry-After": "1"}, b"slow down"))
    ids = enqueue(store, server.url, 1)
    [row] = run(lambda: deliver(store, ids, wait=4))
    assert row.state == SENT and len(server.times) == 2
    assert server.times[1] - server.times[0] >= 0.95
    first, second = row.attempt_log
    assert first.http_status == 429 and first.outcome == RETRYING
    assert (second.started_at - first.started_at).total_seconds() >= 0.95


def test_deliver_leaves_later_retries_to_the_daemon(
    store: Store, scripted: Callable[..., Scripted]
) -> None:
    server = scripted((503, {"Retry-After": "60"}, b"busy"))
    ids = enqueue(store, server.url, 1)
    started = time.monotonic()
    [row] = run(lambda: deliver(store, ids, wait=1))
    assert time.monotonic() - started < 1.0  # did not sleep a minute
    assert row.state == RETRYING and len(server.bodies) == 1


@each_transport
def test_read_timeout_parks_in_doubt_and_resend_sends_it(
    store: Store, sandbox: RunningSandbox, password: str, transport: Transport
) -> None:
    sandbox.set_faults(hang=1)
    settings = DispatchSettings(
        concurrency=2,
        timeout=httpx.Timeout(connect=1.0, read=0.8, write=1.0, pool=1.0),
        deadline=2.0,
        lease=timedelta(seconds=30),
        transport=transport,
    )
    ids = enqueue(store, sandbox.url, 1)
    [row] = run(lambda: deliver(store, ids, settings=settings))
    assert row.state == IN_DOUBT and row.attempts == 1
    assert "ReadTimeout" in (row.last_error or "") and "resend or drop" in (row.last_error or "")
    assert len(sandbox.requests()) == 1
    # Parked rows are not picked up again by a running dispatcher...
    assert run(lambda: deliver(store, ids, settings=settings))[0].state == IN_DOUBT
    # ...until a person resends it.
    store.resend(row.id)
    [again] = run(lambda: deliver(store, ids, settings=settings))
    assert again.state == SENT and [a.outcome for a in again.attempt_log] == [IN_DOUBT, SENT]
    assert len(sandbox.requests()) == 2


@each_transport
def test_dropped_connection_is_in_doubt_or_retried_by_choice(
    store: Store, sandbox: RunningSandbox, password: str, transport: Transport
) -> None:
    sandbox.set_faults(drop=1)
    ids = enqueue(store, sandbox.url, 1, "a")
    [parked] = run(lambda: deliver(store, ids, transport=transport))
    assert parked.state == IN_DOUBT and "RemoteProtocolError" in (parked.last_error or "")
    sandbox.set_faults(drop=1)
    retry = DispatchSettings(
        on_unknown_outcome="retry",
        backoff_base=0.05,
        backoff_max=0.1,
        lease=timedelta(seconds=300),
        transport=transport,
    )
    [retried] = run(lambda: deliver(store, enqueue(store, sandbox.url, 1, "b"), settings=retry))
    assert retried.state == SENT and retried.attempts == 2


# --- network faults over raw sockets, for each transport -------------------------------------

#: A body larger than the client's socket buffer (at most 4 MB here) and the server's (4 kB):
#: a server that reads nothing makes the client's write fail before the request is all out.
LARGER_THAN_SOCKET_BUFFERS = 16 * 1024 * 1024
#: A short read timeout, so that "never answers" ends quickly.
QUICK = DispatchSettings(
    concurrency=1,
    timeout=httpx.Timeout(connect=1.0, read=0.3, write=5.0, pool=1.0),
    deadline=5.0,
    lease=timedelta(seconds=30),
)


class FaultyServer:
    """A raw TCP endpoint in the test's event loop that fails every request one way.

    ``refuse``: no one listens. ``reset_unread``: accepts, waits for the request's first bytes,
    then resets without reading one (the client cannot have written it all: see
    LARGER_THAN_SOCKET_BUFFERS). ``never_read``: accepts and reads nothing, so the client's
    write times out.
    ``reset_after_request``: reads the whole request, then resets without a word.
    ``silent``: reads the whole request and never answers. ``half_answer`` and
    ``half_status``: read it, send part of an answer, close.
    """

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.accepted = 0
        self.requests: list[bytes] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before listen
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setblocking(False)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}{ROUTE}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._open: list[socket.socket] = []

    async def __aenter__(self) -> FaultyServer:
        if self.fault != "refuse":
            self._sock.listen(8)
            self._tasks.add(asyncio.create_task(self._serve()))
        else:
            self._sock.close()  # the port was ours a moment ago: nobody listens on it now
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._open:
            conn.close()
        self._sock.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            self.accepted += 1
            task = asyncio.create_task(self._answer(conn))
            self._tasks.add(task)

    async def _answer(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if self.fault == "reset_unread":
            await readable(loop, conn)  # the client is writing: the request is on its way
            reset(conn)
            return
        if self.fault == "never_read":
            self._open.append(conn)
            return
        self.requests.append(await read_request(loop, conn))
        if self.fault == "reset_after_request":
            reset(conn)
        elif self.fault == "silent":
            self._open.append(conn)
        else:
            partial = {
                "half_answer": b'HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n{"returnCode": "0"',
                "half_status": b"HTTP/1.1 20",
            }[self.fault]
            await loop.sock_sendall(conn, partial)
            conn.close()


async def readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Wait for bytes to read, reading none."""
    ready = loop.create_future()
    loop.add_reader(conn, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn)


def reset(conn: socket.socket) -> None:
    """Close with a TCP reset rather than an orderly end."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


async def read_request(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """One HTTP/1.1 request with a Content-Length body, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await loop.sock_recv(conn, 65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += await loop.sock_recv(conn, 65536)
    return head + b"\r\n\r\n" + rest


NOT_SENT = "the request did not reach Accengage"
MAYBE_SENT = "the request may have reached Accengage"


@each_transport
@pytest.mark.parametrize(
    ("fault", "state", "says"),
    [
        ("refuse", RETRYING, NOT_SENT),
        ("reset_unread", RETRYING, NOT_SENT),
        ("never_read", RETRYING, NOT_SENT),
        ("reset_after_request", IN_DOUBT, MAYBE_SENT),
        ("silent", IN_DOUBT, MAYBE_SENT),
        ("half_answer", IN_DOUBT, MAYBE_SENT),
        ("half_status", IN_DOUBT, MAYBE_SENT),
    ],
)
def test_a_request_is_retried_only_when_it_provably_did_not_arrive(
    store: Store, transport: Transport, fault: str, state: str, says: str
) -> None:
    """Each way a connection can fail, on each transport: retried when the request never left
    whole, parked in_doubt when it may have arrived."""
    settings = dataclasses.replace(QUICK, transport=transport)
    unread = fault in ("reset_unread", "never_read")
    if fault == "never_read":
        settings = dataclasses.replace(
            settings, timeout=httpx.Timeout(connect=1.0, read=1.0, write=0.3, pool=1.0)
        )

    async def scenario() -> FaultyServer:
        async with FaultyServer(fault) as server:
            marker = "x" * LARGER_THAN_SOCKET_BUFFERS if unread else "m"
            store.enqueue("rule", "k", [(server.url, body(marker))], now=utcnow())
            async with Dispatcher(store, settings, CREDENTIALS) as d:
                assert await d.run_once() == 1
            return server

    server = run(scenario)
    [row] = store.history()
    assert (row.state, row.attempts) == (state, 1), row.last_error
    assert says in (row.last_error or "")
    if unread:
        assert server.accepted >= 1 and not server.requests
    elif fault != "refuse":
        assert len(server.requests) == 1  # it did arrive whole


def test_numeric_code_and_garbage_answers(store: Store, scripted: Callable[..., Scripted]) -> None:
    server = scripted(
        (200, {}, b'{"returnCode": 0, "returnLabel": "ok", "messageId": 4242}'),
        (200, {"content-type": "text/html"}, b"<html>Bad gateway, kind of</html>"),
    )
    ids = enqueue(store, server.url, 2)
    settings = DispatchSettings(concurrency=1, lease=timedelta(seconds=300))
    first, second = run(lambda: deliver(store, ids, settings=settings))
    assert (first.state, first.return_code, first.message_id) == (SENT, 0, "4242")
    assert second.state == IN_DOUBT
    assert second.return_label == (
        "answer is not the documented JSON: <html>Bad gateway, kind of</html>"
    )


def test_exhausted_attempts_are_dead(store: Store, scripted: Callable[..., Scripted]) -> None:
    server = scripted(*[(503, {}, b"down")] * 3)
    ids = enqueue(store, server.url, 1)
    settings = DispatchSettings(
        max_attempts=3, backoff_base=0.01, backoff_max=0.02, lease=timedelta(seconds=300)
    )
    [row] = run(lambda: deliver(store, ids, settings=settings))
    assert (row.state, row.attempts, len(server.bodies)) == (DEAD, 3, 3)
    store.resend(row.id)
    [again] = run(lambda: deliver(store, ids, settings=settings))
    assert again.state == SENT and len(again.attempt_log) == 4


def test_a_missing_secret_sends_nothing_and_says_which(
    store: Store, sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOGIN_VAR, "ops@example.com")
    monkeypatch.delenv(PASSWORD_VAR, raising=False)
    ids = enqueue(store, sandbox.url, 1)
    [row] = run(lambda: deliver(store, ids, wait=0.2))
    assert row.state == RETRYING and row.attempts == 0
    assert f"environment variable {PASSWORD_VAR} is not set" in (row.last_error or "")
    assert sandbox.requests() == []
    monkeypatch.setenv(PASSWORD_VAR, "now-set")  # the row retries by itself once it is back

    async def later() -> list[OutboxRow]:
        async with Dispatcher(store, FAST, CREDENTIALS) as d:
            return await d.deliver(ids, wait=0.1)

    [row] = run(later)
    assert row.state == SENT


@each_transport
def test_the_password_never_leaves_the_request(
    store: Store,
    sandbox: RunningSandbox,
    scripted: Callable[..., Scripted],
    password: str,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    transport: Transport,
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = scripted(
        lambda raw: (200, {}, b"echo " + raw),  # garbage that repeats the password
        lambda raw: (500, {}, raw),  # a 5xx that repeats it too
        lambda raw: (400, {}, raw),
    )
    ids = enqueue(store, echo.url, 3, "echo")
    sandbox.set_faults(code=5)
    ids += enqueue(store, sandbox.url, 1, "refused")
    sandbox.set_faults(code=None, hang=1)
    ids += enqueue(store, sandbox.url, 1, "hung")
    settings = DispatchSettings(
        concurrency=1,
        timeout=httpx.Timeout(connect=1.0, read=0.8, write=1.0, pool=1.0),
        deadline=2.0,
        backoff_base=0.01,
        backoff_max=0.02,
        lease=timedelta(seconds=30),
        transport=transport,
    )
    rows = run(lambda: deliver(store, ids, settings=settings))
    assert password.encode() in echo.bodies[0]  # it did travel, in the request only
    assert {r.state for r in rows} >= {IN_DOUBT, FAILED}

    seen = caplog.text + repr(rows) + repr(store.history(limit=1000))
    seen += "".join(str(getattr(r, f)) for r in rows for f in ("last_error", "return_label"))
    assert password not in seen
    assert "********" in repr(rows)  # the echoes were there, masked
    for path in tmp_path.glob("outbox.db*"):
        assert password.encode() not in path.read_bytes(), path.name
    with store.engine.connect() as conn:
        for table in ("outbox", "attempts"):
            dump = repr(conn.exec_driver_sql(f"SELECT * FROM {table}").all())
            assert password not in dump


def test_rate_limit_spaces_requests(store: Store, sandbox: RunningSandbox, password: str) -> None:
    ids = enqueue(store, sandbox.url, 6)
    settings = DispatchSettings(rate_per_second=20, lease=timedelta(seconds=300))
    started = time.monotonic()
    rows = run(lambda: deliver(store, ids, settings=settings))
    assert {r.state for r in rows} == {SENT}
    assert time.monotonic() - started >= 0.24  # 6 starts, 50 ms apart


def test_graceful_stop_gives_unsent_rows_back(
    store: Store, sandbox: RunningSandbox, password: str
) -> None:
    sandbox.set_faults(latency_ms=300)
    ids = enqueue(store, sandbox.url, 20)

    async def scenario() -> None:
        stop = asyncio.Event()
        async with Dispatcher(store, DispatchSettings(concurrency=2), CREDENTIALS) as d:
            task = asyncio.create_task(d.run(stop))
            await asyncio.sleep(0.45)
            stop.set()
            await asyncio.wait_for(task, 5)

    run(scenario)
    counts = Counter(r.state for r in store.get_many(ids))
    assert set(counts) <= {SENT, PENDING} and counts[SENT] == len(sandbox.requests())
    assert counts[SENT] <= 4 and counts[PENDING] >= 16  # in flight: 2 at a time, 300 ms each


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_dispatchers_share_one_outbox(
    kind: str, tmp_path: Path, sandbox: RunningSandbox, password: str
) -> None:
    for url in store_url_context(kind, tmp_path):
        with Store(url) as shared:
            ids = enqueue(shared, sandbox.url, 150)

            async def scenario() -> tuple[int, int]:
                settings = DispatchSettings(concurrency=4, claim_batch=6)
                stop = asyncio.Event()
                async with (
                    Dispatcher(shared, settings, CREDENTIALS, worker_id="a") as a,
                    Dispatcher(shared, settings, CREDENTIALS, worker_id="b") as b,
                ):
                    await asyncio.gather(a.run(stop, drain=True), b.run(stop, drain=True))
                    return a.metrics.accepted, b.metrics.accepted

            sent_a, sent_b = run(scenario)
            assert sent_a + sent_b == 150 and sent_a > 0 and sent_b > 0
            assert {r.state for r in shared.get_many(ids, attempts=False)} == {SENT}
            received = Counter(marker_of(e) for e in sandbox.requests())
            assert received == {f"m-{i}": 1 for i in range(150)}


# --- a crash in the middle of sending --------------------------------------------------------

CRASHING_SENDER = """
import asyncio, sys
from datetime import timedelta
from engine.send.dispatch import Credentials, Dispatcher
from engine.send.policy import DispatchSettings
from engine.rules.secrets import SecretRef
from engine.outbox.schema import utcnow
from engine.outbox.store import Fire, Store
store_url, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store(store_url)
body = lambda m: {"sendInstantMessage": {"partner": {"id": "p"}, "parentMessageId": "1",
                  "message": {"text": m}, "targets": [{"memberId": "765c8"}]}}
store.enqueue_many([Fire("rule", f"c-{i}", [(url, body(f"c-{i}"))]) for i in range(n)],
                   now=utcnow())
creds = Credentials(SecretRef("env", "PUSHRULES_TEST_LOGIN"),
                    SecretRef("env", "PUSHRULES_TEST_PASSWORD"))
settings = DispatchSettings(concurrency=4, lease=timedelta(minutes=5))
asyncio.run(Dispatcher(store, settings, creds).run(asyncio.Event()))
"""


def states_in(db: Path) -> Counter[str]:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return Counter(dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state")))
    except sqlite3.OperationalError:  # not created yet
        return Counter()


def test_sigkill_mid_send_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, sandbox: RunningSandbox, password: str
) -> None:
    n = 40
    db = tmp_path / "crash.db"
    sandbox.set_faults(latency_ms=400)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SENDER, f"sqlite:///{db}", sandbox.url, str(n)],
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            counts = states_in(db)
            if counts["sent"] >= 4 and counts["sending"] >= 1:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the sender never got going: {states_in(db)}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    time.sleep(0.5)  # requests in flight reach the sandbox's record

    with Store(f"sqlite:///{db}") as store:
        rows = store.history(limit=1000)
        assert len(rows) == n  # nothing lost
        sending = {r.id for r in rows if r.state == "sending"}
        assert sending
        # A fresh process takes the dead one's rows back at once, not after their lease: those
        # that never left are due again, the others parked.
        done = store.reclaim(utcnow())
        assert set(done.parked) | set(done.requeued) == sending
        rows = store.history(limit=1000)
        assert {r.state for r in rows} <= {SENT, IN_DOUBT, PENDING}
        received = Counter(marker_of(e) for e in sandbox.requests())
        assert max(received.values()) == 1  # nothing sent twice
        for r in rows:
            marker = r.request()["sendInstantMessage"]["message"]["text"]
            if r.state == SENT:
                assert received[marker] == 1
            elif r.state == PENDING:
                assert received[marker] == 0

        sandbox.set_faults(latency_ms=0)
        for r in rows:
            if r.state == IN_DOUBT:
                store.resend(r.id)

        async def finish() -> None:
            async with Dispatcher(store, FAST, CREDENTIALS) as d:
                await d.run(asyncio.Event(), drain=True)

        run(finish)
        final = store.history(limit=1000)
        assert {r.state for r in final} == {SENT}
        received = Counter(marker_of(e) for e in sandbox.requests())
        doubted = {
            r.request()["sendInstantMessage"]["message"]["text"]
            for r in final
            if any(a.outcome == IN_DOUBT for a in r.attempt_log)
        }
        for marker, count in received.items():
            # Only a row a person chose to resend may have reached Accengage twice.
            assert count == 1 or (count == 2 and marker in doubted), marker
        assert set(received) == {f"c-{i}" for i in range(n)}


def test_concurrency_is_split_into_small_pools() -> None:
    from engine.send.dispatch import POOL_SIZE, pool_sizes

    for concurrency in (1, 3, 4, 5, 8, 16, 17, 32):
        sizes = pool_sizes(concurrency)
        assert sum(sizes) == concurrency
        assert max(sizes) <= POOL_SIZE
        assert max(sizes) - min(sizes) <= 1


def test_an_idle_dispatcher_sends_a_row_written_ahead_at_its_time(
    store: Store, sandbox: RunningSandbox
) -> None:
    """Nobody wakes it: the idle dispatcher sleeps until the row comes due, not for the rest
    of its poll_every (a fire written ahead of its time, a retry, the end of quiet hours)."""
    settings = dataclasses.replace(FAST, poll_every=30.0)

    async def scenario() -> float:
        stop = asyncio.Event()
        async with Dispatcher(store, settings, CREDENTIALS) as d:
            task = asyncio.create_task(d.run(stop))
            await asyncio.sleep(0.2)  # idle, sleeping its 30 s
            due = utcnow() + timedelta(seconds=0.5)
            fire = Fire("rule", "ahead", [(sandbox.url, body("ahead"))])
            store.enqueue_many([fire], now=utcnow(), not_before=due)
            d.wake()  # as the daemon does after a write: it learns the row's time
            deadline = time.monotonic() + 10
            while not sandbox.requests() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(task, 5)
        received = datetime.fromisoformat(sandbox.requests()[0]["received_at"])
        return (received - due).total_seconds()

    late = run(scenario)
    assert 0 <= late < 5, late  # at its time, not at the end of a 30 s sleep


def test_a_sandbox_trial_sends_the_stand_in_credentials_never_the_real_ones(
    store: Store, sandbox: RunningSandbox, password: str
) -> None:
    """The sandbox shows every request it got to whoever asks (``/requests``, its record
    file): ``--sandbox`` must not hand it the real login and password, set as they are here."""
    project = Project(Path("."), sandbox.url, SecretRef("env", LOGIN_VAR), None, {})
    [row_id] = enqueue(store, sandbox.url, 1, "trial")

    async def trial() -> list[OutboxRow]:
        async with Dispatcher(store, FAST, credentials(project, sandbox=True)) as d:
            return await d.deliver([row_id], 3.0)

    [row] = run(trial)
    assert row.state == SENT
    [got] = sandbox.requests()
    assert got["body"]["sendInstantMessage"]["user"] == {
        "login": SANDBOX_LOGIN,
        "password": SANDBOX_PASSWORD,
    }
    assert password not in json.dumps(sandbox.requests())


def test_a_sandbox_run_sends_a_trial_row_written_for_a_sandbox_since_stopped(
    store: Store, sandbox: RunningSandbox
) -> None:
    """`send --sandbox` deferred by quiet hours leaves a row naming its own sandbox, stopped
    with the command: the next sandbox run must send it to its sandbox, not to that port."""
    gone = "http://127.0.0.1:9/sendInstantMessage.php"  # nothing listens there
    [row_id] = enqueue(store, gone, 1, "deferred-trial")
    project = sandboxed(Project(Path("."), gone, None, None, {}), sandbox.url)

    async def trial() -> list[OutboxRow]:
        async with make_dispatcher(project, store, sandbox=True, settings=FAST) as d:
            return await d.deliver([row_id], 3.0)

    [row] = run(trial)
    assert row.state == SENT
    assert len(sandbox.requests()) == 1
