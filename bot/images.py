"""Download, validate and shrink generated images.

The image URL comes from an untrusted API response, so every step here assumes a
hostile peer: the URL may point at internal services (SSRF), the body may be huge or
lie about its size, and the bytes may be a decompression bomb rather than an image.

Nothing in this module depends on discord; callers turn ``ImageError`` into user
messages (``str(error)`` is always safe to show).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import math
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_middlewares import ClientHandlerType
from aiohttp.resolver import DefaultResolver
from PIL import Image, ImageOps
from yarl import URL

__all__ = [
    "ForbiddenAddress",
    "GuardedResolver",
    "ImageBomb",
    "ImageError",
    "ImageExpired",
    "ImageFetcher",
    "ImageFile",
    "ImageTooLarge",
    "ImageUnavailable",
    "NotAnImage",
    "fit_under",
    "fit_under_async",
    "is_forbidden_ip",
    "sniff",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --------------------------------------------------------------------------- errors


class ImageError(Exception):
    """Base class; ``str(e)`` is a short explanation that is safe to show users."""


class ImageExpired(ImageError):
    """The image host answered 403/404/410: the time-limited link has expired."""


class ImageUnavailable(ImageError):
    """Network error, timeout, 5xx, bad redirect chain or unsupported URL."""


class ForbiddenAddress(ImageError, OSError):
    """The URL, a redirect or the connected peer is a non-public address.

    It is also an ``OSError`` on purpose: raised from ``GuardedResolver.resolve``,
    aiohttp wraps it in ``ClientConnectorDNSError`` like any other lookup failure, so
    other users of a shared session see an ordinary ``aiohttp.ClientError``.
    """


class ImageTooLarge(ImageError):
    """The body is larger than the allowed number of bytes (``limit``)."""

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class NotAnImage(ImageError):
    """The bytes are not a decodable PNG, JPEG, WebP or GIF image."""


class ImageBomb(NotAnImage):
    """The header claims more pixels than allowed (decompression bomb)."""


# ----------------------------------------------------------------------- image file

_FORMATS: Final[dict[str, str]] = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}
_PIL_FORMATS: Final[list[str]] = list(_FORMATS)
_STEM_BAD = re.compile(r"[^A-Za-z0-9._-]+")
_STEM_MAX = 64


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A validated image: raw bytes plus what ``sniff`` learned from them."""

    data: bytes
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        """File extension without the dot ("jpg" for JPEG)."""
        return "jpg" if self.format == "jpeg" else self.format

    @property
    def content_type(self) -> str:
        """MIME type, e.g. ``image/png``."""
        return f"image/{self.format}"

    def filename(self, stem: str) -> str:
        """``stem`` sanitised to ``[A-Za-z0-9._-]`` (max 64 chars) plus the extension."""
        # Leading dots would make hidden files or "..", trailing ones double the dot.
        clean = _STEM_BAD.sub("_", stem).strip(".")[:_STEM_MAX].rstrip(".")
        return f"{clean or 'image'}.{self.extension}"

    def __repr__(self) -> str:
        return f"ImageFile({self.format} {self.width}x{self.height}, {len(self.data)} bytes)"


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise NotAnImage("the image has no pixels")
    if width * height > max_pixels:
        raise ImageBomb(f"the image is too big ({width}x{height} pixels)")


