"""What the outbox costs: N requests through store + dispatcher vs a bare httpx loop.

Both paths post the same bodies to the same sandbox at the same concurrency, in one run. The
sandbox runs in its own process (``python -m engine sandbox``) so that client and server do not
share a GIL. "Ours" counts everything a real send does: enqueueing the fires, claiming them,
adding the credentials to each body, sending, and recording every attempt.

    python benchmarks/dispatch.py [--requests 20000] [--concurrency 16] [--store URL]
        [--transport httpcore,aiohttp] [--runs 5]

With several transports (``DispatchSettings.transport``; ``httpx-aiohttp`` is that package's
transport as published, when installed) the runs alternate between them against one sandbox,
each on a fresh store, and the figures are medians. CPU is this process's CPU time (every
thread) while dispatching, per request: less sensitive to a busy machine than wall time.

Target: our path takes at most 1.5x the bare loop's time on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from common import (
    ScratchSchema,
    print_table,
    start_sandbox,
)

from engine.outbox.schema import utcnow
from engine.outbox.store import Fire, Store
from engine.rules.secrets import SecretRef
from engine.send.dispatch import Credentials, Dispatcher
from engine.send.policy import DispatchSettings

LOGIN, PASSWORD = "bench@example.com", "bench-password"


def body(marker: str) -> dict[str, Any]:
    return {
        "sendInstantMessage": {
            "partner": {"id": "bench_partner"},
            "parentMessageId": "1",
            "message": {"subject": "Benchmark", "text": f"Hello ${{first_name}}, {marker}"},
            "targets": [{"memberId": "765c8"}],
        }
    }


@dataclass
class Sandbox:
    process: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls) -> Sandbox:
        return cls(*start_sandbox())

    def received(self) -> int:
        base = self.url.rsplit("/", 1)[0]
        return len(httpx.get(f"{base}/requests", timeout=60).json())

    def set_latency(self, ms: float) -> None:
        base = self.url.rsplit("/", 1)[0]
        httpx.post(f"{base}/_faults", json={"latency_ms": ms}, timeout=10).raise_for_status()

    def cpu_seconds(self) -> float | None:
        """The sandbox process's CPU time so far, where /proc tells it."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def clear(self) -> None:
        httpx.delete(self.url.rsplit("/", 1)[0] + "/requests", timeout=60)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def bare_loop(url: str, bodies: Sequence[bytes], concurrency: int) -> float:
    """The floor: one client, ``concurrency`` tasks posting ready-made bodies."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"content-type": "application/json"}
    queue = list(reversed(bodies))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            content = queue.pop()
            response = await client.post(url, content=content, headers=headers)
            if response.json()["returnCode"] != "0":
                raise SystemExit(f"the sandbox refused a benchmark request: {response.text}")

    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - started


@dataclass
class Run:
    """One pass of N requests through store and dispatcher."""

    enqueue_s: float
    dispatch_s: float
    dispatch_cpu_s: float
    sent: int
    sandbox_cpu_s: float | None


def httpx_aiohttp_transport(concurrency: int) -> httpx.AsyncBaseTransport:
    """The httpx-aiohttp package's transport as published (for comparison only: its exceptions
    do not tell whether a request left, see engine/send/transport.py)."""
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        raise SystemExit("--transport httpx-aiohttp needs: pip install httpx-aiohttp") from None
    return AiohttpTransport(limits=httpx.Limits(max_connections=concurrency))  # type: ignore[no-any-return]


async def our_path(
    store: Store,
    url: str,
    markers: Sequence[str],
    settings: DispatchSettings,
    transport: str,
    sandbox: Sandbox | None = None,
) -> Run:
    """Enqueue then dispatch everything."""
    rule = f"bench-{secrets.token_hex(4)}"
    started = time.perf_counter()
    for start in range(0, len(markers), 1000):
        fires = [Fire(rule, m, [(url, body(m))]) for m in markers[start : start + 1000]]
        store.enqueue_many(fires, now=utcnow())
    enqueued = time.perf_counter()
    credentials = Credentials(SecretRef("env", "BENCH_LOGIN"), SecretRef("env", "BENCH_PASSWORD"))
    given = None
    if transport == "httpx-aiohttp":
        given = httpx_aiohttp_transport(settings.concurrency)
    else:
        settings = replace(settings, transport=transport)  # type: ignore[arg-type]
    server_cpu = sandbox.cpu_seconds() if sandbox else None
    cpu = time.process_time()
    enqueued = time.perf_counter()
    async with Dispatcher(store, settings, credentials, transport=given) as dispatcher:
        await dispatcher.run(asyncio.Event(), drain=True)
        sent = dispatcher.metrics.accepted
    dispatch_s = time.perf_counter() - enqueued
    dispatch_cpu = time.process_time() - cpu
    if sandbox and server_cpu is not None:
        after = sandbox.cpu_seconds()
        server_cpu = None if after is None else after - server_cpu
    return Run(enqueued - started, dispatch_s, dispatch_cpu, sent, server_cpu)


class Stores:
    """A fresh store for each run: a new SQLite file, or a new PostgreSQL schema."""

    def __init__(self, given: str | None) -> None:
        self.given = given
        self.tmp = tempfile.TemporaryDirectory(prefix="pushrules-bench-")
        self.scratches: list[ScratchSchema] = []
        self.count = 0

    def new(self) -> str:
        self.count += 1
        if self.given is None:
            return f"sqlite:///{Path(self.tmp.name) / f'outbox-{self.count}.db'}"
        scratch = ScratchSchema.for_url(self.given)
        if scratch is None:
            return self.given
        self.scratches.append(scratch)
        return scratch.url

    def close(self) -> None:
        self.tmp.cleanup()
        for scratch in self.scratches:
            scratch.drop()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=DispatchSettings().concurrency)
    parser.add_argument("--claim-batch", type=int, default=0, help="0: the dispatcher's default")
    parser.add_argument("--store", help="store URL (default: a fresh SQLite file)")
    parser.add_argument(
        "--store-calls",
        choices=("auto", "inline", "thread"),
        default="auto",
        help="see DispatchSettings",
    )
    parser.add_argument(
        "--transport",
        default=DispatchSettings().transport,
        help="comma-separated: httpcore, aiohttp, httpx-aiohttp (default: the dispatcher's)",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs of each transport, in turn")
    parser.add_argument(
        "--latency", type=float, default=0.0, metavar="MS", help="the sandbox's answer delay"
    )
    args = parser.parse_args(argv)
    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    for t in transports:
        if t not in ("httpcore", "aiohttp", "httpx-aiohttp"):
            parser.error(f"unknown transport {t!r}: httpcore, aiohttp or httpx-aiohttp")
    os.environ["BENCH_LOGIN"], os.environ["BENCH_PASSWORD"] = LOGIN, PASSWORD

    n, c = args.requests, args.concurrency
    user = {"login": LOGIN, "password": PASSWORD}
    settings = DispatchSettings(
        concurrency=c, claim_batch=args.claim_batch, store_calls=args.store_calls
    )

    def bodies_of(markers: Sequence[str]) -> list[bytes]:
        return [
            json.dumps(
                {"sendInstantMessage": {"user": user, **body(f"bare-{m}")["sendInstantMessage"]}},
                separators=(",", ":"),
            ).encode()
            for m in markers
        ]

    sandbox = Sandbox.start()
    stores = Stores(args.store)
    bare: list[tuple[float, float]] = []
    runs: dict[str, list[Run]] = {t: [] for t in transports}
    try:
        asyncio.run(bare_loop(sandbox.url, bodies_of([f"warm-{i}" for i in range(200)]), c))
        for t in transports:
            with Store(stores.new()) as store:
                warm = [f"warm-{t}-{i}" for i in range(200)]
                asyncio.run(our_path(store, sandbox.url, warm, settings, t))
        sandbox.clear()
        sandbox.set_latency(args.latency)
        for round_ in range(args.runs):
            tag = secrets.token_hex(3)
            markers = [f"{tag}-{i}" for i in range(n)]
            cpu = time.process_time()
            bare_s = asyncio.run(bare_loop(sandbox.url, bodies_of(markers), c))
            bare.append((bare_s, time.process_time() - cpu))
            # Each round in another order, so no transport always runs on a warmer machine.
            order = transports[round_ % len(transports) :] + transports[: round_ % len(transports)]
            for t in order:
                with Store(stores.new()) as store:
                    run = asyncio.run(our_path(store, sandbox.url, markers, settings, t, sandbox))
                runs[t].append(run)
                if run.sent != n:
                    print(f"warning: {t} sent {run.sent} of {n}")
                print(
                    f"  run {round_ + 1} {t}: {n / run.dispatch_s:,.0f} req/s dispatch, "
                    f"{1000 * run.dispatch_cpu_s / n:.3f} ms CPU a request",
                    flush=True,
                )
            received = sandbox.received()
            if received != n * (1 + len(transports)):
                print(f"warning: the sandbox received {received} of {n * (1 + len(transports))}")
            sandbox.clear()
    finally:
        sandbox.stop()
        stores.close()

    backend = (args.store or "sqlite").split(":", 1)[0].split("+", 1)[0]
    bare_s = median([b[0] for b in bare])
    rows = [
        (
            "bare httpx loop",
            f"{bare_s:.2f}",
            f"{n / bare_s:,.0f}",
            f"{1000 * median([b[1] for b in bare]) / n:.3f}",
            "",
            "1.00",
        )
    ]
    first = transports[0]
    for t in transports:
        ours = median([r.enqueue_s + r.dispatch_s for r in runs[t]])
        dispatch = median([r.dispatch_s for r in runs[t]])
        cpu = median([r.dispatch_cpu_s for r in runs[t]])
        server = [r.sandbox_cpu_s for r in runs[t] if r.sandbox_cpu_s is not None]
        rows.append(
            (
                f"store ({backend}) + dispatcher, {t}",
                f"{ours:.2f}",
                f"{n / ours:,.0f}",
                "",
                "",
                f"{ours / bare_s:.2f}",
            )
        )
        rows.append(
            (
                "  of which dispatch",
                f"{dispatch:.2f}",
                f"{n / dispatch:,.0f}",
                f"{1000 * cpu / n:.3f}",
                f"{1000 * median(server) / n:.3f}" if server else "",
                "",
            )
        )
    print(
        f"{n:,} requests, concurrency {c}, claim batch {settings.batch}, sandbox in a process "
        f"answering after {args.latency:g} ms; median of {args.runs} run(s) each"
    )
    print_table(
        ("path", "seconds", "requests/s", "CPU ms/req", "sandbox CPU ms/req", "x bare"),
        rows,
        left={0},
    )
    for t in transports[1:]:
        ours = median([r.enqueue_s + r.dispatch_s for r in runs[t]])
        base = median([r.enqueue_s + r.dispatch_s for r in runs[first]])
        cpu = median([r.dispatch_cpu_s for r in runs[t]])
        base_cpu = median([r.dispatch_cpu_s for r in runs[first]])
        print(
            f"{t} against {first}: {base / ours:.2f}x the end-to-end throughput, "
            f"{cpu / base_cpu:.2f}x the CPU a request while dispatching"
        )
    for t in transports:
        ours = median([r.enqueue_s + r.dispatch_s for r in runs[t]])
        verdict = "within" if ours <= 1.5 * bare_s else "OVER"
        print(f"{t}: ratio {ours / bare_s:.2f} to the bare loop ({verdict} the 1.5x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
