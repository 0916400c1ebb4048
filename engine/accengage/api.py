"""Facts of the Accengage ``sendInstantMessage`` API, in one place.

Everything that checks or builds a request (the rule validator, the compiler's last check, the
sandbox endpoint) reads these tables, so the API is written down once.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

ROUTE = "/sendInstantMessage.php"
#: Where this project's fake of the API (``sandbox``) listens unless told otherwise; named here,
#: with the API, so that commands can show it without loading the server.
SANDBOX_PORT = 8751
MAX_TARGETS = 100

RETURN_CODES: dict[int, str] = {
    0: "Instant Message has been sent",
    1: "A database error occurred",
    2: "No sendInstantMessage",
    3: "No or bad user",
    4: "No or bad partner",
    5: "No or bad message",
    6: "Bad custom params",
    9: "Bad targets",
    10: "No parent message ID",
    11: "Message limit exceeded",
    13: "Field unknown",
    14: "Target max number exceeded",
    15: "Template cannot be replaced",
    16: "No or bad appId",
    17: "The selected language does not exist",
    22: "Invalid certificate",
    23: "No or bad template for buttons",
    24: "No or bad button id",
    25: "Bad custom params for buttons",
}

#: Codes worth another attempt: the same request may pass later.
RETRYABLE_CODES = frozenset({1, 11})

SOUNDS = ("None", "default", "custom")
OPERATORS = ("=", "!=", "<", "<=", ">", ">=")
BUTTON_ACTIONS = ("browser", "email", "phone", "store", "sms", "webView", "urlScheme", "close")
RICH_PUSH_OPENINGS = ("webview", "browser")
#: Accengage's own button page spells urlScheme this way; taken, with a warning at validate time.
BUTTON_ACTION_VARIANTS = ("urlSheme",)

#: Message fields and the type the API gives them ("string", "boolean", "popup", "customParams",
#: "content", "buttons", "aps").
MESSAGE_FIELDS: dict[str, str] = {
    "subject": "string",
    "text": "string",
    "customizedTitle": "string",
    "longText": "string",
    "bigPicture": "string",
    "icon": "string",
    "sound": "string",
    "language": "string",
    "soundName": "string",
    "badge": "string",
    "actionButtonLabel": "string",
    "richPushUrl": "string",
    "richPushOpening": "string",
    "popup": "popup",
    "collapseKey": "string",
    "contentAvailable": "boolean",
    "customParams": "customParams",
    "data": "content",
    "interactiveButtons": "buttons",
    "aps": "aps",
}

ANDROID_ONLY_MESSAGE_FIELDS = frozenset(
    {"customizedTitle", "longText", "bigPicture", "icon", "popup"}
)
IOS_ONLY_MESSAGE_FIELDS = frozenset({"badge", "contentAvailable"})

#: Target keys that are not device criteria, and their types (as for :data:`MESSAGE_FIELDS`).
TARGET_FIELDS: dict[str, str] = {
    "segmentId": "string",
    "staticListId": "string",
    "staticListExternalId": "string",
    "data": "content",
    "aps": "aps",
}
TARGET_KEYS = tuple(TARGET_FIELDS)
SINGLE_APP_ONLY_TARGET_KEYS = frozenset({"segmentId", "staticListId", "staticListExternalId"})

#: Button fields and their types, in the order of the API documentation's example (the order
#: ``pushrules fmt`` writes them in); ``id`` is the button's number in its template (see
#: :func:`button_index`).
BUTTON_FIELD_TYPES: dict[str, str] = {
    "id": "id",
    "title": "string",
    "url": "string",
    "icon": "string",
    "action": "string",
    "destructive": "boolean",
    "customParams": "customParams",
}
BUTTON_FIELDS = tuple(BUTTON_FIELD_TYPES)
ANDROID_ONLY_BUTTON_FIELDS = frozenset({"title", "icon", "destructive"})

#: Aps fields and their types: ``alert`` is a string or Apple's dictionary.
APS_FIELD_TYPES: dict[str, str] = {"alert": "alert", "sound": "string", "badge": "integer"}
APS_FIELDS = tuple(APS_FIELD_TYPES)
POPUP_FIELDS = ("okButtonLabel", "cancelButtonLabel")

#: Keys of the request inside ``sendInstantMessage``: single-application and multi-application
#: forms, and one entry of the latter's ``messages``.
SINGLE_APP_REQUEST_FIELDS = (
    "user",
    "partner",
    "parentMessageId",
    "parentMessageExternalId",
    "message",
    "targets",
)
MULTI_APP_REQUEST_FIELDS = ("user", "messages", "targets")
APP_MESSAGE_FIELDS = ("partner", "parentMessageId", "parentMessageExternalId", "message")
PARENT_ID_FIELDS = ("parentMessageId", "parentMessageExternalId")
USER_FIELDS = ("login", "password")
PARTNER_FIELDS = ("id",)
CRITERION_FIELDS = ("operator", "value")
CUSTOM_PARAM_FIELDS = ("key", "value")
INTERACTIVE_BUTTONS_FIELDS = ("template", "buttons")

#: Message fields whose ``${name}`` macros Accengage fills; so do the string values of
#: ``aps.alert``, the message's and each target's.
MACRO_FIELDS = ("subject", "text", "customizedTitle", "longText")
#: A ``${name}`` macro; the name is taken without surrounding spaces.
MACRO = re.compile(r"\$\{([^}]*)\}")

#: Accengage's predefined iOS button categories and their number of buttons.
PREDEFINED_BUTTON_TEMPLATES: dict[str, int] = {
    **{
        name: 2
        for name in (
            "accept_later_category smiley_like_category smiley_happy_category yes_no_category "
            "yes_later_category accept_decline_category agree_disagree_category "
            "satisfied_unsatisfied_category buy_later_category aterater_category "
            "share_later_category favorite_later_category offer_share_category "
            "deal_later_category enjoy_nothanks_category addcart_nothanks_category "
            "showcart_later_category showbooking_later_category showticket_later_category "
            "man_woman_category show_close_category share_nothanks_category open_close_category "
            "like_later_category like_dislike_category subscribe_nothanks_category "
            "register_cancel_category login_close_category createaccount_close_category "
            "getmore_getless_category getmore_no_category call_later_category "
            "addcalendar_close_category answer_close_category takepart_close_category "
            "givefeedback_nothanks_category rate_later_category havefeedback_later_category "
            "seemore_close_category search_close_category find_close_category "
            "read_close_category letsgo_close_category imin_nothanks_category "
            "happy_unhappy_category show_share_category"
        ).split()
    },
    "acc_carousel_category": 1,
    "acc_dismiss_track": 0,
}

#: Buttons a platform shows at most.
MAX_BUTTONS = {"android": 3, "ios": 4}
#: Bytes a compiled message may take before the platform refuses it.
MAX_PAYLOAD_BYTES = {"ios": 4096, "android": 4000}


def payload_bytes(message: Mapping[str, Any]) -> int:
    """A message's size as measured against :data:`MAX_PAYLOAD_BYTES`: its JSON in UTF-8."""
    return len(json.dumps(message, ensure_ascii=False, default=str).encode())


