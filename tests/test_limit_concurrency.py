"""A rule's ``limit`` holds when several instances fire it at once (docs/rules.md 4.6).

Each writer has its own :class:`Store`, as each ``pushrules run`` sharing one outbox does, and
all fire the limited rule through :func:`fire_many`, the path every trigger takes. A barrier
lines their first fires up, so a count read apart from its write lets more than ``count``
through.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.outbox.firing import FireRequest, fire_many
from engine.outbox.store import Store
from engine.render.compiler import FireContext
from engine.rules.project import Project
from engine.rules.rule import Rule
from tests.helpers import load, make_project, write_rule

LIMIT = 5
WRITERS = 4
FIRES_EACH = 4  # 16 fires a round against a limit of 5
ROUNDS = 4
NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

RULE = f"""
trigger: {{event: e}}
apps:
  flights-ios: {{parentMessageId: "1"}}
message:
  text: "Hi ${{first_name}}"
targets:
  - memberId: "{{{{ event.member }}}}"
limit: {{count: {LIMIT}, per: 1h}}
"""


def _rule(tmp_path: Path) -> tuple[Project, Rule]:
    root = make_project(tmp_path / "project")
    write_rule(root, "r", RULE)
    ruleset = load(root)
    assert ruleset.ok, ruleset.problems
    return ruleset.project, ruleset.rules["r"]


def _round(stores: list[Store], project: Project, rule: Rule, round_: int) -> list[str]:
    """Every store's writers fire the rule at once, a fire at a time; their outcomes."""
    now = NOW + timedelta(hours=2 * round_)  # a fresh window each round
    barrier = threading.Barrier(WRITERS)
    statuses: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            for i in range(FIRES_EACH):
                ctx = FireContext(now=now, event={"member": f"m{n}-{i}"})
                request = FireRequest(rule, ctx, f"event:{round_}:{n}:{i}")
                outcomes = fire_many(stores[n % len(stores)], project, [request], now=now)
                with lock:
                    statuses.extend(o.status for o in outcomes)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return statuses


def _race(url: str, instances: int, tmp_path: Path) -> None:
    """Round after round, exactly ``LIMIT`` fires are sent and the rest held."""
    project, rule = _rule(tmp_path)
    stores = [Store(url) for _ in range(instances)]
    try:
        total = WRITERS * FIRES_EACH
        for round_ in range(ROUNDS):
            statuses = _round(stores, project, rule, round_)
            sent = statuses.count("queued")
            assert (sent, statuses.count("limited")) == (LIMIT, total - LIMIT), (
                f"round {round_}: {sent} sent of {total}, limit {LIMIT}"
            )
        rows = stores[0].history(rule=rule.id, limit=10_000)
        assert sum(r.state == "pending" for r in rows) == LIMIT * ROUNDS
        assert sum(r.state == "held" for r in rows) == (total - LIMIT) * ROUNDS
    finally:
        for store in stores:
            store.close()


def test_the_limit_holds_across_instances_on_postgres(postgres_store: str, tmp_path: Path) -> None:
    """Several instances on one PostgreSQL: a lock per rule orders their count-and-write."""
    _race(postgres_store, WRITERS, tmp_path)


def test_the_limit_holds_across_stores_on_one_sqlite_file(tmp_path: Path) -> None:
    """Two stores on one SQLite file: the count is read inside the write transaction, which
    holds SQLite's write lock from its BEGIN."""
    _race(f"sqlite:///{tmp_path / 'outbox.db'}", 2, tmp_path)
