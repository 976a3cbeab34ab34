"""Fixtures and helpers of the security suite (the case list is in tests/security/__init__.py).

Helpers live here, next to the fixtures, and the test modules import them from
``tests.security.conftest``:

* ``handle`` runs one record the way the worker's poll loop and fetch thread do (parse, then
  prepare), ``run_event`` adds the clock and the memory meter, and ``expect_failed`` /
  ``expect_ok`` check the outcome, its time and memory, and that it encodes for publishing;
* ``PeakMemory`` measures this process's peak RSS growth over a block;
* ``RawServer`` is a scripted TCP server on loopback: each connection's request head is
  read and handed, with the socket, to a handler that may answer anything at any pace;
* image builders: ``encode``, ``png_chunk``, ``raw_png``, ``gif_with_frames``, ``gzip_bomb``.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from PIL import Image

from consumer.config import DecodeSettings, FaceSettings, FetchSettings, FlowSettings
from consumer.decode.pool import Decoder, ProcessDecoder
from consumer.errors import EventError
from consumer.fetch.pool import close_idle_connections
from consumer.stream.records import FailedEvent, InputRecord, PreparedEvent
from consumer.stream.stages import encode_dead_letter, encode_result, parse_event, prepare_event
from schemas import DeadLetter, EmotionResult, ErrorKind, FaceBox

# ---- settings ----------------------------------------------------------------------------

TIMEOUT_S = 2.0  # fetch.timeout_s: the whole fetch
READ_TIMEOUT_S = 1.0  # fetch.read_timeout_s: the longest silence
CONNECT_TIMEOUT_S = 1.0
DECODE_TIMEOUT_S = 5.0  # decode.timeout_s
# Upper time bounds are hang limits, HANG_FACTOR times the deadline they guard: two slow
# shared cores must never fail them, and tests do not measure speed. That a deadline held
# is shown by the lower bounds and the error messages.
HANG_FACTOR = 5
FETCH_BOUND_S = HANG_FACTOR * TIMEOUT_S
MAX_BYTES = 4 << 20  # fetch.max_bytes
MAX_PIXELS = 4_000_000  # fetch.max_pixels (the decoder's)
MAX_EVENT_BYTES = FlowSettings().max_event_bytes  # the default, 64 KiB
# Peak RSS growth allowed for a hostile case. The bombs here would add 500 MB to 1 GB and
# more if buffered or expanded in this process; honest work adds a few MB.
MEMORY_BOUND_MB = 200.0

SETTINGS = FetchSettings(
    timeout_s=TIMEOUT_S,
    connect_timeout_s=CONNECT_TIMEOUT_S,
    read_timeout_s=READ_TIMEOUT_S,
    retries=0,
    retry_backoff_s=0,
    max_bytes=MAX_BYTES,
    max_pixels=MAX_PIXELS,
    allow_hosts=("127.0.0.1",),
)
# What a dead letter for each stage may say; anything else from the fetch is a surprise.
DECODE_KINDS = ("image_undecodable", "image_too_large")

# ---- running one record ------------------------------------------------------------------


def record(value: bytes) -> InputRecord:
    return InputRecord("frames", 3, 42, b"cam-1", value, (("trace", b"\x00\xff"),), 1_700_000)


def event_value(image: str, faces: list[dict[str, int]] | None = None, **extra: Any) -> bytes:
    event: dict[str, Any] = {
        "event_id": "ev-1",
        "stream_id": "cam-1",
        "captured_at": "2026-11-28T10:00:00+01:00",
        "image": image,
        **extra,
    }
    if faces is not None:
        event["faces"] = faces
    return json.dumps(event).encode()


def handle(
    value: bytes,
    settings: FetchSettings,
    decoder: Decoder,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> PreparedEvent | FailedEvent:
    """What consumer.stream.worker does with one record: parse on the poll thread, then prepare.

    Only an EventError from parse_event is expected (the poll loop catches nothing else);
    prepare_event must return, whatever the image or the server does.
    """
    rec = record(value)
    try:
        event = parse_event(rec, max_event_bytes)
    except EventError as exc:
        return FailedEvent.from_error(rec, exc)
    return prepare_event(rec, event, settings, decoder)


@dataclass
class Run:
    outcome: PreparedEvent | FailedEvent
    elapsed_s: float
    growth_mb: float


def run_value(
    value: bytes,
    settings: FetchSettings,
    decoder: Decoder,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> Run:
    with PeakMemory() as memory:
        started = time.monotonic()
        outcome = handle(value, settings, decoder, max_event_bytes)
        elapsed = time.monotonic() - started
    return Run(outcome, elapsed, memory.growth_mb)


def run_event(
    image: str,
    settings: FetchSettings,
    decoder: Decoder,
    faces: list[dict[str, int]] | None = None,
) -> Run:
    return run_value(event_value(image, faces), settings, decoder)


def expect_failed(
    run: Run,
    *kinds: ErrorKind,
    within_s: float,
    memory_mb: float = MEMORY_BOUND_MB,
) -> FailedEvent:
    """The record became a dead letter of one of `kinds`, in time and memory."""
    outcome = run.outcome
    assert isinstance(outcome, FailedEvent), f"expected a dead letter {kinds}, got crops {outcome}"
    assert outcome.kind in kinds, f"expected {kinds}, got {outcome.kind}: {outcome.message}"
    _bounded(run, within_s, memory_mb)
    dead = encode_dead_letter(outcome, "frames.dead")
    letter = DeadLetter.from_record(dead.key, dead.value, dead.headers)
    assert letter.error_kind == outcome.kind and letter.value == outcome.record.value
    return outcome


@dataclass(frozen=True)
class _Score:
    label: str = "neutral"
    confidence: float = 1.0
    scores: dict[str, float] = field(default_factory=lambda: {"neutral": 1.0})


def expect_ok(
    run: Run,
    sizes: list[tuple[int, int]] | None = None,
    *,
    within_s: float,
    memory_mb: float = MEMORY_BOUND_MB,
) -> PreparedEvent:
    """The record became RGB crops (of `sizes`, when given), in time and memory."""
    outcome = run.outcome
    assert isinstance(outcome, PreparedEvent), (
        f"expected crops, got {outcome.kind}: {outcome.message}"
    )
    assert len(outcome.crops) == len(outcome.boxes)
    for crop, box in zip(outcome.crops, outcome.boxes, strict=True):
        assert crop.mode == "RGB"
        assert crop.size == (box.width, box.height)
    if sizes is not None:
        assert [c.size for c in outcome.crops] == sizes
    _bounded(run, within_s, memory_mb)
    scores = [_Score() for _ in outcome.crops]
    result = encode_result(outcome, scores, "test-model", "emotions")
    assert EmotionResult.model_validate_json(result.value).event_id == outcome.event.event_id
    return outcome


def _bounded(run: Run, within_s: float, memory_mb: float) -> None:
    assert run.elapsed_s < within_s, f"took {run.elapsed_s:.2f}s, over {within_s}s"
    assert run.growth_mb < memory_mb, f"peak RSS grew {run.growth_mb:.0f} MB, over {memory_mb}"


# ---- memory ------------------------------------------------------------------------------


def _status_kb(name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        found = re.search(rf"^{name}:\s+(\d+) kB", status.read(), re.MULTILINE)
    assert found is not None, f"/proc/self/status has no {name}"
    return int(found.group(1))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    # Some sandboxes accept the write and ignore it: then the peak is still the old one.
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 4096


class PeakMemory:
    """This process's peak RSS growth over a block, in MB (``growth_mb``).

    Exact (VmHWM) where /proc/self/clear_refs can reset the peak, else sampled every
    millisecond from VmRSS: a bomb being buffered or expanded takes far longer than that.
    """

    def __init__(self) -> None:
        if not os.path.exists("/proc/self/status"):
            pytest.skip("the memory bounds need Linux /proc")
        self.growth_mb = 0.0
        self._start_kb = 0
        self._exact = False
        self._peak_kb = 0
        self._done = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        self._exact = _reset_peak()
        self._start_kb = self._peak_kb = _status_kb("VmRSS")
        if not self._exact:
            self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self._peak_kb = max(self._peak_kb, _status_kb("VmRSS"))

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._exact:
            peak = _status_kb("VmHWM")
        else:
            self._done.set()
            assert self._sampler is not None
            self._sampler.join()
            peak = max(self._peak_kb, _status_kb("VmRSS"))
        self.growth_mb = (peak - self._start_kb) / 1024


# ---- network guards ----------------------------------------------------------------------

# Names the suite's fake DNS answers; every other name fails as if it did not exist.
NAMES: dict[str, list[str]] = {
    "localhost": ["127.0.0.1"],
    "metadata.google.internal": ["169.254.169.254"],
    "rebind.test": ["127.0.0.1"],
    "private.test": ["10.0.0.5"],
    "mixed.test": ["93.184.216.34", "169.254.169.254"],
}


@dataclass
class Network:
    """What the code under test asked of the network during one test."""

    lookups: list[str] = field(default_factory=list)
    connects: list[tuple[Any, ...]] = field(default_factory=list)
    violations: list[tuple[Any, ...]] = field(default_factory=list)


@pytest.fixture(autouse=True)
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    """No DNS query leaves the machine and no connection goes anywhere but loopback."""
    seen = Network()
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        seen.lookups.append(name)
        answer = NAMES.get(name.lower().rstrip("."))
        if answer is not None:
            return [
                real_getaddrinfo(a, port, family, type, proto, flags | socket.AI_NUMERICHOST)[0]
                for a in answer
            ]
        # Numeric forms (inet_aton's decimal, octal, hex and short forms included) resolve
        # as the real resolver would; names raise EAI_NONAME without asking any DNS server.
        return real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    def connect(sock: socket.socket, address: Any) -> None:
        seen.connects.append(tuple(address))
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return real_connect(sock, address)
        host = str(address[0]).split("%", 1)[0]
        if not ipaddress.ip_address(host).is_loopback:
            seen.violations.append(tuple(address))
            pytest.fail(f"the code under test connected to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield seen
    assert seen.violations == []


@pytest.fixture(autouse=True)
def _fresh_connection_pool() -> Iterator[None]:
    """Pooled keep-alive connections must not leak from one test's servers into the next."""
    yield
    close_idle_connections()


