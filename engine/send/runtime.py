"""The running parts built from a project: its store, its credentials, its dispatcher.

One place turns ``pushrules.yaml`` settings into objects, so the CLI commands and the daemon
send the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx

from engine.accengage import api
from engine.outbox.store import AttemptResult, OutboxRow, Store
from engine.rules.project import Project
from engine.rules.secrets import SecretRef
from engine.send.dispatch import Credentials, Dispatcher
from engine.send.policy import DispatchSettings

#: What ``--sandbox`` sends as credentials, always: the sandbox only checks that they are there,
#: shows every request it received to whoever asks (``/requests``, its record file), and a trial
#: needs no secrets. The real ones are never read for it, so never sent there.
SANDBOX_LOGIN = "sandbox-login"
SANDBOX_PASSWORD = "sandbox-password"


def credentials(project: Project, *, sandbox: bool = False) -> Credentials:
    if sandbox:
        return Credentials(_StandIn(SANDBOX_LOGIN), _StandIn(SANDBOX_PASSWORD))
    login = project.login or SecretRef("env", "ACCENGAGE_LOGIN")
    password = project.password or SecretRef("env", "ACCENGAGE_PASSWORD")
    return Credentials(login, password)


@dataclasses.dataclass(frozen=True)
class _StandIn:
    """A secret reference that is not secret: the sandbox's credentials."""

    value: str

    def resolve(self) -> str:
        return self.value

    def describe(self) -> str:
        return "the sandbox's stand-in"

    def __str__(self) -> str:
        return self.describe()


def dispatch_settings(project: Project) -> DispatchSettings:
    """``dispatch:`` of pushrules.yaml over the defaults. Each key set there is the setting of
    the same name (typed and bounded by the schema already); ``timeout`` also sets the
    whole-request deadline, and the lease grows with it so a request in flight is never taken
    for a dead one."""
    given = project.dispatch
    changes: dict[str, Any] = {
        f.name: getattr(given, f.name)
        for f in dataclasses.fields(given)
        if getattr(given, f.name) is not None
    }
    poll_every: timedelta | None = changes.pop("poll_every", None)
    if poll_every is not None:
        changes["poll_every"] = poll_every.total_seconds()
    timeout: timedelta | None = changes.pop("timeout", None)
    if timeout is not None:
        seconds = timeout.total_seconds()
        changes["timeout"] = httpx.Timeout(
            connect=min(seconds, 10.0), read=seconds, write=seconds, pool=seconds
        )
        changes["deadline"] = deadline = max(DispatchSettings.deadline, seconds * 2)
        changes["lease"] = max(DispatchSettings.lease, timedelta(seconds=2 * deadline))
    return DispatchSettings(**changes)


#: Trials with ``--sandbox`` keep their own outbox, so they never mix with (or send) the real
#: one: a real store's pending rows must not be "sent" to a sandbox.
SANDBOX_STORE = "sqlite:///pushrules-sandbox.db"


#: Where ``run --sandbox`` serves its sandbox: a trial with no sandbox of its own names it,
#: never the real Accengage (a dispatcher of the trial store sends every row to its URL).
SANDBOX_URL = f"http://127.0.0.1:{api.SANDBOX_PORT}{api.ROUTE}"


def sandboxed(project: Project, url: str | None = None) -> Project:
    """The project as a ``--sandbox`` trial sees it: the sandbox's URL (the default sandbox's
    when none is given, never the real one) and its own store."""
    return dataclasses.replace(project, url=url or SANDBOX_URL, store=SANDBOX_STORE)


def open_store(project: Project) -> Store:
    return Store(project.store_url())


def make_dispatcher(
    project: Project,
    store: Store,
    *,
    sandbox: bool = False,
    on_attempt: Callable[[OutboxRow, AttemptResult, str], None] | None = None,
    settings: DispatchSettings | None = None,
) -> Dispatcher:
    return Dispatcher(
        store,
        settings or dispatch_settings(project),
        credentials(project, sandbox=sandbox),
        on_attempt=on_attempt,
        route=project.url if sandbox else None,
    )
