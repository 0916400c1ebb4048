"""A big fan-out: one event whose ``for_each`` expands to 100,000 targets, posted to a running
daemon, while ``/healthz`` is pinged without pause.

One run of ``pushrules run`` on a generated project (one event rule, ``for_each`` over
``event.members``, ``intake.max_body`` raised for the body; SQLite outbox), sending to a sandbox
in a process of its own (``python -m engine sandbox``). For each fire:

1. the fire: ``POST /events/bench.fanout`` with N members, timed from the first byte sent to
   the 202 answer: upload, parse, compile (1,000 requests of 100 targets for 100,000) and the
   outbox's one transaction for all of them;
2. ``/healthz`` meanwhile: a client on its own connection asks again as soon as it is answered;
   the latencies of the pings sent while the fire was in progress give p50, p99 and max;
3. the sending that follows (the dispatcher posting the fire's requests to the sandbox): the
   same pings, reported apart, with the time until the sandbox holds every request.

The outbox is read afterwards: each fire must hold exactly its requests, and one event sent
again with the same ``Idempotency-Key`` must come back a duplicate.

Before the daemon starts, the same fire in this process, without HTTP or event loop: the
compile (median of 3, processor time, and per target) and the outbox's one transaction.

    python benchmarks/fanout.py [--targets 100000] [--fires 3] [--keep DIR]

``--keep DIR`` keeps the project, the daemon's log (``daemon.log``) and every ping
(``pings.json``: sent at, seconds, status) to lay them side by side.

Targets: a fire under 2 s; healthz p99 under 100 ms during the fire. A missed target is
reported, not an error: the exit code is non-zero only when the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from common import (
    LOGIN_VAR,
    PASSWORD_VAR,
    Daemon,
    print_table,
    project_root,
    stop_process,
)
from daemon import Sandbox, cpu_seconds, engine_version, free_port, percentile

from engine.outbox.store import Fire, Store
from engine.render.compiler import FireContext, compile_fire
from engine.rules.loader import Loader

EVENT, RULE = "bench.fanout", "fanout"
TARGET_FIRE_S, TARGET_PING_P99_S = 2.0, 0.100
MAX_BODY = 64 * 1024 * 1024

RULE_TEXT = f"""description: Every member of the event hears of the change of their flight
trigger:
  event: {EVENT}
apps:
  flights-android: {{parentMessageId: "4"}}
message:
  subject: "Flight {{{{ event.flight }}}} changed"
  text: "${{first_name}}, your flight {{{{ event.flight }}}} leaves at {{{{ event.at }}}}"
  data: {{flight: "{{{{ event.flight }}}}"}}
targets:
  - for_each: "{{{{ event.members }}}}"
    as: m
    target:
      memberId: "{{{{ m.id }}}}"
      data: {{first_name: "{{{{ m.name }}}}"}}
"""


def config_text(sandbox_url: str, store: Path, listen: str) -> str:
    return (
        "accengage:\n"
        f"  url: {sandbox_url}\n"
        f"  login: {{env: {LOGIN_VAR}}}\n"
        f"  password: {{env: {PASSWORD_VAR}}}\n"
        "apps:\n"
        "  flights-android: {partner: my_partner_id_android, platform: android}\n"
        "timezone: UTC\n"
        "device_fields: [memberId, language, opencount, first_name]\n"
        "languages: [en, fr]\n"
        f"store: sqlite:///{store}\n"
        f"listen: {listen}\n"
        "intake:\n"
        f"  max_body: {MAX_BODY}\n"
    )


def generate(root: Path, sandbox_url: str, listen: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    store = root / "outbox.db"
    for stale in root.glob("outbox.db*"):
        stale.unlink()
    (root / "pushrules.yaml").write_text(config_text(sandbox_url, store, listen))
    rules = root / "rules"
    if rules.exists():
        shutil.rmtree(rules)
    rules.mkdir()
    (rules / f"{RULE}.yaml").write_text(RULE_TEXT)
    return store


def event_body(targets: int, n: int) -> bytes:
    members = [{"id": f"m{n}-{i:07d}", "name": f"Member {i}"} for i in range(targets)]
    return json.dumps({"flight": f"AF{n:04d}", "at": "18:05", "members": members}).encode()


class Pinger:
    """GET /healthz again and again on one connection: (sent, answered, status) each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pings: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                sent = time.perf_counter()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError:
                    status = 0
                self.pings.append((sent, time.perf_counter(), status))
                time.sleep(0.005)  # a client's pace, not a flood: about 100 pings a second

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[float]:
        """Latencies of the pings sent in [start, end), and of one that was waiting at start."""
        return [b - a for a, b, _ in list(self.pings) if start <= a < end or a < start < b]


@dataclass
class FireResult:
    seconds: float
    status: int
    detail: str
    ping_fire: list[float]
    sent_s: float
    ping_send: list[float]
    daemon_cpu_s: float
    rows: int = 0


