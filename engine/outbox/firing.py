"""A rule fires: its condition, quiet hours and limit decide, then its requests enter the outbox.

Every trigger takes this one path (the scheduler, the event intake, the feed poller, and the
``send`` / ``fire`` commands), so a fire means the same thing wherever it comes from. A fire is
keyed by ``(rule, idempotency key)``: the same key again inserts nothing, which is what makes a
restart, a reload, a retried HTTP call or a second instance harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Literal

from engine.outbox.keys import scheduled_for
from engine.outbox.states import HELD, PENDING
from engine.render.compiler import (
    CompiledRequest,
    CompileError,
    FireContext,
    Steps,
    compile_steps,
    passes_when,
    run_steps,
)
from engine.rules.project import Project
from engine.rules.rule import QuietHours, Rule
from engine.rules.schedule import parse_at, parse_timezone

if TYPE_CHECKING:  # the store loads with the first fire, not for a rule test or explain
    from engine.outbox.store import Fire, Store

log = logging.getLogger("pushrules.fire")

Status = Literal["queued", "duplicate", "filtered", "skipped", "empty", "limited", "failed"]


@dataclass(frozen=True, slots=True)
class FireOutcome:
    """What became of one fire; ``detail`` says why, in words for the log and the CLI."""

    rule: str
    key: str
    status: Status
    ids: tuple[int, ...] = ()
    detail: str = ""
    not_before: datetime | None = None

    @property
    def stored(self) -> bool:
        return self.status in ("queued", "duplicate", "limited")


@dataclass(frozen=True, slots=True)
class FireRequest:
    rule: Rule
    context: FireContext
    key: str
    #: A scheduled fire decided ahead of its time (``daemon.fire_ahead``): its requests are
    #: written now and leave at this instant, not before.
    due: datetime | None = None


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def quiet_until(quiet: QuietHours, at: datetime) -> datetime | None:
    """When the quiet period holding ``at`` (aware, in the rule's zone) ends; None outside it."""
    start, end = _minutes(quiet.start), _minutes(quiet.end)
    now = at.hour * 60 + at.minute
    if start == end:
        return None
    inside = start <= now < end if start < end else (now >= start or now < end)
    if not inside:
        return None
    day = at.date() if now < end else at.date() + timedelta(days=1)
    # An end the spring change skips (02:30 on a night 02:00 goes to 03:00) is the end of
    # that gap, as a fixed time of `at:` or cron is (parse_at).
    local = parse_at(datetime.combine(day, time(end // 60, end % 60)), at.tzinfo or UTC)
    # In the hour a DST change repeats, the end's first occurrence may be behind ``at`` (the
    # second 02:10 of a period ending 02:30): the end is then the second one. Compared in UTC,
    # as aware times in one zone compare by their wall clocks.
    if local.astimezone(UTC) <= at.astimezone(UTC):
        local = local.replace(fold=1)
        if local.astimezone(UTC) <= at.astimezone(UTC):
            return None
    # Through UTC so a DST change inside the quiet period does not shift the end.
    return local.astimezone(UTC).astimezone(at.tzinfo)


def rule_quiet_until(rule: Rule, now: datetime) -> datetime | None:
    """When ``rule``'s quiet hours holding ``now`` end, in its timezone; None outside them.

    The one reading of a rule's quiet hours: when a fire is decided, and again when one of
    its rows is about to leave (the dispatcher's ``quiet``).
    """
    if rule.quiet_hours is None:
        return None
    return quiet_until(rule.quiet_hours, now.astimezone(parse_timezone(rule.timezone)))


Verdict = Literal["send", "filtered", "failed", "empty", "skipped"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a fire comes to before the store is asked anything (its limit): pure, so a rule
    test or ``explain`` decides exactly as a real fire does, with no store.

    ``requests`` are the compiled requests, kept even when quiet hours defer or skip them, so
    a reviewer can see what they hold. ``error`` is what failed the fire (``failed``): a
    :class:`CompileError` the author can act on, or any other exception (a bug, logged with its
    traceback).
    """

    verdict: Verdict
    requests: tuple[CompiledRequest, ...] = ()
    detail: str = ""
    not_before: datetime | None = None
    error: Exception | None = None

    @property
    def sends_now(self) -> bool:
        """Whether its requests would go out at once (a limit or a pause aside)."""
        return self.verdict == "send" and self.not_before is None


def decide(
    project: Project,
    rule: Rule,
    ctx: FireContext,
    now: datetime,
    *,
    notes: list[str] | None = None,
) -> Decision:
    """The rule's ``when``, its compiled requests, whether they expand to nobody, and its quiet
    hours at ``now``: every decision of a fire but its limit. Never raises for one bad fire.

    ``notes``: where to add what the compiler only logs (``for_each`` items skipped).
    """
    return run_steps(decide_steps(project, rule, ctx, now, notes=notes))


def decide_steps(
    project: Project,
    rule: Rule,
    ctx: FireContext,
    now: datetime,
    *,
    notes: list[str] | None = None,
) -> Steps[Decision]:
    """:func:`decide` in the compiler's steps (:func:`~engine.render.compiler.compile_steps`),
    for the daemon, which answers others between two steps of a big ``for_each``."""
    try:
        if not passes_when(rule, ctx):
            return Decision("filtered", detail="`when` is false")
        requests = tuple((yield from compile_steps(rule, project, ctx, notes=notes)))
    except CompileError as exc:
        return Decision("failed", detail=str(exc), error=exc)
    except Exception as exc:  # a bug or an unbounded template: this fire fails, not its batch
        detail = f"rendering failed: {type(exc).__name__}: {exc}"
        return Decision("failed", detail=detail, error=exc)
    if not requests:
        return Decision("empty", detail="the targets expanded to nobody")
    if rule.quiet_hours is not None:
        until = rule_quiet_until(rule, now)
        if until is not None:
            if rule.quiet_hours.then == "skip":
                detail = f"quiet hours until {until.isoformat()}: skipped"
                return Decision("skipped", requests, detail)
            return Decision(
                "send", requests, f"deferred by quiet hours to {until.isoformat()}", until
            )
    return Decision("send", requests)


#: A fire and what :func:`decide` made of it, ready for :func:`record`.
Decided = tuple[FireRequest, Decision]


def _prepare(
    decided: Decided, now: datetime
) -> tuple[FireOutcome | None, Fire | None, datetime | None]:
    """A decided fire's outcome when it stops here, else what to enqueue and when it leaves."""
    from engine.outbox.store import Fire

    req, decision = decided
    rule, key = req.rule, req.key
    if decision.verdict != "send":
        if decision.verdict == "failed":
            trace = None if isinstance(decision.error, CompileError) else decision.error
            log.error(
                "rule %s did not fire (key %s): %s", rule.id, key, decision.detail, exc_info=trace
            )
        return FireOutcome(rule.id, key, decision.verdict, detail=decision.detail), None, None
    fire = Fire(rule.id, key, [(r.url, r.body) for r in decision.requests])
    not_before = decision.not_before
    if req.due is not None and req.due > now:  # decided ahead: it leaves at its time
        not_before = req.due if not_before is None else max(not_before, req.due)
    return None, fire, not_before


def fire_many(
    store: Store, project: Project, requests: Sequence[FireRequest], *, now: datetime
) -> list[FireOutcome]:
    """Decide and record several fires; all that enter the outbox do so in one transaction
    per leaving time (and one for limited rules), so 1,000 events cost a handful of commits,
    not 1,000."""
    decided = [(req, decide(project, req.rule, req.context, now)) for req in requests]
    return record(store, decided, now=now)


def record(store: Store, decided: Sequence[Decided], *, now: datetime) -> list[FireOutcome]:
    """Count decided fires against their limits and write those that send: one transaction per
    leaving time, each fire all or nothing (1,000 requests of a ``for_each`` included).

    The fires of rules with a ``limit`` go in one transaction of their own, which counts each
    such rule's fires once and writes them under a lock per rule (:meth:`Store.enqueue_limited`):
    a feed answering 10,000 items at once is limited too, and several instances firing the rule
    at once cannot each read the same count and all send. Other fires pay for neither.
    """
    outcomes: list[FireOutcome | None] = []
    groups: dict[datetime | None, list[tuple[int, Fire]]] = {}
    limited: list[tuple[int, Fire, datetime | None]] = []
    limits: dict[str, tuple[int, datetime]] = {}
    for index, one in enumerate(decided):
        outcome, fire, not_before = _prepare(one, now)
        outcomes.append(outcome)
        if fire is None:
            continue
        limit = one[0].rule.limit
        if limit is None:
            groups.setdefault(not_before, []).append((index, fire))
        else:
            limited.append((index, fire, not_before))
            limits[fire.rule] = (limit.count, now - limit.per)
    for not_before, fires in groups.items():
        for index, outcome in _enqueue_group(store, fires, now, PENDING, not_before):
            outcomes[index] = outcome
    if limited:
        for index, outcome in _enqueue_limited(store, limited, limits, now):
            outcomes[index] = outcome
    return [o for o in outcomes if o is not None]


def _enqueue_group(
    store: Store,
    fires: list[tuple[int, Fire]],
    now: datetime,
    state: str,
    not_before: datetime | None,
) -> list[tuple[int, FireOutcome]]:
    """One transaction for the group; if the store refuses one fire of it (ValueError: a
    request it will not keep), each is written alone so only that one fails. Database errors
    are no one fire's fault: they propagate, and the caller tries again."""
    try:
        results = store.enqueue_many(
            [f for _, f in fires], now=now, state=state, not_before=not_before
        )
    except ValueError as exc:
        if len(fires) == 1:
            index, fire = fires[0]
            return [(index, _refused(fire, exc))]
        return [
            pair for one in fires for pair in _enqueue_group(store, [one], now, state, not_before)
        ]
    return [
        (index, _outcome(fire, result.ids, result.created, state, not_before))
        for (index, fire), result in zip(fires, results, strict=True)
    ]


def _enqueue_limited(
    store: Store,
    fires: list[tuple[int, Fire, datetime | None]],
    limits: dict[str, tuple[int, datetime]],
    now: datetime,
) -> list[tuple[int, FireOutcome]]:
    """:func:`_enqueue_group` for fires of limited rules: one transaction, or each fire alone
    (in its order, each counted anew) if the store refuses one."""
    try:
        results = store.enqueue_limited([(f, nb) for _, f, nb in fires], limits, now=now)
    except ValueError as exc:
        if len(fires) == 1:
            index, fire, _ = fires[0]
            return [(index, _refused(fire, exc))]
        return [pair for one in fires for pair in _enqueue_limited(store, [one], limits, now)]
    return [
        (index, _outcome(fire, result.ids, result.created, state, not_before))
        for (index, fire, not_before), (result, state) in zip(fires, results, strict=True)
    ]


def _refused(fire: Fire, exc: ValueError) -> FireOutcome:
    detail = f"the outbox refused its requests: {exc}"
    log.error("rule %s did not fire (key %s): %s", fire.rule, fire.idem_key, detail)
    return FireOutcome(fire.rule, fire.idem_key, "failed", detail=detail)


def fire(
    store: Store, project: Project, rule: Rule, context: FireContext, key: str, *, now: datetime
) -> FireOutcome:
    return fire_many(store, project, [FireRequest(rule, context, key)], now=now)[0]


def _outcome(
    fire: Fire, ids: list[int], created: bool, state: str, not_before: datetime | None
) -> FireOutcome:
    if not created:
        return FireOutcome(
            fire.rule,
            fire.idem_key,
            "duplicate",
            tuple(ids),
            "already fired with this key: nothing new was queued",
        )
    if state == HELD:
        log.warning(
            "rule %s is past its limit: fire %s is held, not sent (release it with "
            "`pushrules resume %s` or drop it)",
            fire.rule,
            fire.idem_key,
            fire.rule,
        )
        return FireOutcome(
            fire.rule,
            fire.idem_key,
            "limited",
            tuple(ids),
            "past the rule's limit: held for a person",
        )
    detail = f"{len(ids)} request{'s' if len(ids) != 1 else ''} queued"
    if not_before is not None and not_before == scheduled_for(fire.idem_key):
        detail += f", leaving at its time, {not_before.isoformat()}"
    elif not_before is not None:
        detail += f", deferred by quiet hours to {not_before.isoformat()}"
    return FireOutcome(fire.rule, fire.idem_key, "queued", tuple(ids), detail, not_before)
