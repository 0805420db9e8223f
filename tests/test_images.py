"""Tests for bot.images against real aiohttp servers on 127.0.0.1 and real Pillow images."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import random
import socket
import struct
import time
import warnings
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from bot.images import (
    ForbiddenAddress,
    GuardedResolver,
    ImageBomb,
    ImageExpired,
    ImageFetcher,
    ImageFile,
    ImageTooLarge,
    ImageUnavailable,
    NotAnImage,
    fit_under,
    fit_under_async,
    is_forbidden_ip,
    sniff,
)
from tests.fakes.imagehost import ImageHost, RawHost

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------ helpers


def encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A smooth image that compresses like a photo rather than like noise."""
    base = Image.linear_gradient("L").resize(size)
    bands = [base, base.transpose(Image.Transpose.FLIP_LEFT_RIGHT), base.rotate(90, expand=False)]
    if mode == "RGBA":
        bands.append(base.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    return Image.merge(mode, bands[: len(mode)])


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 1) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))


def sample(fmt: str, size: tuple[int, int] = (64, 48)) -> bytes:
    im = gradient(size)
    return encode(im.convert("P") if fmt == "GIF" else im, fmt)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming huge dimensions; the pixel data is garbage on purpose,
    so decoding it would fail with something other than ImageBomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"not zlib at all")
        + png_chunk(b"IEND", b"")
    )


