"""Facts of the Accengage ``sendInstantMessage`` API, in one place.

Everything that checks or builds a request (the rule validator, the compiler's last check, the
sandbox endpoint) reads these tables, so the API is written down once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ROUTE = "/sendInstantMessage.php"
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

#: Target keys that are not device criteria.
TARGET_KEYS = ("segmentId", "staticListId", "staticListExternalId", "data", "aps")
SINGLE_APP_ONLY_TARGET_KEYS = frozenset({"segmentId", "staticListId", "staticListExternalId"})

BUTTON_FIELDS = ("id", "action", "url", "title", "icon", "destructive", "customParams")
ANDROID_ONLY_BUTTON_FIELDS = frozenset({"title", "icon", "destructive"})

APS_FIELDS = ("alert", "sound", "badge")
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

PLATFORMS = ("ios", "android")


def with_user(body: Mapping[str, Any], login: str, password: str) -> dict[str, Any]:
    """A request body as sent: ``user`` first, as in the API's examples."""
    inner = body["sendInstantMessage"]
    return {"sendInstantMessage": {"user": {"login": login, "password": password}, **inner}}


def describe(code: int | None) -> str:
    """The API's own words for a return code."""
    if code is None:
        return "no return code"
    return RETURN_CODES.get(code, f"unknown return code {code}")
