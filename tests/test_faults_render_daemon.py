"""A runaway or mangled render fails only its own fire, in a real ``pushrules run`` process.

One event reaches four rules: two with runaway templates, one whose target id is null, one
honest. The honest one is sent; the event is answered 422 with each other reported as its
fire's failure, naming the rule and the field; the daemon stays healthy and answers at once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.accengage.sandbox import RunningSandbox
from tests.daemon_process import Daemon, Project, wait_for

pytestmark = pytest.mark.e2e

NULL_ID_RULE = """\
trigger:
  event: ping
apps:
  app-ios: {parentMessageId: "1"}
message:
  subject: Test
  text: "null id {{ event.n }}"
targets:
  - memberId: "{{ event.member_id }}"
"""


def test_a_runaway_or_null_render_fails_only_its_own_fire(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("loop", "event: ping", "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}")
    project.rule("width", "event: ping", "{{ '%02000000000d' % 1 }}")
    project.rule("good", "event: ping", "ok {{ event.n }} {{ event.member_id }}.")
    (project.root / "rules" / "nullid.yaml").write_text(NULL_ID_RULE)
    daemon = Daemon(project).start()
    try:
        started = time.monotonic()
        answer = daemon.post("ping", {"n": 1, "member_id": None})
        elapsed = time.monotonic() - started
        # 422 names the rules that could not fire; the others' fires are stored all the same.
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert all(f"rule {name}" in error for name in ("loop", "width", "nullid")), error
        outcomes = {r["rule"]: r for r in answer.json()["rules"]}
        assert outcomes["good"]["status"] == "queued", outcomes
        assert elapsed < 5, f"the event took {elapsed:.1f} s to answer"
        for rule, field, words in [
            ("loop", "message.text", "nest more than 50 levels"),
            ("width", "message.text", "format width of 2,000,000,000"),
            ("nullid", "targets[0].memberId", "event.member_id is null"),
        ]:
            assert outcomes[rule]["status"] == "failed", outcomes
            assert outcomes[rule]["detail"].startswith(f"rule {rule}, {field}: "), outcomes
            assert words in outcomes[rule]["detail"], outcomes
        wait_for(lambda: sandbox.requests(), "the honest rule to be sent", log=daemon.log)
        texts = [r["body"]["sendInstantMessage"]["message"]["text"] for r in sandbox.requests()]
        assert texts == ["ok 1 ."], daemon.log()  # null printed as empty text, not "None"
        status, health = daemon.health()
        assert status == 200, health
        assert any("rule loop did not fire" in m for m in daemon.messages()), daemon.log()
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.kill()
