"""The daemon under a burst: N cron rules due in the same minute, its memory, its reload time.

One run of ``pushrules run`` on a generated project (N rule files, each ``cron: "M H * * *"``
in UTC for the same minute, one app, varied messages and targets), sending to a sandbox that
runs as a process of its own (``python -m engine sandbox``), so the two share no GIL:

1. lag: for every request the sandbox received, its ``received_at`` minus the real instant
   the fire was scheduled for; p50, p99 and max. Also split at the daemon's "rule X fired"
   log line (scheduler + outbox write) vs the rest (dispatcher + HTTP), and the CPU time the
   daemon, the sandbox and the whole machine used meanwhile (other work on a shared machine
   shows there). The startup time, launch to ``/healthz`` answering 200, is printed too.
2. memory: the kernel's peak resident set (``VmHWM``) of the daemon process, and of the
   workers it forks for its first load (sampled every 20 ms while they live, with the
   largest sum of RSS and of PSS over all of them).
3. reload: one rule file edited while the daemon runs, ``--reloads`` times (the median is
   reported): the daemon's own "reloaded in N ms" figure, and write -> that log line
   (which adds the watcher's poll and debounce, 0.5-0.8 s by design).

    python benchmarks/daemon.py [--rules 1000] [--lead 20] [--deadline 60] [--reloads 3]
                                [--keep DIR] [--fire-ahead DURATION|none]

With ``daemon.fire_ahead`` (5 s unless ``--fire-ahead`` says otherwise) the fires are decided
and written before the minute, so "fired" is logged seconds before it (negative) and the lag is
the dispatcher's alone; ``--fire-ahead none`` decides each fire at its time, for comparison.

Targets, by the number of rules (the nearest at or below ``--rules``): 1,000 rules, p99 lag
under 1 s (issue 12; it was 2 s), peak RSS under 200 MB, reload under 0.3 s; 5,000 rules
(issue 12), startup under 5 s, peak RSS under 120 MB, reload under 0.1 s. A missed target is
reported, not an error: the exit code is non-zero only when the run itself failed. The peak
RSS is shown twice: through startup (the rules loaded and scheduled) and over the whole run
(the burst included).

Clocks. The daemon runs on a shifted clock (``PUSHRULES_CLOCK``: ``--lead`` seconds before
the due minute), the sandbox stamps real time. The daemon's offset is fixed when it parses
``PUSHRULES_CLOCK``, after the interpreter started and imported the engine, so the launch
instant is only a bound (it overstates every lag by that import time, a few hundred ms). The
offset is therefore read back: an extra event rule puts ``{{ now.isoformat() }}`` (the daemon's
clock) in its push; we POST its event between real instants t0 and t1, and the daemon read its
clock in between, so offset = clock - real lies in [c - t1, c - t0]. The offset lies in the
intersection of a few probes' intervals; we take its midpoint, so every lag carries the same
error, at most half its width (printed: a few ms). Both processes read the same system clock
(CLOCK_REALTIME). The probe rule is the one rule file beyond the N cron rules.

The clock is set slightly *behind* real time (offset in (-60 s, 0]), never ahead, so no
outbox row is ever stamped in the real future: a dispatcher that claims rows by real time
(as before 3ffc3e9) would hold such rows until real time caught up with them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from common import (
    LOGIN_VAR,
    PASSWORD_VAR,
    REPO,
    Daemon,
    print_table,
    project_root,
    start_sandbox,
    stop_process,
)

PROBE_EVENT = "bench.clock_probe"
PROBE_RULE = "zz-clock-probe"
PROBE_MARK = "clock-probe"


@dataclass(frozen=True)
class Targets:
    p99_s: float = math.inf
    rss_mb: float = math.inf
    reload_s: float = math.inf
    startup_s: float = math.inf


#: By the number of rules: the nearest at or below the run's applies.
TARGETS = {
    1000: Targets(p99_s=1.0, rss_mb=200.0, reload_s=0.3),
    5000: Targets(startup_s=5.0, rss_mb=120.0, reload_s=0.1),
}


def targets_for(rules: int) -> Targets:
    sizes = [n for n in TARGETS if n <= rules]
    return TARGETS[max(sizes)] if sizes else TARGETS[min(TARGETS)]


IOS_APPS = ["flights-ios", "news-ios"]
ANDROID_APPS = ["flights-android", "news-android"]
MEMBERS = [("765c8", "Patrick"), ("a91f2", "Marie"), ("b3c77", "Sam"), ("d0e41", "Jonas")]
TOPICS = [
    ("Your morning briefing", "the headlines of {{ now.strftime('%A %d %B') }} are in"),
    ("Fares for the weekend", "prices to {{ vars.city }} dropped since yesterday"),
    ("Check in now", "check-in for your {{ now.strftime('%d/%m') }} flight is open"),
    ("Daily quiz", "today's quiz, number {{ now.timetuple().tm_yday }}, is open"),
    ("Flash sale", "{{ vars.pct }}% off everything until midnight"),
    ("Your loyalty points", "you have points waiting, ${first_name}"),
    ("Weather at {{ vars.city }}", "sunny, {{ vars.temp }} degrees at {{ now.strftime('%H:%M') }}"),
]
CITIES = ["Lisbon", "Oslo", "Naples", "Porto", "Seville", "Krakow", "Dublin", "Malta"]


# --------------------------------------------------------------------------- the project


def config_text(sandbox_url: str, store: Path, listen: str, fire_ahead: str | None) -> str:
    daemon = f"daemon:\n  fire_ahead: {fire_ahead}\n" if fire_ahead else ""
    return (
        "accengage:\n"
        f"  url: {sandbox_url}\n"
        f"  login: {{env: {LOGIN_VAR}}}\n"
        f"  password: {{env: {PASSWORD_VAR}}}\n"
        "apps:\n"
        "  flights-ios:     {partner: my_partner_id, platform: ios}\n"
        "  flights-android: {partner: my_partner_id_android, platform: android}\n"
        "  news-ios:        {partner: my_first_partner_id, platform: ios}\n"
        "  news-android:    {partner: my_second_partner_id, platform: android}\n"
        "timezone: UTC\n"
        "device_fields: [memberId, language, opencount, first_name]\n"
        "languages: [en, fr, de]\n"
        "button_templates: {category_name: 2}\n"
        f"store: sqlite:///{store}\n"
        f"listen: {listen}\n" + daemon
    )


def rule_text(i: int, cron: str, rnd: random.Random) -> str:
    """One realistic cron rule: one app, a message with Jinja and ${macros}, 1-4 targets."""
    ios = rnd.random() < 0.5
    app = rnd.choice(IOS_APPS if ios else ANDROID_APPS)
    subject, text = rnd.choice(TOPICS)
    lines = [
        f"description: Generated daily push {i} for the daemon benchmark",
        "trigger:",
        f'  cron: "{cron}"',
        "  timezone: UTC",
        f"catch_up: {rnd.choice(['5m', '10m', '30m'])}",
        f"vars: {{city: {rnd.choice(CITIES)}, pct: {rnd.randint(10, 60)}, "
        f"temp: {rnd.randint(5, 30)}}}",
        "apps:",
    ]
    if ios or rnd.random() < 0.5:
        lines.append(f'  {app}: {{parentMessageId: "{1000 + i}"}}')
    else:
        lines += [
            f"  {app}:",
            f'    parentMessageId: "{1000 + i}"',
            '    message: {bigPicture: promo.png, customizedTitle: "{{ rule.id }}"}',
        ]
    lines += [
        "message:",
        f'  subject: "{subject}"',
        f'  text: "Hi ${{first_name}}, {text}"',
    ]
    if rnd.random() < 0.5:
        lines.append("  sound: default")
    if rnd.random() < 0.6:
        lines.append(f"  customParams: {{campaign: daily-{i}, source: pushrules}}")
    if rnd.random() < 0.3:
        lines.append(f"  data: {{code: \"D{i}-{{{{ now.strftime('%Y%m%d') }}}}\"}}")
    if ios and rnd.random() < 0.4:
        lines.append("  interactiveButtons: {use: yes-no}")
    elif not ios and rnd.random() < 0.4:
        lines.append("  interactiveButtons: {use: confirm-or-rebook}")
    lines.append("targets:")
    for _ in range(rnd.randint(1, 4)):
        if rnd.random() < 0.5:
            member, name = rnd.choice(MEMBERS)
            lines += [f'  - memberId: "{member}"', f"    data: {{first_name: {name}}}"]
        else:
            lines += [
                f"  - language: {rnd.choice(['en', 'fr', 'de'])}",
                f'    opencount: {{operator: ">", value: "{rnd.randint(0, 5)}"}}',
                f"    data: {{first_name: Friend{rnd.randint(1, 99)}}}",
            ]
    return "\n".join(lines) + "\n"


PROBE_TEXT = f"""description: Not part of the load; tells the benchmark the daemon's clock
trigger:
  event: {PROBE_EVENT}
