"""``pushrules.yaml``: where to send, with which credentials, for which apps, with what defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.accengage import api as accengage
from engine.rules.problems import Problem, Severity, field_path
from engine.rules.schemas import (
    DAEMON,
    DISPATCH,
    MAX_BODY_DEFAULT,
    PROJECT_CHECKER,
    RETENTION,
    Bounds,
    is_yaml_int,
)
from engine.rules.secrets import SecretRef, hide_url_password
from engine.rules.yaml_source import MarkedMap, load, native, position

CONFIG_NAME = "pushrules.yaml"
DEFAULT_STORE = "sqlite:///pushrules.db"
DEFAULT_LISTEN = "127.0.0.1:8750"
STORE_PREFIXES = ("sqlite://", "postgresql://", "postgresql+psycopg://")


@dataclass(frozen=True, slots=True)
class App:
    alias: str
    partner: str
    platform: str  # "ios" or "android"


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """``dispatch:`` of pushrules.yaml, typed and within the schema's bounds (None: the
    dispatcher's default). Built only from a file that validated, so the daemon never meets a
    value it refuses. Its fields are the keys of :data:`~engine.rules.schemas.DISPATCH`."""

    concurrency: int | None = None
    rate_per_second: int | None = None
    max_attempts: int | None = None
    timeout: timedelta | None = None
    on_unknown_outcome: str | None = None
    transport: str | None = None
    poll_every: timedelta | None = None


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """``daemon:`` of pushrules.yaml: the timing of ``pushrules run``, read at its start. Its
    fields are the keys of :data:`~engine.rules.schemas.DAEMON`; the defaults are the ones
    the daemon had before they could be set."""

    watch_every: timedelta = timedelta(milliseconds=500)
    watch_quiet: timedelta = timedelta(milliseconds=300)
    watch_max_delay: timedelta = timedelta(seconds=5)
    leadership_every: timedelta = timedelta(seconds=10)
    lock_wait: timedelta = timedelta(seconds=2)
    fire_retry: timedelta = timedelta(seconds=1)
    fire_ahead: timedelta = timedelta(seconds=5)
    fold_every: timedelta = timedelta(seconds=5)


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    """``intake:`` of pushrules.yaml, within the schema's bounds (:data:`~engine.rules.schemas.
    INTAKE`)."""

    max_body: int = MAX_BODY_DEFAULT  # bytes


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """``retention:`` of pushrules.yaml: how long finished things are kept before the daemon
    prunes them (None: forever). Its fields are the keys of :data:`~engine.rules.schemas.RETENTION`.
    Rows that are not finished (in flight, or waiting for a person) are never pruned."""

    sent: timedelta | None = timedelta(days=90)
    dropped: timedelta | None = timedelta(days=90)
    unmatched_events: timedelta | None = timedelta(days=90)
    feed_keys: timedelta | None = timedelta(days=90)
    marks: timedelta | None = timedelta(days=90)


@dataclass(frozen=True)
class Project:
    """The validated configuration; immutable, so a reload swaps it whole."""

    root: Path
    url: str
    login: SecretRef | None
    password: SecretRef | None
    apps: Mapping[str, App]
    timezone: str = "UTC"
    device_fields: frozenset[str] | None = None
    languages: frozenset[str] | None = None
    button_templates: Mapping[str, int] = field(default_factory=dict)
    store: str = DEFAULT_STORE
    listen: str = DEFAULT_LISTEN
    intake_token: SecretRef | None = None
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    #: The line of each setting in the file (``accengage.password``: 7), so a problem met at
    #: run time points where the operator fixes it. Not part of what the settings mean.
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def where(self, setting: str) -> str:
        """Where ``setting`` (dotted, like ``accengage.password``) is written:
        ``pushrules.yaml:7``, or the file alone when it is not written there."""
        line = self.lines.get(setting)
        return f"{CONFIG_NAME}:{line}" if line is not None else CONFIG_NAME

    def button_count(self, template: str) -> int | None:
        """Buttons of a category: the app's declared ones first, then Accengage's predefined."""
        if template in self.button_templates:
            return self.button_templates[template]
        return accengage.PREDEFINED_BUTTON_TEMPLATES.get(template)

    def store_url(self) -> str:
        """The store URL, a relative SQLite path taken from the project folder."""
        prefix = "sqlite:///"
        if self.store.startswith(prefix) and not self.store.startswith(prefix + "/"):
            rest = self.store[len(prefix) :]
            if rest and rest != ":memory:":
                return prefix + str((self.root / rest).resolve())
        return self.store


def find_root(start: Path) -> Path | None:
    """The project a file or folder belongs to: the nearest folder from ``start`` up that
    holds pushrules.yaml (what pre-commit hands over are file paths)."""
    here = start.absolute()
    if not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        if (folder / CONFIG_NAME).is_file():
            return folder
    return None


def load_project(root: Path) -> tuple[Project | None, list[Problem]]:
    """Read and check ``pushrules.yaml``; the project is None when it has errors."""
    path = root / CONFIG_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [
            Problem(
                CONFIG_NAME,
                None,
                None,
                "",
                None,
                "error",
                f"no {CONFIG_NAME} in {root}; create one (see docs/rules.md) or "
                "point to the project folder",
            )
        ]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(CONFIG_NAME, None, None, "", None, "error", f"cannot read: {exc}")]
    return parse_project(root, text)


def parse_project(root: Path, text: str) -> tuple[Project | None, list[Problem]]:
    loaded = load(text)
    problems = [
        Problem(CONFIG_NAME, i.line, i.column, "", None, "error", i.message) for i in loaded.issues
    ]
    doc = loaded.data
    if doc is None and not problems:
        problems.append(Problem(CONFIG_NAME, 1, 1, "", None, "error", "the file is empty"))
    if doc is None or problems:
        return None, problems
    if not isinstance(doc, dict):
        problems.append(
            Problem(
                CONFIG_NAME,
                1,
                1,
                "",
                None,
                "error",
                "must be a mapping of settings (name: value lines)",
            )
        )
        return None, problems

    def report(
        path: tuple[Any, ...], code: int | None, message: str, severity: Severity = "error"
    ) -> None:
        line, column = position(doc, path)
        problems.append(
            Problem(CONFIG_NAME, line, column, field_path(path), code, severity, message)
        )

    for err in PROJECT_CHECKER.check(doc):
        head = err.path[:1]
        code = {("accengage",): 3, ("apps",): 4}.get(head)
        if head == ("accengage",) and err.path[1:2] == ("url",):
            code = None
        report(err.path, code, err.message)

    given = doc.get("accengage")
    accengage_section: Mapping[str, Any] = given if isinstance(given, dict) else {}
    login = _secret(accengage_section, "login", root, report, ("accengage",))
    password = _secret(accengage_section, "password", root, report, ("accengage",))
    token = _secret(doc, "intake_token", root, report, ())

    timezone = str(doc.get("timezone") or "UTC")
    _check_settings(doc, report)

    if any(p.is_error for p in problems):
        return None, problems
    apps = {
        str(alias): App(str(alias), str(spec["partner"]), str(spec["platform"]))
        for alias, spec in doc["apps"].items()
    }
    project = Project(
        root=root,
        url=str(accengage_section["url"]),
        login=login,
        password=password,
        apps=apps,
        timezone=timezone,
        device_fields=_names(doc.get("device_fields")),
        languages=_names(doc.get("languages")),
        button_templates={
            str(k): int(native(v))
            for k, v in (doc.get("button_templates") or {}).items()
            if is_yaml_int(v)
        },
        store=str(doc.get("store") or DEFAULT_STORE),
        listen=str(doc.get("listen") or DEFAULT_LISTEN),
        intake_token=token,
        dispatch=DispatchConfig(**_settings(DISPATCH, doc.get("dispatch") or {})),
        intake=_intake(doc.get("intake") or {}),
        daemon=DaemonConfig(**_settings(DAEMON, doc.get("daemon") or {})),
        retention=_retention(doc.get("retention") or {}),
        lines=_lines(doc),
    )
    return project, problems


def _lines(doc: Mapping[str, Any]) -> dict[str, int]:
    """The line of each setting and of each setting in a section, by dotted name."""
    found: dict[str, int] = {}
    for prefix, section in (("", doc), *((f"{k}.", v) for k, v in doc.items())):
        if isinstance(section, MarkedMap):
            for key in section:
                found[f"{prefix}{key}"] = section.key_marks.get(key, (section.line, 0))[0]
    return found


def _check_settings(doc: Mapping[str, Any], report: Any) -> None:
    """Settings whose text has a shape: a timezone, a store URL, an address, a duration."""
    from engine.rules.schedule import TriggerError, parse_timezone

    if isinstance(doc.get("timezone"), str):
        try:
            parse_timezone(str(doc["timezone"]))
        except TriggerError as exc:
            report(("timezone",), None, str(exc))
    store = doc.get("store")
    if isinstance(store, str) and not store.startswith(STORE_PREFIXES):
        report(
            ("store",),
            None,
            f"'{hide_url_password(store)}' is not a store URL; write sqlite:///pushrules.db "
            "or postgresql+psycopg://user@host/database",
        )
    elif isinstance(store, str) and hide_url_password(store) != store:
        # A literal secret in a file kept in git; a warning, as a daemon may run on it today.
        report(
            ("store",),
            None,
            f"'{hide_url_password(store)}' holds the database password: anyone who reads the "
            "repository reads it; remove it from the URL and set PGPASSWORD (or a ~/.pgpass "
            "file) where the daemon runs",
            "warning",
        )
    listen = doc.get("listen")
    if isinstance(listen, str):
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            report(
                ("listen",),
                None,
                f"'{listen}' is not an address; write HOST:PORT, like {DEFAULT_LISTEN}",
            )
    url = (
        (doc.get("accengage") or {}).get("url") if isinstance(doc.get("accengage"), dict) else None
    )
    if isinstance(url, str) and not url.startswith(("http://", "https://")):
        report(
            ("accengage", "url"),
            None,
            "the Accengage URL must start with https:// (or http:// for a local test endpoint)",
        )
    elif isinstance(url, str) and "@" in urlsplit(url).netloc:
        # A literal secret in this file, printed by compile and kept in every outbox row.
        report(
            ("accengage", "url"),
            None,
            f"'{hide_url_password(url)}' holds a user (and maybe a password) before its host: "
            "remove it; Accengage takes the login and password in the request, from "
            "accengage.login and accengage.password ({env: NAME} or {file: PATH})",
        )


def _settings(table: Mapping[str, Any], section: Mapping[str, Any]) -> dict[str, Any]:
    """The typed values of a section the schema passed (bounds included), each read as the
    schema's ``table`` (:data:`DISPATCH`, :data:`DAEMON`) types it: a duration, a number or a
    word. Keys not written are left out, so the config's defaults apply."""
    from engine.rules.schedule import parse_duration

    values: dict[str, Any] = {}
    for key, spec in table.items():
        if key not in section:
            continue
        bounds: Bounds | None = spec.get("bounds")
        if bounds is not None and bounds.word and str(section[key]) == bounds.word:
            values[key] = timedelta(0)  # a timing setting's word (fire_ahead: none): none of it
        elif bounds is not None and bounds.unit:
            values[key] = parse_duration(str(section[key]), milliseconds=bounds.unit == "ms")
        elif bounds is not None:
            values[key] = int(native(section[key]))
        else:
            values[key] = str(section[key])
    return values


def _intake(section: Mapping[str, Any]) -> IntakeConfig:
    """The typed ``intake:`` of a section the schema passed (bounds included)."""
    if "max_body" in section:
        return IntakeConfig(max_body=int(native(section["max_body"])))
    return IntakeConfig()


def _retention(section: Mapping[str, Any]) -> RetentionConfig:
    """The typed ``retention:`` of a section the schema passed: a duration each, or None for
    ``forever``; keys not written keep their default."""
    from engine.rules.schedule import parse_duration

    values: dict[str, timedelta | None] = {}
    for key, spec in RETENTION.items():
        if key in section:
            text = str(section[key])
            values[key] = None if text == spec["bounds"].word else parse_duration(text)
    return RetentionConfig(**values)


def _names(value: Any) -> frozenset[str] | None:
    return None if value is None else frozenset(str(v) for v in value)


def _secret(
    container: Mapping[str, Any], key: str, root: Path, report: Any, prefix: tuple[str, ...]
) -> SecretRef | None:
    """A credential reference; a literal value is refused so it never sits in git."""
    value = container.get(key)
    path = (*prefix, key)
    if value is None:
        return None
    if isinstance(value, str):
        report(
            path,
            3,
            f"{key} is written in clear; a secret must never be in the repository. "
            f"Write {key}: {{env: VARIABLE_NAME}} or {key}: {{file: /path/to/file}}",
        )
        return None
    if not isinstance(value, dict):
        return None
    kinds = [k for k in ("env", "file") if k in value]
    extra = [k for k in value if k not in ("env", "file")]
    if len(kinds) != 1 or extra or not isinstance(value.get(kinds[0] if kinds else ""), str):
        report(path, 3, f"{key} must be {{env: VARIABLE_NAME}} or {{file: PATH}}")
        return None
    return SecretRef(kinds[0], str(value[kinds[0]]), root)
