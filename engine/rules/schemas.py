"""Cerberus schemas of the files a user writes, and the plain-language reading of their errors.

The shapes follow the Accengage API (ACCENGAGE_API.md) with the rule-level keys of DESIGN.md.
Scalars arrive as text (see :mod:`engine.rules.yaml_source`), so the two API types that are not
text, boolean and integer, are custom types that accept a plain YAML ``true`` or ``12``. What
Cerberus cannot say (cross-field and cross-file rules) is checked in :mod:`engine.rules.checks`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import cerberus
from cerberus import errors as cerr

from engine.accengage import api as accengage
from engine.rules.problems import did_you_mean
from engine.rules.yaml_source import Scalar

TEXT: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": "yamlbool"}
INT: dict[str, Any] = {"type": "yamlint"}

#: A mapping (the authors' short form) or the API's list; its items are checked in rules.py
#: with :func:`engine.accengage.api.custom_params_problems`.
CUSTOM_PARAMS: dict[str, Any] = {"type": ["dict", "list"]}

# Nested schemas say allow_unknown: False because Cerberus hands a parent's allow_unknown down
# to them, and a target allows unknown keys (its criteria).
CRITERION: dict[str, Any] = {
    "type": ["string", "dict"],
    "allow_unknown": False,
    "schema": {
        "operator": {"type": "string", "required": True, "allowed": list(accengage.OPERATORS)},
        "value": {"type": "string", "required": True},
    },
}

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
    "id": {"type": "string", "required": True},
}


def _fields(table: Mapping[str, str]) -> dict[str, Any]:
    return {name: _KINDS[kind] for name, kind in table.items()}


APS: dict[str, Any] = {
    "type": "dict",
    "allow_unknown": False,
    "schema": _fields(accengage.APS_FIELD_TYPES),
}

BUTTON: dict[str, Any] = {"type": "dict", "schema": _fields(accengage.BUTTON_FIELD_TYPES)}

BUTTONS: dict[str, Any] = {
    "type": "dict",
    "schema": {
        "use": TEXT,
        "template": TEXT,
        "buttons": {"type": "list", "schema": BUTTON},
    },
}


def _message_schema() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, kind in accengage.MESSAGE_FIELDS.items():
        fields[name] = {
            **_KINDS,
            "popup": {
                "type": ["yamlbool", "dict"],
                "schema": {name: TEXT for name in accengage.POPUP_FIELDS},
            },
            "buttons": BUTTONS,
            "aps": APS,
        }[kind]
    fields["sound"] = {"type": "string", "allowed": list(accengage.SOUNDS)}
    fields["use"] = TEXT
    return fields


MESSAGE: dict[str, Any] = _message_schema()

TARGET: dict[str, Any] = {
    "type": "dict",
    "allow_unknown": CRITERION,  # every other key is a device field criterion
    "schema": {
        **_fields({k: v for k, v in accengage.TARGET_FIELDS.items() if v != "aps"}),
        "aps": APS,
        "for_each": TEXT,
        "as": TEXT,
        "target": {"type": "dict"},  # checked as a target of its own in validate.py
    },
}

TRIGGER: dict[str, Any] = {
    "cron": TEXT,
    "every": TEXT,
    "at": TEXT,
    "event": TEXT,
    "timezone": TEXT,
    "poll": {
        "type": "dict",
        "schema": {
            "url": {"type": "string", "required": True},
            "every": {"type": "string", "required": True},
            "items": TEXT,
            "key": {"type": "string", "required": True},
            "timeout": TEXT,
            "on_first_poll": {"type": "string", "allowed": ["record", "send"]},
        },
    },
}

RULE: dict[str, Any] = {
    "description": TEXT,
    "enabled": BOOL,
    "trigger": {"type": "dict", "required": True, "schema": TRIGGER},
    "when": TEXT,
    "apps": {
        "type": "dict",
        "required": True,
        "empty": False,
        "valuesrules": {
            "type": "dict",
            "nullable": True,
            "schema": {
                **{name: TEXT for name in accengage.PARENT_ID_FIELDS},
                "message": {"type": "dict", "schema": MESSAGE},
            },
        },
    },
    "message": {"type": "dict", "required": True, "schema": MESSAGE},
    "targets": {"type": "list", "required": True, "empty": False, "schema": TARGET},
    "vars": {"type": "dict"},
    "catch_up": TEXT,
    "quiet_hours": {
        "type": "dict",
        "schema": {
            "from": {"type": "string", "required": True},
            "to": {"type": "string", "required": True},
            "then": {"type": "string", "allowed": ["defer", "skip"]},
        },
    },
    "limit": {
        "type": "dict",
        "schema": {"count": {**INT, "required": True}, "per": {"type": "string", "required": True}},
    },
}

SECRET: dict[str, Any] = {"type": ["dict", "string"]}  # shape checked in project.py


@dataclass(frozen=True, slots=True)
class Bounds:
    """The values a number of ``pushrules.yaml`` may take: the one definition of its limits.

    The schema carries it (``"bounds": Bounds(...)``), so ``validate`` reports a value outside
    it with its line, and the settings built from the file never hold one the daemon refuses.
    ``unit="s"`` bounds a duration (``30s``, ``2m``) in seconds.
    """

    low: int
    high: int
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
            return f"{value:g}"
        for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
            if value >= size and value % size == 0:
                return f"{value // size:g}{unit}"
        return f"{value:g}s"


#: ``dispatch:`` of pushrules.yaml. The bounds keep what the dispatcher accepts: at least one
#: request in flight and one attempt; a timeout the claim lease (10 minutes) can cover twice.
DISPATCH: dict[str, Any] = {
    "concurrency": {**INT, "bounds": Bounds(1, 256)},
    "rate_per_second": {**INT, "bounds": Bounds(1, 10_000)},
    "max_attempts": {**INT, "bounds": Bounds(1, 100)},
    "timeout": {**TEXT, "bounds": Bounds(1, 300, "s")},
    "on_unknown_outcome": {"type": "string", "allowed": ["park", "retry"]},
}

#: ``retention:`` of pushrules.yaml: how long what is finished is kept before the daemon prunes
#: it, or ``forever``. Feed keys at least 7 days: polls refresh a key about daily, and a key is
#: only forgotten once polls stopped finding it for this long (engine/outbox/retention.py).
_DAYS = 86400
RETENTION: dict[str, Any] = {
    "sent": {**TEXT, "bounds": Bounds(_DAYS, 36500 * _DAYS, "s", "forever")},
    "dropped": {**TEXT, "bounds": Bounds(_DAYS, 36500 * _DAYS, "s", "forever")},
    "unmatched_events": {**TEXT, "bounds": Bounds(_DAYS, 36500 * _DAYS, "s", "forever")},
    "feed_keys": {**TEXT, "bounds": Bounds(7 * _DAYS, 36500 * _DAYS, "s", "forever")},
    "marks": {**TEXT, "bounds": Bounds(_DAYS, 36500 * _DAYS, "s", "forever")},
}

PROJECT: dict[str, Any] = {
    "accengage": {
        "type": "dict",
        "required": True,
        "schema": {
            "url": {"type": "string", "required": True},
            "login": {**SECRET, "required": True},
            "password": {**SECRET, "required": True},
        },
    },
    "apps": {
        "type": "dict",
        "required": True,
        "empty": False,
        "valuesrules": {
            "type": "dict",
            "schema": {
                "partner": {"type": "string", "required": True},
                "platform": {
                    "type": "string",
                    "required": True,
                    "allowed": list(accengage.PLATFORMS),
                },
            },
        },
    },
    "timezone": TEXT,
    "device_fields": {"type": "list", "schema": TEXT},
    "languages": {"type": "list", "schema": TEXT},
    # Up to 4 buttons in an app's own iOS category (ACCENGAGE_API.md); 0 for one without.
    "button_templates": {"type": "dict", "valuesrules": {**INT, "bounds": Bounds(0, 4)}},
    "store": TEXT,
    "listen": TEXT,
    "intake_token": SECRET,
    "dispatch": {"type": "dict", "schema": DISPATCH},
    "retention": {"type": "dict", "schema": RETENTION},
}


def is_yaml_bool(value: object) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, Scalar) and isinstance(value.typed, bool)


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


class _Validator(cerberus.Validator):  # type: ignore[misc]  # Cerberus has no types
    """Cerberus with the two YAML-aware types."""

    types_mapping: ClassVar[dict[str, Any]] = {
        **cerberus.Validator.types_mapping,
        "yamlbool": cerberus.TypeDefinition("yamlbool", (YamlBool,), ()),
        "yamlint": cerberus.TypeDefinition("yamlint", (YamlInt,), ()),
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


def bounded_value(value: object, bounds: Bounds) -> float | str | None:
    """The number a bounded setting holds (seconds for a duration), a message when a duration
    cannot be read, or None when the type is wrong (the type rule says so)."""
    if bounds.unit == "s":
        if not isinstance(value, str) or (bounds.word and str(value) == bounds.word):
            return None
        from engine.rules.schedule import TriggerError, parse_duration

        try:
            return parse_duration(str(value)).total_seconds()
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
}


def _type_words(constraint: object) -> str:
    names = constraint if isinstance(constraint, list | tuple) else [constraint]
    return " or ".join(_TYPE_WORDS.get(str(n), str(n)) for n in names)


class SchemaChecker:
    """A reusable validator for one schema: Cerberus compiles a schema once, then checks fast."""

    def __init__(
        self, schema: Mapping[str, Any], *, allow_unknown: bool | Mapping[str, Any] = False
    ) -> None:
        """``allow_unknown``: True, False, or the rules every unknown key must follow."""
        self._validator = _Validator(dict(schema), allow_unknown=allow_unknown)

    def check(self, document: Mapping[str, Any]) -> list[SchemaError]:
        self._validator.validate(document, normalize=False)
        return list(self._read(self._validator._errors))

    def _read(self, errors: Any) -> Iterator[SchemaError]:
        for error in errors:
            if error.child_errors:
                yield from self._read(error.child_errors)
                continue
            yield self._explain(error)

    def _explain(self, error: cerr.ValidationError) -> SchemaError:
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
PROJECT_CHECKER = SchemaChecker(PROJECT)
MESSAGE_TEMPLATE_CHECKER = SchemaChecker(MESSAGE)
BUTTON_TEMPLATE_CHECKER = SchemaChecker(BUTTONS["schema"])
#: One target alone (a for_each target's inner ``target``).
TARGET_CHECKER = SchemaChecker(TARGET["schema"], allow_unknown=TARGET["allow_unknown"])
