"""A real ``pushrules run`` process for tests: its project on disk, its HTTP surface, its log.

The daemon is driven from outside, as an operator or a client would: files, signals, HTTP and
the store. Every wait polls a condition against a deadline and, when it gives up, fails with
the daemon's log attached, since that log is the first thing someone debugging CI needs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx

from engine.accengage.sandbox import RunningSandbox
from engine.outbox.store import OutboxRow, Store
from tests import zygote
from tests.helpers import REPO

T = TypeVar("T")

#: Variables the test project's pushrules.yaml reads its secrets from.
LOGIN_VAR, PASSWORD_VAR = "TEST_LOGIN", "TEST_PASSWORD"
#: Time for a daemon to answer /healthz after its process starts: about 1 s when the machine is
#: idle, several when other tests or programs keep both cores busy.
START_TIMEOUT = 30.0
#: Lines of the daemon's log attached to a failure.
LOG_TAIL = 80
#: Set by conftest for each test: whether it is marked ``e2e`` (None outside pytest).
E2E_ALLOWED: bool | None = None
#: The timing settings of every test daemon (pushrules.yaml's ``dispatch.poll_every`` and
#: ``daemon:``): what the daemon waits on happens in a tenth of the production time, so no test
#: sits out a default interval. A test may pass its own to :class:`Project`. ``lock_wait`` keeps
#: its 2 s: the daemon's own writes may wait on each other that long on a busy machine.
FAST_TIMING: dict[str, str] = {
    "dispatch.poll_every": "100ms",
    "daemon.watch_every": "100ms",
    "daemon.watch_quiet": "100ms",
    "daemon.watch_max_delay": "2s",
    "daemon.leadership_every": "500ms",
    "daemon.fire_retry": "200ms",
}


#: The one HTTP client of the tests' requests to daemons: ``httpx.get()`` builds a client, and
#: its TLS context, at each call (20 ms of processor time), and the tests poll /healthz several
#: times a second. No connection is kept: a daemon restarted on the same port would be handed
#: its predecessor's.
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def require_e2e() -> None:
    """Fails a test that starts a real daemon without the ``e2e`` marker: the marker is how
    ``-m "not e2e"`` gives a fast run and how the slow tests are found."""
    if E2E_ALLOWED is False:
        raise AssertionError(
            "this test starts a real daemon process: mark it @pytest.mark.e2e "
            "(or set pytestmark = pytest.mark.e2e in its module)"
        )


#: Ports handed out by free_port: each xdist worker has its own thousand, below the kernel's
#: ephemeral range (32768 and up on Linux), where the sandboxes' and the clients' ports come from.
#: A port the kernel picked and freed could be handed to two workers at once: one worker's
#: daemon then failed to bind while the other's answered its health checks.
_PORT_BASE = 20000
_next_port = itertools.count()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now and no other test worker hands out."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    base = _PORT_BASE + (int(worker) % 12 if worker.isdigit() else 0) * 1000
    for _ in range(1000):
        port = base + next(_next_port) % 1000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {base}-{base + 999}")


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    *,
    timeout: float = 10.0,
    every: float = 0.1,
    log: Callable[[], str] | None = None,
) -> T:
    """``probe()``'s first truthy answer; an AssertionError naming ``what`` past ``timeout``.

    Every 0.1 s: a probe opens a store or asks a daemon's /healthz (a few ms of processor
    time on both sides), which at 20 a second took a tenth of a core from the daemon waited on.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = f"\n--- daemon log ---\n{log()}" if log else ""
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}{tail}")
        time.sleep(every)


