"""Hot reload triggers: each kind of change gives exactly one debounced call, within a second.

The watchers here poll every 50 ms and wait 100 ms of quiet (the daemon's defaults are 500 ms
and 300 ms, ``daemon.watch_every`` and ``watch_quiet``): a call is due about 0.15 s after a
change, so the one-second bound is a deadline, and waiting 0.4 s more shows a second call.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.daemon.watcher import (
    Debounce,
    Watcher,
    deep_fingerprint,
    fingerprint,
    fingerprint_digest,
)
from engine.rules.loader import Loader
from tests.helpers import make_project, write_rule

RULE = """\
description: {description}
trigger:
  event: app.hello
apps:
  news-ios: {{parentMessageId: "1"}}
message:
  subject: Hello
  text: You are receiving a message
targets:
  - language: en
"""
#: The settings of these watchers unless a test gives its own.
FAST: dict[str, float | None] = {"poll_every": 0.05, "debounce": 0.1}
#: A deadline for the first call: a poll up to 0.05 s after the change, 0.1 s of quiet.
WITHIN = 1.0
#: After the first call, long enough for a second one to show if there were one.
QUIET = 0.4


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = make_project(tmp_path / "project")
    write_rule(root, "hello", RULE.format(description="first"))
    return root


async def watching(
    root: Path,
    change: Callable[[], object] | None,
    *,
    expect: int = 1,
    within: float = WITHIN,
    quiet: float = QUIET,
    on_change: Callable[[], object] | None = None,
    **settings: float | None,
) -> list[float]:
    """Run a watcher, make ``change`` once it watches, return each call's delay after it."""
    calls: list[float] = []

    async def changed() -> None:
        calls.append(time.monotonic() - start)
        if on_change is not None:
            await asyncio.to_thread(on_change)

    watcher = Watcher(root, changed, **{**FAST, **settings})  # type: ignore[arg-type]
    watcher.prime()
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.sleep(0.05)
    start = time.monotonic()
    if change is not None:
        await asyncio.to_thread(change)  # off the loop, so a slow burst does not stall it
    deadline = start + within + 0.5
    while len(calls) < expect and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(quiet)
    stop.set()
    await asyncio.wait_for(task, 2)
    return calls


def watch(root: Path, change: Callable[[], object] | None, **kwargs: Any) -> list[float]:
    return asyncio.run(watching(root, change, **kwargs))


def once_within(calls: list[float], limit: float = WITHIN) -> None:
    assert len(calls) == 1, f"expected one call, got {len(calls)} at {calls}"
    assert calls[0] < limit, f"the call came after {calls[0]:.2f} s"


# --- each kind of change ---------------------------------------------------------------------


def edit(path: Path, text: str) -> Callable[[], None]:
    return lambda: path.write_text(text)


CHANGES: dict[str, Callable[[Path], Callable[[], object]]] = {
    "edit a rule": lambda r: edit(r / "rules/hello.yaml", RULE.format(description="second")),
    "add a rule": lambda r: edit(r / "rules/new.yaml", RULE.format(description="new")),
    "delete a rule": lambda r: (r / "rules/hello.yaml").unlink,
    "edit a template": lambda r: edit(r / "templates/buttons/yes-no.yaml", "buttons: []\n"),
    "add a template folder": lambda r: (r / "templates/extra").mkdir,
    "a name that is not yaml": lambda r: edit(r / "rules/NOTES.txt", "remember the milk"),
    "a hidden name": lambda r: edit(r / "rules/.keep", ""),
    "edit pushrules.yaml": lambda r: edit(
        r / "pushrules.yaml", (r / "pushrules.yaml").read_text() + "\n# touched\n"
    ),
    "rename a rule": lambda r: lambda: os.replace(r / "rules/hello.yaml", r / "rules/hi.yaml"),
}


def outside(root: Path) -> Callable[[], None]:
    def change() -> None:
        (root / "pushrules.db").write_bytes(b"outbox pages")
        (root / "README.md").write_text("notes")
        (root / "docs").mkdir()

    return change


