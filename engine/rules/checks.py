"""One rule file -> a checked, immutable :class:`~engine.rules.rule.Rule`, or the problems
that stop it.

Checks run in the order an author fixes things: the YAML, the shape (Cerberus, see
:mod:`engine.rules.schemas`), then what needs the project and the templates (apps, platforms,
buttons, macros, languages, triggers, Jinja). Every problem points at the line in the rule file
where the author can fix it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from engine.accengage import api as accengage
from engine.rules import templating
from engine.rules.fragments import Fragments
from engine.rules.problems import Problem, closest, did_you_mean, field_path
from engine.rules.project import Project
from engine.rules.rule import DEFAULT_CATCH_UP, TRIGGER_KINDS, AppPlan, Limit, QuietHours, Rule
from engine.rules.schemas import RULE_CHECKER, TARGET_CHECKER
from engine.rules.yaml_source import (
    MarkedList,
    MarkedMap,
    Sharing,
    compact,
    load,
    native,
    position,
    share,
)

#: One empty set for every app without a message of its own (thousands of rules keep one).
_NO_OVERRIDES: frozenset[str] = frozenset()
#: Stands for the apps a per-app problem concerns, until problems shared by apps are merged.
_APPS = "\x00apps\x00"


Report = Callable[..., None]


class _Collector:
    """Problems of one rule file, positioned from its document."""

    def __init__(self, rel: str, doc: Any) -> None:
        self.rel = rel
        self.doc = doc
        self.problems: list[Problem] = []
        #: Paths the shape check refused: later checks do not see them, nor guess around them.
        self.refused: list[tuple[Any, ...]] = []

    def add(
        self,
        path: Sequence[Any],
        code: int | None,
        message: str,
        severity: str = "error",
        *,
        at: Sequence[Sequence[Any]] = (),
        at_value: bool = False,
    ) -> None:
        """Report at ``path``, or at the first of ``at`` that exists in the file."""
        self.problems.append(self.problem(path, code, message, severity, at=at, at_value=at_value))

    def problem(
        self,
        path: Sequence[Any],
        code: int | None,
        message: str,
        severity: str = "error",
        *,
        at: Sequence[Sequence[Any]] = (),
        at_value: bool = False,
    ) -> Problem:
        """The problem :meth:`add` would report, without reporting it."""
        line, column = self._locate([tuple(path), *[tuple(a) for a in at]], at_value)
        return Problem(self.rel, line, column, field_path(path), code, severity, message)  # type: ignore[arg-type]

    def touched(self, path: Sequence[Any]) -> bool:
        """Whether the shape check refused something at or under ``path``."""
        size = len(path)
        return any(tuple(r[:size]) == tuple(path) for r in self.refused)

    def _locate(
        self, candidates: list[tuple[Any, ...]], at_value: bool
    ) -> tuple[int | None, int | None]:
        for candidate in candidates:
            if _exists(self.doc, candidate):
                return position(self.doc, candidate, at_value=at_value)
        return position(self.doc, candidates[0])

    @property
    def failed(self) -> bool:
        return any(p.is_error for p in self.problems)


def _exists(doc: Any, path: tuple[Any, ...]) -> bool:
    node = doc
    for step in path:
        if isinstance(node, dict) and step in node:
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        else:
            return False
    return True


def parse_rule(
    rule_id: str,
    rel: str,
    text: str,
    project: Project,
    fragments: Fragments,
    digest: str = "",
) -> tuple[Rule | None, list[Problem]]:
    """Check one rule file's text; the rule is None when it has an error.

    ``digest`` identifies what the rule means (its text and everything it depends on), so a
    reload can tell which rules changed.
    """
    loaded = load(text)
    out = _Collector(rel, loaded.data)
    for issue in loaded.issues:
        out.problems.append(
            Problem(rel, issue.line, issue.column, "", None, issue.severity, issue.message)
        )
    if out.failed:
        return None, out.problems
    doc = loaded.data
    if not isinstance(doc, MarkedMap):
        out.add(
            (),
            None,
            "a rule must be a mapping with trigger, apps, message and targets"
            if doc is not None
            else "the file is empty; a rule needs trigger, apps, message and targets",
        )
        return None, out.problems
    # What the shape check refuses is left out, and every other check still runs on the rest,
    # so one run reports every independent mistake of the file.
    out.refused = _check_shape(doc, out)
    checked = _without(doc, out.refused) if out.refused else doc
    rule = _build(rule_id, rel, checked, project, fragments, out, digest or _text_digest(text))
    problems = list(dict.fromkeys(out.problems))  # a problem found twice is reported once
    return (None if out.failed else rule), problems


def compact_rule(rule: Rule, shared: Sharing) -> Rule:
    """The rule as a loaded rule set keeps it: its data without the marks of the YAML (see
    :func:`~engine.rules.yaml_source.compact`); ``shared``: :func:`shared_values`."""
    return dataclasses.replace(
        rule,
        trigger=compact(rule.trigger, shared),
        apps=tuple(dataclasses.replace(p, message=compact(p.message, shared)) for p in rule.apps),
        targets=tuple(compact(t, shared) for t in rule.targets),
        vars=compact(rule.vars, shared),
    )


def shared_values(fragments: Fragments) -> Sharing:
    """What the rules of one load share: the compact form of the templates' mappings and
    lists (a merged message holds the template's own values), one copy for them all, and one
    copy of each value equal in several rules."""
    shared = Sharing()
    for library in (fragments.messages, fragments.buttons):
        for template in library.values():
            share(template, shared)
    return shared


def _shape_code(path: tuple[Any, ...], kind: str) -> int | None:
    """The Accengage return code a shape error in this place would earn."""
    head = path[0] if path else None
    in_message = head == "message" or (head == "apps" and "message" in path)
    if head == "apps" and not in_message:
        if kind == "unknown":
            return 13
        return 10 if path[-1] in accengage.PARENT_ID_FIELDS else 4
    if in_message:
        return accengage.message_field_code(path, unknown=kind == "unknown")
    if head == "targets":
        return 13 if kind == "unknown" and "aps" in path else 9
    return None


def _check_shape(doc: MarkedMap, out: _Collector) -> list[tuple[Any, ...]]:
    """Report what Cerberus finds; the paths it refused."""
    refused = []
    for err in RULE_CHECKER.check(doc):
        out.add(
            err.path,
            _shape_code(err.path, err.kind),
            err.message,
            at_value=err.kind in ("type", "allowed"),
        )
        refused.append(tuple(err.path))
    return refused


def _without(node: Any, paths: Sequence[tuple[Any, ...]]) -> Any:
    """A copy of ``node`` without the values at ``paths`` (a list keeps None in their place,
    so positions still match the file)."""
    if isinstance(node, MarkedMap):
        kept = MarkedMap(node.line, node.column)
        kept.key_marks.update(node.key_marks)
        for key, value in node.items():
            inner = [p[1:] for p in paths if p[:1] == (key,)]
            if () not in inner:
                kept[key] = _without(value, inner) if inner else value
        return kept
    if isinstance(node, MarkedList):
        items = MarkedList(node.line, node.column)
        for index, value in enumerate(node):
            inner = [p[1:] for p in paths if p[:1] == (index,)]
            items.append(None if () in inner else _without(value, inner) if inner else value)
        return items
    return node


def _build(
    rule_id: str,
    rel: str,
    doc: MarkedMap,
    project: Project,
    fragments: Fragments,
    out: _Collector,
    digest: str,
) -> Rule | None:
    trigger = doc.get("trigger")
    kind, timezone = (
        _check_trigger(trigger, project, out) if trigger is not None else (None, project.timezone)
    )
    when = doc.get("when")
    if when is not None:
        _check_expression(when, ("when",), out)

    base_message = _resolve_message(doc.get("message") or {}, ("message",), fragments, out)
    apps = _check_apps(doc, base_message, project, fragments, out)
    targets = tuple(doc.get("targets") or ())
    _check_targets(targets, len(apps) > 1 or len(doc.get("apps") or ()) > 1, project, out)
    _check_app_messages(apps, targets, project, out)
    _check_target_macros(targets, base_message, project, out)
    catch_up = _duration(doc.get("catch_up"), ("catch_up",), out) or DEFAULT_CATCH_UP
    quiet = _check_quiet_hours(doc.get("quiet_hours"), out)
    limit = _check_limit(doc.get("limit"), out, project)
    _check_templates(doc, out)
    if out.failed or kind is None or trigger is None:  # no trigger: no kind either
        return None
    enabled = doc.get("enabled")
    return Rule(
        id=rule_id,
        file=rel,
        description=str(doc.get("description") or ""),
        enabled=True if enabled is None else bool(native(enabled)),
        trigger_kind=kind,
        trigger=trigger,
        timezone=timezone,
        when=str(when) if when is not None else None,
        apps=tuple(apps),
        targets=targets,
        vars=doc.get("vars") or {},
        catch_up=catch_up,
        quiet_hours=quiet,
        limit=limit,
        digest=digest,
    )


def _text_digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# --- triggers ------------------------------------------------------------------------------


def _check_trigger(
    trigger: Mapping[str, Any], project: Project, out: _Collector
) -> tuple[str | None, str]:
    from engine.rules import schedule

    kinds = [k for k in TRIGGER_KINDS if k in trigger]
    # A timezone written empty is a mistake to report, not the project's timezone.
    given = trigger.get("timezone")
    timezone = project.timezone if given is None else str(given)
    zone_ok = True
    if "timezone" in trigger:
        try:
            schedule.parse_timezone(timezone)
        except schedule.TriggerError as exc:
            out.add(("trigger", "timezone"), None, str(exc))
            zone_ok = False
    refused = {r[1] for r in out.refused if len(r) > 1 and r[0] == "trigger"} - {"timezone"}
    if len(kinds) != 1:
        if not refused:  # a refused or misspelt kind is reported already
            out.add(
                ("trigger",),
                None,
                "a trigger needs exactly one of cron, every, at, event, poll"
                + (f" (found {', '.join(kinds)})" if kinds else ""),
            )
        return None, timezone
    kind = _check_trigger_kind(trigger, kinds[0], project, out)
    return (kind if zone_ok else None), timezone


def _check_trigger_kind(
    trigger: Mapping[str, Any], kind: str, project: Project, out: _Collector
) -> str | None:
    """The one trigger kind checked; a bad timezone is reported already, so the schedule is
    checked in the project's timezone, for its own mistakes to show in the same run."""
    from engine.rules import schedule

    if kind == "event":
        name = str(trigger["event"])
        if not name or any(c in name for c in "/ ?#"):
            out.add(
                ("trigger", "event"),
                None,
                "an event name is one word like flight.canceled (no spaces or slashes)",
            )
        return kind
    if kind == "poll":
        poll = trigger["poll"]
        url = poll.get("url")
        if url is not None and not str(url).startswith(("http://", "https://")):
            out.add(
                ("trigger", "poll", "url"), None, "the feed URL must start with http:// or https://"
            )
        _duration(poll.get("every"), ("trigger", "poll", "every"), out)
        if poll.get("timeout") is not None:
            _duration(poll.get("timeout"), ("trigger", "poll", "timeout"), out)
        if poll.get("key") is not None:
            _check_text(poll["key"], ("trigger", "poll", "key"), out)
        return kind
    tz = _first_zone(str(trigger.get("timezone") or project.timezone), project.timezone)
    try:
        schedule.schedule_for({k: v for k, v in trigger.items() if k != "timezone"}, tz)
    except schedule.TriggerError as exc:
        out.add(("trigger", kind), None, str(exc))
        return None
    return kind


def _first_zone(*names: str) -> ZoneInfo:
    """The first valid of these timezones, else UTC (a bad one is reported where it is set)."""
    from engine.rules import schedule

    for name in names:
        try:
            return schedule.parse_timezone(name)
        except schedule.TriggerError:
            continue
    return ZoneInfo("UTC")


def _duration(value: Any, path: tuple[Any, ...], out: _Collector) -> timedelta | None:
    if value is None:
        return None
    from engine.rules import schedule

    try:
        return schedule.parse_duration(str(value))
    except schedule.TriggerError as exc:
        out.add(path, None, str(exc))
        return None


def _check_quiet_hours(value: Any, out: _Collector) -> QuietHours | None:
    if value is None:
        return None
    ok = "from" in value and "to" in value
    for key in ("from", "to"):
        if key not in value:
            continue
        text = str(value[key])
        parts = text.split(":")
        valid = (
            len(parts) == 2
            and all(p.isascii() and p.isdigit() for p in parts)
            and int(parts[0]) < 24
            and int(parts[1]) < 60
        )
        if not valid:
            out.add(
                ("quiet_hours", key),
                None,
                f"'{text}' is not a time of day; write HH:MM in quotes, like \"21:00\"",
            )
            ok = False
    if not ok:
        return None
    return QuietHours(str(value["from"]), str(value["to"]), str(value.get("then") or "defer"))


def _check_limit(value: Any, out: _Collector, project: Project) -> Limit | None:
    if value is None:
        return None
    count = int(native(value["count"])) if "count" in value else 0
    if "count" in value and count < 1:
        out.add(("limit", "count"), None, "must be at least 1")
    per = _duration(value.get("per"), ("limit", "per"), out)
    kept = project.retention.sent
    if per and kept is not None and per > kept:
        # The limit counts the outbox's rows; retention prunes sent ones after `kept`.
        from engine.rules.schedule import format_duration

        out.add(
            ("limit", "per"),
            None,
            f"is longer than retention.sent in pushrules.yaml ({format_duration(kept)}): "
            f"fires pruned by then no longer count, so more than {count} could be sent in "
            f"{format_duration(per)}; shorten per or keep sent rows longer",
            "warning",
        )
    return Limit(count, per) if per and count >= 1 else None


# --- messages and apps ---------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> MarkedMap:
    """``over`` on top of ``base``; mappings merge, everything else is replaced."""
    merged = MarkedMap(getattr(over, "line", 0), getattr(over, "column", 0))
    for source in (base, over):
        merged.key_marks.update(getattr(source, "key_marks", {}))
        for key, value in source.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def _resolve_message(
    message: Mapping[str, Any], path: tuple[Any, ...], fragments: Fragments, out: _Collector
) -> MarkedMap:
    """Apply ``use:`` for the message and for its buttons; siblings override the template."""
    resolved = _use(message, path, fragments, "messages", 5, out)
    buttons = resolved.get("interactiveButtons")
    if isinstance(buttons, dict):
        resolved["interactiveButtons"] = _use(
            buttons, (*path, "interactiveButtons"), fragments, "buttons", 23, out
        )
    return resolved


def _use(
    value: Mapping[str, Any],
    path: tuple[Any, ...],
    fragments: Fragments,
    kind: str,
    code: int,
    out: _Collector,
) -> MarkedMap:
    name = value.get("use")
    own = MarkedMap(getattr(value, "line", 0), getattr(value, "column", 0))
    own.key_marks.update(getattr(value, "key_marks", {}))
    own.update((k, v) for k, v in value.items() if k != "use")
    if name is None:
        return own
    library: Mapping[str, MarkedMap] = getattr(fragments, kind)
    template = library.get(str(name))
    if template is None:
        own["use"] = name  # left unresolved: later checks skip what they cannot know
        if f"{kind}/{name}" in fragments.broken:
            message = f"template '{name}' has errors: fix templates/{kind}/{name}.yaml first"
        else:
            message = (
                f"no template '{name}' in templates/{kind}/"
                f"{did_you_mean(str(name), library)}; known: {', '.join(sorted(library)) or 'none'}"
            )
        out.add((*path, "use"), code, message)
        return own
    return deep_merge(template, own)


def _check_apps(
    doc: MarkedMap,
    base_message: MarkedMap,
    project: Project,
    fragments: Fragments,
    out: _Collector,
) -> list[AppPlan]:
    plans = []
    for alias, settings in (doc.get("apps") or {}).items():
        path = ("apps", alias)
        app = project.apps.get(str(alias))
        if app is None:
            out.add(
                path,
                4,
                f"no app '{alias}' in pushrules.yaml"
                f"{did_you_mean(str(alias), project.apps)}; known apps: "
                f"{', '.join(sorted(project.apps))}",
            )
            continue
        settings = settings or {}
        parents = [k for k in accengage.PARENT_ID_FIELDS if k in settings]
        if not parents:
            if out.touched(path):
                continue  # a refused parent id is reported already
            out.add(
                path,
                10,
                "each app needs parentMessageId or parentMessageExternalId: the "
                "Accengage message this push is attached to",
            )
            continue
        if len(parents) == 2:
            out.add(
                path, 10, "give parentMessageId or parentMessageExternalId, not both", "warning"
            )
        message = base_message
        overrides = _NO_OVERRIDES
        if settings.get("message"):
            override = _resolve_message(settings["message"], (*path, "message"), fragments, out)
            message = deep_merge(base_message, override)
            overrides = frozenset(str(k) for k in override)
        plans.append(
            AppPlan(str(alias), app, parents[0], str(settings[parents[0]]), message, overrides)
        )
    return plans


def _message_paths(alias: str, sub: Sequence[Any]) -> tuple[tuple[Any, ...], ...]:
    """Where in the rule file a merged message field may come from, most specific first."""
    buttons: tuple[tuple[Any, ...], ...] = ()
    if sub[:1] == ("interactiveButtons",):
        buttons = (
            ("apps", alias, "message", "interactiveButtons", "use"),
            ("message", "interactiveButtons", "use"),
        )
    return (
        ("apps", alias, "message", *sub),
        ("message", *sub),
        *buttons,
        ("apps", alias, "message", "use"),
        ("message", "use"),
        ("message",),
    )


def _check_app_messages(
    plans: Sequence[AppPlan], targets: Sequence[Any], project: Project, out: _Collector
) -> None:
    """Each app's message; a problem of the message the apps share is reported once, naming
    the apps it concerns where that matters."""
    shared: dict[Problem, list[str]] = {}
    for plan in plans:
        for problem in _check_app_message(plan, targets, project, out):
            shared.setdefault(problem, []).append(plan.alias)
    for problem, aliases in shared.items():
        text = problem.message.replace(_APPS, _app_words(aliases))
        out.problems.append(dataclasses.replace(problem, message=text))


def _app_words(aliases: Sequence[str]) -> str:
    """``app 'a'``, ``apps 'a' and 'b'``, ``apps 'a', 'b' and 'c'``."""
    names = [f"'{a}'" for a in aliases]
    if len(names) == 1:
        return f"app {names[0]}"
    return f"apps {', '.join(names[:-1])} and {names[-1]}"


def _check_app_message(
    plan: AppPlan, targets: Sequence[Any], project: Project, out: _Collector
) -> list[Problem]:
    """The problems of one app's merged message, each where the author wrote the field."""
    message = plan.message
    alias, platform = plan.alias, plan.app.platform
    found: list[Problem] = []

    def add(sub: Sequence[Any], code: int | None, text: str, severity: str = "error") -> None:
        paths = _message_paths(alias, sub)
        path = paths[1] if _exists(out.doc, paths[1]) else paths[0]
        found.append(out.problem(path, code, text, severity, at=paths))

    wrong = (
        accengage.ANDROID_ONLY_MESSAGE_FIELDS
        if platform == "ios"
        else accengage.IOS_ONLY_MESSAGE_FIELDS
    )
    for name in sorted(wrong & set(message)):
        other = "Android" if platform == "ios" else "iOS"
        add(
            (name,),
            5,
            f"{name} is for {other} apps only, not for {'iOS' if platform == 'ios' else 'Android'} "
            f"{_APPS}; move it under apps.<{other.lower()} app>.message",
        )

    custom = message.get("customParams")
    if custom is not None:
        for sub, code, text in _custom_params_problems(custom, 6):
            add(("customParams", *sub), code, text)

    if message.get("sound") == "custom" and not message.get("soundName"):
        add(("sound",), 5, "sound: custom needs soundName (the sound file in the app)", "warning")
    opening = message.get("richPushOpening")
    if opening is not None and opening not in accengage.RICH_PUSH_OPENINGS:
        add(
            ("richPushOpening",),
            5,
            f"richPushOpening '{opening}' is not one Accengage documents; use "
            f"{' or '.join(accengage.RICH_PUSH_OPENINGS)}",
            "warning",
        )
    language = message.get("language")
    if (
        language is not None
        and project.languages is not None
        and not templating.is_template(str(language))
        and language not in project.languages
    ):
        add(
            ("language",),
            17,
            f"language '{language}' is not one of the project's languages "
            f"({', '.join(sorted(project.languages))})"
            f"{did_you_mean(str(language), project.languages)}",
        )

    buttons = message.get("interactiveButtons")
    if isinstance(buttons, dict) and "use" not in buttons:
        _check_buttons(buttons, plan, project, add)

    _check_macros(message, targets, project, add)

    size = accengage.payload_bytes(message)
    limit = accengage.MAX_PAYLOAD_BYTES[platform]
    if size > limit:
        add(
            (),
            None,
            f"the message for {_APPS} takes {size:,} bytes; {platform} refuses "
            f"pushes over {limit:,} bytes: shorten the texts or data",
            "warning",
        )
    return found


def _custom_params_problems(value: Any, code: int) -> Iterator[tuple[tuple[Any, ...], int, str]]:
    """customParams is a mapping of text (written for authors), or the API's own list."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(item, str):
                yield (key,), code, "each custom parameter value must be text"
        return
    for sub, unknown, text in accengage.custom_params_problems(value):
        yield sub, (13 if unknown else code), text


def _check_buttons(
    buttons: Mapping[str, Any], plan: AppPlan, project: Project, add: Report
) -> None:
    platform = plan.app.platform
    template = buttons.get("template")
    if template is None:
        if platform == "ios":
            add(
                ("interactiveButtons",),
                23,
                "iOS buttons need a template: the button category "
                "declared in the app (or an Accengage predefined one like yes_no_category)",
            )
        count = None
    else:
        count = project.button_count(str(template))
        if count is None:
            known = list(project.button_templates) + list(accengage.PREDEFINED_BUTTON_TEMPLATES)
            add(
                ("interactiveButtons", "template"),
                23,
                f"button template '{template}' is neither an Accengage predefined category nor "
                "declared under button_templates in pushrules.yaml"
                f"{did_you_mean(str(template), known)}",
                "warning",
            )
    items = buttons.get("buttons") or []
    maximum = accengage.MAX_BUTTONS[platform]
    if len(items) > maximum:
        add(
            ("interactiveButtons", "buttons"),
            24,
            f"{len(items)} buttons, but "
            f"{'iOS' if platform == 'ios' else 'Android'} shows at most {maximum}",
            "warning",
        )
    # The id is checked as the compiler sends it: YAML's number as a number, text as text.
    ids = [(i, native(b["id"])) for i, b in enumerate(items) if isinstance(b, dict) and "id" in b]
    for index, text in accengage.button_id_problems(ids, template, count):
        add(("interactiveButtons", "buttons", index, "id"), 24, f"button id {text}")
    for index, button in enumerate(items):
        if not isinstance(button, dict):
            continue
        sub = ("interactiveButtons", "buttons", index)
        action = button.get("action")
        if action is not None and action not in accengage.BUTTON_ACTIONS:
            if action in accengage.BUTTON_ACTION_VARIANTS:
                add(
                    (*sub, "action"),
                    5,
                    f"{action} is the spelling of Accengage's button page; the API documents "
                    f"{closest(str(action), accengage.BUTTON_ACTIONS)}: check which your "
                    "account accepts",
                    "warning",
                )
            else:
                add(
                    (*sub, "action"),
                    5,
                    f"'{action}' is not a button action"
                    f"{did_you_mean(str(action), accengage.BUTTON_ACTIONS)}; use one of: "
                    f"{', '.join(accengage.BUTTON_ACTIONS)}",
                )
        if platform == "ios":
            for name in sorted(accengage.ANDROID_ONLY_BUTTON_FIELDS & set(button)):
                add(
                    (*sub, name),
                    5,
                    f"{name} is shown on Android only; on iOS the button comes from its category",
                    "warning",
                )
        custom = button.get("customParams")
        if custom is not None:
            for csub, code, text in _custom_params_problems(custom, 25):
                add((*sub, "customParams", *csub), code, text)


def _target_data_names(target: Any) -> set[str]:
    if not isinstance(target, dict):
        return set()
    inner = target.get("target") if "for_each" in target else target
    data = inner.get("data") if isinstance(inner, dict) else None
    return {str(k) for k in data} if isinstance(data, dict) else set()


def _unfilled(name: str, known: set[str]) -> str:
    """Why ``${name}`` cannot be filled, pointing at a name that exists when it is misspelt."""
    close = closest(name, known)
    if close is None:
        return ""
    return f"nothing is named {name}; did you mean ${{{close}}}?"


def _check_macros(
    message: Mapping[str, Any], targets: Sequence[Any], project: Project, add: Report
) -> None:
    message_data = message.get("data")
    fillable = {str(k) for k in message_data} if isinstance(message_data, dict) else set()
    devices = project.device_fields or frozenset()
    severity = "error" if project.device_fields is not None else "warning"
    hint = (
        ""
        if project.device_fields is not None
        else " (declare device_fields in pushrules.yaml to make this check exact)"
    )
    target_names = [_target_data_names(t) for t in targets]
    for path, text in accengage.macro_texts(message):
        for name in written_macros(text):
            if name in fillable or name in devices:
                continue
            missing = [i for i, names in enumerate(target_names) if name not in names]
            if missing:
                which = ", ".join(f"targets[{i}]" for i in missing[:5])
                known = fillable | set(devices) | set().union(*target_names)
                why = _unfilled(name, known) or (
                    f"add {name} to the message's data, to each target's data, "
                    f"or to device_fields{hint}"
                )
                add(path, 15, f"${{{name}}} cannot be filled for {which}: {why}", severity)


#: A Jinja expression, statement or comment in a rule's text.
_JINJA_SPAN = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)


def written_macros(text: str) -> list[str]:
    """The ``${name}`` macros an author wrote outside Jinja: one Jinja makes is neutralised
    when the text is filled in (data never becomes a macro), and one whose name Jinja fills
    cannot be checked before it fires (the request check at fire time does)."""
    if "${" not in text:
        return []
    spans = [(m.start(), m.end()) for m in _JINJA_SPAN.finditer(text)]
    names: dict[str, None] = {}
    for match in accengage.MACRO.finditer(text):
        inside = any(start <= match.start() < end for start, end in spans)
        if not inside and "{{" not in match.group(1) and "{%" not in match.group(1):
            names[match.group(1).strip()] = None
    return list(names)


def _check_target_macros(
    targets: Sequence[Any], message: Mapping[str, Any], project: Project, out: _Collector
) -> None:
    """A target's own ``aps.alert`` is filled like the message: its data, the message's, a
    device field."""
    message_data = message.get("data")
    fillable = {str(k) for k in message_data} if isinstance(message_data, dict) else set()
    fillable |= project.device_fields or frozenset()
    severity = "error" if project.device_fields is not None else "warning"
    for index, target in enumerate(targets):
        if not isinstance(target, dict):
            continue
        inner = target.get("target") if "for_each" in target else target
        if not isinstance(inner, dict) or not isinstance(inner.get("aps"), dict):
            continue
        base = ("targets", index, *(("target",) if inner is not target else ()), "aps")
        own = fillable | _target_data_names(target)
        for path, text in accengage.alert_texts(inner["aps"].get("alert"), (*base, "alert")):
            for name in written_macros(text):
                if name not in own:
                    why = _unfilled(name, own) or (
                        f"add {name} to this target's data, to the message's data, "
                        "or to device_fields"
                    )
                    out.add(path, 15, f"${{{name}}} cannot be filled: {why}", severity)


# --- targets -------------------------------------------------------------------------------


def _check_targets(
    targets: Sequence[Any], multi_app: bool, project: Project, out: _Collector
) -> None:
    static = 0
    for index, target in enumerate(targets):
        path = ("targets", index)
        if not isinstance(target, dict):
            continue  # refused by the shape check
        if "for_each" in target or "target" in target or "as" in target:
            _check_dynamic_target(target, path, multi_app, project, out)
            continue
        static += 1
        _check_one_target(target, path, multi_app, project, out)
    if static > accengage.MAX_TARGETS:
        out.add(
            ("targets",),
            14,
            f"{static} targets; Accengage takes at most "
            f"{accengage.MAX_TARGETS} per request. Use a segment, a static list, or "
            f"for_each (which is split into requests of {accengage.MAX_TARGETS})",
        )


def _check_dynamic_target(
    target: Mapping[str, Any],
    path: tuple[Any, ...],
    multi_app: bool,
    project: Project,
    out: _Collector,
) -> None:
    extra = sorted(set(target) - {"for_each", "as", "target"})
    if extra:
        out.add(
            (*path, extra[0]),
            9,
            "a for_each target holds only for_each, as and target; move the criteria under target",
        )
    if "for_each" not in target or "target" not in target:
        if out.touched(path):
            return  # a refused for_each or target is reported already
        out.add(path, 9, 'a dynamic target needs for_each: "{{ ... }}" and target: {...}')
        return
    _check_expression(target["for_each"], (*path, "for_each"), out)
    name = str(target.get("as") or "item")
    if not name.isidentifier():
        out.add((*path, "as"), 9, f"'{name}' must be a plain name like p or passenger")
    inner = target["target"]
    for err in TARGET_CHECKER.check(inner):
        out.add((*path, "target", *err.path), 9, err.message)
    for key in ("for_each", "as", "target"):
        if isinstance(inner, Mapping) and key in inner and not out.touched((*path, "target", key)):
            out.add(
                (*path, "target", key),
                9,
                f"a for_each's target cannot hold {key}: one for_each a target (to send to a "
                "list within each item, flatten it in the event or feed)",
            )
    _check_one_target(inner, (*path, "target"), multi_app, project, out)


def _check_one_target(
    target: Mapping[str, Any],
    path: tuple[Any, ...],
    multi_app: bool,
    project: Project,
    out: _Collector,
) -> None:
    criteria = [
        k
        for k in target
        if k not in accengage.TARGET_KEYS and k not in ("for_each", "as", "target")
    ]
    lists = [k for k in target if k in accengage.SINGLE_APP_ONLY_TARGET_KEYS]
    if not criteria and not lists and not out.touched(path):
        out.add(
            path,
            9,
            "a target needs at least one criterion (like memberId), a segmentId or a static list",
        )
    if multi_app:
        for key in lists:
            out.add(
                (*path, key),
                9,
                f"{key} works with one app only; a rule for several apps must target by criteria",
            )
    if project.device_fields is not None:
        for key in criteria:
            if key not in project.device_fields:
                out.add(
                    (*path, key),
                    9,
                    f"'{key}' is not a device field"
                    f"{did_you_mean(str(key), project.device_fields)}; known: "
                    f"{', '.join(sorted(project.device_fields))} (device_fields in "
                    "pushrules.yaml)",
                )


# --- Jinja ---------------------------------------------------------------------------------


def _check_expression(value: Any, path: tuple[Any, ...], out: _Collector) -> None:
    text = str(value)
    if not templating.is_expression(text):
        example = (
            "{{ event.delay_minutes > 60 }}" if path == ("when",) else "{{ event.passengers }}"
        )
        out.add(path, None, f'must be one Jinja expression in {{{{ }}}}, like "{example}"')
        return
    _check_text(value, path, out)


def _check_text(
    value: Any, path: tuple[Any, ...], out: _Collector, names: frozenset[str] = frozenset()
) -> None:
    text = str(value)
    if not templating.is_template(text):
        return
    problem = templating.syntax_problem(text, names)
    if problem:
        out.add(path, None, problem)


def _walk_strings(value: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk_strings(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk_strings(item, (*path, index))


def _braced_strings(value: Any, path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], str]]:
    """The texts in ``value`` holding a ``{`` (a template may only be one of them), with their
    paths; a path is made only for those (most values of a rule are plain)."""
    found: list[tuple[tuple[Any, ...], str]] = []

    def walk(node: Any, where: tuple[Any, ...]) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(item, str):
                if "{" in item:
                    found.append(((*where, key), item))
            elif isinstance(item, dict | list):
                walk(item, (*where, key))

    if isinstance(value, str):
        if "{" in value:
            found.append((path, value))
    elif isinstance(value, dict | list):
        walk(value, path)
    return found


def _check_templates(doc: MarkedMap, out: _Collector) -> None:
    for section in ("message", "apps", "description"):
        for path, text in _braced_strings(doc.get(section), (section,)):
            _check_text(text, path, out)
    for index, target in enumerate(doc.get("targets") or []):
        names: frozenset[str] = frozenset()
        if isinstance(target, dict) and "for_each" in target:
            names = frozenset({str(target.get("as") or "item")})
        for path, text in _braced_strings(target, ("targets", index)):
            if path[-1] not in ("for_each", "as"):
                _check_text(text, path, out, names)


def compile_templates(rule: Rule) -> None:
    """Compile every template the rule holds now, so a fire compiles nothing (cache warm-up)."""
    # str(): the caches are keyed by value and type, and fires pass plain str, not Scalar.
    for plan in rule.apps:
        for _, text in _walk_strings(plan.message, ()):
            if templating.is_template(text):
                templating.compile_text(str(text))
    for _, text in _walk_strings(list(rule.targets), ()):
        if templating.is_template(text):
            if templating.is_expression(text):
                templating.compile_expression(str(text))
            templating.compile_text(str(text))
    if rule.when:
        templating.compile_expression(str(rule.when))


__all__ = [
    "compact_rule",
    "compile_templates",
    "deep_merge",
    "parse_rule",
    "shared_values",
]
