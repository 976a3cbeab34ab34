"""The soak's producer: a steady rate of good events, hostile events and slow images.

One thread publishes `rate_per_s` events a second, a seeded mix of
- good events whose image is a local file (file://, under fetch.file_roots),
- good events whose image comes from the loopback image server (http://127.0.0.1),
- slow images: good events whose image the server sends only after a sleep (below the
  worker's fetch timeout, so they still become results, only later),
- hostile events, each of a known dead-letter kind (not JSON, invalid, missing or
  undecodable image, refused address, bad face box, server error, too large),
plus, on the controller's request, decoder crashes: events whose image is the payload
b"CRASH", on which the decoder process of tests.faults.faulty_decoder_worker segfaults.

Good events are numbered as the fault suite's checker expects (event_id "n000042",
stream "s<n % streams>"; a stream's events share a partition, as a keyed upstream would
produce them). Every record is accounted for when its delivery report comes: its input
coordinates, what was sent (tests.faults.checker.Sent), when it was published (the
record's CreateTime) and, for a hostile event, the dead-letter kind it must get.
"""

from __future__ import annotations

import base64
import collections
import json
import random
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from tests.faults.checker import Coord, Sent
from tests.support.events import event_bytes

GOOD_KINDS = ("file", "http", "slow")
CRASH_KIND = "image_undecodable"  # what a decoder crash becomes


