"""``pushrules run``: the long-running process the rules exist for.

It wires the parts together and owns their lifecycles; each part lives in its own module:
the loader (rules), the scheduler and the poller (when), the intake (events over HTTP), the
one fire path (firing), the store (outbox) and the dispatcher (sending).

    start: load -> store (recover) -> dispatcher -> leadership -> catch-up -> schedules
           -> intake HTTP -> watcher
    run:   fires from schedules, feeds and events go to the outbox; the dispatcher sends;
           the leader's housekeeping (maintenance) folds state counts and prunes by retention
    stop:  SIGTERM/SIGINT: intake and schedules stop taking work, in-flight sends finish,
           queued rows are given back, exit 0
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import uvicorn
from sqlalchemy.exc import OperationalError

from engine.accengage.api import SANDBOX_PORT
from engine.daemon.clock import Clock
from engine.daemon.collector import CollectorHold
from engine.daemon.intake import create_app, no_rule_note
from engine.daemon.maintenance import Maintenance
from engine.daemon.metrics import Metrics
from engine.daemon.poller import Poller
from engine.daemon.scheduler import Changes, Scheduler, name_some
from engine.daemon.watcher import Watcher
from engine.errors import PushrulesError
from engine.outbox.batching import Coalescer
from engine.outbox.connections import busy_timeout, is_busy
from engine.outbox.firing import (
    Decided,
    FireOutcome,
    FireRequest,
    decide_steps,
    record,
    rule_quiet_until,
)
from engine.outbox.store import Store
from engine.render.compiler import FireContext, Steps
from engine.rules.checks import compile_templates
from engine.rules.loader import Loader, RuleSet
from engine.rules.problems import format_text
from engine.rules.project import DaemonConfig, Project
from engine.rules.rule import Rule
from engine.rules.schedule import parse_timezone
from engine.rules.secrets import MissingSecret, SecretRef, hide_url_password
from engine.send.dispatch import Dispatcher, Quiet
from engine.send.runtime import credentials, dispatch_settings, open_store, sandboxed

log = logging.getLogger("pushrules.daemon")

T = TypeVar("T")

#: A big fire's steps pause this long every so often, so worker threads run (see in_steps);
#: and the longest they wait for a /healthz check in progress.
STEPS_PAUSE, STEPS_PAUSE_EVERY = 0.001, 0.01
GIVE_WAY_MOST = 0.05


@dataclass(frozen=True, slots=True)
class Options:
    root: Path
    sandbox: bool = False
    sandbox_port: int = SANDBOX_PORT
    listen: str | None = None  # overrides pushrules.yaml's listen
    clock: Clock = field(default_factory=Clock)


def quiet_hook(rules: Callable[[], Mapping[str, Rule]]) -> Quiet:
    """The dispatcher's ``quiet``, read from the rules current at each ask (a reload changes
    them). A rule removed since its rows were written has no quiet hours left to keep."""

    def quiet(rule_id: str, now: datetime) -> datetime | None:
        rule = rules().get(rule_id)
        return None if rule is None else rule_quiet_until(rule, now)

    return quiet


class StartupError(PushrulesError):
    """The daemon cannot start; the message says what to fix."""


class Daemon:
    """One running instance. Implements the intake's IntakeState."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.clock = options.clock
        self.loader = Loader(options.root)
        self.metrics = Metrics()
        self.stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._ruleset: RuleSet | None = None
        self._project: Project | None = None
        self._last_reload: dict[str, Any] = {}
        #: The last fire write that failed for another reason than a lock held past lock_wait
        #: (a full disk, a read-only store), until one succeeds: /healthz answers 503 meanwhile.
        self._write_failed: tuple[datetime, str] | None = None
        self._compiled: set[str] = set()
        # A batch that fails for a reason other than the database is re-written caller by
        # caller, so one bad fire fails alone (see engine/outbox/batching.py).
        self._fires: Coalescer[tuple[list[Decided], datetime], list[FireOutcome]] = Coalescer(
            self._write_fires, split=lambda exc: not isinstance(exc, OperationalError)
        )
        self._leading = False
        self._timing = DaemonConfig()
        self._reloads: set[asyncio.Task[None]] = set()
        self._sandbox: Any = None
        #: Set once this instance knows whether it leads and, leading, has taken back what an
        #: earlier run wrote ahead (catch-up's first step): the dispatcher waits for it.
        self._started = asyncio.Event()
        self._settling: asyncio.Task[bool] | None = None
        self._watcher: Watcher | None = None
        self._server_ref: uvicorn.Server | None = None
        self.store: Store | None = None
        self.maintenance: Maintenance | None = None
        self.started_at = self.clock.now()
        self._checks = 0  # health checks running in worker threads
        self._checks_lock = threading.Lock()

    # --- IntakeState ------------------------------------------------------------------------

    @property
    def token(self) -> SecretRef | None:
        return self.project.intake_token

    def ruleset(self) -> RuleSet:
        assert self._ruleset is not None
        return self._ruleset

    @property
    def project(self) -> Project:
        assert self._project is not None
        return self._project

    async def fire_event(self, name: str, payload: dict[str, Any], key: str) -> list[FireOutcome]:
        now = self.clock.now()
        ruleset = self.ruleset()
        requests = [
            FireRequest(rule, FireContext(now=self._local(rule, now), event=payload), key)
            for rule in ruleset.for_event(name)
        ]
        if not requests:
            await self._record_unmatched(ruleset, name, payload, key, now)
        return await self._fire(requests, now)

    async def _record_unmatched(
        self, ruleset: RuleSet, name: str, payload: dict[str, Any], key: str, now: datetime
    ) -> None:
        """An event no rule takes is kept with why before it is answered 202: an event a
        deploy or a typo left without its rule can be found and fired again."""
        assert self.store is not None
        reason = no_rule_note(ruleset, name)
        body = json.dumps(payload, ensure_ascii=False)
        new = await asyncio.to_thread(self.store.record_unmatched, name, key, reason, body, now=now)
        if new:  # a client's retry of the same event is one event
            self.metrics.event_unmatched()
            log.warning("event %r (%s) taken by no rule: %s", name, key, reason)

    def health(self) -> dict[str, Any]:
        with self._checks_lock:
            self._checks += 1
        try:
            return self._health()
        finally:
            with self._checks_lock:
                self._checks -= 1

    def _checking(self) -> bool:
        """Whether a health check is running (in a worker thread): a big fire gives way."""
        return self._checks > 0

    def _health(self) -> dict[str, Any]:
        ruleset = self.ruleset()
        problems: list[str] = []
        try:
            assert self.store is not None
            backlog = self.store.backlog()
            paused = {
                k: (v.isoformat() if v else None)
                for k, v in self.store.paused(self.clock.now()).items()
            }
        except Exception as exc:  # the store is the one thing health must survive
            backlog, paused = {}, {}
            problems.append(f"the store cannot be read: {type(exc).__name__}")
        try:
            credentials(self.project, sandbox=self.options.sandbox).resolve()
        except MissingSecret as exc:
            problems.append(f"credentials: {exc}")
        if self._write_failed is not None:
            at, error = self._write_failed
            problems.append(
                f"the store cannot be written: the last fire write, at {at.isoformat()}, failed "
                f"({error}); events are answered 503 and scheduled fires retried until one lands"
            )
        if self._last_reload.get("failed"):
            problems.append(
                f"the last reload failed ({self._last_reload['failed']}); the daemon runs the "
                "rules it had before it"
            )
        errors = [p for p in ruleset.problems if p.is_error]
        return {
            "ok": not problems,
            "problems": problems,
            "started_at": self.started_at.isoformat(),
            "leader": self._leading,
            "rules": {
                "loaded": len(ruleset.rules),
                "enabled": sum(r.enabled for r in ruleset.rules.values()),
                "kept_at_last_good_version": sorted(ruleset.stale),
                "kept_while_file_missing": sorted(ruleset.vanishing),
                "errors": len(errors),
                "warnings": len(ruleset.problems) - len(errors),
                "first_errors": format_text(errors[:20]).splitlines(),
            },
            "last_reload": self._last_reload,
            "outbox": backlog,
            "attention": {s: backlog.get(s, 0) for s in ("in_doubt", "failed", "dead", "held")},
            "paused": paused,
            "feeds": {k: _jsonable(v) for k, v in self.poller.status().items()},
            "next_fires": {
                k: (v.isoformat() if v else None) for k, v in self.scheduler.next_fires().items()
            },
            "fire_writes_waiting": self.scheduler.waiting_writes(),
            "retention": _jsonable(self.maintenance.status) if self.maintenance else None,
        }

    def metrics_text(self) -> tuple[bytes, str]:
        self.metrics.set_fire_writes_waiting(len(self.scheduler.waiting_writes()))
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.metrics.set_backlog(self.store.backlog())
                self.metrics.set_paused(len(self.store.paused(self.clock.now())))
        return self.metrics.render()

    # --- fires ------------------------------------------------------------------------------

    def _local(self, rule: Rule, now: datetime) -> datetime:
        return now.astimezone(parse_timezone(rule.timezone))

    async def _fire(self, requests: list[FireRequest], now: datetime) -> list[FireOutcome]:
        """Each fire is decided here, on the event loop in the compiler's steps (in a worker
        thread, a ``for_each`` over 100,000 items held the interpreter lock for seconds), so
        the intake and /healthz answer between two steps; one that takes more than a step
        holds the garbage collector off until it is written. Fires decided at about the same
        moment (a minute's cron rules, a burst of events) then go to the store together, in a
        worker thread: one transaction for the lot, not one each."""
        if not requests:
            return []
        with CollectorHold() as hold:
            decided: list[Decided] = []
            for req in requests:
                # Decided ahead, a fire meets its quiet hours at its own time.
                moment = req.due if req.due is not None and req.due > now else now
                steps = decide_steps(self.project, req.rule, req.context, moment)
                decided.append((req, await in_steps(steps, hold.start, self._checking)))
            outcomes = await self._fires.submit((decided, now))
            del decided  # freed while the collector is held: it never walks them
        self.metrics.fired(outcomes)
        if any(o.status == "queued" for o in outcomes):
            self.dispatcher.wake()
        for outcome in outcomes:
            level = logging.WARNING if outcome.status in ("failed", "limited") else logging.INFO
            log.log(
                level,
                "rule %s fired (%s): %s, %s",
                outcome.rule,
                outcome.key,
                outcome.status,
                outcome.detail,
            )
        return outcomes

    async def _write_fires(
        self, batch: list[tuple[list[Decided], datetime]]
    ) -> list[list[FireOutcome]]:
        assert self.store is not None
        everything = [one for decided, _ in batch for one in decided]
        now = max(moment for _, moment in batch)
        try:
            outcomes = await asyncio.to_thread(self._record, everything, now)
        except Exception as exc:
            if not is_busy(exc):  # a lock held past lock_wait is not the store failing
                first = str(exc).splitlines()[0] if str(exc) else ""
                self._write_failed = (
                    self.clock.now(),
                    hide_url_password(f"{type(exc).__name__}: {first}"),
                )
            raise
        self._write_failed = None
        result, start = [], 0
        for decided, _ in batch:
            result.append(outcomes[start : start + len(decided)])
            start += len(decided)
        return result

    def _record(self, decided: list[Decided], now: datetime) -> list[FireOutcome]:
        """In a worker thread, waiting at most ``daemon.lock_wait`` for the store's locks:
        an event is then answered 503 "retry" quickly, and a scheduled fire is tried again
        (engine/daemon/scheduler.py)."""
        assert self.store is not None
        with busy_timeout(self._timing.lock_wait.total_seconds()):
            return record(self.store, decided, now=now)

    async def _on_schedule(self, rule: Rule, scheduled_at: datetime, key: str) -> None:
        context = FireContext(now=self._local(rule, scheduled_at))
        await self._fire([FireRequest(rule, context, key, due=scheduled_at)], self.clock.now())

    async def _on_item(self, rule: Rule, item: Mapping[str, Any], key: str) -> None:
        now = self.clock.now()
        context = FireContext(now=self._local(rule, now), item=dict(item))
        await self._fire([FireRequest(rule, context, key)], now)

    async def _on_poll(self, rule: Rule, scheduled_at: datetime) -> None:
        result = await self.poller.poll(rule, self.clock.now())
        if getattr(result, "error", None):
            self.metrics.feed_failed(rule.id)

    # --- lifecycle --------------------------------------------------------------------------

    def _load_first(self) -> None:
        """The first load; forks workers for a large project, before any thread exists.

        What is alive once it is accepted (the modules, the rules, their compiled templates)
        lives as long as the process: it is frozen out of the garbage collector, whose full
        collections would otherwise walk all of it again and again, the event loop waiting.
        """
        ruleset = self.loader.load()
        self.loader.workers = 1  # later reloads run in a thread: no forking there
        if ruleset.project is None:
            raise StartupError(
                "pushrules.yaml has errors, so nothing can run:\n" + format_text(ruleset.problems)
            )
        self._accept(ruleset)
        gc.collect()  # garbage frozen with the rest would never be freed
        gc.freeze()

    def _accept(self, ruleset: RuleSet) -> None:
        project = ruleset.project
        assert project is not None
        if self._sandbox is not None:
            project = sandboxed(project, self._sandbox.url)  # its own outbox, never the real one
        if self._project is not None:
            for setting in ("store", "dispatch", "daemon"):
                if getattr(project, setting) != getattr(self._project, setting):
                    log.warning(
                        "%s changed in pushrules.yaml: restart the daemon to use it", setting
                    )
        self._ruleset = replace(ruleset, project=project)
        self._project = project
        self._compile_new(ruleset)
        if ruleset.problems:
            log.warning(
                "rule problems (files with errors keep their last good version):\n%s",
                format_text(ruleset.problems),
            )
        self.metrics.reloaded(ruleset.ok, len(ruleset.rules))
        self._last_reload = {
            "at": self.clock.now().isoformat(),
            "ok": ruleset.ok,
            "rules": len(ruleset.rules),
        }

    def _compile_new(self, ruleset: RuleSet) -> None:
        """Compile the templates of new or changed rules now, so no fire compiles any: 1,000
        rules due in one minute would otherwise each pay for it at that minute."""
        for rule in ruleset.rules.values():
            if rule.digest not in self._compiled:
                try:
                    compile_templates(rule)
                except Exception as exc:  # a fire will report it with the rule and field
                    log.debug("rule %s: template not precompiled: %s", rule.id, exc)
                self._compiled.add(rule.digest)

    async def reload(self, *, settled: bool = True, rehash: bool = False) -> None:
        """Re-check what changed, swap the rule set whole, reschedule only changed rules.

        ``settled=False`` (files still changing) keeps rules whose file is missing for now.
        ``rehash``: read every rule file again, not only those whose ``stat`` changed.
        A reload that loads nothing keeps the running rules and shows in /healthz.
        """
        async with self._reload_lock:
            started = time.perf_counter()
            try:
                ruleset = await asyncio.to_thread(self.loader.load, settled=settled, rehash=rehash)
            except Exception as exc:
                log.exception("reload failed; the daemon keeps running its current rules")
                self._reload_failed(f"{type(exc).__name__}: {exc}"[:300])
                return
            if ruleset.project is None:
                log.error(
                    "pushrules.yaml has errors; the daemon keeps running on its last good "
                    "configuration:\n%s",
                    format_text(ruleset.problems),
                )
                self._reload_failed("pushrules.yaml has errors: " + _first_line(ruleset))
                return
            self._accept(ruleset)
            changes = self.scheduler.apply(self.ruleset().rules) if self._leading else None
            log.info(
                "reloaded in %.0f ms: %d rules%s",
                (time.perf_counter() - started) * 1000,
                len(ruleset.rules),
                _describe(changes),
            )

    def _reload_failed(self, why: str) -> None:
        self.metrics.reload_failed()
        self._last_reload = {
            "at": self.clock.now().isoformat(),
            "ok": False,
            "failed": why,
            "rules": len(self.ruleset().rules),
        }

    async def _files_changed(self) -> None:
        """The watcher's call: a load made while files kept changing keeps vanished rules; a
        change only its content re-scan saw is looked for in every file."""
        watcher = self._watcher
        await self.reload(
            settled=watcher.settled if watcher else True,
            rehash=watcher.rehash if watcher else True,
        )

    async def run(self) -> int:
        if self.options.sandbox:
            self._start_sandbox()  # first, so the rules' URL becomes the sandbox's
        self._load_first()
        project = self.project
        listening = self._bind()
        self.store = await asyncio.to_thread(open_store, project)
        # On the daemon's clock, not the system's: rows are due at clock instants (the fire
        # time, the end of quiet hours), so a clock set ahead must not leave them unclaimed.
        self.dispatcher = Dispatcher(
            self.store,
            dispatch_settings(project),
            credentials(project, sandbox=self.options.sandbox),
            clock=self.clock.now,
            metrics=self.metrics.dispatch,
            # Trial rows deferred by an earlier `send --sandbox` name that command's sandbox,
            # gone with it: in a sandbox run, every row goes to this run's sandbox.
            route=project.url if self.options.sandbox else None,
            quiet=quiet_hook(lambda: self.ruleset().rules),
        )
        # daemon: is read at start, like the store and the dispatch settings.
        timing = self._timing = project.daemon
        self.scheduler = Scheduler(
            self.clock,
            self.store,
            self._on_schedule,
            self._on_poll,
            on_retry=self.metrics.fire_write_retried,
            retry_base=timing.fire_retry.total_seconds(),  # the schema caps it at RETRY_MAX
            ahead=timing.fire_ahead,
            withdraw=self._withdraw_ahead,
        )
        self.poller = Poller(self.store, self._on_item, self.clock)
        self.leadership = self.store.leadership()
        maintenance = self.maintenance = Maintenance(
            self.store,
            lambda: self.project.retention,
            self.clock.now,
            on_pruned=self.metrics.pruned,
            on_failed=self.metrics.prune_failed,
            fold_every=timing.fold_every.total_seconds(),
        )

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._reload_on_signal)

        watcher = self._watcher = Watcher(
            self.options.root,
            self._files_changed,
            poll_every=timing.watch_every.total_seconds(),
            debounce=timing.watch_quiet.total_seconds(),
            max_delay=timing.watch_max_delay.total_seconds(),
        )
        watcher.prime()
        server = self._server()
        tasks = [
            asyncio.create_task(self._dispatch(), name="dispatcher"),
            asyncio.create_task(
                self._lead(timing.leadership_every.total_seconds()), name="leadership"
            ),
            asyncio.create_task(
                maintenance.run(self.stop, lambda: self._leading), name="maintenance"
            ),
            asyncio.create_task(watcher.run(self.stop), name="watcher"),
            asyncio.create_task(server.serve(sockets=[listening]), name="intake"),
        ]
        log.info(
            "pushrules running: %d rules, events on http://%s, sending to %s",
            len(self.ruleset().rules),
            self._listen(),
            project.url,
        )
        stopped = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopped and t.exception() is not None]
        for task in failed:
            log.error("%s stopped: %s", task.get_name(), task.exception())
        self.stop.set()
        server.should_exit = True
        await self._shutdown(tasks)
        return 1 if failed else 0

    async def _dispatch(self) -> None:
        """The dispatcher, once this instance knows whether it leads: a leader first takes back
        what an earlier run wrote ahead and catch-up will decide again, so a fire whose time
        passed while no daemon ran is not sent late by a claim that came first."""
        started = asyncio.create_task(self._started.wait())
        stopped = asyncio.create_task(self.stop.wait())
        await asyncio.wait([started, stopped], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        stopped.cancel()
        await self.dispatcher.run(self.stop)

    async def _withdraw_ahead(
        self, after: Mapping[str, datetime], otherwise: datetime | None
    ) -> int:
        assert self.store is not None
        return await asyncio.to_thread(self.store.withdraw_ahead, after, otherwise)

    def _reload_on_signal(self) -> None:
        """SIGHUP: reload in a task held here (the loop keeps tasks only weakly), logged whole."""
        log.info("SIGHUP received: reloading")
        task = asyncio.get_running_loop().create_task(self._reload_logged(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload_logged(self) -> None:
        try:
            # Not settled: a SIGHUP sent in the middle of a deploy must not drop a rule whose
            # file is being re-created; the watcher's settled reload drops what is truly gone.
            # Every file is read again: an operator asking for a reload means all of them.
            await self.reload(settled=False, rehash=True)
        except Exception:
            log.exception("reload on SIGHUP failed; the running rules stay")

    def _request_stop(self, sig: signal.Signals) -> None:
        """First SIGTERM/SIGINT: stop gracefully. A second one: stop waiting for open HTTP
        connections (in-flight sends still finish and queued rows are still given back)."""
        if not self.stop.is_set():
            log.info("%s received: finishing in-flight sends, then stopping", sig.name)
        elif self._server_ref is not None:
            log.warning("%s received again: closing open connections now", sig.name)
            self._server_ref.force_exit = True
        self.stop.set()

    async def _lead(self, every: float) -> None:
        """Run the schedules while this instance is the leader: every ``every`` seconds a
        follower asks whether it may lead, and the leader checks that it still does."""
        assert self.store is not None
        while not self.stop.is_set():
            leading = await asyncio.to_thread(self.leadership.try_acquire)
            if self.stop.is_set():  # stopping meanwhile: _shutdown would not stop a new start
                break
            if leading and not self._leading:
                self._leading = True
                log.info("leading: this instance runs the schedules and feeds")
                await self.scheduler.start()
                self.scheduler.apply(self.ruleset().rules)
                # The dispatcher starts once what earlier runs wrote ahead is settled, not
                # after the whole catch-up: the missed fires it writes go out as they land.
                self._settling = asyncio.create_task(self.scheduler.settled(), name="settled")
                self._settling.add_done_callback(lambda _: self._started.set())
                for item in await self.scheduler.catch_up(self.ruleset().rules):
                    log.info(
                        "catch-up: %s %s at %s: %s",
                        item.rule,
                        item.action,
                        item.scheduled_at.isoformat(),
                        item.reason,
                    )
            elif not leading and self._leading:
                self._leading = False
                log.warning("lost the scheduler leadership: another instance runs schedules")
                # What it wrote ahead stays: the new leader may have written ahead already,
                # its own write of a fire refused as a duplicate of ours.
                await self.scheduler.shutdown(take_back=False)
            if not self._leading:
                self._started.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), every)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        if self._leading:
            # Takes back what it wrote ahead only if it still leads (no one else wrote since).
            try:
                still = await asyncio.to_thread(self.leadership.try_acquire)
            except Exception:
                still = False
            await self.scheduler.shutdown(take_back=still)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.debug("%s ended with %r", task.get_name(), result)
        await self.poller.aclose()
        await self.dispatcher.aclose()
        await asyncio.to_thread(self.leadership.release)
        if self.store is not None:
            self.store.close()
        if self._sandbox is not None:
            self._sandbox.stop()
        log.info("stopped")

    def _listen(self) -> str:
        return self.options.listen or self.project.listen

    def _bind(self) -> socket.socket:
        """The intake's socket, bound before anything starts: a busy port is then a plain
        startup error, where uvicorn would exit the process from inside its task."""
        address = self._listen()
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on such sockets, and with
        # Nagle on each answer waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))
            sock.listen(2048)
            return sock
        except (OSError, ValueError, OverflowError) as exc:
            sock.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise StartupError(
                f"the intake cannot listen on {address}: {reason}; free the port, or change "
                "listen in pushrules.yaml (or pass --listen)"
            ) from None

    def _server(self) -> uvicorn.Server:
        host, _, port = self._listen().rpartition(":")
        app = create_app(_IntakeAdapter(self))
        # Keep-alive longer than the usual load balancer idle timeout (60 s), or the balancer
        # reuses a connection the daemon just closed and answers 502.
        config = uvicorn.Config(
            app,
            host=host,
            port=int(port),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_keep_alive=75,
        )
        server = _Server(config)
        self._server_ref = server
        return server

    def _start_sandbox(self) -> None:
        from engine.accengage.sandbox import SandboxConfig, start_in_thread

        try:
            self._sandbox = start_in_thread(SandboxConfig(), port=self.options.sandbox_port)
        except OSError as exc:
            raise StartupError(
                f"the sandbox cannot listen on port {self.options.sandbox_port}: "
                f"{exc.strerror}; free it or pass --sandbox-port"
            ) from None
        log.info(
            "sandbox Accengage endpoint on %s (every request it gets: %s/requests)",
            self._sandbox.url,
            self._sandbox.base_url,
        )


class _Server(uvicorn.Server):
    """uvicorn without its signal handling: the daemon owns SIGTERM, SIGINT and SIGHUP.

    ``Server.serve`` wraps itself in ``capture_signals``, which replaces the process's
    SIGINT/SIGTERM handlers with uvicorn's own (and re-raises the signal on exit); the old
    ``install_signal_handlers`` hook it replaced is gone since uvicorn 0.29. Making it a no-op
    leaves the daemon's ``loop.add_signal_handler`` handlers in place, and the daemon stops
    the server through ``should_exit`` / ``force_exit``.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _IntakeAdapter:
    """The intake's view of the daemon (metrics() named as the intake expects)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def token(self) -> SecretRef | None:
        return self._daemon.token

    @property
    def max_body(self) -> int:
        return self._daemon.project.intake.max_body

    def ruleset(self) -> RuleSet:
        return self._daemon.ruleset()

    async def fire_event(self, name: str, payload: dict[str, Any], key: str) -> list[FireOutcome]:
        return await self._daemon.fire_event(name, payload, key)

    def health(self) -> dict[str, Any]:
        return self._daemon.health()

    def paused(self) -> dict[str, datetime | None]:
        """Pauses in force (rule or "*" -> until), for the intake's answer."""
        assert self._daemon.store is not None
        return self._daemon.store.paused(self._daemon.clock.now())

    def metrics(self) -> tuple[bytes, str]:
        return self._daemon.metrics_text()


async def in_steps(
    steps: Steps[T],
    on_long: Callable[[], None] | None = None,
    give_way: Callable[[], bool] | None = None,
) -> T:
    """Run work made of steps on the event loop, letting every other task run between two.

    ``on_long`` is called once, when the work turns out to take more than one step.

    Worker threads get their turn too. Between two steps the loop only polls its sockets,
    letting go of the interpreter lock for an instant that a thread waiting for it rarely
    catches, and a thread that sees the lock change hands keeps waiting: a /healthz check
    waited 50-100 ms to start. So every STEPS_PAUSE_EVERY seconds of steps the loop sleeps
    STEPS_PAUSE, and while ``give_way()`` is true (a check is reading the store) it sleeps
    until the check is done, up to GIVE_WAY_MOST.
    """
    loop = asyncio.get_running_loop()
    first = True
    paused = loop.time()
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)
        if first and on_long is not None:
            on_long()
        first = False
        now = loop.time()
        if now - paused >= STEPS_PAUSE_EVERY:
            await asyncio.sleep(STEPS_PAUSE)
            paused = loop.time()
        else:
            await asyncio.sleep(0)
        if give_way is not None and give_way():
            until = loop.time() + GIVE_WAY_MOST
            while give_way() and loop.time() < until:
                await asyncio.sleep(STEPS_PAUSE)


def _describe(changes: Changes | None, most: int = 10) -> str:
    """The rules a reload rescheduled, for its log line: named, up to ``most`` per kind (the
    whole dataclass would list every unchanged rule on every reload)."""
    if changes is None:
        return ""
    parts = []
    for what, ids in (
        ("added", changes.added),
        ("removed", changes.removed),
        ("rescheduled", changes.rescheduled),
    ):
        if ids:
            parts.append(f"{what} {name_some(ids, most)}")
    return f"; schedules {'; '.join(parts)}" if parts else ""


def _first_line(ruleset: RuleSet) -> str:
    errors = [p for p in ruleset.problems if p.is_error]
    return format_text(errors[:1]) or "see the log"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def run(options: Options) -> int:
    daemon = Daemon(options)
    try:
        return asyncio.run(daemon.run())
    except PushrulesError as exc:  # a store it cannot use, a schema too new: in the log's format
        log.error("%s", exc)
        return 1
