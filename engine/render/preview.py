"""One compiled fire -> a self-contained HTML page showing each app's push as a person sees it.

Pure: the compiled requests, the project and the rule in, an HTML string out (the template is
read from this package). The page loads nothing (inline CSS; no fonts, scripts or images from
anywhere) and its template escapes every value, so an event's text can never become markup.

What a phone shows is read from the compiled message as the API describes it: ``${name}``
macros are filled from the target's data, then the message's (the API's order), and the rest,
which only the device database fills, are shown as ``${name}`` chips. On iOS, Apple's
``aps.alert`` (the target's, else the message's) is shown in place of subject and text, since
it is Apple's payload the phone displays; the card says which field it shows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

import jinja2

from engine.accengage import api
from engine.render.compiler import CompiledRequest, FireContext, for_display
from engine.rules.project import Project
from engine.rules.rule import Rule
from engine.rules.yaml_source import native

#: Targets drawn per app; the others see the same push with their own data.
MAX_SHOWN_TARGETS = 3
#: Requests whose JSON the page holds: a for_each over a large list makes thousands, which
#: ``compile`` prints in full but a browser would choke on.
MAX_SHOWN_REQUESTS = 10
TEMPLATE = "preview.html.j2"

PLATFORM_NAMES = {"ios": "iOS", "android": "Android"}

#: What tapping a button does, by its ``action`` ({url}: the button's url).
BUTTON_ACTIONS = {
    "browser": "opens {url} in the browser",
    "webView": "opens {url} inside the app",
    "email": "writes an email to {url}",
    "phone": "calls {url}",
    "sms": "writes a text message to {url}",
    "store": "opens the store at {url}",
    "urlScheme": "opens the link {url}",
    "urlSheme": "opens the link {url}",
    "close": "closes the notification",
}

RICH_PUSH_OPENINGS = {"webview": "inside the app", "browser": "in the browser"}

#: Where a macro's value came from (``Piece.source``).
FROM_TARGET = "the target's data"
FROM_MESSAGE = "the message's data"
FROM_DEVICE = "the device database"


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of shown text: as written, or a ``${macro}`` filled from data, or a macro only the
    device database fills (drawn as a chip)."""

    text: str
    macro: str = ""
    source: str = ""

    @property
    def kind(self) -> str:
        if not self.macro:
            return "text"
        return "device" if self.source == FROM_DEVICE else "filled"

    @property
    def hint(self) -> str:
        """Where the text came from, for a tooltip."""
        if not self.macro:
            return ""
        if self.source == FROM_DEVICE:
            return f"filled on the phone from {FROM_DEVICE}"
        return f"${{{self.macro}}} from {self.source}"


Text = tuple[Piece, ...]


@dataclass(frozen=True, slots=True)
class Button:
    id: str
    #: The label as shown; empty when the phone takes it from elsewhere (``placeholder``).
    label: str
    placeholder: str
    does: str
    icon: str
    destructive: bool | None
    params: str
    #: Why the phone does not show this button ("" when it does).
    hidden: str


@dataclass(frozen=True, slots=True)
class Card:
    """One target's push on one app."""

    target: str
    title: Text
    subtitle: Text
    text: Text
    long_text: Text
    #: Which fields the shown texts come from.
    text_from: str
    badge: str
    icon: str
    big_picture: str
    rich_push: str
    popup: tuple[str, str] | None
    category: str
    buttons: tuple[Button, ...]
    silent: bool
    #: Rows under the phone: sound, badge, action label, data... as (what, value).
    details: tuple[tuple[str, str], ...]
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AppView:
    alias: str
    platform: str
    platform_name: str
    partner: str
    parent: str
    cards: tuple[Card, ...]
    more: int


@dataclass(frozen=True, slots=True)
class PageView:
    rule: str
    file: str
    description: str
    trigger: str
    fired_at: str
    clock: str
    date: str
    inputs: tuple[tuple[str, str], ...]
    fires: bool
    sent: bool
    notes: tuple[str, ...]
    apps: tuple[AppView, ...]
    requests: int
    targets: int
    compiled: str
    #: Requests left out of ``compiled`` (past :data:`MAX_SHOWN_REQUESTS`).
    more_requests: int


