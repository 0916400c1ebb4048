"""What Accengage would answer to a ``sendInstantMessage`` body, decided without sending it.

The sandbox endpoint answers with it and the compiler runs it as a last check before a send, so
a request the sandbox takes is one the compiler lets through. It walks the tables of
:mod:`engine.accengage.api` by hand instead of running a Cerberus schema because it sits on the send
path: Cerberus needs about 1.5 ms for the API's first example and 12 ms for 100 targets, this
walk 10-25 µs for the documented examples and about 0.25 ms for 100 targets.

Not checked, because a request alone does not tell them: fields of the other platform (the
partner's platform is unknown), iOS's mandatory button ``template``, a platform's button and
payload limits, an app's own button categories, whether segments and static lists exist.
``createMessage``'s rules (``soundName`` with ``custom``, ``richPushOpening`` values) are not this
route's and are left to the rule validator's warnings.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Collection, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Final

from engine.accengage import api

#: Languages the sandbox's account knows (``message.language`` outside them earns code 17).
DEFAULT_LANGUAGES: Final = ("en", "fr", "de", "es", "it", "nl", "pt")

#: The sandbox's device database, by ``memberId``. ``b3c77`` has no ``first_name`` on purpose, so
#: ``${first_name}`` for English speakers must come from ``data``.
DEFAULT_DEVICES: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType(
    {
        member: MappingProxyType(fields)
        for member, fields in {
            "765c8": {"language": "en", "opencount": "3", "first_name": "Patrick"},
            "a91f2": {"language": "fr", "opencount": "1", "first_name": "Marie"},
            "b3c77": {"language": "en", "opencount": "12"},
            "d0e41": {"language": "de", "opencount": "0", "first_name": "Jonas"},
        }.items()
    }
)

#: When a request has several problems, the answer is the first code of this order that applies.
CODE_ORDER: Final = (2, 3, 4, 10, 5, 6, 9, 13, 14, 15, 23, 24, 25, 17)

Problem = tuple[int, str]

_RANK: Final = {code: rank for rank, code in enumerate(CODE_ORDER)}
_ORDERED: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_TYPES: Final[dict[str, tuple[type, ...]]] = {"alert": (str, dict), "string": (str,)}
_SOUNDS: Final = ", ".join(api.SOUNDS)
_OPERATORS: Final = ", ".join(api.OPERATORS)
_ACTIONS: Final = ", ".join(api.BUTTON_ACTIONS)


def check_request(
    body: object,
    devices: Mapping[str, Mapping[str, str]] | None = None,
    *,
    languages: Collection[str] | None = DEFAULT_LANGUAGES,
    device_fields: Collection[str] | None = (),
) -> tuple[int, str]:
    """The ``(returnCode, returnLabel: detail)`` Accengage would answer; ``(0, label)`` if sent.

    ``devices`` is the device database by ``memberId`` (``None``: the sandbox's
    :data:`DEFAULT_DEVICES`; ``{}``: none), used to fill ``${macros}``. ``device_fields`` are
    fields every device is taken to hold, for a caller that knows the database's columns but not
    its rows (the compiler); ``None`` when even those are unknown, which skips code 15.
    ``languages=None`` accepts any ``message.language``.
    """
    problems: list[Problem] = []
    request = _envelope(body, problems)
    if request is not None:
        _check_request(request, languages, problems)
    worst = _first(problems)
    macros_count = worst is None or _RANK[worst[0]] > _RANK[15]
    if request is not None and device_fields is not None and macros_count:
        table = DEFAULT_DEVICES if devices is None else devices
        worst = _macro_problem(request, table, device_fields) or worst
    if worst is None:
        return 0, api.RETURN_CODES[0]
    code, detail = worst
    return code, f"{api.RETURN_CODES[code]}: {detail}"


def message_count(body: object) -> int:
    """Messages a request sends: one per partner (several in the multi-application form)."""
    request = body.get("sendInstantMessage") if isinstance(body, dict) else None
    messages = request.get("messages") if isinstance(request, dict) else None
    return len(messages) if isinstance(messages, list) and messages else 1


def _first(problems: list[Problem]) -> Problem | None:
    """The problem whose code comes first in :data:`CODE_ORDER`; the earliest found among ties."""
    return min(problems, key=lambda p: _RANK[p[0]]) if problems else None


# --- structure -----------------------------------------------------------------------------


def _envelope(body: object, problems: list[Problem]) -> dict[Any, Any] | None:
    if not isinstance(body, dict):
        problems.append((2, "the body must be a JSON object {sendInstantMessage: {...}}"))
        return None
    request = body.get("sendInstantMessage")
    if not isinstance(request, dict):
        what = "is not an object" if "sendInstantMessage" in body else "is missing"
        problems.append((2, f"sendInstantMessage {what}"))
        return None
    for key in body:
        if key != "sendInstantMessage":
            problems.append((13, f"{key} (beside sendInstantMessage) is unknown"))
    return request


def _check_request(
    request: dict[Any, Any], languages: Collection[str] | None, problems: list[Problem]
) -> None:
    multi = "messages" in request
    known = api.MULTI_APP_REQUEST_FIELDS if multi else api.SINGLE_APP_REQUEST_FIELDS
    _unknown(request, known, "", problems)
    _check_object(request.get("user"), "user", api.USER_FIELDS, 3, problems)
    for prefix, app in _apps(request, multi, problems):
        _check_object(app.get("partner"), f"{prefix}partner", api.PARTNER_FIELDS, 4, problems)
        _check_parent(app, prefix, problems)
        _check_message(app.get("message"), f"{prefix}message", languages, problems)
    _check_targets(request.get("targets"), multi, problems)


def _apps(
    request: dict[Any, Any], multi: bool, problems: list[Problem]
) -> Iterator[tuple[str, dict[Any, Any]]]:
    """Each (path prefix, object holding partner, parent id and message) of the request."""
    if not multi:
        yield "", request
        return
    entries = request["messages"]
    if not isinstance(entries, list) or not entries:
        problems.append(
            (
                4,
                "messages must be a non-empty list of "
                "{partner, parentMessageId or parentMessageExternalId, message}",
            )
        )
        return
    for index, entry in enumerate(entries):
        path = f"messages[{index}]"
        if not isinstance(entry, dict):
            problems.append((4, f"{path} must be an object {{partner, parentMessageId, message}}"))
            continue
        _unknown(entry, api.APP_MESSAGE_FIELDS, path, problems)
        yield f"{path}.", entry


def _check_object(
    value: object, path: str, fields: tuple[str, ...], code: int, problems: list[Problem]
) -> None:
    """User and partner: objects of non-empty strings."""
    if not isinstance(value, dict):
        what = "is missing" if value is None else "must be an object"
        problems.append((code, f"{path} {what} {{{', '.join(fields)}}}"))
        return
    for field in fields:
        if not _text(value.get(field)):
            problems.append((code, f"{path}.{field} must be a non-empty string"))
    _unknown(value, fields, path, problems)


def _check_parent(app: dict[Any, Any], prefix: str, problems: list[Problem]) -> None:
    present = [field for field in api.PARENT_ID_FIELDS if field in app]
    if not present:
        where = prefix.rstrip(".") or "the request"
        problems.append((10, f"{where} has neither parentMessageId nor parentMessageExternalId"))
    for field in present:
        if not _text(app[field]):
            problems.append((10, f"{prefix}{field} must be a non-empty string"))


def _check_message(
    message: object, path: str, languages: Collection[str] | None, problems: list[Problem]
) -> None:
    if not isinstance(message, dict):
        what = "is missing" if message is None else "must be an object"
        problems.append((5, f"{path} {what}"))
        return
    for key, value in message.items():
        kind = api.MESSAGE_FIELDS.get(key)
        if kind == "string":
            if not isinstance(value, str):
                problems.append((5, f"{path}.{key} must be a string"))
            elif key == "sound" and value not in api.SOUNDS:
                problems.append((5, f"{path}.sound must be one of {_SOUNDS}"))
            elif key == "language" and languages is not None and value not in languages:
                known = ", ".join(languages)
                problems.append((17, f"{path}.language '{value}' is not one of {known}"))
        elif kind == "boolean":
            if not isinstance(value, bool):
                problems.append((5, f"{path}.{key} must be a boolean"))
        elif kind == "popup":
            _check_popup(value, f"{path}.popup", problems)
        elif kind == "customParams":
            _check_custom_params(value, f"{path}.customParams", 6, problems)
        elif kind == "content":
            _check_content(value, f"{path}.data", 5, problems)
        elif kind == "buttons":
            _check_buttons(value, f"{path}.interactiveButtons", problems)
        elif kind == "aps":
            _check_aps(value, f"{path}.aps", 5, problems)
        else:
            problems.append((13, _unknown_detail(key, api.MESSAGE_FIELDS, path)))


def _check_popup(popup: object, path: str, problems: list[Problem]) -> None:
    if isinstance(popup, bool):
        return
    if not isinstance(popup, dict):
        problems.append((5, f"{path} must be a boolean or {{okButtonLabel, cancelButtonLabel}}"))
        return
    for key, value in popup.items():
        if key not in api.POPUP_FIELDS:
            problems.append((13, _unknown_detail(key, api.POPUP_FIELDS, path)))
        elif not isinstance(value, str):
            problems.append((5, f"{path}.{key} must be a string"))


def _check_custom_params(params: object, path: str, code: int, problems: list[Problem]) -> None:
    for sub, unknown, text in api.custom_params_problems(params):
        problems.append((13 if unknown else code, f"{_at(path, sub)} {text}"))


def _at(path: str, sub: tuple[Any, ...]) -> str:
    """``message.customParams`` and ``(0, "key")`` -> ``message.customParams[0].key``."""
    return path + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in sub)


def _check_content(content: object, path: str, code: int, problems: list[Problem]) -> None:
    if not isinstance(content, dict):
        problems.append((code, f"{path} must be an object of strings"))
        return
    for key, value in content.items():
        if not isinstance(value, str):
            problems.append((code, f"{path}.{key} must be a string"))


def _check_aps(aps: object, path: str, code: int, problems: list[Problem]) -> None:
    if not isinstance(aps, dict):
        problems.append((code, f"{path} must be an object {{{', '.join(api.APS_FIELDS)}}}"))
        return
    for key, value in aps.items():
        kind = api.APS_FIELD_TYPES.get(key)
        if kind is None:
            problems.append((13, _unknown_detail(key, api.APS_FIELDS, path)))
        elif kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append((code, f"{path}.{key} must be an integer"))
        elif not isinstance(value, _TYPES[kind]):
            what = "a string or an object" if kind == "alert" else "a string"
            problems.append((code, f"{path}.{key} must be {what}"))
        elif isinstance(value, dict):  # Apple's alert dictionary: texts, lists of texts
            for name, item in value.items():
                texts = item if isinstance(item, list) else [item]
                if not all(isinstance(text, str) for text in texts):
                    problems.append(
                        (code, f"{path}.{key}.{name} must be a string or a list of strings")
                    )


def _check_buttons(buttons: object, path: str, problems: list[Problem]) -> None:
    if not isinstance(buttons, dict):
        problems.append((5, f"{path} must be an object {{template, buttons}}"))
        return
    _unknown(buttons, api.INTERACTIVE_BUTTONS_FIELDS, path, problems)
    template = buttons.get("template")
    if "template" in buttons and not _text(template):
        problems.append((23, f"{path}.template must be a non-empty string"))
    if "buttons" not in buttons:
        return
    items = buttons["buttons"]
    if not isinstance(items, list):
        problems.append((5, f"{path}.buttons must be a list of buttons"))
        return
    slots = api.PREDEFINED_BUTTON_TEMPLATES.get(template) if isinstance(template, str) else None
    ids: list[tuple[int, object]] = []
    for index, button in enumerate(items):
        where = f"{path}.buttons[{index}]"
        if not isinstance(button, dict):
            problems.append((5, f"{where} must be an object"))
            continue
        for key, value in button.items():
            kind = api.BUTTON_FIELD_TYPES.get(key)
            if kind is None:
                problems.append((13, _unknown_detail(key, api.BUTTON_FIELDS, where)))
            elif kind == "id":
                ids.append((index, value))
            elif kind == "customParams":
                _check_custom_params(value, f"{where}.{key}", 25, problems)
            elif kind == "boolean":
                if not isinstance(value, bool):
                    problems.append((5, f"{where}.{key} must be a boolean"))
            elif not isinstance(value, str):
                problems.append((5, f"{where}.{key} must be a string"))
            elif key == "action" and value not in (
                *api.BUTTON_ACTIONS,
                *api.BUTTON_ACTION_VARIANTS,
            ):
                problems.append((5, f"{where}.action must be one of {_ACTIONS}"))
        if "id" not in button:
            problems.append((24, f"{where}.id is missing; give the button's number (1, 2, ...)"))
    for index, text in api.button_id_problems(ids, template, slots):
        problems.append((24, f"{path}.buttons[{index}].id {text}"))


def _check_targets(targets: object, multi: bool, problems: list[Problem]) -> None:
    if not isinstance(targets, list) or not targets:
        problems.append((9, "targets must be a non-empty list of targets"))
        return
    if len(targets) > api.MAX_TARGETS:
        problems.append((14, f"targets holds {len(targets)} entries, at most {api.MAX_TARGETS}"))
    for index, target in enumerate(targets):
        _check_target(target, f"targets[{index}]", multi, problems)


def _check_target(target: object, path: str, multi: bool, problems: list[Problem]) -> None:
    if not isinstance(target, dict):
        problems.append((9, f"{path} must be an object"))
        return
    selects = False
    for key, value in target.items():
        kind = api.TARGET_FIELDS.get(key)
        if kind == "content":
            _check_content(value, f"{path}.{key}", 9, problems)
        elif kind == "aps":
            _check_aps(value, f"{path}.{key}", 9, problems)
        elif kind is not None:
            selects = True
            if multi and key in api.SINGLE_APP_ONLY_TARGET_KEYS:
                problems.append((9, f"{path}.{key} is for single-application requests only"))
            elif not _text(value):
                problems.append((9, f"{path}.{key} must be a non-empty string"))
        else:
            selects = True
            _check_criterion(value, f"{path}.{key}", problems)
    if not selects:
        problems.append(
            (9, f"{path} has no criterion, segmentId, staticListId nor staticListExternalId")
        )


def _check_criterion(criterion: object, path: str, problems: list[Problem]) -> None:
    """A device field's condition: a string (``=``) or ``{operator, value}``."""
    if isinstance(criterion, str):
        return
    if not isinstance(criterion, dict):
        problems.append((9, f"{path} must be a string or {{operator, value}}"))
        return
    if criterion.get("operator") not in api.OPERATORS:
        problems.append((9, f"{path}.operator must be one of {_OPERATORS}"))
    if not isinstance(criterion.get("value"), str):
        problems.append((9, f"{path}.value must be a string"))
    for key in criterion:
        if key not in api.CRITERION_FIELDS:
            problems.append((9, f"{path}.{key} is not part of a criterion {{operator, value}}"))


