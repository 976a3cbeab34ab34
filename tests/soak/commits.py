"""The group's committed offsets over the soak, next to the input topic's end offsets.

`CommitWatch` reads both every second on a thread of its own (one client, kept: it
reconnects by itself after a broker restart; a read while the broker is down or paused
fails and is skipped). Each reading becomes a `tests.faults.checker.Fault` whose time is
taken after the offsets were read, so the checker's "dup below commit" holds for it
exactly: whatever came out after that moment for an offset below those commits was
processed again past a commit. `mark(name)` takes one such reading right after a fault.

From the readings: commits that moved back (never allowed), and per partition the longest
stall: how long its commit stayed put while the partition held uncommitted events.
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from tests.faults.checker import Fault
from tests.support.kafka import NO_COMMIT


@dataclass(frozen=True)
class Reading:
    at_ms: int  # wall clock after both reads
    committed: Mapping[int, int]
    ends: Mapping[int, int]


@dataclass(frozen=True)
class Stall:
    partition: int
    seconds: float
    committed: int  # the offset it stayed at
    end: int  # the partition's end offset when the stall was longest
    others_moved: int  # offsets the other partitions committed meanwhile

    def describe(self) -> str:
        return (
            f"p{self.partition} {self.seconds:.0f} s at {self.committed} (end {self.end}; "
            f"others +{self.others_moved})"
        )


@dataclass
class CommitWatch:
    bootstrap: str
    group: str
    topic: str
    partitions: int
    every_s: float = 1.0
    readings: list[Reading] = field(default_factory=list)
    marks: list[Fault] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    _failed_in_row: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _client: Any = None

    def start(self) -> CommitWatch:
        self._client = self._connect()
        self._thread = threading.Thread(target=self._run, name="soak-commits", daemon=True)
        self._thread.start()
        return self

    def _connect(self) -> Any:
        # A consumer of the workers' group that never subscribes: it reads the group's
        # committed offsets without joining. read_uncommitted: the broker then answers with
        # the stable offsets at once while a transaction that commits offsets is open.
        return Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": self.group,
                "isolation.level": "read_uncommitted",
                "client.id": f"soak-watch-{uuid.uuid4().hex[:6]}",
            }
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.read(timeout_s=3.0)

    def read(self, timeout_s: float = 10.0) -> Reading | None:
        """One reading now (None if the broker does not answer in time).

        After a few failed readings in a row the client is made anew: one that lost the
        broker's metadata during a pause can go on failing after the broker is back.
        """
        wanted = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        with self._lock:
            if self._client is None:
                return None
            try:
                answered = self._client.committed(wanted, timeout_s)
                failed = [tp.error for tp in answered if tp.error is not None]
                if failed:
                    raise KafkaException(failed[0])
                committed = {tp.partition: tp.offset for tp in answered}
                ends = {
                    tp.partition: self._client.get_watermark_offsets(tp, timeout_s, cached=False)[1]
                    for tp in wanted
                }
            except KafkaException as exc:
                self.failures[str(exc.args[0] if exc.args else exc)[:100]] += 1
                self._failed_in_row += 1
                if self._failed_in_row >= 3:
                    self._client.close()
                    self._client = self._connect()
                    self._failed_in_row = 0
                return None
            self._failed_in_row = 0
            reading = Reading(time.time_ns() // 1_000_000, committed, ends)
            if self.readings:
                self._check_forward(self.readings[-1], reading)
            self.readings.append(reading)
            return reading

    def mark(self, name: str, timeout_s: float = 60.0) -> Fault | None:
        """A reading right after a fault, kept as a fault for the checker (None: no answer)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reading = self.read()
            if reading is not None:
                fault = Fault(name, reading.at_ms, dict(reading.committed))
                self.marks.append(fault)
                return fault
            time.sleep(0.5)
        return None

    def _check_forward(self, before: Reading, after: Reading) -> None:
        for partition, old in before.committed.items():
            new = after.committed.get(partition, NO_COMMIT)
            if max(new, 0) < max(old, 0):
                self.regressions.append(
                    f"partition {partition}: committed {old} -> {new} at {after.at_ms}"
                )

    def faults(self, every_s: float = 5.0) -> list[Fault]:
        """The marks and one reading every `every_s`, as faults for the checker's tally."""
        thinned: list[Fault] = []
        last = 0
        for reading in self.readings:
            if reading.at_ms - last >= every_s * 1000:
                thinned.append(Fault("commit reading", reading.at_ms, dict(reading.committed)))
                last = reading.at_ms
        return sorted([*self.marks, *thinned], key=lambda f: f.at_ms)

    def stalls(self) -> list[Stall]:
        """Per partition, the longest time its commit stayed put with events behind it."""
        worst: dict[int, Stall] = {}
        # partition -> (committed offset, since ms, the others' commits in all then)
        since: dict[int, tuple[int, int, int]] = {}
        for reading in self.readings:
            offsets = {
                p: max(reading.committed.get(p, NO_COMMIT), 0) for p in range(self.partitions)
            }
            total = sum(offsets.values())
            for partition, offset in offsets.items():
                end = reading.ends.get(partition, 0)
                others = total - offset
                held = since.get(partition)
                if held is None or held[0] != offset or end <= offset:
                    since[partition] = (offset, reading.at_ms, others)
                    continue
                seconds = (reading.at_ms - held[1]) / 1000
                if partition not in worst or seconds > worst[partition].seconds:
                    worst[partition] = Stall(partition, seconds, offset, end, others - held[2])
        return [worst[p] for p in sorted(worst)]