def render_page(view: PageView) -> str:
    """The HTML of :func:`page_view`'s page: one file, loading nothing."""
    return _template().render(page=view)


@cache
def _template() -> jinja2.Template:
    source = resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")
    env = jinja2.Environment(
        autoescape=True,  # event text is data, never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.from_string(source)


def page_view(
    rule: Rule,
    project: Project,
    context: FireContext,
    requests: Sequence[CompiledRequest],
    login: str = "",
    notes: Sequence[str] = (),
    fires: bool = True,
    *,
    quiet_until: datetime | None = None,
    skipped: bool = False,
) -> PageView:
    """What the page shows, before it is HTML (tests read this). ``quiet_until``: the fire is
    inside the rule's quiet hours, which end then; ``skipped``: they drop it (``then: skip``),
    so nothing would be sent; otherwise it arrives at their end, the time the phones show."""
    targets = [t for r in requests for t in r.body["sendInstantMessage"]["targets"]]
    apps = (
        tuple(_app_view(rule, project, requests[0].body["sendInstantMessage"], targets))
        if requests
        else ()
    )
    inputs = tuple(
        (name, json.dumps(value, indent=2, ensure_ascii=False, default=str))
        for name, value in (("event", context.event), ("item", context.item))
        if value is not None
    )
    shown = [
        {"url": r.url, "body": for_display(r.body, login)} for r in requests[:MAX_SHOWN_REQUESTS]
    ]
    # When the phones get it: at the fire, or when the quiet hours deferring it end.
    shown_at = context.now if quiet_until is None or skipped else quiet_until
    return PageView(
        rule=rule.id,
        file=rule.file,
        description=rule.description,
        trigger=describe_trigger(rule),
        fired_at=context.now.isoformat(timespec="minutes"),
        clock=shown_at.strftime("%H:%M"),
        date=_date(shown_at),
        inputs=inputs,
        fires=fires,
        sent=bool(requests) and not skipped,
        notes=tuple(notes),
        apps=apps,
        requests=len(requests),
        targets=len(targets),
        compiled=json.dumps(shown, indent=2, ensure_ascii=False),
        more_requests=len(requests) - len(shown),
    )


def _date(now: datetime) -> str:
    return f"{now.strftime('%A')} {now.day} {now.strftime('%B')}"


def describe_trigger(rule: Rule) -> str:
    """``event flight.canceled``, ``cron 0 9 * * MON (Europe/Paris)``, ``poll URL every 5m``."""
    trigger = native(rule.trigger)
    value = trigger.get(rule.trigger_kind)
    if rule.trigger_kind == "poll" and isinstance(value, dict):
        return f"poll {value.get('url', '')} every {value.get('every', '')}"
    zone = f" ({rule.timezone})" if rule.trigger_kind in ("cron", "at") else ""
    return f"{rule.trigger_kind} {value}{zone}"


def _app_view(
    rule: Rule, project: Project, body: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]
) -> list[AppView]:
    entries = body.get("messages", [body])
    views = []
    for plan, entry in zip(rule.apps, entries, strict=True):
        message = entry["message"]
        platform = plan.app.platform
        card = _ios_card if platform == "ios" else _android_card
        views.append(
            AppView(
                alias=plan.alias,
                platform=platform,
                platform_name=PLATFORM_NAMES.get(platform, platform),
                partner=plan.app.partner,
                parent=f"{plan.parent_key} {entry[plan.parent_key]}",
                cards=tuple(card(message, t) for t in targets[:MAX_SHOWN_TARGETS]),
                more=max(0, len(targets) - MAX_SHOWN_TARGETS),
            )
        )
    return views


# --- texts ----------------------------------------------------------------------------------


def fill(text: object, target_data: Mapping[str, Any], message_data: Mapping[str, Any]) -> Text:
    """``text`` with its macros filled as Accengage fills them: the target's data, then the
    message's; a macro neither fills stays a chip for the device database."""
    if not isinstance(text, str) or not text:
        return ()
    pieces: list[Piece] = []
    at = 0
    for match in api.MACRO.finditer(text):
        if match.start() > at:
            pieces.append(Piece(text[at : match.start()]))
        name = match.group(1).strip()
        if name in target_data:
            pieces.append(Piece(str(target_data[name]), name, FROM_TARGET))
        elif name in message_data:
            pieces.append(Piece(str(message_data[name]), name, FROM_MESSAGE))
        else:
            pieces.append(Piece(f"${{{name}}}", name, FROM_DEVICE))
        at = match.end()
    if at < len(text):
        pieces.append(Piece(text[at:]))
    return tuple(pieces)


