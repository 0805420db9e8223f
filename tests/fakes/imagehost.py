"""Small HTTP servers standing in for an image CDN in tests.

Both listen on 127.0.0.1 only. ``ImageHost`` is a real aiohttp application with
per-path canned behaviour; ``RawHost`` writes a fixed byte string as the response,
for misbehaviour aiohttp's server refuses to produce (lying Content-Length,
close-delimited bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """What the fake host received."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]


class ImageHost:
    """aiohttp server on 127.0.0.1 whose routes are configured by the test."""

    def __init__(self) -> None:
        self._routes: dict[str, Handler] = {}
        self.requests: list[SeenRequest] = []
        # Lets stalled handlers finish at shutdown instead of holding cleanup up.
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        self._port: int | None = None

    async def __aenter__(self) -> ImageHost:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, 0)
        await site.start()
        address = self._runner.addresses[0]
        self._port = int(address[1])

    async def close(self) -> None:
        self._release.set()
        await self._runner.cleanup()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ImageHost is not started")
        return self._port

    def url(self, path: str, *, host: str = HOST) -> str:
        """Absolute URL of ``path`` on this server (``host`` may be e.g. "localhost")."""
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    def serve_bytes(
        self,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "application/octet-stream",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(body=body, status=status, content_type=content_type, headers=headers)

        self.route(path, handler)

    def serve_status(self, path: str, status: int) -> None:
        self.serve_bytes(path, f"status {status}".encode(), status=status, content_type="text/plain")

    def redirect(self, path: str, location: str, *, status: int = 302) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, headers={"Location": location})

        self.route(path, handler)

    def serve_chunked(self, path: str, total: int, *, chunk: int = 64 * 1024) -> None:
        """``total`` bytes with chunked encoding, i.e. without Content-Length."""

        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < total:
                    part = min(chunk, total - sent)
                    await response.write(b"\0" * part)
                    sent += part
                await response.write_eof()
            return response

        self.route(path, handler)

    def stall(self, path: str, seconds: float) -> None:
        """Answer only after ``seconds`` (or when the server shuts down)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), seconds)
            return web.Response(body=b"too late")

        self.route(path, handler)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(SeenRequest(request.method, request.path, CIMultiDictProxy(CIMultiDict(request.headers))))
        handler = self._routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request)


class RawHost:
    """Answers every connection with the same raw bytes, then closes it."""

    def __init__(self, response: bytes, *, chunk: int = 64 * 1024) -> None:
        self._response = response
        self._chunk = chunk
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.connections = 0

    async def __aenter__(self) -> RawHost:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.close()
        # Abort instead of cancelling: on Python 3.11 a cancelled connection handler
        # makes asyncio's stream callback log a spurious error.
        for writer in self._clients.values():
            writer.transport.abort()
        if self._clients:
            await asyncio.wait(list(self._clients), timeout=5)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("RawHost is not started")
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, path: str = "/") -> str:
        return f"http://{HOST}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        task.add_done_callback(lambda t: self._clients.pop(t, None))
        # The client may hang up early (that is what the tests provoke).
        with contextlib.suppress(ConnectionError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            for start in range(0, len(self._response), self._chunk):
                writer.write(self._response[start : start + self._chunk])
                await asyncio.wait_for(writer.drain(), 5)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
