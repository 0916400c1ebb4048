"""Secrets by reference: ``{env: NAME}`` or ``{file: PATH}``, read when needed, never printed."""

from __future__ import annotations

import base64
import functools
import html
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

from engine.errors import PushrulesError

MASK = "********"


class MissingSecret(PushrulesError):
    """A referenced secret cannot be read; the message names the reference, never a value."""


@dataclass(frozen=True)
class SecretRef:
    """Where a secret lives. ``repr`` and ``str`` show the reference only."""

    kind: str  # "env" or "file"
    name: str
    base: Path | None = None  # folder a relative ``file`` path is taken from

    def resolve(self) -> str:
        if self.kind == "env":
            value = os.environ.get(self.name)
            if value is None:
                raise MissingSecret(f"environment variable {self.name} is not set")
            return value
        path = Path(self.name)
        if self.base is not None and not path.is_absolute():
            path = self.base / path
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MissingSecret(f"secret file {self.name} cannot be read: {exc.strerror}") from None

    def describe(self) -> str:
        return f"{{{self.kind}: {self.name}}}"

    def __str__(self) -> str:
        return self.describe()


#: A prefix of a secret this long is masked too: an answer that echoes the request cut short
#: (``"password":"P@ss-SECR``) still gives most of it away.
MASK_PREFIX = 6


@functools.lru_cache(maxsize=16)
def encodings(secret: str, login: str = "") -> tuple[str, ...]:
    """Every form in which an answer may echo ``secret``, longest first.

    Raw; JSON-escaped with non-ASCII kept or escaped (``\\u00e4``, either hex case) and with
    ``/`` escaped as PHP does; URL-encoded (path and form style, either hex case); HTML-escaped;
    base64 (standard and URL-safe, padding left out) of the secret and of ``login:secret``, as
    HTTP Basic authentication carries it.
    """
    if not secret:
        return ()
    forms = {secret, html.escape(secret)}
    for ascii_only in (False, True):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        upper = _UNICODE_ESCAPE.sub(lambda m: "\\u" + m.group(0)[2:].upper(), escaped)
        for form in (escaped, upper):
            forms |= {form, form.replace("/", "\\/")}
    for quoted in (quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret)):
        forms |= {quoted, _PERCENT.sub(lambda m: m.group(0).lower(), quoted)}
    for raw in {secret, f"{login}:{secret}"} if login else {secret}:
        data = raw.encode()
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            forms.add(encode(data).decode().rstrip("="))
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")
_PERCENT = re.compile(r"%[0-9A-F]{2}")


class Masker:
    """:func:`mask` for given secrets, their encodings worked out once: the dispatcher masks
    each text of an answer (four an attempt), and working them out took most of that time."""

    __slots__ = ("_forms",)

    def __init__(self, secrets: Iterable[str], login: str = "") -> None:
        forms = {form for secret in secrets for form in encodings(secret, login)}
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        forms = self._forms
        for form in forms:
            if form in text:
                text = text.replace(form, MASK)
        spans = sorted(span for form in forms for span in _prefix_spans(text, form))
        out: list[str] = []
        done = 0
        for start, end in spans:
            if end <= done:
                continue
            if start < done:  # overlaps the previous span: extend it
                out[-1] = MASK
            else:
                out.append(text[done:start])
                out.append(MASK)
            done = end
        out.append(text[done:])
        return "".join(out)


def mask(text: str, secrets: Iterable[str], login: str = "") -> str:
    """``text`` with each secret masked in every encoding (see :func:`encodings`).

    Mask before cutting a text short: cut first, and the part of a secret before the cut is no
    longer the secret, so it survives. A run of :data:`MASK_PREFIX` or more leading characters
    of an encoding is masked as well, for answers that cut the echoed request themselves.
    """
    return Masker(secrets, login)(text)


def _prefix_spans(text: str, form: str) -> Iterable[tuple[int, int]]:
    """Where ``text`` holds at least the first MASK_PREFIX characters of ``form``."""
    if len(form) <= MASK_PREFIX:
        return
    head = form[:MASK_PREFIX]
    start = text.find(head)
    while start != -1:
        end = start + MASK_PREFIX
        while end < len(text) and end - start < len(form) and text[end] == form[end - start]:
            end += 1
        yield start, end
        start = text.find(head, start + 1)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
#: libpq also takes the password as a query parameter: ``...?password=pw``.
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&\s'\"]*", re.IGNORECASE)


def hide_url_password(text: str) -> str:
    """``postgres://user:pw@host/db`` -> ``postgres://user:********@host/db`` (and
    ``?password=pw`` -> ``?password=********``), wherever a URL stands in ``text``: a store URL
    is quoted in messages (a typo in its scheme, a refused connection) that reach logs,
    ``validate`` and the unauthenticated /healthz."""
    return _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text))
