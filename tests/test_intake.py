"""The HTTP intake: every answer it gives, in process (ASGI) and over a real loopback socket."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from engine.daemon.intake import MAX_BODY, create_app
from engine.daemon.metrics import Metrics
from engine.outbox.firing import FireOutcome, FireRequest, fire_many
from engine.outbox.store import Store
from engine.render.compiler import FireContext
from engine.rules.loader import Loader, RuleSet
from engine.rules.secrets import SecretRef
from tests.helpers import REPO

TOKEN_VAR = "PUSHRULES_TEST_INTAKE_TOKEN"
TOKEN = "s3cret-t0ken"
EVENT = {"member_id": "m1", "first_name": "Ada", "flightref": "AF123"}


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    rules = Loader(REPO, workers=1).load()
    assert rules.for_event("flight.canceled"), "the example project has an event rule"
    return rules


@dataclass
class FakeState:
    """The daemon's side: records each fire; with a store, writes it as the daemon would."""

    rules: RuleSet
    token: SecretRef | None = None
    store: Store | None = None
    healthy: dict[str, Any] = field(default_factory=lambda: {"ok": True})
    meter: Metrics = field(default_factory=Metrics)
    calls: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    broken: bool = False
    max_body: int = MAX_BODY

    def ruleset(self) -> RuleSet:
        return self.rules

    async def fire_event(self, name: str, payload: dict[str, Any], key: str) -> list[FireOutcome]:
        self.calls.append((name, payload, key))
        if self.broken:
            raise RuntimeError("database is away")
        rules = self.rules.for_event(name)
        if self.store is None:
            outcomes = [FireOutcome(r.id, key, "queued", (1,), "1 request queued") for r in rules]
        else:
            now = datetime.now(UTC)
            requests = [FireRequest(r, FireContext(now, event=payload), key) for r in rules]
            assert self.rules.project is not None
            outcomes = await asyncio.to_thread(
                fire_many, self.store, self.rules.project, requests, now=now
            )
        self.meter.fired(outcomes)
        return outcomes

    def health(self) -> dict[str, Any]:
        return self.healthy

    def metrics(self) -> tuple[bytes, str]:
        return self.meter.render()


