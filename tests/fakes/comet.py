"""A local stand-in for CometAPI's ``GET /flux/v1/get_result`` and for the hosts that serve the images.

One aiohttp app on ``127.0.0.1`` (a free port). Each task id gets a *script*: the answers to its
polls, in order, the last one repeating forever. Unknown ids answer ``{"status": "Task not found"}``,
like the real API does for expired tasks. Images are served from ``/images/{name}``.

Used by the unit tests, by the end-to-end tests and by benchmarks with thousands of concurrent
tasks, so the request handlers do little: a dict lookup, a counter, one small ``json.dumps``.

    async with FakeCometAPI() as fake:
        url = fake.add_image("kite.png", png_bytes)
        fake.script("t1", Answer.pending(0.2), Answer.pending(0.7), Answer.ready(url))
        ...  # point CometAPIClient at fake.base_url with the key "test-key"
        assert fake.polls["t1"] == 3
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web

__all__ = ["DEFAULT_IMAGE", "Answer", "FakeCometAPI", "tiny_png"]

GET_RESULT_PATH = "/flux/v1/get_result"
JSON_TYPE = "application/json"


def tiny_png(width: int = 4, height: int = 4, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A valid, solid-colour RGB PNG, built by hand so the fake needs nothing beyond aiohttp."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))


#: served as ``/images/default.png`` for :meth:`FakeCometAPI.timed_task` without an image name
DEFAULT_IMAGE = tiny_png()
_DEFAULT_IMAGE_NAME = "default.png"

AnswerKind = Literal["task", "fixed", "stall", "reset"]


@dataclass(frozen=True, slots=True, eq=False)
class Answer:
    """What the fake says to one poll. Build one with the class methods, not the constructor."""

    kind: AnswerKind
    #: ``task``: the body's JSON members after ``"id"``, pre-encoded (``"status": ..., ...``)
    tail: str = ""
    #: ``fixed``: the exact body
    body: bytes = b""
    http_status: int = 200
    content_type: str = JSON_TYPE
    headers: Mapping[str, str] | None = None
    #: ``stall``: seconds to wait before answering with ``then``
    seconds: float = 0.0
    then: Answer | None = None
    #: ``fixed``: send the body with ``Transfer-Encoding: chunked`` instead of a Content-Length
    chunked: bool = False

    # -- task bodies: {"id": <the polled id>, ...fields} -------------------------------------------

    @classmethod
    def _task(cls, fields: Mapping[str, Any], *, http_status: int = 200,
              headers: Mapping[str, str] | None = None) -> Answer:
        encoded = json.dumps(dict(fields), ensure_ascii=False)
        return cls("task", tail=encoded[1:-1], http_status=http_status, headers=headers)

    @classmethod
    def pending(cls, progress: float | None = None, status: str = "Pending") -> Answer:
        fields: dict[str, Any] = {"status": status, "result": None}
        if progress is not None:
            fields["progress"] = progress
        return cls._task(fields)

    @classmethod
    def ready(cls, sample: str, *, prompt: str = "a red kite", seed: int = 42, duration: float = 7.2) -> Answer:
        start = 1_781_078_400.0
        return cls._task({
            "status": "Ready",
            "result": {"seed": seed, "prompt": prompt, "sample": sample, "duration": duration,
                       "start_time": start, "end_time": start + duration},
        })

    @classmethod
    def status(cls, name: str, **fields: Any) -> Answer:
        """Any body with this status, e.g. ``Answer.status("Content Moderated", details={...})``."""
        return cls._task({"status": name, **fields})

    # -- fixed bodies ----------------------------------------------------------------------------

    @classmethod
    def json(cls, body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Answer:
        """Exactly this JSON value (no ``id`` added)."""
        return cls("fixed", body=json.dumps(body).encode(), http_status=status, headers=headers)

    @classmethod
    def raw(cls, data: bytes, status: int = 200, content_type: str = "text/html",
            headers: Mapping[str, str] | None = None, chunked: bool = False) -> Answer:
        """Exactly these bytes: an HTML error page, truncated JSON, a huge body, a gzip-ed body (pass
        ``headers={"Content-Encoding": "gzip"}``)..."""
        return cls("fixed", body=data, http_status=status, content_type=content_type, headers=headers,
                   chunked=chunked)

    @classmethod
    def error(cls, http_status: int, message: str, type_: str = "comet_api_error", code: str | None = None,
              headers: Mapping[str, str] | None = None) -> Answer:
        """CometAPI's (OpenAI-style) error envelope: ``{"error": {"message", "type", "code"}}``."""
        body = {"error": {"message": message, "type": type_, "code": code}}
        return cls.json(body, status=http_status, headers=headers)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1") -> Answer:
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return cls.error(429, "Rate limit reached for requests", "rate_limit_error", "rate_limit_exceeded",
                         headers=headers)

    # -- misbehaviour ----------------------------------------------------------------------------

    @classmethod
    def stall(cls, seconds: float, then: Answer | None = None) -> Answer:
        """Wait ``seconds`` before answering ``then`` (default: Pending); longer than a client's timeout."""
        return cls("stall", seconds=seconds, then=then)

    @classmethod
    def reset(cls) -> Answer:
        """Drop the connection without any response.

        aiohttp retries a GET once by itself when a reused keep-alive connection drops, so one
        client call may consume two scripted answers.
        """
        return cls("reset")


