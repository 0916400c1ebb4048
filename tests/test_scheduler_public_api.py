"""The scheduler uses APScheduler through its public API, and still coalesces late runs itself."""

from __future__ import annotations

import ast
import asyncio
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.daemon.clock import Clock
from engine.daemon.scheduler import Scheduler
from tests.test_scheduler import MemoryMarks, Recorder, make_rule

SOURCE = Path(__file__).resolve().parent.parent / "engine" / "daemon" / "scheduler.py"
#: Private names of APScheduler 3.11's executors and schedulers a patch release may change.
PRIVATE = {"_do_submit_job", "_run_job_success", "_run_job_error", "_eventloop", "_instances"}


def apscheduler_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("apscheduler"):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def test_no_private_apscheduler_method_is_overridden_or_used() -> None:
    tree = ast.parse(SOURCE.read_text())
    imported = apscheduler_names(tree)
    overrides = [
        f"{node.name}.{item.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(isinstance(base, ast.Name) and base.id in imported for base in node.bases)
        for item in node.body
        if isinstance(item, ast.FunctionDef)
        and item.name.startswith("_")
        and not item.name.startswith("__")
    ]
    assert overrides == [], f"private APScheduler methods overridden: {overrides}"
    used = sorted(
        {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in PRIVATE}
        | {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in PRIVATE}
    )
    assert used == [], f"private APScheduler names used: {used}"


def test_a_run_woken_late_sends_the_newest_fire_and_logs_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The loop is blocked across two fires of an every-1s rule: the run that follows takes
    every fire due since from the schedule, sends the newest and logs the others as skipped."""

    unblocked: list[datetime] = []

    async def scenario() -> Recorder:
        rec = Recorder()
        sched = Scheduler(Clock(), MemoryMarks(), rec.on_fire, rec.on_poll)
        await sched.start()
        try:
            sched.apply({"tick": make_rule("tick", {"every": "1s"})})
            await sched.catch_up({})
            await rec.wait_fires(1)
            time.sleep(2.6)  # the loop is blocked: APScheduler wakes up late, once
            unblocked.append(datetime.now(UTC))
            await rec.wait_fires(2)
        finally:
            await sched.shutdown()
        return rec

    with caplog.at_level(logging.WARNING, logger="pushrules.scheduler"):
        rec = asyncio.run(scenario())
    first, second = rec.fires[0][1], rec.fires[1][1]
    # The newest fire due when the run ran: not one older than the loop's unblocking (those
    # were skipped), and not one still to come on the clock when the run called back.
    newest = unblocked[0].replace(microsecond=0)
    assert newest <= second <= rec.clock_times[1], (rec.fires, unblocked, rec.clock_times)
    between = int((second - first).total_seconds()) - 1
    assert between >= 1
    skipped = [
        r.getMessage()
        for r in caplog.records
        if "skipped (the scheduler ran late)" in r.getMessage()
        and f"coalesced: the later fire due at {second.isoformat()}" in r.getMessage()
    ]
    assert len(skipped) == between, skipped
