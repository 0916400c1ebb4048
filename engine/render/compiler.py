"""A rule plus what it fired on -> the exact ``sendInstantMessage`` request bodies.

Pure: no clock, no network, no store. Jinja renders here; ``${macros}`` pass through untouched;
``for_each`` targets expand here and the targets are cut into requests of at most 100. The
``user`` object is left out: credentials are added by the dispatcher at send time only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any, TypeVar, cast

from engine.accengage import api as accengage
from engine.accengage.request_check import check_request
from engine.errors import PushrulesError
from engine.rules import template_bounds as bounds
from engine.rules import templating
from engine.rules.problems import field_path
from engine.rules.project import Project
from engine.rules.rule import AppPlan, Rule
from engine.rules.secrets import MASK
from engine.rules.template_bounds import BoundExceeded
from engine.rules.yaml_source import Scalar, native

log = logging.getLogger("pushrules.compile")

#: Targets one fire may expand to through for_each before it is refused.
MAX_EXPANDED_TARGETS = 1_000_000


class CompileError(PushrulesError):
    """Rendering or expanding failed; names the rule and the field so the author can fix it.

    ``reference`` is the input the template read and did not find (``event.first_name``).
    """

    def __init__(
        self,
        rule: str,
        field: str,
        message: str,
        code: int | None = None,
        reference: str | None = None,
    ) -> None:
        super().__init__(f"rule {rule}, {field}: {message}")
        self.rule = rule
        self.field = field
        self.message = message
        self.code = code
        self.reference = reference


class BlankTarget(CompileError):
    """A target's id or criterion came out empty or from a null: it would select the wrong
    devices, so that target is not sent (a ``for_each`` item is skipped instead)."""

    def __init__(self, rule: str, field: str, reason: str, reference: str | None) -> None:
        super().__init__(
            rule,
            field,
            f"came out empty ({reason}); a target with an empty id or criterion would select "
            "the wrong devices, so it is not sent",
            9,
            reference,
        )
        self.reason = reason


def missing_input(error: CompileError, *, event: bool, item: bool) -> str | None:
    """What ``compile`` should say when the rule reads an event or feed item it was not given:
    ``this rule reads event.first_name: pass --event FILE``; None when that is not the cause."""
    reference = error.reference or ""
    root = reference.split(".", 1)[0]
    if root == "event" and not event:
        also = " (not --item: this rule reads an event)" if item else ""
        return f"this rule reads {reference}: pass --event FILE{also}"
    if root == "item" and not item:
        also = " (not --event: this rule reads a feed item)" if event else ""
        return f"this rule reads {reference}: pass --item FILE{also}"
    return None


@dataclass(frozen=True, slots=True)
class FireContext:
    """What a fire knows: when it fired, and the event or feed item that fired it."""

    now: datetime
    event: Mapping[str, Any] | None = None
    item: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CompiledRequest:
    rule: str
    chunk: int
    url: str
    body: dict[str, Any]  # {"sendInstantMessage": {...}} without "user"


def template_context(rule: Rule, ctx: FireContext) -> dict[str, Any]:
    return {
        "event": ctx.event if ctx.event is not None else {},
        "item": ctx.item if ctx.item is not None else {},
        "now": ctx.now,
        "rule": {"id": rule.id, "description": rule.description, "timezone": rule.timezone},
        "vars": native(rule.vars),
        **ctx.extra,
    }


#: Texts that read as "no" to a person but are true to Jinja, as every text but "" is: an
#: event's ``"vip": "false"`` under ``when: "{{ event.vip }}"`` would send.
_NO_WORDS = frozenset({"false", "no", "off", "0", "none", "null"})


def passes_when(rule: Rule, ctx: FireContext) -> bool:
    """The rule's ``when`` condition (true when it has none). A ``when`` that gives one value
    (``{{ event.vip }}``, ``{{ event.vip | lower }}``) and gives a text reading as "no" fails
    the fire, loudly, rather than send it on Jinja's reading. Only then: in
    ``{{ event.optin and event.lang }}`` the text is a value the author asked for (``no``,
    Norwegian), not a yes/no."""
    if not rule.when:
        return True
    try:
        with templating.fire_budget():
            value = templating.evaluate(rule.when, template_context(rule, ctx))
    except templating.RenderError as exc:
        raise CompileError(rule.id, "when", str(exc), reference=exc.reference) from None
    if (
        isinstance(value, str)
        and value.strip().lower() in _NO_WORDS
        and templating.gives_one_value(rule.when)
    ):
        raise CompileError(
            rule.id,
            "when",
            f"it gave the text {value!r}, which is true, as any text but an empty one is; "
            f"compare it instead, like {{{{ event.vip == 'true' }}}} (or make the field "
            "a JSON true/false)",
        )
    return bool(value)


#: Targets a compile in steps renders between two pauses (a few milliseconds of work), and
#: requests it checks: see :func:`compile_steps`.
STEP_TARGETS = 100
STEP_REQUESTS = 5

T = TypeVar("T")

#: Work done in steps: ``next()`` runs one step; the result is the generator's return value.
Steps = Generator[None, None, T]


def run_steps(steps: Steps[T]) -> T:
    """All the steps at once, for a caller that has no one to let through between them."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return cast(T, done.value)


