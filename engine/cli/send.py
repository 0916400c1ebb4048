"""The commands that send and inspect: ``send``, ``fire``, ``history``, ``outbox``.

``send`` and ``fire`` take the daemon's path (firing -> outbox -> dispatcher), wait a bounded
time for the outcome, print it, and leave what still retries in the store for the daemon.
Exit codes: 0 all sent, 1 something failed or needs a person, 2 usage, 75 some requests are
still retrying and were left to the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.cli.common import (
    EXIT_OK,
    EXIT_PROBLEMS,
    EXIT_USAGE,
    UsageError,
    fire_context,
    fire_input_arguments,
    lazy,
    load_project_dir,
    load_settings,
    number,
    parse_time,
    project_argument,
    read_event,
    rule_to_fire,
    sandbox_store_argument,
)
from engine.outbox.states import (
    DEAD,
    DUE_STATES,
    FAILED,
    HELD,
    IN_DOUBT,
    PENDING,
    RETRYING,
    SENDING,
    SENT,
    STATES,
)
from engine.rules.schedule import TriggerError, parse_duration, parse_timezone

if TYPE_CHECKING:  # the store and the compiler load when a command runs, not for --help
    from engine.outbox.firing import FireOutcome, FireRequest
    from engine.outbox.store import AttemptResult, OutboxRow, Store
    from engine.rules.project import Project
    from engine.rules.rule import Rule

EXIT_LEFT_TO_DAEMON = 75  # EX_TEMPFAIL: try again later (the daemon will)
FINAL_STATES = (SENT, FAILED, DEAD, IN_DOUBT)
#: States whose outcome is still coming: claimed by another process, or about to be.
UNSETTLED = (PENDING, SENDING)
#: How often to look at a row another process is sending.
SETTLE_POLL = 0.05
#: Below this many requests a progress bar is noise.
PROGRESS_THRESHOLD = 20


def register(sub: Any) -> None:
    """send, fire, history, outbox; each loads the store and the compiler when it runs."""

    def command(name: str) -> Any:
        return lazy("engine.cli.send", name)

    def sending(p: argparse.ArgumentParser) -> None:
        project_argument(p)
        p.add_argument(
            "--key",
            metavar="K",
            help="idempotency key: the same key sends once (default: a new one each time)",
        )
        p.add_argument(
            "--wait",
            type=number(float, 0, 86_400),
            default=30.0,
            metavar="SECONDS",
            help="how long to keep retrying before leaving it to the daemon (default 30)",
        )
        p.add_argument(
            "--dry-run", action="store_true", help="show the requests; record and send nothing"
        )
        p.add_argument(
            "--sandbox",
            action="store_true",
            help="send to a sandbox endpoint started on loopback, not to Accengage",
        )

    p = sub.add_parser(
        "send",
        help="fire one rule now and wait for Accengage's answer",
        description="Compile one firing of a rule, record it in the outbox, send it, and wait "
        "for the outcome (retrying within --wait). What still retries after that stays in the "
        "outbox for the daemon. Exit 0 all sent, 1 failed or needs a person, 75 left to the "
        "daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules send flight-canceled --event event.json --sandbox\n"
        "  pushrules send monday-digest --key digest-2026-w48   # at most once for that key",
    )
    p.add_argument("rule", help="rule id: the rule file's name without .yaml")
    fire_input_arguments(p)
    sending(p)
    p.set_defaults(func=command("cmd_send"))

    p = sub.add_parser(
        "fire",
        help="fire an event: every rule listening to it sends",
        description="Do what POST /events/EVENT does on the daemon, from the command line: "
        "every enabled rule listening to EVENT fires with the payload, then the requests are "
        "sent and their outcome printed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  pushrules fire flight.canceled --data event.json --key AF1234-11-26",
    )
    p.add_argument("event", help="event name, like flight.canceled")
    p.add_argument("--data", metavar="FILE", help="event payload, a JSON object (- for stdin)")
    sending(p)
    p.set_defaults(func=command("cmd_fire"))

    p = sub.add_parser(
        "history",
        help="what was sent, when, and what Accengage answered",
        description="List outbox rows, newest first: one per HTTP request, with its state, "
        "attempts, return code and message id.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules history --rule flight-canceled --since 2h\n"
        "  pushrules history --status in_doubt,failed,dead --format json",
    )
    project_argument(p)
    p.add_argument("--rule", metavar="R", help="only this rule")
    p.add_argument(
        "--status",
        metavar="S",
        help="only these states, comma-separated: pending, "
        "sending, sent, retrying, failed, dead, in_doubt, held, dropped",
    )
    p.add_argument(
        "--since",
        metavar="T",
        help="a duration back from now (2h, 1d) or a time, like '2026-11-30 08:00' (UTC, as "
        "history shows times) or with an offset",
    )
    p.add_argument("--limit", type=number(int, 1), default=100, help="rows at most (default 100)")
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="text: a table for people; json: every row with its attempts, for tools",
    )
    p.add_argument(
        "--unmatched",
        action="store_true",
        help="events the daemon answered but no rule took, with why (instead of the outbox)",
    )
    sandbox_store_argument(p)
    p.set_defaults(func=command("cmd_history"))

    p = sub.add_parser(
        "outbox",
        help="resend or drop requests that need a person (in_doubt, failed, dead); prune old ones",
        description="resend: queue the rows again and send them now (their history is kept). "
        "drop: give up on them for good. Check `pushrules history --status in_doubt` first: "
        "an in_doubt request may already have reached users. prune: forget what retention: "
        "in pushrules.yaml lets go (the daemon does it every 10 minutes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules history --status in_doubt,failed,dead   # find the ids\n"
        "  pushrules outbox resend 42 43\n  pushrules outbox drop 44\n"
        "  pushrules outbox resend 7 --sandbox   # a row of the --sandbox trials\n"
        "  pushrules outbox prune --dry-run      # what retention would forget now",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def outbox_action(
        name: str,
        func: str,
        own: Callable[[argparse.ArgumentParser], None],
        after_project: Callable[[argparse.ArgumentParser], None] | None = None,
        **described: Any,
    ) -> None:
        """An action on the outbox of --project (or of the --sandbox trials), run by ``func``:
        its own arguments, and ``after_project`` those its --help lists after --project."""
        a = actions.add_parser(name, **described)
        own(a)
        project_argument(a)
        if after_project is not None:
            after_project(a)
        sandbox_store_argument(a)
        a.set_defaults(func=command(func))

    def row_ids(a: argparse.ArgumentParser) -> None:
        a.add_argument("ids", type=int, nargs="+", metavar="ID", help="outbox row ids (history)")

    def wait(a: argparse.ArgumentParser) -> None:
        a.add_argument(
            "--wait",
            type=number(float, 0, 86_400),
            default=30.0,
            metavar="SECONDS",
            help="how long to keep retrying (default 30)",
        )

    def dry_run(a: argparse.ArgumentParser) -> None:
        a.add_argument("--dry-run", action="store_true", help="count what would go; delete nothing")

    for action, what, more in (
        ("resend", "queue these rows again and send them now, waiting for the outcome", wait),
        ("drop", "give up on these rows for good (they stay in the history as dropped)", None),
    ):
        description = what[0].upper() + what[1:] + "."
        outbox_action(action, "cmd_outbox", row_ids, more, help=what, description=description)
    outbox_action(
        "prune",
        "cmd_outbox_prune",
        dry_run,
        help="forget what retention: lets go now (sent and dropped rows, old events, feed keys)",
        description="Delete, in small batches, what the retention: settings of pushrules.yaml "
        "let go now: sent and dropped rows (with their attempts), events no rule took, marks "
        "of rules no longer scheduled, and feed keys no poll has found for that long. Rows "
        "in flight or waiting for a person are never touched. Safe beside a running daemon.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  pushrules outbox prune --dry-run\n  pushrules outbox prune",
    )


@contextlib.contextmanager
def _maybe_sandbox(project: Project, enabled: bool) -> Iterator[Project]:
    """With ``--sandbox``, a sandbox endpoint on loopback stands in for Accengage."""
    if not enabled:
        yield project
        return
    from engine.accengage.sandbox import start_in_thread
    from engine.send.runtime import sandboxed

    with start_in_thread() as sandbox:
        print(
            f"sandbox endpoint: {sandbox.url} (trial outbox: pushrules-sandbox.db)", file=sys.stderr
        )
        yield sandboxed(project, sandbox.url)


def cmd_send(args: argparse.Namespace) -> int:
    try:
        ruleset, project = load_project_dir(args.project)
        rule = rule_to_fire(ruleset, args.rule)
        if rule is None:
            return EXIT_PROBLEMS
        context = fire_context(args, rule)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from engine.outbox.firing import FireRequest

    key = args.key or f"manual:{uuid.uuid4()}"
    return _fire_and_deliver(args, project, [FireRequest(rule, context, key)], context.now)


def cmd_fire(args: argparse.Namespace) -> int:
    try:
        payload = read_event(args.data) or {}
        ruleset, project = load_project_dir(args.project)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rules = ruleset.for_event(args.event)
    if not rules:
        listening = sorted({r.event for r in ruleset.rules.values() if r.event})
        print(
            f"pushrules: no enabled rule listens to '{args.event}' (events listened to: "
            f"{', '.join(listening) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    from engine.outbox.firing import FireRequest
    from engine.render.compiler import FireContext

    now = datetime.now(UTC)
    event_id = args.key or str(uuid.uuid4())
    requests = [
        FireRequest(
            r,
            FireContext(now=now.astimezone(parse_timezone(r.timezone)), event=payload),
            f"event:{event_id}",
        )
        for r in rules
    ]
    return _fire_and_deliver(args, project, requests, now)


def _fire_and_deliver(
    args: argparse.Namespace, project: Project, requests: list[FireRequest], now: datetime
) -> int:
    from engine.outbox.firing import fire_many
    from engine.send.runtime import open_store

    if args.dry_run:
        return _dry_run(project, requests)
    if not args.sandbox:
        unreadable = unreadable_credentials(project)
        if unreadable:
            print(f"pushrules: {unreadable}: nothing was queued", file=sys.stderr)
            return EXIT_PROBLEMS
    with _maybe_sandbox(project, args.sandbox) as project:
        store = open_store(project)
        try:
            outcomes = fire_many(store, project, requests, now=now)
            for outcome in outcomes:
                _print_outcome(outcome)
            ids = _deliverable(store, outcomes, {r.rule.id: r.rule for r in requests})
            if not ids:
                return EXIT_OK if all(o.status != "failed" for o in outcomes) else EXIT_PROBLEMS
            rows = asyncio.run(_deliver(project, store, ids, args.wait, args.sandbox))
        finally:
            store.close()
    for row in rows:
        print(_row_line(row))
    return _exit_for(rows, outcomes)


def unreadable_credentials(project: Project) -> str | None:
    """Why the Accengage credentials cannot be read now, or None when they can.

    A command that sends refuses up front: a row queued without them would wait in the real
    outbox for a daemon to send it later, stale, to real users.
    """
    from engine.rules.secrets import MissingSecret
    from engine.send.runtime import credentials

    given = credentials(project)
    for setting, ref in (("accengage.login", given.login), ("accengage.password", given.password)):
        try:
            ref.resolve()
        except MissingSecret as exc:
            return (
                f"cannot send: {exc} ({setting}, {project.where(setting)}); set it, or "
                "try the rule with --sandbox or --dry-run"
            )
    return None


def _deliverable(
    store: Store, outcomes: Sequence[FireOutcome], rules: Mapping[str, Rule]
) -> list[int]:
    """Rows to send now: not those deferred by quiet hours, nor those of a paused rule, which
    the daemon sends when their time comes. A duplicate (the same key run again, a script's
    retry) sends what the first run left due, never a row that waits for its time."""
    paused = store.paused()
    ids: list[int] = []
    for o in outcomes:
        if o.status not in ("queued", "duplicate"):
            continue
        if o.status == "duplicate":
            ids.extend(_due_of_duplicate(store, o, paused, rules.get(o.rule)))
        elif o.not_before is not None:
            print(
                f"{o.rule}: left in the outbox until {o.not_before.isoformat()}: the daemon "
                "sends it then",
                file=sys.stderr,
            )
        elif o.rule in paused or "*" in paused:
            print(
                f"{o.rule}: the rule is paused: its fire is kept and sent when resumed",
                file=sys.stderr,
            )
        else:
            ids.extend(o.ids)
    return ids


def _due_of_duplicate(
    store: Store, outcome: FireOutcome, paused: Mapping[str, Any], rule: Rule | None
) -> list[int]:
    """The rows of an earlier fire with this key that are due now, or on their way (their
    outcome is waited for); the others are said. Inside the rule's quiet hours no due row is
    sent: the daemon holds them until the hours end, as it would."""
    from engine.outbox.firing import rule_quiet_until

    now = datetime.now(UTC)
    due: list[int] = []
    sending: list[int] = []
    waiting: datetime | None = None
    for row_id in outcome.ids:
        row = store.get(row_id)
        if row is None or row.state not in (*DUE_STATES, SENDING):
            continue  # sent, held, parked or dropped: history says which
        if row.state == SENDING:
            sending.append(row_id)
        elif row.next_attempt_at > now:
            waiting = row.next_attempt_at if waiting is None else min(waiting, row.next_attempt_at)
        else:
            due.append(row_id)
    until = rule_quiet_until(rule, now) if rule is not None and due else None
    if until is not None:
        waiting = until if waiting is None else min(waiting, until)
        due = []
    if waiting is not None:
        why = (
            "for the end of the rule's quiet hours, "
            if until is not None
            else "in the outbox until "
        )
        print(
            f"{outcome.rule}: the earlier fire with this key waits {why}{waiting.isoformat()}: "
            "the daemon sends it then",
            file=sys.stderr,
        )
    if due and (outcome.rule in paused or "*" in paused):
        print(
            f"{outcome.rule}: the rule is paused: its fire is kept and sent when resumed",
            file=sys.stderr,
        )
        return sending
    return sending + due


def _dry_run(project: Project, requests: list[FireRequest]) -> int:
    from engine.render.compiler import CompileError, compile_fire, for_display, passes_when

    output = []
    for req in requests:
        try:
            if not passes_when(req.rule, req.context):
                print(f"{req.rule.id}: `when` is false, it would not fire", file=sys.stderr)
                continue
            for r in compile_fire(req.rule, project, req.context):
                output.append({"rule": r.rule, "url": r.url, "body": for_display(r.body, "")})
        except CompileError as exc:
            print(f"pushrules: {exc}", file=sys.stderr)
            return EXIT_PROBLEMS
    print(json.dumps(output, indent=2, ensure_ascii=False))
    print("dry run: nothing was recorded or sent", file=sys.stderr)
    return EXIT_OK


async def _deliver(
    project: Project, store: Store, ids: list[int], wait: float, sandbox: bool
) -> list[OutboxRow]:
    from engine.send.runtime import make_dispatcher

    with _progress(len(ids)) as advance:

        def on_attempt(row: OutboxRow, attempt: AttemptResult, state: str) -> None:
            if state in FINAL_STATES:
                advance()

        dispatcher = make_dispatcher(project, store, sandbox=sandbox, on_attempt=on_attempt)
        deadline = time.monotonic() + wait
        try:
            rows = await dispatcher.deliver(ids, wait)
            # Another process (a daemon on the same store) may have claimed a row first: its
            # outcome is the one to report, so wait for it as for our own.
            while any(r.state in UNSETTLED for r in rows) and time.monotonic() < deadline:
                await asyncio.sleep(SETTLE_POLL)
                rows = await dispatcher.deliver(ids, max(0.0, deadline - time.monotonic()))
            return rows
        finally:
            await dispatcher.aclose()


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A progress bar on a terminal for long sends; silent in a pipe or for a few requests."""
    if total < PROGRESS_THRESHOLD or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("sending", total=total)
        yield lambda: progress.advance(task)


