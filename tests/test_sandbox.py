"""The sandbox Accengage over real HTTP on loopback: every code it gives, its faults, records."""

from __future__ import annotations

import copy
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.accengage import api
from engine.accengage.sandbox import (
    DEFAULT_PORT,
    RunningSandbox,
    SandboxConfig,
    start_in_thread,
)
from engine.cli.main import build_parser, main

# The three examples of ACCENGAGE_API.md, repaired, copied as they are written there.
EXAMPLE_ONE_APP = """
{"sendInstantMessage": {
  "user": {"login": "login@login.com", "password": "password"},
  "partner": {"id": "my_partner_id"},
  "parentMessageId": "1",
  "message": {
    "subject": "Flight canceled",
    "text": "Hi ${first_name}, the flight number ${flightref} is canceled",
    "sound": "custom", "soundName": "test.wav", "actionButtonLabel": "Ok",
    "richPushUrl": "http://www.google.com", "richPushOpening": "webview",
    "customParams": [{"key": "testKey", "value": "testValue"}, {"key": "testKey2", "value": "testValue2"}],
    "data": {"flightref": "EY5138"},
    "aps": {"alert": "Hello Sir, the flight number ${flightref} is canceled", "badge": 0}},
  "targets": [
    {"memberId": "765c8", "data": {"first_name": "Patrick"},
     "aps": {"alert": {"body": "Hello ${first_name}, your flight has been canceled",
                       "action-loc-key": "OK, thank you!"}, "sound": "sound.wav", "badge": 2}},
    {"language": {"operator": "=", "value": "en"}, "opencount": {"operator": ">", "value": "1"},
     "data": {"first_name": "John"}}]}}
"""  # noqa: E501

EXAMPLE_SEVERAL_APPS = """
{"sendInstantMessage": {
  "user": {"login": "login@login.com", "password": "password"},
  "messages": [
    {"partner": {"id": "my_first_partner_id"}, "parentMessageId": "1",
     "message": {"subject": "Hello", "text": "You are receiving a message"}},
    {"partner": {"id": "my_second_partner_id"}, "parentMessageId": "2",
     "message": {"subject": "Hello", "text": "You are receiving a message"}}],
  "targets": [{"language": {"operator": "=", "value": "en"}, "opencount": {"operator": ">", "value": "1"}}]}}
"""  # noqa: E501

EXAMPLE_BUTTONS = """{"template": "category_name",
"buttons": [{"id": 1, "title": "Confirm", "url": "http://google.fr", "icon": "ic_action_search",
"action": "browser", "destructive": false, "customParams": [{"key": "testKey", "value": "testValue"},
{"key": "testKey2", "value": "testValue2"}]}, {"id": 2, "url": "http://mobilecrm.accengage.com",
"icon": "action_settings_light", "action": "webView"}]}"""  # noqa: E501


def example_with_buttons() -> dict[str, Any]:
    body = json.loads(EXAMPLE_ONE_APP)
    body["sendInstantMessage"]["message"]["interactiveButtons"] = json.loads(EXAMPLE_BUTTONS)
    return body


BASE: dict[str, Any] = {
    "sendInstantMessage": {
        "user": {"login": "ops@example.com", "password": "secret"},
        "partner": {"id": "my_partner_id"},
        "parentMessageId": "1",
        "message": {"subject": "Hello", "text": "Your gate changed"},
        "targets": [{"memberId": "765c8"}],
    }
}
DELETE = object()


def varied(**edits: Any) -> dict[str, Any]:
    """BASE with each path (``message__sound``, ``targets__0__x``) set, or removed by DELETE."""
    body = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        node: Any = body["sendInstantMessage"]
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        key: Any = int(last) if last.isdigit() else last
        if value is DELETE:
            del node[key]
        else:
            node[key] = value
    return body


def several_apps(**target: Any) -> dict[str, Any]:
    body = json.loads(EXAMPLE_SEVERAL_APPS)
    body["sendInstantMessage"]["targets"] = [target]
    return body


# (expected code, request): one request that earns each code the sandbox decides itself.
# Keyword names use "__" for "." (message__sound is message.sound).
EARNED: list[tuple[int, Any]] = [
    (2, {"sendInstantMessages": BASE["sendInstantMessage"]}),
    (2, b'{"sendInstantMessage": {'),
    (3, varied(user__password="")),
    (4, varied(partner=DELETE)),
    (10, varied(parentMessageId=DELETE)),
    (5, varied(message__sound="loud")),
    (6, varied(message__customParams=[{"key": "k"}])),
    (9, varied(targets__0__opencount={"operator": "~", "value": "1"})),
    (9, several_apps(memberId="765c8", segmentId="42")),
    (13, varied(message__sund="default")),
    (14, varied(targets=[{"memberId": f"m{i}"} for i in range(api.MAX_TARGETS + 1)])),
    (15, varied(message__text="Hi ${nickname}")),
    (17, varied(message__language="xx")),
    (23, varied(message__interactiveButtons={"template": 3})),
    (24, varied(message__interactiveButtons={"buttons": [{"id": 1}, {"id": "1"}]})),
    (25, varied(message__interactiveButtons={"buttons": [{"id": 1, "customParams": {"k": "v"}}]})),
]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[RunningSandbox]:
    with start_in_thread(SandboxConfig(seed=7)) as running:
        yield running


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as http:
        yield http


