"""httpx's API over aiohttp's connection pool, with the dispatcher's distinction kept.

httpcore's pool costs CPU growing with the requests it juggles (encode/httpx#3215); aiohttp's
does not, and sends the same requests for about half the CPU (README, Performance). The
dispatcher decides retry or ``in_doubt`` by whether a request left (httpcore's ``trace`` of
``send_request_headers.started``) and by the error's type. httpx-aiohttp's exception map cannot
be trusted for that: it raises ``ConnectTimeout`` ("never sent") for a connection dropped after
the request was written. So this transport tracks the request's bytes itself and raises an
httpx error whose type tells the truth:

* nothing of the request was handed to the socket: ``ConnectError`` (``ConnectTimeout`` for a
  timeout), safe to send again;
* the request started leaving, but provably not all of it did (the connection was lost, or
  the write timed out, while bytes still waited in the event loop; those are then dropped,
  never sent later): ``WriteError`` (``WriteTimeout``), safe too, since a body framed by
  Content-Length is not acted on before it is whole;
* anything else once the request started leaving: ``ReadError``, ``ReadTimeout`` or
  ``RemoteProtocolError``; the request may have arrived.

"Handed to the kernel" is httpcore's meaning of written (anyio waits for an empty write
buffer): bytes in the kernel's socket buffer when the connection resets may not arrive, and
both transports then say "may have arrived". The answer is read whole before it is returned
(Accengage answers a few hundred bytes).
"""

from __future__ import annotations

import asyncio
import functools
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.payload import BytesPayload

Trace = Callable[[str, Mapping[str, Any]], Awaitable[None]]
#: The event the dispatcher's trace waits for, as httpcore names it.
HEADERS_STARTED = "http11.send_request_headers.started"


class _Flight:
    """What became of one request's bytes; written by the body writer, read on an error."""

    __slots__ = ("dropped", "flush", "flushed", "left", "transport")

    def __init__(self) -> None:
        #: Some of the request may have been handed to the socket.
        self.left = False
        #: Every byte of the request was handed to the kernel.
        self.flushed = False
        #: Some bytes of the request will never be sent.
        self.dropped = False
        #: Waits for the write buffer to empty, when the request did not leave at once.
        self.flush: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    async def unwritten(self) -> bool:
        """After a failure: True if the request provably did not all leave (settles it so)."""
        if self.dropped:
            return True
        if self.flushed or self.flush is None:
            return False
        if not self.flush.done():
            transport = self.transport
            if transport is not None and transport.get_write_buffer_size() > 0:
                transport.abort()  # what has not left now never will
                self.dropped = True
                return True
            await asyncio.wait({self.flush})  # the loss or the last bytes: a moment away
        # The drain fails only when the connection is lost with bytes still to send.
        return self.flush.done() and not self.flush.cancelled() and bool(self.flush.exception())


class _Body(BytesPayload):
    """The request body, written so that the transport knows what of it left."""

    def __init__(self, content: bytes, flight: _Flight, trace: Trace | None, write: float | None):
        super().__init__(content)
        self._flight = flight
        self._trace = trace
        self._write_timeout = write

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        flight = self._flight
        assert isinstance(writer, StreamWriter)
        transport = writer.transport
        if transport is None or transport.is_closing():
            raise aiohttp.ClientConnectionResetError("the connection closed before the request")
        # Pause the writer while any byte waits in the event loop: a drain then means every
        # byte is with the kernel, as it does for httpcore's writes.
        transport.set_write_buffer_limits(high=0)
        flight.transport = transport
        flight.left = True
        if self._trace is not None:
            await self._trace(HEADERS_STARTED, {})
        try:
            # Headers and body go to the socket in one write (aiohttp holds the headers back
            # for the first chunk of the body).
            await writer.write(self._value, drain=False)
        except BaseException:
            flight.dropped = True  # refused before the socket saw it
            raise
        if transport.is_closing():  # the socket refused the write: nothing of it left
            flight.dropped = True
            raise aiohttp.ClientConnectionResetError("the connection was lost while writing")
        if not transport.get_write_buffer_size():
            flight.flushed = True
            return
        # A separate task, so that aiohttp cancelling this writer (on a failed answer) cannot
        # hide whether the buffer emptied or the connection was lost first.
        flight.flush = flush = asyncio.ensure_future(writer.drain())
        flush.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(self._write_timeout):
                await asyncio.shield(flush)
        except TimeoutError:
            if transport.get_write_buffer_size() > 0:
                transport.abort()
                flight.dropped = True
            raise
        flight.flushed = True


@functools.lru_cache(maxsize=256)
def _yarl_url(url: str) -> yarl.URL:
    return yarl.URL(url, encoded=True)  # httpx encoded it already


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests over one aiohttp session of ``connections`` connections."""

    def __init__(
        self, connections: int, keepalive_expiry: float, verify: bool | Any = True
    ) -> None:
        self._connections = connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl = httpx.create_ssl_context(verify=verify)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeouts: dict[tuple[Any, ...], aiohttp.ClientTimeout] = {}

    def _session_now(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:
            connector = aiohttp.TCPConnector(
                limit=self._connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive_expiry,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # httpx keeps the cookies, if any
                auto_decompress=False,  # httpx decodes, as with httpcore
                # HTTP(S)_PROXY as httpx honours them; looked up for each request, so only
                # when some are set.
                trust_env=bool(urllib.request.getproxies()),
            )
            self._loop = loop
        return self._session

    def _timeout(self, given: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        key = (given.get("connect"), given.get("read"), given.get("pool"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read, pool = key
            # aiohttp's connect covers waiting for a free connection and opening one.
            whole = None if connect is None or pool is None else connect + pool
            timeout = aiohttp.ClientTimeout(
                total=None, connect=whole, sock_connect=connect, sock_read=read
            )
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session_now()
        extensions = request.extensions
        timeout: Mapping[str, float | None] = extensions.get("timeout", {})
        trace: Trace | None = extensions.get("trace")
        flight = _Flight()
        content = await request.aread()
        if not content:
            flight.left = True  # aiohttp writes a bodiless request without us seeing it
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in request.headers.raw
            if k.lower() != b"expect"
        ]
        try:
            async with session.request(
                request.method,
                _yarl_url(str(request.url)),
                headers=headers,
                data=_Body(content, flight, trace, timeout.get("write")) if content else None,
                allow_redirects=False,
                timeout=self._timeout(timeout),
            ) as answer:
                body = await answer.read()
                status, raw_headers, reason = answer.status, answer.raw_headers, answer.reason
        except Exception as exc:
            raise await _as_httpx(exc, flight) from exc
        response_extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if reason:
            response_extensions["reason_phrase"] = reason.encode("ascii", "replace")
        return httpx.Response(
            status,
            headers=list(raw_headers),
            content=body,
            request=request,
            extensions=response_extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


async def _as_httpx(exc: Exception, flight: _Flight) -> httpx.TransportError:
    """The httpx error that says truly whether the request left (see the module's doc)."""
    what = str(exc) or type(exc).__name__
    timed_out = isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError)
    if not flight.left:
        if isinstance(exc, aiohttp.InvalidURL):
            return httpx.UnsupportedProtocol(what)
        return httpx.ConnectTimeout(what) if timed_out else httpx.ConnectError(what)
    if await flight.unwritten():
        return httpx.WriteTimeout(what) if timed_out else httpx.WriteError(what)
    if timed_out:
        return httpx.ReadTimeout(what)
    if isinstance(exc, OSError):  # reset, broken pipe
        return httpx.ReadError(what)
    return httpx.RemoteProtocolError(what)