class Project:
    """A project folder: pushrules.yaml (sending to a sandbox), templates, rules, a store (a
    SQLite file unless ``store_url`` names another)."""

    def __init__(
        self,
        root: Path,
        sandbox_url: str,
        *,
        intake_token_var: str | None = None,
        timing: dict[str, str] | None = None,
        store_url: str | None = None,
    ):
        self.root = root
        self._store_url = store_url
        self.sandbox_url = sandbox_url
        self.port = free_port()
        self.intake_token_var = intake_token_var
        self.timing = {**FAST_TIMING, **(timing or {})}
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(REPO / "templates", root / "templates", dirs_exist_ok=True)
        (root / "rules").mkdir(exist_ok=True)
        self.write_config()

    @property
    def store_url(self) -> str:
        """The store given (a PostgreSQL schema), or a SQLite file in the project."""
        return self._store_url or f"sqlite:///{self.root / 'store.db'}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, *, intake_token_var: str | None = None) -> None:
        token_var = intake_token_var or self.intake_token_var
        token = f"intake_token: {{env: {token_var}}}\n" if token_var else ""
        text = f"""\
            accengage:
              url: {self.sandbox_url}
              login: {{env: {LOGIN_VAR}}}
              password: {{env: {PASSWORD_VAR}}}
            apps:
              app-ios: {{partner: partner_ios, platform: ios}}
            timezone: Europe/Paris
            store: {self.store_url}
            listen: 127.0.0.1:{self.port}
            """
        sections: dict[str, list[str]] = {}
        for setting, value in self.timing.items():
            section, key = setting.split(".")
            sections.setdefault(section, []).append(f"  {key}: {value}\n")
        timing = "".join(f"{s}:\n" + "".join(lines) for s, lines in sections.items())
        (self.root / "pushrules.yaml").write_text(textwrap.dedent(text) + token + timing)

    def rule(self, name: str, trigger: str, text: str, *, extra: str = "") -> Path:
        """A rule sending ``text`` (Jinja) to one member of the iOS app.

        ``trigger`` and ``extra`` (more rule-level keys) are YAML blocks, written unindented.
        """
        body = (
            "trigger:\n"
            + textwrap.indent(textwrap.dedent(trigger).strip(), "  ")
            + "\napps:\n"
            + '  app-ios: {parentMessageId: "1"}\n'
            + "message:\n"
            + "  subject: Test\n"
            + f"  text: {json.dumps(text)}\n"
            + "targets:\n"
            + '  - memberId: "765c8"\n'
            + textwrap.dedent(extra).strip()
            + "\n"
        )
        path = self.root / "rules" / f"{name}.yaml"
        path.write_text(body)
        return path

    @contextlib.contextmanager
    def store(self) -> Iterator[Store]:
        with Store(self.store_url) as store:
            yield store

    def rows(self, rule: str | None = None) -> list[OutboxRow]:
        with self.store() as store:
            return store.history(rule=rule, limit=100_000)

    def mark(self, rule: str) -> datetime | None:
        """How far the scheduler says it handled ``rule``'s fires (None before its first record)."""
        with self.store() as store:
            return store.get_mark("schedule", rule)