@dataclass
class Results:
    targets: int
    compile_cpu_s: float = math.nan
    enqueue_s: float = math.nan
    enqueue_cpu_s: float = math.nan
    body_mb: float = math.nan
    fires: list[FireResult] = field(default_factory=list)
    duplicate: str = ""
    idle_pings: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def in_process(res: Results, root: Path) -> None:
    """The fire compiled and enqueued here: what the daemon's steps and its thread add to."""
    ruleset = Loader(root, workers=1).load()
    assert ruleset.project is not None, ruleset.problems
    rule = ruleset.rules[RULE]
    event = json.loads(event_body(res.targets, 99))
    ctx = FireContext(datetime.now(UTC), event=event)
    compile_fire(rule, ruleset.project, FireContext(ctx.now, event={**event, "members": []}))
    times = []
    for _ in range(3):
        start = time.process_time()
        requests = compile_fire(rule, ruleset.project, ctx)
        times.append(time.process_time() - start)
    res.compile_cpu_s = statistics.median(times)
    with Store(f"sqlite:///{root / 'in-process.db'}") as store:
        fire = Fire(RULE, "in-process", [(r.url, r.body) for r in requests])
        wall, cpu = time.perf_counter(), time.process_time()
        store.enqueue_many([fire], now=ctx.now)
        res.enqueue_s = time.perf_counter() - wall
        res.enqueue_cpu_s = time.process_time() - cpu