def _print_outcome(outcome: FireOutcome) -> None:
    detail = outcome.detail
    if outcome.status == "empty":
        detail = f"{detail}: a for_each over an empty list? nothing was queued or sent"
    print(f"{outcome.rule}: {outcome.status} ({detail})", file=sys.stderr)


def _row_line(row: OutboxRow) -> str:
    parts = [f"#{row.id}", row.rule, f"part {row.chunk + 1}", row.state]
    if row.return_code is not None:
        parts.append(f"returnCode {row.return_code} ({row.return_label})")
    if row.message_id:
        parts.append(f"messageId {row.message_id}")
    if row.state == RETRYING:
        parts.append(f"next attempt {row.next_attempt_at.isoformat(timespec='seconds')}")
    if row.last_error and row.state != SENT:
        parts.append(f"error: {row.last_error}")
    return "  ".join(parts)


def _exit_for(rows: Sequence[OutboxRow], outcomes: Sequence[FireOutcome]) -> int:
    states = {r.state for r in rows}
    if states & {FAILED, DEAD, IN_DOUBT} or any(o.status == "failed" for o in outcomes):
        return EXIT_PROBLEMS
    if SENDING in states:
        print(
            "some requests are still being sent by another process (a running daemon): "
            "see `pushrules history` for their outcome",
            file=sys.stderr,
        )
        return EXIT_LEFT_TO_DAEMON
    if RETRYING in states or states - {SENT}:
        print(
            "some requests are still retrying: the daemon (pushrules run) will carry on",
            file=sys.stderr,
        )
        return EXIT_LEFT_TO_DAEMON
    return EXIT_OK


