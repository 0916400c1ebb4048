"""Shared fixtures: the stores to run on, a sandbox Accengage, real daemons, a one-rule project.

A test module may still define a fixture of the same name; pytest uses the nearest one.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from engine.accengage.sandbox import RunningSandbox, start_in_thread
from engine.outbox.store import Store
from tests import daemon_process
from tests.daemon_process import Daemon, Project

POSTGRES_URL = os.environ.get("PUSHRULES_TEST_POSTGRES", "")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Lines of each daemon's log printed at teardown (pytest shows them when the test failed).
LOG_ON_FAILURE = 400

StartDaemon = Callable[..., Daemon]


def postgres_url() -> str:
    """The PostgreSQL to test on; in CI a missing one fails the test instead of skipping it."""
    url = POSTGRES_URL or ("postgresql+psycopg://postgres@127.0.0.1:5432/test" if IN_CI else "")
    if not url:
        pytest.skip("set PUSHRULES_TEST_POSTGRES to run the PostgreSQL tests")
    return url


# --- the order tests run in ----------------------------------------------------------------------


def weight(item: pytest.Item) -> int:
    """How long a test is known to take: 2 marked ``slow`` (a build, a real pre-commit), 1
    ``e2e`` (a real daemon, seconds), 0 the rest (milliseconds)."""
    if item.get_closest_marker("slow"):
        return 2
    return 1 if item.get_closest_marker("e2e") else 0


def stripes(items: list[pytest.Item], workers: int) -> list[pytest.Item]:
    """``workers`` shares laid end to end, each starting with its turn of the long tests (the
    heaviest first), then a run of the short ones in file order.

    pytest-xdist's worksteal gives each worker one contiguous share of the list (the sizes
    below are its own) and lets an idle worker take the tail of another's: so each share
    starts with its part of the long tests, and what is left to take at the end is short. In
    collection order, one worker could start a 15-second test after the others had run out of
    work. The short tests stay together by file, so a module's fixtures (a filled store, a
    browser) are set up in one worker, not in each."""
    if workers <= 1:
        return items
    heavy = sorted((i for i in items if weight(i)), key=weight, reverse=True)  # stable
    light = [i for i in items if not weight(i)]
    ordered: list[pytest.Item] = []
    left, taken = len(items), 0
    for k in range(workers):
        size = left // (workers - k)
        left -= size
        share = heavy[k::workers]
        more = max(0, size - len(share))
        ordered += share + light[taken : taken + more]
        taken += more
    return ordered + light[taken:]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    items[:] = stripes(items, workers)


# --- stores ------------------------------------------------------------------------------------


def postgres_store_url(schema: str) -> str:
    """The test PostgreSQL with ``schema`` first on the search path."""
    url = make_url(postgres_url())
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


class PostgresSchema:
    """A throwaway schema: created on enter, dropped with everything in it on exit.

    Each test gets its own, so tests (and parallel workers) never see each other's rows.
    """

    def __init__(self) -> None:
        self.name = f"pushrules_test_{secrets.token_hex(6)}"
        self.url = postgres_store_url(self.name)

    def _admin(self, sql: str) -> None:
        engine = create_engine(postgres_url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def __enter__(self) -> PostgresSchema:
        self._admin(f'CREATE SCHEMA "{self.name}"')
        return self

    def __exit__(self, *exc: object) -> None:
        # A process of the test may still be touching the schema (a daemon stopping): the drop
        # can then be chosen as a deadlock's victim, and is simply made again.
        for attempt in range(5):
            try:
                self._admin(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
                return
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.2)


def store_url_context(kind: str, tmp_path: Path) -> Iterator[str]:
    """Yields a fresh store URL of ``kind`` ("sqlite" or "postgres")."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'outbox.db'}"
        return
    postgres_url()  # skips (or fails in CI) before any work
    with PostgresSchema() as schema:
        yield schema.url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store URL, once on SQLite and once on PostgreSQL."""
    yield from store_url_context(request.param, tmp_path)


@pytest.fixture
def postgres_store(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty PostgreSQL store URL, for what only PostgreSQL does (several writers at
    once, row locks)."""
    yield from store_url_context("postgres", tmp_path)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as s:
        yield s


# --- a sandbox Accengage, real daemons ---------------------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[RunningSandbox]:
    """A sandbox Accengage in a thread of this process, recording every request it gets."""
    with start_in_thread() as running:
        yield running


@pytest.fixture(autouse=True)
def _e2e_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Lets a real daemon start only in a test marked ``e2e`` (see daemon_process)."""
    daemon_process.E2E_ALLOWED = request.node.get_closest_marker("e2e") is not None
    yield
    daemon_process.E2E_ALLOWED = None


@pytest.fixture
def daemons() -> Iterator[StartDaemon]:
    """Starts daemons; kills any still running at teardown and prints each log (pytest shows
    it only when the test failed)."""
    started: list[Daemon] = []

    def start(
        project: Project,
        *,
        clock: str | None = None,
        name: str | None = None,
        wait: bool = True,
        new_interpreter: bool = False,
        **env: str,
    ) -> Daemon:
        """A daemon answering /healthz; with ``wait=False`` only launched (call wait_ready).
        ``new_interpreter``: ``python -m engine run`` rather than forked (tests/zygote.py)."""
        daemon = Daemon(
            project,
            clock=clock,
            name=name or f"run{len(started)}",
            new_interpreter=new_interpreter,
        )
        started.append(daemon)
        return daemon.start(**env) if wait else daemon.launch(**env)

    yield start
    for daemon in started:
        daemon.kill()
        print(f"--- {daemon.log_path} (last {LOG_ON_FAILURE} lines) ---")
        print(daemon.log(tail=LOG_ON_FAILURE))


@pytest.fixture
def one_rule_project(tmp_path: Path, sandbox: RunningSandbox) -> Project:
    """A daemon project sending to ``sandbox`` with one rule, ``ping``: event ``ping`` sends
    ``ping {{ event.marker }}``."""
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("ping", "event: ping", "ping {{ event.marker }}")
    return project