def sniff(data: bytes, *, max_pixels: int = 64_000_000) -> ImageFile:
    """Identify ``data`` by content and make sure it decodes.

    Only PNG, JPEG, WebP and GIF are accepted. The pixel count is checked from the
    header before any pixel is decoded, so bombs cost almost nothing. Raises
    ``ImageBomb`` for too many pixels and ``NotAnImage`` for anything else wrong.
    CPU-bound: run large inputs in a thread.
    """
    if not data:
        raise NotAnImage("the file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            pil_format = im.format or ""
            width, height = im.size
            _check_pixels(width, height, max_pixels)
            im.verify()
        # verify() does not notice a truncated JPEG or GIF, so decode once for real.
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            if pil_format == "JPEG":
                # DCT scaling still reads every byte (truncation is detected) while
                # allocating 1/64 of the memory.
                im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageBomb("the image is too big (decompression bomb)") from exc
    except Exception as exc:
        # Pillow reports hostile input through a wide range of exception types
        # (OSError, SyntaxError, ValueError, struct.error, EOFError, ...).
        raise NotAnImage("the file is not a valid PNG, JPEG, WebP or GIF image") from exc
    fmt = _FORMATS.get(pil_format)
    if fmt is None:  # pragma: no cover - formats= already restricts the plugins
        raise NotAnImage("unsupported image format")
    return ImageFile(data=data, format=fmt, width=width, height=height)


# ---------------------------------------------------------------- address policy

_V4_EXTRA_FORBIDDEN: Final = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",  # IETF protocol assignments (some members are "global" on newer Pythons)
        "192.88.99.0/24",  # deprecated 6to4 relay anycast
        "224.0.0.0/4",  # multicast; ipaddress calls parts of it global
        "240.0.0.0/4",
    )
)
_V6_GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")
_V6_EXTRA_FORBIDDEN: Final = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "2001::/23",  # IETF protocol assignments incl. Teredo
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637), unknown to older Pythons
    )
)
_V6_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_V6_V4_TRANSLATED: Final = ipaddress.IPv6Network("::ffff:0:0:0/96")
_V6_V4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a v6 address is a wrapper for, if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _V6_NAT64 or ip in _V6_V4_TRANSLATED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_forbidden_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True unless ``ip`` is a public unicast address.

    Loopback, private, link-local, shared (100.64/10), reserved, multicast,
    unspecified and documentation ranges are forbidden, and so are IPv6 addresses
    that wrap a forbidden IPv4 address (mapped, translated, 6to4, NAT64).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return True  # only link-local/site-local addresses carry a zone
        inner = _embedded_v4(ip)
        if inner is not None:
            return is_forbidden_ip(inner)
        if ip in _V6_V4_COMPATIBLE:  # deprecated ::a.b.c.d, plus :: and ::1
            return True
        # Everything that is really routed on the internet lives in 2000::/3;
        # judging by that avoids depending on the Python version's special lists.
        if ip not in _V6_GLOBAL_UNICAST or any(ip in net for net in _V6_EXTRA_FORBIDDEN):
            return True
    elif any(ip in net for net in _V4_EXTRA_FORBIDDEN):
        return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9a-fA-F]*)")


def _host_ip(host: str) -> IPAddress | None:
    """The address a URL host denotes literally, or None for a host name.

    Besides the canonical forms this understands the legacy IPv4 spellings
    ("127.1", "0x7f.0.0.1", "2130706433") that resolvers still map onto addresses.
    Raises ImageUnavailable for numeric hosts that are not valid addresses.
    """
    bare = host.strip("[]")
    ip = _parse_ip(bare.replace("%25", "%"))
    if ip is not None:
        return ip
    trimmed = bare.rstrip(".")
    # Per the WHATWG URL rules a numeric last label makes the whole host an IPv4 address.
    if trimmed and _NUMERIC_LABEL.fullmatch(trimmed.rsplit(".", 1)[-1]):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(trimmed))
        except OSError:
            raise ImageUnavailable(f"the image URL has an invalid host ({host})") from None
    return None


def _normalize_host(host: str) -> str:
    host = host.strip().strip("[]").rstrip(".").lower()
    ip = _parse_ip(host)
    return str(ip) if ip is not None else host