# --- history and outbox --------------------------------------------------------------------


def parse_since(text: str | None, now: datetime) -> datetime | None:
    """``--since``: a duration back from now like ``2h``, or an ISO 8601 time."""
    if text is None:
        return None
    try:
        return now - parse_duration(text)
    except TriggerError:
        pass
    try:
        return parse_time(text, "--since")
    except UsageError as exc:
        raise UsageError(f"{exc}, nor a duration like 2h") from None


def _row_json(row: OutboxRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "rule": row.rule,
        "key": row.idem_key,
        "part": row.chunk + 1,
        "state": row.state,
        "attempts": row.attempts,
        "returnCode": row.return_code,
        "returnLabel": row.return_label,
        "messageId": row.message_id,
        "httpStatus": row.last_http_status,
        "error": row.last_error,
        "created_at": row.created_at.isoformat(),
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "next_attempt_at": row.next_attempt_at.isoformat() if row.state == RETRYING else None,
        "attempt_log": [
            {
                "at": a.started_at.isoformat(),
                "ms": round(a.duration_ms, 1),
                "httpStatus": a.http_status,
                "returnCode": a.return_code,
                "returnLabel": a.return_label,
                "messageId": a.message_id,
                "error": a.error,
                "outcome": a.outcome,
            }
            for a in row.attempt_log
        ],
    }