# ---- decoders ----------------------------------------------------------------------------


def make_process_decoder(max_pixels: int = MAX_PIXELS, max_memory_mb: int = 1024) -> ProcessDecoder:
    return ProcessDecoder(
        DecodeSettings(workers=1, timeout_s=DECODE_TIMEOUT_S, max_memory_mb=max_memory_mb),
        FaceSettings(),
        max_pixels,
        MAX_BYTES,
    )


@pytest.fixture(scope="session")
def decoder() -> Iterator[ProcessDecoder]:
    """One real decoder process for the whole suite, as the worker runs it."""
    pool = make_process_decoder()
    yield pool
    pool.close()


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, FetchSettings]:
    """A folder of allowed files, and settings whose fetch.file_roots is that folder only."""
    root = tmp_path / "images"
    root.mkdir()
    return root, SETTINGS.model_copy(update={"file_roots": (root,)})


# ---- scripted servers --------------------------------------------------------------------


class Peer:
    """One accepted connection, as a handler sees it."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock = sock
        self.stop = stop
        self.head = b""
        self._rest = b""

    @property
    def path(self) -> str:
        parts = self.head.split(b" ", 2)
        return parts[1].decode("latin-1") if len(parts) > 1 else ""

    def read_request(self) -> bool:
        """Read the next request head (GETs have no body); False at EOF or on stop."""
        data = self._rest
        while b"\r\n\r\n" not in data:
            if self.stop.is_set() or len(data) > 65536:
                return False
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return False
            if not chunk:
                return False
            data += chunk
        self.head, _, self._rest = data.partition(b"\r\n\r\n")
        return True

    def send(self, data: bytes) -> bool:
        """True when sent; False once the client is gone or the server is stopping."""
        view = memoryview(data)
        while view:
            if self.stop.is_set():
                return False
            try:
                view = view[self.sock.send(view) :]
            except TimeoutError:
                continue
            except OSError:
                return False
        return True

    def wait(self, seconds: float) -> bool:
        """Sleep; False when the server is stopping."""
        return not self.stop.wait(seconds)

    def trickle(self, data: bytes, every_s: float) -> None:
        for index in range(len(data)):
            if not self.wait(every_s) or not self.send(data[index : index + 1]):
                return

    def hold(self) -> None:
        """Say nothing until the server stops (or the client hangs up)."""
        while not self.stop.is_set():
            try:
                if self.sock.recv(4096) == b"":
                    return
            except TimeoutError:
                continue
            except OSError:
                return


# A handler answers one request; True keeps the connection for the next request.
Handler = Callable[[Peer], bool | None]


class RawServer:
    """A loopback TCP server whose handler scripts each answer byte by byte."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        assert ipaddress.ip_address(host).is_loopback, "test servers listen on loopback only"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self.handler = handler
        self.stop = threading.Event()
        self.requests: list[bytes] = []  # every request head, in order
        self.connections = 0
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._accepting = threading.Thread(target=self._accept, name="raw-server", daemon=True)
        self._accepting.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(0.05)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            with self._lock:
                self.connections += 1
                self._socks.append(sock)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        peer = Peer(sock, self.stop)
        try:
            while peer.read_request():
                with self._lock:
                    self.requests.append(peer.head)
                if not self.handler(peer):
                    break
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> list[threading.Thread]:
        """Stop; the threads that did not end within 5 s (there should be none)."""
        self.stop.set()
        self._accepting.join(5)
        self._listener.close()
        with self._lock:
            threads = [self._accepting, *self._threads]
        for thread in threads:
            thread.join(5)
        return [t for t in threads if t.is_alive()]


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    """serve(handler, host="127.0.0.1") -> a started RawServer; all are stopped after."""
    servers: list[RawServer] = []

    def start(handler: Handler, host: str = "127.0.0.1") -> RawServer:
        server = RawServer(handler, host)
        servers.append(server)
        return server

    yield start
    stuck = [thread for server in servers for thread in server.close()]
    assert stuck == [], f"server threads still running: {stuck}"


