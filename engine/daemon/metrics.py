"""The daemon's Prometheus metrics, in one place, with a registry of their own.

A registry per :class:`Metrics` (not prometheus_client's global one) lets tests and several
daemons in one process each count for themselves. The daemon calls the methods below from
wherever the thing happens; ``/metrics`` only renders. Gauges that mirror the store (backlog,
pauses) are set by the daemon before rendering, since reading them costs a query.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

from engine.send.metrics import DispatchMetrics

#: The classic text format: every scraper reads it, and our names need nothing newer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Outcome(Protocol):
    # Read-only, so frozen dataclasses (the firing's outcomes) match.
    @property
    def rule(self) -> str: ...

    @property
    def status(self) -> str: ...


class Metrics:
    """Every metric pushrules exports; one instance per daemon."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.fires = Counter(
            "pushrules_fires", "Rule fires by outcome", ["rule", "status"], registry=r
        )
        #: Sends, retries and latency: counted by the dispatcher itself, in this registry.
        self.dispatch = DispatchMetrics(r)
        self.backlog = Gauge(
            "pushrules_outbox_backlog", "Outbox rows by state", ["state"], registry=r
        )
        self.reloads = Counter(
            "pushrules_reloads",
            "Rule set reloads by result (ok / problems / error: nothing could be loaded)",
            ["result"],
            registry=r,
        )
        self.rules_loaded = Gauge("pushrules_rules_loaded", "Rules in the running set", registry=r)
        self.feed_failures = Counter(
            "pushrules_feed_failures", "Poll feeds that could not be read", ["rule"], registry=r
        )
        self.paused_rules = Gauge(
            "pushrules_paused_rules", "Pauses in force ('*' counts as one)", registry=r
        )
        self.fire_write_retries = Counter(
            "pushrules_fire_write_retries",
            "Scheduled fires written again after their write failed (store locked or down)",
            ["rule"],
            registry=r,
        )
        self.fire_writes_waiting = Gauge(
            "pushrules_fire_writes_waiting",
            "Scheduled fires due whose write failed and is being tried again",
            registry=r,
        )
        self.unmatched = Counter(
            "pushrules_events_unmatched",
            "Events answered 202 that no enabled rule took (recorded, see history --unmatched)",
            registry=r,
        )
        self.pruned_rows = Counter(
            "pushrules_pruned_rows",
            "Rows forgotten by retention, by kind (sent, dropped, unmatched_events, marks, "
            "feed_keys)",
            ["kind"],
            registry=r,
        )
        self.prune_failures = Counter(
            "pushrules_prune_failures",
            "Prune rounds cut short by a store error (sending goes on; the next round retries)",
            registry=r,
        )
        for result in ("ok", "problems", "error"):
            self.reloads.labels(result=result)

    def fired(self, outcomes: Iterable[_Outcome]) -> None:
        for outcome in outcomes:
            self.fires.labels(rule=outcome.rule, status=outcome.status).inc()

    def reloaded(self, ok: bool, rules: int) -> None:
        self.reloads.labels(result="ok" if ok else "problems").inc()
        self.rules_loaded.set(rules)

    def reload_failed(self) -> None:
        """A reload that loaded nothing (pushrules.yaml broken, or the load itself failed)."""
        self.reloads.labels(result="error").inc()

    def event_unmatched(self) -> None:
        self.unmatched.inc()

    def feed_failed(self, rule: str) -> None:
        self.feed_failures.labels(rule=rule).inc()

    def pruned(self, kind: str, n: int) -> None:
        self.pruned_rows.labels(kind=kind).inc(n)

    def prune_failed(self) -> None:
        self.prune_failures.inc()

    def set_backlog(self, counts: Mapping[str, int]) -> None:
        """From :meth:`engine.outbox.store.Store.backlog` (every state present, zeros included)."""
        for state, n in counts.items():
            self.backlog.labels(state=state).set(n)

    def fire_write_retried(self, rule: str) -> None:
        self.fire_write_retries.labels(rule=rule).inc()

    def set_fire_writes_waiting(self, n: int) -> None:
        self.fire_writes_waiting.set(n)

    def set_paused(self, n: int) -> None:
        self.paused_rules.set(n)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE
