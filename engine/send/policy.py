"""The dispatcher's pure policy: how hard to push, what an answer or an error means, when to try
again, and the text a row is left with. No I/O here: every function is a function of its
arguments (randomness comes in as a ``random.Random``), so each rule is unit-tested alone."""

from __future__ import annotations

import email.utils
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import httpx

from engine.accengage import api as accengage
from engine.accengage.api import RETRYABLE_CODES, describe
from engine.outbox.states import DEAD, FAILED, IN_DOUBT, RETRYING, SENT
from engine.rules.schemas import DISPATCH

OutcomeKind = Literal["sent", "retry", "failed", "unknown"]
UnknownPolicy = Literal["park", "retry"]
Transport = Literal["httpcore", "aiohttp"]

#: The request provably never reached Accengage: safe to send again. A write error or timeout
#: belongs here because the body was not fully handed to the network, and Accengage cannot act
#: on a JSON body it has not fully received (the request is framed by Content-Length).
NOT_SENT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.ProxyError,
    httpx.InvalidURL,
)
#: Statuses that ask for another try (the request was not acted on, or may pass later).
RETRY_STATUSES = frozenset({408, 425, 429}) | frozenset(range(500, 600))
SNIPPET = 200


# --- settings and credentials ----------------------------------------------------------------


@dataclass(frozen=True)
class DispatchSettings:
    """How hard to push. The defaults suit one Accengage account from one host."""

    #: Requests in flight at once (on httpcore, over httpx clients of POOL_SIZE connections
    #: each: one client loses throughput past a few concurrent requests, encode/httpx#3215).
    #: 32 gains little over 16 at 50 ms answers, and 16 keeps a crash's in_doubt batch small.
    concurrency: int = 16
    #: Rows claimed at a time, in flight or queued (0: eight times ``concurrency``, from twice
    #: it to 128, or to 32 under ``rate_per_second``). A claim costs a millisecond or two on
    #: SQLite, on the event loop, hence batches: at 32, a burst of 1,000 due rows took 60
    #: claims. A crash parks in_doubt only the rows whose requests had left; the others are
    #: sent again, so a larger claim risks nothing but holding rows other instances could send.
    claim_batch: int = 0
    #: Requests started per second at most (None: no limit but ``concurrency``).
    rate_per_second: float | None = None
    timeout: httpx.Timeout = field(
        default_factory=lambda: httpx.Timeout(connect=5.0, read=30.0, write=10.0, pool=10.0)
    )
    #: Whole-request limit: a server trickling its answer cannot hold a slot forever.
    deadline: float = 60.0
    max_attempts: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    #: A Retry-After longer than this is cut to it.
    retry_after_max: float = 3600.0
    #: When a credential cannot be read, try again after this long (the attempt is not counted).
    missing_secret_retry: float = 60.0
    #: How long a claimed row may stay ``sending`` before ``recover`` deems its process dead.
    lease: timedelta = timedelta(minutes=10)
    on_unknown_outcome: UnknownPolicy = "park"
    #: Sleep when nothing is due: how often an idle dispatcher looks for rows it was not told
    #: about (queued by another process, freed by a resume). ``dispatch.poll_every``.
    poll_every: float = 0.5
    #: How often ``run`` renews this instance's sign of life and takes back the rows of dead
    #: ones (sent again if they never left, else parked in_doubt): the take-over bound.
    recover_every: float = 2.0
    #: On SQLite, an instance on another host (or in another pid namespace) whose sign of life
    #: is older than this is deemed dead. On one host a dead pid tells at once.
    liveness_ttl: timedelta = timedelta(seconds=15)
    #: Results wait up to this long, or until ``results_batch`` of them are ready, to be written
    #: together: a transaction costs about a millisecond on SQLite whatever its size. Safety is
    #: the same; a crash in that window parks those rows in_doubt instead of marking them sent.
    flush_interval: float = 0.05
    keepalive_expiry: float = 4.0
    #: Where store calls run. "inline" on the event loop suits SQLite (a local file, a
    #: millisecond a call): in a thread, each of sqlite3's GIL releases costs a wait of up to
    #: the 5 ms switch interval while the loop is busy sending, which cut throughput by a third
    #: in benchmarks/dispatch.py. "thread" suits PostgreSQL, whose round trips would otherwise
    #: stall the loop. "auto" picks by the store's dialect.
    store_calls: Literal["auto", "inline", "thread"] = "auto"
    #: What carries httpx's requests: aiohttp's pool (engine/send/transport.py), or httpcore's
    #: (split in clients of POOL_SIZE connections). aiohttp costs about half the CPU a request
    #: (benchmarks/dispatch.py); both tell alike whether a failed request may have arrived.
    transport: Transport = "aiohttp"

    def __post_init__(self) -> None:
        problems = []
        for name in ("concurrency", "max_attempts", "rate_per_second"):  # pushrules.yaml's bounds
            value = getattr(self, name)
            if value is not None and (problem := DISPATCH[name]["bounds"].problem(value, value)):
                problems.append(f"{name}: {problem}")
        if self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            problems.append("backoff_base must be positive and backoff_max at least backoff_base")
        if self.store_calls not in ("auto", "inline", "thread"):
            problems.append('store_calls must be "auto", "inline" or "thread"')
        if self.transport not in ("httpcore", "aiohttp"):
            problems.append('transport must be "httpcore" or "aiohttp"')
        if self.on_unknown_outcome not in DISPATCH["on_unknown_outcome"]["allowed"]:
            problems.append('on_unknown_outcome must be "park" or "retry"')
        if self.lease.total_seconds() < 2 * self.deadline:
            problems.append(
                f"lease ({self.lease.total_seconds():g} s) must be at least twice the request "
                f"deadline ({self.deadline:g} s), or requests still in flight would be parked"
            )
        if problems:
            raise ValueError("dispatch settings: " + "; ".join(problems))

    @property
    def batch(self) -> int:
        """Rows claimed at a time (see ``claim_batch``)."""
        most = 32 if self.rate_per_second else 128  # a slow rate would outlast the lease
        return self.claim_batch or max(2 * self.concurrency, min(most, 8 * self.concurrency))

    @property
    def results_batch(self) -> int:
        """Results written together at most (see ``flush_interval``): a crash before they are
        written parks them in_doubt, so this stays small whatever the claims."""
        return max(2 * self.concurrency, min(32, 8 * self.concurrency))


