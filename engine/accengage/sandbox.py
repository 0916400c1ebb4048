"""A fake Accengage on loopback, spoken to over real HTTP by tests, benchmarks and the quick start.

``POST /sendInstantMessage.php`` answers what Accengage would (see
:mod:`engine.accengage.request_check`), in the API's own shape: errors are HTTP 200 with a non-
zero ``returnCode``. Faults can be turned on at start (:class:`SandboxConfig`) or at run time
(``POST /_faults``): HTTP 503s at a rate, latency, a forced return code, connections closed
without an answer (``drop``) and requests never answered (``hang``), so a client's retries and
its "outcome unknown" path can be tested.

Every request is recorded for ``GET /requests`` (``DELETE`` clears) and, when ``record_path``
is set, appended to that file as a JSON line. Memory stays bounded: only the newest
``max_records`` (default 100,000) are kept in memory; the file keeps them all.

Other routes: ``GET /healthz``; ``GET /_faults`` shows the faults in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TextIO

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engine.accengage import api
from engine.accengage.request_check import DEFAULT_LANGUAGES, check_request, message_count

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = api.SANDBOX_PORT
DEFAULT_MAX_RECORDS: Final = 100_000

#: Message ids are unique and increasing across every sandbox of the process, so a client that
#: sees the sandbox go down and up again never gets an id twice.
_MESSAGE_IDS = itertools.count(1)
_MESSAGE_IDS_LOCK = threading.Lock()
#: How often a hung request looks whether the sandbox is stopping.
_HANG_POLL_S: Final = 0.05


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox behaves; every field but ``max_records`` can change via ``POST /_faults``.

    ``code`` replaces the answer to every request that would otherwise succeed (1 or 11 to test
    retries, 5 for a permanent failure). ``devices`` is the device table by ``memberId`` that
    fills ``${macros}`` (``None``: :data:`engine.accengage.request_check.DEFAULT_DEVICES`);
    ``languages=None`` accepts any language. ``hang_seconds`` bounds a hung request.
    """

    fail_rate: float = 0.0
    latency_ms: float = 0.0
    code: int | None = None
    record_path: Path | None = None
    seed: int | None = None
    devices: Mapping[str, Mapping[str, str]] | None = None
    languages: tuple[str, ...] | None = DEFAULT_LANGUAGES
    max_records: int = DEFAULT_MAX_RECORDS
    hang_seconds: float = 300.0

    def __post_init__(self) -> None:
        # Accept what JSON and a CLI give: a path as a string, languages as a list.
        if isinstance(self.record_path, str):
            object.__setattr__(self, "record_path", Path(self.record_path))
        if isinstance(self.languages, list):
            object.__setattr__(self, "languages", tuple(self.languages))
        problem = _config_problem(self)
        if problem:
            raise ValueError(problem)


def _config_problem(config: SandboxConfig) -> str | None:
    def amount(value: object) -> bool:
        """A finite number, 0 or more (JSON gives ints where a float is meant)."""
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        )

    if not amount(config.fail_rate) or config.fail_rate > 1:
        return "fail_rate must be a number from 0 to 1"
    if not amount(config.latency_ms):
        return "latency_ms must be a number of milliseconds, 0 or more"
    if not amount(config.hang_seconds):
        return "hang_seconds must be a number of seconds, 0 or more"
    if config.code is not None and (
        type(config.code) is not int or config.code not in api.RETURN_CODES
    ):
        return f"code must be one of {', '.join(map(str, api.RETURN_CODES))}"
    if config.seed is not None and (
        isinstance(config.seed, bool) or not isinstance(config.seed, int)
    ):
        return "seed must be an integer"
    if not isinstance(config.max_records, int) or config.max_records < 1:
        return "max_records must be a positive integer"
    if config.record_path is not None and not isinstance(config.record_path, Path):
        return "record_path must be a path"
    if config.languages is not None and not (
        isinstance(config.languages, tuple) and all(isinstance(x, str) for x in config.languages)
    ):
        return "languages must be a list of language codes"
    if config.devices is not None and not (
        isinstance(config.devices, Mapping)
        and all(
            isinstance(fields, Mapping) and all(isinstance(v, str) for v in fields.values())
            for fields in config.devices.values()
        )
    ):
        return "devices must map each memberId to an object of strings"
    return None


