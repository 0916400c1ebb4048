"""Cerberus schemas of the files a user writes, and the plain-language reading of their errors.

The shapes follow the Accengage API (ACCENGAGE_API.md) with the rule-level keys of DESIGN.md.
Scalars arrive as text (see :mod:`engine.rules.yaml_source`), so the two API types that are not
text, boolean and integer, are custom types that accept a plain YAML ``true`` or ``12``. What
Cerberus cannot say (cross-field and cross-file rules) is checked in :mod:`engine.rules.checks`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, cast

from engine.accengage import api as accengage
from engine.rules.fast_schema import Check, FastSchema, is_mapping, is_sequence
from engine.rules.problems import did_you_mean
from engine.rules.yaml_source import Scalar

TEXT: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "yamlbool"}
INT: dict[str, Any] = {"type": "yamlint"}
#: Text as YAML reads it, for values sent with YAML's types (``as_written``): ``12:30``,
#: ``yes`` or ``1.5`` unquoted are a number or a boolean there, which Accengage refuses.
YAML_TEXT: dict[str, Any] = {"type": "yamltext"}


def doc(
    title: str,
    description: str = "",
    json: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    *,
    as_written: bool = False,
) -> dict[str, Any]:
    """A field's documentation, as Cerberus ``meta`` (which it does not check): the hover text
    of the editor schema that ``pushrules schema`` derives from these definitions.

    ``json``: JSON Schema keywords for what pushrules checks in code beyond Cerberus (a
    duration's pattern, exactly one trigger kind), replacing the derived ones of the same
    name; tests/test_json_schema.py keeps both in step. A function is called only when the
    JSON Schema is made (the timezone names: too slow to list at every start).
    ``as_written``: the value is sent with the type YAML gives it (``1`` a number, ``"1"``
    text), so ``pushrules fmt`` must not quote it.
    """
    meta: dict[str, Any] = {"title": title}
    if description:
        meta["description"] = description
    if json:
        meta["json"] = json if callable(json) else dict(json)
    if as_written:
        meta["as_written"] = True
    return {"meta": meta}


#: Text the code reads with :func:`engine.rules.schedule.parse_duration`: whole numbers and
#: units largest first, at least one second.
DURATION_PATTERN = (
    r"^\s*(?=[^1-9]*[1-9])(?:[0-9]+\s*d\s*)?(?:[0-9]+\s*h\s*)?(?:[0-9]+\s*m\s*)?"
    r"(?:[0-9]+\s*s\s*)?$"
)
DURATION_JSON: dict[str, Any] = {"type": "string", "pattern": DURATION_PATTERN}
#: The same with milliseconds last (``500ms``, ``1s500ms``), at least 1 ms: the daemon's timing
#: settings, read with ``parse_duration(..., milliseconds=True)``.
DURATION_MS_PATTERN = (
    r"^\s*(?=[^1-9]*[1-9])(?:[0-9]+\s*d\s*)?(?:[0-9]+\s*h\s*)?(?:[0-9]+\s*m\s*)?"
    r"(?:[0-9]+\s*s\s*)?(?:[0-9]+\s*ms\s*)?$"
)
DURATION_MS_JSON: dict[str, Any] = {"type": "string", "pattern": DURATION_MS_PATTERN}
#: A time of day as quiet hours read it.
TIME_OF_DAY_PATTERN = r"^0*(?:1?[0-9]|2[0-3]):0*[0-5]?[0-9]$"
#: One ``{{ ... }}`` expression (``when``, ``for_each``): see templating.is_expression.
EXPRESSION_PATTERN = r"^\s*\{\{(?:(?!\{\{)[\s\S])*\}\}\s*$"
HTTP_URL_PATTERN = r"^https?://"
#: The same with no user before the host (project.py refuses one in ``accengage.url``).
HTTP_URL_NO_USER_PATTERN = r"^https?://[^/?#@]*([/?#]|$)"
#: Text, as JSON Schema sees it: any scalar, which pushrules keeps as written.
SCALAR_JSON: dict[str, Any] = {"type": ["string", "number", "boolean"]}
#: ``HOST:PORT``, the port from 1 to 65535 (project.py's check of ``listen``).
LISTEN_PATTERN = (
    r"^.+:0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]"
    r"|6553[0-5])$"
)

#: A mapping (the authors' short form) or the API's list; its items are checked in rules.py
#: with :func:`engine.accengage.api.custom_params_problems`.
CUSTOM_PARAMS: dict[str, Any] = {
    "type": ["dict", "list"],
    **doc(
        "Custom parameters",
        "Key/value pairs for the app: a mapping {key: value}, or the API's list "
        "[{key: ..., value: ...}]; every value is text.",
        json={
            "anyOf": [
                {"type": "object", "additionalProperties": SCALAR_JSON},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"key": SCALAR_JSON, "value": SCALAR_JSON},
                        "required": ["key", "value"],
                        "additionalProperties": False,
                    },
                },
            ]
        },
    ),
}

#: What the API's fields mean (ACCENGAGE_API.md), by name: the editor's hover text.
API_DOCS: dict[str, tuple[str, str]] = {
    "subject": ("Title", "The title line of the push."),
    "text": ("Text", "The body of the push; may hold ${macros} filled by Accengage."),
    "customizedTitle": ("Custom title (Android only)", "A custom title."),
    "longText": ("Long text (Android only)", "The text of the expanded notification."),
    "bigPicture": (
        "Big picture (Android only)",
        "An image name, uploaded through Accengage's image upload.",
    ),
    "icon": ("Icon (Android only)", "An icon name, uploaded through Accengage's image upload."),
    "sound": ("Sound", "None, default or custom (exactly these spellings)."),
    "language": ("Language", "The message's language; one of languages in pushrules.yaml."),
    "soundName": ("Sound file", "The sound file in the app, with sound: custom."),
    "badge": ("Badge (iOS only)", "The app icon's badge, as text; a leading + adds to it: '+1'."),
    "actionButtonLabel": ("Action button label", "The label of the action button."),
    "richPushUrl": ("Rich push URL", "The page of a rich push."),
    "richPushOpening": ("Rich push opening", "How the rich push opens: webview or browser."),
    "popup": (
        "Popup (Android only)",
        "true or false, or {okButtonLabel, cancelButtonLabel}.",
    ),
    "collapseKey": ("Collapse key", "Pushes with the same key replace each other."),
    "contentAvailable": (
        "Content available (iOS only)",
        "true for a silent background push (Apple throttles them).",
    ),
    "customParams": (CUSTOM_PARAMS["meta"]["title"], CUSTOM_PARAMS["meta"]["description"]),
    "data": ("Macro values", "Values that fill ${macros}: {flightref: EY5138}."),
    "interactiveButtons": ("Buttons", "The push's buttons: a category (template) and buttons."),
    "aps": (
        "Apple payload",
        "Apple's own payload: alert (text or mapping), sound (text), badge (whole number).",
    ),
    "alert": ("Alert", "A text, or Apple's alert dictionary (body, title, action-loc-key...)."),
    "okButtonLabel": ("OK button label", "The label of the popup's OK button."),
    "cancelButtonLabel": ("Cancel button label", "The label of the popup's cancel button."),
    "id": (
        "Button id",
        'Required: the button\'s number in its category, from 1 (1 or "1").',
    ),
    "action": (
        "Action",
        "browser, email, phone, store, sms, webView, urlScheme or close.",
    ),
    "url": ("URL", "The address the button's action opens."),
    "title": ("Title (Android only)", "The button's label; on iOS the category decides."),
    "destructive": ("Destructive (Android only)", "true or false."),
    "segmentId": ("Segment", "An Accengage segment; one-app rules only."),
    "staticListId": ("Static list", "An Accengage static list; one-app rules only."),
    "staticListExternalId": (
        "Static list (external id)",
        "An Accengage static list by its external id; one-app rules only.",
    ),
    "parentMessageId": (
        "Parent message id",
        "The Accengage message this push is attached to (or parentMessageExternalId).",
    ),
    "parentMessageExternalId": (
        "Parent message external id",
        "The Accengage message this push is attached to, by its external id.",
    ),
}

# Nested schemas say allow_unknown: False because Cerberus hands a parent's allow_unknown down
# to them, and a target allows unknown keys (its criteria).
CRITERION: dict[str, Any] = {
    "type": ["string", "dict"],
    "allow_unknown": False,
    "schema": {
        "operator": {
            "type": "string",
            "required": True,
            "allowed": list(accengage.OPERATORS),
            **doc(
                "Operator", 'How the device field compares: =, !=, <, <=, > or >= (quote it: ">=").'
            ),
        },
        "value": {"type": "string", "required": True, **doc("Value", "The value compared with.")},
    },
    **doc(
        "Criterion",
        "A device field to match: a plain value means equals; {operator, value} compares.",
    ),
}


def _api_field(name: str, rules: Mapping[str, Any]) -> dict[str, Any]:
    """The rules of an API field with its meaning from :data:`API_DOCS`."""
    meta = dict(rules.get("meta", {}))
    if name in API_DOCS and "title" not in meta:
        title, description = API_DOCS[name]
        meta.update(doc(title, description)["meta"])
    return {**rules, "meta": meta} if meta else dict(rules)


#: The rules of each API type of :mod:`engine.accengage.api`'s field tables (``id``: a button's
#: number, checked in rules.py with :func:`engine.accengage.api.button_index`; ``action``'s values
#: are checked there too, as Accengage's own spelling variant only warns).
_KINDS: dict[str, dict[str, Any]] = {
    "string": TEXT,
    "boolean": BOOL,
    "integer": INT,
    "alert": {"type": ["string", "dict"]},
    "content": {"type": "dict", "valuesrules": TEXT},
    "customParams": CUSTOM_PARAMS,
    "id": {
        "type": "string",
        "required": True,
        **doc(
            *API_DOCS["id"],
            json={"type": ["integer", "string"], "minimum": 1, "pattern": "^[0-9]*[1-9][0-9]*$"},
            as_written=True,
        ),
    },
}


def _fields(table: Mapping[str, str]) -> dict[str, Any]:
    return {name: _api_field(name, _KINDS[kind]) for name, kind in table.items()}


#: The API types inside ``aps``, whose values keep YAML's types: text must be text there, and
#: Apple's alert dictionary holds texts and lists of texts (``loc-args``).
_APS_KINDS: dict[str, dict[str, Any]] = {
    **_KINDS,
    "string": YAML_TEXT,
    "alert": {
        "type": ["yamltext", "dict"],
        "valuesrules": {"type": ["yamltext", "list"], "schema": YAML_TEXT},
    },
}

APS: dict[str, Any] = {
    "type": "dict",
    "allow_unknown": False,
    "schema": {
        name: _api_field(name, _APS_KINDS[kind]) for name, kind in accengage.APS_FIELD_TYPES.items()
    },
    **doc(*API_DOCS["aps"], as_written=True),  # Apple's dictionary keeps YAML's types
}

BUTTON: dict[str, Any] = {
    "type": "dict",
    "schema": {
        **_fields(accengage.BUTTON_FIELD_TYPES),
        "action": _api_field(
            "action",
            {
                **TEXT,
                "meta": {
                    "json": {"enum": [*accengage.BUTTON_ACTIONS, *accengage.BUTTON_ACTION_VARIANTS]}
                },
            },
        ),
    },
    **doc("Button", "One button: its id in the category, its action and what the action opens."),
}

BUTTONS: dict[str, Any] = {
    "type": "dict",
    "schema": {
        "use": {
            **TEXT,
            **doc("Button set template", "Take the buttons from templates/buttons/NAME.yaml."),
        },
        "template": {
            **TEXT,
            **doc(
                "Button category",
                "An Accengage predefined category (yes_no_category...) or one of button_templates "
                "in pushrules.yaml. Mandatory for iOS.",
            ),
        },
        "buttons": {"type": "list", "schema": BUTTON, **doc("Buttons", "The buttons, in order.")},
    },
    **doc(*API_DOCS["interactiveButtons"]),
}


def _message_schema() -> dict[str, Any]:
    fields: dict[str, Any] = {
        "use": {
            **TEXT,
            **doc(
                "Message template",
                "Take the fields from templates/messages/NAME.yaml; the keys next to use: "
                "override it.",
            ),
        }
    }
    for name, kind in accengage.MESSAGE_FIELDS.items():
        rules = {
            **_KINDS,
            "popup": {
                "type": ["yamlbool", "dict"],
                "schema": {name: _api_field(name, TEXT) for name in accengage.POPUP_FIELDS},
            },
            "buttons": BUTTONS,
            "aps": APS,
        }[kind]
        fields[name] = _api_field(name, rules)
    fields["sound"] = _api_field("sound", {"type": "string", "allowed": list(accengage.SOUNDS)})
    return fields


MESSAGE: dict[str, Any] = _message_schema()

_DYNAMIC_TARGET_KEYS = ["for_each", "as", "target"]

TARGET: dict[str, Any] = {
    "type": "dict",
    "allow_unknown": CRITERION,  # every other key is a device field criterion
    "schema": {
        "for_each": {
            **TEXT,
            **doc(
                "For each",
                "One {{ ... }} expression giving a list: one target per element, like "
                '"{{ event.passengers }}".',
                json={"type": "string", "pattern": EXPRESSION_PATTERN},
            ),
        },
        "as": {
            **TEXT,
            **doc(
                "Element name",
                "The name of one element of the for_each list inside target (default: item).",
                json={"type": ["string", "boolean"], "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
            ),
        },
        # checked as a target of its own in checks.py
        "target": {
            "type": "dict",
            **doc(
                "Target of each element",
                "An ordinary target, written once; it may use the as name.",
                json={"$ref": "#/$defs/target"},
            ),
        },
        **_fields({k: v for k, v in accengage.TARGET_FIELDS.items() if v != "aps"}),
        "aps": APS,
    },
    **doc(
        "Target",
        "Devices to reach: device field criteria (memberId, language...: all must match), a "
        "segment, a static list, or for_each.",
        json={
            "anyOf": [
                {  # dynamic: for_each and target, nothing else but as
                    "required": ["for_each", "target"],
                    "propertyNames": {"enum": _DYNAMIC_TARGET_KEYS},
                },
                {  # static: at least one criterion, segment or list
                    "allOf": [
                        {"not": {"anyOf": [{"required": [k]} for k in _DYNAMIC_TARGET_KEYS]}},
                        {"not": {"propertyNames": {"enum": ["data", "aps"]}}},
                    ]
                },
            ]
        },
    ),
}

_DURATION_WORDS = "a whole number and a unit (s, m, h, d), largest first: 90s, 15m, 1h30m, 2d"
_DURATION_MS_WORDS = "whole numbers and units (ms, s, m, h, d), largest first: 500ms, 2s, 1m"


def _duration(title: str, description: str, **rules: Any) -> dict[str, Any]:
    return {
        **TEXT,
        **rules,
        **doc(title, f"{description} {_DURATION_WORDS}.", json=DURATION_JSON),
    }


def _timezone_json() -> dict[str, Any]:
    from engine.rules.schedule import zone_names

    return {"type": "string", "enum": sorted(zone_names())}


TIMEZONE: dict[str, Any] = {
    **TEXT,
    **doc(
        "Timezone",
        "An IANA name like Europe/Paris (fixed offsets and abbreviations ignore daylight "
        "saving time).",
        json=_timezone_json,
    ),
}

TRIGGER: dict[str, Any] = {
    "cron": {
        **TEXT,
        **doc(
            "Cron schedule",
            'Five fields, minute hour day-of-month month day-of-week, quoted: "0 9 * * MON".',
            json={"type": "string"},
        ),
    },
    "every": _duration("Interval", "Fire at this interval:"),
    "at": {
        **TEXT,
        **doc(
            "Once, at",
            'A local date and time, quoted: "2026-12-24 18:00" (an offset like +01:00 may follow).',
            json={"type": "string"},
        ),
    },
    "event": {
        **TEXT,
        **doc(
            "Event",
            "Fire on POST /events/NAME (or pushrules fire NAME): one word like flight.canceled.",
            json={"pattern": r"^[^/ ?#]+$"},
        ),
    },
    "poll": {
        "type": "dict",
        "schema": {
            "url": {
                "type": "string",
                "required": True,
                **doc(
                    "Feed URL",
                    "The JSON feed, http:// or https://.",
                    json={"type": "string", "pattern": HTTP_URL_PATTERN},
                ),
            },
            "every": _duration("Poll interval", "How often the feed is read:", required=True),
            "items": {
                **TEXT,
                **doc("Items", "Where the list of items is in the feed's JSON, like offers."),
            },
            "key": {
                "type": "string",
                "required": True,
                **doc(
                    "Item key",
                    'What makes an item new, like "{{ item.id }}": each key fires once.',
                ),
            },
            "timeout": _duration("Timeout", "How long one read of the feed may take:"),
            "on_first_poll": {
                "type": "string",
                "allowed": ["record", "send"],
                **doc(
                    "On the first poll",
                    "record (default): the items already there are seen, not sent; send: "
                    "send them too.",
                ),
            },
        },
        **doc("Poll a feed", "GET a JSON feed on a schedule; each new item fires once."),
    },
    "timezone": TIMEZONE,
}

#: Exactly one kind of trigger: in checks.py (``a trigger needs exactly one of ...``).
_ONE_TRIGGER = {
    "oneOf": [{"required": [kind]} for kind in ("cron", "every", "at", "event", "poll")]
}

RULE: dict[str, Any] = {
    "description": {**TEXT, **doc("Description", "One sentence for humans.")},
    "enabled": {
        **BOOL,
        **doc("Enabled", "false switches the rule off without deleting it. Default true."),
    },
    "trigger": {
        "type": "dict",
        "required": True,
        "schema": TRIGGER,
        **doc(
            "Trigger",
            "When the rule fires: exactly one of cron, every, at, event, poll.",
            json=_ONE_TRIGGER,
        ),
    },
    "when": {
        **TEXT,
        **doc(
            "When",
            "A condition in one {{ }} expression; the rule only sends when it is true: "
            '"{{ event.delay_minutes > 60 }}".',
            json={"type": "string", "pattern": EXPRESSION_PATTERN},
        ),
    },
    "apps": {
        "type": "dict",
        "required": True,
        "empty": False,
        "valuesrules": {
            "type": "dict",
            "nullable": True,
            "schema": {
                **{name: _api_field(name, TEXT) for name in accengage.PARENT_ID_FIELDS},
                "message": {
                    "type": "dict",
                    "schema": MESSAGE,
                    **doc(
                        "Message for this app",
                        "Merged over the rule's message for this app only: platform-only "
                        "fields go here.",
                    ),
                },
            },
            **doc(
                "App",
                "The Accengage message this push is attached to: parentMessageId or "
                "parentMessageExternalId.",
                json={
                    "type": "object",
                    "anyOf": [{"required": [name]} for name in accengage.PARENT_ID_FIELDS],
                },
            ),
        },
        **doc(
            "Apps",
            "Which apps send it, by their alias in pushrules.yaml, each with its parent message.",
        ),
    },
    "message": {
        "type": "dict",
        "required": True,
        "schema": MESSAGE,
        **doc("Message", "What the push says, in the API's own field names."),
    },
    "targets": {
        "type": "list",
        "required": True,
        "empty": False,
        "schema": TARGET,
        **doc(
            "Targets",
            "Who receives it: the devices of every item of the list. At most "
            f"{accengage.MAX_TARGETS} written out (for_each ones are cut into requests).",
            json={  # checks.py: more than 100 static targets is code 14
                "contains": {"not": {"required": ["for_each"]}},
                "minContains": 0,
                "maxContains": accengage.MAX_TARGETS,
            },
        ),
    },
    "vars": {
        "type": "dict",
        **doc("Variables", "Your own named values, used in templates as {{ vars.NAME }}."),
    },
    "catch_up": _duration(
        "Catch up",
        "A scheduled fire missed while the daemon was down is sent on restart if it is "
        "younger than this (default 10m):",
    ),
    "quiet_hours": {
        "type": "dict",
        "schema": {
            "from": {
                "type": "string",
                "required": True,
                **doc(
                    "From",
                    'Start of the quiet hours, HH:MM in quotes: "21:00".',
                    json={"type": "string", "pattern": TIME_OF_DAY_PATTERN},
                ),
            },
            "to": {
                "type": "string",
                "required": True,
                **doc(
                    "To",
                    'End of the quiet hours, HH:MM in quotes: "08:00".',
                    json={"type": "string", "pattern": TIME_OF_DAY_PATTERN},
                ),
            },
            "then": {
                "type": "string",
                "allowed": ["defer", "skip"],
                **doc("Then", "defer (default): send when they end; skip: drop the push."),
            },
        },
        **doc("Quiet hours", "Hours when the rule must not send, in the rule's timezone."),
    },
    "limit": {
        "type": "dict",
        "schema": {
            "count": {
                **INT,
                "required": True,
                **doc("Count", "At most this many fires...", json={"minimum": 1}),
            },
            "per": _duration("Per", "...in any period this long:", required=True),
        },
        **doc(
            "Limit",
            "At most count fires per period; fires past it are held for a person.",
        ),
    },
}

SECRET: dict[str, Any] = {
    "type": ["dict", "string"],  # shape checked in project.py
    **doc(
        "Secret reference",
        "Never the secret itself: {env: VARIABLE_NAME} or {file: PATH}.",
        json={
            "type": "object",
            "properties": {
                "env": {**SCALAR_JSON, "title": "Environment variable"},
                "file": {**SCALAR_JSON, "title": "File (relative to the project folder)"},
            },
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
        },
    ),
}


@dataclass(frozen=True, slots=True)
class Bounds:
    """The values a number of ``pushrules.yaml`` may take: the one definition of its limits.

    The schema carries it (``"bounds": Bounds(...)``), so ``validate`` reports a value outside
    it with its line, and the settings built from the file never hold one the daemon refuses.
    ``unit="s"`` bounds a duration (``30s``, ``2m``) in seconds; ``unit="ms"`` one that may
    also be written in milliseconds (``500ms``), still bounded in seconds.
    """

    low: float
    high: float
    unit: str = ""
    #: A word also accepted in place of a number (``forever`` for a retention).
    word: str = ""

    def problem(self, value: float, written: object) -> str | None:
        """Why ``value`` (as ``written`` in the file) is out of bounds; None within them."""
        if self.low <= value <= self.high:
            return None
        kind = "a duration" if self.unit else "a whole number"
        return (
            f"{written} is out of range; write {kind} from {self.words(self.low)} "
            f"to {self.words(self.high)}{self.or_word()}"
        )

    def or_word(self) -> str:
        return f", or {self.word}" if self.word else ""

    def words(self, value: float) -> str:
        """A bound as it is written in the file (``300`` seconds is ``5m``)."""
        if not self.unit:
            return f"{value:d}" if isinstance(value, int) else f"{value:g}"  # not 6.71089e+07
        if value < 1:
            return f"{round(value * 1000)}ms"
        for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
            if value >= size and value % size == 0:
                return f"{value // size:g}{unit}"
        return f"{value:g}s"


#: ``dispatch:`` of pushrules.yaml. The bounds keep what the dispatcher accepts: at least one
#: request in flight and one attempt; a timeout the claim lease (10 minutes) can cover twice.
DISPATCH: dict[str, Any] = {
    "concurrency": {
        **INT,
        "bounds": Bounds(1, 256),
        **doc("Concurrency", "Requests in flight at once, from 1 to 256."),
    },
    "rate_per_second": {
        **INT,
        "bounds": Bounds(1, 10_000),
        **doc("Rate per second", "Requests started per second at most, from 1 to 10000."),
    },
    "max_attempts": {
        **INT,
        "bounds": Bounds(1, 100),
        **doc("Attempts", "Attempts of one request before it is given up, from 1 to 100."),
    },
    "timeout": {
        **TEXT,
        "bounds": Bounds(1, 300, "s"),
        **doc(
            "Timeout",
            f"One HTTP request's time limit, 1s to 5m: {_DURATION_WORDS}.",
            json=DURATION_JSON,
        ),
    },
    "on_unknown_outcome": {
        "type": "string",
        "allowed": ["park", "retry"],
        **doc(
            "On an unknown outcome",
            "park: a request whose result is unknown waits for a person; retry: send it again.",
        ),
    },
    "transport": {
        "type": "string",
        "allowed": ["aiohttp", "httpcore"],
        **doc(
            "Transport",
            "What carries the requests: aiohttp (the default: half the CPU a request) or "
            "httpcore (httpx's own pools). Both tell a request that never left from one that "
            "may have arrived.",
        ),
    },
    "poll_every": {
        **TEXT,
        "bounds": Bounds(0.01, 60, "ms"),
        **doc(
            "Poll every",
            "How often an idle dispatcher looks for rows it was not told about (queued by "
            f"another process, freed by a resume), 10ms to 1m: {_DURATION_MS_WORDS}.",
            json=DURATION_MS_JSON,
        ),
    },
}


def _timing(title: str, description: str, low: str, high: str) -> dict[str, Any]:
    """A duration of ``daemon:``, bounded, that may be written in milliseconds."""
    return doc(
        title, f"{description}, {low} to {high}: {_DURATION_MS_WORDS}.", json=DURATION_MS_JSON
    )


#: ``daemon:`` of pushrules.yaml: the run's own timing, read at start. The defaults suit
#: production; shorter ones answer sooner for a little more work while idle (tests use them).
DAEMON: dict[str, Any] = {
    "watch_every": {
        **TEXT,
        "bounds": Bounds(0.01, 60, "ms"),
        **_timing("Watch every", "How often the watcher looks for changed files", "10ms", "1m"),
    },
    "watch_quiet": {
        **TEXT,
        "bounds": Bounds(0.01, 60, "ms"),
        **_timing(
            "Watch quiet", "How long changed files must stay still before the reload", "10ms", "1m"
        ),
    },
    "watch_max_delay": {
        **TEXT,
        "bounds": Bounds(0.01, 600, "ms"),
        **_timing(
            "Watch max delay",
            "The longest a reload waits for files that keep changing",
            "10ms",
            "10m",
        ),
    },
    "leadership_every": {
        **TEXT,
        "bounds": Bounds(0.1, 600, "ms"),
        **_timing(
            "Leadership every",
            "How often a standby instance asks to lead, and the leader checks it still does: "
            "the longest the schedules wait after their leader died",
            "100ms",
            "10m",
        ),
    },
    "lock_wait": {
        **TEXT,
        "bounds": Bounds(0.01, 30, "ms"),
        **_timing(
            "Lock wait",
            "How long a fire's write waits for the store's locks before it fails (an event "
            "is answered 503, a scheduled fire written again)",
            "10ms",
            "30s",
        ),
    },
    "fire_retry": {
        **TEXT,
        "bounds": Bounds(0.01, 30, "ms"),
        **_timing(
            "Fire retry",
            "The first wait before a scheduled fire whose write failed is written again "
            "(doubling, up to 30s)",
            "10ms",
            "30s",
        ),
    },
    "fire_ahead": {
        **TEXT,
        "bounds": Bounds(0.01, 60, "ms", word="none"),
        **doc(
            "Fire ahead",
            "How long before its time a scheduled fire (cron, every, at) is decided and written "
            "to the outbox; its requests still leave at that time, not before. A minute's "
            "thousand rules are then sent on the minute, not over the seconds after it. A rule "
            "changed meanwhile takes back what its old version wrote, and fires anew. 10ms to "
            f"1m: {_DURATION_MS_WORDS}; or none, to decide each fire at its time.",
            json={"type": "string", "anyOf": [{"pattern": DURATION_MS_PATTERN}, {"const": "none"}]},
        ),
    },
    "fold_every": {
        **TEXT,
        "bounds": Bounds(0.1, 600, "ms"),
        **_timing(
            "Fold every",
            "How often the leader folds the outbox's state counts and looks at the prune clock: "
            "its first prune round comes this long after it leads",
            "100ms",
            "10m",
        ),
    },
}

#: ``intake:`` of pushrules.yaml. The body of one event is held whole, then parsed: 64 MiB
#: of JSON is about 1.5 million for_each targets (the compiler stops at 1,000,000).
MAX_BODY_DEFAULT = 1024 * 1024
INTAKE: dict[str, Any] = {
    "max_body": {
        **INT,
        "bounds": Bounds(1024, 64 * 1024 * 1024),
        **doc(
            "Largest event",
            "The largest event body the daemon takes, in bytes, from 1024 to 67108864 (64 MiB); "
            "default 1048576 (1 MiB). A larger one is answered 413.",
        ),
    },
}

#: ``retention:`` of pushrules.yaml: how long what is finished is kept before the daemon prunes
#: it, or ``forever``. Feed keys at least 7 days: polls refresh a key about daily, and a key is
#: only forgotten once polls stopped finding it for this long (engine/outbox/retention.py).
_DAYS = 86400
_RETENTION_JSON: dict[str, Any] = {
    "type": "string",
    "anyOf": [{"pattern": DURATION_PATTERN}, {"const": "forever"}],
}


def _kept(title: str, description: str, low_days: int) -> dict[str, Any]:
    return {
        **TEXT,
        "bounds": Bounds(low_days * _DAYS, 36500 * _DAYS, "s", "forever"),
        **doc(
            title,
            f"{description}: {_DURATION_WORDS}, at least {low_days}d; or forever.",
            json=_RETENTION_JSON,
        ),
    }


RETENTION: dict[str, Any] = {
    "sent": _kept("Sent", "How long a sent request is kept (default 90d)", 1),
    "dropped": _kept("Dropped", "How long a dropped request is kept (default 90d)", 1),
    "unmatched_events": _kept(
        "Unmatched events", "How long an event no rule took is kept (default 90d)", 1
    ),
    "feed_keys": _kept(
        "Feed keys",
        "How long a feed item's key is kept after polls stopped finding it (default 90d)",
        7,
    ),
    "marks": _kept("Marks", "How long a rule's marks are kept (default 90d)", 1),
}

PROJECT: dict[str, Any] = {
    "accengage": {
        "type": "dict",
        "required": True,
        "schema": {
            "url": {
                "type": "string",
                "required": True,
                **doc(
                    "Accengage URL",
                    "The address of the sendInstantMessage route, https://...",
                    json={"type": "string", "pattern": HTTP_URL_NO_USER_PATTERN},
                ),
            },
            "login": {
                **SECRET,
                "required": True,
                **doc("Login", "The API login, as a reference.", json=SECRET["meta"]["json"]),
            },
            "password": {
                **SECRET,
                "required": True,
                **doc("Password", "The API password, as a reference.", json=SECRET["meta"]["json"]),
            },
        },
        **doc("Accengage", "Where to send, and with which credentials (by reference only)."),
    },
    "apps": {
        "type": "dict",
        "required": True,
        "empty": False,
        "valuesrules": {
            "type": "dict",
            "schema": {
                "partner": {
                    "type": "string",
                    "required": True,
                    **doc("Partner", "The Accengage partner id: one app on one platform."),
                },
                "platform": {
                    "type": "string",
                    "required": True,
                    "allowed": list(accengage.PLATFORMS),
                    **doc("Platform", "ios or android."),
                },
            },
            **doc("App", "An app on one platform: its Accengage partner and platform."),
        },
        **doc("Apps", "Your apps: an alias of your choice -> {partner, platform}."),
    },
    "timezone": {**TIMEZONE, "meta": {**TIMEZONE["meta"], "title": "Default timezone"}},
    "device_fields": {
        "type": "list",
        "schema": TEXT,
        **doc(
            "Device fields",
            "The fields of your Accengage device database: target criteria and ${macros} are "
            "checked against them.",
        ),
    },
    "languages": {
        "type": "list",
        "schema": TEXT,
        **doc("Languages", "The languages of your Accengage account."),
    },
    # Up to 4 buttons in an app's own iOS category (ACCENGAGE_API.md); 0 for one without.
    "button_templates": {
        "type": "dict",
        "valuesrules": {**INT, "bounds": Bounds(0, 4)},
        **doc(
            "Button categories",
            "Your apps' own button categories -> their number of buttons (0 to 4).",
        ),
    },
    "store": {
        **TEXT,
        **doc(
            "Store",
            "Where the daemon keeps its outbox: sqlite:///pushrules.db (default) or "
            "postgresql+psycopg://user@host/database.",
            json={
                "type": "string",
                "pattern": r"^(?:sqlite://|postgresql://|postgresql\+psycopg://)",
            },
        ),
    },
    "listen": {
        **TEXT,
        **doc(
            "Listen",
            "HOST:PORT of the daemon's web port (events, health, metrics). Default 127.0.0.1:8750.",
            json={"type": "string", "pattern": LISTEN_PATTERN},
        ),
    },
    "intake_token": {
        **SECRET,
        **doc(
            "Intake token",
            "The secret that systems posting events must present, as a reference.",
            json=SECRET["meta"]["json"],
        ),
    },
    "dispatch": {
        "type": "dict",
        "schema": DISPATCH,
        **doc("Dispatch", "How the daemon sends: concurrency, rate, attempts, timeout."),
    },
    "intake": {
        "type": "dict",
        "schema": INTAKE,
        **doc("Intake", "How the daemon takes events: the largest body (max_body, in bytes)."),
    },
    "daemon": {
        "type": "dict",
        "schema": DAEMON,
        **doc(
            "Daemon",
            "The timing of pushrules run, read at its start: the file watcher, the leadership "
            "check, a fire's write. The defaults suit production.",
        ),
    },
    "retention": {
        "type": "dict",
        "schema": RETENTION,
        **doc(
            "Retention",
            "How long finished rows are kept before the daemon prunes them (sent, dropped, "
            "unmatched_events, feed_keys, marks), or forever. Rows that need a person are never "
            "pruned.",
        ),
    },
}

#: Why a rule test may expect nothing to be sent (``expect.because``).
NOT_SENT_BECAUSE = ("when", "quiet_hours", "no_targets")

#: What a case of a ``rule-tests/`` file expects; what Cerberus cannot say (contradictions,
#: an input the rule never reads) is checked in cases.py.
RULE_TEST_EXPECT: dict[str, Any] = {
    "requests": {
        **INT,
        "bounds": Bounds(0, 1_000_000),
        **doc("Requests", "How many HTTP requests the fire sends."),
    },
    "body": {
        "type": ["dict", "list"],
        **doc(
            "Body",
            "A subset of each request's sendInstantMessage: these keys must be there, as "
            "written; or a list, one such subset per request.",
        ),
    },
    "sent": {
        **BOOL,
        **doc(
            "Sent",
            "false: the fire sends nothing (say why with because); true: it sends (what body "
            "or requests say).",
        ),
    },
    "because": {
        "type": "string",
        "allowed": list(NOT_SENT_BECAUSE),
        **doc(
            "Because",
            "Why nothing is sent: when (the condition is false), quiet_hours, no_targets "
            "(for_each gave nobody).",
        ),
    },
    "error": {
        "type": "string",
        "empty": False,
        **doc("Error", "The fire fails: a part of the error's message."),
    },
}

#: One case of a ``rule-tests/`` file: an event or an item, a time, and what is expected.
CASE: dict[str, Any] = {
    "type": "dict",
    "schema": {
        "name": {
            "type": "string",
            "required": True,
            "empty": False,
            **doc("Name", "What this case shows."),
        },
        "event": {"type": "dict", **doc("Event", "The event the rule fires on.")},
        "item": {"type": "dict", **doc("Feed item", "The feed item of a poll rule.")},
        "at": {
            **TEXT,
            **doc(
                "At",
                "The fire time in the rule's timezone, like 2026-12-01 10:00 (default: "
                "Monday 2026-01-05 12:00).",
                json={"type": "string"},
            ),
        },
        "expect": {
            "type": "dict",
            "required": True,
            "schema": RULE_TEST_EXPECT,
            **doc("Expect", "What the fire does: requests and body, sent: false, or error."),
        },
    },
    **doc(
        "Case",
        "One fire: an event or an item, a time, and what is expected.",
        json={"type": "object", "not": {"required": ["event", "item"]}},
    ),
}

#: A ``rule-tests/*.yaml`` file (``pushrules test``).
RULE_TEST: dict[str, Any] = {
    "rule": {**TEXT, **doc("Rule", "The rule id (default: this file's name).")},
    "cases": {
        "type": "list",
        "required": True,
        "empty": False,
        "schema": CASE,
        **doc("Cases", "The cases of this test."),
    },
}


def is_yaml_bool(value: object) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, Scalar) and isinstance(value.typed, bool)


def is_yaml_text(value: object) -> bool:
    """Text that YAML reads as text: quoted, or plain and not a number, boolean or null."""
    return isinstance(value, str) and (not isinstance(value, Scalar) or value.typed is None)


def is_yaml_int(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return (
        isinstance(value, Scalar)
        and isinstance(value.typed, int)
        and not isinstance(value.typed, bool)
    )


class _YamlBoolType(type):
    def __instancecheck__(cls, value: object) -> bool:
        return is_yaml_bool(value)


class _YamlIntType(type):
    def __instancecheck__(cls, value: object) -> bool:
        return is_yaml_int(value)


class YamlBool(metaclass=_YamlBoolType):
    """Matches what YAML reads as a boolean (``isinstance`` is all Cerberus asks of a type)."""


class YamlInt(metaclass=_YamlIntType):
    """Matches what YAML reads as a whole number."""


class _YamlTextType(type):
    def __instancecheck__(cls, value: object) -> bool:
        return is_yaml_text(value)


class YamlText(metaclass=_YamlTextType):
    """Matches what YAML reads as text."""


@cache
def _validator_class() -> type:
    """Cerberus with the two YAML-aware types and the ``bounds`` rule; imported on the first
    document the fast path refuses (a valid project never loads Cerberus)."""
    import cerberus

    class _Validator(cerberus.Validator):  # type: ignore[misc]  # Cerberus has no types
        types_mapping: ClassVar[dict[str, Any]] = {
            **cerberus.Validator.types_mapping,
            "yamlbool": cerberus.TypeDefinition("yamlbool", (YamlBool,), ()),
            "yamlint": cerberus.TypeDefinition("yamlint", (YamlInt,), ()),
            "yamltext": cerberus.TypeDefinition("yamltext", (YamlText,), ()),
        }

        # Cerberus reads the docstring as the rule's own schema: any Bounds constraint is fine.
        def _validate_bounds(self, constraint: Bounds, field: str, value: object) -> None:
            """{'nullable': False}"""
            number = bounded_value(value, constraint)
            if isinstance(number, str):
                self._error(field, number)
                return
            if number is not None and (problem := constraint.problem(number, value)):
                self._error(field, problem)

    return _Validator


#: What each type name of the schemas accepts, as the validator's ``types_mapping`` says.
TYPE_CHECKS: dict[str, Check] = {
    "string": lambda value: isinstance(value, str),
    "dict": is_mapping,
    "list": is_sequence,
    "yamlbool": is_yaml_bool,
    "yamlint": is_yaml_int,
    "yamltext": is_yaml_text,
}


def _within_bounds(value: object, constraint: Bounds) -> bool:
    """The ``bounds`` rule finds no error (the validator's ``_validate_bounds``)."""
    number = bounded_value(value, constraint)
    if isinstance(number, str):
        return False
    return number is None or constraint.problem(number, value) is None


def bounded_value(value: object, bounds: Bounds) -> float | str | None:
    """The number a bounded setting holds (seconds for a duration), a message when a duration
    cannot be read, or None when the type is wrong (the type rule says so)."""
    if bounds.unit in ("s", "ms"):
        if not isinstance(value, str) or (bounds.word and str(value) == bounds.word):
            return None
        from engine.rules.schedule import TriggerError, parse_duration

        try:
            return parse_duration(str(value), milliseconds=bounds.unit == "ms").total_seconds()
        except TriggerError as exc:
            return f"{exc}{bounds.or_word()}"
    if not is_yaml_int(value):
        return None
    return cast(int, value.typed if isinstance(value, Scalar) else value)  # is_yaml_int said so


@dataclass(frozen=True, slots=True)
class SchemaError:
    """One thing Cerberus found, already in words for a rule author."""

    path: tuple[Any, ...]
    kind: str  # "unknown", "type", "allowed", "required", "empty", "null"
    message: str


_TYPE_WORDS = {
    "string": "text",
    "dict": "a mapping (name: value lines)",
    "list": "a list (lines starting with '- ')",
    "yamlbool": "true or false",
    "yamlint": "a whole number",
    "yamltext": "text in quotes (unquoted, 12:30, yes or 1.5 are a number or true/false here)",
}


def _type_words(constraint: object) -> str:
    names = constraint if isinstance(constraint, list | tuple) else [constraint]
    return " or ".join(_TYPE_WORDS.get(str(n), str(n)) for n in names)


class SchemaChecker:
    """One schema's check: a single pass says whether the document is valid (most are), and
    only a document it refuses goes through Cerberus, for the errors in words.

    The Cerberus validator is made on first need, so a valid project never imports Cerberus.
    """

    def __init__(
        self, schema: Mapping[str, Any], *, allow_unknown: bool | Mapping[str, Any] = False
    ) -> None:
        """``allow_unknown``: True, False, or the rules every unknown key must follow."""
        self._schema = dict(schema)
        self._allow_unknown = allow_unknown
        self._fast = FastSchema(self._schema, allow_unknown, TYPE_CHECKS, _within_bounds)
        self._cerberus: Any = None

    def check(self, document: Mapping[str, Any]) -> list[SchemaError]:
        if self._fast.valid(document):
            return []
        return self.cerberus_check(document)

    def fast_valid(self, document: Mapping[str, Any]) -> bool:
        """The single pass's verdict alone (tests compare it with Cerberus's)."""
        return self._fast.valid(document)

    def cerberus_check(self, document: Mapping[str, Any]) -> list[SchemaError]:
        """What Cerberus finds, whatever the single pass says."""
        validator = self._validator
        validator.validate(document, normalize=False)
        return list(self._read(validator._errors))

    @property
    def _validator(self) -> Any:
        if self._cerberus is None:
            self._cerberus = _validator_class()(self._schema, allow_unknown=self._allow_unknown)
        return self._cerberus

    def _read(self, errors: Any) -> Iterator[SchemaError]:
        for error in errors:
            if error.child_errors:
                yield from self._read(error.child_errors)
                continue
            yield self._explain(error)

    def _explain(self, error: Any) -> SchemaError:
        from cerberus import errors as cerr

        path = tuple(error.document_path)
        name = path[-1] if path else ""
        if error.code == cerr.UNKNOWN_FIELD.code:
            known = _known_fields(error.schema_path, self._validator.schema)
            hint = did_you_mean(str(name), known)
            choices = f"; allowed here: {', '.join(sorted(known))}" if known and not hint else ""
            return SchemaError(path, "unknown", f"'{name}' is not a known field{hint}{choices}")
        if error.code == cerr.BAD_TYPE.code:
            return SchemaError(path, "type", f"must be {_type_words(error.constraint)}")
        if error.code == cerr.UNALLOWED_VALUE.code:
            allowed = [str(a) for a in error.constraint]
            value = str(error.value)
            hint = (
                f" (did you mean '{value[::-1]}'?)"
                if value[::-1] in allowed and value[::-1] != value
                else did_you_mean(value, allowed)
            )
            return SchemaError(
                path,
                "allowed",
                f"'{error.value}' is not allowed{hint}; use one of: {', '.join(allowed)}",
            )
        if error.code == cerr.REQUIRED_FIELD.code:
            return SchemaError(path, "required", "is missing; add it")
        if error.code == cerr.EMPTY_NOT_ALLOWED.code:
            return SchemaError(path, "empty", "must not be empty")
        if error.code == cerr.CUSTOM.code and error.info:
            return SchemaError(path, "other", str(error.info[0]))
        if error.code == cerr.NOT_NULLABLE.code:
            return SchemaError(path, "null", "has no value; write one or remove the line")
        return SchemaError(path, "other", str(error.rule or "invalid value"))


def _known_fields(schema_path: tuple[Any, ...], root: Mapping[str, Any]) -> list[str]:
    """Field names the schema allows next to an unknown one (for "did you mean").

    Cerberus's schema path names ``allow_unknown`` where the rules of a parent's unknown keys
    apply, and document field names where those rules (or ``valuesrules``) took over.
    """
    node: Any = root
    stack: list[Any] = [root]
    for step in schema_path[:-1]:
        if step == "allow_unknown":
            owner = next(
                (n for n in reversed(stack) if isinstance(n, Mapping) and "allow_unknown" in n),
                None,
            )
            if owner is None or not isinstance(owner["allow_unknown"], Mapping):
                return []
            node = owner["allow_unknown"]
        elif isinstance(node, Mapping) and step in node:
            node = node[step]
        elif isinstance(node, Mapping) and ("type" in node or "schema" in node):
            continue  # a document key checked by these rules: stay on them
        else:
            return []
        stack.append(node)
    if isinstance(node, Mapping):
        inner = node.get("schema", node)
        if isinstance(inner, Mapping):
            return [str(k) for k in inner]
    return []


RULE_CHECKER = SchemaChecker(RULE)
RULE_TEST_CHECKER = SchemaChecker(RULE_TEST)
PROJECT_CHECKER = SchemaChecker(PROJECT)
MESSAGE_TEMPLATE_CHECKER = SchemaChecker(MESSAGE)
BUTTON_TEMPLATE_CHECKER = SchemaChecker(BUTTONS["schema"])
#: One target alone (a for_each target's inner ``target``).
TARGET_CHECKER = SchemaChecker(TARGET["schema"], allow_unknown=TARGET["allow_unknown"])