@dataclass(slots=True)
class _Script:
    answers: tuple[Answer, ...]
    served: int = 0


@dataclass(slots=True)
class _Timed:
    ready_after: float
    image_name: str
    ready: Answer
    progress: bool
    first_poll: float | None = None


@dataclass(frozen=True, slots=True)
class _Image:
    data: bytes
    content_type: str
    status: int
    headers: Mapping[str, str] | None
    chunked: bool
    lie_length: int | None
    delay: float
    redirect_to: str | None


_NOT_FOUND = Answer.status("Task not found")


class FakeCometAPI:
    """The fake server; see the module docstring. Counters are public and may be cleared by tests."""

    def __init__(self, *, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.base_url = ""
        self.polls: Counter[str] = Counter()
        #: monotonic time of every get_result request, per task id (for asserting pacing)
        self.poll_times: defaultdict[str, list[float]] = defaultdict(list)
        self.image_hits: Counter[str] = Counter()
        #: ``Authorization`` headers received by the API endpoint
        self.auth_seen: list[str] = []
        #: ``Authorization`` headers received by the image endpoint (should stay empty)
        self.image_auth_seen: list[str] = []
        self.total_requests = 0
        self._expected_auth = f"Bearer {api_key}"
        self._scripts: dict[str, _Script] = {}
        self._timed: dict[str, _Timed] = {}
        self._images: dict[str, _Image] = {}
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("already started")
        app = web.Application()
        app.router.add_get(GET_RESULT_PATH, self._get_result)
        app.router.add_get("/images/{name}", self._image)
        # No access log: benchmarks make tens of thousands of requests. handler_cancellation lets a
        # stalled handler die with its client's connection instead of holding close() up.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        self._runner = runner
        port = runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"
        if _DEFAULT_IMAGE_NAME not in self._images:
            self.add_image(_DEFAULT_IMAGE_NAME, DEFAULT_IMAGE)

    async def close(self) -> None:
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- scripting -------------------------------------------------------------------------------

    def script(self, task_id: str, *answers: Answer) -> None:
        """Answers to the next polls of ``task_id``, in order; the last one repeats forever.

        Scripting an id again replaces its script: the next poll gets the new first answer.
        """
        if not answers:
            raise ValueError("a script needs at least one answer")
        self._timed.pop(task_id, None)
        self._scripts[task_id] = _Script(answers)

    def timed_task(self, task_id: str, *, ready_after: float, image_name: str | None = None,
                   prompt: str = "a red kite", seed: int = 42, progress: bool = True) -> None:
        """Pending until ``ready_after`` seconds after the first poll of ``task_id``, then Ready."""
        name = image_name or _DEFAULT_IMAGE_NAME
        if name == _DEFAULT_IMAGE_NAME and name not in self._images:
            self.add_image(name, DEFAULT_IMAGE)
        self._scripts.pop(task_id, None)
        ready = Answer.ready(self.image_url(name), prompt=prompt, seed=seed, duration=ready_after)
        self._timed[task_id] = _Timed(ready_after, name, ready, progress)

    def add_image(self, name: str, data: bytes, *, content_type: str = "image/png", status: int = 200,
                  headers: dict[str, str] | None = None, chunked: bool = False, lie_length: int | None = None,
                  delay: float = 0.0, redirect_to: str | None = None) -> str:
        """Serve ``data`` at ``/images/{name}``; return its absolute URL.

        ``lie_length`` sends that ``Content-Length`` whatever the real size (a larger claim ends with
        the connection closed early); ``redirect_to`` answers 302 to that URL, or to the image of that
        name when it is not a URL; ``delay`` waits before answering.
        """
        if "/" in name or not name:
            raise ValueError("an image name is one path segment")
        self._images[name] = _Image(data, content_type, status, dict(headers) if headers else None, chunked,
                                    lie_length, delay, redirect_to)
        return self.image_url(name)

    def image_url(self, name: str) -> str:
        if not self.base_url:
            raise RuntimeError("start the fake before asking for URLs")
        return f"{self.base_url}/images/{name}"

    # -- handlers --------------------------------------------------------------------------------

    async def _get_result(self, request: web.Request) -> web.StreamResponse:
        self.total_requests += 1
        auth = request.headers.get("Authorization")
        if auth is not None:
            self.auth_seen.append(auth)
        task_id = request.query.get("id")
        if task_id is not None:
            self.polls[task_id] += 1
            self.poll_times[task_id].append(time.monotonic())
        if auth != self._expected_auth:
            return _fixed(Answer.error(401, "Invalid token (request id: fake)", "comet_api_error",
                                       "invalid_api_key"))
        if task_id is None:
            return _fixed(Answer.error(400, "missing query parameter: id", "invalid_request_error"))

        answer = self._answer_for(task_id)
        while answer.kind == "stall":
            await self._pause(answer.seconds)
            answer = answer.then or Answer.pending()
        if answer.kind == "reset":
            transport = request.transport
            if transport is not None:
                transport.abort()
            # The lost connection cancels this handler (handler_cancellation) before it could answer.
            await self._pause(5.0)
            return web.Response(status=204)
        if answer.kind == "task":
            return _task_response(task_id, answer)
        if answer.chunked:
            response = web.StreamResponse(status=answer.http_status, headers=_headers(answer))
            response.enable_chunked_encoding()
            await response.prepare(request)
            for offset in range(0, len(answer.body), 16 * 1024):
                await response.write(answer.body[offset:offset + 16 * 1024])
            await response.write_eof()
            return response
        return _fixed(answer)

    def _answer_for(self, task_id: str) -> Answer:
        script = self._scripts.get(task_id)
        if script is not None:
            answer = script.answers[min(script.served, len(script.answers) - 1)]
            script.served += 1
            return answer
        timed = self._timed.get(task_id)
        if timed is None:
            return _NOT_FOUND
        now = time.monotonic()
        if timed.first_poll is None:
            timed.first_poll = now
        elapsed = now - timed.first_poll
        if elapsed >= timed.ready_after:
            return timed.ready
        progress = round(min(0.99, elapsed / timed.ready_after), 3) if timed.progress else None
        return Answer.pending(progress)

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await self._closing.wait()
            except TimeoutError:
                pass

    async def _image(self, request: web.Request) -> web.StreamResponse:
        self.total_requests += 1
        name = request.match_info["name"]
        self.image_hits[name] += 1
        auth = request.headers.get("Authorization")
        if auth is not None:
            self.image_auth_seen.append(auth)
        image = self._images.get(name)
        if image is None:
            return web.Response(status=404, text="no such image", content_type="text/plain")
        await self._pause(image.delay)
        if image.redirect_to is not None:
            target = image.redirect_to
            if not target.startswith(("http://", "https://")):
                target = self.image_url(target)
            return web.Response(status=302, headers={"Location": target})

        headers = {"Content-Type": image.content_type, **(image.headers or {})}
        if not image.chunked and image.lie_length is None:
            return web.Response(status=image.status, body=image.data, headers=headers)
        response = web.StreamResponse(status=image.status, headers=headers)
        if image.lie_length is not None:
            response.content_length = image.lie_length
            response.force_close()
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        step = 16 * 1024
        for offset in range(0, len(image.data), step):
            await response.write(image.data[offset:offset + step])
        if image.lie_length is not None and image.lie_length > len(image.data):
            # Promised more than we have: end the connection mid-body, as a dying server would.
            transport = request.transport
            if transport is not None:
                transport.close()
            return response
        await response.write_eof()
        return response


def _task_response(task_id: str, answer: Answer) -> web.Response:
    head = '{"id": ' + json.dumps(task_id, ensure_ascii=False)
    text = head + (", " + answer.tail if answer.tail else "") + "}"
    return web.Response(status=answer.http_status, body=text.encode(), headers=_headers(answer))


def _fixed(answer: Answer) -> web.Response:
    return web.Response(status=answer.http_status, body=answer.body, headers=_headers(answer))


def _headers(answer: Answer) -> dict[str, str]:
    headers = {"Content-Type": answer.content_type}
    if answer.headers:
        headers.update(answer.headers)
    return headers