def test_each_change_gives_one_call_within_a_second_and_no_change_none(tmp_path: Path) -> None:
    """One project per kind of change, all watched at once to keep the test short."""
    roots = {kind: make_project(tmp_path / str(i)) for i, kind in enumerate(CHANGES)}
    for root in roots.values():
        write_rule(root, "hello", RULE.format(description="first"))
    still, elsewhere = make_project(tmp_path / "still"), make_project(tmp_path / "elsewhere")

    async def go() -> list[list[float]]:
        return await asyncio.gather(
            *(watching(root, CHANGES[kind](root)) for kind, root in roots.items()),
            watching(still, None, expect=0, quiet=0.6),
            watching(elsewhere, outside(elsewhere), expect=0, quiet=0.6),
        )

    *changed, none, unwatched = asyncio.run(go())
    for kind, calls in zip(roots, changed, strict=True):
        assert len(calls) == 1, f"{kind}: expected one call, got {len(calls)} at {calls}"
        assert calls[0] < WITHIN, f"{kind}: the call came after {calls[0]:.2f} s"
    assert none == [], "no change must give no call"
    assert unwatched == [], "a change outside rules/, templates/ and pushrules.yaml gives none"


def test_a_burst_of_changes_gives_one_call(project: Path) -> None:
    def burst() -> None:
        for i in range(8):
            write_rule(project, f"r{i}", RULE.format(description=f"rule {i}"))
            time.sleep(0.07)  # the burst (0.56 s) spans polls, so the debounce must hold it

    # 0.3 s of quiet (the default): well above the 70 ms gaps, even on a busy machine.
    once_within(watch(project, burst, debounce=0.3), WITHIN + 0.6)


# --- a Kubernetes ConfigMap --------------------------------------------------------------------


def configmap(folder: Path, files: dict[str, str], stamp: str) -> None:
    """Write ``files`` the way the kubelet does: a timestamped folder, ``..data`` pointing at
    it, each name a symlink through ``..data``; an update swaps ``..data`` atomically."""
    folder.mkdir(exist_ok=True)
    fresh = folder / f"..{stamp}"
    fresh.mkdir()
    for name, text in files.items():
        (fresh / name).write_text(text)
    old = folder / "..data"
    previous = os.readlink(old) if old.is_symlink() else None
    os.symlink(fresh.name, folder / "..data_tmp")
    os.replace(folder / "..data_tmp", old)
    for name in files:
        if not (folder / name).is_symlink():
            os.symlink(f"..data/{name}", folder / name)
    if previous is not None:
        shutil.rmtree(folder / previous)


def test_a_configmap_update_swapping_data_gives_one_call_and_the_new_rules(
    tmp_path: Path,
) -> None:
    root = make_project(tmp_path / "project")
    rules = root / "rules"
    rules.rmdir()
    configmap(rules, {"hello.yaml": RULE.format(description="first")}, "2026_01_01_00_00_00.1")
    loader = Loader(root, workers=1)
    assert loader.load().rules["hello"].description == "first"
    seen: list[str] = []

    def swap() -> None:
        # Same size, so only the swap itself tells the versions apart.
        configmap(rules, {"hello.yaml": RULE.format(description="other")}, "2026_01_01_00_01_00.2")
        assert sorted(os.listdir(rules)) == ["..2026_01_01_00_01_00.2", "..data", "hello.yaml"]

    calls = watch(
        root, swap, on_change=lambda: seen.append(loader.load().rules["hello"].description)
    )
    once_within(calls)
    assert seen == ["other"]


# --- the safety net and the edges ------------------------------------------------------------


