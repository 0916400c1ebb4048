"""Daemon processes forked from one interpreter that has already imported the daemon.

Each test daemon is a real process of its own (its pid, signals, exit code, its log file), but
instead of a new interpreter importing the daemon's code for 0.5-0.8 s of CPU, it is forked
from a multiprocessing fork server started once per test worker with that code preloaded
(``multiprocessing``'s forkserver: no thread of the test process is ever forked). The child
runs the ``pushrules`` program, :func:`engine.cli.main.main`, as ``python -m engine`` would,
with its own environment, folder and output. ``PUSHRULES_TEST_EXEC=1`` starts every daemon as
a new interpreter instead (``python -m engine run``), and some tests always do, so that path
stays tested.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from multiprocessing.context import ForkServerContext
from pathlib import Path

#: Imported by the fork server before it forks anything: the daemon and what it imports later.
PRELOAD = [
    "engine.cli.main",
    "engine.cli.daemon",
    "engine.daemon.process",
    "engine.send.transport",
    "tests.zygote",
]

_context: ForkServerContext | None = None


def exec_only() -> bool:
    return os.environ.get("PUSHRULES_TEST_EXEC", "") not in {"", "0"}


def _server() -> ForkServerContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _context = context
    return _context


def _child(argv: Sequence[str], env: Mapping[str, str], cwd: str, log: str) -> None:
    """In the forked process: the environment, folder and output of a new ``pushrules``."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.argv = ["pushrules", *argv]
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    from engine.cli.main import main

    raise SystemExit(main(list(argv)))


class Forked:
    """What the tests use of :class:`subprocess.Popen`, for a forked daemon."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self._process = _server().Process(
            target=_child, args=(list(argv), dict(env), str(cwd), str(log)), daemon=False
        )
        self._process.start()
        self.pid: int = self._process.pid or 0
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._process.is_alive():
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired(["pushrules"], timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