# --- the pure core ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt tells about a request."""

    kind: OutcomeKind
    http_status: int | None = None
    return_code: int | None = None
    return_label: str | None = None
    message_id: str | None = None
    error: str | None = None
    retry_after: float | None = None
    #: What happened, without what comes next ("will try again"): the text a final state
    #: (dead after the last attempt) is written with.
    cause: str | None = None


def with_user(body: str, login: str, password: str) -> bytes:
    """The stored body's bytes as sent, with the credentials of this attempt."""
    doc = accengage.with_user(json.loads(body), login, password)
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def snippet(
    content: bytes | str, limit: int = SNIPPET, scrub: Callable[[str], str] | None = None
) -> str:
    """The start of an answer for a message; ``scrub`` masks secrets before the cut, since a
    secret cut in two is no longer found whole."""
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    if scrub is not None:
        text = scrub(text)
    return text[:limit]


#: A stored return code is a 32-bit integer column; Accengage's codes are small.
_CODE_LIMIT = 2**31
#: The ``message_id`` column's width: a longer id is cut, not a failed write of its batch.
MESSAGE_ID_MAX = 255


def parse_return_code(value: Any) -> int | None:
    """``"0"``, ``0`` and ``" 5 "`` are codes; booleans, floats, words and numbers no 32-bit
    column holds are not (one odd answer must not fail the batch of results it is written in)."""
    if isinstance(value, bool):
        return None
    code: int | None = None
    if isinstance(value, int):
        code = value
    elif isinstance(value, str):
        stripped = value.strip()
        if stripped.isascii() and stripped.lstrip("-").isdigit() and len(stripped) < 12:
            code = int(stripped)
    return code if code is not None and -_CODE_LIMIT <= code < _CODE_LIMIT else None


def parse_answer(content: bytes) -> tuple[int, str | None, str | None] | None:
    """``(returnCode, returnLabel, messageId)`` from a documented answer, else None.

    The documentation names no field for the message id ("you will only get the messageid");
    ``messageId`` is read, in any letter case.
    """
    try:
        doc = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    code = parse_return_code(doc.get("returnCode"))
    if code is None:
        return None
    label = doc.get("returnLabel")
    message_id = next((v for k, v in doc.items() if k.lower() in ("messageid", "message_id")), None)
    return (
        code,
        None if label is None else str(label),
        None if message_id is None else str(message_id)[:MESSAGE_ID_MAX],
    )


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP-date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())


