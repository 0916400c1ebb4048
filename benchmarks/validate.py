"""How fast `pushrules validate` checks a large project, against the floor of parsing its YAML.

Generates N realistic rule files (event, cron, interval and poll triggers; one or two apps;
message and button templates; several targets, some dynamic; Jinja and macros), then measures:

- cold: `pushrules validate DIR` as a fresh process, wall time, CPU time (the process and its
  workers) and peak memory (the largest resident set among the process and its workers, and
  their sum);
- the libyaml floor: `yaml.compose` with the C loader over the same files, in this process
  (wall and CPU, the best of three), and the ratio of the cold run to it, both ways;
- one file: `pushrules validate DIR/rules/rule-0500.yaml`, what a pre-commit hook runs on a
  commit touching one rule of the project;
- re-validate: a loaded project, one file changed, loaded again in the same process.

On a shared machine, wall times move with the other work; CPU times move less.

    python benchmarks/validate.py [--rules 1000] [--runs 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from common import (
    REPO,
    project_root,  # scripts run as python benchmarks/X.py
)

from engine.rules.loader import Loader

APPS = ["flights-ios", "flights-android", "news-ios", "news-android"]
EVENTS = [
    "flight.canceled",
    "flight.delayed",
    "booking.confirmed",
    "cart.abandoned",
    "gate.changed",
]
CRONS = ["0 9 * * MON", "30 18 * * 1-5", "*/30 8-20 * * *", "0 7 1 * *", "@daily"]


def rule_text(i: int, rnd: random.Random) -> str:
    kind = rnd.choice(["event", "event", "cron", "every", "poll"])
    if kind == "event":
        trigger = f"trigger:\n  event: {rnd.choice(EVENTS)}\n"
    elif kind == "cron":
        trigger = f'trigger:\n  cron: "{rnd.choice(CRONS)}"\n  timezone: Europe/Paris\n'
    elif kind == "every":
        trigger = f"trigger:\n  every: {rnd.choice(['5m', '15m', '1h', '6h'])}\n"
    else:
        trigger = (
            "trigger:\n  poll:\n    url: http://127.0.0.1:8751/feeds/offers.json\n"
            f"    every: {rnd.choice(['1m', '5m'])}\n    items: offers\n"
            '    key: "{{ item.id }}"\n'
        )
    ios = rnd.choice(["flights-ios", "news-ios"])
    android = rnd.choice(["flights-android", "news-android"])
    two_apps = rnd.random() < 0.4
    apps = f'apps:\n  {ios}: {{parentMessageId: "{i}"}}\n'
    if two_apps:
        apps += f"  {android}:\n    parentMessageExternalId: ext-{i}\n"
        apps += '    message: {bigPicture: promo.png, customizedTitle: "Offer {{ rule.id }}"}\n'
    ctx = "item" if kind == "poll" else "event"
    if rnd.random() < 0.5:
        message = (
            "message:\n  use: flight-canceled\n"
            f"  subject: \"Update {i}: {{{{ {ctx}.title | default('news') }}}}\"\n"
        )
    else:
        message = (
            "message:\n"
            f"  subject: \"Rule {i} for {{{{ {ctx}.name | default('you') }}}}\"\n"
            f"  text: \"Hi ${{first_name}}, offer {i} ends {{{{ now.strftime('%d/%m') }}}}\"\n"
            "  sound: default\n"
            f"  customParams: {{campaign: c{i}, source: pushrules}}\n"
            f"  data: {{code: \"{{{{ {ctx}.code | default('X{i}') }}}}\"}}\n"
        )
    message += "  interactiveButtons:\n"
    if rnd.random() < 0.5:
        message += "    use: yes-no\n"
    else:
        message += (
            "    template: accept_decline_category\n    buttons:\n"
            f"      - {{id: 1, action: browser, url: 'https://example.com/a/{i}'}}\n"
            "      - {id: 2, action: close}\n"
        )
    targets = "targets:\n"
    for t in range(rnd.randint(2, 5)):
        targets += (
            f"  - language: {rnd.choice(['en', 'fr'])}\n"
            f'    opencount: {{operator: ">", value: "{t}"}}\n'
            f"    data: {{first_name: Friend{t}}}\n"
        )
    if ctx == "event" and rnd.random() < 0.3:
        targets += (
            '  - for_each: "{{ event.passengers }}"\n    as: p\n    target:\n'
            '      memberId: "{{ p.id }}"\n      data: {first_name: "{{ p.name }}"}\n'
        )
    when = f'when: "{{{{ {ctx}.score is not defined or {ctx}.score > {i % 50} }}}}"\n'
    return (
        f"description: Generated rule {i} for the validate benchmark\n"
        + trigger
        + when
        + apps
        + message
        + targets
    )


def generate(root: Path, count: int, seed: int = 7) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "pushrules.yaml", root / "pushrules.yaml")
    shutil.copytree(REPO / "templates", root / "templates", dirs_exist_ok=True)
    rules = root / "rules"
    rules.mkdir(exist_ok=True)
    rnd = random.Random(seed)
    paths = []
    for i in range(count):
        path = rules / f"rule-{i:04d}.yaml"
        path.write_text(rule_text(i, rnd))
        paths.append(path)
    return paths


def _tree_rss_kib(pid: int) -> tuple[int, int]:
    """Current RSS (KiB) of a process and its children: (largest, sum)."""
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    sizes = []
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]))
        except OSError:
            continue
    return (max(sizes, default=0), sum(sizes))


@dataclass
class Cold:
    wall: float  # seconds
    cpu: float  # seconds of user + system time, the process and its workers
    code: int
    peak_one: int  # KiB, the largest process
    peak_sum: int  # KiB, the process and its workers together


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cold_run(target: Path) -> Cold:
    """``pushrules validate TARGET`` (a folder or a file) as a fresh process."""
    cmd = [sys.executable, "-m", "engine", "validate", str(target), "--format", "json"]
    peak_one = peak_sum = 0
    cpu_before = children_cpu()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_one, peak_sum
        while not done.is_set():
            one, total = _tree_rss_kib(proc.pid)
            peak_one, peak_sum = max(peak_one, one), max(peak_sum, total)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    cpu = children_cpu() - cpu_before
    done.set()
    sampler.join()
    # The kernel's own peak of the main process, exact where sampling may miss a spike.
    peak_main = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return Cold(wall, cpu, code, max(peak_one, peak_main), max(peak_sum, peak_main))


def libyaml_floor(paths: list[Path]) -> tuple[float, float]:
    """Wall and CPU seconds of composing every file with libyaml, the best of three."""
    texts = [p.read_text() for p in paths]
    walls, cpus = [], []
    for _ in range(3):
        start, cpu = time.perf_counter(), time.process_time()
        for text in texts:
            yaml.compose(text, Loader=yaml.CSafeLoader)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def revalidate(root: Path, paths: list[Path]) -> tuple[float, float]:
    loader = Loader(root)
    start = time.perf_counter()
    first = loader.load()
    full = time.perf_counter() - start
    assert first.ok, first.problems[:3]
    target = paths[len(paths) // 2]
    target.write_text(target.read_text().replace("Generated rule", "Edited rule"))
    start = time.perf_counter()
    second = loader.load()
    again = time.perf_counter() - start
    assert second.ok
    return full, again


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="rule files to generate")
    parser.add_argument("--runs", type=int, default=5, help="cold runs (the median is reported)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    args = parser.parse_args()

    with project_root(args.keep) as root:
        paths = generate(root, args.rules)
        # Taken in turn, so each whole run and its floor see the same machine.
        cold, floors, ones = [], [], []
        for _ in range(args.runs):
            cold.append(cold_run(root))
            floors.append(libyaml_floor(paths))
            ones.append(cold_run(paths[len(paths) // 2]))
        if any(run.code != 0 for run in cold + ones):
            print(
                "validate failed on the generated rules; run with --keep to look", file=sys.stderr
            )
            return 1
        full, again = revalidate(root, paths)

    wall = statistics.median(r.wall for r in cold)
    cpu = statistics.median(r.cpu for r in cold)
    floor_wall = statistics.median(f[0] for f in floors)
    floor_cpu = statistics.median(f[1] for f in floors)
    ratios = sorted(r.wall / f[0] for r, f in zip(cold, floors, strict=True))
    peak_one = max(r.peak_one for r in cold) / 1024
    peak_sum = max(r.peak_sum for r in cold) / 1024
    print(
        f"pushrules validate, {args.rules} rule files, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"  cold, one process (median of {args.runs}): {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(f"    each: {', '.join(f'{r.wall:.2f}/{r.cpu:.2f}' for r in cold)} s wall/CPU")
    print(f"  peak memory: {peak_one:.0f} MB largest process, {peak_sum:.0f} MB with workers")
    print(
        f"  libyaml compose floor (same files, median): {floor_wall:.3f} s wall, "
        f"{floor_cpu:.3f} s CPU"
    )
    print(
        f"  ratio to the floor: {wall / floor_wall:.1f}x wall (each run to its own floor: "
        f"{', '.join(f'{r:.1f}' for r in ratios)}), {cpu / floor_cpu:.1f}x CPU"
    )
    one_wall = statistics.median(r.wall for r in ones)
    one_cpu = statistics.median(r.cpu for r in ones)
    print(
        f"  one file of the project ({paths[len(paths) // 2].name}), median: "
        f"{one_wall:.2f} s wall, {one_cpu:.2f} s CPU"
    )
    print(
        f"  in-process load: {full:.2f} s; re-validate after one file changed: "
        f"{again * 1000:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