def run(args: argparse.Namespace, root: Path) -> Results:
    res = Results(args.targets)
    root.mkdir(parents=True, exist_ok=True)
    record = root / "sandbox-requests.jsonl"
    record.unlink(missing_ok=True)
    sandbox = Sandbox.start(record)
    daemon: subprocess.Popen[str] | None = None
    pinger: Pinger | None = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        store = generate(root, sandbox.url, listen)
        in_process(res, root)
        started = Daemon.launch(root)
        daemon = started.process
        base = f"http://{listen}"
        if started.ready(listen, timeout=60) is None:
            res.problems.append("the daemon never answered /healthz with 200 (see daemon.log)")
            return res
        bodies = [event_body(args.targets, n) for n in range(args.fires)]
        res.body_mb = len(bodies[0]) / 1e6
        pinger = Pinger(f"{base}/healthz")
        pinger.start()
        with httpx.Client(timeout=120) as client:
            # A small fire first: the first fire's imports are not the big fire's cost.
            warm = client.post(
                f"{base}/events/{EVENT}",
                content=json.dumps(
                    {"flight": "AF0", "at": "9:00", "members": [{"id": "w", "name": "W"}]}
                ),
                headers={"Idempotency-Key": "warm-up"},
            )
            if warm.status_code != 202:
                res.problems.append(f"the warm-up event was answered {warm.status_code}")
                return res
            expected = 1
            if not wait_sent(sandbox, expected, daemon, 30):
                res.problems.append("the warm-up push never reached the sandbox")
                return res
            idle_start = time.perf_counter()
            time.sleep(1.0)
            res.idle_pings = pinger.between(idle_start, time.perf_counter())
            for n, body in enumerate(bodies):
                cpu0 = cpu_seconds(daemon.pid)
                start = time.perf_counter()
                answer = client.post(
                    f"{base}/events/{EVENT}",
                    content=body,
                    headers={"Idempotency-Key": f"fanout-{n}", "Content-Type": "application/json"},
                )
                end = time.perf_counter()
                cpu1 = cpu_seconds(daemon.pid)
                detail = json.dumps(answer.json())[:300]
                expected += math.ceil(args.targets / 100)
                sent_ok = wait_sent(sandbox, expected, daemon, args.deadline)
                done = time.perf_counter()
                res.fires.append(
                    FireResult(
                        end - start,
                        answer.status_code,
                        detail,
                        pinger.between(start, end),
                        done - end,
                        pinger.between(end, done),
                        cpu1 - cpu0,
                    )
                )
                if answer.status_code != 202:
                    res.problems.append(f"fire {n + 1} was answered {answer.status_code}: {detail}")
                    return res
                if not sent_ok:
                    res.problems.append(
                        f"fire {n + 1}: the sandbox did not get all its requests within "
                        f"{args.deadline:g} s"
                    )
                    return res
            again = client.post(
                f"{base}/events/{EVENT}",
                content=bodies[0],
                headers={"Idempotency-Key": "fanout-0", "Content-Type": "application/json"},
            )
            res.duplicate = ", ".join(r["status"] for r in again.json().get("rules", []))
        pinger.stop()
        offset = time.time() - time.perf_counter()
        (root / "pings.json").write_text(
            json.dumps([(a + offset, b - a, status) for a, b, status in pinger.pings])
        )
        pinger = None
        with Store(f"sqlite:///{store}", create=False) as outbox:
            # The sandbox has every request a moment before the daemon has written the last
            # answers (results are written in batches): wait for them before counting.
            settled = time.monotonic() + 5
            counts = outbox.backlog()
            while counts.get("sent", 0) < expected and time.monotonic() < settled:
                time.sleep(0.05)
                counts = outbox.backlog()
            rows = outbox.history(rule=RULE, limit=10 * len(bodies) * (args.targets // 100 + 1))
        for n, fire in enumerate(res.fires):
            fire.rows = sum(1 for r in rows if r.idem_key == f"event:fanout-{n}")
            if fire.rows != math.ceil(args.targets / 100):
                res.problems.append(f"fire {n + 1} holds {fire.rows} rows in the outbox")
        if counts.get("sent", 0) != expected:
            res.problems.append(f"the outbox holds {counts} (expected {expected} sent)")
        if res.duplicate != "duplicate":
            res.problems.append(f"the same event sent again came back {res.duplicate!r}")
        return res
    finally:
        if pinger is not None:
            pinger.stop()
        if daemon is not None:
            code = stop_process(daemon)
            if code != 0 and not res.problems:
                res.problems.append(f"the daemon exited {code} on SIGTERM (see daemon.log)")
        sandbox.stop()


def wait_sent(sandbox: Sandbox, count: int, daemon: subprocess.Popen[str], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if sandbox.recorded() >= count:
            return True
        if daemon.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "n/a"


def report(res: Results) -> None:
    def ok(value: float, target: float) -> str:
        return "n/a" if math.isnan(value) else ("yes" if value < target else "MISSED")

    rows: list[tuple[str, str, str, str]] = []
    if not math.isnan(res.compile_cpu_s):
        per = res.compile_cpu_s / res.targets * 1e6
        rows.append(
            (
                "in process: compile, CPU (median of 3)",
                f"{res.compile_cpu_s:.2f} s ({per:.1f} us a target)",
                "",
                "",
            )
        )
        rows.append(
            (
                "in process: enqueue, one transaction (CPU)",
                f"{res.enqueue_s:.2f} s ({res.enqueue_cpu_s:.2f} s)",
                "",
                "",
            )
        )
    if res.idle_pings:
        rows.append(
            (
                f"/healthz idle, p50/p99 ({len(res.idle_pings)} pings)",
                f"{ms(res.idle_pings, 50)}/{ms(res.idle_pings, 99)} ms",
                "",
                "",
            )
        )
    for n, fire in enumerate(res.fires, 1):
        rows.append(
            (
                f"fire {n}: POST -> 202 (daemon CPU)",
                f"{fire.seconds:.2f} s ({fire.daemon_cpu_s:.2f} s)",
                f"< {TARGET_FIRE_S:g} s",
                ok(fire.seconds, TARGET_FIRE_S),
            )
        )
        rows.append(
            (
                f"  /healthz meanwhile, p50/p99/max ({len(fire.ping_fire)} pings)",
                f"{ms(fire.ping_fire, 50)}/{ms(fire.ping_fire, 99)}/{ms(fire.ping_fire, 100)} ms",
                f"p99 < {TARGET_PING_P99_S * 1000:.0f} ms",
                ok(percentile(fire.ping_fire, 99) if fire.ping_fire else math.nan, 0.1),
            )
        )
        rows.append(
            (
                "  then all requests at the sandbox",
                f"{fire.sent_s:.2f} s",
                "",
                "",
            )
        )
        rows.append(
            (
                f"  /healthz while sending, p50/p99/max ({len(fire.ping_send)})",
                f"{ms(fire.ping_send, 50)}/{ms(fire.ping_send, 99)}/{ms(fire.ping_send, 100)} ms",
                "",
                "",
            )
        )
    if res.fires:
        pooled = [p for f in res.fires for p in f.ping_fire]
        rows.append(
            (
                f"fire, median of {len(res.fires)}",
                f"{statistics.median(f.seconds for f in res.fires):.2f} s",
                f"< {TARGET_FIRE_S:g} s",
                ok(statistics.median(f.seconds for f in res.fires), TARGET_FIRE_S),
            )
        )
        rows.append(
            (
                f"/healthz during the fires, p50/p99 ({len(pooled)} pings)",
                f"{ms(pooled, 50)}/{ms(pooled, 99)} ms",
                f"p99 < {TARGET_PING_P99_S * 1000:.0f} ms",
                ok(percentile(pooled, 99) if pooled else math.nan, TARGET_PING_P99_S),
            )
        )
    print()
    print(
        f"pushrules run, one event of {res.targets:,} for_each targets ({res.body_mb:.1f} MB), "
        f"SQLite, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; engine at "
        f"{engine_version()}"
    )
    print_table(("figure", "value", "target", "met"), rows, left={0, 2})
    if res.fires:
        rows_each = ", ".join(str(f.rows) for f in res.fires)
        print(f"outbox rows per fire: {rows_each}; the first event sent again: {res.duplicate}")
    if res.problems:
        print("targets: not judged, the run failed (below)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, default=100_000, help="for_each items per event")
    parser.add_argument("--fires", type=int, default=3, help="events posted, one after another")
    parser.add_argument(
        "--deadline", type=float, default=120, help="seconds to wait for a fire's sending"
    )
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    args = parser.parse_args()
    with project_root(args.keep, prefix="pushrules-fanout-") as root:
        res = run(args, root)
        report(res)
        for problem in res.problems:
            print(f"run failed: {problem}", file=sys.stderr)
        return 1 if res.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
