"""How fast `pushrules plan` compares a large project with its last commit.

Generates N rule files (the validate benchmark's, with templates and buttons) in a new git
repository, commits them, changes the working tree, then runs `pushrules plan DIR --format json
--base HEAD` as a fresh process (what CI runs) and reports the median wall time of each case:

- one rule changed: the old revision's other files are the working tree's, checked once;
- one template changed: every rule depends on it, so both versions are checked in full;
- and, for scale, `pushrules validate DIR` (one version, checked once), run in turn with the
  first case so that both meet the same load of the machine.

CPU is the process's and its workers' (user and system), less sensitive to other load.

    python benchmarks/plan.py [--rules 1000] [--runs 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, print_table, project_root  # scripts run as python benchmarks/X.py
from validate import generate


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall and CPU seconds (its own and its workers') of one fresh process; its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, done.stdout


def medians(runs: list[tuple[float, float, str]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", type=int, default=1000, help="rule files to generate")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (the median counts)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    args = parser.parse_args()

    with project_root(args.keep) as root:
        paths = generate(root, args.rules)
        git(root, "init", "-q", "-b", "main")
        git(root, "config", "user.name", "Benchmark")
        git(root, "config", "user.email", "benchmark@example.com")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "generated rules")
        plan = [sys.executable, "-m", "engine", "plan", str(root), "--format", "json"]
        plan += ["--base", "HEAD"]
        validate = [sys.executable, "-m", "engine", "validate", str(root), "--format", "json"]

        rule = paths[len(paths) // 2]
        rule.write_text(rule.read_text().replace("Generated rule", "Edited rule"))
        # In turn with validate, so both meet the same load of the machine.
        plans, validates = [], []
        for _ in range(args.runs):
            plans.append(run(plan))
            validates.append(run(validate))
        changed = json.loads(plans[-1][2])["changed"]
        assert [c["rule"] for c in changed] == [rule.stem], changed
        git(root, "checkout", "-q", "--", ".")

        template = root / "templates/messages/flight-canceled.yaml"
        template.write_text(template.read_text().replace("test.wav", "alert.wav"))
        templates = [run(plan) for _ in range(args.runs)]
        using = len(json.loads(templates[-1][2])["changed"])
        git(root, "checkout", "-q", "--", ".")

    print(f"pushrules plan, {args.rules} rule files, {os.cpu_count()} cores, median of {args.runs}")
    rows = []
    for name, runs, count in (
        ("plan, one rule changed", plans, "1"),
        ("plan, one template changed", templates, f"{using:,}"),
        ("validate, in turn with the first", validates, ""),
    ):
        wall, cpu = medians(runs)
        rows.append((name, f"{wall:.2f} s", f"{cpu:.2f} s", count))
    print_table(("case", "wall", "cpu", "rules changed"), rows, left={0})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
