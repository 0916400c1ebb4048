"""One metrics path: the dispatcher counts its attempts in Prometheus counters, in the daemon's
registry when given it, and ``/metrics``, benchmarks and tests all read those same counters."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from engine.daemon.metrics import Metrics
from engine.outbox.store import Store
from engine.rules.secrets import SecretRef
from engine.send.dispatch import Credentials, Dispatcher
from engine.send.metrics import DispatchMetrics
from tests.test_dispatch import CREDENTIALS, FAST, enqueue

URL = "http://accengage.test/v1/sendInstantMessage"
#: Every family /metrics showed before the dispatcher counted for itself, in its order.
FAMILIES = [
    "pushrules_fires_total counter",
    "pushrules_sends_total counter",
    "pushrules_retries_total counter",
    "pushrules_retries_created gauge",
    "pushrules_send_latency_seconds histogram",
    "pushrules_send_latency_seconds_created gauge",
    "pushrules_outbox_backlog gauge",
    "pushrules_reloads_total counter",
    "pushrules_reloads_created gauge",
    "pushrules_rules_loaded gauge",
    "pushrules_feed_failures_total counter",
    "pushrules_paused_rules gauge",
    "pushrules_fire_write_retries_total counter",
    "pushrules_fire_writes_waiting gauge",
    "pushrules_events_unmatched_total counter",
    "pushrules_events_unmatched_created gauge",
    "pushrules_pruned_rows_total counter",
    "pushrules_prune_failures_total counter",
    "pushrules_prune_failures_created gauge",
]


def answer(request: httpx.Request) -> httpx.Response:
    """Accepts every request but m-2's, which gets a 503 (retried later)."""
    marker = json.loads(request.content)["sendInstantMessage"]["message"]["text"]
    if marker == "m-2":
        return httpx.Response(503, text="busy")
    return httpx.Response(200, json={"returnCode": "0", "messageId": marker})


def dispatch_once(store: Store, metrics: DispatchMetrics | None, creds: Credentials) -> Dispatcher:
    async def go() -> Dispatcher:
        transport = httpx.MockTransport(answer)
        async with Dispatcher(
            store, FAST, creds, transport=transport, metrics=metrics
        ) as dispatcher:
            await dispatcher.run_once(10)
            return dispatcher

    return asyncio.run(go())


@pytest.fixture(autouse=True)
def _login(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUSHRULES_TEST_LOGIN", "ops@example.com")
    monkeypatch.setenv("PUSHRULES_TEST_PASSWORD", "pw-secret-1234")


def test_the_daemon_renders_what_the_dispatcher_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        enqueue(store, URL, 3)
        dispatcher = dispatch_once(store, metrics.dispatch, CREDENTIALS)
    assert dispatcher.metrics is metrics.dispatch
    text = metrics.render()[0].decode()
    for line in (
        'pushrules_sends_total{return_code="0"} 2.0',
        'pushrules_sends_total{return_code="none"} 1.0',
        "pushrules_retries_total 1.0",
        "pushrules_send_latency_seconds_count 3.0",
    ):
        assert line in text
    assert metrics.dispatch.accepted == 2


def test_metrics_show_the_same_families_in_the_same_order() -> None:
    text = Metrics().render()[0].decode()
    types = [line.removeprefix("# TYPE ") for line in text.splitlines() if line[:6] == "# TYPE"]
    assert types == FAMILIES


def test_a_dispatcher_alone_counts_in_a_registry_of_its_own(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'a.db'}") as a, Store(f"sqlite:///{tmp_path / 'b.db'}") as b:
        enqueue(a, URL, 3)
        first = dispatch_once(a, None, CREDENTIALS)
        enqueue(b, URL, 2)
        second = dispatch_once(b, None, CREDENTIALS)
    assert (first.metrics.accepted, second.metrics.accepted) == (2, 2)
    assert first.metrics.value("pushrules_retries_total") == 1.0
    assert second.metrics.value("pushrules_retries_total") == 0.0


def test_an_unreadable_credential_is_a_retry_and_no_send(tmp_path: Path) -> None:
    missing = Credentials(SecretRef("env", "PUSHRULES_TEST_NO_SUCH_VAR"), SecretRef("env", "X"))
    with Store(f"sqlite:///{tmp_path / 'o.db'}") as store:
        enqueue(store, URL, 2)
        dispatcher = dispatch_once(store, None, missing)
    m = dispatcher.metrics
    assert m.value("pushrules_retries_total") == 2.0
    assert m.value("pushrules_sends_total", return_code="none") == 0.0
    assert m.value("pushrules_send_latency_seconds_count") == 0.0