def response(
    body: bytes = b"",
    status: str = "200 OK",
    headers: tuple[tuple[str, str], ...] = (),
    *,
    length: int | None = -1,
) -> bytes:
    """An HTTP/1.1 response; `length` -1 means the true Content-Length, None none at all."""
    lines = [f"HTTP/1.1 {status}"]
    if length == -1:
        length = len(body)
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- images ------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(
    width: int,
    height: int,
    idat: bytes,
    *,
    bit_depth: int = 8,
    colour_type: int = 0,
    plte: bytes | None = None,
) -> bytes:
    """A PNG assembled chunk by chunk (IHDR may claim anything)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header)
    if plte is not None:
        chunks += png_chunk(b"PLTE", plte)
    return b"\x89PNG\r\n\x1a\n" + chunks + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _gif_blocks(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """A GIF split into its prefix (header, screen, colour table, application extensions),
    one byte string per frame (graphic control extension + image) and the trailer."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)

    def sub_blocks(at: int) -> int:
        while data[at]:
            at += data[at] + 1
        return at + 1

    prefix_end = pos
    frames: list[bytes] = []
    start = pos
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            label = data[pos + 1]
            pos = sub_blocks(pos + 2)
            if label == 0xFF and not frames and start == prefix_end:
                prefix_end = start = pos  # NETSCAPE looping: part of the prefix
        elif data[pos] == 0x2C:  # image: descriptor, local table, LZW size, sub-blocks
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = sub_blocks(pos + 1)
            frames.append(data[start:pos])
            start = pos
        else:
            raise ValueError(f"unexpected GIF block {data[pos]:#x} at {pos}")
    return data[:prefix_end], frames, data[pos:]