apps:
  flights-ios: {{parentMessageId: "1"}}
message:
  subject: {PROBE_MARK}
  text: "{PROBE_MARK} {{{{ now.isoformat() }}}}"
targets:
  - memberId: "765c8"
"""


def generate(
    root: Path,
    count: int,
    cron: str,
    sandbox_url: str,
    listen: str,
    fire_ahead: str | None = None,
) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    store = root / "outbox.db"
    for stale in root.glob("outbox.db*"):
        stale.unlink()
    (root / "pushrules.yaml").write_text(config_text(sandbox_url, store, listen, fire_ahead))
    shutil.copytree(REPO / "templates", root / "templates", dirs_exist_ok=True)
    rules = root / "rules"
    if rules.exists():
        shutil.rmtree(rules)
    rules.mkdir()
    rnd = random.Random(11)
    paths = []
    for i in range(count):
        path = rules / f"daily-{i:04d}.yaml"
        path.write_text(rule_text(i, cron, rnd))
        paths.append(path)
    (rules / f"{PROBE_RULE}.yaml").write_text(PROBE_TEXT)
    return paths


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sandbox:
    process: subprocess.Popen[str]
    url: str  # where to POST
    record: Path

    @classmethod
    def start(cls, record: Path) -> Sandbox:
        process, url = start_sandbox("--record", str(record))
        return cls(process, url, record)

    @property
    def base(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def recorded(self) -> int:
        """Requests received so far: lines of the record file (cheaper than GET /requests)."""
        try:
            with self.record.open("rb") as f:
                return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
        except FileNotFoundError:
            return 0

    def requests(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.base}/requests", timeout=60).json()

    def stop(self) -> None:
        stop_process(self.process)


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name = line.split(":", 1)[0]
            if name in keys:
                out[name] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return kids


class MemorySampler:
    """Peak memory of the daemon (kernel VmHWM) and of the workers it forks (sampled).

    Forked workers share the daemon's pages until they write to them, so a plain sum of RSS
    counts those twice; the sum of PSS (each shared page split between its sharers) is taken
    too, while workers live.
    """

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.pid, self.every = pid, every
        self.main_hwm = 0
        self.child_hwm = 0
        self.children_seen: set[int] = set()
        self.sum_rss = 0  # largest sum of VmRSS over the daemon and its children
        self.sum_pss = 0  # largest sum of Pss over the same, sampled while children live
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> None:
        main = _status_kib(self.pid, ("VmHWM", "VmRSS"))
        self.main_hwm = max(self.main_hwm, main.get("VmHWM", 0))
        total = main.get("VmRSS", 0)
        kids = []
        for kid in _children(self.pid):
            facts = _status_kib(kid, ("VmHWM", "VmRSS"))
            if facts:
                kids.append(kid)
                self.children_seen.add(kid)
                self.child_hwm = max(self.child_hwm, facts.get("VmHWM", 0))
                total += facts.get("VmRSS", 0)
        self.sum_rss = max(self.sum_rss, total)
        if kids:
            self.sum_pss = max(self.sum_pss, sum(_pss_kib(p) for p in [self.pid, *kids]))

    def _run(self) -> None:
        while not self._done.is_set():
            self.sample()
            time.sleep(self.every)

    def stop(self) -> None:
        self.sample()
        self._done.set()
        self._thread.join()


# --------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a process so far (0 when it is gone); ``children``: with that
    of the children it has waited for (its load workers)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def engine_version() -> str:
    """The commit under test, and whether engine/ has uncommitted changes (a shared tree)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "engine"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def probe_offset(listen: str, sandbox: Sandbox, probes: int) -> tuple[float, float]:
    """(offset s, error bound s): the daemon's clock minus real time; see the docstring."""
    windows = []
    with httpx.Client(timeout=10) as client:
        client.get(f"http://{listen}/healthz")  # a warm connection
        for n in range(probes):
            t0 = time.time()
            response = client.post(
                f"http://{listen}/events/{PROBE_EVENT}",
                json={"n": n},
                headers={"Idempotency-Key": f"probe-{n}-{t0}"},
            )
            t1 = time.time()
            response.raise_for_status()
            windows.append((t0, t1))
            time.sleep(0.05)
    clocks: list[float] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(clocks) < probes:
        time.sleep(0.1)
        texts = [json.dumps(r["body"]) for r in sandbox.requests()]
        found = [re.search(rf"{PROBE_MARK} ([^\s\"]+)", t) for t in texts if PROBE_MARK in t]
        clocks = sorted(parse_ts(m.group(1)) for m in found if m)
    if len(clocks) < probes:
        raise RuntimeError(f"only {len(clocks)} of {probes} clock probes reached the sandbox")
    # The probes went one after another, so the i-th clock reading is the i-th probe's. The
    # offset lies in every probe's interval, hence in their intersection.
    bounds = [(c - t1, c - t0) for (t0, t1), c in zip(windows, clocks, strict=True)]
    low, high = max(b[0] for b in bounds), min(b[1] for b in bounds)
    if low > high:
        raise RuntimeError(f"the clock probes disagree: offsets within {bounds}")
    return (low + high) / 2, (high - low) / 2