def compile_fire(
    rule: Rule, project: Project, ctx: FireContext, *, notes: list[str] | None = None
) -> list[CompiledRequest]:
    """All requests of one fire; an empty list when for_each targets expand to nobody.

    Each request passes the same check the sandbox answers with before it is returned, so what
    rendering produced (an event's values) cannot send Accengage a request it would refuse.
    All rendering of one fire shares one budget of processor time (``FIRE_SECONDS``).
    ``notes`` receives, in words, what is otherwise only logged (``for_each`` items skipped).
    """
    return run_steps(compile_steps(rule, project, ctx, notes=notes))


def compile_steps(
    rule: Rule, project: Project, ctx: FireContext, *, notes: list[str] | None = None
) -> Steps[list[CompiledRequest]]:
    """:func:`compile_fire` in steps of :data:`STEP_TARGETS` targets (then of
    :data:`STEP_REQUESTS` last checks), so a caller on an event loop answers others between two
    steps while a ``for_each`` over 100,000 items compiles. The fire's budget of processor time
    counts its steps only, and the result is the same as compiling at once."""
    budget = bounds.new_budget()
    with bounds.resumed(budget):
        scope = template_context(rule, ctx)
        messages = [
            (plan, _parent(rule, plan, scope), _api_message(rule, plan, scope))
            for plan in rule.apps
        ]
        expanding = _expand_targets(rule, scope, notes)
    targets: list[dict[str, Any]] = []
    while True:
        with bounds.resumed(budget):
            step = list(islice(expanding, STEP_TARGETS))
        targets += step
        if len(step) < STEP_TARGETS:
            break
        yield
    requests = []
    for index, start in enumerate(range(0, len(targets), accengage.MAX_TARGETS)):
        chunk = targets[start : start + accengage.MAX_TARGETS]
        request = CompiledRequest(
            rule.id, index, project.url, {"sendInstantMessage": _request(messages, chunk)}
        )
        _last_check(rule, project, request)
        requests.append(request)
        if (index + 1) % STEP_REQUESTS == 0:
            yield
    return requests


def _last_check(rule: Rule, project: Project, request: CompiledRequest) -> None:
    code, label = check_request(
        accengage.with_user(request.body, "login", "password"),
        {},
        languages=sorted(project.languages) if project.languages is not None else None,
        device_fields=sorted(project.device_fields) if project.device_fields is not None else None,
    )
    if code != 0:
        where = f"request {request.chunk + 1}" if request.chunk else "the request"
        raise CompileError(rule.id, where, f"Accengage would answer {code}: {label}", code)