def classify_response(
    status: int,
    headers: Mapping[str, str],
    content: bytes,
    now: datetime,
    scrub: Callable[[str], str] | None = None,
) -> Outcome:
    """An HTTP answer -> what happened to the request. ``scrub`` masks the credentials in what
    is quoted of the answer (an upstream may echo the request)."""
    if status in RETRY_STATUSES:
        cause = f"HTTP {status} from Accengage: {snippet(content, 120, scrub)!r}"
        return Outcome(
            "retry",
            http_status=status,
            error=f"{cause}; will try again",
            retry_after=parse_retry_after(headers.get("retry-after"), now),
            cause=cause,
        )
    if not 200 <= status < 300:
        return Outcome(
            "failed",
            http_status=status,
            error=(
                f"HTTP {status} from Accengage: {snippet(content, 120, scrub)!r}; not retried: "
                "check accengage.url in pushrules.yaml, then resend the row"
            ),
        )
    parsed = parse_answer(content)
    if parsed is None:
        quoted = f"answer is not the documented JSON: {snippet(content, SNIPPET, scrub)}"
        return Outcome(
            "unknown",
            http_status=status,
            return_label=quoted,
            error=(
                f"HTTP {status} with an answer that is not the documented JSON: Accengage may "
                "have sent the push; check, then resend or drop the row"
            ),
        )
    code, label, message_id = parsed
    label = label or describe(code)
    if code == 0:
        return Outcome("sent", status, code, label, message_id)
    if code in RETRYABLE_CODES:
        cause = f"Accengage code {code} ({describe(code)})"
        error = f"{cause}: will try again"
        return Outcome("retry", status, code, label, message_id, error, cause=cause)
    error = (
        f"Accengage refused the request with code {code} ({describe(code)}); not retried: "
        "fix the rule, then resend the row"
    )
    return Outcome("failed", status, code, label, message_id, error)


def classify_error(
    exc: BaseException,
    deadline: float | None = None,
    *,
    left: bool | None = None,
    written: bool | None = None,
) -> Outcome:
    """An exception raised while sending -> was the request sent, and what now.

    ``left``: whether the request's headers started being written (httpcore's ``trace``), when
    known. False proves the request never left, whatever the exception. ``written``: False when
    a write of the request failed (the trace again), which proves it never left whole, whatever
    error the transport raised after.
    """
    name = type(exc).__name__
    detail = str(exc).strip()
    what = f"{name}: {detail}" if detail else name
    if isinstance(exc, TimeoutError) and deadline is not None:
        what = f"no complete answer within the {deadline:g} s deadline"
    if isinstance(exc, NOT_SENT_ERRORS) or left is False or written is False:
        cause = f"{what} (the request did not reach Accengage)"
        return Outcome(
            "retry",
            error=f"{what} (the request did not reach Accengage; will retry)",
            cause=cause,
        )
    return Outcome(
        "unknown",
        error=(
            f"{what} (the request may have reached Accengage: check whether the push arrived, "
            "then resend or drop the row)"
        ),
        cause=f"{what} (the request may have reached Accengage)",
    )


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(attempt-1))], so retries spread out."""
    return rng.uniform(0.0, min(cap, base * 2.0 ** max(0, attempt - 1)))


def decide(
    outcome: Outcome,
    attempts: int,
    settings: DispatchSettings,
    now: datetime,
    rng: random.Random,
) -> tuple[str, datetime | None]:
    """The row's next state (and when to try again) after attempt number ``attempts``."""
    if outcome.kind == "sent":
        return SENT, None
    if outcome.kind == "failed":
        return FAILED, None
    if outcome.kind == "unknown" and settings.on_unknown_outcome == "park":
        return IN_DOUBT, None
    if attempts >= settings.max_attempts:
        return DEAD, None
    if outcome.retry_after is not None:
        delay = min(outcome.retry_after, settings.retry_after_max)
    else:
        delay = backoff_delay(attempts, settings.backoff_base, settings.backoff_max, rng)
    return RETRYING, now + timedelta(seconds=delay)


def final_error(outcome: Outcome, state: str, attempts: int) -> str | None:
    """The error text a row is left with, true to the state it is left in: a row given up on
    does not say "will try again", nor a row retried say "check, then resend"."""
    cause = outcome.cause or outcome.error
    if state == DEAD and cause is not None:
        return (
            f"{cause}; gave up after {attempts} attempt{'s' if attempts != 1 else ''}: resend "
            "the row once the cause is fixed"
        )
    if state == RETRYING and outcome.kind == "unknown" and cause is not None:
        return f"{cause}; will try again (dispatch.on_unknown_outcome: retry)"
    return outcome.error


def redact(text: str | None, scrub: Callable[[str], str]) -> str | None:
    """``text`` through ``scrub`` (a :class:`~engine.rules.secrets.Masker`), None kept."""
    return None if text is None else scrub(text)
