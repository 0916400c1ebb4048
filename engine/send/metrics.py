"""The dispatcher's Prometheus metrics: what each attempt did, counted where it happens.

The one place these counts live: the daemon's ``/metrics`` renders the registry they are made
in (:class:`engine.daemon.metrics.Metrics` passes its own), and the benchmarks and tests read
them back through :meth:`DispatchMetrics.value`. A dispatcher made without one counts into a
registry of its own, so several in one process never mix their counts.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.outbox.states import RETRYING

#: Seconds of one HTTP attempt.
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: The ``return_code`` label of an attempt without a returnCode (transport error, no JSON).
NO_CODE: Final = "none"


class DispatchMetrics:
    """Sends by returnCode, retries, and send latency, in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sends = Counter(
            "pushrules_sends",
            "Requests sent to Accengage by returnCode ('none': no JSON answer or no answer)",
            ["return_code"],
            registry=r,
        )
        self.retries = Counter(
            "pushrules_retries", "Attempts that ended in a retry later", registry=r
        )
        self.send_latency = Histogram(
            "pushrules_send_latency_seconds",
            "Time of one HTTP attempt to Accengage",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def attempted(
        self, return_code: int | None, seconds: float, state: str, *, sent: bool = True
    ) -> None:
        """One attempt and the state it left its row in. ``sent`` False: no request left (a
        credential was unreadable), so it has no returnCode and no latency, only maybe a retry.
        """
        if sent:
            self.sends.labels(
                return_code=NO_CODE if return_code is None else str(return_code)
            ).inc()
            self.send_latency.observe(seconds)
        if state == RETRYING:
            self.retries.inc()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 if never counted), e.g. ``value("pushrules_sends_total",
        return_code="0")``: what the benchmarks and tests read."""
        return self.registry.get_sample_value(name, labels) or 0.0

    @property
    def accepted(self) -> int:
        """Attempts Accengage answered with returnCode 0: the requests it took."""
        return int(self.value("pushrules_sends_total", return_code="0"))