@pytest.fixture(autouse=True)
def clean(request: pytest.FixtureRequest) -> None:
    """Each test that uses the shared sandbox starts with no faults and no records."""
    if "sandbox" in request.fixturenames:
        running: RunningSandbox = request.getfixturevalue("sandbox")
        running.set_faults(
            fail_rate=0, latency_ms=0, code=None, drop=0, hang=0, seed=7, record_path=None
        )
        running.clear_requests()


def send(client: httpx.Client, sandbox: RunningSandbox, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(sandbox.url, content=body, headers={"content-type": "application/json"})
    return client.post(sandbox.url, json=body)


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


# --- answers -------------------------------------------------------------------------------


def test_url_names_the_real_port(sandbox: RunningSandbox) -> None:
    assert sandbox.port != 0
    assert sandbox.url == f"http://127.0.0.1:{sandbox.port}/sendInstantMessage.php"
    assert sandbox.base_url == f"http://127.0.0.1:{sandbox.port}"


def test_healthz(client: httpx.Client, sandbox: RunningSandbox) -> None:
    assert client.get(f"{sandbox.base_url}/healthz").status_code == 200


@pytest.mark.parametrize(
    "body",
    [json.loads(EXAMPLE_ONE_APP), json.loads(EXAMPLE_SEVERAL_APPS), example_with_buttons()],
    ids=["one-app", "several-apps", "buttons"],
)
def test_the_documented_examples_are_sent(
    client: httpx.Client, sandbox: RunningSandbox, body: dict[str, Any]
) -> None:
    answer = send(client, sandbox, body)
    assert answer.status_code == 200
    assert answer.json() == {
        "returnCode": "0",
        "returnLabel": api.RETURN_CODES[0],
        "messageId": answer.json()["messageId"],
    }
    assert answer.json()["messageId"].isdigit()


@pytest.mark.parametrize(("code", "body"), EARNED, ids=[f"code-{c}" for c, _ in EARNED])
def test_each_return_code_is_earned(
    client: httpx.Client, sandbox: RunningSandbox, code: int, body: Any
) -> None:
    answer = send(client, sandbox, body)
    assert answer.status_code == 200  # Accengage answers its errors in the body
    data = answer.json()
    assert data["returnCode"] == str(code), data["returnLabel"]
    assert data["returnLabel"].startswith(f"{api.RETURN_CODES[code]}: ")
    assert "messageId" not in data


def test_label_names_the_field(client: httpx.Client, sandbox: RunningSandbox) -> None:
    answer = send(client, sandbox, varied(message__sound="loud")).json()
    assert answer["returnLabel"] == (
        "No or bad message: message.sound must be one of None, default, custom"
    )


def test_message_ids_increase_and_several_apps_get_the_last(
    client: httpx.Client, sandbox: RunningSandbox
) -> None:
    first = int(send(client, sandbox, BASE).json()["messageId"])
    several = int(send(client, sandbox, json.loads(EXAMPLE_SEVERAL_APPS)).json()["messageId"])
    last = int(send(client, sandbox, BASE).json()["messageId"])
    assert (several, last) == (first + 2, first + 3)


@pytest.mark.parametrize("code", [1, 11, 5])
def test_forced_code_answers_every_valid_request(
    client: httpx.Client, sandbox: RunningSandbox, code: int
) -> None:
    sandbox.set_faults(code=code)
    answer = send(client, sandbox, BASE).json()
    assert answer["returnCode"] == str(code)
    assert answer["returnLabel"].startswith(api.RETURN_CODES[code])
    assert "messageId" not in answer
    # An invalid request still earns its own code.
    assert send(client, sandbox, varied(user=DELETE)).json()["returnCode"] == "3"


def test_faults_change_over_http(client: httpx.Client, sandbox: RunningSandbox) -> None:
    faults = f"{sandbox.base_url}/_faults"
    shown = client.post(faults, json={"code": 11, "latency_ms": 0}).json()
    assert (shown["code"], shown["fail_rate"], shown["drop"]) == (11, 0, 0)
    assert send(client, sandbox, BASE).json()["returnCode"] == "11"
    assert client.get(faults).json()["code"] == 11
    for bad in ({"nope": 1}, {"fail_rate": 2}, {"code": 12}, {"drop": -1}, [1]):
        answer = client.post(faults, json=bad)
        assert answer.status_code == 400, bad
        assert answer.json()["error"]
    assert client.get(faults).json()["code"] == 11  # a refused change changes nothing
    assert client.post(faults, json={"code": None}).json()["code"] is None


# --- faults --------------------------------------------------------------------------------


def test_fail_rate_one_answers_503_without_the_json(
    client: httpx.Client, sandbox: RunningSandbox
) -> None:
    sandbox.set_faults(fail_rate=1)
    answer = send(client, sandbox, BASE)
    assert answer.status_code == 503
    assert "returnCode" not in answer.text
    assert sandbox.requests()[-1]["http_status"] == 503


def test_fail_rate_is_repeatable_with_a_seed(client: httpx.Client, sandbox: RunningSandbox) -> None:
    def statuses() -> list[int]:
        sandbox.set_faults(fail_rate=0.5, seed=3)
        return [send(client, sandbox, BASE).status_code for _ in range(12)]

    first = statuses()
    assert set(first) == {200, 503}
    assert statuses() == first


def test_drop_closes_the_connection_after_reading_the_request(
    client: httpx.Client, sandbox: RunningSandbox
) -> None:
    sandbox.set_faults(drop=1)
    with pytest.raises(httpx.RemoteProtocolError):
        send(client, sandbox, BASE)
    assert send(client, sandbox, BASE).json()["returnCode"] == "0"
    dropped, answered = sandbox.requests()
    assert (dropped["fault"], dropped["http_status"], dropped["returnCode"]) == ("drop", None, None)
    assert dropped["body"] == BASE
    assert answered["fault"] is None


def test_hang_makes_the_client_time_out(client: httpx.Client, sandbox: RunningSandbox) -> None:
    sandbox.set_faults(hang=1)
    with pytest.raises(httpx.ReadTimeout):
        client.post(sandbox.url, json=BASE, timeout=0.2)
    assert send(client, sandbox, BASE).json()["returnCode"] == "0"
    assert [r["fault"] for r in sandbox.requests()] == ["hang", None]


def test_latency_delays_each_answer(client: httpx.Client, sandbox: RunningSandbox) -> None:
    sandbox.set_faults(latency_ms=150)
    started = time.monotonic()
    assert send(client, sandbox, BASE).status_code == 200
    assert time.monotonic() - started >= 0.15


# --- records -------------------------------------------------------------------------------


def test_requests_are_recorded_newest_last(client: httpx.Client, sandbox: RunningSandbox) -> None:
    send(client, sandbox, BASE)
    send(client, sandbox, b"not json")
    records = client.get(f"{sandbox.base_url}/requests").json()
    assert [r["returnCode"] for r in records] == ["0", "2"]
    assert records[0]["body"] == BASE
    assert records[1]["body"] == "not json"
    assert {"received_at", "body", "returnCode", "http_status"} <= set(records[0])
    assert records[0]["http_status"] == 200
    assert records[0]["messageId"].isdigit()
    assert records == sandbox.requests()
    assert client.delete(f"{sandbox.base_url}/requests").json() == {"cleared": 2}
    assert client.get(f"{sandbox.base_url}/requests").json() == []


def test_requests_are_appended_to_a_json_lines_file(
    client: httpx.Client, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    path = tmp_path / "requests.jsonl"
    client.post(f"{sandbox.base_url}/_faults", json={"record_path": str(path)})
    send(client, sandbox, BASE)
    send(client, sandbox, varied(user=DELETE))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["returnCode"] for line in lines] == ["0", "3"]
    assert lines == sandbox.requests()


# --- lifecycle -----------------------------------------------------------------------------


def test_down_then_up_on_the_same_port_keeping_few_records() -> None:
    port = free_port()
    config = SandboxConfig(max_records=2)
    with httpx.Client(timeout=5) as http:
        with start_in_thread(config, port=port) as first:
            for _ in range(3):
                http.post(first.url, json=BASE)
            assert len(first.requests()) == 2  # only the newest are kept
        with pytest.raises(httpx.ConnectError):
            http.post(first.url, json=BASE)
        with start_in_thread(config, port=port) as second:
            assert second.url == first.url
            assert http.post(second.url, json=BASE).json()["returnCode"] == "0"


def test_cli_defaults_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    defaults = parser.parse_args(["sandbox"])
    assert (defaults.host, defaults.port, defaults.code) == ("127.0.0.1", DEFAULT_PORT, None)
    with pytest.raises(SystemExit) as refused:
        main(["sandbox", "--fail-rate", "2"])
    assert refused.value.code == 2
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert main(["sandbox", "--port", port]) == 1
    assert "pushrules sandbox:" in capsys.readouterr().err


def test_config_refuses_bad_values() -> None:
    for bad in ({"fail_rate": -0.1}, {"latency_ms": float("nan")}, {"code": 99}, {"seed": "x"}):
        with pytest.raises(ValueError):
            SandboxConfig(**bad)