def describe_target(target: Mapping[str, Any]) -> str:
    """The devices a target selects, in words: ``language = en and opencount > 1``."""
    parts = []
    for key, value in target.items():
        if key in ("data", "aps"):
            continue
        if key == "segmentId":
            parts.append(f"segment {value}")
        elif key in ("staticListId", "staticListExternalId"):
            parts.append(f"static list {value}")
        elif isinstance(value, Mapping):
            parts.append(f"{key} {value.get('operator')} {value.get('value')}")
        else:
            parts.append(f"{key} = {value}")
    return " and ".join(parts) or "every device"


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _pairs(params: object) -> str:
    if not isinstance(params, list):
        return ""
    return ", ".join(f"{p.get('key')}={p.get('value')}" for p in params if isinstance(p, Mapping))


def _sound(message: Mapping[str, Any], aps_sound: object) -> str:
    if isinstance(aps_sound, str) and aps_sound:
        return f"{aps_sound} (Apple's aps.sound)"
    sound = message.get("sound")
    if sound == "None":
        return "none: silent"
    if sound == "default":
        return "the phone's default sound"
    if sound == "custom":
        name = message.get("soundName")
        return f"custom: {name}" if name else "custom, but no soundName is given"
    return "not set"


def _common_details(message: Mapping[str, Any], target: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows = []
    if message.get("actionButtonLabel"):
        rows.append(("action button", str(message["actionButtonLabel"])))
    if message.get("language"):
        rows.append(("language", str(message["language"])))
    if message.get("collapseKey"):
        rows.append(("collapse key", str(message["collapseKey"])))
    params = _pairs(message.get("customParams"))
    if params:
        rows.append(("sent to the app", params))
    data = [(k, v, "target") for k, v in _mapping(target.get("data")).items()]
    data += [(k, v, "message") for k, v in _mapping(message.get("data")).items()]
    if data:
        rows.append(("data", ", ".join(f"{k}={v} ({where})" for k, v, where in data)))
    return rows


def _badge_meaning(badge: str) -> str:
    if badge.startswith("+"):
        return f"adds {badge[1:]} to the number on the app's icon"
    if badge == "0":
        return "clears the number on the app's icon"
    return f"sets the number on the app's icon to {badge}"


def _rich_push(message: Mapping[str, Any]) -> str:
    url = message.get("richPushUrl")
    if not url:
        return ""
    opening = str(message.get("richPushOpening") or "")
    where = RICH_PUSH_OPENINGS.get(opening, f"({opening})" if opening else "")
    return f"Opening the push shows {url} {where}".rstrip()


# --- buttons --------------------------------------------------------------------------------


def _buttons(message: Mapping[str, Any], platform: str) -> tuple[str, tuple[Button, ...]]:
    spec = _mapping(message.get("interactiveButtons"))
    category = str(spec.get("template") or "")
    limit = api.MAX_BUTTONS.get(platform, 0)
    out = []
    for position, button in enumerate(spec.get("buttons") or []):
        if not isinstance(button, Mapping):
            continue
        ident = str(button.get("id", ""))
        action = str(button.get("action") or "")
        url = str(button.get("url") or "")
        does = BUTTON_ACTIONS.get(action, f"action {action}" if action else "no action given")
        title = button.get("title")
        if platform == "ios":
            label, placeholder = "", f"button {ident} of {category or 'no category'}"
        elif title:
            label, placeholder = str(title), ""
        else:
            label, placeholder = "", "no title"
        destructive = button.get("destructive")
        hidden = (
            f"{PLATFORM_NAMES.get(platform, platform)} shows at most {limit} buttons"
            if position >= limit
            else ""
        )
        out.append(
            Button(
                id=ident,
                label=label,
                placeholder=placeholder,
                does=does.format(url=url or "(no url)"),
                icon=str(button.get("icon") or "") if platform == "android" else "",
                destructive=destructive if isinstance(destructive, bool) else None,
                params=_pairs(button.get("customParams")),
                hidden=hidden,
            )
        )
    return category, tuple(out)


# --- platforms ------------------------------------------------------------------------------


def _ios_card(message: Mapping[str, Any], target: Mapping[str, Any]) -> Card:
    tdata, mdata = _mapping(target.get("data")), _mapping(message.get("data"))
    t_aps, m_aps = _mapping(target.get("aps")), _mapping(message.get("aps"))
    subtitle: Text = ()
    details: list[tuple[str, str]] = []
    if "alert" in t_aps or "alert" in m_aps:
        alert = t_aps["alert"] if "alert" in t_aps else m_aps["alert"]
        text_from = f"the {'target' if 'alert' in t_aps else 'message'}'s aps.alert (Apple's "
        text_from += "payload, shown in place of subject and text)"
        if isinstance(alert, Mapping):
            title = fill(alert.get("title"), tdata, mdata)
            subtitle = fill(alert.get("subtitle"), tdata, mdata)
            text = fill(alert.get("body"), tdata, mdata)
            if alert.get("action-loc-key"):
                label = f"{alert['action-loc-key']} (aps.alert action-loc-key)"
                details.append(("action label", label))
        else:
            title, text = (), fill(alert, tdata, mdata)
    else:
        text_from = "subject and text"
        title = fill(message.get("subject"), tdata, mdata)
        text = fill(message.get("text"), tdata, mdata)
    details.insert(0, ("sound", _sound(message, t_aps.get("sound") or m_aps.get("sound"))))
    given = (t_aps.get("badge"), m_aps.get("badge"), message.get("badge"))
    badge = next((str(b) for b in given if b is not None and b != ""), "")
    if badge:
        details.append(("badge", f"{badge}: {_badge_meaning(badge)}"))
    details += _common_details(message, target)
    notes = []
    silent = message.get("contentAvailable") is True
    if silent:
        notes.append("contentAvailable: the app is woken in the background to fetch content")
    silent = silent and not (title or subtitle or text)
    category, buttons = _buttons(message, "ios")
    return Card(
        target=describe_target(target),
        title=title,
        subtitle=subtitle,
        text=text,
        long_text=(),
        text_from=text_from,
        badge=badge if badge and badge != "0" else "",
        icon="",
        big_picture="",
        rich_push=_rich_push(message),
        popup=None,
        category=category,
        buttons=buttons,
        silent=silent,
        details=tuple(details),
        notes=tuple(notes),
    )


def _android_card(message: Mapping[str, Any], target: Mapping[str, Any]) -> Card:
    tdata, mdata = _mapping(target.get("data")), _mapping(message.get("data"))
    custom = message.get("customizedTitle")
    title = fill(custom or message.get("subject"), tdata, mdata)
    text_from = "customizedTitle and text" if custom else "subject and text"
    popup_value = message.get("popup")
    popup = None
    if popup_value is True or isinstance(popup_value, Mapping):
        labels = _mapping(popup_value)
        popup = (str(labels.get("cancelButtonLabel") or ""), str(labels.get("okButtonLabel") or ""))
    details = [("sound", _sound(message, None)), *_common_details(message, target)]
    notes = []
    if message.get("aps") or target.get("aps"):
        notes.append("aps is Apple's payload: Android phones do not show it")
    category, buttons = _buttons(message, "android")
    if category:
        details.append(("button category", category))
    return Card(
        target=describe_target(target),
        title=title,
        subtitle=(),
        text=fill(message.get("text"), tdata, mdata),
        long_text=fill(message.get("longText"), tdata, mdata),
        text_from=text_from,
        badge="",
        icon=str(message.get("icon") or ""),
        big_picture=str(message.get("bigPicture") or ""),
        rich_push=_rich_push(message),
        popup=popup,
        category=category,
        buttons=buttons,
        silent=False,
        details=tuple(details),
        notes=tuple(notes),
    )


__all__ = ["MAX_SHOWN_TARGETS", "PageView", "Piece", "fill", "page_view", "render_page"]