def _parent(rule: Rule, plan: AppPlan, scope: Mapping[str, Any]) -> str:
    """The parent message id, which may come from the event."""
    renderer = _Renderer(rule, scope, ("apps", plan.alias))
    return renderer.text(plan.parent_value, (plan.parent_key,))


def _request(
    messages: Sequence[tuple[AppPlan, str, dict[str, Any]]], targets: list[dict[str, Any]]
) -> dict[str, Any]:
    if len(messages) == 1:
        plan, parent, message = messages[0]
        return {
            "partner": {"id": plan.app.partner},
            plan.parent_key: parent,
            "message": message,
            "targets": targets,
        }
    return {
        "messages": [
            {"partner": {"id": p.app.partner}, p.parent_key: parent, "message": m}
            for p, parent, m in messages
        ],
        "targets": targets,
    }


def for_display(body: Mapping[str, Any], login: str) -> dict[str, Any]:
    """The body as ``pushrules compile`` shows it: the password masked."""
    return accengage.with_user(body, login, MASK)


# --- rendering -----------------------------------------------------------------------------


class _Renderer:
    def __init__(self, rule: Rule, scope: Mapping[str, Any], base: tuple[Any, ...]) -> None:
        self.rule = rule
        self.scope = scope
        self.base = base

    def text(self, value: Any, path: tuple[Any, ...]) -> str:
        text = str(value)
        if not templating.is_template(text):
            return text
        try:
            return templating.render(text, self.scope)
        except templating.RenderError as exc:
            raise self.error(path, exc) from None

    def error(self, path: tuple[Any, ...], exc: templating.RenderError) -> CompileError:
        where = field_path((*self.base, *path))
        return CompileError(self.rule.id, where, str(exc), reference=exc.reference)

    def texts(self, mapping: Mapping[str, Any], path: tuple[Any, ...]) -> dict[str, str]:
        made: dict[str, str] = _texts_maker(self.rule, mapping, (*self.base, *path))(self.scope)
        return made

    def custom_params(self, value: Any, path: tuple[Any, ...]) -> list[dict[str, str]]:
        if isinstance(value, dict):
            return [{"key": str(k), "value": self.text(v, (*path, k))} for k, v in value.items()]
        return [
            {
                "key": self.text(i["key"], (*path, n, "key")),
                "value": self.text(i["value"], (*path, n, "value")),
            }
            for n, i in enumerate(value)
        ]

    def aps(self, value: Mapping[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
        made: dict[str, Any] = _aps_maker(self.rule, value, (*self.base, *path))(self.scope)
        return made


def _boolean(value: Any) -> bool:
    if isinstance(value, Scalar) and isinstance(value.typed, bool):
        return value.typed
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "on", "1")
    return bool(value)


def _api_message(rule: Rule, plan: AppPlan, scope: Mapping[str, Any]) -> dict[str, Any]:
    own = _Renderer(rule, scope, ("apps", plan.alias, "message"))
    shared = _Renderer(rule, scope, ("message",))
    out: dict[str, Any] = {}
    for key, value in plan.message.items():
        path = (key,)
        r = own if key in plan.overrides else shared
        kind = accengage.MESSAGE_FIELDS.get(key, "string")
        if kind == "boolean":
            out[key] = _boolean(value)
        elif kind == "popup":
            out[key] = r.texts(value, path) if isinstance(value, dict) else _boolean(value)
        elif kind == "customParams":
            out[key] = r.custom_params(value, path)
        elif kind == "content":
            out[key] = r.texts(value, path)
        elif kind == "buttons":
            out[key] = _buttons(r, value, path)
        elif kind == "aps":
            out[key] = r.aps(value, path)
        else:
            out[key] = r.text(value, path)
    return out


def _buttons(r: _Renderer, value: Mapping[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "template" in value:
        out["template"] = r.text(value["template"], (*path, "template"))
    buttons = []
    for index, button in enumerate(value.get("buttons") or []):
        bpath = (*path, "buttons", index)
        item: dict[str, Any] = {}
        for key, field_value in button.items():
            kind = accengage.BUTTON_FIELD_TYPES.get(key)
            if kind == "id":
                # The type says String, the example sends a number: send what the author wrote.
                item[key] = native(field_value)
            elif kind == "boolean":
                item[key] = _boolean(field_value)
            elif kind == "customParams":
                item[key] = r.custom_params(field_value, (*bpath, key))
            else:
                item[str(key)] = r.text(field_value, (*bpath, key))
        buttons.append(item)
    out["buttons"] = buttons
    return out


# --- parts read once, made per scope: a for_each target is read once per fire, made per item --

#: A part of a request, made from a scope (a for_each target's: the fire's and its item).
Maker = Callable[[Mapping[str, Any]], Any]


def _constant(value: Any) -> Maker:
    return lambda _scope: value


def _text_maker(rule: Rule, value: Any, path: tuple[Any, ...]) -> Maker:
    """``_Renderer.text``, the text read once: a template is rendered, plain text kept."""
    text = str(value)
    if not templating.is_template(text):
        return _constant(text)
    render = templating.prepare(text)

    def make(scope: Mapping[str, Any]) -> str:
        try:
            return render(scope).text
        except templating.RenderError as exc:
            raise _Renderer(rule, scope, ()).error(path, exc) from None

    return make


def _criterion_maker(rule: Rule, value: Any, path: tuple[Any, ...]) -> Maker:
    """A target id or criterion: a template must give real text, not '' or a null."""
    text = str(value)
    if not templating.is_template(text):
        return _constant(text)
    render = templating.prepare(text)

    def make(scope: Mapping[str, Any]) -> str:
        try:
            rendered = render(scope)
        except templating.RenderError as exc:
            if exc.reference is None:
                raise _Renderer(rule, scope, ()).error(path, exc) from None
            raise BlankTarget(
                rule.id, field_path(path), f"{exc.reference} is missing", exc.reference
            ) from None
        if rendered.text.strip() and not rendered.nulls:
            return rendered.text
        blank = templating.blank_references(text, scope)
        reason = ", ".join(blank) or (
            "it printed a null" if rendered.nulls else "the template gave empty text"
        )
        raise BlankTarget(rule.id, field_path(path), reason, None)

    return make


def _native_maker(rule: Rule, value: Any, path: tuple[Any, ...]) -> Maker:
    """``_Renderer.native``: Apple's dictionaries keep YAML's types; text is rendered."""
    if isinstance(value, Scalar) and value.typed is not None:
        return _constant(value.typed)
    if isinstance(value, dict):
        return _mapping_maker(
            [(str(k), _native_maker(rule, v, (*path, k))) for k, v in value.items()]
        )
    if isinstance(value, list):
        items = [_native_maker(rule, v, (*path, i)) for i, v in enumerate(value)]
        return lambda scope: [make(scope) for make in items]
    if isinstance(value, str):
        return _text_maker(rule, value, path)
    return _constant(value)


def _mapping_maker(fields: list[tuple[str, Maker]]) -> Maker:
    return lambda scope: {key: make(scope) for key, make in fields}


def _texts_maker(rule: Rule, mapping: Mapping[str, Any], path: tuple[Any, ...]) -> Maker:
    return _mapping_maker([(str(k), _text_maker(rule, v, (*path, k))) for k, v in mapping.items()])


def _aps_maker(rule: Rule, value: Mapping[str, Any], path: tuple[Any, ...]) -> Maker:
    """Apple's dictionary: ``badge`` as YAML typed it, the rest as :func:`_native_maker`."""
    return _mapping_maker(
        [
            (str(k), _badge_maker(v) if k == "badge" else _native_maker(rule, v, (*path, k)))
            for k, v in value.items()
        ]
    )


def _badge_maker(value: Any) -> Maker:
    return lambda _scope: native(value)


def _target_maker(rule: Rule, target: Mapping[str, Any], path: tuple[Any, ...]) -> Maker:
    """What a target of the rule becomes in a request, read once: per item, only its templates
    are rendered (the field kinds, paths and template texts are the rule's, not the item's)."""
    fields: list[tuple[str, Maker]] = []
    for key, value in target.items():
        kpath = (*path, key)
        kind = accengage.TARGET_FIELDS.get(key)
        if kind == "content":
            maker = _texts_maker(rule, value, kpath)
        elif kind == "aps":
            maker = _aps_maker(rule, value, kpath)
        elif isinstance(value, dict):
            maker = _mapping_maker(
                [
                    ("operator", _constant(str(value["operator"]))),
                    ("value", _criterion_maker(rule, value["value"], (*kpath, "value"))),
                ]
            )
        else:
            maker = _criterion_maker(rule, value, kpath)
        fields.append((str(key), maker))
    return _mapping_maker(fields)


def _expand_targets(
    rule: Rule, scope: Mapping[str, Any], notes: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    r = _Renderer(rule, scope, ())
    produced = 0
    for index, target in enumerate(rule.targets):
        path = ("targets", index)
        if "for_each" not in target:
            produced += 1
            yield _target_maker(rule, target, path)(scope)
            continue
        try:
            items = templating.evaluate(str(target["for_each"]), scope)
        except templating.RenderError as exc:
            raise r.error((*path, "for_each"), exc) from None
        if isinstance(items, str | bytes | Mapping) or not hasattr(items, "__iter__"):
            raise CompileError(
                rule.id,
                field_path((*path, "for_each")),
                f"must give a list, and gave {type(items).__name__}",
                9,
            )
        name = str(target.get("as") or "item")
        make: Maker | None = None  # read at the first item, as a list of none reads nothing
        seen = 0
        skipped: list[BlankTarget] = []
        for item in items:
            seen += 1
            if produced + 1 > MAX_EXPANDED_TARGETS:
                raise CompileError(
                    rule.id,
                    field_path((*path, "for_each")),
                    f"expands to more than {MAX_EXPANDED_TARGETS:,} targets",
                    14,
                )
            if seen % 32 == 0:  # its templates count their own time; a plain one does not
                try:
                    templating.check_time()
                except BoundExceeded as exc:  # between targets: the list as a whole is at fault
                    raise CompileError(rule.id, field_path((*path, "for_each")), str(exc)) from None
            if make is None:
                make = _target_maker(rule, target["target"], (*path, "target"))
            try:
                made = make({**scope, name: item})
            except BlankTarget as blank:
                skipped.append(blank)
                continue
            produced += 1
            yield made
        if skipped:
            _report_skipped(rule, path, seen, skipped, notes)


def _report_skipped(
    rule: Rule,
    path: tuple[Any, ...],
    seen: int,
    skipped: list[BlankTarget],
    notes: list[str] | None,
) -> None:
    """Items whose id came out empty are left out and counted; all of them is an error."""
    first = skipped[0]
    words = (
        f"{len(skipped)} of {seen} for_each items skipped: their {first.field} came out "
        f"empty (the first: {first.reason})"
    )
    if len(skipped) == seen:
        raise CompileError(rule.id, field_path((*path, "for_each")), f"all {words}", 9)
    log.warning("rule %s, %s: %s", rule.id, field_path((*path, "for_each")), words)
    if notes is not None:
        notes.append(f"{field_path((*path, 'for_each'))}: {words}")


__all__ = [
    "BlankTarget",
    "CompileError",
    "CompiledRequest",
    "FireContext",
    "compile_fire",
    "for_display",
    "missing_input",
    "passes_when",
]
