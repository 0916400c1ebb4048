"""What the benchmarks share: the folder of the generated project, printing a table of figures,
starting the sandbox and the daemon, a scratch PostgreSQL schema.

httpx and SQLAlchemy are imported where they are used: a child process inherits this one's
memory until it execs, and the validate benchmark reads its children's peak (``ru_maxrss``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the scripts run as python benchmarks/X.py
    sys.path.insert(0, str(REPO))
#: Where the generated projects' pushrules.yaml reads the credentials the daemon is given.
LOGIN_VAR, PASSWORD_VAR = "BENCH_ACCENGAGE_LOGIN", "BENCH_ACCENGAGE_PASSWORD"


@contextlib.contextmanager
def project_root(keep: Path | None, prefix: str = "pushrules-bench-") -> Iterator[Path]:
    """The folder to generate the project in: ``--keep DIR``, left for a look afterwards
    (absolute, as the commands run from the repository), else a temporary one, removed."""
    if keep:
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: set[int]) -> None:
    """Columns in ``left`` are aligned left, the others (figures) right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (
            value.ljust(width) if i in left else value.rjust(width)
            for i, (value, width) in enumerate(zip(row, widths, strict=True))
        )
        print("  ".join(cells).rstrip())


def start_sandbox(*options: str) -> tuple[subprocess.Popen[str], str]:
    """`pushrules sandbox` in a process of its own (so it does not share the measured process's
    interpreter) on a free loopback port; returns the process and the URL to POST to."""
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "sandbox", "--port", "0", *options],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # "pushrules sandbox: POST http://..."
    if "POST " not in line:
        process.kill()
        raise RuntimeError(f"the sandbox did not start: {line!r}")
    return process, line.split("POST ", 1)[1].strip()


def stop_process(process: subprocess.Popen[Any], wait: float = 30) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class LogReader:
    """Collects the daemon's JSON log lines (stderr) with their arrival time; keeps a copy."""

    stream: Any
    copy: Path
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with self.copy.open("w") as out:
            for raw in self.stream:
                arrived = time.time()
                out.write(raw)
                try:
                    entry = json.loads(raw)
                except ValueError:
                    entry = {"message": raw.rstrip("\n"), "level": "raw"}
                with self.lock:
                    self.lines.append((arrived, entry))
                    self.lock.notify_all()

    def wait_for(
        self, pattern: str, start: int, timeout: float
    ) -> tuple[int, dict[str, Any]] | None:
        """The first line from index ``start`` whose message matches, within ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self.lock:
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index][1].get("message", "")):
                        return index, self.lines[index][1]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)

    def snapshot(self) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return list(self.lines)


def wait_ready(url: str, process: subprocess.Popen[Any], timeout: float) -> float | None:
    """Real time at which /healthz first answered 200, or None."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return None
            try:
                if client.get(url).status_code == 200:
                    return time.time()
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    return None


@dataclass
class Daemon:
    """``pushrules run`` on a generated project, in a process of its own, with the credentials
    its pushrules.yaml reads; its JSON log is collected and copied to ``daemon.log`` there."""

    process: subprocess.Popen[str]
    logs: LogReader
    launched: float  # real time just before the launch

    @classmethod
    def launch(cls, root: Path, clock: str | None = None) -> Daemon:
        """``clock``: the daemon's ``PUSHRULES_CLOCK``; none, it runs on real time."""
        env = {
            **os.environ,
            LOGIN_VAR: "bench@example.com",
            PASSWORD_VAR: "bench-password",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("PUSHRULES_CLOCK", None)
        if clock is not None:
            env["PUSHRULES_CLOCK"] = clock
        cmd = [sys.executable, "-m", "engine", "run", "--project", str(root)]
        cmd += ["--log-format", "json"]
        launched = time.time()
        process = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        logs = LogReader(process.stderr, root / "daemon.log")
        logs.start()
        return cls(process, logs, launched)

    def ready(self, listen: str, timeout: float) -> float | None:
        """Seconds from the launch to ``/healthz`` first answering 200; None if it never did."""
        at = wait_ready(f"http://{listen}/healthz", self.process, timeout)
        return None if at is None else at - self.launched


class ScratchSchema:
    """On PostgreSQL, a schema of its own, dropped afterwards: the benchmark leaves no tables."""

    def __init__(self, base_url: str) -> None:
        from sqlalchemy import make_url

        self.base_url = base_url
        self.name = f"pushrules_bench_{secrets.token_hex(4)}"
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={self.name}"})
        self.url = url.render_as_string(hide_password=False)
        self._admin(f'CREATE SCHEMA "{self.name}"')

    @classmethod
    def for_url(cls, url: str) -> ScratchSchema | None:
        from sqlalchemy import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() != "postgresql" or "options" in parsed.query:
            return None
        return cls(url)

    def _admin(self, sql: str) -> None:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.base_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def drop(self) -> None:
        self._admin(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
