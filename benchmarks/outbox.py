"""What the store's queries cost as the history grows: each one the daemon runs on a timer or per
request, and every ``history`` filter, timed on stores of N rows side by side.

Each store is filled through the real code path, in bulk: fires enqueued 2,000 at a time,
claimed, and their results recorded (an attempt each), as the dispatcher does; 2% are held
then dropped. Traffic is a steady ``--per-day`` requests over 50 rules, so a longer history
means older rows, not busier days (10,000 rows are two days of it, 1,000,000 two hundred).
On top, whatever the history's length: 100 pending rows (deferred), 10 in_doubt, 10 dead, 10
held, no retrying or failed; 10 feeds with a key per 1,000 rows, an unmatched event per 1,000.
On PostgreSQL the leader's fold runs after each batch and the stores are vacuumed and analysed
before timing, as autovacuum keeps a live store.

The stores are timed in turn, query by query (one warm-up, then up to 15 rounds within 3
seconds), so a machine busy with something else weighs on all sizes alike; the table gives each
size's median and the ratio of the largest's median to the smallest's. Then the disk each store
takes, and the time to prune what a 90-day retention lets go.

    python benchmarks/outbox.py [--rows 10000,1000000] [--store URL] [--per-day 5000]
                                [--no-prune]

Target: each query at 1,000,000 rows within 2x its time at 10,000, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    ScratchSchema,
    print_table,
)
from sqlalchemy import text

from engine.outbox.schema import utcnow
from engine.outbox.states import DEAD, HELD, IN_DOUBT, SENT
from engine.outbox.store import AttemptResult, Fire, ResultUpdate, Store

URL = "https://api.example.invalid/sendInstantMessage.php"
RULES = 50
BATCH = 2000
LEASE = timedelta(minutes=5)
DAY = timedelta(days=1)


def body(n: int) -> dict[str, Any]:
    """A typical one-target request (about 300 bytes stored)."""
    return {
        "sendInstantMessage": {
            "partner": {"id": "bench_partner"},
            "parentMessageId": "1",
            "message": {
                "subject": "Your flight",
                "text": f"Hello ${{first_name}}, flight AF{n % 9000 + 1000}: gate B{n % 60}",
                "data": {"flightref": f"AF{n % 9000 + 1000}"},
            },
            "targets": [{"memberId": f"member-{n}", "data": {"first_name": "Patrick"}}],
        }
    }


def fill(store: Store, rows: int, per_day: int, now: datetime) -> float:
    """``rows`` requests up to an hour ago, oldest first; returns the seconds it took."""
    started = time.perf_counter()
    span = timedelta(days=rows / per_day)
    done_at = now - timedelta(hours=1)
    n = 0
    while n < rows:
        size = min(BATCH, rows - n)
        at = done_at - span + span * (n / rows)
        held = size // 50
        fires = [Fire(f"rule-{i % RULES}", f"k{i}", [(URL, body(i))]) for i in range(n, n + size)]
        store.enqueue_many(fires[held:], now=at)
        store.enqueue_many(
            [Fire("limited", f.idem_key, f.requests) for f in fires[:held]], now=at, state=HELD
        )
        store.drop_unsent(rule="limited", now=at)
        claimed = store.claim("filler", size, at, LEASE)
        result = AttemptResult(at, 0.08, 200, 0, "Message sent", "msg")
        store.record_results(
            [ResultUpdate(r.id, result, SENT, claimed_by=r.claimed_by) for r in claimed]
        )
        if hasattr(store, "see_keys"):  # a key per 1,000 rows in each of 10 feeds
            for feed in range(10):
                keys = [f"item-{k}" for k in range(n, n + size, 1000)]
                store.see_keys(f"feed:feed-{feed}", keys, at)
        for k in range(n, n + size, 1000):
            store.record_unmatched("nobody", f"u{k}", "no rule listens", "{}", now=at)
        if hasattr(store, "fold_counts"):
            store.fold_counts()  # as the daemon's leader does every 5 s
        n += size
        if n % 100_000 < BATCH:
            print(f"  {n:,} rows, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if hasattr(store, "see_keys"):
        for feed in range(10):  # each feed read a moment ago
            store.see_keys(f"feed-primed:feed-{feed}", ["0123456789abcdef"], now)
    live(store, now)
    return time.perf_counter() - started


def live(store: Store, now: datetime) -> None:
    """The rows on their way or waiting for a person, the same whatever the history."""
    fires = [Fire("rule-1", f"live{i}", [(URL, body(i))]) for i in range(120)]
    store.enqueue_many(fires[:100], now=now, not_before=now + DAY)  # deferred: not due
    store.enqueue_many(fires[100:], now=now - timedelta(minutes=10))
    claimed = store.claim("filler", 20, now, LEASE)
    failed = AttemptResult(now, 30.0, None, None, None, None, "read timeout")
    store.record_results(
        [
            ResultUpdate(r.id, failed, IN_DOUBT if i < 10 else DEAD, claimed_by=r.claimed_by)
            for i, r in enumerate(claimed)
        ]
    )
    store.enqueue_many(
        [Fire("rule-2", f"held{i}", [(URL, body(i))]) for i in range(10)], now=now, state=HELD
    )


def timed(
    calls: Sequence[Callable[[], object]], *, rounds: int = 15, budget: float = 3.0
) -> list[float]:
    """Median milliseconds of each call, the calls taken in turn, after a warm-up each."""
    for call in calls:
        call()
    took: list[list[float]] = [[] for _ in calls]
    deadline = time.perf_counter() + budget
    while len(took[0]) < rounds and (not took[0] or time.perf_counter() < deadline):
        for call, times in zip(calls, took, strict=True):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
    return [statistics.median(times) for times in took]


def queries(store: Store, now: datetime) -> list[tuple[str, str, Callable[[], object] | None]]:
    since = now - DAY
    new = hasattr(store, "prune_batch")
    return [
        ("backlog()", "every /healthz and /metrics", store.backlog),
        ("paused()", "/healthz, /metrics, claims", lambda: store.paused(now)),
        ("next_due()", "the dispatcher, when idle", store.next_due),
        ("claim 16, none due", "the dispatcher, all the time", lambda: _claim(store, now)),
        ("reclaim()", "the dispatcher, every 2 s", lambda: store.reclaim(now)),
        ("count_fires(rule, 1h)", "a fire of a rule with a limit", lambda: _count(store, now)),
        ("enqueue a duplicate", "an event retried", lambda: _duplicate(store, now)),
        (
            "see_keys(feed, 100 keys)",
            "a poll (keys refreshed daily)",
            (lambda: _poll(store, now)) if new else None,
        ),
        ("fold_counts()", "the leader, every 5 s", store.fold_counts if new else None),
        (
            "prune_batch(sent), none old",
            "the leader, every 10 min",
            (lambda: store.prune_batch("sent", 3650 * DAY, now)) if new else None,
        ),
        ("history", "pushrules history", lambda: store.history()),
        ("history --rule R", "", lambda: store.history(rule="rule-7")),
        ("history --status retrying (none)", "", lambda: store.history(states=["retrying"])),
        ("history --status in_doubt", "", lambda: store.history(states=[IN_DOUBT])),
        ("history --status sent", "", lambda: store.history(states=[SENT])),
        ("history --since 1d", "", lambda: store.history(since=since)),
        (
            "history --rule R --status sent",
            "",
            lambda: store.history(rule="rule-7", states=[SENT]),
        ),
        ("history --rule R --since 1d", "", lambda: store.history(rule="rule-7", since=since)),
        ("history --unmatched --since 1d", "", lambda: store.unmatched(since=since, limit=1000)),
    ]


def _claim(store: Store, now: datetime) -> None:
    assert store.claim("bench", 16, now, LEASE) == []


def _count(store: Store, now: datetime) -> int:
    return store.count_fires("rule-7", now - timedelta(hours=1))


def _duplicate(store: Store, now: datetime) -> None:
    assert not store.enqueue("rule-7", "k107", [(URL, body(107))], now=now).created


def _poll(store: Store, now: datetime) -> None:
    store.see_keys("feed:feed-1", [f"item-{k}" for k in range(0, 10_000, 100)], now)


def disk(url: str, path: Path | None) -> tuple[int, str, list[tuple[str, int]]]:
    """Bytes the store takes on disk (SQLite: once closed and checkpointed), what counts, and
    the tables and indexes that take most of it."""
    if path is not None:
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            parts = conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ).fetchall()
        size = path.stat().st_size + sum(
            p.stat().st_size for p in path.parent.glob(path.name + "-*")
        )
        return size, "the SQLite file: tables and indexes", parts
    # The bulk fill leaves each row's earlier versions behind, which a live store's autovacuum
    # reclaims as it goes: count the store compacted, as it settles.
    with Store(url) as store, store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM FULL")
    with Store(url) as store, store.engine.connect() as conn:
        size = conn.execute(
            text(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'"
            )
        ).scalar_one()
        parts = conn.execute(
            text(
                "SELECT c.relname, pg_total_relation_size(c.oid) - CASE WHEN c.relkind = 'r' "
                "THEN pg_indexes_size(c.oid) ELSE 0 END FROM pg_class c "
                "WHERE c.relnamespace = current_schema()::regnamespace "
                "AND c.relkind IN ('r', 'i') ORDER BY 2 DESC"
            )
        ).all()
    return int(size), "after VACUUM FULL: tables, indexes and TOAST", list(parts)


def prune_all(store: Store, now: datetime) -> tuple[int, float]:
    """Everything a 90-day retention lets go, batch by batch; (rows, seconds)."""
    from engine.outbox.retention import prune
    from engine.rules.project import RetentionConfig

    started = time.perf_counter()
    done = prune(store, RetentionConfig(), now)
    return sum(n or 0 for n in done.values()), time.perf_counter() - started


@dataclass
class Bench:
    """One store of the run: its size, where it is, what it measured."""

    rows: int
    url: str
    path: Path | None
    scratch: ScratchSchema | None
    store: Store | None = None
    fill_s: float = 0.0
    total: int = 0


def open_benches(sizes: Sequence[int], base: str | None, tmp: Path) -> list[Bench]:
    benches = []
    for rows in sizes:
        path = None if base else tmp / f"outbox-{rows}.db"
        url = base or f"sqlite:///{path}"
        scratch = ScratchSchema.for_url(url)
        benches.append(Bench(rows, scratch.url if scratch else url, path, scratch))
    return benches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default="10000,1000000", help="store sizes, comma-separated (10000,1000000)"
    )
    parser.add_argument("--store", help="store URL (default: fresh SQLite files)")
    parser.add_argument("--per-day", type=int, default=5000, help="requests a day (default 5000)")
    parser.add_argument("--no-prune", action="store_true", help="skip the prune at the end")
    args = parser.parse_args(argv)
    sizes = [int(n.replace("_", "")) for n in args.rows.split(",")]

    tmp = tempfile.TemporaryDirectory(prefix="pushrules-bench-")
    benches = open_benches(sizes, args.store, Path(tmp.name))
    now = utcnow()
    table: list[tuple[str, ...]] = []
    try:
        for bench in benches:
            bench.store = store = Store(bench.url)
            print(f"filling {bench.rows:,} rows ({store.dialect}) ...", file=sys.stderr)
            bench.fill_s = fill(store, bench.rows, args.per_day, now)
            if store.dialect == "postgresql":
                if hasattr(store, "fold_counts"):
                    store.fold_counts()
                with store.engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                        "VACUUM ANALYZE"  # what autovacuum keeps up in a live store
                    )
            bench.total = sum(store.backlog().values())
        per_store = [queries(b.store, now) for b in benches if b.store is not None]
        for index, (name, who, call) in enumerate(per_store[0]):
            if call is None:
                table.append((name, who, *["n/a"] * len(benches), ""))
                continue
            medians = timed([qs[index][2] for qs in per_store])  # type: ignore[misc]
            ratio = f"{medians[-1] / medians[0]:.2f}" if len(medians) > 1 else ""
            table.append((name, who, *[f"{m:.2f}" for m in medians], ratio))
        for bench in benches:
            if bench.store is not None:
                bench.store.close()
        report_fill(benches, args.per_day)
        header = ("query", "run by", *[f"ms at {b.rows:,}" for b in benches], "ratio")
        print_table(header, table, left={0, 1})
        for bench in benches:
            report_disk(bench, args.no_prune, now)
    finally:
        for bench in benches:
            if bench.scratch is not None:
                bench.scratch.drop()
        tmp.cleanup()
    return 0


def report_fill(benches: Sequence[Bench], per_day: int) -> None:
    for b in benches:
        print(
            f"{b.total:,} outbox rows on {b.url.split(':', 1)[0].split('+')[0]} "
            f"({per_day:,} a day over {b.rows / per_day:,.0f} days), filled in {b.fill_s:.0f} s "
            f"({b.rows / b.fill_s:,.0f} rows/s through enqueue, claim and record_results)"
        )


def report_disk(bench: Bench, no_prune: bool, now: datetime) -> None:
    size, what, parts = disk(bench.url, bench.path)
    biggest = ", ".join(f"{name} {n / size:.0%}" for name, n in parts[:7])
    print(
        f"{bench.rows:,} rows: disk {size / 2**20:,.0f} MiB, "
        f"{size / bench.total * 1e6 / 2**20:,.0f} MiB per million rows (each with one attempt; "
        f"{what}); of which {biggest}"
    )
    with Store(bench.url) as store:
        if no_prune or not hasattr(store, "prune_batch"):
            return
        n, seconds = prune_all(store, now)
    rate = f" ({n / seconds:,.0f} rows/s, batches of 500)" if n else ""
    print(f"{bench.rows:,} rows: prune at 90 days: {n:,} rows in {seconds:.1f} s{rate}")


if __name__ == "__main__":
    raise SystemExit(main())
