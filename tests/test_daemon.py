"""``pushrules run`` end to end: a real daemon process, real HTTP, a sandbox Accengage.

Each test writes a project in tmp_path whose pushrules.yaml sends to a sandbox started in this
process, and drives ``python -m engine run`` from outside: files, signals, HTTP, the CLI and
the store. Time-dependent behaviour is reached through ``PUSHRULES_CLOCK`` (the daemon's clock
starts at that instant and runs at real speed), so no test waits for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from engine.accengage.sandbox import RunningSandbox
from engine.cli.main import main
from engine.daemon.watcher import fingerprint
from engine.outbox.states import PENDING, SENDING, SENT
from tests.conftest import StartDaemon
from tests.daemon_process import Daemon, FeedServer, Project, started_before, texts, wait_for

pytestmark = pytest.mark.e2e

MORNING = 'cron: "0 9 * * *"\ntimezone: Europe/Paris'
TOKEN_VAR, TOKEN = "PR_TEST_INTAKE_TOKEN", "intake-s3cret"


@pytest.fixture
def feeds() -> Iterator[FeedServer]:
    server = FeedServer()
    yield server
    server.close()


def clock_at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --- restart and catch-up ----------------------------------------------------------------------


def test_restart_catches_up_a_missed_fire_once_and_resends_nothing(
    tmp_path: Path, sandbox: RunningSandbox, feeds: FeedServer, daemons: StartDaemon
) -> None:
    """Stopped across 09:00, restarted at 09:03 (inside the default 10m catch_up): the fire
    goes out once, under the key it would have had on time; a third start sends nothing new,
    and neither restart sends an event or a feed item again."""
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("morning", MORNING, "morning {{ now.isoformat() }}")
    project.rule("ping", "event: ping", "ping {{ event.marker }}")
    feeds.json("/offers", {"offers": [{"id": "A"}]})
    poll = f"poll:\n  url: {feeds.url('/offers')}\n  every: 1s\n  items: offers\n  key: id"
    project.rule("offers", poll, "offer {{ item.id }}")

    # Run 1, stopped well before 09:00: an event and a feed item that is new go out.
    first = daemons(project, clock="2026-03-10T08:59:30+01:00", name="run1")
    assert first.post("ping", {"marker": "e1"}, key="k1").status_code == 202
    first.wait_health(lambda h: h["feeds"].get("offers", {}).get("last_ok_at"), "a first poll")
    feeds.json("/offers", {"offers": [{"id": "A"}, {"id": "B"}]})
    wait_for(lambda: texts(sandbox)["offer B"], "the new feed item to be sent", log=first.log)
    wait_for(lambda: texts(sandbox)["ping e1"], "the event to be sent", log=first.log)
    wait_for(lambda: project.mark("morning"), "the scheduler's first mark", log=first.log)
    assert first.stop() == 0, first.log()
    mark = project.mark("morning")
    assert mark is not None and mark < clock_at("2026-03-10T09:00:00+01:00"), first.log()
    assert texts(sandbox) == Counter({"ping e1": 1, "offer B": 1}), first.log()

    # Run 2 at 09:03: the 09:00 fire is caught up; nothing of run 1 is sent again.
    second = daemons(project, clock="2026-03-10T09:03:00+01:00", name="run2")
    caught_up = "morning 2026-03-10T09:00:00+01:00"
    wait_for(lambda: texts(sandbox)[caught_up], "the missed fire to be sent", log=second.log)
    again = second.post("ping", {"marker": "e1"}, key="k1")
    assert again.status_code == 202
    assert [r["status"] for r in again.json()["rules"]] == ["duplicate"]
    polled = second.wait_health(
        lambda h: h["feeds"].get("offers", {}).get("last_ok_at"), "a poll after the restart"
    )
    assert polled["feeds"]["offers"]["items_seen_last"] == 2
    assert polled["feeds"]["offers"]["new_items_last"] == 0
    assert second.stop() == 0, second.log()
    expected = Counter({"ping e1": 1, "offer B": 1, caught_up: 1})
    assert texts(sandbox) == expected, second.log()
    assert any(
        "catching up the fire due at 2026-03-10T08:00:00+00:00" in m for m in second.messages()
    ), second.log()

    # Run 3 at 09:04: the fire was handled, so there is nothing to catch up.
    third = daemons(project, clock="2026-03-10T09:04:00+01:00", name="run3")
    wait_for(
        lambda: (project.mark("morning") or mark) >= clock_at("2026-03-10T09:04:00+01:00"),
        "run 3's catch-up to record its mark",
        log=third.log,
    )
    assert third.stop() == 0, third.log()
    assert texts(sandbox) == expected, third.log()
    rows = project.rows("morning")
    assert [(r.idem_key, r.state) for r in rows] == [("schedule:2026-03-10T08:00:00+00:00", SENT)]
    assert not any("catching up" in m for m in third.messages()), third.log()


def test_a_fire_missed_by_more_than_catch_up_is_skipped_and_logged(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """Restarted at 09:30, the 09:00 fire is 30 minutes old, past catch_up (10m): not sent,
    and the log says which fire was skipped and why."""
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("morning", MORNING, "morning {{ now.isoformat() }}")
    first = daemons(project, clock="2026-03-10T08:59:30+01:00", name="run1")
    wait_for(lambda: project.mark("morning"), "the scheduler's first mark", log=first.log)
    assert first.stop() == 0, first.log()

    second = daemons(project, clock="2026-03-10T09:30:00+01:00", name="run2")
    wait_for(
        lambda: project.mark("morning") >= clock_at("2026-03-10T09:30:00+01:00"),
        "run 2's catch-up to record its mark",
        log=second.log,
    )
    assert second.stop() == 0, second.log()
    assert sandbox.requests() == [], second.log()
    assert project.rows() == [], second.log()
    skipped = [m for m in second.messages() if "2026-03-10T08:00:00+00:00 skipped" in m]
    assert len(skipped) == 1, second.log()
    assert "older than catch_up (10m00s)" in skipped[0]


def test_a_daemon_running_across_the_fire_time_sends_it_once_on_time(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """The clock starts a few seconds before 09:00: the running schedule sends the 09:00 fire
    once, never before 09:00 on the clock, and not as a catch-up.

    The clock is set years ahead of the system's on purpose: rows are due at clock instants,
    so a dispatcher that claimed on the system clock would never send them. How late the fire
    may be is left to wait_for's deadline: a busy machine makes it late, not wrong.
    """
    due = clock_at("2036-03-10T09:00:00+01:00")
    projects: list[Project] = []

    def start(clock: str, attempt: int) -> Daemon:
        projects.append(Project(tmp_path / f"project{attempt}", sandbox.url))
        projects[-1].rule("morning", MORNING, "morning {{ now.isoformat() }}")
        return daemons(projects[-1], clock=clock, name=f"run{attempt}")

    daemon = started_before(start, due, margin=0.5)
    project = projects[-1]
    text = "morning 2036-03-10T09:00:00+01:00"
    assert daemon.clock is not None
    lead = (due - clock_at(daemon.clock)).total_seconds()
    # A busy machine may have needed a longer lead: 09:00 is that far from the start.
    wait_for(lambda: texts(sandbox)[text], "the 09:00 fire", timeout=lead + 10, log=daemon.log)
    received = datetime.fromisoformat(sandbox.requests()[0]["received_at"]).timestamp()
    # The clock started after the process did, so 09:00 on it came at least ``lead`` later.
    assert received >= daemon.started_at + lead - 0.05, daemon.log()
    assert not any("catching up" in m for m in daemon.messages()), daemon.log()
    assert daemon.stop() == 0, daemon.log()
    assert texts(sandbox) == Counter({text: 1}), daemon.log()
    assert [r.idem_key for r in project.rows()] == ["schedule:2036-03-10T08:00:00+00:00"]


# --- reload ------------------------------------------------------------------------------------


def rewrite_unseen(path: Path, old: str, new: str) -> None:
    """Edit a file in place keeping its size and mtime: only a reload on demand can see it."""
    assert len(old) == len(new)
    stat = path.stat()
    path.write_text(path.read_text().replace(old, new))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_reload_follows_rule_files_and_sighup(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """Changed, added, broken, deleted and repaired rule files, and SIGHUP, while it runs."""
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("changed", 'cron: "0 10 * * *"', "changed")
    project.rule("deleted", 'cron: "0 12 * * *"', "deleted")
    hup = project.rule("hup", 'cron: "0 13 * * *"', "hup")
    project.rule("kept", "event: kept", "kept v1 {{ event.marker }}")
    daemon = daemons(project, clock="2026-03-10T08:00:00+01:00")
    status, report = daemon.health()
    assert status == 200
    assert report["next_fires"] == {
        "changed": "2026-03-10T10:00:00+01:00",
        "deleted": "2026-03-10T12:00:00+01:00",
        "hup": "2026-03-10T13:00:00+01:00",
    }

    # SIGHUP: an edit the watcher's poll cannot see (same size, same mtime) is picked up.
    before = fingerprint(project.root)
    rewrite_unseen(hup, '"0 13 * * *"', '"0 14 * * *"')
    assert fingerprint(project.root) == before
    daemon.signal(signal.SIGHUP)
    daemon.wait_health(
        lambda h: h["next_fires"].get("hup") == "2026-03-10T14:00:00+01:00", "SIGHUP's reload"
    )

    # One burst of edits: changed, added, deleted, and two rules broken (an unknown app, a
    # YAML syntax error).
    project.rule("changed", 'cron: "30 10 * * *"', "changed")
    project.rule("added", 'cron: "0 11 * * *"', "added")
    (project.root / "rules" / "deleted.yaml").unlink()
    kept = project.root / "rules" / "kept.yaml"
    kept.write_text(kept.read_text().replace("kept v1", "kept v2").replace("app-ios:", "app-typo:"))
    hup.write_text('trigger: {cron: "0 15 * * *"\n')
    report = daemon.wait_health(
        lambda h: "deleted" not in h["next_fires"] and h["rules"]["kept_at_last_good_version"],
        "the reload of the burst of edits",
    )
    assert report["next_fires"] == {
        "added": "2026-03-10T11:00:00+01:00",
        "changed": "2026-03-10T10:30:00+01:00",
        "hup": "2026-03-10T14:00:00+01:00",  # its last good version's
    }
    assert report["rules"]["kept_at_last_good_version"] == ["hup", "kept"]
    assert report["rules"]["errors"] >= 2
    for name in ("hup", "kept"):
        assert any(f"rules/{name}.yaml" in line for line in report["rules"]["first_errors"])
    assert report["ok"] and report["last_reload"]["ok"] is False
    # The broken rule still runs, at its last good version.
    assert daemon.post("kept", {"marker": "a"}).status_code == 202
    wait_for(lambda: texts(sandbox)["kept v1 a"], "the last good version to fire", log=daemon.log)

    # Repaired: the new versions run and the problems are gone.
    project.rule("kept", "event: kept", "kept v2 {{ event.marker }}")
    project.rule("hup", 'cron: "0 15 * * *"', "hup")
    report = daemon.wait_health(
        lambda h: not h["rules"]["kept_at_last_good_version"], "the reload of the repairs"
    )
    assert report["rules"]["errors"] == 0
    assert report["next_fires"]["hup"] == "2026-03-10T15:00:00+01:00"
    assert daemon.post("kept", {"marker": "b"}).status_code == 202
    wait_for(lambda: texts(sandbox)["kept v2 b"], "the repaired version to fire", log=daemon.log)
    assert daemon.stop() == 0, daemon.log()
    assert texts(sandbox) == Counter({"kept v1 a": 1, "kept v2 b": 1}), daemon.log()


# --- intake ------------------------------------------------------------------------------------


async def post_many(url: str, count: int, concurrency: int) -> list[int]:
    """``count`` events, ``concurrency`` at a time, each with its own Idempotency-Key.

    A request that gets no answer is sent again with the same key, as the intake asks of its
    clients: on a loaded machine a keep-alive connection may be closed by the server just as
    it is reused, and the key is what makes that retry safe (checked by the caller). aiohttp's
    client: with httpx's the test took 9 s of CPU (4.3 in this process, 4.7 in the daemon), with
    aiohttp's 3.2 s (0.5 and 2.6).
    """
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    # Idle connections expire before the server's keep-alive timeout (5 s) ends them.
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=2.0)
    timeout = aiohttp.ClientTimeout(total=30.0)

    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout
    ) as client:

        async def send(n: int) -> int:
            async with client.post(
                f"{url}/events/bulk",
                json={"marker": f"m{n}"},
                headers={"Idempotency-Key": f"bulk-{n}"},
            ) as response:
                await response.read()
                return response.status

        async def one(n: int) -> int:
            async with gate:
                for _ in range(2):
                    with contextlib.suppress(aiohttp.ClientConnectionError, TimeoutError):
                        return await send(n)
                return await send(n)

        return await asyncio.gather(*(one(n) for n in range(count)))


def test_intake_answers_and_sends_each_event_once(
    tmp_path: Path, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """Every status the intake gives, over real HTTP; 500 events, 50 at a time, are each sent
    once; a repeated Idempotency-Key sends once; an unset token variable shuts the door."""
    project = Project(tmp_path / "project", sandbox.url, intake_token_var=TOKEN_VAR)
    project.rule("bulk", "event: bulk", "bulk {{ event.marker }}")
    daemon = daemons(project, **{TOKEN_VAR: TOKEN})

    assert daemon.post("bulk", {"marker": "x"}).status_code == 401
    assert daemon.post("bulk", {"marker": "x"}, token="wrong").status_code == 401
    assert daemon.post("bulk", b'{"marker": ', token=TOKEN).status_code == 400
    assert daemon.post("bulk", [1, 2], token=TOKEN).status_code == 400
    huge = b'{"marker": "' + b"x" * (1024 * 1024) + b'"}'
    assert daemon.post("bulk", huge, token=TOKEN).status_code == 413

    first = daemon.post("bulk", {"marker": "same"}, key="same-key", token=TOKEN)
    second = daemon.post("bulk", {"marker": "same"}, key="same-key", token=TOKEN)
    assert (first.status_code, second.status_code) == (202, 202)
    assert [r["status"] for r in first.json()["rules"]] == ["queued"]
    assert [r["status"] for r in second.json()["rules"]] == ["duplicate"]

    statuses = asyncio.run(post_many(daemon.project.url, 500, 50))
    assert Counter(statuses) == Counter({202: 500})
    wanted = {f"bulk m{n}" for n in range(500)} | {"bulk same"}
    wait_for(
        lambda: set(texts(sandbox)) >= wanted,
        "all 501 events to be sent",
        timeout=60,
        log=daemon.log,
    )
    got = texts(sandbox)
    assert set(got) == wanted and set(got.values()) == {1}, daemon.log()

    # The token's variable is unset (pushrules.yaml now names another): 503, health still 200.
    # A daemon: setting changed in the same edit is read at start only, and the log says so.
    reloaded = daemon.health()[1]["last_reload"]["at"]
    project.timing["daemon.leadership_every"] = "600ms"
    project.write_config(intake_token_var="PR_TEST_UNSET_TOKEN")
    daemon.wait_health(lambda h: h["last_reload"]["at"] != reloaded, "pushrules.yaml's reload")
    refused = daemon.post("bulk", {"marker": "late"}, token=TOKEN)
    assert refused.status_code == 503, refused.text
    assert refused.json() == {"error": "intake token not configured"}
    assert daemon.health()[0] == 200
    assert "daemon changed in pushrules.yaml: restart the daemon to use it" in daemon.messages()
    assert daemon.stop() == 0, daemon.log()
    assert "bulk late" not in texts(sandbox)
    assert all(r.state == SENT for r in project.rows()), daemon.log()


# --- feeds -------------------------------------------------------------------------------------


def test_failing_feeds_leave_the_daemon_healthy(
    tmp_path: Path, sandbox: RunningSandbox, feeds: FeedServer, daemons: StartDaemon
) -> None:
    """A feed that times out, one that answers 500 and one that is not JSON: /healthz stays
    200 and names each failure, and events are still sent."""
    project = Project(tmp_path / "project", sandbox.url)
    feeds.routes["/slow"] = (200, b'{"offers": []}', 5.0)
    feeds.routes["/error"] = (500, b'{"error": "boom"}', 0.0)
    feeds.routes["/html"] = (200, b"<html>maintenance</html>", 0.0)
    for name, path, extra in (
        ("slow", "/slow", "\n  timeout: 1s"),
        ("error", "/error", ""),
        ("html", "/html", ""),
    ):
        poll = f"poll:\n  url: {feeds.url(path)}\n  every: 1s\n  items: offers\n  key: id{extra}"
        project.rule(name, poll, "offer {{ item.id }}")
    project.rule("ping", "event: ping", "ping {{ event.marker }}")
    daemon = daemons(project)

    report = daemon.wait_health(
        lambda h: all(h["feeds"].get(f, {}).get("last_error") for f in ("slow", "error", "html")),
        "each feed to fail once",
    )
    status, report = daemon.health()
    assert status == 200 and report["ok"], report
    failures = {name: report["feeds"][name]["last_error"] for name in ("slow", "error", "html")}
    assert "no complete answer within 1s" in failures["slow"], failures
    assert "HTTP 500" in failures["error"], failures
    assert "not JSON" in failures["html"], failures
    assert all(report["feeds"][n]["consecutive_failures"] >= 1 for n in failures)
    assert daemon.post("ping", {"marker": "alive"}).status_code == 202
    wait_for(lambda: texts(sandbox)["ping alive"], "an event to be sent", log=daemon.log)
    assert daemon.stop() == 0, daemon.log()


# --- stopping and pausing ----------------------------------------------------------------------


def test_sigterm_finishes_the_send_in_flight_then_exits_0(
    one_rule_project: Project, sandbox: RunningSandbox, daemons: StartDaemon
) -> None:
    """SIGTERM while Accengage takes 1.5 s to answer: the daemon waits for the answer, records
    the row as sent (not in_doubt) and exits 0. Started as an operator starts it, `python -m
    engine run` in a new interpreter (other tests fork theirs from a preloaded one)."""
    project = one_rule_project
    daemon = daemons(project, new_interpreter=True)
    sandbox.set_faults(latency_ms=1500)
    assert daemon.post("ping", {"marker": "slow"}).status_code == 202
    wait_for(
        lambda: [r.state for r in project.rows()] == [SENDING],
        "the request to be in flight",
        log=daemon.log,
    )
    sigterm_at = time.time()
    assert daemon.stop() == 0, daemon.log()
    [row] = project.rows()
    assert (row.state, row.attempts, row.return_code) == (SENT, 1, 0), daemon.log()
    assert row.sent_at is not None and row.sent_at.timestamp() > sigterm_at, "sent before SIGTERM"
    assert texts(sandbox) == Counter({"ping slow": 1})
    messages = daemon.messages()
    assert "SIGTERM received: finishing in-flight sends, then stopping" in messages
    assert messages[-1] == "stopped"


def test_pause_and_resume_are_honoured_by_the_running_daemon(
    tmp_path: Path,
    sandbox: RunningSandbox,
    daemons: StartDaemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pushrules pause RULE`` holds that rule's fires at once (another rule of the same event
    is sent meanwhile); ``pushrules resume RULE`` sends them."""
    project = Project(tmp_path / "project", sandbox.url)
    project.rule("promo", "event: sale", "promo {{ event.marker }}")
    project.rule("other", "event: sale", "other {{ event.marker }}")
    daemon = daemons(project)

    # The commands run in this process: the daemon sees only what they write to the store.
    assert main(["pause", "promo", "--project", str(project.root)]) == 0, capsys.readouterr()
    assert daemon.post("sale", {"marker": "s1"}).status_code == 202
    # The dispatcher claimed and sent the other rule's row, so it saw the promo's too.
    wait_for(lambda: texts(sandbox)["other s1"], "the unpaused rule to send", log=daemon.log)
    assert [r.state for r in project.rows("promo")] == [PENDING], daemon.log()
    assert "promo s1" not in texts(sandbox)
    _, report = daemon.health()
    assert report["paused"] == {"promo": None}

    assert main(["resume", "promo", "--project", str(project.root)]) == 0, capsys.readouterr()
    wait_for(lambda: texts(sandbox)["promo s1"], "the resumed rule to send", log=daemon.log)
    assert daemon.stop() == 0, daemon.log()
    assert texts(sandbox) == Counter({"other s1": 1, "promo s1": 1}), daemon.log()


def test_a_busy_listen_port_is_a_clear_startup_error(one_rule_project: Project) -> None:
    """Exit 1 with one line saying what to fix, before anything starts (no traceback)."""
    project = one_rule_project
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", project.port))
        taken.listen()
        daemon = Daemon(project)
        command = [sys.executable, "-m", "engine", "run", "--project", str(project.root)]
        done = subprocess.run(command, env=daemon.env(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert f"the intake cannot listen on 127.0.0.1:{project.port}: Address already in use" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert "leading" not in done.stderr  # failed before the schedules started
