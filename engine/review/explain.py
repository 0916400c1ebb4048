"""``pushrules explain``: why a rule would or would not send at a given moment, step by step.

The verdict comes from :func:`engine.outbox.firing.decide`, the decision every real fire takes
(``when``, templates, ``for_each``, quiet hours), then from what the store records (the rule's
limit and any pause), read without writing: a store that does not exist is never created, one
that cannot be reached is said to be so. Each step says what it read and what it concluded, in
words for text and as data for ``--format json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from engine.accengage import api as accengage
from engine.outbox.firing import Decision, decide, quiet_until
from engine.render.compiler import CompileError, FireContext, missing_input, passes_when
from engine.rules import templating
from engine.rules.project import Project
from engine.rules.rule import Rule
from engine.rules.schedule import (
    TriggerError,
    fire_times,
    format_duration,
    parse_timezone,
    schedule_for,
)
from engine.rules.secrets import hide_url_password

#: ok: this step lets the push through; stop: it stops the push here; note: the push goes, but
#: changed (deferred, waiting for a pause); unknown: it could not be checked; skipped: not
#: reached, an earlier step stopped the push.
State = Literal["ok", "stop", "note", "unknown", "skipped"]

#: Fire times listed for a scheduled rule, and targets shown of an expansion.
NEXT_FIRES = 3
FIRST_TARGETS = 3


@dataclass
class Step:
    key: str  # trigger, when, quiet_hours, limit, pause, targets, requests
    state: State
    summary: str
    lines: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Explanation:
    rule: Rule
    at: datetime
    steps: list[Step]
    sends: bool
    verdict: str
    decision: Decision
    #: What to give the command when the fire failed for want of an input (--event, --item).
    hint: str | None = None

    def data(self) -> dict[str, Any]:
        """The explanation as JSON data: the same steps and verdict as the text."""
        return {
            "rule": self.rule.id,
            "file": self.rule.file,
            "at": self.at.isoformat(),
            "timezone": self.rule.timezone,
            "sends": self.sends,
            "verdict": self.verdict,
            "hint": self.hint,
            "steps": [
                {"step": s.key, "state": s.state, "summary": s.summary, **s.data}
                for s in self.steps
            ],
            "requests": [{"url": r.url, "body": r.body} for r in self.decision.requests],
        }


@dataclass(frozen=True)
class StoreView:
    """What the store records about a rule, or why it could not be read."""

    where: str
    fires: int | None = None  # fires recorded within the limit's period
    paused_until: datetime | None = None
    paused: bool = False
    problem: str | None = None


def read_store(project: Project, rule: Rule, at: datetime) -> StoreView:
    """The rule's recorded fires (within its limit's period before ``at``) and pause, read
    without creating or migrating anything; a store that cannot be read says why."""
    url = project.store_url()
    where = hide_url_password(url)
    from engine.outbox.store import Store, StoreUnavailable

    try:
        with Store(url, create=False) as store:
            fires = None
            if rule.limit is not None:
                fires = store.count_fires(rule.id, at - rule.limit.per)
            pauses = store.paused(datetime.now(UTC))
    except StoreUnavailable as exc:
        return StoreView(where, problem=str(exc))
    except Exception as exc:  # unreachable, refused, not a database: said, never a crash
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return StoreView(
            where, problem=f"the store {where} cannot be read: {hide_url_password(reason)}"
        )
    for name in (rule.id, "*"):
        if name in pauses:
            return StoreView(where, fires, pauses[name], True)
    return StoreView(where, fires)


def explain(
    project: Project,
    rule: Rule,
    *,
    at: datetime,
    event: Mapping[str, Any] | None = None,
    item: Mapping[str, Any] | None = None,
    store: StoreView | None = None,
) -> Explanation:
    """One fire of ``rule`` at ``at`` (aware), explained. ``store``: what the store records
    (read from the project's store when None)."""
    at = at.astimezone(parse_timezone(rule.timezone))
    context = FireContext(now=at, event=event, item=item)
    notes: list[str] = []
    decision = decide(project, rule, context, at, notes=notes)
    if store is None:
        store = read_store(project, rule, at)
    steps = [
        _trigger(rule, at),
        _when(rule, context),
        _quiet_hours(rule, at),
        _limit(rule, store, at),
        _pause(store, at),
        _targets(decision, notes),
        _requests(rule, decision),
    ]
    sends, verdict = _verdict(rule, decision, store)
    error = decision.error
    hint = (
        missing_input(error, event=event is not None, item=item is not None)
        if isinstance(error, CompileError)
        else None
    )
    return Explanation(rule, at, steps, sends, verdict, decision, hint)


def _moment(value: datetime) -> str:
    return value.isoformat(timespec="minutes")


def _trigger(rule: Rule, at: datetime) -> Step:
    kind = rule.trigger_kind
    data: dict[str, Any] = {"kind": kind, "enabled": rule.enabled}
    disabled = "" if rule.enabled else " (disabled: enabled is false, so it never fires)"
    if kind == "event":
        name = rule.event
        data["event"] = name
        summary = (
            f"event {name}: fires when it arrives (POST /events/{name}, or "
            f"pushrules fire {name}){disabled}"
        )
        return Step("trigger", "ok" if rule.enabled else "stop", summary, data=data)
    tz = parse_timezone(rule.timezone)
    try:
        schedule = schedule_for(rule.trigger, tz)
    except TriggerError as exc:  # pragma: no cover - a loaded rule's trigger is valid
        return Step("trigger", "unknown", str(exc), data=data)
    times = fire_times(schedule, at, NEXT_FIRES)
    data["next"] = [t.isoformat() for t in times]
    lines = [f"next after {_moment(at)}: {', '.join(_moment(t) for t in times) or 'never again'}"]
    if kind == "poll":
        poll = rule.trigger["poll"]
        data.update({k: str(v) for k, v in poll.items()})
        summary = (
            f"poll {poll['url']} every {poll['every']}: each new item (key {poll['key']}) "
            f"fires once{disabled}"
        )
        lines[0] = lines[0].replace("next after", "next polls after")
    else:
        is_fire = schedule.next_after(at - timedelta(microseconds=1)) == at
        data["at_is_a_fire_time"] = is_fire
        summary = f"{schedule}{disabled}"
        lines.append(
            f"{_moment(at)} is one of its fire times"
            if is_fire
            else f"{_moment(at)} is not one of its fire times: explained as if it fired then"
        )
    return Step("trigger", "ok" if rule.enabled else "stop", summary, lines, data)


def _shown(value: Any) -> str:
    if value is templating.MISSING:
        return "missing"
    if isinstance(value, datetime):
        return value.isoformat()
    return json.dumps(value, ensure_ascii=False, default=str)


def _plain(value: Any) -> Any:
    """A value read by ``when`` as JSON data (a missing one is null, listed apart)."""
    if value is templating.MISSING:
        return None
    return json.loads(json.dumps(value, ensure_ascii=False, default=_text))


def _text(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _when(rule: Rule, context: FireContext) -> Step:
    if not rule.when:
        return Step("when", "ok", "none: every fire goes on")
    scope = {"event": context.event or {}, "item": context.item or {}, "now": context.now}
    read = templating.read_values(rule.when, scope)
    lines = [f"{name} = {_shown(value)}" for name, value in read]
    data: dict[str, Any] = {
        "expression": rule.when,
        "read": {name: _plain(value) for name, value in read},
        "missing": [name for name, value in read if value is templating.MISSING],
    }
    try:
        passed = passes_when(rule, context)
    except CompileError as exc:
        data["error"] = exc.message
        return Step("when", "stop", f"{rule.when} fails: {exc.message}", lines, data)
    data["value"] = passed
    if passed:
        return Step("when", "ok", f"{rule.when} is true", lines, data)
    what = "item" if context.item is not None else "event" if context.event is not None else "fire"
    summary = f"{rule.when} is false: the rule does not fire for this {what}"
    return Step("when", "stop", summary, lines, data)


def _quiet_hours(rule: Rule, at: datetime) -> Step:
    quiet = rule.quiet_hours
    if quiet is None:
        return Step("quiet_hours", "ok", "none")
    window = f"{quiet.start} to {quiet.end}, then {quiet.then}"
    data = {"from": quiet.start, "to": quiet.end, "then": quiet.then}
    until = quiet_until(quiet, at)
    clock = at.strftime("%H:%M")
    if until is None:
        return Step(
            "quiet_hours", "ok", f"{clock} is outside the quiet hours ({window})", data=data
        )
    data["until"] = until.isoformat()
    if quiet.then == "skip":
        summary = f"{clock} is inside the quiet hours ({window}): the push is dropped"
        return Step("quiet_hours", "stop", summary, data=data)
    summary = f"{clock} is inside the quiet hours ({window}): the push waits until {_moment(until)}"
    return Step("quiet_hours", "note", summary, data=data)


def _limit(rule: Rule, store: StoreView, at: datetime) -> Step:
    limit = rule.limit
    if limit is None:
        return Step("limit", "ok", "none")
    per = format_duration(limit.per)
    data: dict[str, Any] = {"count": limit.count, "per": per, "store": store.where}
    if store.problem is not None or store.fires is None:
        data["problem"] = store.problem
        return Step(
            "limit",
            "unknown",
            f"at most {limit.count} fires per {per}; not checked: {store.problem}",
            data=data,
        )
    data["recorded"] = store.fires
    summary = (
        f"{store.fires} fire{'s' if store.fires != 1 else ''} recorded in the {per} before "
        f"{_moment(at)}"
    )
    if store.fires >= limit.count:
        summary += f", at most {limit.count}: this fire would be held for a person"
        return Step("limit", "stop", summary, [f"store: {store.where}"], data)
    summary += f", at most {limit.count}: this fire is within it"
    return Step("limit", "ok", summary, [f"store: {store.where}"], data)


def _pause(store: StoreView, at: datetime) -> Step:
    data: dict[str, Any] = {"store": store.where}
    if store.problem is not None:
        data["problem"] = store.problem
        return Step(
            "pause",
            "unknown",
            f"not checked: {store.problem}",
            data=data,
        )
    data["paused"] = store.paused
    if not store.paused:
        return Step("pause", "ok", "not paused", data=data)
    until = store.paused_until.astimezone(at.tzinfo) if store.paused_until else None
    data["until"] = until.isoformat() if until else None
    when = f"until {_moment(until)}" if until else "until `pushrules resume`"
    return Step("pause", "note", f"paused {when}: the fire would wait in the outbox", data=data)


def _targets(decision: Decision, notes: list[str]) -> Step:
    if decision.verdict == "filtered":
        return Step("targets", "skipped", "not reached: `when` is false")
    if decision.verdict == "failed":
        error = decision.error
        if isinstance(error, CompileError) and error.field == "when":
            return Step("targets", "skipped", "not reached: `when` fails")
        return Step(
            "targets", "stop", f"the fire fails: {decision.detail}", data={"error": decision.detail}
        )
    targets = [t for r in decision.requests for t in r.body["sendInstantMessage"]["targets"]]
    data: dict[str, Any] = {"count": len(targets), "first": targets[:FIRST_TARGETS]}
    if notes:
        data["notes"] = notes
    if not targets:
        return Step("targets", "stop", "none: the targets expand to nobody", list(notes), data)
    lines = [json.dumps(t, ensure_ascii=False) for t in targets[:FIRST_TARGETS]]
    if len(targets) > FIRST_TARGETS:
        lines.append(f"... and {len(targets) - FIRST_TARGETS} more")
    summary = f"{len(targets)} target{'s' if len(targets) != 1 else ''}"
    return Step("targets", "ok", summary, [*lines, *notes], data)


def _requests(rule: Rule, decision: Decision) -> Step:
    if not decision.requests:
        return Step("requests", "skipped", "none")
    lines = []
    sizes = []
    over = False
    for request in decision.requests:
        body = request.body["sendInstantMessage"]
        messages = body.get("messages", [body])
        count = len(body.get("targets", []))
        total = len(json.dumps(request.body, ensure_ascii=False).encode())
        parts = []
        for plan, message in zip(rule.apps, messages, strict=False):
            platform = plan.app.platform
            size = accengage.payload_bytes(message["message"])
            limit = accengage.MAX_PAYLOAD_BYTES[platform]
            over = over or size > limit
            mark = "" if size <= limit else f" OVER: {platform} refuses it"
            parts.append(f"{plan.alias} ({platform}) message {size:,} of {limit:,} bytes{mark}")
            sizes.append(
                {
                    "request": request.chunk + 1,
                    "app": plan.alias,
                    "platform": platform,
                    "message_bytes": size,
                    "limit": limit,
                }
            )
        lines.append(
            f"request {request.chunk + 1}: {count} of {accengage.MAX_TARGETS} targets, "
            f"{total:,} bytes; " + "; ".join(parts)
        )
    n = len(decision.requests)
    summary = f"{n} request{'s' if n != 1 else ''} (at most {accengage.MAX_TARGETS} targets each)"
    if over:
        summary += ": a message is over its platform's limit"
    return Step("requests", "note" if over else "ok", summary, lines, {"sizes": sizes})


def _verdict(rule: Rule, decision: Decision, store: StoreView) -> tuple[bool, str]:
    """Whether the push would go out, and why, in one sentence."""
    if not rule.enabled:
        return False, "not sent: the rule is disabled (enabled: false)"
    if decision.verdict == "failed":
        return False, f"not sent: the fire fails: {decision.detail}"
    if decision.verdict == "filtered":
        return False, "not sent: `when` is false"
    if decision.verdict == "empty":
        return False, "not sent: the targets expand to nobody"
    if decision.verdict == "skipped":
        return False, "not sent: it falls in the quiet hours, which skip it"
    n = len(decision.requests)
    what = f"{n} request{'s' if n != 1 else ''}"
    if store.fires is not None and rule.limit is not None and store.fires >= rule.limit.count:
        return False, f"not sent: past its limit, the fire ({what}) is held for a person"
    when = (
        f" at {_moment(decision.not_before)}, when the quiet hours end"
        if decision.not_before is not None
        else ""
    )
    if store.paused:
        return True, f"sends {what}{when} once the pause is lifted"
    unchecked = " (limit and pause not checked: see above)" if store.problem else ""
    return True, f"sends {what}{when}{unchecked}"


def format_explanation(explanation: Explanation) -> str:
    """The steps as text: one line each with its state, the detail indented under it."""
    rule = explanation.rule
    out = [
        f"rule {rule.id} ({rule.file}) at {explanation.at.isoformat(timespec='minutes')} "
        f"({rule.timezone})"
    ]
    titles = {"quiet_hours": "quiet hours"}
    for step in explanation.steps:
        title = titles.get(step.key, step.key)
        out.append(f"  {step.state.upper():<8} {title + ':':<13} {step.summary}")
        out.extend(f"  {'':<8} {'':<13}   {line}" for line in step.lines)
    out.append(f"=> {explanation.verdict}")
    if explanation.hint:
        out.append(f"   {explanation.hint}")
    return "\n".join(out)