def _truncated_png(face: Path) -> bytes:
    data = face.read_bytes()
    return data[: len(data) // 2]


@dataclass(frozen=True)
class Hostile:
    """A hostile event and the dead-letter kind it must become."""

    name: str
    kind: str
    value: Callable[[str], bytes]  # event id -> the record's value


def hostile_events(face: Path, folder: Path, image_url: str) -> list[Hostile]:
    """Poison of kinds the worker tells apart deterministically (see test_poison.py)."""
    (folder / "truncated.png").write_bytes(_truncated_png(face))

    _, good = event_bytes(face, stream_id="hostile")
    base = json.loads(good)

    def event(**fields: object) -> Callable[[str], bytes]:
        def make(event_id: str) -> bytes:
            return json.dumps({**base, "event_id": event_id, **fields}).encode()

        return make

    return [
        Hostile("binary", "not_json", lambda _id: b"\x00\x01\x02"),
        Hostile("json array", "invalid_event", lambda _id: b"[]"),
        Hostile("schema version 9", "invalid_event", event(schema_version=9)),
        Hostile("unknown field", "invalid_event", event(extra_field=True)),
        Hostile("huge stream id", "event_too_large", event(stream_id="x" * 70_000)),
        Hostile("missing file", "image_not_found", event(image=(folder / "nope.png").as_uri())),
        Hostile(
            "truncated png", "image_undecodable", event(image=(folder / "truncated.png").as_uri())
        ),
        Hostile("private address", "image_fetch_refused", event(image="http://10.0.0.5/x.png")),
        Hostile("http 404", "image_not_found", event(image=f"{image_url}/nope.png")),
        Hostile("http 500", "image_fetch_failed", event(image=f"{image_url}/status/500")),
        Hostile(
            "face box outside",
            "bad_face_box",
            event(faces=[{"x": 500, "y": 500, "width": 5, "height": 5}]),
        ),
    ]


@dataclass
class Mix:
    """Shares of the event kinds (the rest are good events with a local file)."""

    http: float = 0.3
    slow: float = 0.08
    hostile: float = 0.06
    slow_s: tuple[float, float] = (0.3, 1.5)  # how long the server sleeps on a slow image


@dataclass
class Published:
    """What the producer knows of one input record once its delivery report came."""

    sent: Sent
    at_ms: int  # the record's CreateTime
    category: str  # file, http, slow, hostile, crash
    expected_kind: str | None = None  # the dead-letter kind it must get (poison only)


@dataclass
class LoadProducer:
    """Publishes the mix at a steady rate on its own thread until stopped."""

    bootstrap: str
    topic: str
    partitions: int
    faces: list[Path]
    image_url: str
    hostile: list[Hostile]
    rate_per_s: float
    seed: int
    streams: int = 12
    mix: Mix = field(default_factory=Mix)
    records: dict[Coord, Published] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    _next_good: int = 0
    _next_other: int = 0
    _pending: int = 0
    _crashes: collections.deque[int] = field(default_factory=collections.deque)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _producer: Any = None

    def start(self) -> LoadProducer:
        self._producer = Producer(
            {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )
        self._thread = threading.Thread(target=self._run, name="soak-load", daemon=True)
        self._thread.start()
        return self

    def inject_crashes(self, count: int) -> None:
        """Publish `count` decoder-crash events next (from the producer's thread)."""
        self._crashes.append(count)

    def stop(self, flush_timeout_s: float = 120.0) -> None:
        """Stop publishing and wait for every delivery report (once; later calls do nothing)."""
        if self._producer is None or self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        left = self._producer.flush(flush_timeout_s)
        if left:
            self.errors.append(f"{left} records still undelivered after {flush_timeout_s:.0f} s")

    @property
    def published(self) -> int:
        return len(self.records)

    # ---- the producer's thread ----------------------------------------------------------

    @property
    def failed(self) -> bool:
        """The producer's thread died (its error is in `errors`)."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop.is_set()

    def _run(self) -> None:
        try:
            self._publish_steadily()
        except Exception:  # the test must fail on it, not go on with no load
            self.errors.append(f"the producer's thread died: {traceback.format_exc()}")

    def _publish_steadily(self) -> None:
        rng = random.Random(self.seed)
        interval = 1.0 / self.rate_per_s
        next_at = time.monotonic()
        while not self._stop.is_set():
            while self._crashes:
                for _ in range(self._crashes.popleft()):
                    self._publish_crash()
            self._publish_one(rng)
            self._producer.poll(0)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            elif delay < -5:  # fell far behind (a stalled machine): do not burst to catch up
                next_at = time.monotonic()

    def _publish_one(self, rng: random.Random) -> None:
        draw = rng.random()
        mix = self.mix
        if draw < mix.hostile:
            self._publish_hostile(rng.choice(self.hostile))
            return
        n = self._next_good
        self._next_good += 1
        face = n % len(self.faces)
        stream = n % self.streams
        fields: dict[str, object] = {}
        if draw < mix.hostile + mix.slow:
            category = "slow"
            sleep_s = round(rng.uniform(*mix.slow_s), 2)
            fields["image"] = f"{self.image_url}/sleep/{sleep_s}/{face}.png"
        elif draw < mix.hostile + mix.slow + mix.http:
            category = "http"
            fields["image"] = f"{self.image_url}/{face}.png"
        else:
            category = "file"
        event_id = f"n{n:06d}"
        key, value = event_bytes(
            self.faces[face], stream_id=f"s{stream}", event_id=event_id, **fields
        )
        self._produce(key, value, stream % self.partitions, Sent(event_id, value), category)

    def _other_id(self, prefix: str) -> tuple[str, int]:
        self._next_other += 1
        return f"{prefix}{self._next_other:06d}", self._next_other % self.partitions

    def _publish_hostile(self, hostile: Hostile) -> None:
        event_id, partition = self._other_id("h")
        value = hostile.value(event_id)
        readable = _readable_event_id(value)
        sent = Sent(readable, value, poison=True)
        self._produce(b"hostile", value, partition, sent, "hostile", hostile.kind)

    def _publish_crash(self) -> None:
        event_id, partition = self._other_id("c")
        uri = "data:image/png;base64," + base64.b64encode(b"CRASH").decode()
        _, value = event_bytes(self.faces[0], stream_id="crash", event_id=event_id, image=uri)
        sent = Sent(event_id, value, poison=True)
        self._produce(b"crash", value, partition, sent, "crash", CRASH_KIND)

    def _produce(
        self,
        key: bytes,
        value: bytes,
        partition: int,
        sent: Sent,
        category: str,
        expected_kind: str | None = None,
    ) -> None:
        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self.errors.append(f"{category} {sent.event_id}: not delivered: {err}")
                return
            coord = (int(msg.partition()), int(msg.offset()))
            self.records[coord] = Published(sent, int(msg.timestamp()[1]), category, expected_kind)
            self.counts[category] += 1

        while True:
            try:
                self._producer.produce(
                    self.topic, key=key, value=value, partition=partition, on_delivery=delivered
                )
                return
            except BufferError:  # the local queue is full (a long outage): wait for room
                self._producer.poll(0.5)


def _readable_event_id(value: bytes) -> str | None:
    """The event id a worker can read from a value (a dead letter names it), if any."""
    try:
        event_id = json.loads(value).get("event_id")
    except (ValueError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) else None