def invisible_edit(path: Path) -> Callable[[], None]:
    """Same size, same inode, mtime put back: what a copy keeping timestamps can do."""

    def change() -> None:
        before = path.stat()
        text = path.read_text()
        with path.open("r+") as handle:
            handle.write(text.replace("first", "FIRST"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    return change


def test_the_cheap_fingerprint_cannot_see_an_invisible_edit_the_deep_one_can(
    project: Path,
) -> None:
    path = project / "rules/hello.yaml"
    cheap, deep = deep_fingerprint(project)
    invisible_edit(path)()
    assert "FIRST" in path.read_text()
    assert fingerprint_digest(project) == cheap
    fresh_cheap, fresh_deep = deep_fingerprint(project)
    assert (fresh_cheap, fresh_deep != deep) == (cheap, True)


def test_the_rescan_catches_what_the_poll_missed(project: Path) -> None:
    calls = watch(
        project,
        invisible_edit(project / "rules/hello.yaml"),
        poll_every=0.1,
        rescan_every=0.6,
        debounce=0.1,
        quiet=0.5,
    )
    # Polls every 0.1 s saw nothing; the re-scan at 0.6 s did, then 0.1 s of quiet.
    once_within(calls)
    assert calls[0] > 0.5


def test_a_call_after_a_change_only_the_rescan_saw_asks_to_read_every_file(
    project: Path,
) -> None:
    """The loader skips files whose ``stat`` is unchanged, so after an edit only the content
    re-scan saw, ``rehash`` tells it to read them all; after an edit the poll saw, not."""
    path = project / "rules/hello.yaml"

    async def go() -> list[bool]:
        flags: list[bool] = []

        async def changed() -> None:
            flags.append(watcher.rehash)

        watcher = Watcher(project, changed, poll_every=0.05, rescan_every=0.8, debounce=0.1)
        watcher.prime()
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        for change, calls in ((invisible_edit(path), 1), (edit(path, "second"), 2)):
            await asyncio.to_thread(change)
            deadline = time.monotonic() + 2
            while len(flags) < calls and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 2)
        return flags

    # The second edit comes right after the first call, the re-scan before it: the poll
    # sees it well before the next re-scan.
    assert asyncio.run(go()) == [True, False]


def test_with_polling_off_the_rescan_alone_finds_changes(project: Path) -> None:
    calls = watch(
        project,
        CHANGES["add a rule"](project),
        poll_every=None,
        rescan_every=0.4,
        debounce=0.1,
        quiet=0.5,
    )
    once_within(calls)


def test_a_change_during_on_change_is_not_lost(project: Path) -> None:
    state = {"n": 0}

    def reload() -> None:
        state["n"] += 1
        if state["n"] == 1:  # someone saves again while the first reload runs
            write_rule(project, "during", RULE.format(description="during"))
            time.sleep(0.3)

    calls = watch(
        project,
        CHANGES["add a rule"](project),
        expect=2,
        on_change=reload,
        poll_every=0.1,
        debounce=0.1,
        quiet=0.3,
    )
    assert len(calls) == 2
    assert calls[1] - calls[0] < 0.8


def test_a_failing_on_change_does_not_stop_the_watcher(project: Path) -> None:
    def failing() -> None:
        raise RuntimeError("reload blew up")

    def two_changes() -> None:
        (project / "rules/a.txt").write_text("1")
        time.sleep(0.4)
        (project / "rules/b.txt").write_text("2")

    calls = watch(
        project,
        two_changes,
        expect=2,
        on_change=failing,
        poll_every=0.05,
        debounce=0.1,
        quiet=0.2,
    )
    assert len(calls) == 2


def test_a_file_changing_without_end_still_reloads_after_max_delay(project: Path) -> None:
    path = project / "rules/growing.log"

    def keep_writing() -> None:
        for i in range(25):
            path.write_text("x" * i)
            time.sleep(0.04)

    calls = watch(
        project,
        keep_writing,
        expect=2,
        poll_every=0.05,
        debounce=0.2,
        max_delay=0.4,
        quiet=0.4,
    )
    # 1 s of writes every 40 ms never leave 0.2 s of quiet; max_delay cuts in every ~0.4 s.
    assert len(calls) >= 2
    assert calls[0] < 0.6


def test_a_symlink_loop_is_walked_once(project: Path) -> None:
    os.symlink("..", project / "rules/up")
    os.symlink("loop", project / "templates/loop")
    names = [entry[0] for entry in fingerprint(project)]
    assert "rules/up" in names
    assert len(names) == len(set(names)) < 50


def test_stop_ends_run_promptly(project: Path) -> None:
    async def go() -> float:
        watcher = Watcher(project, asyncio.sleep, rescan_every=30.0)  # type: ignore[arg-type]
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 1)
        return time.monotonic() - started

    assert asyncio.run(go()) < 0.1


def test_debounce_waits_for_quiet_but_not_forever() -> None:
    burst = Debounce(quiet=0.3, max_delay=2.0)
    assert burst.confirm_at() == float("inf")
    assert not burst.observe(1.0, changed=False)  # nothing happened
    assert not burst.observe(1.0, changed=True)
    assert burst.confirm_at() == 1.3
    assert not burst.observe(1.2, changed=False)  # not quiet long enough yet
    assert not burst.observe(1.3, changed=True)  # still changing: wait again
    assert burst.observe(1.6, changed=False)  # 0.3 s of quiet
    burst.reset()
    assert not any(burst.observe(t / 10, changed=True) for t in range(10, 30))
    assert burst.observe(3.0, changed=True)  # changing for 2 s: go anyway


def test_settings_are_checked(project: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        Watcher(project, asyncio.sleep, debounce=0)  # type: ignore[arg-type]
