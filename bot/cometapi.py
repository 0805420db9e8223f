"""The only code that speaks CometAPI's HTTP: one request, one parsed answer or one typed error.

Bodies are untrusted. Every body, whatever its shape, ends as a :class:`TaskState` or as a
:class:`CometAPIError` subclass; nothing else escapes :func:`parse_task_body`.
"""

from __future__ import annotations

import email.utils
import enum
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from bot.secret import Secret

log = logging.getLogger(__name__)

__all__ = [
    "AuthError",
    "BadResponse",
    "CometAPIClient",
    "CometAPIError",
    "InvalidTaskId",
    "PaymentRequired",
    "RateLimited",
    "RequestRejected",
    "StatusKind",
    "TaskState",
    "TransientError",
    "parse_retry_after",
    "parse_task_body",
    "validate_task_id",
]


class StatusKind(enum.Enum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    MODERATED = "moderated"
    CANCELED = "canceled"
    NOT_FOUND = "not_found"

    @property
    def is_final(self) -> bool:
        return self is not StatusKind.PENDING


# Black Forest Labs' statuses and Replicate's, lower-cased. Anything not listed is "still running".
_KINDS: dict[str, StatusKind] = {
    "ready": StatusKind.READY,
    "succeeded": StatusKind.READY,
    "error": StatusKind.FAILED,
    "failed": StatusKind.FAILED,
    "content moderated": StatusKind.MODERATED,
    "request moderated": StatusKind.MODERATED,
    "canceled": StatusKind.CANCELED,
    "cancelled": StatusKind.CANCELED,
    "task not found": StatusKind.NOT_FOUND,
}

_MAX_TEXT = 4000  # no field we show needs more; a hostile body may hold megabytes


@dataclass(frozen=True, slots=True)
class TaskState:
    """One observation of a task, reduced to what the bot shows or needs."""

    task_id: str
    kind: StatusKind
    status: str
    progress: float | None = None
    prompt: str | None = None
    seed: int | None = None
    duration: float | None = None
    image_urls: tuple[str, ...] = ()
    details: str | None = None
    moderation_reasons: tuple[str, ...] = ()

    @property
    def image_url(self) -> str | None:
        return self.image_urls[0] if self.image_urls else None

    def to_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "kind": self.kind.value,
            "status": self.status,
            "progress": self.progress,
            "prompt": self.prompt,
            "seed": self.seed,
            "duration": self.duration,
            "image_urls": list(self.image_urls),
            "details": self.details,
            "moderation_reasons": list(self.moderation_reasons),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskState:
        return cls(
            task_id=str(data["task_id"]),
            kind=StatusKind(data["kind"]),
            status=str(data["status"]),
            progress=data.get("progress"),
            prompt=data.get("prompt"),
            seed=data.get("seed"),
            duration=data.get("duration"),
            image_urls=tuple(data.get("image_urls") or ()),
            details=data.get("details"),
            moderation_reasons=tuple(data.get("moderation_reasons") or ()),
        )


TASK_ID_MAX = 128
_TASK_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


class InvalidTaskId(ValueError):
    """The id cannot be a task id; ``str()`` tells the person what is wrong with it."""


def validate_task_id(raw: str) -> str:
    """Trim and check a task id before anything is sent anywhere."""
    task_id = raw.strip()
    if not task_id:
        raise InvalidTaskId("The task id is empty. Paste the id CometAPI gave you when you started the task.")
    if len(task_id) > TASK_ID_MAX:
        raise InvalidTaskId(f"That is {len(task_id)} characters long; a task id has at most {TASK_ID_MAX}.")
    bad = sorted({c for c in task_id if c not in _TASK_ID_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise InvalidTaskId(
            f"A task id holds only letters, digits and . _ : - but this one has {shown}. "
            "Check that you pasted the id alone."
        )
    return task_id


class CometAPIError(Exception):
    """Base of every error the API client raises. ``str()`` is safe to log: no key, no full URL."""

    #: whether asking again later may give a different answer
    retryable: bool = False


class AuthError(CometAPIError):
    """The API key was refused (401/403): only the bot's admin can fix it."""


class PaymentRequired(CometAPIError):
    """The account behind the key is out of credits (402 or an insufficient-quota error)."""


class RequestRejected(CometAPIError):
    """Another 4xx: the API will not answer this request however often it is asked."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(CometAPIError):
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TransientError(CometAPIError):
    """Timeouts, connection errors and 5xx: worth another try after a pause."""

    retryable = True


class BadResponse(CometAPIError):
    """A body that is not a task: HTML, truncated JSON, no status, an error envelope on 200."""

    retryable = True


def _text(value: object, limit: int = _MAX_TEXT) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = str(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError, RecursionError):
            return None
    text = text.strip()
    return text[:limit] if text else None


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str) and len(value) <= 64:
            number = float(value.strip().rstrip("%"))
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _progress(value: object) -> float | None:
    number = _number(value)
    if number is None or number < 0:
        return None
    # BFL reports 0..1, some relays 0..100; 1.0 itself is ambiguous and means "done" either way.
    if number > 1:
        number /= 100
    return min(number, 1.0)


_SEED_TEXT = re.compile(r"-?[0-9]{1,40}")


def _seed(value: object) -> int | None:
    # Seeds are 64-bit at most; anything longer is not a seed, and huge ints are costly to print.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if abs(value) < 10**40 else None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e40:
        return int(value)
    if isinstance(value, str) and _SEED_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _urls(value: object) -> tuple[str, ...]:
    candidates: list[object]
    if isinstance(value, list | tuple):
        candidates = list(value)
    elif isinstance(value, Mapping):
        candidates = [value.get("sample"), value.get("url"), value.get("image")]
    else:
        candidates = [value]
    urls = []
    for item in candidates:
        if isinstance(item, str) and item.strip().lower().startswith(("http://", "https://")):
            urls.append(item.strip()[:4096])
    return tuple(urls[:10])


def _reasons(details: object) -> tuple[str, ...]:
    if not isinstance(details, Mapping):
        return ()
    raw = None
    for key, value in details.items():
        if isinstance(key, str) and key.replace("_", " ").lower() == "moderation reasons":
            raw = value
            break
    if raw is None:
        return ()
    items = raw if isinstance(raw, list | tuple) else [raw]
    reasons = [r for r in (_text(item, 200) for item in items) if r]
    return tuple(reasons[:10])


def _error_envelope(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(message, code-ish text)`` when the body is an error envelope rather than a task."""
    error = body.get("error")
    if error is None or "status" in body:
        return None
    if isinstance(error, Mapping):
        message = _text(error.get("message"), 300) or "unknown error"
        code = " ".join(t for t in (_text(error.get("type"), 80), _text(error.get("code"), 80)) if t)
        return message, code
    return _text(error, 300) or "unknown error", ""


def parse_task_body(body: object, task_id: str) -> TaskState:
    """Reduce an already-decoded JSON body to a state, or raise :class:`BadResponse`."""
    if not isinstance(body, Mapping):
        raise BadResponse(f"expected a JSON object, got {type(body).__name__}")
    envelope = _error_envelope(body)
    if envelope is not None:
        message, code = envelope
        raise BadResponse(f"error body: {message}" + (f" ({code})" if code else ""))
    status = _text(body.get("status"), 100)
    if status is None:
        raise BadResponse("no status in the answer")
    kind = _KINDS.get(status.lower(), StatusKind.PENDING)

    result = body.get("result")
    result_map: Mapping[str, Any] = result if isinstance(result, Mapping) else {}
    urls = _urls(result_map.get("sample")) if result_map else ()
    if not urls:
        urls = _urls(body.get("output"))
    if not urls and isinstance(result, str | list):
        urls = _urls(result)

    details_raw = body.get("details")
    details = None
    if kind in (StatusKind.FAILED, StatusKind.MODERATED, StatusKind.CANCELED):
        details = _text(body.get("error"), 500) or _text(result if isinstance(result, str) else None, 500)
        if details is None and details_raw is not None:
            details = _text(details_raw, 500)

    duration = _number(result_map.get("duration"))
    if duration is None:
        start, end = _number(result_map.get("start_time")), _number(result_map.get("end_time"))
        if start is not None and end is not None and end >= start:
            duration = end - start
    if duration is None and isinstance(body.get("metrics"), Mapping):
        duration = _number(body["metrics"].get("predict_time"))

    prompt = _text(result_map.get("prompt"))
    if prompt is None and isinstance(body.get("input"), Mapping):
        prompt = _text(body["input"].get("prompt"))

    progress = _progress(body.get("progress"))
    if progress is None and result_map:
        progress = _progress(result_map.get("progress"))

    return TaskState(
        task_id=task_id,
        kind=kind,
        status=status,
        progress=progress,
        prompt=prompt,
        seed=_seed(result_map.get("seed")),
        duration=duration,
        image_urls=urls,
        details=details,
        moderation_reasons=_reasons(details_raw),
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    seconds = _number(value)
    if seconds is None:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, min(seconds, 3600.0))


@dataclass(slots=True)
class _Stats:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class CometAPIClient:
    """``GET {base}/flux/v1/get_result?id=...`` over a session someone else owns."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: Secret,
        *,
        timeout: float = 20.0,
        max_body: int = 1024 * 1024,
    ) -> None:
        self._session = session
        self._url = URL(base_url.rstrip("/") + "/flux/v1/get_result")
        self._key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._max_body = max_body
        self.stats = _Stats()

    @property
    def host(self) -> str:
        return self._url.host or ""

    async def get_result(self, task_id: str) -> TaskState:
        self.stats.requests += 1
        try:
            return await self._get_result(task_id)
        except CometAPIError as exc:
            name = type(exc).__name__
            self.stats.errors[name] = self.stats.errors.get(name, 0) + 1
            key = self._key.get()
            if key and any(key in str(arg) for arg in exc.args):
                # A server that echoes the key back in its error text must not get it into a log or a message.
                exc.args = tuple(str(arg).replace(key, Secret.MASK) for arg in exc.args)
            raise

    async def _get_result(self, task_id: str) -> TaskState:
        headers = {"Authorization": f"Bearer {self._key.get()}", "Accept": "application/json"}
        try:
            async with self._session.get(
                self._url, params={"id": task_id}, headers=headers, timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                raw = await self._read_capped(response)
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                content_type = response.headers.get("Content-Type", "")
        except TimeoutError as exc:
            raise TransientError("the API did not answer in time") from exc
        except aiohttp.ClientError as exc:
            # The exception text may carry the URL; keep only its class to stay clear of secrets.
            raise TransientError(f"could not reach the API ({type(exc).__name__})") from exc

        body = _decode(raw)
        if status == 429:
            raise RateLimited("the API is rate limiting the bot", retry_after=retry_after)
        if status in (401, 403):
            raise AuthError(_describe(status, body, "the API refused the key"))
        if status == 402:
            raise PaymentRequired(_describe(status, body, "the API account is out of credits"))
        if status >= 500 or status == 408:
            raise TransientError(_describe(status, body, "the API had a server error"))
        if 300 <= status < 400:
            raise BadResponse(f"HTTP {status}: the API answered with a redirect; is COMETAPI_BASE_URL right?")

        if isinstance(body, Mapping):
            envelope = _error_envelope(body)
            if envelope is not None and _looks_like_credits(envelope):
                raise PaymentRequired(f"the API account is out of credits: {envelope[0]}")
            if envelope is not None and _looks_like_auth(envelope):
                raise AuthError(f"the API refused the key: {envelope[0]}")
        if status >= 400:
            # Some relays say "Task not found" with a 404; honour a real status in the body first.
            if isinstance(body, Mapping) and "status" in body:
                try:
                    return parse_task_body(body, task_id)
                except BadResponse:
                    pass
            if body is _NOT_JSON:
                raise BadResponse(
                    f"HTTP {status} with a non-JSON body ({content_type.split(';')[0] or 'no type'});"
                    " is COMETAPI_BASE_URL right?"
                )
            raise RequestRejected(_describe(status, body, "the API rejected the request"), status=status)
        if body is _NOT_JSON:
            raise BadResponse(f"the answer was not JSON ({content_type.split(';')[0] or 'no type'})")
        return parse_task_body(body, task_id)

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        # Content-Length counts the encoded bytes; aiohttp hands out decoded ones, so only a plain body fits.
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if declared is not None and declared <= self._max_body and encoding in ("", "identity"):
            # The common case (a small body with a Content-Length): one read, no per-chunk iteration.
            body = await response.content.read(declared)
            if len(body) == declared:
                return body
            rest = await self._read_chunks(response, len(body))
            return body + rest
        return await self._read_chunks(response, 0)

    async def _read_chunks(self, response: aiohttp.ClientResponse, size: int) -> bytes:
        chunks: list[bytes] = []
        async for chunk in response.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self._max_body:
                raise BadResponse(f"the answer was larger than {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


class _NotJSON:
    pass


_NOT_JSON: Any = _NotJSON()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8", errors="strict"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _NOT_JSON


def _describe(status: int, body: object, fallback: str) -> str:
    if isinstance(body, Mapping):
        envelope = _error_envelope(body)
        if envelope is not None:
            return f"HTTP {status}: {envelope[0]}"
        message = _text(body.get("message") or body.get("detail"), 300)
        if message:
            return f"HTTP {status}: {message}"
    return f"HTTP {status}: {fallback}"


def _looks_like_credits(envelope: tuple[str, str]) -> bool:
    text = " ".join(envelope).lower()
    return any(word in text for word in ("insufficient_quota", "insufficient quota", "quota exceeded",
                                          "insufficient balance", "insufficient_user_quota", "credit"))


def _looks_like_auth(envelope: tuple[str, str]) -> bool:
    text = " ".join(envelope).lower()
    return any(word in text for word in ("invalid_api_key", "invalid api key", "unauthorized",
                                          "invalid token", "无效的令牌"))

