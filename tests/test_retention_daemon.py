"""Issue 12 point 1, end to end: a running daemon prunes by itself, batch by batch, while it
keeps taking and sending events; what needs a person stays; /healthz and /metrics say so."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.outbox.states import DROPPED, IN_DOUBT, SENT
from engine.outbox.store import AttemptResult, Fire, ResultUpdate
from tests.conftest import StartDaemon
from tests.daemon_process import HTTP, Project

pytestmark = pytest.mark.e2e

URL = "https://api.example.invalid/sendInstantMessage.php"


def test_the_leader_prunes_old_rows_while_it_sends(
    one_rule_project: Project, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    project = one_rule_project
    old = datetime.now(UTC) - timedelta(days=120)
    with project.store() as store:
        fires = [Fire("old", f"k{i}", [(URL, {"sendInstantMessage": {}})]) for i in range(1205)]
        store.enqueue_many(fires, now=old)
        claimed = store.claim("before", 1205, old, timedelta(minutes=5))
        done = AttemptResult(old, 0.05, 200, 0, "sent", "mid")
        store.record_results(
            [ResultUpdate(r.id, done, SENT, claimed_by=r.claimed_by) for r in claimed[:1200]]
        )
        store.record_results(
            [ResultUpdate(r.id, done, IN_DOUBT, claimed_by=r.claimed_by) for r in claimed[1200:]]
        )
        store.enqueue("old", "dropped", [(URL, {"sendInstantMessage": {}})], now=old)
        store.drop_unsent(now=old)

    # The first prune round comes one fold after the daemon leads: half a second, not 5 s.
    project.timing["daemon.fold_every"] = "500ms"
    project.write_config()
    daemon = daemons(project)
    response = daemon.post("ping", {"marker": "during"})
    assert response.status_code == 202
    report = daemon.wait_health(
        lambda r: (r.get("retention") or {}).get("last_finished_at"),
        "a prune round",
        timeout=30,
    )
    assert report["retention"]["last_pruned"] == {
        "sent": 1200,
        "dropped": 1,
        "unmatched_events": 0,
        "marks": 0,
        "feed_keys": 0,
    }
    assert report["retention"]["last_error"] is None
    daemon.wait_health(lambda r: r["outbox"][SENT] == 1, "the event's push sent")
    assert report["outbox"][IN_DOUBT] == 5 and report["outbox"][DROPPED] == 0
    assert [r["body"]["sendInstantMessage"]["message"]["text"] for r in sandbox.requests()] == [
        "ping during"
    ]
    metrics = HTTP.get(project.url + "/metrics", timeout=5).text
    assert 'pushrules_pruned_rows_total{kind="sent"} 1200.0' in metrics
    assert 'pushrules_outbox_backlog{state="in_doubt"} 5.0' in metrics