def _peer_ip(peer: object) -> IPAddress | None:
    if isinstance(peer, tuple) and len(peer) >= 2 and isinstance(peer[0], str):
        return _parse_ip(peer[0])
    return None


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses host names resolving to non-public addresses.

    Install it on the connector of the session given to ``ImageFetcher``:
    ``aiohttp.TCPConnector(resolver=GuardedResolver(trusted_hosts={"api.example"}))``.
    Forbidden addresses are dropped from the answer; if none is left,
    ``ForbiddenAddress`` is raised (aiohttp surfaces it as ``ClientConnectorDNSError``
    with the original as ``os_error``). Hosts in ``trusted_hosts`` and everything when
    ``allow_private`` is set pass unfiltered. The connector does not close resolvers
    it did not create, so the owner should ``await resolver.close()``.
    """

    def __init__(
        self,
        *,
        trusted_hosts: Iterable[str] = (),
        allow_private: bool = False,
        inner: AbstractResolver | None = None,
    ) -> None:
        self._trusted = frozenset(_normalize_host(h) for h in trusted_hosts)
        self._allow_private = allow_private
        # Created lazily: the default resolvers need a running event loop.
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve with the inner resolver and drop forbidden addresses."""
        if self._inner is None:
            self._inner = DefaultResolver()
        results = await self._inner.resolve(host, port, family)
        if self._allow_private or _normalize_host(host) in self._trusted:
            return results
        allowed: list[ResolveResult] = []
        for result in results:
            ip = _parse_ip(result["host"])
            if ip is not None and not is_forbidden_ip(ip):
                allowed.append(result)
        if not allowed:
            log.warning(
                "refused host %s: resolves only to non-public addresses %s",
                host,
                [r["host"] for r in results],
            )
            raise ForbiddenAddress(f"the image host {host} is not a public address")
        return allowed

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


# ------------------------------------------------------------------------- fetching

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_EXPIRED: Final = frozenset({403, 404, 410})
_CHUNK: Final = 64 * 1024
_THREAD_SNIFF_BYTES: Final = 256 * 1024
_ACCEPT: Final = "image/png,image/jpeg,image/webp,image/gif;q=0.9,*/*;q=0.1"


async def _strip_credentials(request: aiohttp.ClientRequest, handler: ClientHandlerType) -> aiohttp.ClientResponse:
    # The session may be shared with the API client; its default auth, headers,
    # netrc credentials or cookies must never reach the image host.
    request.headers.popall(hdrs.AUTHORIZATION, None)
    request.headers.popall(hdrs.COOKIE, None)
    return await handler(request)


def _format_size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.3g} MiB"
    return f"{size / 1024:.3g} KiB"


def _find_forbidden(exc: BaseException) -> ForbiddenAddress | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ForbiddenAddress):
            return current
        seen.add(id(current))
        os_error = getattr(current, "os_error", None)
        if isinstance(os_error, ForbiddenAddress):
            return os_error
        current = current.__cause__ or current.__context__
    return None


