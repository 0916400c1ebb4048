"""One path for every fire: when, quiet hours, limit, compile, outbox, idempotency."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from engine.outbox.firing import FireRequest, decide, fire, fire_many, quiet_until, record
from engine.outbox.states import HELD, PENDING
from engine.outbox.store import Store
from engine.render.compiler import FireContext
from engine.rules.rule import QuietHours
from tests.helpers import load, make_project, write_rule

PARIS = ZoneInfo("Europe/Paris")
RULE = """
trigger: {event: e}
apps:
  flights-ios: {parentMessageId: "1"}
message:
  text: "Hi ${first_name}"
targets:
  - memberId: "{{ event.member }}"
"""


@pytest.fixture
def setup(tmp_path: Path):
    stores: list[Store] = []

    def build(extra: str = "", rule_text: str = RULE):
        root = make_project(tmp_path / f"p{len(stores)}")
        write_rule(root, "r", rule_text + extra)
        ruleset = load(root)
        assert ruleset.ok, ruleset.problems
        store = Store(f"sqlite:///{tmp_path / f'out{len(stores)}.db'}")
        stores.append(store)
        return store, ruleset.project, ruleset.rules["r"]

    yield build
    for store in stores:
        store.close()


NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def ctx(member: str = "m1", at: datetime = NOW) -> FireContext:
    return FireContext(now=at, event={"member": member})


def test_a_fire_is_queued_once_per_key(setup) -> None:
    store, project, rule = setup()
    first = fire(store, project, rule, ctx(), "event:1", now=NOW)
    again = fire(store, project, rule, ctx("other"), "event:1", now=NOW)
    assert first.status == "queued" and len(first.ids) == 1
    assert again.status == "duplicate" and again.ids == first.ids
    assert store.backlog()[PENDING] == 1
    body = store.get(first.ids[0]).request()
    assert body["sendInstantMessage"]["targets"] == [{"memberId": "m1"}]
    assert "user" not in body["sendInstantMessage"]


def test_when_false_records_nothing(setup) -> None:
    store, project, rule = setup("when: \"{{ event.member != 'skip' }}\"\n")
    outcome = fire(store, project, rule, ctx("skip"), "event:1", now=NOW)
    assert outcome.status == "filtered"
    assert store.backlog()[PENDING] == 0


def test_render_failure_is_reported_not_raised(setup) -> None:
    store, project, rule = setup()
    outcome = fire(store, project, rule, FireContext(now=NOW, event={}), "event:1", now=NOW)
    assert outcome.status == "failed"
    assert "member" in outcome.detail


def test_quiet_hours_defer_to_their_end(setup) -> None:
    store, project, rule = setup('quiet_hours: {from: "21:00", to: "08:00", then: defer}\n')
    late = datetime(2026, 11, 26, 22, 30, tzinfo=PARIS)
    outcome = fire(store, project, rule, ctx(at=late), "event:1", now=late.astimezone(UTC))
    assert outcome.status == "queued"
    assert outcome.not_before == datetime(2026, 11, 27, 8, 0, tzinfo=PARIS)
    assert store.get(outcome.ids[0]).next_attempt_at == outcome.not_before


def test_quiet_hours_skip(setup) -> None:
    store, project, rule = setup('quiet_hours: {from: "21:00", to: "08:00", then: skip}\n')
    early = datetime(2026, 11, 26, 6, 0, tzinfo=PARIS)
    outcome = fire(store, project, rule, ctx(at=early), "event:1", now=early.astimezone(UTC))
    assert outcome.status == "skipped"
    assert sum(store.backlog().values()) == 0


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        ("2026-11-26T20:59", None),
        ("2026-11-26T21:00", "2026-11-27T08:00"),
        ("2026-11-27T07:59", "2026-11-27T08:00"),
        ("2026-11-27T08:00", None),
        ("2026-10-25T01:00", "2026-10-25T08:00"),  # across the autumn change
    ],
)
def test_quiet_until_wraps_midnight(local: str, expected: str | None) -> None:
    at = datetime.fromisoformat(local).replace(tzinfo=PARIS)
    end = quiet_until(QuietHours("21:00", "08:00", "defer"), at)
    assert end == (
        None if expected is None else datetime.fromisoformat(expected).replace(tzinfo=PARIS)
    )


def test_daytime_quiet_hours() -> None:
    quiet = QuietHours("12:00", "14:00", "skip")
    assert quiet_until(quiet, datetime(2026, 1, 1, 13, 0, tzinfo=PARIS)) == datetime(
        2026, 1, 1, 14, 0, tzinfo=PARIS
    )
    assert quiet_until(quiet, datetime(2026, 1, 1, 15, 0, tzinfo=PARIS)) is None


def test_past_the_limit_fires_are_held_not_sent(setup) -> None:
    store, project, rule = setup("limit: {count: 2, per: 1h}\n")
    outcomes = fire_many(
        store,
        project,
        [FireRequest(rule, ctx(f"m{i}"), f"event:{i}") for i in range(4)],
        now=NOW,
    )
    # A runaway batch (a feed answering 10,000 items at once) is held past the limit too.
    assert [o.status for o in outcomes] == ["queued", "queued", "limited", "limited"]
    later = fire(store, project, rule, ctx("m9"), "event:9", now=NOW + timedelta(minutes=5))
    assert later.status == "limited"
    assert store.get(later.ids[0]).state == HELD
    after_window = fire(store, project, rule, ctx("m10"), "event:10", now=NOW + timedelta(hours=2))
    assert after_window.status == "queued"


def test_a_duplicate_takes_no_place_under_the_limit(setup) -> None:
    store, project, rule = setup("limit: {count: 2, per: 1h}\n")
    assert fire(store, project, rule, ctx(), "event:1", now=NOW).status == "queued"
    later = NOW + timedelta(hours=2)  # event:1 is out of the window, but still in the outbox
    keys = ["event:1", "event:2", "event:3", "event:4"]
    outcomes = fire_many(store, project, [FireRequest(rule, ctx(), key) for key in keys], now=later)
    assert [o.status for o in outcomes] == ["duplicate", "queued", "queued", "limited"]


def test_one_refused_fire_of_a_limited_rule_fails_alone(setup) -> None:
    store, project, rule = setup("limit: {count: 2, per: 1h}\n")
    decided = [
        (FireRequest(rule, ctx(f"m{i}"), f"event:{i}"), decide(project, rule, ctx(f"m{i}"), NOW))
        for i in range(4)
    ]
    bad = decided[1][1]
    decided[1] = (decided[1][0], replace(bad, requests=(replace(bad.requests[0], url="ftp://x"),)))
    outcomes = record(store, decided, now=NOW)
    # The refused fire takes no place: the two after it are sent, the last one held.
    assert [o.status for o in outcomes] == ["queued", "failed", "queued", "limited"]
    assert "http" in outcomes[1].detail


def test_for_each_over_nobody_is_empty(setup) -> None:
    rule_text = RULE.replace(
        '  - memberId: "{{ event.member }}"',
        '  - for_each: "{{ event.people }}"\n    target: {memberId: "{{ item }}"}',
    )
    store, project, rule = setup(rule_text=rule_text)
    outcome = fire(store, project, rule, FireContext(now=NOW, event={"people": []}), "e:1", now=NOW)
    assert outcome.status == "empty"
