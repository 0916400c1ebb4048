"""Send outbox rows to Accengage so that each compiled request arrives once, or a person is told.

The rules, in the order they matter:

* A row is claimed (``sending``, under a lease), then marked as leaving (group-committed with
  the requests starting together) before its bytes go out, and its result is written after. A
  process that dies leaves its rows ``sending``; any instance's ``reclaim`` (at start, and every
  ``recover_every`` seconds) sees the dead instance and sends again the rows that never left,
  and parks the others ``in_doubt``. Nothing whose fate is unknown is ever resent without a
  person saying so.
* An error that proves the request never reached Accengage (no connection, the connection pool
  was full, the body could not be fully written) is retried with backoff. An error after the
  request may have arrived (read timeout, connection dropped before the answer) is ``in_doubt``
  by default (``on_unknown_outcome="park"``), or retried if the operator prefers duplicates to
  delays (``"retry"``).
* HTTP 429 and 5xx are retried, honouring ``Retry-After``. A 200 answer is read for its
  ``returnCode`` (a string in the documentation, a number accepted too): 0 is sent, 1 and 11
  (:data:`engine.accengage.api.RETRYABLE_CODES`) are retried, any other code is permanent
  (``failed``) and recorded with the API's meaning.
* A 2xx answer that is not the documented JSON is ``in_doubt``: Accengage may well have sent
  the push, so resending blindly could send it twice.
* A rule's quiet hours hold its rows at this edge too (the ``quiet`` hook): a row released,
  resumed or retried into them is given back unsent, due again when they end, its attempt not
  counted. A fire made during them was already deferred or skipped when it was decided.
* Credentials are resolved for each attempt and exist only in the request bytes: never stored,
  logged, or put in an error message (answers are scrubbed of them before they are recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ParamSpec, Protocol, TypeVar

import httpx
from httpcore import WriteError
from sqlalchemy.exc import OperationalError

from engine import __version__
from engine.outbox.connections import busy_timeout, is_busy
from engine.outbox.schema import utcnow
from engine.outbox.states import DEAD, FAILED, IN_DOUBT, RETRYING, SENT
from engine.outbox.store import AttemptResult, OutboxRow, Reclaimed, ResultUpdate, Store
from engine.rules.secrets import Masker, MissingSecret
from engine.send.metrics import DispatchMetrics
from engine.send.policy import (
    DispatchSettings,
    Outcome,
    classify_error,
    classify_response,
    decide,
    final_error,
    redact,
    with_user,
)

#: The end of a rule's quiet hours if ``now`` is inside them, else None: (rule id, now) -> end.
Quiet = Callable[[str, datetime], datetime | None]

P = ParamSpec("P")
T = TypeVar("T")
LOG = logging.getLogger("pushrules.dispatch")
#: Seconds an inline store call may hold the event loop waiting for SQLite's write lock.
INLINE_BUSY_WAIT = 0.05

_HEADERS = {"content-type": "application/json", "user-agent": f"pushrules/{__version__}"}
#: httpcore's trace events of a failed write of the request.
WRITE_FAILED = frozenset({"http11.send_request_headers.failed", "http11.send_request_body.failed"})


# --- credentials -------------------------------------------------------------------------------


class Secret(Protocol):
    """A value read when it is needed: a :class:`SecretRef`, or the sandbox's stand-in."""

    def resolve(self) -> str: ...


@dataclass(frozen=True)
class Credentials:
    """Where the Accengage login and password live; read at send time, never kept."""

    login: Secret
    password: Secret

    def resolve(self) -> tuple[str, str]:
        """Both values, or :class:`MissingSecret` naming the reference that failed."""
        return self.login.resolve(), self.password.resolve()

    def __repr__(self) -> str:
        return f"Credentials(login={self.login}, password={self.password})"


# --- the I/O edge ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def parsed_url(url: str) -> httpx.URL:
    """Rows share a handful of URLs: parsing each once saves a tenth of a request's CPU."""
    return httpx.URL(url)


#: Connections per httpx client on httpcore (``DispatchSettings.transport``). httpcore's pool
#: spends time growing with the number of requests it juggles (encode/httpx#3215): at 16 in
#: flight one client costs 1.5 ms of CPU per request here, four clients of 4 cost 0.6 ms, for
#: the same concurrency (benchmarks/dispatch.py).
POOL_SIZE = 4


