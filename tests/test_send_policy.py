"""The dispatcher's pure policy, function by function: no store, no network, no clock."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from engine.outbox.states import DEAD, FAILED, IN_DOUBT, RETRYING, SENT
from engine.rules.secrets import Masker
from engine.send.policy import (
    DispatchSettings,
    Outcome,
    backoff_delay,
    classify_error,
    classify_response,
    decide,
    final_error,
    parse_answer,
    parse_retry_after,
    parse_return_code,
    redact,
    with_user,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- pure: classification and decisions ------------------------------------------------------


def answer(doc: object, status: int = 200, headers: dict[str, str] | None = None) -> Outcome:
    return classify_response(status, headers or {}, json.dumps(doc).encode(), NOW)


def test_return_code_as_string_or_number() -> None:
    sent = answer({"returnCode": "0", "returnLabel": "ok", "messageId": "77"})
    assert (sent.kind, sent.return_code, sent.message_id) == ("sent", 0, "77")
    number = answer({"returnCode": 0, "messageid": 78})
    assert (number.kind, number.message_id, number.return_label) == (
        "sent",
        "78",
        "Instant Message has been sent",
    )
    assert parse_return_code(" 5 ") == 5
    assert parse_return_code(True) is None
    assert parse_return_code(1.0) is None
    assert parse_return_code("five") is None


def test_retryable_and_permanent_codes() -> None:
    for code in (1, 11, "1", "11"):
        assert answer({"returnCode": code}).kind == "retry"
    refused = answer({"returnCode": "5", "returnLabel": "No or bad message: text is missing"})
    assert (refused.kind, refused.return_code) == ("failed", 5)
    assert refused.return_label == "No or bad message: text is missing"
    assert refused.error is not None and "No or bad message" in refused.error
    assert "not retried" in refused.error
    unknown_code = answer({"returnCode": 99})
    assert unknown_code.kind == "failed" and unknown_code.return_label == "unknown return code 99"


def test_an_answer_that_is_not_the_documented_json_is_in_doubt() -> None:
    garbage = classify_response(200, {}, b"<html>Maintenance</html>", NOW)
    assert garbage.kind == "unknown"
    assert garbage.return_label == "answer is not the documented JSON: <html>Maintenance</html>"
    assert answer({"status": "ok"}).kind == "unknown"
    assert answer(["0"]).kind == "unknown"
    long = classify_response(200, {}, b"x" * 1000, NOW)
    assert long.return_label is not None and long.return_label.endswith("x" * 200 + "")
    assert len(long.return_label) == len("answer is not the documented JSON: ") + 200
    assert parse_answer(b"\xff\xfe") is None


def test_http_statuses() -> None:
    unavailable = classify_response(503, {}, b"down", NOW)
    assert (unavailable.kind, unavailable.http_status, unavailable.retry_after) == (
        "retry",
        503,
        None,
    )
    limited = classify_response(429, {"retry-after": "7"}, b"", NOW)
    assert (limited.kind, limited.retry_after) == ("retry", 7.0)
    missing = classify_response(404, {}, b"Not Found", NOW)
    assert missing.kind == "failed" and "accengage.url" in (missing.error or "")


def test_retry_after_forms() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("Sun, 01 Mar 2026 12:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", NOW) == 0.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (httpx.ConnectError("refused"), "retry"),
        (httpx.ConnectTimeout("slow"), "retry"),
        (httpx.PoolTimeout("full"), "retry"),
        (httpx.WriteError("broken pipe"), "retry"),
        (httpx.WriteTimeout("stuck"), "retry"),
        (httpx.ReadTimeout("no answer"), "unknown"),
        (httpx.ReadError("reset"), "unknown"),
        (httpx.RemoteProtocolError("Server disconnected"), "unknown"),
        (TimeoutError(), "unknown"),
        (RuntimeError("a bug"), "unknown"),
    ],
)
def test_errors_before_and_after_the_request_left(exc: BaseException, kind: str) -> None:
    outcome = classify_error(exc, deadline=60)
    assert outcome.kind == kind
    assert outcome.error and ("did not reach" if kind == "retry" else "may have") in outcome.error


def test_decide() -> None:
    rng = random.Random(1)
    s = DispatchSettings(max_attempts=3, backoff_base=2, backoff_max=10)
    assert decide(Outcome("sent"), 1, s, NOW, rng) == (SENT, None)
    assert decide(Outcome("failed"), 1, s, NOW, rng) == (FAILED, None)
    assert decide(Outcome("unknown"), 1, s, NOW, rng) == (IN_DOUBT, None)
    retry_unknown = DispatchSettings(on_unknown_outcome="retry")
    assert decide(Outcome("unknown"), 1, retry_unknown, NOW, rng)[0] == RETRYING
    state, at = decide(Outcome("retry"), 2, s, NOW, rng)
    assert state == RETRYING and at is not None and NOW <= at <= NOW + timedelta(seconds=4)
    assert decide(Outcome("retry"), 3, s, NOW, rng) == (DEAD, None)
    honoured = decide(Outcome("retry", retry_after=42), 1, s, NOW, rng)
    assert honoured == (RETRYING, NOW + timedelta(seconds=42))
    capped = decide(Outcome("retry", retry_after=10**9), 1, s, NOW, rng)
    assert capped == (RETRYING, NOW + timedelta(seconds=s.retry_after_max))


def test_backoff_is_full_jitter_under_a_cap() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 1.0, 30.0, rng) for n in range(1, 12) for _ in range(50)]
    assert all(0 <= d <= 30 for d in delays)
    assert max(backoff_delay(1, 1.0, 30.0, rng) for _ in range(200)) <= 1.0
    assert max(delays) > 20  # late attempts reach near the cap


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="lease"):
        DispatchSettings(lease=timedelta(seconds=10), deadline=60)
    with pytest.raises(ValueError, match="concurrency"):
        DispatchSettings(concurrency=0)
    with pytest.raises(ValueError, match="on_unknown_outcome"):
        DispatchSettings(on_unknown_outcome="guess")  # type: ignore[arg-type]
    assert DispatchSettings().batch == 128
    assert DispatchSettings(rate_per_second=5).batch == 32
    assert DispatchSettings().results_batch == 32


def test_an_error_is_a_retry_when_the_request_provably_never_left() -> None:
    """``left=False`` (httpcore never started writing the headers) beats the exception type."""
    assert classify_error(httpx.ReadTimeout("no answer"), 60, left=False).kind == "retry"
    assert classify_error(httpx.ReadTimeout("no answer"), 60, left=True).kind == "unknown"
    timed_out = classify_error(TimeoutError(), 60)
    assert timed_out.error is not None and "within the 60 s deadline" in timed_out.error
    # A failed write (httpcore's trace) proves the request never left whole, whatever error
    # httpcore raised after trying to read an answer.
    reset = httpx.ReadError("reset")
    assert classify_error(reset, 60, left=True, written=False).kind == "retry"
    assert classify_error(reset, 60, left=True, written=None).kind == "unknown"
    assert DispatchSettings().transport == "aiohttp"
    with pytest.raises(ValueError, match="transport"):
        DispatchSettings(transport="curl")  # type: ignore[arg-type]


def test_final_error_is_true_to_the_state_the_row_is_left_in() -> None:
    retry = classify_response(503, {}, b"down", NOW)
    assert final_error(retry, RETRYING, 1) == retry.error
    assert retry.error is not None and retry.error.endswith("will try again")
    dead = final_error(retry, DEAD, 8)
    assert dead is not None and "will try again" not in dead
    assert dead.startswith("HTTP 503 from Accengage") and "gave up after 8 attempts" in dead
    assert "gave up after 1 attempt:" in (final_error(retry, DEAD, 1) or "")
    unknown = classify_error(httpx.ReadError("reset"), 60)
    retried = final_error(unknown, RETRYING, 2)
    assert retried is not None and "dispatch.on_unknown_outcome: retry" in retried
    assert "resend or drop" not in retried
    assert final_error(unknown, IN_DOUBT, 1) == unknown.error
    assert final_error(Outcome("sent"), SENT, 1) is None


def test_credentials_are_added_at_send_time_and_masked_in_texts() -> None:
    stored = json.dumps({"sendInstantMessage": {"partner": {"id": "p"}}})
    sent = json.loads(with_user(stored, "ops@example.com", "pw-1234"))
    assert sent["sendInstantMessage"]["user"] == {"login": "ops@example.com", "password": "pw-1234"}
    secrets = ["pw-1234", "ops@example.com"]  # as the dispatcher passes them
    scrub = Masker(secrets, "ops@example.com")
    echoed = redact("bad login ops@example.com / pw-1234", scrub)
    assert echoed is not None and "pw-1234" not in echoed and "ops@example.com" not in echoed
    assert redact(None, scrub) is None
