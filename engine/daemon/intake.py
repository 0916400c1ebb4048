"""The daemon's HTTP surface: ``POST /events/NAME``, ``GET /healthz``, ``GET /metrics``.

An event is answered 202 only once its fires are in the outbox, so a client that got 202 can
forget the event: a crash afterwards neither loses nor repeats it. A client that got no answer
sends the event again with the same ``Idempotency-Key``, and the outbox's ``(rule, key)``
uniqueness makes that harmless. Every refusal is JSON ``{"error": "..."}`` saying what to fix.

The token, when ``pushrules.yaml`` sets ``intake_token``, is resolved on every request (a
rotated secret takes effect without a restart) and never logged or echoed. A configured token
whose variable or file cannot be read shuts the door (503), rather than opening it to anyone.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.daemon.collector import CollectorHold
from engine.outbox.connections import is_busy
from engine.outbox.firing import FireOutcome
from engine.rules.loader import RuleSet
from engine.rules.schemas import MAX_BODY_DEFAULT
from engine.rules.secrets import MissingSecret, SecretRef

log = logging.getLogger("pushrules.intake")

MAX_BODY = MAX_BODY_DEFAULT  # bytes, unless intake.max_body says otherwise
#: A body this large (about 1,500 for_each targets) is parsed and fired with the garbage
#: collector held off (see engine/daemon/collector.py).
LARGE_BODY = 64 * 1024
MAX_IDEMPOTENCY_KEY = 200
MAX_EVENT_NAME = 200


class IntakeState(Protocol):
    """What the daemon lends the HTTP surface. ``token`` may be a property, so a reload of
    ``pushrules.yaml`` that changes ``intake_token`` applies to the next request."""

    @property
    def token(self) -> SecretRef | None: ...

    @property
    def max_body(self) -> int:
        """The largest body taken, in bytes (``intake.max_body``), read for every event."""
        ...

    def ruleset(self) -> RuleSet: ...

    async def fire_event(self, name: str, payload: dict[str, Any], key: str) -> list[FireOutcome]:
        """Fire every rule listening to ``name``; return once the fires are durably stored."""
        ...

    def health(self) -> dict[str, Any]:
        """Runs in a worker thread, so it may query the store; ``ok`` decides 200 or 503."""
        ...

    def metrics(self) -> tuple[bytes, str]:
        """Runs in a worker thread, so it may refresh gauges from the store first."""
        ...


# --- pure checks -------------------------------------------------------------------------------


def _refuse(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status, message, headers)


def check_token(ref: SecretRef | None, authorization: str | None) -> None:
    """Pass, or raise the HTTP refusal. The messages never contain either token."""
    if ref is None:
        return
    try:
        expected = ref.resolve()
    except MissingSecret:
        expected = ""
    if not expected:  # an empty variable is a mistake too, not "no password"
        log.error("intake_token %s is unset or empty: refusing every event until it is set", ref)
        raise _refuse(503, "intake token not configured")
    challenge = {"WWW-Authenticate": 'Bearer realm="pushrules"'}
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise _refuse(401, "an Authorization: Bearer <token> header is required", challenge)
    # Bytes: compare_digest refuses non-ASCII str, and a header may carry any latin-1 byte.
    if not hmac.compare_digest(presented.strip().encode("utf-8"), expected.encode("utf-8")):
        raise _refuse(401, "the bearer token is not the intake token", challenge)


def event_id_from(idempotency_key: str | None) -> str:
    """The client's ``Idempotency-Key``, or a fresh id when it sent none."""
    if idempotency_key is None:
        return str(uuid.uuid4())
    if not idempotency_key or len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise _refuse(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters long")
    if not idempotency_key.isprintable():
        raise _refuse(400, "Idempotency-Key must hold printable characters only")
    return idempotency_key


def check_declared_length(content_length: str | None, limit: int) -> None:
    if content_length is None:
        return
    if not content_length.isdigit():
        raise _refuse(400, "Content-Length is not a number")
    if int(content_length) > limit:
        raise _refuse(413, _too_large(limit))


def _too_large(limit: int) -> str:
    return (
        f"the event is larger than {limit} bytes (intake.max_body in pushrules.yaml); send "
        "the data rules need, not a file, or raise intake.max_body"
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_KINDS = {list: "an array", str: "a string", bool: "true or false", type(None): "null"}


def parse_event(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 saying where and why it is not one."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _refuse(
            400, f"the body is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise _refuse(400, "the body is not JSON: it is not UTF-8 text") from None
    except RecursionError:
        raise _refuse(400, "the body is not usable JSON: it is nested too deeply") from None
    except ValueError as exc:  # NaN / Infinity, integers too long to convert
        raise _refuse(400, f"the body is not usable JSON: {exc}") from None
    if not isinstance(value, dict):
        kind = _KINDS.get(type(value), "a number")
        raise _refuse(400, f"the event must be a JSON object ({{...}}), not {kind}")
    return value


def describe(
    outcomes: Sequence[FireOutcome], paused: Mapping[str, datetime | None] | None = None
) -> list[dict[str, str]]:
    """Each rule's outcome; a fire queued for a paused rule says ``paused``, since the client
    would otherwise expect a push that waits for ``pushrules resume``."""
    return [_described(o, paused or {}) for o in outcomes]


def _described(o: FireOutcome, paused: Mapping[str, datetime | None]) -> dict[str, str]:
    pause = o.rule if o.rule in paused else "*" if "*" in paused else None
    if o.status != "queued" or pause is None:
        return {"rule": o.rule, "status": o.status, "detail": o.detail}
    until = paused[pause]
    what = "the rule is paused" if pause == o.rule else "all rules are paused"
    when = f" until {until.isoformat(timespec='seconds')}" if until else ""
    lift = f"pushrules resume {o.rule if pause == o.rule else '--all'}"
    detail = f"{o.detail}; {what}{when}: kept in the outbox until `{lift}`"
    return {"rule": o.rule, "status": "paused", "detail": detail}


def failure_note(outcomes: Sequence[FireOutcome]) -> str:
    """Why rules could not fire for this event (naming each), or "" when none failed."""
    failed = [o for o in outcomes if o.status == "failed"]
    if not failed:
        return ""
    reasons = "; ".join(f"rule {o.rule}: {o.detail}" for o in failed)
    return f"the event could not fire {len(failed)} rule(s), fix the event or the rule: {reasons}"


def no_rule_note(ruleset: RuleSet, name: str) -> str:
    """Why nothing fired, naming disabled rules that would have, so a typo is easy to spot."""
    disabled = sorted(r.id for r in ruleset.rules.values() if r.event == name and not r.enabled)
    note = f"no enabled rule listens to event '{name}': nothing was queued"
    if disabled:
        note += f" (disabled: {', '.join(disabled)})"
    return note


# --- the I/O edge -------------------------------------------------------------------------------

#: Only Starlette's router answers these (no handler here raises them), so they can say more.
ROUTING_MESSAGES = {
    404: "no such route; the daemon answers POST /events/NAME, GET /healthz and GET /metrics",
    405: "wrong method; the daemon answers POST /events/NAME, GET /healthz and GET /metrics",
}


class _Json(JSONResponse):
    """JSON whose odd values (a datetime in a health report) become text, not a crash."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, default=str).encode("utf-8")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, counted while read: a chunked body has no Content-Length to trust."""
    check_declared_length(request.headers.get("content-length"), limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _refuse(413, _too_large(limit))
    except ClientDisconnect:
        # The client's own doing (a timeout, a killed process): one line, not a traceback.
        # Nothing was recorded, so the client must send the event again.
        client = request.client.host if request.client else "?"
        log.warning(
            "a client (%s) disconnected after %d bytes of an event's body; nothing was recorded",
            client,
            len(body),
        )
        raise _refuse(400, "the client disconnected before the whole body arrived") from None
    return bytes(body)


def create_app(state: IntakeState) -> Starlette:
    """The ASGI app; the daemon serves it with uvicorn on ``listen``."""

    async def post_event(request: Request) -> Response:
        check_token(state.token, request.headers.get("authorization"))
        name = request.path_params["name"]
        if len(name) > MAX_EVENT_NAME:
            raise _refuse(400, f"an event name is at most {MAX_EVENT_NAME} characters")
        event_id = event_id_from(request.headers.get("idempotency-key"))
        body = await read_body(request, state.max_body)
        with CollectorHold() as hold:
            if len(body) >= LARGE_BODY:
                hold.start()
            payload = parse_event(body)
            del body
            try:
                outcomes = await state.fire_event(name, payload, f"event:{event_id}")
            except Exception as exc:
                if is_busy(exc):  # expected under a held lock: one line each, not a traceback
                    log.warning(
                        "event %r (%s) could not be recorded: the store is locked by another "
                        "writer past daemon.lock_wait; answered 503, to be retried",
                        name,
                        event_id,
                    )
                else:
                    log.exception("event %r (%s) could not be recorded", name, event_id)
                raise _refuse(
                    503,
                    "the event could not be recorded (the store is busy or unreachable): retry "
                    f"with the same Idempotency-Key: {event_id}",
                    {"Retry-After": "5"},
                ) from None
        log.info(
            "event %r %s: %s",
            name,
            event_id,
            ", ".join(f"{o.rule} {o.status}" for o in outcomes) or "no rule listens",
        )
        paused_rules = getattr(state, "paused", None)  # optional in IntakeState
        paused = None
        if paused_rules is not None and any(o.status == "queued" for o in outcomes):
            try:
                paused = await run_in_threadpool(paused_rules)
            except Exception as exc:  # the fires are stored: answer for them all the same
                log.warning(
                    "event %r %s: could not read the pauses for the answer (%s: %s)",
                    name,
                    event_id,
                    type(exc).__name__,
                    exc,
                )
        answer: dict[str, Any] = {"event_id": event_id, "rules": describe(outcomes, paused)}
        if not outcomes:
            answer["note"] = no_rule_note(state.ruleset(), name)
        error = failure_note(outcomes)
        if error:
            # The other rules' fires are stored all the same (see "rules"); sending the event
            # again with the same key finds them as duplicates.
            return _Json({"error": error, **answer}, status_code=422)
        return _Json(answer, status_code=202)

    async def healthz(request: Request) -> Response:
        try:
            health = await run_in_threadpool(state.health)
        except Exception as exc:
            log.exception("health check failed")
            health = {"ok": False, "error": f"the health check itself failed: {type(exc).__name__}"}
        return _Json(health, status_code=200 if health.get("ok") else 503)

    async def metrics(request: Request) -> Response:
        body, content_type = await run_in_threadpool(state.metrics)
        return Response(body, headers={"content-type": content_type})

    async def refusal(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = ROUTING_MESSAGES.get(exc.status_code, exc.detail)
        if exc.status_code in ROUTING_MESSAGES:
            message = f"{request.method} {request.url.path}: {message}"
        return _Json({"error": message}, status_code=exc.status_code, headers=exc.headers)

    async def crash(request: Request, exc: Exception) -> Response:
        return _Json({"error": "internal error; see the daemon's log"}, status_code=500)

    return Starlette(
        routes=[
            Route("/events/{name}", post_event, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: refusal, Exception: crash},
    )
