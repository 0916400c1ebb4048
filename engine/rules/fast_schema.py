"""Cerberus's verdict on a document in one pass, without Cerberus: valid or not.

Most files a project holds are valid, and Cerberus is slow on them: it builds a child
validator (and re-checks its schema) for every nested mapping, list and unknown key, about 27
for a rule. This reads the same schema definitions (:mod:`engine.rules.schemas`) and walks the
document once. It only says whether Cerberus would find an error; a document it refuses is
handed to Cerberus, for its messages (:class:`engine.rules.schemas.SchemaChecker`).

It follows Cerberus 1.3's semantics for the rules the schemas use (``type``, ``nullable``,
``required``, ``empty``, ``allowed``, ``schema`` for mappings and lists, ``valuesrules``,
``allow_unknown`` as a flag or as the rules of unknown keys, handed down to nested schemas
that do not set it, and the custom ``bounds``). A rule or type it does not know makes it
answer "not valid", so Cerberus decides: a new rule in a schema can cost speed, never a
wrong verdict. tests/test_fast_schema.py compares both verdicts on generated documents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

#: Rules that only document, or that the parent reads (``required``, ``allow_unknown``).
_PASSIVE = frozenset({"meta", "required", "allow_unknown"})
_KNOWN = frozenset({"type", "nullable", "empty", "allowed", "schema", "valuesrules", "bounds"})
#: Cerberus's own types whose check a plain class answers for most values (a subclass of
#: these has the type; other values are asked the type's full check).
_SURE: dict[str, type] = {"string": str, "dict": dict, "list": list}
#: No ``allow_unknown`` in a rules set: the validator's own is handed down (Cerberus does).
_INHERIT: Any = object()

Check = Callable[[object], bool]
#: Whether a value is within the ``bounds`` rule's constraint (the custom rule's own check).
BoundsCheck = Callable[[object, Any], bool]


def is_mapping(value: object) -> bool:
    """Cerberus's ``dict`` type (a plain dict is tried first: the common case, and cheaper;
    then text, which no mapping is, before the slower abstract check)."""
    return isinstance(value, dict) or (not isinstance(value, str) and isinstance(value, Mapping))


def is_sequence(value: object) -> bool:
    """Cerberus's ``list`` type: a sequence that is not text (a list or a dict answered
    without the slower abstract check)."""
    if isinstance(value, list):
        return True
    return not isinstance(value, (str, dict)) and isinstance(value, Sequence)


class _Rules:
    """One field's rules set, read once."""

    __slots__ = (
        "_compiler",
        "allow_unknown",
        "allowed",
        "bounds",
        "empty",
        "items",
        "leaf",
        "mapping",
        "nullable",
        "opaque",
        "raw_schema",
        "sure",
        "types",
        "values",
    )

    def __init__(self, rules: Mapping[str, Any], compiler: _Compiler) -> None:
        self.opaque = any(k not in _KNOWN and k not in _PASSIVE for k in rules)
        self.nullable = bool(rules.get("nullable", False))
        self.types: tuple[Check, ...] | None = None
        #: Classes whose instances surely have one of the types (one C call for most values).
        self.sure: tuple[type, ...] = ()
        if rules.get("type"):
            names = rules["type"]
            names = (names,) if isinstance(names, str) else tuple(names)
            checks = [compiler.type_check(n) for n in names]
            if any(c is None for c in checks):
                self.opaque = True
            self.types = tuple(c for c in checks if c is not None)
            self.sure = tuple(_SURE[n] for n in names if n in _SURE)
        self.empty: bool | None = rules.get("empty")
        self.allowed: Sequence[Any] | None = rules.get("allowed")
        self.bounds = rules.get("bounds")
        self.raw_schema = rules.get("schema")
        self.mapping: _Schema | None = None  # the schema read as a mapping's, when needed
        self.items: _Rules | None = None  # read as the rules of a list's items, when needed
        valuesrules = rules.get("valuesrules")
        self.values = compiler.rules(valuesrules) if valuesrules is not None else None
        unknown = rules.get("allow_unknown", _INHERIT)
        self.allow_unknown = compiler.unknown(unknown)
        self._compiler = compiler
        #: Nothing to check beyond the type.
        self.leaf = all(
            getattr(self, name) is None
            for name in ("empty", "allowed", "bounds", "raw_schema", "values")
        )

    def valid(self, value: object, allow_unknown: Any) -> bool:
        """Whether Cerberus finds no error in ``value`` under these rules; ``allow_unknown``:
        the validator's own (a nested schema without one takes it)."""
        if value is None:  # 'nullable' drops every other rule the schemas use
            return self.nullable and not self.opaque
        if self.opaque:
            return False
        if self.types is not None and not isinstance(value, self.sure):
            for check in self.types:
                if check(value):
                    break
            else:
                return False
        if self.leaf:
            return True
        skip_allowed = False
        if self.empty is not None and isinstance(value, Sized) and len(value) == 0:
            if not self.empty:
                return False
            skip_allowed = True  # Cerberus drops 'allowed' for an empty value
        if self.allowed is not None and not skip_allowed:
            if isinstance(value, str) or not _iterable(value):
                if value not in self.allowed:
                    return False
            elif any(item not in self.allowed for item in value):  # type: ignore[attr-defined]
                return False
        if self.raw_schema is not None:
            if isinstance(value, list) or is_sequence(value):
                if self.items is None:
                    self.items = self._compiler.rules(self.raw_schema)
                items = self.items
                for item in value:  # type: ignore[attr-defined]
                    if not items.valid(item, allow_unknown):
                        return False
            elif isinstance(value, dict) or is_mapping(value):
                if self.mapping is None:
                    self.mapping = self._compiler.schema(self.raw_schema)
                inner = allow_unknown if self.allow_unknown is _INHERIT else self.allow_unknown
                if not self.mapping.valid(value, inner):  # type: ignore[arg-type]
                    return False
        if self.values is not None and is_mapping(value):
            values = self.values
            for item in value.values():  # type: ignore[attr-defined]
                if not values.valid(item, allow_unknown):
                    return False
        return self.bounds is None or self._compiler.bounds_ok(value, self.bounds)