class ImageFetcher:
    """Downloads an image from an untrusted URL and validates it.

    Redirects are followed by hand so every hop is checked: http(s) only, no
    credentials in the URL, no literal non-public address, and after connecting the
    peer address itself must be public. Host names are vetted before connecting by a
    ``GuardedResolver`` that the session owner installs on the connector. Hosts in
    ``trusted_hosts`` (matched case-insensitively) and everything with
    ``allow_private`` skip the address checks.

    The session is used with explicit headers and a middleware that removes
    ``Authorization``/``Cookie``, so it may be shared with the API client.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        max_bytes: int = 50 * 1024 * 1024,
        max_pixels: int = 64_000_000,
        allow_private: bool = False,
        trusted_hosts: Iterable[str] = (),
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_redirects: int = 5,
        user_agent: str = "fluxbot",
    ) -> None:
        if max_bytes <= 0 or max_pixels <= 0 or max_redirects < 0:
            raise ValueError("max_bytes and max_pixels must be positive, max_redirects >= 0")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._session = session
        self._max_bytes = max_bytes
        self._max_pixels = max_pixels
        self._allow_private = allow_private
        self._trusted = frozenset(_normalize_host(h) for h in trusted_hosts)
        self._timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(
            total=timeout, connect=connect_timeout, sock_connect=connect_timeout
        )
        self._max_redirects = max_redirects
        self._headers = {
            hdrs.USER_AGENT: user_agent,
            hdrs.ACCEPT: _ACCEPT,
            # Images are already compressed; this also keeps gzip bombs out.
            hdrs.ACCEPT_ENCODING: "identity",
        }

    async def fetch(self, url: str) -> ImageFile:
        """Download ``url`` and return the validated image.

        Raises ``ImageExpired``, ``ImageUnavailable``, ``ForbiddenAddress``,
        ``ImageTooLarge``, ``NotAnImage`` or ``ImageBomb``.
        """
        if not isinstance(url, str):  # straight from untrusted JSON
            raise ImageUnavailable("the image URL is not valid")
        target = self._parse(url)
        host = target.raw_host or "?"
        log.debug("fetching image from %s", host)
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._download(target)
        except TimeoutError:
            raise ImageUnavailable(f"timed out downloading the image from {host}") from None
        if len(data) > _THREAD_SNIFF_BYTES:
            return await asyncio.to_thread(sniff, data, max_pixels=self._max_pixels)
        return sniff(data, max_pixels=self._max_pixels)

    @staticmethod
    def _parse(url: str) -> URL:
        try:
            parsed = URL(url.strip())
        except (ValueError, TypeError):
            raise ImageUnavailable("the image URL is not valid") from None
        return parsed.with_fragment(None) if parsed.fragment else parsed

    def _is_trusted(self, host: str) -> bool:
        return self._allow_private or _normalize_host(host) in self._trusted

    def _check_url(self, url: URL) -> str:
        """Validate one hop before any connection is made; returns its host."""
        scheme = url.scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageUnavailable(f"unsupported image URL scheme {scheme or '(none)'!r}")
        host = url.raw_host
        if not host:
            raise ImageUnavailable("the image URL has no host")
        if url.raw_user is not None or url.raw_password is not None:
            # aiohttp would turn user:password@ into an Authorization header.
            raise ImageUnavailable("image URLs with credentials are not allowed")
        if self._is_trusted(host):
            return host
        ip = _host_ip(host)
        if ip is not None and is_forbidden_ip(ip):
            log.warning("refused image URL with non-public address host %s", host)
            raise ForbiddenAddress(f"the image host {host} is not a public address")
        return host

    def _check_peer(self, response: aiohttp.ClientResponse, host: str) -> None:
        """Make sure the connection really went to a public address."""
        if self._is_trusted(host):
            return
        peer: object = None
        connection = response.connection
        transport = connection.transport if connection is not None else None
        if transport is None:
            # Small bodies arrive together with the headers and aiohttp releases the
            # connection before we see the response; its protocol still knows the
            # transport unless the server closed the connection.
            protocol: Any = getattr(response, "_protocol", None)
            transport = getattr(protocol, "transport", None)
        if transport is not None:
            peer = transport.get_extra_info("peername")
        ip = _peer_ip(peer)
        if ip is None:
            if 200 <= response.status < 300:
                # The body would be used, so an unverifiable peer counts as forbidden.
                log.warning("could not verify the peer address of image host %s", host)
                raise ForbiddenAddress(f"could not verify the address of the image host {host}")
            return
        if is_forbidden_ip(ip):
            log.warning("image host %s connected to non-public address %s", host, ip)
            raise ForbiddenAddress(f"the image host {host} is not a public address")

    async def _download(self, url: URL) -> bytes:
        visited: set[str] = set()
        for _hop in range(self._max_redirects + 1):
            host = self._check_url(url)
            visited.add(str(url))
            try:
                location = await self._request(url, host)
            except ImageError:
                raise
            except TimeoutError:
                raise ImageUnavailable(f"timed out downloading the image from {host}") from None
            except (aiohttp.ClientError, OSError) as exc:
                forbidden = _find_forbidden(exc)
                if forbidden is not None:
                    raise ForbiddenAddress(str(forbidden)) from exc
                log.info("image download from %s failed: %s", host, type(exc).__name__)
                raise ImageUnavailable(f"could not download the image from {host}") from exc
            if isinstance(location, bytes):
                return location
            if str(location) in visited:
                raise ImageUnavailable(f"the image host {host} redirects in a loop")
            log.debug("redirect from %s to %s", host, location.raw_host)
            url = location
        raise ImageUnavailable(f"too many redirects (more than {self._max_redirects})")

    async def _request(self, url: URL, host: str) -> bytes | URL:
        """One hop: the body for a 2xx, the next URL for a redirect."""
        async with self._session.get(
            url,
            headers=self._headers,
            allow_redirects=False,
            auto_decompress=False,
            timeout=self._client_timeout,
            middlewares=(_strip_credentials,),
        ) as response:
            self._check_peer(response, host)
            status = response.status
            if status in _REDIRECTS:
                response.close()
                return self._redirect_target(url, response.headers.get(hdrs.LOCATION), host)
            if status in _EXPIRED:
                response.close()
                raise ImageExpired(f"the image link has expired (HTTP {status})")
            if not 200 <= status < 300:
                response.close()
                raise ImageUnavailable(f"the image host {host} answered HTTP {status}")
            return await self._read_capped(response)

    @staticmethod
    def _redirect_target(url: URL, location: str | None, host: str) -> URL:
        if not location:
            raise ImageUnavailable(f"the image host {host} sent a redirect without a target")
        try:
            target = url.join(URL(location))
        except (ValueError, TypeError):
            raise ImageUnavailable(f"the image host {host} sent an invalid redirect") from None
        return target.with_fragment(None) if target.fragment else target

    async def _read_capped(self, response: aiohttp.ClientResponse) -> bytes:
        limit = self._max_bytes
        too_large = f"the image is larger than {_format_size(limit)}"
        declared = response.content_length
        if declared is not None and declared > limit:
            response.close()
            raise ImageTooLarge(too_large, limit=limit)
        # Content-Length may be absent or wrong, so count what actually arrives.
        body = bytearray()
        async for chunk in response.content.iter_chunked(_CHUNK):
            if len(body) + len(chunk) > limit:
                response.close()
                raise ImageTooLarge(too_large, limit=limit)
            body += chunk
        return bytes(body)


# -------------------------------------------------------------------------- fitting

_QUALITIES: Final = (90, 80, 70, 60)
_TARGET_QUALITY: Final = 80
_PROBE_PIXELS: Final = 300_000
_PROBE_TILE: Final = 128
_PROBE_GRID: Final = 4
_MAX_SIDE: Final[dict[str, int]] = {"jpeg": 65_500, "webp": 16_383}
_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _prepare(image: ImageFile) -> tuple[Image.Image, str]:
    """Decode once and pick the output format (JPEG, or WebP to keep alpha)."""
    with Image.open(io.BytesIO(image.data), formats=_PIL_FORMATS) as src:
        src.load()
        # EXIF is not carried over, so bake the orientation into the pixels.
        im = ImageOps.exif_transpose(src)
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit/float greyscale: scale into 8 bits instead of clipping to white.
        im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        im = im.convert("RGBA")
        has_alpha = im.getchannel("A").getextrema() != (255, 255)
    if has_alpha:
        return im, "webp"
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return im, ("webp" if image.format == "webp" else "jpeg")


def _encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    else:
        im.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def _probe(im: Image.Image) -> Image.Image:
    """A mosaic of full-resolution tiles from across the image.

    Tiles keep the pixel-level statistics that decide how well a lossy codec does;
    a downscaled thumbnail would average noise away and look far more compressible.
    """
    width, height = im.size
    if width * height <= _PROBE_PIXELS:
        return im
    tile_w, tile_h = min(_PROBE_TILE, width), min(_PROBE_TILE, height)
    grid = _PROBE_GRID
    mosaic = Image.new(im.mode, (tile_w * grid, tile_h * grid))
    for col in range(grid):
        # Multiples of 16 keep tiles on JPEG/WebP macroblock boundaries.
        x = (width - tile_w) * col // (grid - 1) // 16 * 16
        for row in range(grid):
            y = (height - tile_h) * row // (grid - 1) // 16 * 16
            mosaic.paste(im.crop((x, y, x + tile_w, y + tile_h)), (col * tile_w, row * tile_h))
    return mosaic


def _quality_curve(im: Image.Image, fmt: str) -> dict[int, float]:
    """Size at each quality relative to the first one, measured on a probe.

    How much a lower quality saves depends on the content (a smooth render halves,
    noise barely shrinks), and guessing wrong costs full-size encodes.
    """
    probe = _probe(im)
    sizes = [max(1, len(_encode(probe, fmt, q))) for q in _QUALITIES]
    curve: dict[int, float] = {}
    ratio = 1.0
    for quality, size in zip(_QUALITIES, sizes, strict=True):
        ratio = min(ratio, size / sizes[0])  # a lower quality is never assumed to grow
        curve[quality] = ratio
    return curve


def _dims(width: int, height: int, scale: float) -> tuple[int, int]:
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_under(image: ImageFile, limit: int, *, min_side: int = 256) -> ImageFile | None:
    """Return ``image`` or a re-encoded copy whose size is at most ``limit`` bytes.

    Tries JPEG/WebP quality steps (90, 80, 70, 60) first - a PNG with transparency
    becomes WebP so the alpha survives, one without becomes JPEG - then Lanczos
    downscaling with the same steps, keeping the aspect ratio. Encodes that are
    predicted to miss are skipped and the scale is computed from the measured bytes
    per pixel, so typically only one to three full encodes happen. Returns None when
    even an image whose longest side is ``min_side`` does not fit. Animated images
    keep only their first frame. CPU-bound and synchronous.
    """
    if len(image.data) <= limit:
        return image
    if limit <= 0:
        return None
    im, fmt = _prepare(image)
    width, height = im.size
    longest = max(width, height)
    scale = min(1.0, _MAX_SIDE[fmt] / longest)
    # Smallest scale allowed; a source already below min_side is tried at its own size.
    floor = min(1.0, min_side / longest)
    curve: dict[int, float] | None = None  # measured only once the first encode misses
    bytes_per_pixel_top = 0.0  # estimated size per pixel at the top quality

    while True:
        size = _dims(width, height, scale)
        frame = im if size == im.size else im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        pixels = size[0] * size[1]
        last_try = scale <= floor
        for quality in _QUALITIES:
            if curve is not None:
                forced = last_try and quality == _QUALITIES[-1]
                if not forced and bytes_per_pixel_top * curve[quality] * pixels > limit:
                    continue
            data = _encode(frame, fmt, quality)
            if len(data) <= limit:
                log.debug("fitted %r into %d bytes as %s q%d %dx%d", image, len(data), fmt, quality, *size)
                return ImageFile(data=data, format=fmt, width=size[0], height=size[1])
            if curve is None:
                curve = _quality_curve(im, fmt)
            # Every miss recalibrates; bytes per pixel rise as the image shrinks.
            bytes_per_pixel_top = len(data) / (pixels * curve[quality])
        if last_try or curve is None:
            return None
        # Size the next attempt for the target quality with some headroom, and shrink
        # at least a little so the loop always makes progress.
        wanted = limit * 0.95 / (bytes_per_pixel_top * curve[_TARGET_QUALITY])
        scale = max(scale * min(0.9, math.sqrt(wanted / pixels)), floor)


async def fit_under_async(image: ImageFile, limit: int, *, min_side: int = 256) -> ImageFile | None:
    """``fit_under`` in a worker thread, keeping the event loop responsive."""
    return await asyncio.to_thread(fit_under, image, limit, min_side=min_side)