def pool_sizes(concurrency: int) -> list[int]:
    """Split ``concurrency`` into pools of at most POOL_SIZE connections."""
    count = -(-concurrency // POOL_SIZE)
    base, extra = divmod(concurrency, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


class _Pools:
    """Several small httpx clients standing for one: each request takes the least busy."""

    def __init__(self, clients: Sequence[_Poster]) -> None:
        self._clients = list(clients)
        self._busy = [0] * len(self._clients)

    @contextlib.asynccontextmanager
    async def client(self) -> Any:
        index = min(range(len(self._clients)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            yield self._clients[index]
        finally:
            self._busy[index] -= 1

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


class _Poster(Protocol):
    async def post(
        self, url: httpx.URL, *, content: bytes, extensions: dict[str, Any] | None = None
    ) -> httpx.Response: ...

    async def aclose(self) -> None: ...


class _Direct:
    """An httpx transport called as ``AsyncClient.post`` would call it, minus what the
    dispatcher never uses and AsyncClient does at every request: reading each answer's
    cookies into a jar (through urllib's cookie machinery), merging URLs, headers and cookies,
    auth and redirect loops, event hooks. In a burst of 1,000 pushes those took a tenth of the
    daemon's CPU. Proxies from the environment are the aiohttp transport's own (trust_env)."""

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        self._transport = transport
        self._timeout = timeout.as_dict()

    async def post(
        self, url: httpx.URL, *, content: bytes, extensions: dict[str, Any] | None = None
    ) -> httpx.Response:
        request = httpx.Request(
            "POST",
            url,
            headers=_HEADERS,
            content=content,
            extensions={"timeout": self._timeout, **(extensions or {})},
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


class _RateLimiter:
    """Start at most ``rate`` requests a second, evenly spaced."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def acquire(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class _ResultWriter:
    """Writes results in small batches from a thread, so sending never waits for the disk.

    A result not yet written when the process dies leaves its row ``sending``, which recover
    parks as ``in_doubt``: batching shortens no safety margin, it only widens that window by
    ``flush_interval``.
    """

    def __init__(self, dispatcher: Dispatcher, interval: float, size: int) -> None:
        self._dispatcher = dispatcher
        self._interval = interval
        self._size = size
        self._items: list[ResultUpdate] = []
        self._full = asyncio.Event()
        self._lock = asyncio.Lock()
        self._has_items = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pushrules-result-writer")

    def add(self, update: ResultUpdate) -> None:
        self._items.append(update)
        self._has_items.set()
        if len(self._items) >= self._size:
            self._full.set()

    async def _loop(self) -> None:
        while not self._closing:
            await self._has_items.wait()
            if self._closing:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._full.wait()
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            self._has_items.clear()
            self._full.clear()
            batch, self._items = self._items, []
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[ResultUpdate]) -> None:
        delay = 0.1
        for attempt in range(1, 6):
            try:
                await self._dispatcher._db(self._dispatcher.store.record_results, batch)
                return
            except Exception as exc:  # the database is down or locked: keep the batch, retry
                if attempt == 5:
                    LOG.error(
                        "could not record the results of rows %s: %s; they stay 'sending' and "
                        "will be parked in_doubt when their lease runs out",
                        [u.row_id for u in batch],
                        exc,
                    )
                    return
                LOG.warning("recording results failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay *= 2

    async def close(self) -> None:
        self._closing = True
        self._has_items.set()
        if self._task is not None:
            await self._task
        await self.flush()


class _Departures:
    """Group-commits the "leaving" marks of requests about to be sent.

    A request may leave only once its mark is on disk: a process killed after sending then has
    its row parked ``in_doubt`` (it may have arrived), and one killed before sending has it
    sent again (it never left). A commit per request would cost a transaction each; instead
    the requests that reach this point together are marked in one, while the next group
    gathers. A crash between a commit and the bytes leaving parks only that small group.
    """

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._waiting: list[tuple[OutboxRow, asyncio.Future[bool]]] = []
        self._task: asyncio.Task[None] | None = None

    async def leave(self, row: OutboxRow) -> bool:
        """True once the row is marked as leaving; False if its claim was taken back."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._commit(), name="pushrules-departures")
        return await future

    async def _commit(self) -> None:
        while self._waiting:
            group, self._waiting = self._waiting, []
            claims: dict[str, list[int]] = {}
            for row, _ in group:
                claims.setdefault(row.claimed_by or "", []).append(row.id)
            d = self._dispatcher
            try:
                # In a thread even on SQLite: while one group's commit waits for the disk, the
                # loop goes on, and the requests ready meanwhile form the next, larger group.
                marked: set[int] | BaseException = await asyncio.to_thread(
                    d.store.mark_leaving, claims, d._clock()
                )
            except Exception as exc:  # the database is away: nothing of this group leaves
                marked = exc
            for row, future in group:
                if future.done():
                    continue
                if isinstance(marked, BaseException):
                    future.set_exception(marked)
                else:
                    future.set_result(row.id in marked)


class _Pipeline:
    """``concurrency`` workers draining a queue of claimed rows."""

    def __init__(self, dispatcher: Dispatcher, writer: _ResultWriter, low_water: int) -> None:
        self._dispatcher = dispatcher
        self._writer = writer
        self.low_water = low_water
        self.queue: asyncio.Queue[OutboxRow | None] = asyncio.Queue()
        self.inflight = 0
        #: Set when the load falls to the low-water mark: time to claim more.
        self.wake = asyncio.Event()
        n = dispatcher.settings.concurrency
        self._workers = [asyncio.create_task(self._work(), name=f"send-{i}") for i in range(n)]

    @property
    def load(self) -> int:
        return self.queue.qsize() + self.inflight

    def feed(self, rows: Sequence[OutboxRow]) -> None:
        for row in rows:
            self.queue.put_nowait(row)

    async def _work(self) -> None:
        while True:
            row = await self.queue.get()
            if row is None:
                self.queue.task_done()
                return
            self.inflight += 1
            try:
                await self._dispatcher._handle(row, self._writer)
            except Exception:  # a bug: the row stays 'sending' and recover parks it in_doubt
                LOG.exception("unexpected error while sending row %s; it will be parked", row.id)
            finally:
                self.inflight -= 1
                self.queue.task_done()
                if self.load <= self.low_water:
                    self.wake.set()

    async def close(self, *, cancel: bool = False) -> list[OutboxRow]:
        """Stop the workers after their current request; returns the rows never started."""
        leftovers: list[OutboxRow] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            self.queue.task_done()
            if item is not None:
                leftovers.append(item)
        if cancel:
            for task in self._workers:
                task.cancel()
        for _ in self._workers:
            self.queue.put_nowait(None)
        await asyncio.gather(*self._workers, return_exceptions=True)
        return leftovers


def quiet_ends(rules: Iterable[str], quiet: Quiet, now: datetime) -> dict[str, datetime]:
    """The rules of a batch that are quiet at ``now``, each asked once, with their end."""
    ends = {rule: _quiet_end(quiet, rule, now) for rule in set(rules)}
    # An end not after now would give the rows back due at once, to be claimed and given back
    # again in a loop that starves every other rule: such a row leaves.
    return {rule: end for rule, end in ends.items() if end is not None and end > now}


def _quiet_end(quiet: Quiet, rule: str, now: datetime) -> datetime | None:
    """``quiet`` for one rule; a failure to tell (a bug) is logged and sends, as before quiet
    hours were judged here, rather than stopping every rule's sending."""
    try:
        return quiet(rule, now)
    except Exception:
        LOG.exception("could not tell whether rule %s is in its quiet hours; sending", rule)
        return None


def split_quiet(
    rows: Sequence[OutboxRow], ends: Mapping[str, datetime]
) -> tuple[list[OutboxRow], dict[tuple[str, datetime], list[int]]]:
    """The rows to send now, and the others by (claim, time they are due again)."""
    send: list[OutboxRow] = []
    wait: dict[tuple[str, datetime], list[int]] = {}
    for row in rows:
        end = ends.get(row.rule)
        if end is None:
            send.append(row)
        else:
            wait.setdefault((row.claimed_by or "", end), []).append(row.id)
    return send, wait


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    """Claims due outbox rows and sends them with bounded concurrency.

    One per process; several processes (or hosts, on PostgreSQL) may share one store.
    """

    def __init__(
        self,
        store: Store,
        settings: DispatchSettings | None = None,
        credentials: Credentials | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
        worker_id: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_attempt: Callable[[OutboxRow, AttemptResult, str], None] | None = None,
        metrics: DispatchMetrics | None = None,
        rng: random.Random | None = None,
        route: str | None = None,
        quiet: Quiet | None = None,
    ) -> None:
        """``route``: send every row there, whatever URL it was written with (a ``--sandbox``
        run: its store holds trial rows only, some written for sandboxes since stopped).
        ``quiet``: when a rule's quiet hours end, if they hold now (see :data:`Quiet`)."""
        if credentials is None:
            raise ValueError("the dispatcher needs Credentials(login=..., password=...)")
        self.store = store
        self.settings = settings or DispatchSettings()
        self.credentials = credentials
        self.worker_id = worker_id or default_worker_id()
        #: This process's identity in the store: claims carry it, and its liveness tells the
        #: others sharing the store when they may take its rows back.
        self.instance = f"{self.worker_id}/{secrets.token_hex(4)}"
        self._liveness = store.liveness(self.instance, self.settings.liveness_ttl)
        self._registered = False
        self._departures = _Departures(self)
        #: The trace (httpcore's, or the aiohttp transport's in its image) tells whether a
        #: failed request's headers started leaving; a transport given by a test may not.
        self._traced = transport is None
        #: What each attempt did, in Prometheus counters (the daemon passes its registry's).
        self.metrics = metrics if metrics is not None else DispatchMetrics()
        self._wake: asyncio.Event | None = None
        self._clock = clock
        self._route = parsed_url(route) if route is not None else None
        self._on_attempt = on_attempt
        self._rng = rng or random.Random()
        #: The daemon's rules' quiet hours, judged again as rows leave (None: never quiet).
        self._quiet = quiet
        s = self.settings
        mode = s.store_calls
        if mode == "auto":
            mode = "inline" if getattr(store, "dialect", "") == "sqlite" else "thread"
        self._inline_store = mode == "inline"
        limiter = _RateLimiter(s.rate_per_second) if s.rate_per_second else None
        self._limiter = limiter
        timeout = httpx.Timeout(s.timeout)
        if transport is None and s.transport == "aiohttp":
            from engine.send.transport import AiohttpTransport

            # aiohttp's pool costs the same whatever its size: one transport, one pool.
            transport = AiohttpTransport(s.concurrency, s.keepalive_expiry)
        if transport is not None:
            self._pools = _Pools([_Direct(transport, timeout)])
        else:
            # httpcore's pools, in httpx clients: these also route through the proxies the
            # environment names (HTTP(S)_PROXY), as a client does.
            self._pools = _Pools(
                [
                    httpx.AsyncClient(
                        timeout=timeout,
                        limits=httpx.Limits(
                            max_connections=size,
                            max_keepalive_connections=size,
                            keepalive_expiry=s.keepalive_expiry,
                        ),
                        headers=_HEADERS,
                        follow_redirects=False,
                    )
                    for size in pool_sizes(s.concurrency)
                ]
            )

    def __repr__(self) -> str:
        return f"Dispatcher({self.store!r}, worker_id={self.worker_id!r})"

    async def _db(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store call where ``settings.store_calls`` says.

        Inline, the call waits at most INLINE_BUSY_WAIT for SQLite's write lock: another
        process holding it (a `pushrules outbox` command, a backup) would otherwise stall the
        loop, and with it every send in flight and the HTTP intake, for up to 15 s a call.
        Refused the lock, nothing was done, so the call is made again in a thread.
        """
        if self._inline_store:
            try:
                with busy_timeout(INLINE_BUSY_WAIT):
                    return fn(*args, **kwargs)
            except OperationalError as exc:
                if not is_busy(exc):
                    raise
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._pools.aclose()
        if self._registered:
            self._registered = False
            try:
                # Requests abandoned in flight (a cancelled run) are settled now, not when
                # their lease ends; after a graceful stop nothing is left to settle.
                log_reclaimed(
                    await self._db(self.store.reclaim, self._clock(), stopping=self.instance)
                )
                await self._db(self._liveness.end)
            except Exception as exc:
                LOG.warning("could not unregister instance %s: %s", self.instance, exc)

    async def _beat(self) -> None:
        """Register this instance, or renew its sign of life."""
        try:
            self._registered = await self._db(self._liveness.beat)
        except Exception as exc:
            LOG.error("could not renew this instance's sign of life in the store: %s", exc)

    # -- one attempt --------------------------------------------------------------------------

    async def _attempt(
        self, row: OutboxRow
    ) -> tuple[AttemptResult, Outcome | None, str | None] | None:
        """Send one row once. Outcome None: nothing was sent (a credential is missing). None:
        the row is no longer this claim's (another instance took it back), nothing was sent."""
        started = self._clock()
        try:
            login, password = self.credentials.resolve()
        except MissingSecret as exc:
            error = (
                f"credentials unavailable: {exc}; nothing was sent, will try again in "
                f"{self.settings.missing_secret_retry:g} s"
            )
            return AttemptResult(started, 0.0, error=error), None, "credentials"
        try:
            content = with_user(row.body, login, password)
        except (ValueError, KeyError, TypeError) as exc:  # a damaged row: nothing was sent
            error = f"the stored request cannot be read ({type(exc).__name__}); not sent"
            return AttemptResult(started, 0.0, error=error), Outcome("failed", error=error), None
        if self._limiter is not None:
            await self._limiter.acquire()
            started = self._clock()
        try:
            if not await self._departures.leave(row):
                return None  # taken back by another instance meanwhile: it is theirs now
        except Exception as exc:
            error = (
                f"could not record that the request was leaving ({type(exc).__name__}: {exc}); "
                "nothing was sent, will try again"
            )
            outcome = Outcome("retry", error=error, cause=error)
            return AttemptResult(started, 0.0, error=error), outcome, "store"
        # The password always; the login too unless too short to mask without mangling text.
        hidden = (password, login) if len(login) >= 4 else (password,)

        scrub = Masker(hidden, login)
        headers_sent = False
        written: bool | None = None

        async def trace(event: str, info: Mapping[str, Any]) -> None:
            nonlocal headers_sent, written
            if event.endswith("send_request_headers.started"):
                headers_sent = True
            elif event in WRITE_FAILED and isinstance(info.get("exception"), WriteError):
                # httpcore goes on to read an answer after a failed write, so the error
                # raised at last says nothing of it (a ReadError, typically).
                written = False

        extensions = {"trace": trace} if self._traced else None
        t0 = time.monotonic()
        error_kind = None
        try:
            async with asyncio.timeout(self.settings.deadline):
                async with self._pools.client() as client:
                    url = self._route or parsed_url(row.url)
                    response = await client.post(url, content=content, extensions=extensions)
            outcome = classify_response(
                response.status_code, response.headers, response.content, self._clock(), scrub
            )
        except Exception as exc:
            left = headers_sent if self._traced else None
            outcome = classify_error(exc, self.settings.deadline, left=left, written=written)
            error_kind = type(exc).__name__
        duration = time.monotonic() - t0
        attempt = AttemptResult(
            started_at=started,
            duration_s=duration,
            http_status=outcome.http_status,
            return_code=outcome.return_code,
            return_label=redact(outcome.return_label, scrub),
            message_id=redact(outcome.message_id, scrub),
            error=redact(outcome.error, scrub),
        )
        scrubbed = dataclasses.replace(
            outcome,
            error=attempt.error,
            cause=redact(outcome.cause, scrub),
        )
        return attempt, scrubbed, error_kind

    async def _handle(self, row: OutboxRow, writer: _ResultWriter) -> None:
        result = await self._attempt(row)
        if result is None:
            LOG.info("row %s was taken back by another instance before it left: not sent", row.id)
            return
        attempt, outcome, error_kind = result
        now = self._clock()
        # Nothing was sent for want of a credential or of the leaving mark: the attempt does
        # not bring the row closer to dead.
        counted = outcome is not None and error_kind != "store"
        if outcome is None:
            state = RETRYING
            next_at: datetime | None = now + timedelta(seconds=self.settings.missing_secret_retry)
        else:
            made = row.attempts if counted else row.attempts - 1
            state, next_at = decide(outcome, made, self.settings, now, self._rng)
            error = final_error(outcome, state, made)
            if error != attempt.error:
                attempt = dataclasses.replace(attempt, error=error)
        writer.add(
            ResultUpdate(
                row.id,
                attempt,
                state,
                next_at,
                claimed_by=row.claimed_by,
                count_attempt=counted,
                worker=self.worker_id,
            )
        )
        self.metrics.attempted(
            attempt.return_code, attempt.duration_s, state, sent=error_kind != "credentials"
        )
        _log_result(row, attempt, state, next_at)
        if self._on_attempt is not None:
            self._on_attempt(row, attempt, state)

    # -- batches --------------------------------------------------------------------------------

    async def _claim(self, limit: int) -> list[OutboxRow]:
        s = self.settings
        if not self._registered:
            await self._beat()
        return await self._db(self.store.claim, self.instance, limit, self._clock(), s.lease)

    async def _claim_quietly(self, limit: int) -> list[OutboxRow]:
        try:
            return await self._claim(limit)
        except Exception as exc:  # the database is away: say so, and try again later
            LOG.error("could not claim rows from the store: %s", exc)
            return []

    async def _recover(self) -> None:
        try:
            done = await self._db(self.store.reclaim, self._clock(), me=self.instance)
        except Exception as exc:
            LOG.error("could not look for abandoned rows: %s", exc)
            return
        log_reclaimed(done)

    async def _keep_alive(self) -> None:
        """Renew this instance's sign of life and take back dead instances' rows, every
        ``recover_every`` seconds, whatever the sending loop is doing."""
        while True:
            await asyncio.sleep(self.settings.recover_every)
            await self._beat()
            await self._recover()

    async def _unclaim(self, rows: Sequence[OutboxRow]) -> None:
        by_claim: dict[str, list[int]] = {}
        for row in rows:
            by_claim.setdefault(row.claimed_by or "", []).append(row.id)
        for claim, ids in by_claim.items():
            try:
                await self._db(self.store.unclaim, ids, claim, now=self._clock())
            except Exception as exc:
                LOG.error("could not give back unsent rows %s: %s", ids, exc)

    async def _hold_quiet(self, rows: Sequence[OutboxRow]) -> list[OutboxRow]:
        """The claimed rows that may leave now. Those of a rule in its quiet hours go back,
        due when they end: a fire is judged against them when it is made, but its rows may
        come due later inside them (released, resumed or retried), and must wait all the same,
        whether the rule defers or skips (skip is for a new fire; these were wanted)."""
        if self._quiet is None or not rows:
            return list(rows)
        now = self._clock()
        ends = quiet_ends((r.rule for r in rows), self._quiet, now)
        if not ends:
            return list(rows)
        send, wait = split_quiet(rows, ends)
        try:
            deferred = await self._db(self.store.defer, wait, now=now)
        except Exception as exc:  # they stay claimed, unsent: their lease's end gives them back
            LOG.error("could not put back rows held by quiet hours: %s", exc)
            return send
        waiting = Counter(r.rule for r in rows if r.id in deferred)  # one pass, not one a rule
        for rule, n in sorted(waiting.items()):
            end = ends[rule]
            LOG.info(
                "rule %s: %d row(s) wait for the end of its quiet hours at %s (released, "
                "resumed or retried inside them)",
                rule,
                n,
                end.isoformat(timespec="minutes"),
            )
        return send

    async def _process(self, rows: Sequence[OutboxRow]) -> None:
        """Send these claimed rows and write their results before returning."""
        writer = _ResultWriter(self, self.settings.flush_interval, self.settings.results_batch)
        writer.start()
        pipe = _Pipeline(self, writer, low_water=0)
        try:
            pipe.feed(rows)
            await pipe.queue.join()
        finally:
            leftovers = await pipe.close()
            await writer.close()
            await self._unclaim(leftovers)

    async def run_once(self, limit: int | None = None) -> int:
        """Claim one batch of due rows and send it; returns how many rows were handled."""
        rows = await self._claim(limit or self.settings.batch)
        sendable = await self._hold_quiet(rows)
        if sendable:
            await self._process(sendable)
        return len(rows)

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Send due rows until ``stop`` is set (or, with ``drain``, until none is due).

        On stop, requests in flight finish and rows claimed but not started are given back.
        Cancelling the task instead abandons requests in flight: their rows stay ``sending``
        until this instance is unregistered or dead, or their lease runs out.
        """
        s = self.settings
        await self._beat()
        # Rows of a run that died (this process's last run, or a dead peer's): those that never
        # left are due again, the others in_doubt, now rather than when their lease ends.
        await self._recover()
        keep_alive = asyncio.create_task(self._keep_alive(), name="pushrules-liveness")
        writer = _ResultWriter(self, s.flush_interval, s.results_batch)
        writer.start()
        pipe = _Pipeline(self, writer, low_water=s.batch // 2)
        self._wake = pipe.wake
        watcher = asyncio.create_task(_set_when(stop, pipe.wake))
        cancelled = False
        try:
            while not stop.is_set():
                pipe.wake.clear()
                idle = False
                if pipe.load <= pipe.low_water:
                    wanted = s.batch - pipe.load
                    rows = await self._claim_quietly(wanted)
                    if not rows and drain and pipe.load == 0:
                        await writer.flush()  # a retry due at once counts as due
                        rows = await self._claim_quietly(wanted)
                        if not rows:
                            break
                    pipe.feed(await self._hold_quiet(rows))
                    idle = len(rows) < wanted  # the store has nothing more due right now
                    if pipe.load <= pipe.low_water and not idle:
                        continue
                wait = await self._idle_wait() if idle else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await pipe.wake.wait()
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._wake = None
            watcher.cancel()
            keep_alive.cancel()
            leftovers = await pipe.close(cancel=cancelled)
            await writer.close()
            await self._unclaim(leftovers)

    async def _idle_wait(self) -> float:
        """An idle dispatcher's sleep: ``poll_every``, or until a row comes due sooner (a fire
        written ahead of its time, a retry, the end of quiet hours), so that it leaves then,
        whichever instance or command wrote it."""
        wait = self.settings.poll_every
        now = self._clock()
        try:
            due = await self._db(self.store.next_due, now)
        except Exception:  # the store is away: the next claim says so
            return wait
        if due is not None:
            wait = min(wait, max(0.0, (due - now).total_seconds()))
        return wait

    def wake(self) -> None:
        """New rows are due: claim them now rather than at the end of the idle sleep."""
        if self._wake is not None:
            self._wake.set()

    async def deliver(self, ids: Sequence[int], wait: float) -> list[OutboxRow]:
        """Send these rows now, retrying them for up to ``wait`` seconds; returns them as left.

        What still waits for a retry after ``wait`` stays in the store for the daemon.
        """
        deadline = time.monotonic() + wait
        wanted = list(dict.fromkeys(ids))
        if not self._registered:
            await self._beat()
        while True:
            rows = await self._db(
                self.store.claim_ids, self.instance, wanted, self._clock(), self.settings.lease
            )
            rows = await self._hold_quiet(rows)
            if rows:
                await self._process(rows)
            current = await self._db(self.store.get_many, wanted, attempts=False)
            waiting = [r for r in current if r.state == RETRYING]
            if not waiting:
                break
            due = min(r.next_attempt_at for r in waiting)
            delay = max(0.0, (due - self._clock()).total_seconds())
            if not rows:  # due but not ours to take (paused, or another process has it)
                delay = max(delay, self.settings.poll_every)
            if time.monotonic() + delay > deadline:
                break
            await asyncio.sleep(delay)
        return await self._db(self.store.get_many, wanted)


def log_reclaimed(done: Reclaimed) -> None:
    """Say what a reclaim did: rows sent again need nobody; rows parked need a person."""
    if done.requeued:
        LOG.warning(
            "rows %s were claimed by a process that stopped before sending them: due again, "
            "they are sent now",
            done.requeued,
        )
    if done.parked:
        LOG.error(
            "rows %s were in flight when their process stopped: parked in_doubt; check "
            "whether Accengage sent them, then resend or drop each "
            "(pushrules history --status in_doubt)",
            done.parked,
        )


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def _log_result(
    row: OutboxRow, attempt: AttemptResult, state: str, next_at: datetime | None
) -> None:
    where = f"row {row.id} ({row.rule} / {row.idem_key} #{row.chunk})"
    ms = attempt.duration_s * 1000.0
    if state == SENT:
        LOG.debug("%s sent in %.0f ms: messageId %s", where, ms, attempt.message_id)
    elif state == RETRYING:
        LOG.info(
            "%s attempt %d not delivered: %s; next attempt at %s",
            where,
            row.attempts,
            attempt.error,
            next_at.isoformat(timespec="seconds") if next_at else "?",
        )
    elif state == FAILED:
        LOG.warning("%s failed for good: %s", where, attempt.error)
    elif state == DEAD:
        LOG.error("%s given up: %s", where, attempt.error)
    elif state == IN_DOUBT:
        LOG.error("%s parked in_doubt: %s", where, attempt.error)


__all__ = [
    "Credentials",
    "Dispatcher",
    "log_reclaimed",
]