@dataclass
class Results:
    rules: int
    startup_s: float = math.nan
    startup_cpu_s: float = math.nan  # the daemon and its load workers, launch -> ready
    startup_hwm_kib: int = 0  # VmHWM when ready: the rules loaded and scheduled
    leading_s: float = math.nan
    offset_s: float = math.nan
    offset_error_s: float = math.nan
    launch_bias_s: float = math.nan
    lags: list[float] = field(default_factory=list)
    fired_lags: list[float] = field(default_factory=list)
    received: int = 0
    duplicates: int = 0
    bad_answers: int = 0
    burst_span_s: float = math.nan
    main_hwm_kib: int = 0
    child_hwm_kib: int = 0
    children: int = 0
    sum_rss_kib: int = 0
    sum_pss_kib: int = 0
    rss_after_kib: int = 0
    burst_wall_s: float = math.nan
    burst_cpu: dict[str, float] = field(default_factory=dict)  # daemon, sandbox, machine (cores)
    reload_ms: list[float] = field(default_factory=list)
    reload_e2e_s: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def run(args: argparse.Namespace, root: Path) -> Results:
    res = Results(args.rules)
    root.mkdir(parents=True, exist_ok=True)
    record = root / "sandbox-requests.jsonl"
    record.unlink(missing_ok=True)  # --keep: an earlier run's requests would be counted
    sandbox = Sandbox.start(record)
    daemon: subprocess.Popen[str] | None = None
    sampler: MemorySampler | None = None
    try:
        listen = f"127.0.0.1:{free_port()}"
        # The due minute D and the clock start S = D - lead, with S <= now: see the docstring.
        planned = time.time()
        due = math.floor((planned + args.lead) / 60) * 60  # D, on the daemon's clock
        start = due - args.lead
        due_dt = datetime.fromtimestamp(due, UTC)
        cron = f"{due_dt.minute} {due_dt.hour} * * *"
        paths = generate(root, args.rules, cron, sandbox.url, listen, args.fire_ahead)
        started = Daemon.launch(root, clock=datetime.fromtimestamp(start, UTC).isoformat())
        daemon, logs, launched = started.process, started.logs, started.launched
        sampler = MemorySampler(daemon.pid)
        sampler.start()
        print(
            f"daemon pid {daemon.pid}: {args.rules} cron rules '{cron}' (UTC), clock starts "
            f"{args.lead:g} s before them, at {iso(start)}",
            flush=True,
        )

        startup = started.ready(listen, timeout=args.lead + 60)
        if startup is None:
            res.problems.append("the daemon never answered /healthz with 200 (see daemon.log)")
            return res
        res.startup_s = startup
        res.startup_cpu_s = cpu_seconds(daemon.pid, children=True)
        leading = logs.wait_for(r"^leading:", 0, timeout=args.lead + 30)
        if leading is not None:
            res.leading_s = parse_ts(leading[1]["time"]) - launched
        applied = logs.wait_for(r"^schedules: \d+ added", 0, timeout=args.lead + 30)
        if applied is None:
            res.problems.append("the scheduler never logged its schedules (see daemon.log)")
            return res
        res.startup_hwm_kib = _status_kib(daemon.pid, ("VmHWM",)).get("VmHWM", 0)

        try:
            res.offset_s, res.offset_error_s = probe_offset(listen, sandbox, args.probes)
        except (RuntimeError, httpx.HTTPError) as exc:
            res.problems.append(f"reading the daemon's clock back failed: {exc}")
            return res
        res.launch_bias_s = (start - launched) - res.offset_s  # the import time, about
        due_real = due - res.offset_s
        left = due_real - time.time()
        print(
            f"ready after {res.startup_s:.2f} s; clock offset {res.offset_s:+.4f} s "
            f"(+/- {res.offset_error_s * 1000:.1f} ms); the burst is due in {left:.1f} s",
            flush=True,
        )
        if left < 1:
            res.problems.append(
                f"the daemon was ready only {left:.1f} s before the due minute: raise --lead"
            )
            return res

        # 1. the burst; CPU use is read from just before it to the last push
        time.sleep(max(0.0, due_real - 0.2 - time.time()))
        cpu0 = (time.time(), cpu_seconds(daemon.pid), cpu_seconds(sandbox.process.pid))
        busy0 = machine_busy()
        want = args.rules + args.probes
        deadline = due_real + args.deadline
        while sandbox.recorded() < want and time.time() < deadline:
            if daemon.poll() is not None:
                res.problems.append(f"the daemon exited ({daemon.returncode}) during the burst")
                return res
            time.sleep(0.05)
        busy1 = machine_busy()
        res.burst_wall_s = time.time() - cpu0[0]
        res.burst_cpu = {
            "daemon": cpu_seconds(daemon.pid) - cpu0[1],
            "sandbox": cpu_seconds(sandbox.process.pid) - cpu0[2],
            "machine": (os.cpu_count() or 1) * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        }
        time.sleep(0.5)  # a straggler or a duplicate would show up now
        requests = [r for r in sandbox.requests() if PROBE_MARK not in json.dumps(r["body"])]
        res.received = len(requests)
        ids = []
        for r in requests:
            res.lags.append(parse_ts(r["received_at"]) - due_real)
            if r.get("returnCode") != "0":
                res.bad_answers += 1
            body = r["body"].get("sendInstantMessage", {}) if isinstance(r["body"], dict) else {}
            ids.append(body.get("parentMessageId"))
        res.duplicates = len(ids) - len(set(ids))
        if requests:
            stamps = sorted(parse_ts(r["received_at"]) for r in requests)
            res.burst_span_s = stamps[-1] - stamps[0]
        for _, entry in logs.snapshot():
            if re.match(r"rule daily-\d+ fired", entry.get("message", "")):
                res.fired_lags.append(parse_ts(entry["time"]) - due_real)
        if res.received < args.rules:
            res.problems.append(
                f"the sandbox received {res.received} of {args.rules} pushes within "
                f"{args.deadline:g} s of the due time"
            )

        # 2. memory, with the rules loaded and the burst sent
        sampler.sample()
        res.rss_after_kib = _status_kib(daemon.pid, ("VmRSS",)).get("VmRSS", 0)

        # 3. reloads: edit one file, wait for "reloaded in N ms"
        for n in range(args.reloads):
            path = paths[(n * 7919 + len(paths) // 2) % len(paths)]
            index = len(logs.snapshot())
            time.sleep(1.0)  # the watcher is between polls, as it would be for a person
            text = path.read_text().replace(
                "description: Generated", f"description: Edited ({n + 1})", 1
            )
            with path.open("w") as f:
                f.write(text)
            written = time.time()
            line = logs.wait_for(r"^reloaded in [\d.]+ ms", index, timeout=30)
            if line is None:
                res.problems.append(f"no 'reloaded in' log line within 30 s of edit {n + 1}")
                break
            message = line[1]["message"]
            if path.stem not in message:
                res.problems.append(
                    f"reload {n + 1} did not reschedule {path.stem}: {message[:200]}"
                )
            res.reload_ms.append(float(re.match(r"reloaded in ([\d.]+) ms", message).group(1)))
            res.reload_e2e_s.append(parse_ts(line[1]["time"]) - written)
        return res
    finally:
        if sampler is not None:
            sampler.stop()
            res.main_hwm_kib = sampler.main_hwm
            res.child_hwm_kib = sampler.child_hwm
            res.children = len(sampler.children_seen)
            res.sum_rss_kib = sampler.sum_rss
            res.sum_pss_kib = sampler.sum_pss
        if daemon is not None:
            code = stop_process(daemon)
            if code != 0 and not res.problems:
                res.problems.append(f"the daemon exited {code} on SIGTERM (see daemon.log)")
        sandbox.stop()


def report(res: Results, args: argparse.Namespace) -> None:
    goal = targets_for(res.rules)

    def ok(value: float, target: float) -> str:
        if math.isnan(value) or math.isinf(target):
            return "n/a" if math.isnan(value) else ""
        return "yes" if value < target else "MISSED"

    def under(target: float, unit: str, scale: float = 1) -> str:
        return "" if math.isinf(target) else f"< {target * scale:g} {unit}"

    rows: list[tuple[str, str, str, str]] = []
    rows.append(
        (
            "startup: launch -> /healthz 200",
            f"{res.startup_s:.2f} s",
            under(goal.startup_s, "s"),
            ok(res.startup_s, goal.startup_s),
        )
    )
    rows.append(("  CPU meanwhile, daemon + load workers", f"{res.startup_cpu_s:.2f} s", "", ""))
    rows.append(("startup: launch -> leading (log)", f"{res.leading_s:.2f} s", "", ""))
    if res.lags:
        p50, p99, top = (percentile(res.lags, q) for q in (50, 99, 100))
        rows.append((f"lag p50 ({res.received} pushes)", f"{p50:.3f} s", "", ""))
        rows.append(("lag p99", f"{p99:.3f} s", under(goal.p99_s, "s"), ok(p99, goal.p99_s)))
        rows.append(("lag max", f"{top:.3f} s", "", ""))
        rows.append(("  first -> last push received", f"{res.burst_span_s:.3f} s", "", ""))
    if res.burst_cpu:
        cpu = res.burst_cpu
        rows.append(
            (
                f"  CPU in those {res.burst_wall_s:.1f} s: daemon/sandbox",
                f"{cpu['daemon']:.2f}/{cpu['sandbox']:.2f} s",
                "",
                "",
            )
        )
        rows.append(
            (f"  whole machine busy, cores of {os.cpu_count()}", f"{cpu['machine']:.2f}", "", "")
        )
    if res.fired_lags:
        f50, f99, fmax = (percentile(res.fired_lags, q) for q in (50, 99, 100))
        rows.append(("  'fired' logged, p50/p99/max", f"{f50:.3f}/{f99:.3f}/{fmax:.3f} s", "", ""))
    hwm = res.main_hwm_kib / 1024
    rows.append(
        (
            "peak RSS, daemon (VmHWM), whole run",
            f"{hwm:.0f} MB",
            under(goal.rss_mb, "MB"),
            ok(hwm, goal.rss_mb),
        )
    )
    rows.append(
        ("  through startup (rules loaded)", f"{res.startup_hwm_kib / 1024:.0f} MB", "", "")
    )
    if res.children:
        rows.append(
            (
                f"  load workers ({res.children}), peak each",
                f"{res.child_hwm_kib / 1024:.0f} MB",
                "",
                "",
            )
        )
        rows.append(
            (
                "  largest sum, all: RSS / PSS",
                f"{res.sum_rss_kib / 1024:.0f} / {res.sum_pss_kib / 1024:.0f} MB",
                "",
                "",
            )
        )
    rows.append(("  RSS after the burst", f"{res.rss_after_kib / 1024:.0f} MB", "", ""))
    if res.reload_ms:
        med = statistics.median(res.reload_ms) / 1000
        each = "/".join(f"{v:.0f}" for v in res.reload_ms)
        rows.append(
            (
                f"reload, daemon's figure (median of {len(res.reload_ms)})",
                f"{med * 1000:.0f} ms",
                under(goal.reload_s, "ms", 1000),
                ok(med, goal.reload_s),
            )
        )
        rows.append(("  each (ms)", each, "", ""))
        e2e = statistics.median(res.reload_e2e_s)
        rows.append(
            ("reload, write -> log line (median)", f"{e2e:.3f} s", "(0.5-0.8 s poll+debounce)", "")
        )

    print()
    print(
        f"pushrules run, {res.rules} cron rules due in one minute, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}; engine at {engine_version()}"
    )
    print(
        f"clock offset read back {res.offset_s:+.4f} s, +/- {res.offset_error_s * 1000:.1f} ms "
        f"(the launch instant would have overstated every lag by {res.launch_bias_s:.3f} s)"
    )
    print_table(("figure", "value", "target", "met"), rows, left={0, 2})
    if res.duplicates or res.bad_answers:
        print(
            f"note: {res.duplicates} duplicate pushes, {res.bad_answers} not answered returnCode 0"
        )
    missed = []
    if res.startup_s >= goal.startup_s:
        missed.append("startup")
    if res.lags and percentile(res.lags, 99) >= goal.p99_s:
        missed.append("p99 lag")
    if res.main_hwm_kib / 1024 >= goal.rss_mb:
        missed.append("peak RSS")
    if res.reload_ms and statistics.median(res.reload_ms) / 1000 >= goal.reload_s:
        missed.append("reload time")
    if res.problems:
        print("targets: not judged, the run failed (below)")
    else:
        print("targets: " + (f"MISSED: {', '.join(missed)}" if missed else "all met"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="cron rule files to generate")
    parser.add_argument(
        "--lead", type=float, default=20, help="seconds from the clock's start to the due minute"
    )
    parser.add_argument(
        "--deadline", type=float, default=60, help="seconds after the due time to wait for pushes"
    )
    parser.add_argument(
        "--reloads", type=int, default=3, help="edits to time (the median is shown)"
    )
    parser.add_argument("--probes", type=int, default=3, help="clock probes (the best is used)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    parser.add_argument(
        "--fire-ahead",
        metavar="DURATION",
        help="the project's daemon.fire_ahead (default: the daemon's, 5s; none: each fire "
        "decided at its time, to compare)",
    )
    args = parser.parse_args()
    os.environ.pop("PUSHRULES_CLOCK", None)

    with project_root(args.keep) as root:
        res = run(args, root)
        report(res, args)
        if res.problems:
            for problem in res.problems:
                print(f"run failed: {problem}", file=sys.stderr)
            if args.keep:
                print(
                    f"the project, daemon.log and the sandbox's record are in {root}",
                    file=sys.stderr,
                )
            return 1
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
