"""bot/cometapi.py: body parsing, header parsing, id validation, and the client against FakeCometAPI."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import math
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.cometapi import (
    TASK_ID_MAX,
    AuthError,
    BadResponse,
    CometAPIClient,
    CometAPIError,
    InvalidTaskId,
    PaymentRequired,
    RateLimited,
    RequestRejected,
    StatusKind,
    TaskState,
    TransientError,
    parse_retry_after,
    parse_task_body,
    validate_task_id,
)
from bot.secret import Secret
from tests.fakes.comet import Answer, FakeCometAPI

KEY = "sk-fluxbot-SECRET-0xC0FFEE"
SAMPLE = "https://delivery.eu2.bfl.ai/durable/abc/sample.jpeg"

# --------------------------------------------------------------------------- parse_task_body


def test_pending_with_progress() -> None:
    state = parse_task_body({"id": "other", "status": "Pending", "result": None, "progress": 0.4}, "t1")
    assert state.task_id == "t1"  # the id we asked for, not what the body claims
    assert state.kind is StatusKind.PENDING
    assert not state.kind.is_final
    assert state.status == "Pending"
    assert state.progress == pytest.approx(0.4)
    assert state.image_urls == ()
    assert state.image_url is None


def test_ready_with_result() -> None:
    body = {
        "id": "t1",
        "status": "Ready",
        "result": {"seed": 4041919005, "prompt": "A red kite in a blue sky.", "sample": SAMPLE,
                   "duration": 7.2, "start_time": 1781078400.1, "end_time": 1781078407.3},
    }
    state = parse_task_body(body, "t1")
    assert state.kind is StatusKind.READY
    assert state.kind.is_final
    assert state.image_url == SAMPLE
    assert state.image_urls == (SAMPLE,)
    assert state.prompt == "A red kite in a blue sky."
    assert state.seed == 4041919005
    assert state.duration == pytest.approx(7.2)


def test_ready_duration_from_start_and_end() -> None:
    body = {"status": "Ready", "result": {"sample": SAMPLE, "start_time": 100.0, "end_time": 103.5}}
    assert parse_task_body(body, "t").duration == pytest.approx(3.5)
    backwards = {"status": "Ready", "result": {"sample": SAMPLE, "start_time": 103.0, "end_time": 100.0}}
    assert parse_task_body(backwards, "t").duration is None


def test_ready_without_sample_has_no_url() -> None:
    state = parse_task_body({"status": "Ready", "result": {"prompt": "p"}}, "t")
    assert state.kind is StatusKind.READY
    assert state.image_url is None


@pytest.mark.parametrize("sample", ["javascript:alert(1)", "file:///etc/passwd", "ftp://x/y.png", "", 42, None,
                                    ["not a url"]])
def test_non_http_samples_are_dropped(sample: object) -> None:
    state = parse_task_body({"status": "Ready", "result": {"sample": sample}}, "t")
    assert state.image_urls == ()


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        ("Pending", StatusKind.PENDING),
        ("Request Accepted", StatusKind.PENDING),
        ("Ready", StatusKind.READY),
        ("READY", StatusKind.READY),
        ("Error", StatusKind.FAILED),
        ("Content Moderated", StatusKind.MODERATED),
        ("Request Moderated", StatusKind.MODERATED),
        ("Task not found", StatusKind.NOT_FOUND),
        ("starting", StatusKind.PENDING),
        ("processing", StatusKind.PENDING),
        ("succeeded", StatusKind.READY),
        ("failed", StatusKind.FAILED),
        ("canceled", StatusKind.CANCELED),
        ("cancelled", StatusKind.CANCELED),
    ],
)
def test_every_known_status(status: str, kind: StatusKind) -> None:
    state = parse_task_body({"id": "t", "status": status}, "t")
    assert state.kind is kind
    assert state.status == status


@pytest.mark.parametrize("status", ["Queued", "In Progress", "🤖", "5"])
def test_unknown_status_is_pending_and_kept(status: str) -> None:
    state = parse_task_body({"status": status}, "t")
    assert state.kind is StatusKind.PENDING
    assert state.status == status


def test_error_details() -> None:
    state = parse_task_body({"status": "Error", "details": {"reason": "GPU on fire"}}, "t")
    assert state.kind is StatusKind.FAILED
    assert state.details is not None and "GPU on fire" in state.details
    state = parse_task_body({"status": "Error", "error": "out of memory"}, "t")
    assert state.details == "out of memory"


def test_content_moderated_reasons() -> None:
    body = {"id": "t", "status": "Content Moderated", "result": None,
            "details": {"Moderation Reasons": ["Derivative Works", "Public Figure"]}}
    state = parse_task_body(body, "t")
    assert state.kind is StatusKind.MODERATED
    assert state.moderation_reasons == ("Derivative Works", "Public Figure")


def test_request_moderated_single_reason_and_key_spelling() -> None:
    state = parse_task_body({"status": "Request Moderated", "details": {"moderation_reasons": "NSFW"}}, "t")
    assert state.kind is StatusKind.MODERATED
    assert state.moderation_reasons == ("NSFW",)


def test_moderation_reasons_bounded() -> None:
    body = {"status": "Content Moderated", "details": {"Moderation Reasons": ["x" * 10_000] * 50}}
    state = parse_task_body(body, "t")
    assert 0 < len(state.moderation_reasons) <= 10
    assert all(len(r) <= 200 for r in state.moderation_reasons)


def test_task_not_found() -> None:
    state = parse_task_body({"id": "t", "status": "Task not found"}, "t")
    assert state.kind is StatusKind.NOT_FOUND
    assert state.kind.is_final


@pytest.mark.parametrize("output", [SAMPLE, [SAMPLE, SAMPLE + "?2"]])
def test_replicate_succeeded(output: object) -> None:
    body = {"id": "r8", "status": "succeeded", "output": output, "input": {"prompt": "a kite"},
            "metrics": {"predict_time": 2.5}}
    state = parse_task_body(body, "r8")
    assert state.kind is StatusKind.READY
    assert state.image_url == SAMPLE
    assert state.prompt == "a kite"
    assert state.duration == pytest.approx(2.5)
    if isinstance(output, list):
        assert state.image_urls == (SAMPLE, SAMPLE + "?2")


def test_replicate_failed_and_canceled() -> None:
    failed = parse_task_body({"status": "failed", "error": "CUDA error", "output": None}, "t")
    assert failed.kind is StatusKind.FAILED
    assert failed.details == "CUDA error"
    canceled = parse_task_body({"status": "canceled", "output": None}, "t")
    assert canceled.kind is StatusKind.CANCELED


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(0, 0.0), (0.25, 0.25), (1, 1.0), (50, 0.5), (100, 1.0), (250, 1.0), ("75%", 0.75), ("0.3", 0.3),
     (-1, None), (True, None), ("soon", None), (None, None), (math.nan, None), (math.inf, None)],
)
def test_progress_normalised(raw: object, expected: float | None) -> None:
    state = parse_task_body({"status": "Pending", "progress": raw}, "t")
    if expected is None:
        assert state.progress is None
    else:
        assert state.progress is not None
        assert state.progress == pytest.approx(expected)
        assert 0.0 <= state.progress <= 1.0


def test_progress_inside_result() -> None:
    assert parse_task_body({"status": "Pending", "result": {"progress": 40}}, "t").progress == pytest.approx(0.4)


@pytest.mark.parametrize(("raw", "expected"), [(7, 7), (7.0, 7), ("12", 12), (" -3 ", -3), (True, None),
                                               (7.5, None), ("x", None)])
def test_seed(raw: object, expected: int | None) -> None:
    assert parse_task_body({"status": "Ready", "result": {"seed": raw}}, "t").seed == expected


@pytest.mark.parametrize("seed", ["--5", "²", "1" * 5000])
def test_odd_seed_strings_do_not_escape(seed: str) -> None:
    # BUG (bot/cometapi.py _seed): str.isdigit() accepts these but int() does not -> ValueError escaped.
    state = parse_task_body({"status": "Ready", "result": {"seed": seed}}, "t")
    assert state.seed is None


@pytest.mark.parametrize("field", ["progress", "duration", "start_time"])
def test_huge_integers_do_not_escape(field: str) -> None:
    # BUG (bot/cometapi.py _number): float(10**400) raises OverflowError. json.loads happily decodes
    # such a number, so one hostile body reached the tracker as an unexpected exception.
    body = json.loads('{"status": "Pending", "progress": 0.5, "result": {"end_time": 1}}')
    huge = json.loads("1" + "0" * 400)
    if field == "progress":
        body["progress"] = huge
    else:
        body["result"][field] = huge
    state = parse_task_body(body, "t")
    assert state.kind is StatusKind.PENDING


def test_long_text_is_capped() -> None:
    state = parse_task_body({"status": "Ready", "result": {"prompt": "p" * 1_000_000}}, "t")
    assert state.prompt is not None and len(state.prompt) <= 4000


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "Invalid token", "type": "comet_api_error", "code": "invalid_api_key"}},
        {"error": "something broke"},
        {"error": {"message": None}},
    ],
)
def test_error_envelope_on_200_is_bad_response(body: dict[str, Any]) -> None:
    with pytest.raises(BadResponse, match="error body"):
        parse_task_body(body, "t")


def test_error_with_status_is_a_task_not_an_envelope() -> None:
    state = parse_task_body({"status": "Error", "error": {"message": "boom"}}, "t")
    assert state.kind is StatusKind.FAILED
    assert state.details is not None and "boom" in state.details


@pytest.mark.parametrize("body", [[], [{"status": "Ready"}], "Ready", 42, 1.5, None, True])
def test_non_object_is_bad_response(body: object) -> None:
    with pytest.raises(BadResponse, match="JSON object"):
        parse_task_body(body, "t")


@pytest.mark.parametrize("body", [{}, {"id": "t"}, {"status": None}, {"status": ""}, {"status": "   "},
                                  {"Status": "Ready"}])
def test_missing_status_is_bad_response(body: dict[str, Any]) -> None:
    with pytest.raises(BadResponse, match="no status"):
        parse_task_body(body, "t")


# A JSON value as json.loads could produce it: huge ints (up to the 4300-digit str limit), NaN and
# infinities (Python's json accepts them), deep nesting, odd strings.
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**1000)
    | st.integers(min_value=-(10**1000), max_value=-(10**300))
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50)
    | st.sampled_from(["Ready", "Pending", "Error", "Content Moderated", "Task not found", "succeeded",
                       "http://x/y.png", "https://a.b/c.jpeg", "--5", "²", "75%", "1e999", "nan", "",
                       "Moderation Reasons", "x" * 5000])
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=20) | st.sampled_from(
        ["status", "result", "sample", "progress", "seed", "duration", "start_time", "end_time", "output",
         "error", "details", "Moderation Reasons", "prompt", "input", "metrics", "predict_time", "url"]),
        children, max_size=6),
    max_leaves=30,
)
_task_like = st.fixed_dictionaries(
    {"status": _json_values},
    optional={
        "id": _json_values, "result": _json_values, "progress": _json_values, "output": _json_values,
        "error": _json_values, "details": _json_values, "input": _json_values, "metrics": _json_values,
    },
)


def _check_parse(body: object) -> None:
    try:
        state = parse_task_body(body, "t")
    except BadResponse as exc:
        assert str(exc)
        return
    assert isinstance(state, TaskState)
    assert state.task_id == "t"
    assert isinstance(state.kind, StatusKind)
    assert isinstance(state.status, str) and 0 < len(state.status) <= 100
    assert state.progress is None or 0.0 <= state.progress <= 1.0
    assert state.duration is None or math.isfinite(state.duration)
    assert all(u.startswith(("http://", "https://")) for u in state.image_urls)
    assert TaskState.from_json(state.to_json()) == state
    assert TaskState.from_json(json.loads(json.dumps(state.to_json()))) == state


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json_values | _task_like)
def test_parse_task_body_property(body: object) -> None:
    _check_parse(body)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_task_like)
def test_parse_task_body_task_shaped_property(body: object) -> None:
    _check_parse(body)


def test_deeply_nested_body() -> None:
    nested: object = "x"
    for _ in range(5000):
        nested = [nested]
    _check_parse({"status": "Error", "details": nested, "error": nested})
    _check_parse({"status": nested})


def test_task_state_round_trip_full() -> None:
    state = TaskState(task_id="a:b", kind=StatusKind.MODERATED, status="Content Moderated", progress=0.5,
                      prompt="p", seed=-1, duration=1.5, image_urls=(SAMPLE,), details="d",
                      moderation_reasons=("r1", "r2"))
    assert TaskState.from_json(json.loads(json.dumps(state.to_json()))) == state


# --------------------------------------------------------------------------- parse_retry_after


@pytest.mark.parametrize(("value", "expected"), [("5", 5.0), (" 120 ", 120.0), ("0", 0.0), ("1.5", 1.5),
                                                 ("-3", 0.0), ("999999", 3600.0)])
def test_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value) == pytest.approx(expected)


def test_retry_after_http_date() -> None:
    now = 1_781_078_400.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    # Without ``now`` it uses the wall clock.
    live = parse_retry_after(email.utils.formatdate(time.time() + 60, usegmt=True))
    assert live is not None and 55.0 <= live <= 60.0


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "1e400", "Fri, 31 Dec 99999 23:59:59 GMT",
                                   "Mon, 32 Foo 2020 25:61:61 GMT", "\x00"])
def test_retry_after_garbage(value: str | None) -> None:
    assert parse_retry_after(value) is None


@given(st.text(max_size=60))
def test_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, now=1_781_078_400.0)
    assert result is None or 0.0 <= result <= 3600.0


# --------------------------------------------------------------------------- validate_task_id


def test_validate_trims() -> None:
    assert validate_task_id("  a:b.c-d_e\n") == "a:b.c-d_e"
    assert validate_task_id("x" * TASK_ID_MAX) == "x" * TASK_ID_MAX


@pytest.mark.parametrize("raw", ["", "   ", "\n\t"])
def test_validate_empty(raw: str) -> None:
    with pytest.raises(InvalidTaskId, match="empty"):
        validate_task_id(raw)


def test_validate_too_long() -> None:
    with pytest.raises(InvalidTaskId) as info:
        validate_task_id("x" * (TASK_ID_MAX + 1))
    assert str(TASK_ID_MAX + 1) in str(info.value)
    assert str(TASK_ID_MAX) in str(info.value)


@pytest.mark.parametrize(("raw", "shown"), [("abc def", "' '"), ("a/b", "'/'"), ("id?x=1", "'?'"),
                                            ("héllo", "'é'"), ("a&b", "'&'"), ("<@123>", "'<'")])
def test_validate_bad_characters(raw: str, shown: str) -> None:
    with pytest.raises(InvalidTaskId) as info:
        validate_task_id(raw)
    message = str(info.value)
    assert shown in message
    assert "letters, digits" in message
    assert "\n" not in message


def test_invalid_task_id_is_value_error() -> None:
    assert issubclass(InvalidTaskId, ValueError)


# --------------------------------------------------------------------------- client vs FakeCometAPI


@pytest.fixture
async def fake() -> AsyncIterator[FakeCometAPI]:
    async with FakeCometAPI(api_key=KEY) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def client(fake: FakeCometAPI, session: aiohttp.ClientSession) -> CometAPIClient:
    return CometAPIClient(session, fake.base_url, Secret(KEY), timeout=2.0, max_body=64 * 1024)


def _assert_no_key(exc: BaseException) -> None:
    seen: BaseException | None = exc
    while seen is not None:
        assert KEY not in str(seen), f"{type(seen).__name__} leaks the key"
        assert KEY not in repr(seen), f"{type(seen).__name__} leaks the key"
        seen = seen.__cause__


async def _fails(client: CometAPIClient, task_id: str, kind: type[CometAPIError]) -> CometAPIError:
    try:
        await client.get_result(task_id)
    except CometAPIError as exc:
        assert isinstance(exc, kind), f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
        _assert_no_key(exc)
        return exc
    pytest.fail(f"expected {kind.__name__}")


async def test_ready_round_trip(fake: FakeCometAPI, client: CometAPIClient) -> None:
    url = fake.image_url("kite.png")
    fake.script("t1", Answer.pending(0.3), Answer.ready(url, prompt="kite", seed=7, duration=3.0))
    first = await client.get_result("t1")
    assert first.kind is StatusKind.PENDING and first.progress == pytest.approx(0.3)
    second = await client.get_result("t1")
    assert second.kind is StatusKind.READY
    assert (second.image_url, second.prompt, second.seed, second.duration) == (url, "kite", 7, 3.0)
    assert fake.polls["t1"] == 2
    assert fake.auth_seen == [f"Bearer {KEY}", f"Bearer {KEY}"]
    assert client.stats.requests == 2
    assert client.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (Answer.pending(), StatusKind.PENDING),
        (Answer.pending(status="Request Accepted"), StatusKind.PENDING),
        (Answer.status("Queued"), StatusKind.PENDING),
        (Answer.status("Error", details={"reason": "x"}), StatusKind.FAILED),
        (Answer.status("Content Moderated", details={"Moderation Reasons": ["Derivative Works"]}),
         StatusKind.MODERATED),
        (Answer.status("Request Moderated"), StatusKind.MODERATED),
        (Answer.status("Task not found"), StatusKind.NOT_FOUND),
        (Answer.status("succeeded", output=[SAMPLE]), StatusKind.READY),
        (Answer.status("failed", error="boom"), StatusKind.FAILED),
        (Answer.status("canceled"), StatusKind.CANCELED),
        (Answer.json({"status": "Task not found"}, status=404), StatusKind.NOT_FOUND),
    ],
)
async def test_every_status_over_http(fake: FakeCometAPI, client: CometAPIClient, answer: Answer,
                                      kind: StatusKind) -> None:
    fake.script("t", answer)
    state = await client.get_result("t")
    assert state.kind is kind
    assert state.task_id == "t"


async def test_moderation_reasons_over_http(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.status("Content Moderated", details={"Moderation Reasons": ["Public Figure"]}))
    state = await client.get_result("t")
    assert state.moderation_reasons == ("Public Figure",)


async def test_unknown_id_is_not_found(fake: FakeCometAPI, client: CometAPIClient) -> None:
    state = await client.get_result("never-scripted")
    assert state.kind is StatusKind.NOT_FOUND
    assert fake.polls["never-scripted"] == 1


@pytest.mark.parametrize("task_id", ["a:b.c-d_e", "x&y=1+2 #", "100%/?id=other", "ünï code"])
async def test_task_id_is_url_encoded(fake: FakeCometAPI, client: CometAPIClient, task_id: str) -> None:
    fake.script(task_id, Answer.status("Content Moderated"))
    state = await client.get_result(task_id)
    assert state.kind is StatusKind.MODERATED  # the fake decoded exactly the id we scripted
    assert fake.polls == {task_id: 1}


async def test_timed_task(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.timed_task("slow", ready_after=0.2, prompt="p", seed=9)
    first = await client.get_result("slow")
    assert first.kind is StatusKind.PENDING and first.progress is not None and first.progress < 0.5
    await asyncio.sleep(0.25)
    done = await client.get_result("slow")
    assert done.kind is StatusKind.READY
    assert done.image_url == fake.image_url("default.png")
    assert (done.prompt, done.seed) == ("p", 9)


# (answer, expected error, text the message must contain)
_ERROR_CASES: list[tuple[str, Callable[[], Answer], type[CometAPIError], str]] = [
    ("401", lambda: Answer.error(401, "Invalid token", code="invalid_api_key"), AuthError, "401"),
    ("403", lambda: Answer.error(403, "forbidden"), AuthError, "403"),
    ("402", lambda: Answer.error(402, "pay up"), PaymentRequired, "402"),
    ("200 quota", lambda: Answer.error(200, "insufficient quota for this request", "comet_api_error",
                                       "insufficient_user_quota"), PaymentRequired, "quota"),
    ("200 bad key", lambda: Answer.error(200, "invalid api key"), AuthError, "invalid api key"),
    ("200 other envelope", lambda: Answer.error(200, "model overloaded"), BadResponse, "model overloaded"),
    ("400", lambda: Answer.error(400, "bad id", "invalid_request_error"), RequestRejected, "bad id"),
    ("422 plain", lambda: Answer.json({"message": "unprocessable"}, status=422), RequestRejected,
     "unprocessable"),
    ("500", lambda: Answer.error(500, "internal"), TransientError, "500"),
    ("502 html", lambda: Answer.raw(b"<html>Bad Gateway</html>", status=502), TransientError, "502"),
    ("503", lambda: Answer.raw(b"", status=503, content_type="text/plain"), TransientError, "503"),
    ("html 200", lambda: Answer.raw(b"<!doctype html><title>Login</title>"), BadResponse, "text/html"),
    ("truncated json", lambda: Answer.raw(b'{"id": "t", "status": "Rea', content_type="application/json"),
     BadResponse, "not JSON"),
    ("not utf-8", lambda: Answer.raw(b'{"status": "\xff\xfe"}', content_type="application/json"),
     BadResponse, "not JSON"),
    ("no status", lambda: Answer.json({"id": "t", "result": None}), BadResponse, "no status"),
    ("json list", lambda: Answer.json([1, 2, 3]), BadResponse, "JSON object"),
    ("404 html", lambda: Answer.raw(b"<html>Not Found</html>", status=404), BadResponse, "COMETAPI_BASE_URL"),
    ("302", lambda: Answer.raw(b"", status=302, headers={"Location": "https://elsewhere.example/"}),
     BadResponse, "COMETAPI_BASE_URL"),
    ("oversized", lambda: Answer.json({"status": "Pending", "pad": "x" * 200_000}), BadResponse, "larger than"),
]


@pytest.mark.parametrize(("name", "make", "kind", "text"), _ERROR_CASES, ids=[c[0] for c in _ERROR_CASES])
async def test_error_mapping(fake: FakeCometAPI, client: CometAPIClient, name: str, make: Callable[[], Answer],
                             kind: type[CometAPIError], text: str) -> None:
    fake.script("t", make())
    exc = await _fails(client, "t", kind)
    assert text in str(exc)
    assert client.stats.errors == {kind.__name__: 1}


async def test_wrong_key_is_auth_error(fake: FakeCometAPI, session: aiohttp.ClientSession) -> None:
    wrong = CometAPIClient(session, fake.base_url, Secret("sk-wrong-key"), timeout=2.0)
    fake.script("t", Answer.pending())
    exc = await _fails(wrong, "t", AuthError)
    assert "sk-wrong-key" not in str(exc)
    assert fake.auth_seen == ["Bearer sk-wrong-key"]
    assert not exc.retryable


async def test_rate_limited_seconds(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.rate_limited("7"))
    exc = await _fails(client, "t", RateLimited)
    assert isinstance(exc, RateLimited)
    assert exc.retry_after == pytest.approx(7.0)
    assert exc.retryable


async def test_rate_limited_http_date(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.rate_limited(email.utils.formatdate(time.time() + 30, usegmt=True)))
    exc = await _fails(client, "t", RateLimited)
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is not None and 25.0 <= exc.retry_after <= 30.0


async def test_rate_limited_without_header(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.rate_limited(None))
    exc = await _fails(client, "t", RateLimited)
    assert isinstance(exc, RateLimited)
    assert exc.retry_after is None


async def test_stall_beyond_timeout_is_transient(fake: FakeCometAPI, session: aiohttp.ClientSession) -> None:
    quick = CometAPIClient(session, fake.base_url, Secret(KEY), timeout=0.2)
    fake.script("t", Answer.stall(5.0))
    started = time.monotonic()
    exc = await _fails(quick, "t", TransientError)
    assert time.monotonic() - started < 2.0
    assert "in time" in str(exc)


async def test_stall_within_timeout_answers(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.stall(0.1, Answer.status("Ready", result={"sample": SAMPLE})))
    assert (await client.get_result("t")).kind is StatusKind.READY


async def test_connection_reset_is_transient(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.reset())
    exc = await _fails(client, "t", TransientError)
    assert exc.retryable


async def test_unreachable_is_transient(session: aiohttp.ClientSession) -> None:
    # A port nobody listens on: bind one, close it, use it.
    async with FakeCometAPI(api_key=KEY) as gone:
        base = gone.base_url
    dead = CometAPIClient(session, base, Secret(KEY), timeout=2.0)
    exc = await _fails(dead, "t", TransientError)
    assert "ClientConnector" in str(exc) or "could not reach" in str(exc)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_answer(fake: FakeCometAPI, client: CometAPIClient, encoding: str, chunked: bool) -> None:
    # aiohttp asks for gzip/deflate by default and inflates the body, so Content-Length (the compressed
    # size) says nothing about how many bytes the JSON has.
    # BUG (bot/cometapi.py _read_capped fast path): reading exactly Content-Length inflated bytes cut the
    # body short, so every compressed answer with a Content-Length was "not JSON".
    body = json.dumps({"id": "t", "status": "Ready",
                       "result": {"sample": SAMPLE, "prompt": "a red kite " * 300}}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    fake.script("t", Answer.raw(packed, content_type="application/json", headers={"Content-Encoding": encoding},
                                chunked=chunked))
    state = await client.get_result("t")
    assert state.kind is StatusKind.READY
    assert state.prompt == ("a red kite " * 300).strip()


async def test_compressed_bomb_is_capped(fake: FakeCometAPI, client: CometAPIClient) -> None:
    body = b'{"status": "Pending", "pad": "' + b"x" * 5_000_000 + b'"}'
    fake.script("t", Answer.raw(gzip.compress(body), content_type="application/json",
                                headers={"Content-Encoding": "gzip"}))
    await _fails(client, "t", BadResponse)


async def test_server_echoing_the_key_does_not_leak_it(fake: FakeCometAPI, client: CometAPIClient) -> None:
    # CometAPIError promises "str() is safe to log: no key". A relay that echoes the token it
    # refused (some do: "invalid token sk-...") must not put it into our logs.
    # BUG: the client copies the envelope's message verbatim into the exception.
    fake.script("t", Answer.error(401, f"Invalid token {KEY}"))
    await _fails(client, "t", AuthError)


# --------------------------------------------------------------------------- the fake itself


async def test_fake_rescripting_starts_from_the_first_answer(fake: FakeCometAPI, client: CometAPIClient) -> None:
    fake.script("t", Answer.pending(0.1), Answer.pending(0.2), Answer.status("Error"))
    assert [(await client.get_result("t")).progress for _ in range(2)] == [0.1, 0.2]
    fake.script("t", Answer.pending(0.7), Answer.status("Task not found"))
    assert (await client.get_result("t")).progress == pytest.approx(0.7)
    assert [(await client.get_result("t")).kind for _ in range(3)] == [StatusKind.NOT_FOUND] * 3
    assert fake.polls["t"] == 6


async def test_fake_refuses_missing_key_and_missing_id(fake: FakeCometAPI, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.base_url + "/flux/v1/get_result", params={"id": "t"}) as response:
        assert response.status == 401
        assert response.headers["Content-Type"] == "application/json"
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    async with session.get(fake.base_url + "/flux/v1/get_result",
                           headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 400
    assert fake.auth_seen == [f"Bearer {KEY}"]
    assert fake.total_requests == 2


async def test_fake_images(fake: FakeCometAPI, session: aiohttp.ClientSession) -> None:
    data = bytes(range(256)) * 300  # 76,800 bytes: several chunks
    plain = fake.add_image("plain.png", data, headers={"X-Extra": "1"})
    chunked = fake.add_image("chunked.png", data, chunked=True)
    short = fake.add_image("short.png", data, lie_length=10)
    long = fake.add_image("long.png", data[:100], lie_length=10_000)
    moved = fake.add_image("moved.png", b"", redirect_to="plain.png")
    away = fake.add_image("away.png", b"", redirect_to="https://elsewhere.example/x.png")
    slow = fake.add_image("slow.png", data[:10], delay=0.2)
    gone = fake.add_image("gone.png", b"expired", status=403, content_type="text/plain")

    async with session.get(plain) as r:
        assert (r.status, r.headers["Content-Type"], r.headers["X-Extra"]) == (200, "image/png", "1")
        assert await r.read() == data
    async with session.get(chunked) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in r.headers
        assert await r.read() == data
    async with session.get(short) as r:
        assert r.content_length == 10
        assert await r.read() == data[:10]
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(long) as r:
            assert r.content_length == 10_000
            await r.read()
    async with session.get(moved, allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (302, plain)
    async with session.get(away, allow_redirects=False) as r:
        assert r.headers["Location"] == "https://elsewhere.example/x.png"
    started = time.monotonic()
    async with session.get(slow) as r:
        assert await r.read() == data[:10]
    assert time.monotonic() - started >= 0.19
    async with session.get(gone) as r:
        assert (r.status, await r.read()) == (403, b"expired")
    async with session.get(fake.image_url("absent.png")) as r:
        assert r.status == 404
    async with session.get(fake.image_url("default.png")) as r:
        assert (await r.read()).startswith(b"\x89PNG")
    assert fake.image_hits["plain.png"] == 1 and fake.image_hits["moved.png"] == 1
    assert fake.image_auth_seen == []
    assert fake.polls == {}


async def test_fake_close_does_not_wait_for_stalls(session: aiohttp.ClientSession) -> None:
    fake = FakeCometAPI(api_key=KEY)
    await fake.start()
    fake.script("t", Answer.stall(30.0))
    client = CometAPIClient(session, fake.base_url, Secret(KEY), timeout=10.0)
    pending = asyncio.ensure_future(client.get_result("t"))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    async with asyncio.timeout(5):
        await fake.close()
        try:
            state = await pending  # the stall was cut short: its answer, or a dropped connection
        except CometAPIError as exc:
            assert isinstance(exc, TransientError)
        else:
            assert state.kind is StatusKind.PENDING
    assert time.monotonic() - started < 3.0