def bilevel_png(side: int) -> bytes:
    """A genuinely valid, all-black 1-bit PNG: huge in pixels, tiny in bytes."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@dataclass
class Recorder:
    """Which hosts the session was asked to contact."""

    hosts: list[str] = field(default_factory=list)

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def on_start(
            session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
        ) -> None:
            self.hosts.append(params.url.raw_host or "")

        config.on_request_start.append(on_start)
        return config


class StaticResolver(AbstractResolver):
    """Resolves every name to fixed addresses, standing in for a hostile DNS."""

    def __init__(self, addresses: Iterable[str] = (LOOPBACK,)) -> None:
        self.addresses = list(addresses)
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=addr,
                port=port,
                family=socket.AF_INET6 if ":" in addr else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for addr in self.addresses
        ]

    async def close(self) -> None:
        pass


@dataclass
class Client:
    session: aiohttp.ClientSession
    recorder: Recorder

    def fetcher(self, **kwargs: object) -> ImageFetcher:
        kwargs.setdefault("timeout", 5.0)
        kwargs.setdefault("connect_timeout", 1.0)
        return ImageFetcher(self.session, **kwargs)  # type: ignore[arg-type]


async def open_client(resolver: AbstractResolver | None, **session_kwargs: object) -> Client:
    recorder = Recorder()
    connector = aiohttp.TCPConnector(resolver=resolver) if resolver else aiohttp.TCPConnector()
    session = aiohttp.ClientSession(
        connector=connector,
        trace_configs=[recorder.trace()],
        **session_kwargs,  # type: ignore[arg-type]
    )
    return Client(session, recorder)


@pytest.fixture
async def host() -> AsyncIterator[ImageHost]:
    async with ImageHost() as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    """Session set up like production: GuardedResolver on the connector."""
    resolver = GuardedResolver()
    c = await open_client(resolver)
    yield c
    await c.session.close()
    await resolver.close()


@pytest.fixture
async def plain_client() -> AsyncIterator[Client]:
    """Session whose owner forgot the GuardedResolver."""
    c = await open_client(None)
    yield c
    await c.session.close()


# ------------------------------------------------------------------------ ImageFile


def test_image_file_properties() -> None:
    jpeg = ImageFile(b"x" * 5000, "jpeg", 10, 20)
    assert jpeg.extension == "jpg"
    assert jpeg.content_type == "image/jpeg"
    assert jpeg.filename("flux-abc") == "flux-abc.jpg"
    png = ImageFile(b"", "png", 1, 1)
    assert (png.extension, png.content_type) == ("png", "image/png")
    assert png.filename("../../etc/pass wd") == "_.._etc_pass_wd.png"
    assert png.filename("...") == "image.png"
    assert png.filename("") == "image.png"
    assert png.filename("ü" * 10) == "_.png"
    long = png.filename("a" * 200)
    assert long == "a" * 64 + ".png"
    text = repr(jpeg)
    assert "xxxx" not in text and len(text) < 80 and "10x20" in text


# ---------------------------------------------------------------------------- sniff


@pytest.mark.parametrize(("pil", "name"), [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_sniff_accepts_supported_formats(pil: str, name: str) -> None:
    data = sample(pil, (40, 30))
    image = sniff(data)
    assert (image.format, image.width, image.height) == (name, 40, 30)
    assert image.data == data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"<!doctype html><html><body>not found</body></html>", id="html"),
        pytest.param(b"just some text\n" * 20, id="text"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        pytest.param(sample("PNG", (200, 200))[:-400], id="truncated-png"),
        pytest.param(encode(noise((120, 90)), "JPEG")[:-600], id="truncated-jpeg"),
        pytest.param(encode(noise((120, 90)).convert("P"), "GIF")[:-200], id="truncated-gif"),
        pytest.param(sample("WEBP")[:-50], id="truncated-webp"),
        pytest.param(sample("BMP"), id="bmp-not-allowed"),
        pytest.param(sample("TIFF"), id="tiff-not-allowed"),
    ],
)
def test_sniff_rejects_non_images(data: bytes) -> None:
    with pytest.raises(NotAnImage) as info:
        sniff(data)
    assert type(info.value) is NotAnImage


@pytest.mark.parametrize(
    ("data", "max_pixels"),
    [
        pytest.param(png_claiming(100_000, 100_000), 64_000_000, id="header-100000x100000"),
        pytest.param(png_claiming(9_000, 9_000), 64_000_000, id="header-above-our-limit-below-pillows"),
        pytest.param(png_claiming(1_000, 1_000), 10_000, id="custom-limit"),
    ],
)
def test_sniff_refuses_bombs_from_the_header(data: bytes, max_pixels: int) -> None:
    started = time.perf_counter()
    with pytest.raises(ImageBomb):
        sniff(data, max_pixels=max_pixels)
    # The IDAT is garbage: reaching a decoder would have raised plain NotAnImage.
    assert time.perf_counter() - started < 0.5


def test_sniff_refuses_real_compressed_bomb() -> None:
    data = bilevel_png(20_000)  # 400 megapixels in a few kilobytes
    assert len(data) < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageBomb):
        sniff(data)
    assert time.perf_counter() - started < 0.5


def test_sniff_allows_pixels_up_to_the_limit() -> None:
    data = sample("PNG", (100, 100))
    assert sniff(data, max_pixels=10_000).width == 100
    with pytest.raises(ImageBomb):
        sniff(data, max_pixels=9_999)


# ------------------------------------------------------------------ address policy


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("8.8.8.8", False),
        ("1.1.1.1", False),
        ("93.184.216.34", False),
        ("2606:4700:4700::1111", False),
        ("2001:4860:4860::8888", False),
        ("::ffff:8.8.8.8", False),
        ("2002:808:808::1", False),  # 6to4 around a public address
        ("64:ff9b::808:808", False),  # NAT64 around a public address
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("10.0.0.1", True),
        ("172.16.5.4", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("100.64.0.1", True),
        ("0.0.0.0", True),
        ("0.1.2.3", True),
        ("224.0.0.1", True),
        ("239.255.255.250", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("192.0.2.1", True),
        ("198.18.0.1", True),
        ("192.0.0.9", True),
        ("::", True),
        ("::1", True),
        ("fe80::1", True),
        ("fe80::1%1", True),
        ("fc00::1", True),
        ("fd12:3456::1", True),
        ("fec0::1", True),
        ("ff02::1", True),
        ("ff0e::1", True),
        ("2001:db8::1", True),
        ("3fff::1", True),
        ("2001::1", True),  # Teredo
        ("100::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("::ffff:0:a00:1", True),  # IPv4-translated
        ("::127.0.0.1", True),  # IPv4-compatible
        ("::8.8.8.8", True),
        ("2002:7f00:1::", True),  # 6to4 around loopback
        ("2002:a00:1::", True),
        ("64:ff9b::7f00:1", True),  # NAT64 around loopback
        ("64:ff9b::a9fe:a9fe", True),
        ("64:ff9b:1::1", True),
    ],
)
def test_is_forbidden_ip_table(address: str, forbidden: bool) -> None:
    assert is_forbidden_ip(ipaddress.ip_address(address)) is forbidden


# Where is_forbidden_ip is deliberately stricter than ipaddress.is_global for IPv4.
_STRICTER_V4 = [ipaddress.IPv4Network(n) for n in ("224.0.0.0/4", "192.0.0.0/24", "192.88.99.0/24")]


@given(st.ip_addresses(v=4))
def test_is_forbidden_ip_matches_is_global_for_ipv4(ip: ipaddress.IPv4Address) -> None:
    expected = not ip.is_global or any(ip in net for net in _STRICTER_V4)
    assert is_forbidden_ip(ip) is expected


@given(st.ip_addresses(v=4))
def test_ipv6_wrappers_inherit_the_ipv4_verdict(ip: ipaddress.IPv4Address) -> None:
    verdict = is_forbidden_ip(ip)
    packed = int(ip)
    assert is_forbidden_ip(ipaddress.IPv6Address(0xFFFF << 32 | packed)) is verdict  # mapped
    assert is_forbidden_ip(ipaddress.IPv6Address(0x2002 << 112 | packed << 80)) is verdict  # 6to4
    assert is_forbidden_ip(ipaddress.IPv6Address(0x64FF9B << 96 | packed)) is verdict  # NAT64


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


@given(st.ip_addresses(v=6))
def test_is_forbidden_ip_never_raises_and_never_allows_non_global(ip: ipaddress.IPv6Address) -> None:
    result = is_forbidden_ip(ip)
    assert isinstance(result, bool)
    # Wrappers are judged by the IPv4 address inside, whatever this Python thinks.
    wrapper = ip.ipv4_mapped is not None or ip.sixtofour is not None or ip in _NAT64
    if not ip.is_global and not wrapper:
        assert result


class FixedInner(StaticResolver):
    pass


async def test_guarded_resolver_filters_forbidden_addresses() -> None:
    inner = FixedInner(["10.0.0.7", "93.184.216.34", "::1", "2606:4700::1"])
    resolver = GuardedResolver(inner=inner)
    result = await resolver.resolve("cdn.example", 443)
    assert [r["host"] for r in result] == ["93.184.216.34", "2606:4700::1"]


async def test_guarded_resolver_refuses_when_nothing_public_is_left() -> None:
    resolver = GuardedResolver(inner=FixedInner(["127.0.0.1", "::ffff:10.0.0.1", "not-an-ip"]))
    with pytest.raises(ForbiddenAddress) as info:
        await resolver.resolve("evil.example", 80)
    assert "evil.example" in str(info.value)
    assert "127.0.0.1" not in str(info.value)


async def test_guarded_resolver_trust_and_allow_private() -> None:
    inner = FixedInner(["127.0.0.1"])
    trusted = GuardedResolver(trusted_hosts=["API.Example."], inner=inner)
    assert [r["host"] for r in await trusted.resolve("api.example", 443)] == ["127.0.0.1"]
    with pytest.raises(ForbiddenAddress):
        await trusted.resolve("other.example", 443)
    permissive = GuardedResolver(allow_private=True, inner=inner)
    assert len(await permissive.resolve("anything.example", 80)) == 1


# --------------------------------------------------------------------------- fetch


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
async def test_fetch_success(fmt: str, host: ImageHost, client: Client) -> None:
    data = sample(fmt, (80, 60))
    # A misleading Content-Type must not matter: the content decides.
    host.serve_bytes("/img", data, content_type="text/html")
    image = await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/img?sig=secret"))
    assert image.data == data
    assert (image.format, image.width, image.height) == (fmt.lower(), 80, 60)


async def test_fetch_large_image_and_allow_private(host: ImageHost, client: Client) -> None:
    data = encode(noise((400, 300)), "PNG", compress_level=1)
    assert len(data) > 256 * 1024  # takes the sniff-in-a-thread path
    host.serve_bytes("/big", data)
    image = await client.fetcher(allow_private=True).fetch(host.url("/big"))
    assert (image.format, image.width) == ("png", 400)


async def test_fetch_rejects_html_from_the_host(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/page", b"<html>an error page</html>", content_type="image/png")
    with pytest.raises(NotAnImage):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/page"))


async def test_fetch_refuses_bomb(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/bomb", png_claiming(100_000, 100_000), content_type="image/png")
    with pytest.raises(ImageBomb):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/bomb"))


@pytest.mark.parametrize("status", [403, 404, 410])
async def test_expired_link(status: int, host: ImageHost, client: Client) -> None:
    host.serve_status("/gone", status)
    with pytest.raises(ImageExpired):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/gone"))


@pytest.mark.parametrize("status", [500, 502, 429, 204])
async def test_other_statuses_are_unavailable(status: int, host: ImageHost, client: Client) -> None:
    if status == 204:
        host.serve_bytes("/err", b"", status=204)
    else:
        host.serve_status("/err", status)
    with pytest.raises((ImageUnavailable, NotAnImage)) as info:
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/err"))
    if status != 204:
        assert type(info.value) is ImageUnavailable
        assert str(status) in str(info.value)


# ------------------------------------------------------------------------ body size

MAX = 100_000


async def test_oversize_with_honest_content_length(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/huge", b"\0" * (MAX + 1))
    with pytest.raises(ImageTooLarge) as info:
        await client.fetcher(trusted_hosts={LOOPBACK}, max_bytes=MAX).fetch(host.url("/huge"))
    assert info.value.limit == MAX
    assert "97.7 KiB" in str(info.value)


async def test_exactly_max_bytes_is_allowed(host: ImageHost, client: Client) -> None:
    data = sample("PNG")
    host.serve_bytes("/img", data)
    image = await client.fetcher(trusted_hosts={LOOPBACK}, max_bytes=len(data)).fetch(host.url("/img"))
    assert image.data == data


async def test_oversize_chunked_without_content_length(host: ImageHost, client: Client) -> None:
    host.serve_chunked("/stream", 10 * MAX)
    with pytest.raises(ImageTooLarge):
        await client.fetcher(trusted_hosts={LOOPBACK}, max_bytes=MAX).fetch(host.url("/stream"))


async def test_oversize_close_delimited_body(client: Client) -> None:
    # HTTP/1.0 style: no Content-Length, the body ends when the connection does.
    head = b"HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n"
    async with RawHost(head + b"\0" * (20 * MAX)) as raw:
        with pytest.raises(ImageTooLarge):
            await client.fetcher(trusted_hosts={LOOPBACK}, max_bytes=MAX).fetch(raw.url("/x"))


@pytest.mark.parametrize("connection", ["close", "keep-alive"])
async def test_lying_content_length_does_not_break_the_cap(connection: str, client: Client) -> None:
    # Claims 1000 bytes but sends far more than the cap. Only the declared bytes are
    # used (not a whole image) or aiohttp rejects the surplus; never ImageTooLarge
    # after buffering it.
    png = sample("PNG", (300, 300))
    head = f"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: {connection}\r\n\r\n".encode()
    async with RawHost(head + png + b"\0" * (20 * MAX)) as raw:
        with pytest.raises((NotAnImage, ImageUnavailable)):
            await client.fetcher(trusted_hosts={LOOPBACK}, max_bytes=MAX).fetch(raw.url("/x"))


async def test_body_shorter_than_content_length(client: Client) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\nConnection: close\r\n\r\n"
    async with RawHost(head + b"\0" * 100) as raw:
        with pytest.raises(ImageUnavailable):
            await client.fetcher(trusted_hosts={LOOPBACK}).fetch(raw.url("/x"))


# ------------------------------------------------------------------------ redirects


async def test_follows_redirects(host: ImageHost, client: Client) -> None:
    data = sample("PNG")
    host.redirect("/a", host.url("/b"), status=301)
    host.redirect("/b", "/c?x=1", status=307)  # relative Location
    host.redirect("/c", "img", status=308)
    host.serve_bytes("/img", data)
    image = await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/a"))
    assert image.data == data
    assert [r.path for r in host.requests] == ["/a", "/b", "/c", "/img"]


async def test_redirect_loop(host: ImageHost, client: Client) -> None:
    host.redirect("/a", "/b")
    host.redirect("/b", "/a")
    with pytest.raises(ImageUnavailable, match="loop"):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/a"))
    assert host.hits("/a") == 1


async def test_too_many_redirects(host: ImageHost, client: Client) -> None:
    for i in range(10):
        host.redirect(f"/r{i}", f"/r{i + 1}")
    host.serve_bytes("/r10", sample("PNG"))
    fetcher = client.fetcher(trusted_hosts={LOOPBACK}, max_redirects=5)
    with pytest.raises(ImageUnavailable, match="redirects"):
        await fetcher.fetch(host.url("/r0"))
    assert host.hits("/r6") == 0
    assert (await fetcher.fetch(host.url("/r5"))).format == "png"  # exactly 5 is fine


async def test_redirect_without_location(host: ImageHost, client: Client) -> None:
    async def no_location(request: object) -> aiohttp.web.StreamResponse:
        return aiohttp.web.Response(status=302)

    host.route("/r", no_location)
    with pytest.raises(ImageUnavailable):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/r"))


@pytest.mark.parametrize(
    "target",
    [
        "http://10.0.0.1/x",
        "http://10.0.0.1:{port}/x",
        "https://192.168.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/img",
        "http://[::ffff:10.0.0.1]/x",
        "http://[::ffff:127.0.0.1]:{port}/img",
        "http://[fe80::1%25lo]:{port}/img",
        "http://127.1:{port}/img",
        "http://2130706433:{port}/img",
        "http://167772161/x",  # 10.0.0.1
        "http://0x7f.0.0.1:{port}/img",
        "http://0x0a000001/x",
        "http://0.0.0.0:{port}/img",
    ],
)
async def test_redirect_to_forbidden_literal_is_refused_before_connecting(
    target: str, host: ImageHost, client: Client
) -> None:
    host.serve_bytes("/img", sample("PNG"))
    host.redirect("/r", target.format(port=host.port))
    with pytest.raises(ForbiddenAddress):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/r"))
    # Only the trusted hop was ever requested; nothing else was contacted.
    assert client.recorder.hosts == [LOOPBACK]
    assert host.hits("/img") == 0


async def test_redirect_to_hostname_resolving_to_loopback(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/img", sample("PNG"))
    host.redirect("/r", host.url("/img", host="localhost"))
    with pytest.raises(ForbiddenAddress) as info:
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/r"))
    assert host.hits("/img") == 0  # refused by the resolver, before connecting
    assert "localhost" in str(info.value)


@pytest.mark.parametrize(
    "target",
    ["ftp://{host}/img", "file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "gopher://{host}/"],
)
async def test_redirect_to_other_scheme(target: str, host: ImageHost, client: Client) -> None:
    host.redirect("/r", target.format(host=f"{LOOPBACK}:{host.port}"))
    with pytest.raises(ImageUnavailable, match="scheme"):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(host.url("/r"))
    assert client.recorder.hosts == [LOOPBACK]


# ----------------------------------------------------------------- address checks


async def test_untrusted_loopback_literal_is_refused(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/img", sample("PNG"))
    with pytest.raises(ForbiddenAddress) as info:
        await client.fetcher().fetch(host.url("/img?token=s3cret"))
    assert host.requests == []
    assert client.recorder.hosts == []
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/img",
        "http://[::1]/img",
        "http://[::ffff:a00:1]/x",
        "http://127.0.0.1./img",
        "http://127.1/img",
        "http://0177.0.0.1/img",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    ],
)
async def test_forbidden_literal_never_contacted(url: str, client: Client) -> None:
    with pytest.raises(ForbiddenAddress):
        await client.fetcher().fetch(url)
    assert client.recorder.hosts == []


async def test_localhost_blocked_by_guarded_resolver(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/img", sample("PNG"))
    with pytest.raises(ForbiddenAddress):
        await client.fetcher().fetch(host.url("/img", host="localhost"))
    assert host.requests == []


async def test_trusted_hostname_passes_resolver_and_fetcher(host: ImageHost) -> None:
    host.serve_bytes("/img", sample("PNG"))
    resolver = GuardedResolver(trusted_hosts={"LOCALHOST"})
    c = await open_client(resolver)
    try:
        image = await c.fetcher(trusted_hosts={"LocalHost"}).fetch(host.url("/img", host="localhost"))
        assert image.format == "png"
    finally:
        await c.session.close()
        await resolver.close()


async def test_hostile_dns_blocked_by_guarded_resolver(host: ImageHost) -> None:
    host.serve_bytes("/img", sample("PNG"))
    inner = StaticResolver([LOOPBACK])
    resolver = GuardedResolver(inner=inner)
    c = await open_client(resolver)
    try:
        with pytest.raises(ForbiddenAddress):
            await c.fetcher().fetch(f"http://images.example:{host.port}/img")
        assert inner.calls == ["images.example"]
        assert host.requests == []
    finally:
        await c.session.close()


async def test_peer_check_catches_what_dns_let_through(host: ImageHost) -> None:
    # Without a GuardedResolver the connection happens, but the peer is loopback.
    host.serve_bytes("/img", sample("PNG"))
    c = await open_client(StaticResolver([LOOPBACK]))
    try:
        with pytest.raises(ForbiddenAddress):
            await c.fetcher().fetch(f"http://images.example:{host.port}/img")
        assert host.hits("/img") == 1
        image = await c.fetcher(trusted_hosts={"IMAGES.example"}).fetch(f"http://images.example:{host.port}/img")
        assert image.format == "png"
    finally:
        await c.session.close()


async def test_peer_check_with_real_localhost(host: ImageHost, plain_client: Client) -> None:
    host.serve_bytes("/img", sample("PNG"))
    with pytest.raises(ForbiddenAddress):
        await plain_client.fetcher().fetch(host.url("/img", host="localhost"))


async def test_peer_check_when_server_closes_tiny_response() -> None:
    # Tiny body plus "Connection: close": aiohttp has dropped the transport before we
    # see the response, so the peer cannot be verified and the body is not used.
    png = sample("PNG", (8, 8))
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(png)}\r\nConnection: close\r\n\r\n".encode()
    async with RawHost(head + png) as raw:
        c = await open_client(StaticResolver([LOOPBACK]))
        try:
            with pytest.raises(ForbiddenAddress):
                await c.fetcher().fetch(f"http://images.example:{raw.port}/img")
            trusted = c.fetcher(trusted_hosts={"images.example"})
            assert (await trusted.fetch(f"http://images.example:{raw.port}/img")).width == 8
        finally:
            await c.session.close()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x.png",
        "file:///etc/passwd",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "example.com/x.png",
        "//example.com/x.png",
        "http:///x.png",
        "",
    ],
)
async def test_non_http_urls_are_refused(url: str, client: Client) -> None:
    with pytest.raises(ImageUnavailable):
        await client.fetcher().fetch(url)
    assert client.recorder.hosts == []


async def test_credentials_in_url_are_refused(host: ImageHost, client: Client) -> None:
    host.serve_bytes("/img", sample("PNG"))
    with pytest.raises(ImageUnavailable, match="credentials"):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(f"http://user:pw@{LOOPBACK}:{host.port}/img")
    assert host.requests == []


# -------------------------------------------------------------------- timeouts etc.


async def test_stalled_server_times_out(host: ImageHost, client: Client) -> None:
    host.stall("/slow", 20)
    fetcher = client.fetcher(trusted_hosts={LOOPBACK}, timeout=0.5)
    started = time.perf_counter()
    with pytest.raises(ImageUnavailable, match="timed out"):
        await fetcher.fetch(host.url("/slow"))
    assert time.perf_counter() - started < 3


async def test_unreachable_port_is_unavailable(client: Client) -> None:
    with socket.socket() as sock:  # a port that is certainly closed
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageUnavailable):
        await client.fetcher(trusted_hosts={LOOPBACK}).fetch(f"http://{LOOPBACK}:{port}/x")


@pytest.mark.parametrize("kind", ["default-headers", "session-auth"])
async def test_no_authorization_reaches_image_host(host: ImageHost, kind: str) -> None:
    data = sample("PNG")
    host.redirect("/r", "/img")
    host.serve_bytes("/img", data)
    if kind == "default-headers":
        c = await open_client(None, headers={"Authorization": "Bearer api-secret", "Cookie": "session=api"})
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in 3.14, still honoured
            c = await open_client(None, auth=aiohttp.BasicAuth("api", "secret"))
    try:
        image = await c.fetcher(trusted_hosts={LOOPBACK}, user_agent="fluxbot-test").fetch(host.url("/r"))
    finally:
        await c.session.close()
    assert image.data == data
    assert len(host.requests) == 2
    for seen in host.requests:
        assert "Authorization" not in seen.headers
        assert "Cookie" not in seen.headers
        assert seen.headers["User-Agent"] == "fluxbot-test"


# ------------------------------------------------------------------------ fit_under


def test_fit_under_returns_small_image_unchanged() -> None:
    image = sniff(sample("PNG"))
    assert fit_under(image, len(image.data)) is image


def test_fit_under_noisy_png() -> None:
    data = encode(noise((2000, 1500)), "PNG", compress_level=1)
    image = sniff(data)
    limit = 1024 * 1024
    assert len(data) > 5 * limit
    fitted = fit_under(image, limit)
    assert fitted is not None
    assert len(fitted.data) <= limit
    assert fitted.format == "jpeg"
    decoded = sniff(fitted.data)
    assert (decoded.width, decoded.height) == (fitted.width, fitted.height)
    assert abs(fitted.width / fitted.height - 2000 / 1500) < 0.01
    assert fitted.width < 2000


def test_fit_under_prefers_quality_over_downscaling() -> None:
    photo = Image.blend(gradient((1200, 900)), noise((1200, 900)), 0.15)
    image = sniff(encode(photo, "PNG"))
    limit = len(encode(photo, "JPEG", quality=80))
    assert len(image.data) > 2 * limit
    fitted = fit_under(image, limit)
    assert fitted is not None and len(fitted.data) <= limit
    assert (fitted.width, fitted.height, fitted.format) == (1200, 900, "jpeg")


def test_fit_under_keeps_alpha() -> None:
    im = noise((800, 600), "RGBA", seed=2)
    im.putalpha(gradient((800, 600), "RGBA").getchannel("A"))
    image = sniff(encode(im, "PNG", compress_level=1))
    limit = 300 * 1024
    fitted = fit_under(image, limit)
    assert fitted is not None and len(fitted.data) <= limit
    assert fitted.format == "webp"
    with Image.open(io.BytesIO(fitted.data)) as out:
        assert out.mode in ("RGBA", "LA")
        assert out.getchannel("A").getextrema() != (255, 255)
        assert abs(out.width / out.height - 800 / 600) < 0.01


def test_fit_under_drops_alpha_that_is_fully_opaque() -> None:
    image = sniff(encode(noise((600, 400), "RGBA", seed=3).convert("RGB").convert("RGBA"), "PNG"))
    fitted = fit_under(image, len(image.data) // 2)
    assert fitted is not None and fitted.format == "jpeg"


def test_fit_under_impossible_limit() -> None:
    image = sniff(encode(noise((600, 400)), "PNG"))
    started = time.perf_counter()
    assert fit_under(image, 100) is None
    assert time.perf_counter() - started < 5


def test_fit_under_respects_min_side() -> None:
    image = sniff(encode(noise((1000, 500)), "PNG"))
    fitted = fit_under(image, 60_000, min_side=300)
    assert fitted is not None
    assert max(fitted.width, fitted.height) >= 300
    assert len(fitted.data) <= 60_000
    assert fit_under(image, 60_000, min_side=900) is None


async def test_fit_under_async() -> None:
    image = sniff(encode(noise((500, 500)), "PNG"))
    fitted = await asyncio.wait_for(fit_under_async(image, 100_000), 10)
    assert fitted is not None and len(fitted.data) <= 100_000