def _configured(config: SandboxConfig, changes: Mapping[str, Any]) -> SandboxConfig:
    """``config`` with the ``changes`` of a ``/_faults`` object applied.

    Raises ``ValueError`` on an unknown key or a bad value, so ``/_faults`` can answer 400.
    """
    names = {f.name for f in dataclasses.fields(SandboxConfig)} - {"max_records"}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(config, **changes)


class _State:
    """What a running sandbox shares between the event loop and the threads that inspect it."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.drop = 0
        self.hang = 0
        self.records: deque[dict[str, Any]] = deque(maxlen=config.max_records)
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self._record: tuple[Path, TextIO] | None = None

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a ``/_faults`` object; all of it or, on a bad value, none of it."""
        counts = {key: changes[key] for key in ("drop", "hang") if key in changes}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a number of requests, 0 or more")
        rest = {key: value for key, value in changes.items() if key not in counts}
        with self.lock:
            config = _configured(self.config, rest)
            if "seed" in rest:
                self.rng = random.Random(config.seed)
            self.config = config
            self.drop = counts.get("drop", self.drop)
            self.hang = counts.get("hang", self.hang)

    def faults(self) -> dict[str, Any]:
        with self.lock:
            config, drop, hang = self.config, self.drop, self.hang
        shown = {
            "fail_rate": config.fail_rate,
            "latency_ms": config.latency_ms,
            "code": config.code,
            "seed": config.seed,
            "record_path": str(config.record_path) if config.record_path else None,
            "languages": list(config.languages) if config.languages is not None else None,
            "hang_seconds": config.hang_seconds,
            "max_records": config.max_records,
        }
        return {**shown, "drop": drop, "hang": hang}

    def take_fault(self) -> str | None:
        """The fault this request gets: ``hang`` and ``drop`` are counted down, ``fail`` drawn."""
        with self.lock:
            if self.hang:
                self.hang -= 1
                return "hang"
            if self.drop:
                self.drop -= 1
                return "drop"
            rate = self.config.fail_rate
            if rate and self.rng.random() < rate:
                return "fail"
        return None

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.records.append(entry)
            path = self.config.record_path
            if path is not None:
                out = self._record_file(path)
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                out.flush()  # a line is there once its request is answered

    def _record_file(self, path: Path) -> TextIO:
        """The record file, opened once (not once a request: a burst's 1,000 requests spent a
        tenth of the sandbox's CPU opening it); reopened when ``record_path`` changes."""
        if self._record is None or self._record[0] != path:
            self.close_record()
            self._record = (path, path.open("a", encoding="utf-8"))
        return self._record[1]

    def close_record(self) -> None:
        if self._record is not None:
            self._record[1].close()
            self._record = None

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.records)

    def clear(self) -> int:
        with self.lock:
            count = len(self.records)
            self.records.clear()
            return count


class _CloseWithoutAnswer(Response):
    """Closes the connection before any status line: the client cannot tell if the send happened.

    ASGI has no word for this, so it closes uvicorn's transport, reached through ``receive``.
    """

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(receive, "__self__", None), "transport", None)
        if transport is None:
            raise ConnectionAbortedError("the sandbox drops connections only under uvicorn")
        transport.close()
        # Returning before uvicorn notices the close would make it answer a 500.
        while (await receive())["type"] != "http.disconnect":
            pass


def _json(value: object, status_code: int = 200) -> Response:
    """JSON that tolerates what ``json.loads`` accepted (NaN), unlike ``JSONResponse``."""
    text = json.dumps(value, ensure_ascii=False)
    return Response(text, status_code=status_code, media_type="application/json")