def cmd_history(args: argparse.Namespace) -> int:
    from engine.send.runtime import open_store

    states = None
    if args.status:
        states = [s.strip() for s in args.status.split(",") if s.strip()]
        unknown = [s for s in states if s not in STATES]
        if unknown:
            print(
                f"pushrules: unknown status {', '.join(unknown)}; known: {', '.join(STATES)}",
                file=sys.stderr,
            )
            return EXIT_USAGE
    try:
        since = parse_since(args.since, datetime.now(UTC))
        project = load_settings(args.project, sandbox=args.sandbox)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    missing = missing_outbox(project)
    if missing is not None:  # reading must not create an empty outbox beside the project
        if args.format == "json":
            print("[]")
        print(f"no outbox yet ({missing} does not exist): nothing was sent", file=sys.stderr)
        return EXIT_OK
    if getattr(args, "unmatched", False):
        return _history_unmatched(project, since, args.limit, args.format)
    store = open_store(project)
    try:
        rows = store.history(rule=args.rule, states=states, since=since, limit=args.limit)
        paused = store.paused()
        unmatched = len(store.unmatched(since=since, limit=1000))
    finally:
        store.close()
    if unmatched and args.format != "json" and not (args.rule or states):
        more = "+" if unmatched >= 1000 else ""
        print(
            f"{unmatched}{more} event(s) taken by no rule are not in this list: "
            "pushrules history --unmatched",
            file=sys.stderr,
        )
    now = datetime.now(UTC)
    waits = {r.id: why_waiting(r, paused, now) for r in rows}
    if args.format == "json":
        listed = [{**_row_json(r), "waiting": waits[r.id]} for r in rows]
        print(json.dumps(listed, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not rows:
        print("no matching request in the outbox", file=sys.stderr)
        return EXIT_OK
    _print_table(rows, waits)
    return EXIT_OK


def missing_outbox(project: Project) -> str | None:
    """The SQLite file of the outbox when it does not exist yet; None when it does (or the
    store is not a file)."""
    prefix = "sqlite:///"
    url = project.store_url()
    if not url.startswith(prefix) or url.endswith(":memory:"):
        return None
    path = url[len(prefix) :]
    return None if Path(path).exists() else path


def why_waiting(row: OutboxRow, paused: Mapping[str, datetime | None], now: datetime) -> str | None:
    """Why a row not sent yet is not going out now, in words; None for one that is not held
    back (or is done)."""
    if row.state == HELD:
        return f"past the rule's limit: held until `pushrules resume {row.rule}` (or drop)"
    if row.state not in (PENDING, RETRYING):
        return None
    pause = row.rule if row.rule in paused else "*" if "*" in paused else None
    if pause is not None:
        until = paused[pause]
        what = "rule paused" if pause == row.rule else "all rules paused"
        when = f" until {until.isoformat(timespec='seconds')}" if until else ""
        lift = row.rule if pause == row.rule else "--all"
        return f"{what}{when}: `pushrules resume {lift}` sends it"
    if row.state == PENDING and row.next_attempt_at > now:
        return f"deferred by quiet hours to {row.next_attempt_at.isoformat(timespec='seconds')}"
    return None


def _history_unmatched(project: Project, since: datetime | None, limit: int, fmt: str) -> int:
    """Events answered 202 that no rule took: when, which, and why (to fire them again)."""
    from engine.send.runtime import open_store

    with open_store(project) as store:
        events = store.unmatched(since=since, limit=limit)
    if fmt == "json":
        out = [
            {
                "id": e.id,
                "event": e.event,
                "key": e.key,
                "received_at": e.received_at.isoformat(),
                "why": e.reason,
                "payload": json.loads(e.payload),
            }
            for e in events
        ]
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return EXIT_OK
    if not events:
        print("no event was left without a rule", file=sys.stderr)
        return EXIT_OK
    for e in events:
        print(f"{e.received_at:%Y-%m-%d %H:%M:%S} {e.event} {e.key}: {e.reason}")
    return EXIT_OK


#: The columns of ``history``'s table.
HISTORY_COLUMNS = (
    "id",
    "rule",
    "key",
    "part",
    "state",
    "tries",
    "code",
    "label",
    "messageId",
    "created (UTC)",
)


def _history_cells(r: OutboxRow, waits: Mapping[int, str | None]) -> tuple[str, ...]:
    return (
        str(r.id),
        r.rule,
        r.idem_key,
        str(r.chunk + 1),
        r.state,
        str(r.attempts),
        "" if r.return_code is None else str(r.return_code),
        waits.get(r.id) or r.return_label or (r.last_error or ""),
        r.message_id or "",
        r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
    )


def _print_table(rows: Sequence[OutboxRow], waits: Mapping[int, str | None]) -> None:
    """A table laid out to the terminal; piped or redirected, one line a row (for grep and
    sort, and fast: rich's layout costs about 0.7 ms a row, 4 s for 5,000 rows)."""
    cells = [_history_cells(r, waits) for r in rows]
    if not sys.stdout.isatty():
        cells = [tuple(" ".join(value.split()) for value in row) for row in cells]
        widths = [
            max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(HISTORY_COLUMNS)
        ]
        for line in (HISTORY_COLUMNS, *cells):
            print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in HISTORY_COLUMNS:
        table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*row)
    Console().print(table)


def cmd_outbox(args: argparse.Namespace) -> int:
    """``resend`` queues rows again and sends them now (waiting as ``send`` does); ``drop``
    gives up on them for good. Both keep the row's history."""
    from engine.outbox.store import TransitionError
    from engine.send.runtime import open_store

    try:
        project = load_settings(args.project, sandbox=args.sandbox)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    unreadable = None if args.sandbox else unreadable_credentials(project)
    if args.action == "resend" and unreadable:
        print(f"pushrules: {unreadable}: nothing was queued again", file=sys.stderr)
        return EXIT_PROBLEMS
    store = open_store(project)
    code = EXIT_OK
    changed: list[int] = []
    try:
        for row_id in args.ids:
            try:
                row = store.resend(row_id) if args.action == "resend" else store.drop(row_id)
            except TransitionError as exc:
                print(f"pushrules: {exc}", file=sys.stderr)
                code = EXIT_PROBLEMS
                continue
            changed.append(row.id)
            if args.action == "drop":
                print(f"#{row.id} {row.rule} part {row.chunk + 1}: dropped")
        if args.action == "resend" and changed:
            with _maybe_sandbox(project, args.sandbox) as target:
                rows = asyncio.run(_deliver(target, store, changed, args.wait, args.sandbox))
            for row in rows:
                print(_row_line(row))
            code = max(code, _exit_for(rows, []))
    finally:
        store.close()
    return code


#: What each kind of ``retention:`` is, in the words of the prune report.
_PRUNED = {
    "sent": "sent rows (with their attempts)",
    "dropped": "dropped rows (with their attempts)",
    "unmatched_events": "events no rule took",
    "marks": "marks of rules not scheduled, ended pauses",
    "feed_keys": "feed keys no poll found",
}


def cmd_outbox_prune(args: argparse.Namespace) -> int:
    """Forget, batch by batch, what retention lets go now; ``--dry-run`` only counts."""
    from engine.outbox.retention import prune, retained
    from engine.send.runtime import open_store

    try:
        project = load_settings(args.project, sandbox=args.sandbox)
    except UsageError as exc:
        print(f"pushrules: {exc}", file=sys.stderr)
        return EXIT_USAGE
    missing = missing_outbox(project)
    if missing is not None:
        print(f"no outbox yet ({missing} does not exist): nothing to prune", file=sys.stderr)
        return EXIT_OK
    with open_store(project) as store:
        done = prune(store, project.retention, datetime.now(UTC), dry_run=args.dry_run)
        if not args.dry_run:
            store.fold_counts()  # PostgreSQL: as the daemon's leader does, should none run
    verb = "would go" if args.dry_run else "pruned"
    for kind, n in done.items():
        keep = retained(project.retention, kind)
        kept = "kept forever" if keep is None else f"kept {_days(keep)}"
        count = "" if n is None else f"{n:,} {verb}"
        print(f"{_PRUNED[kind]:<44} {kept:<16} {count}".rstrip())
    print(
        "held, in_doubt, failed and dead rows wait for a person, and pending, retrying and "
        "sending rows are on their way: those are never pruned",
        file=sys.stderr,
    )
    if args.dry_run:
        print("dry run: nothing was deleted", file=sys.stderr)
    return EXIT_OK


def _days(keep: timedelta) -> str:
    """A retention as pushrules.yaml would write it: 90d, 36h, 45m."""
    seconds = int(keep.total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