PLATFORMS = ("ios", "android")


def message_field_code(path: tuple[Any, ...], *, unknown: bool = False, default: int = 5) -> int:
    """The return code a bad field at ``path`` inside a message earns (``default`` elsewhere)."""
    if unknown:
        return 13
    in_buttons = "interactiveButtons" in path
    if "customParams" in path:
        return 25 if in_buttons else 6
    if in_buttons and path[-1] == "id":
        return 24
    if in_buttons and path[-1] in ("template", "use"):
        return 23
    return default


def macros(text: str) -> list[str]:
    """The ``${name}`` macros of a text, in order, without repeats."""
    if "${" not in text:
        return []
    return list(dict.fromkeys(m.strip() for m in MACRO.findall(text)))


def alert_texts(alert: object, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """The texts of an ``aps.alert`` (a string, or the string values of Apple's dictionary)."""
    if isinstance(alert, str):
        yield path, alert
    elif isinstance(alert, Mapping):
        for key, value in alert.items():
            if isinstance(value, str):
                yield (*path, key), value


def macro_texts(message: Mapping[str, Any]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """The texts of a message Accengage fills ``${macros}`` in, with their paths in it."""
    for name in MACRO_FIELDS:
        text = message.get(name)
        if isinstance(text, str):
            yield (name,), text
    aps = message.get("aps")
    if isinstance(aps, Mapping):
        yield from alert_texts(aps.get("alert"), ("aps", "alert"))


def button_index(value: object) -> int | None:
    """A button id's number in its template (1 and up), or None if it is not one.

    The API types the id String and its example sends a number: both are taken, as long as
    they are a button's number (``1``, ``"2"``); anything else earns code 24.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    return None


def button_id_problems(
    ids: Iterable[tuple[int, object]], template: object, slots: int | None
) -> Iterator[tuple[int, str]]:
    """Code 24 of each ``(position, id)`` given: not a number, used twice, beyond the template.

    ``slots`` is the template's number of buttons when known. Texts follow the words "button
    id" or the id's path.
    """
    seen: set[int] = set()
    for position, ident in ids:
        index = button_index(ident)
        if index is None:
            shown = f"'{ident}'" if isinstance(ident, str) else str(ident)
            yield position, f"{shown} must be the button's number in its template (1, 2, ...)"
        elif index in seen:
            yield position, f"{ident} is used twice"
        elif slots is not None and index > slots:
            buttons = f"{slots} button{'s' if slots != 1 else ''}"
            yield position, f"{ident} is beyond template '{template}', which has {buttons}"
        if index is not None:
            seen.add(index)


def custom_params_problems(value: object) -> Iterator[tuple[tuple[Any, ...], bool, str]]:
    """What is wrong with a ``customParams`` list: ``(path in it, unknown field?, text)``.

    Texts follow the path they are about. The caller picks the code: 6 for a message's, 25 for
    a button's, 13 for an unknown field.
    """
    if not isinstance(value, list):
        yield (), False, "must be a list of {key: ..., value: ...}"
        return
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            yield (index,), False, "must be {key: ..., value: ...}"
            continue
        if (
            len(item) == 2
            and isinstance(item.get("key"), str)
            and isinstance(item.get("value"), str)
        ):
            continue  # the usual case, first: this runs on the send path
        extra = [name for name in item if name not in CUSTOM_PARAM_FIELDS]
        for name in CUSTOM_PARAM_FIELDS:
            if name not in item or item[name] is None:
                misspelt = difflib.get_close_matches(str(name), map(str, extra), n=1)
                if not misspelt:
                    yield (index,), False, f"has no {name}; each item is {{key: ..., value: ...}}"
            elif not isinstance(item[name], str):
                yield (index, name), False, "must be text"
        for name in extra:
            hint = difflib.get_close_matches(str(name), CUSTOM_PARAM_FIELDS, n=1)
            did = f" (did you mean {hint[0]}?)" if hint else ""
            yield (index, name), True, f"is not part of a custom parameter {{key, value}}{did}"


def with_user(body: Mapping[str, Any], login: str, password: str) -> dict[str, Any]:
    """A request body as sent: ``user`` first, as in the API's examples."""
    inner = body["sendInstantMessage"]
    return {"sendInstantMessage": {"user": {"login": login, "password": password}, **inner}}


def describe(code: int | None) -> str:
    """The API's own words for a return code."""
    if code is None:
        return "no return code"
    return RETURN_CODES.get(code, f"unknown return code {code}")