def _parse(raw: bytes) -> tuple[object, bool]:
    """The body as JSON, or as text when it is not JSON (which is then recorded as received)."""
    try:
        return json.loads(raw), True
    except (ValueError, RecursionError):
        return raw.decode("utf-8", errors="replace"), False


def _answer(body: object, parsed: bool, config: SandboxConfig) -> dict[str, str]:
    """The documented answer: ``returnCode`` as a string, ``messageId`` on success only."""
    if not parsed:
        code, label = 2, f"{api.RETURN_CODES[2]}: the body is not valid JSON"
    else:
        code, label = check_request(body, config.devices, languages=config.languages)
    if code == 0 and config.code:
        code = config.code
        label = f"{api.RETURN_CODES[code]}: forced by the sandbox (code={code})"
    answer = {"returnCode": str(code), "returnLabel": label}
    if code == 0:
        answer["messageId"] = str(_new_message_ids(message_count(body)))
    return answer


def _new_message_ids(count: int) -> int:
    """Takes one id per message sent and returns the last, as Accengage answers."""
    with _MESSAGE_IDS_LOCK:
        return [next(_MESSAGE_IDS) for _ in range(count)][-1]


async def _hang(state: _State) -> None:
    deadline = time.monotonic() + state.config.hang_seconds
    while not state.closing.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(_HANG_POLL_S)


async def _send_instant_message(request: Request) -> Response:
    state: _State = request.app.state.sandbox
    raw = await request.body()
    received_at = datetime.now(UTC).isoformat()
    body, parsed = _parse(raw)
    fault = state.take_fault()
    config = state.config
    entry: dict[str, Any] = {
        "received_at": received_at,
        "body": body,
        "returnCode": None,
        "messageId": None,
        "http_status": None,
        "fault": fault,
    }
    if fault == "hang":
        state.record(entry)
        await _hang(state)
        return _CloseWithoutAnswer()
    if config.latency_ms:
        await asyncio.sleep(config.latency_ms / 1000)
    if fault == "drop":
        state.record(entry)
        return _CloseWithoutAnswer()
    if fault == "fail":
        state.record({**entry, "http_status": 503})
        return PlainTextResponse("Service Unavailable (sandbox fault)", status_code=503)
    answer = _answer(body, parsed, config)
    code, message_id = answer["returnCode"], answer.get("messageId")
    state.record({**entry, "returnCode": code, "messageId": message_id, "http_status": 200})
    return _json(answer)


async def _requests(request: Request) -> Response:
    state: _State = request.app.state.sandbox
    if request.method == "DELETE":
        return _json({"cleared": state.clear()})
    return _json(state.snapshot())


async def _faults(request: Request) -> Response:
    state: _State = request.app.state.sandbox
    if request.method == "POST":
        try:
            changes = json.loads(await request.body())
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object of settings")
            state.update(changes)
        except ValueError as problem:  # JSONDecodeError is one
            return _json({"error": str(problem)}, status_code=400)
    return _json(state.faults())


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


#: The demo feed's offers: one new offer every FEED_EVERY seconds, so the example poll rule
#: (rules/price-drop.yaml) has something new to fire on while a trial runs.
FEED_EVERY = 300
_DESTINATIONS = ("Lisbon", "Oslo", "Naples", "Porto", "Seville", "Krakow", "Dublin", "Malta")


