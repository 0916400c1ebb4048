"""What the outbox costs: N requests through store + dispatcher vs a bare httpx loop.

Both paths post the same bodies to the same sandbox at the same concurrency, in one run. The
sandbox runs in its own process (``python -m engine sandbox``) so that client and server do not
share a GIL. "Ours" counts everything a real send does: enqueueing the fires, claiming them,
adding the credentials to each body, sending, and recording every attempt.

    python benchmarks/dispatch.py [--requests 20000] [--concurrency 16] [--store URL]

Target: our path takes at most 1.5x the bare loop's time on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from common import ScratchSchema, print_table, start_sandbox  # noqa: E402  (run as a script)

from engine.outbox.schema import utcnow  # noqa: E402
from engine.outbox.store import Fire, Store  # noqa: E402
from engine.rules.secrets import SecretRef  # noqa: E402
from engine.send.dispatch import Credentials, Dispatcher  # noqa: E402
from engine.send.policy import DispatchSettings  # noqa: E402

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


async def our_path(
    store: Store, url: str, markers: Sequence[str], settings: DispatchSettings
) -> tuple[float, float, int]:
    """Enqueue then dispatch everything; returns (enqueue s, dispatch s, rows sent)."""
    rule = f"bench-{secrets.token_hex(4)}"
    started = time.perf_counter()
    for start in range(0, len(markers), 1000):
        fires = [Fire(rule, m, [(url, body(m))]) for m in markers[start : start + 1000]]
        store.enqueue_many(fires, now=utcnow())
    enqueued = time.perf_counter()
    credentials = Credentials(SecretRef("env", "BENCH_LOGIN"), SecretRef("env", "BENCH_PASSWORD"))
    async with Dispatcher(store, settings, credentials) as dispatcher:
        await dispatcher.run(asyncio.Event(), drain=True)
        sent = dispatcher.metrics.accepted
    return enqueued - started, time.perf_counter() - enqueued, sent


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
        "--latency", type=float, default=0.0, metavar="MS", help="the sandbox's answer delay"
    )
    args = parser.parse_args(argv)
    os.environ["BENCH_LOGIN"], os.environ["BENCH_PASSWORD"] = LOGIN, PASSWORD

    n, c = args.requests, args.concurrency
    tag = secrets.token_hex(3)
    markers = [f"{tag}-{i}" for i in range(n)]
    user = {"login": LOGIN, "password": PASSWORD}
    bodies = [
        json.dumps(
            {"sendInstantMessage": {"user": user, **body(f"bare-{m}")["sendInstantMessage"]}},
            separators=(",", ":"),
        ).encode()
        for m in markers
    ]
    settings = DispatchSettings(
        concurrency=c, claim_batch=args.claim_batch, store_calls=args.store_calls
    )

    sandbox = Sandbox.start()
    tmp = tempfile.TemporaryDirectory(prefix="pushrules-bench-")
    store_url = args.store or f"sqlite:///{Path(tmp.name) / 'outbox.db'}"
    scratch = ScratchSchema.for_url(store_url)
    if scratch is not None:
        store_url = scratch.url
    try:
        warm = [f"warm-{i}" for i in range(200)]
        asyncio.run(bare_loop(sandbox.url, bodies[:200], c))
        with Store(store_url) as store:
            asyncio.run(our_path(store, sandbox.url, warm, settings))
        sandbox.clear()
        sandbox.set_latency(args.latency)

        bare_s = asyncio.run(bare_loop(sandbox.url, bodies, c))
        with Store(store_url) as store:
            enqueue_s, dispatch_s, sent = asyncio.run(
                our_path(store, sandbox.url, markers, settings)
            )
        received = sandbox.received()
    finally:
        sandbox.stop()
        tmp.cleanup()
        if scratch is not None:
            scratch.drop()

    ours_s = enqueue_s + dispatch_s
    if sent != n or received != 2 * n:
        print(f"warning: sent {sent} of {n}; the sandbox received {received} of {2 * n}")
    backend = store_url.split(":", 1)[0]
    rows = [
        ("bare httpx loop", f"{bare_s:.2f}", f"{n / bare_s:,.0f}", "1.00"),
        (
            f"store ({backend}) + dispatcher",
            f"{ours_s:.2f}",
            f"{n / ours_s:,.0f}",
            f"{ours_s / bare_s:.2f}",
        ),
        ("  of which enqueue", f"{enqueue_s:.2f}", f"{n / enqueue_s:,.0f}", ""),
        ("  of which dispatch", f"{dispatch_s:.2f}", f"{n / dispatch_s:,.0f}", ""),
    ]
    print(
        f"{n:,} requests, concurrency {c}, claim batch {settings.batch}, "
        f"sandbox in a process answering after {args.latency:g} ms"
    )
    print_table(("path", "seconds", "requests/s", "x bare"), rows, left={0})
    verdict = "within" if ours_s <= 1.5 * bare_s else "OVER"
    print(f"ratio {ours_s / bare_s:.2f} ({verdict} the 1.5x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