def gif_with_frames(count: int, size: tuple[int, int] = (48, 48)) -> bytes:
    """An animated GIF of `count` frames: the first red, every other one blue.

    Pillow writes a red and a blue frame; the blue frame's bytes are then repeated, which
    is far quicker than asking Pillow for thousands of frames.
    """
    red, blue = Image.new("P", size, 0), Image.new("P", size, 1)
    palette = [255, 0, 0, 0, 0, 255] + [0] * 762
    red.putpalette(palette)
    blue.putpalette(palette)
    two = encode(red, "GIF", save_all=True, append_images=[blue], duration=20, loop=0)
    prefix, frames, trailer = _gif_blocks(two)
    assert len(frames) == 2
    return prefix + frames[0] + frames[1] * (count - 1) + trailer


def gzip_bomb(expanded: int) -> bytes:
    """A valid gzip stream of `expanded` zero bytes (a multiple of 1 MiB), about 1/1000 of it.

    Built from one full-flushed deflate block of 1 MiB repeated, so it costs milliseconds
    instead of compressing `expanded` bytes.
    """
    mib = 1 << 20
    assert expanded % mib == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(b"\x00" * mib) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = compressor.flush(zlib.Z_FINISH)
    crc, zeros = 0, b"\x00" * mib
    for _ in range(expanded // mib):  # the CRC of the whole, a MiB at a time
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    trailer = struct.pack("<II", crc, expanded & 0xFFFFFFFF)
    return header + block * (expanded // mib) + final + trailer


def face_box(x: int, y: int, width: int, height: int) -> dict[str, int]:
    return FaceBox(x=x, y=y, width=width, height=height).model_dump()