def demo_offers(now: float) -> list[dict[str, Any]]:
    """The last three offers at ``now`` (seconds since the epoch); pure, so tests can pin it."""
    slot = int(now // FEED_EVERY)
    return [
        {
            "id": f"offer-{n}",
            "destination": _DESTINATIONS[n % len(_DESTINATIONS)],
            "price": 40 + (n * 37) % 150,
            "followers": [{"id": "765c8", "first_name": "Patrick"}],
        }
        for n in range(slot - 2, slot + 1)
    ]


async def _feed(request: Request) -> JSONResponse:
    return JSONResponse({"offers": demo_offers(time.time())})


def create_app(config: SandboxConfig | None = None) -> Starlette:
    """The sandbox as an ASGI app; its state is ``app.state.sandbox``."""
    app = Starlette(
        routes=[
            Route(api.ROUTE, _send_instant_message, methods=["POST"]),
            Route("/requests", _requests, methods=["GET", "DELETE"]),
            Route("/_faults", _faults, methods=["GET", "POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/feeds/offers.json", _feed, methods=["GET"]),
        ]
    )
    app.state.sandbox = _State(config or SandboxConfig())
    return app


# --- serving -------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """Releases hung requests as soon as it is asked to stop, and wakes at once to stop, so
    stopping stays quick: uvicorn looks whether it should stop every 0.1 s, and the tests stop
    a sandbox after each of a hundred tests."""

    def __init__(self, config: uvicorn.Config, state: _State) -> None:
        super().__init__(config)
        self.state = state
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.state.closing.set()
        super().handle_exit(sig, frame)

    def stop_soon(self) -> None:
        """From another thread: stop serving now, not at the next tick."""
        self.state.closing.set()
        self.should_exit = True
        loop = self._loop  # set after _wake: when there is a loop, there is its event
        if loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: it stopped already
                loop.call_soon_threadsafe(self._wake.set)

    async def main_loop(self) -> None:
        """uvicorn's: a tick every 0.1 s (the Date header, ``should_exit``), but woken by
        :meth:`stop_soon` in between."""
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)


def _server(app: Starlette, *, embedded: bool) -> _Server:
    """Uvicorn at WARNING without access logs; embedded, it leaves the host's logging alone."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        log_config=None if embedded else uvicorn.config.LOGGING_CONFIG,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    return _Server(config, app.state.sandbox)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket bound here, so the real port is known before uvicorn starts.

    Its protocol is spelled out: asyncio turns Nagle off only on sockets whose ``proto`` is TCP,
    and with Nagle on every answer waits ~40 ms for the client's delayed ACK.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class RunningSandbox:
    """A sandbox served by uvicorn in a daemon thread; a context manager that stops it."""

    def __init__(
        self, server: _Server, thread: threading.Thread, sock: socket.socket, host: str, port: int
    ) -> None:
        self._server = server
        self._thread = thread
        self._socket = sock
        self._state: _State = server.state
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        return _base_url(self.host, self.port)

    @property
    def url(self) -> str:
        """Where to POST: the full ``sendInstantMessage.php`` URL."""
        return self.base_url + api.ROUTE

    def requests(self) -> list[dict[str, Any]]:
        """Recorded requests, oldest first (the entries themselves, not copies)."""
        return self._state.snapshot()

    def clear_requests(self) -> None:
        self._state.clear()

    def set_faults(self, **changes: Any) -> None:
        """What ``POST /_faults`` does, without HTTP: ``fail_rate=1``, ``drop=2``..."""
        self._state.update(changes)

    def stop(self) -> None:
        """Stops serving and frees the port; hung requests are closed without an answer."""
        self._server.stop_soon()
        self._thread.join(timeout=10)
        self._socket.close()
        with self._state.lock:
            self._state.close_record()

    def __enter__(self) -> RunningSandbox:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def start_in_thread(
    config: SandboxConfig | None = None, host: str = DEFAULT_HOST, port: int = 0
) -> RunningSandbox:
    """Serves a sandbox from a background thread; returns once it accepts connections.

    ``port=0`` picks a free port (``.url`` tells which). Raises ``OSError`` if the port is taken.
    """
    app = create_app(config)
    sock = _listen(host, port)
    server = _server(app, embedded=True)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="pushrules-sandbox", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the sandbox did not start")
        time.sleep(0.002)
    return RunningSandbox(server, thread, sock, host, sock.getsockname()[1])


def serve(
    config: SandboxConfig | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> None:
    """Serves a sandbox in the foreground until interrupted, after printing its URL."""
    app = create_app(config)
    sock = _listen(host, port)
    url = _base_url(host, sock.getsockname()[1]) + api.ROUTE
    print(f"pushrules sandbox: POST {url}", flush=True)
    try:
        _server(app, embedded=False).run(sockets=[sock])
    finally:
        sock.close()