Call = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def call(state: FakeState, request: Call, *, raise_errors: bool = True) -> httpx.Response:
    """One request to the app in process."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(state), raise_app_exceptions=raise_errors)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
            return await request(client)

    return asyncio.run(go())


def post(state: FakeState, body: Any = EVENT, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(state, lambda c: c.post("/events/flight.canceled", content=content, **kwargs))


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> SecretRef:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    return SecretRef("env", TOKEN_VAR)


# --- 202 ---------------------------------------------------------------------------------------


def test_an_event_fires_its_rules_and_answers_202(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    response = post(state)
    assert response.status_code == 202
    answer = response.json()
    assert answer["rules"] == [
        {"rule": "flight-canceled", "status": "queued", "detail": "1 request queued"}
    ]
    assert "note" not in answer
    [(name, payload, key)] = state.calls
    assert (name, payload) == ("flight.canceled", EVENT)
    assert key == f"event:{answer['event_id']}"


def test_the_idempotency_key_is_the_event_id(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    response = post(state, headers={"Idempotency-Key": "booking-42/cancel"})
    assert response.json()["event_id"] == "booking-42/cancel"
    assert state.calls[0][2] == "event:booking-42/cancel"
    # Without one, each event gets its own id.
    ids = {post(state).json()["event_id"] for _ in range(2)}
    assert len(ids) == 2


def test_an_event_no_rule_listens_to_is_accepted_with_a_note(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    response = call(state, lambda c: c.post("/events/flight.cancelled", json={}))
    assert response.status_code == 202
    answer = response.json()
    assert answer["rules"] == []
    assert "no enabled rule listens to event 'flight.cancelled'" in answer["note"]


def test_a_correct_token_is_let_in(ruleset: RuleSet, token: SecretRef) -> None:
    state = FakeState(ruleset, token=token)
    response = post(state, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 202


# --- 400 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"member_id": "m1",\n "x": }', "not JSON: Expecting value at line 2, column 7"),
        (b"", "not JSON: Expecting value at line 1, column 1"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b'{"price": NaN}', "NaN is not a JSON value"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'[{"member_id": "m1"}]', "must be a JSON object ({...}), not an array"),
        (b'"flight"', "not a string"),
        (b"42", "not a number"),
        (b"null", "not null"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(ruleset: RuleSet, body: bytes, says: str) -> None:
    state = FakeState(ruleset)
    response = post(state, body)
    assert response.status_code == 400
    assert says in response.json()["error"]
    assert state.calls == []


@pytest.mark.parametrize("key", ["", "k" * 201, "tab\there"])
def test_a_bad_idempotency_key_is_400(ruleset: RuleSet, key: str) -> None:
    state = FakeState(ruleset)
    response = post(state, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]
    assert state.calls == []


def test_a_200_character_key_is_fine(ruleset: RuleSet) -> None:
    assert post(FakeState(ruleset), headers={"Idempotency-Key": "k" * 200}).status_code == 202


# --- 401 / 503 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer s3crét".encode()},  # bytes beyond ASCII must not crash
    ],
)
def test_a_missing_or_wrong_token_is_401(
    ruleset: RuleSet,
    token: SecretRef,
    headers: dict[str, str | bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = FakeState(ruleset, token=token)
    with caplog.at_level(logging.DEBUG):
        response = post(state, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in response.text
    assert TOKEN not in caplog.text
    assert state.calls == []


@pytest.mark.parametrize("value", [None, ""])
def test_an_unset_token_variable_shuts_the_door(
    ruleset: RuleSet,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str | None,
) -> None:
    if value is None:
        monkeypatch.delenv(TOKEN_VAR, raising=False)
    else:
        monkeypatch.setenv(TOKEN_VAR, value)
    state = FakeState(ruleset, token=SecretRef("env", TOKEN_VAR))
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
        response = post(state, headers=headers)
        assert response.status_code == 503
        assert response.json() == {"error": "intake token not configured"}
    assert state.calls == []
    assert TOKEN_VAR in caplog.text  # the log names the variable to set


def test_a_store_failure_is_503_and_asks_for_a_retry(ruleset: RuleSet) -> None:
    state = FakeState(ruleset, broken=True)
    response = post(state)
    assert response.status_code == 503
    assert "same Idempotency-Key" in response.json()["error"]
    assert "database" not in response.text


# --- 413 ---------------------------------------------------------------------------------------


def big_event(size: int) -> bytes:
    return json.dumps({"blob": "x" * size}).encode()


def test_a_body_over_1_mib_is_413(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    response = post(state, big_event(MAX_BODY))
    assert response.status_code == 413
    assert "larger than 1048576 bytes" in response.json()["error"]
    assert post(state, big_event(MAX_BODY - 100)).status_code == 202


def test_intake_max_body_raises_the_limit_and_the_refusal_names_it(ruleset: RuleSet) -> None:
    state = FakeState(ruleset, max_body=4 * MAX_BODY)
    assert post(state, big_event(2 * MAX_BODY)).status_code == 202
    response = post(state, big_event(4 * MAX_BODY))
    assert response.status_code == 413
    error = response.json()["error"]
    assert "larger than 4194304 bytes" in error
    assert "intake.max_body in pushrules.yaml" in error


def test_a_lying_content_length_is_413_before_the_body_is_read(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    headers = {"Content-Length": str(MAX_BODY + 1)}
    response = post(state, b"{}", headers=headers)
    assert response.status_code == 413
    assert state.calls == []


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    yield b'{"blob": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


def test_a_chunked_body_over_1_mib_is_413(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)

    async def send(client: httpx.AsyncClient) -> httpx.Response:
        request = client.build_request("POST", "/events/flight.canceled", content=chunks(2**21))
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        return await client.send(request)

    assert call(state, send).status_code == 413
    assert state.calls == []


# --- other routes -----------------------------------------------------------------------------


def test_unknown_routes_and_methods_answer_json(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    response = call(state, lambda c: c.get("/nowhere"))
    assert response.status_code == 404
    assert "POST /events/NAME" in response.json()["error"]
    response = call(state, lambda c: c.get("/events/flight.canceled"))
    assert response.status_code == 405
    assert "POST /events/NAME" in response.json()["error"]


def test_an_unexpected_failure_is_a_json_500(
    ruleset: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = FakeState(ruleset)
    monkeypatch.setattr(state, "metrics", lambda: 1 / 0)
    response = call(state, lambda c: c.get("/metrics"), raise_errors=False)
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; see the daemon's log"}


def test_health_is_200_when_ok_else_503(ruleset: RuleSet) -> None:
    state = FakeState(ruleset, healthy={"ok": True, "rules": 5})
    response = call(state, lambda c: c.get("/healthz"))
    assert (response.status_code, response.json()) == (200, {"ok": True, "rules": 5})
    since = datetime(2026, 1, 1, tzinfo=UTC)
    state.healthy = {"ok": False, "store": "unreachable", "since": since}
    response = call(state, lambda c: c.get("/healthz"))
    assert response.status_code == 503
    assert response.json()["store"] == "unreachable"
    assert response.json()["since"] == str(since)


def test_metrics_are_prometheus_text(ruleset: RuleSet) -> None:
    state = FakeState(ruleset)
    assert post(state).status_code == 202
    state.meter.dispatch.attempted(0, 0.12, "sent")
    state.meter.dispatch.attempted(None, 30.0, "retrying")
    state.meter.reloaded(ok=True, rules=5)
    state.meter.set_backlog({"pending": 3, "sent": 10})
    response = call(state, lambda c: c.get("/metrics"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for line in (
        'pushrules_fires_total{rule="flight-canceled",status="queued"} 1.0',
        'pushrules_sends_total{return_code="0"} 1.0',
        'pushrules_sends_total{return_code="none"} 1.0',
        "pushrules_retries_total 1.0",
        "pushrules_send_latency_seconds_count 2.0",
        'pushrules_outbox_backlog{state="pending"} 3.0',
        'pushrules_reloads_total{result="ok"} 1.0',
        "pushrules_rules_loaded 5.0",
    ):
        assert line in text


# --- a real socket and a real store --------------------------------------------------------------


@pytest.fixture
def served(ruleset: RuleSet, tmp_path: Path, token: SecretRef) -> Iterator[tuple[str, FakeState]]:
    """The app under uvicorn on a loopback port, writing to a real SQLite outbox."""
    store = Store(f"sqlite:///{tmp_path / 'outbox.db'}")
    state = FakeState(ruleset, token=token, store=store)
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(state), log_config=None, log_level="warning", access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", state
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()
        store.close()


def test_over_a_socket_an_event_is_in_the_outbox_when_202_comes(
    served: tuple[str, FakeState],
) -> None:
    url, state = served
    assert state.store is not None
    auth = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "cancel-AF123-m1"}
    with httpx.Client(base_url=url, timeout=10) as client:
        first = client.post("/events/flight.canceled", json=EVENT, headers=auth)
        assert first.status_code == 202, first.text
        assert [r["status"] for r in first.json()["rules"]] == ["queued"]
        rows = state.store.history(rule="flight-canceled")
        assert [r.idem_key for r in rows] == ["event:cancel-AF123-m1"]
        assert "AF123" in rows[0].body
        # The client did not hear the answer and sends again: nothing new is queued.
        again = client.post("/events/flight.canceled", json=EVENT, headers=auth)
        assert [r["status"] for r in again.json()["rules"]] == ["duplicate"]
        assert len(state.store.history(rule="flight-canceled")) == 1
        assert client.post("/events/flight.canceled", json=EVENT).status_code == 401
        metrics = client.get("/metrics").text
        assert 'pushrules_fires_total{rule="flight-canceled",status="duplicate"} 1.0' in metrics


def test_over_a_socket_a_chunked_body_over_1_mib_is_413(served: tuple[str, FakeState]) -> None:
    url, state = served

    def body() -> Iterator[bytes]:
        yield b'{"blob": "'
        for _ in range(64):
            yield b"x" * 32 * 1024
        yield b'"}'

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.post("/events/flight.canceled", content=body(), headers=headers)
    assert response.status_code == 413
    assert state.calls == []