def _text(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _unknown(
    obj: dict[Any, Any], known: Collection[str], path: str, problems: list[Problem]
) -> None:
    for key in obj:
        if key not in known:
            problems.append((13, _unknown_detail(key, known, path)))


def _unknown_detail(key: object, known: Collection[str], path: str) -> str:
    name = str(key)
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{f'{path}.{name}' if path else name} is unknown{hint}"


# --- macros --------------------------------------------------------------------------------


def _macro_problem(
    request: dict[Any, Any],
    devices: Mapping[str, Mapping[str, str]],
    device_fields: Collection[str],
) -> Problem | None:
    """Code 15: a ``${name}`` that some target's data, the message's data and devices can't fill.

    Run only on a request whose structure is sound, so types are as the API says.
    """
    messages = (
        [(f"messages[{i}].message", app["message"]) for i, app in enumerate(request["messages"])]
        if "messages" in request
        else [("message", request["message"])]
    )
    needs = [(path, message, list(_message_macros(message, path))) for path, message in messages]
    rows: list[tuple[str, Mapping[str, str]]] | None = None
    for index, target in enumerate(request["targets"]):
        aps = target.get("aps")
        own = list(_alert_macros(aps, f"targets[{index}].aps.alert")) if aps else []
        target_data = target.get("data") or {}
        matched: list[tuple[str, Mapping[str, str]]] | None = None
        for _, message, macros in needs:
            message_data = message.get("data") or {}
            for name, path, sub in (*macros, *own):
                if name in target_data or name in message_data or name in device_fields:
                    continue
                if matched is None:
                    rows = _device_rows(devices) if rows is None else rows
                    matched = _matching_devices(target, rows)
                lacking = [member for member, device in matched if name not in device]
                if matched and not lacking:
                    continue
                why = f"device {lacking[0]} has no {name}" if lacking else "it matches no device"
                return (
                    15,
                    f"${{{name}}} in {_at(path, sub)} cannot be filled for targets[{index}]: "
                    f"not in its data nor the message's data, and {why}",
                )
    return None


def _message_macros(
    message: dict[Any, Any], path: str
) -> Iterator[tuple[str, str, tuple[Any, ...]]]:
    """Each macro with where it is (the path is joined only for the answer: a hot path)."""
    for sub, text in api.macro_texts(message):
        for name in api.macros(text):
            yield name, path, sub


def _alert_macros(aps: object, path: str) -> Iterator[tuple[str, str, tuple[Any, ...]]]:
    alert = aps.get("alert") if isinstance(aps, dict) else None
    for sub, text in api.alert_texts(alert, ()):
        for name in api.macros(text):
            yield name, path, sub


def _device_rows(
    devices: Mapping[str, Mapping[str, str]],
) -> list[tuple[str, Mapping[str, str]]]:
    """Each device with its ``memberId`` among its fields, since criteria may name it."""
    return [(str(member), {**fields, "memberId": member}) for member, fields in devices.items()]


def _matching_devices(
    target: dict[Any, Any], rows: list[tuple[str, Mapping[str, str]]]
) -> list[tuple[str, Mapping[str, str]]]:
    """The devices a target selects. The table knows no segment nor static list: none match."""
    if any(key in target for key in api.SINGLE_APP_ONLY_TARGET_KEYS):
        return []
    criteria = [
        (field, "=", value)
        if isinstance(value, str)
        else (field, value["operator"], value["value"])
        for field, value in target.items()
        if field not in api.TARGET_KEYS
    ]
    return [
        (member, device)
        for member, device in rows
        if all(_holds(device.get(field), op, value) for field, op, value in criteria)
    ]


def _holds(actual: object, op: str, expected: str) -> bool:
    """Whether a device value satisfies a criterion: numbers compare as numbers, else as text."""
    if actual is None:
        return False
    text = str(actual)
    if op == "=":
        return text == expected
    if op == "!=":
        return text != expected
    try:
        return _ORDERED[op](float(text), float(expected))
    except ValueError:
        return _ORDERED[op](text, expected)