class Daemon:
    """``python -m engine run`` on a project; the log goes to a file beside the project."""

    def __init__(
        self,
        project: Project,
        *,
        clock: str | None = None,
        name: str = "daemon",
        new_interpreter: bool = False,
    ):
        """``new_interpreter``: started as ``python -m engine run``, not forked from the
        preloaded fork server (see tests/zygote.py)."""
        self.project = project
        self.clock = clock
        self.log_path = project.root.parent / f"{project.root.name}-{name}.log"
        self.new_interpreter = new_interpreter or zygote.exec_only()
        self.process: subprocess.Popen[bytes] | zygote.Forked | None = None
        self.started_at = 0.0  # time.time() just before the process started
        self.ready_at = 0.0  # time.time() when /healthz first answered

    def env(self, **extra: str) -> dict[str, str]:
        """The daemon's environment; every way of starting one asks for it."""
        require_e2e()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHRULES_")}
        env.update({LOGIN_VAR: "test-login", PASSWORD_VAR: "test-password", **extra})
        if self.clock:
            env["PUSHRULES_CLOCK"] = self.clock
        return env

    def start(self, **env: str) -> Daemon:
        """Start the process and wait until it answers /healthz."""
        return self.launch(**env).wait_ready()

    def argv(self) -> list[str]:
        """The ``pushrules`` command line of the daemon."""
        return ["run", "--project", str(self.project.root), "--log-format", "json"]

    def launch(self, **env: str) -> Daemon:
        """Start the process without waiting for it (several start faster together)."""
        argv = self.argv()
        environment = self.env(**env)
        self.started_at = time.time()
        if not self.new_interpreter:
            self.process = zygote.Forked(argv, environment, self.project.root, self.log_path)
            return self
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine", *argv],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.project.root,
            )
        return self

    def wait_ready(self) -> Daemon:
        """Until the started process answers /healthz (it fails the test past START_TIMEOUT)."""
        wait_for(  # every 50 ms: a refused connection costs next to nothing
            self._answers,
            "the daemon to answer /healthz",
            timeout=START_TIMEOUT,
            every=0.05,
            log=self.log,
        )
        self.ready_at = time.time()
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the daemon exited with {self.process.returncode} at start\n{self.log()}"
            )
        try:
            HTTP.get(self.project.url + "/healthz", timeout=1.0)
        except httpx.HTTPError:
            return False
        # This daemon's answer, not another's on the same port: it has bound it and says so.
        return "pushrules running" in self.log(tail=None)

    # -- HTTP -------------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        response = HTTP.get(self.project.url + "/healthz", timeout=5.0)
        return response.status_code, response.json()

    def post(
        self, event: str, body: Any, *, key: str | None = None, token: str | None = None
    ) -> httpx.Response:
        headers = {}
        if key is not None:
            headers["Idempotency-Key"] = key
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return HTTP.post(
            f"{self.project.url}/events/{event}", content=content, headers=headers, timeout=10.0
        )

    def wait_health(self, probe: Callable[[dict[str, Any]], Any], what: str, **kw: Any) -> Any:
        """Poll /healthz until ``probe(report)`` is truthy; returns that report."""

        def check() -> dict[str, Any] | None:
            _, report = self.health()
            return report if probe(report) else None

        return wait_for(check, what, log=self.log, **kw)

    # -- the process ------------------------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code (killed and failed past ``timeout``)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            message = f"the daemon did not stop within {timeout:g}s\n{self.log()}"
            raise AssertionError(message) from None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log(self, tail: int | None = LOG_TAIL) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-tail:] if tail else lines)

    def timed_messages(self) -> list[tuple[datetime, str]]:
        """The time and ``message`` of every JSON log line."""
        out = []
        for line in self.log(tail=None).splitlines():
            try:
                entry = json.loads(line)
                out.append((datetime.fromisoformat(entry["time"]), str(entry["message"])))
            except (ValueError, KeyError, TypeError):
                continue
        return out

    def messages(self) -> list[str]:
        """The ``message`` of every JSON log line (other lines as they are)."""
        out = []
        for line in self.log(tail=None).splitlines():
            try:
                out.append(str(json.loads(line)["message"]))
            except (ValueError, KeyError, TypeError):
                out.append(line)
        return out


def texts(sandbox: RunningSandbox) -> Counter[str]:
    """The message text of every request the sandbox got, counted."""
    return Counter(r["body"]["sendInstantMessage"]["message"]["text"] for r in sandbox.requests())


def started_before(
    start: Callable[[str, int], Daemon],
    due: datetime,
    *,
    margin: float = 0.5,
    leads: tuple[float, ...] = (5.0, 12.0, 30.0),
) -> Daemon:
    """A daemon that was answering at least ``margin`` seconds before its clock reached
    ``due``: ``start(clock, attempt)`` starts one (on a fresh project for each attempt) with
    its clock ``lead`` seconds before ``due``. The short lead keeps the test short; a longer
    one is tried when the machine was too busy for the daemon to be ready in time, instead of
    the test failing for a slow start."""
    for attempt, lead in enumerate(leads):
        daemon = start((due - timedelta(seconds=lead)).isoformat(), attempt)
        if daemon.ready_at - daemon.started_at <= lead - margin:
            return daemon
        daemon.kill()
    raise AssertionError(f"no daemon was ready {margin:g}s before {due} with leads {leads}")


class FeedServer:
    """JSON feeds for poll rules, served from a thread; each path answers as ``routes`` says.

    A route is ``(status, body bytes, delay seconds)``; a delay longer than the rule's poll
    timeout makes the feed time out.
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, float]] = {}
        self.hits: dict[str, int] = {}
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                status, body, delay = server.routes.get(self.path, (404, b"{}", 0.0))
                if delay and server._closing.wait(delay):
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}{path}"

    def json(self, path: str, value: Any) -> None:
        self.routes[path] = (200, json.dumps(value).encode(), 0.0)

    def close(self) -> None:
        self._closing.set()
        self._http.shutdown()
        self._http.server_close()