def _iterable(value: object) -> bool:
    try:
        iter(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


class _Schema:
    """A mapping's schema: its fields' rules and the fields it requires."""

    __slots__ = ("fields", "opaque", "required")

    def __init__(self, schema: Mapping[str, Any], compiler: _Compiler) -> None:
        self.opaque = not all(isinstance(r, Mapping) for r in schema.values())
        self.fields: dict[Any, _Rules] = (
            {} if self.opaque else {k: compiler.rules(r) for k, r in schema.items()}
        )
        self.required = tuple(
            k for k, r in schema.items() if isinstance(r, Mapping) and r.get("required") is True
        )

    def valid(self, document: Mapping[Any, Any], allow_unknown: Any) -> bool:
        """``allow_unknown``: False, True, or the :class:`_Rules` of every unknown key."""
        if self.opaque:
            return False
        fields = self.fields
        for key, value in document.items():
            rules = fields.get(key)
            if rules is not None:
                if not rules.valid(value, allow_unknown):
                    return False
            elif isinstance(allow_unknown, _Rules):
                if not allow_unknown.valid(value, allow_unknown):
                    return False
            elif not allow_unknown:
                return False
        return all(key in document for key in self.required)


class _Compiler:
    """Reads schema definitions into :class:`_Rules` and :class:`_Schema`, once each."""

    def __init__(self, types: Mapping[str, Check], bounds_ok: BoundsCheck) -> None:
        self._types = types
        self.bounds_ok = bounds_ok
        self._rules: dict[int, tuple[Any, _Rules]] = {}
        self._schemas: dict[int, tuple[Any, _Schema]] = {}

    def type_check(self, name: object) -> Check | None:
        return self._types.get(name) if isinstance(name, str) else None

    def rules(self, rules: Any) -> _Rules:
        done = self._rules.get(id(rules))
        if done is not None:
            return done[1]
        compiled = _Rules(rules if isinstance(rules, Mapping) else {"\0opaque": True}, self)
        self._rules[id(rules)] = (rules, compiled)  # the definition is kept: ids stay unique
        return compiled

    def schema(self, schema: Any) -> _Schema:
        done = self._schemas.get(id(schema))
        if done is not None:
            return done[1]
        compiled = _Schema(schema if isinstance(schema, Mapping) else {"\0": None}, self)
        self._schemas[id(schema)] = (schema, compiled)
        return compiled

    def unknown(self, allow_unknown: Any) -> Any:
        """``allow_unknown`` as :meth:`_Schema.valid` takes it."""
        if allow_unknown is _INHERIT:
            return allow_unknown
        if not allow_unknown:  # Cerberus asks for truth first: {} allows nothing
            return False
        if isinstance(allow_unknown, bool):
            return True
        if isinstance(allow_unknown, Mapping):
            return self.rules(allow_unknown)
        return _OPAQUE  # a registry name: Cerberus decides


_OPAQUE = _Rules({"\0opaque": True}, _Compiler({}, lambda value, bounds: False))


class FastSchema:
    """One schema, as :class:`engine.rules.schemas.SchemaChecker` holds it."""

    def __init__(
        self,
        schema: Mapping[str, Any],
        allow_unknown: bool | Mapping[str, Any],
        types: Mapping[str, Check],
        bounds_ok: BoundsCheck,
    ) -> None:
        """``types``: each type name the schemas use and what it accepts, as Cerberus's
        ``types_mapping`` says; ``bounds_ok``: the custom ``bounds`` rule's check."""
        compiler = _Compiler(types, bounds_ok)
        self._schema = compiler.schema(schema)
        self._allow_unknown = compiler.unknown(allow_unknown)

    def valid(self, document: object) -> bool:
        """True when Cerberus would find no error in ``document``; False when it would, or
        when this cannot tell (then Cerberus decides)."""
        if not is_mapping(document):
            return False
        return self._schema.valid(document, self._allow_unknown)  # type: ignore[arg-type]


__all__ = ["BoundsCheck", "Check", "FastSchema", "is_mapping", "is_sequence"]
