"""The fault suite's checker: numbered events in, then what came out, counted.

Each scenario publishes N uniquely numbered events (event_id "n000042", stream "s3"),
lets its fault happen, then reads the results and dead letters with a read_committed
reader and reports produced, results, distinct, duplicates, missing, dead letters and
per-stream order violations. The reports are printed as one table at the end of the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from schemas import DeadLetter, EmotionResult
from tests.support.events import event_bytes
from tests.support.kafka import Record, committed, produce, read

REPORTS: list[FaultReport] = []


@dataclass
class FaultReport:
    scenario: str
    produced: int
    results: int
    distinct: int
    duplicates: int
    missing: int
    dead_letters: int
    order_violations: int
    note: str = ""

    ROW = "| {:<34} | {:>8} | {:>7} | {:>8} | {:>10} | {:>7} | {:>12} | {:>16} | {} |"

    @classmethod
    def header(cls) -> str:
        names = (
            "scenario",
            "produced",
            "results",
            "distinct",
            "duplicates",
            "missing",
            "dead letters",
            "order violations",
            "note",
        )
        return cls.ROW.format(*names) + "\n" + cls.ROW.format(*(["---"] * 9))

    def row(self) -> str:
        return self.ROW.format(
            self.scenario,
            self.produced,
            self.results,
            self.distinct,
            self.duplicates,
            self.missing,
            self.dead_letters,
            self.order_violations,
            self.note,
        )


@dataclass
class Stream:
    """A numbered stream of events on one input topic, and where its outcomes go."""

    bootstrap: str
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    partitions: int
    group: str
    # (partition, offset) -> event number, for every event produced
    sent: dict[tuple[int, int], int] = field(default_factory=dict)
    poison: set[tuple[int, int]] = field(default_factory=set)

    def settings(self, **extra: str) -> dict[str, str]:
        return {
            "kafka__input_topic": self.input_topic,
            "kafka__output_topic": self.output_topic,
            "kafka__dead_letter_topic": self.dead_letter_topic,
            "kafka__group_id": self.group,
            **extra,
        }

    def publish(
        self,
        faces: list[Path],
        count: int,
        streams: int = 8,
        start: int = 0,
        image_url: str | None = None,
    ) -> None:
        """Publish `count` good events numbered from `start`, streams spread over partitions.

        With `image_url`, event n points at `{image_url}/{n % len(faces)}.png` (a paced
        loopback image server) instead of the local file.
        """
        values = []
        for n in range(start, start + count):
            face = n % len(faces)
            extra = {} if image_url is None else {"image": f"{image_url}/{face}.png"}
            key, value = event_bytes(
                faces[face], stream_id=f"s{n % streams}", event_id=f"n{n:06d}", **extra
            )
            values.append((key, value))
        # Events of one stream share a partition (as a keyed upstream would produce them).
        coords = produce(
            self.bootstrap,
            self.input_topic,
            values,
            spread=None,
            partition_of=lambda i: (start + i) % streams % self.partitions,
        )
        for n, coord in zip(range(start, start + count), coords, strict=True):
            self.sent[coord] = n

    def publish_poison(self, values: list[bytes], partition: int) -> list[tuple[int, int]]:
        coords = produce(
            self.bootstrap,
            self.input_topic,
            [(b"poison", v) for v in values],
            partition_of=lambda _i: partition,
        )
        self.poison.update(coords)
        return coords

    def results(self, timeout_s: float = 120.0, idle_s: float = 1.5) -> list[EmotionResult]:
        """Read results until every good event is covered (or the timeout)."""
        wanted = set(self.sent)

        def covered(records: list[Record]) -> bool:
            seen = {_coord(r) for r in records}
            return seen >= wanted

        records = read(
            self.bootstrap,
            self.output_topic,
            expected=len(wanted),
            timeout_s=timeout_s,
            idle_s=idle_s,
            until=covered,
        )
        return [EmotionResult.model_validate_json(r.value) for r in records]

    def dead_letters(self, timeout_s: float = 30.0) -> list[DeadLetter]:
        records = read(
            self.bootstrap,
            self.dead_letter_topic,
            expected=len(self.poison),
            timeout_s=timeout_s,
            idle_s=1.0,
        )
        return [DeadLetter.model_validate_json(r.value) for r in records]

    def distinct_so_far(self) -> int:
        """How many events have a (committed) result right now."""
        records = read(self.bootstrap, self.output_topic, expected=len(self.sent), timeout_s=1.5)
        return len({_coord(r) for r in records})

    def committed(self) -> dict[int, int]:
        return committed(self.bootstrap, self.group, self.input_topic, self.partitions)

    def report(self, scenario: str, note: str = "", timeout_s: float = 120.0) -> FaultReport:
        """Count what came out, record the report for the summary table, and return it."""
        results = self.results(timeout_s)
        letters = self.dead_letters(timeout_s=5.0 if not self.poison else 30.0)
        coords = [(r.source.partition, r.source.offset) for r in results]
        distinct = set(coords)
        report = FaultReport(
            scenario=scenario,
            produced=len(self.sent) + len(self.poison),
            results=len(results),
            distinct=len(distinct),
            duplicates=len(coords) - len(distinct),
            missing=len(set(self.sent) - distinct),
            dead_letters=len(letters),
            order_violations=order_violations(results),
            note=note,
        )
        REPORTS.append(report)
        print("\n" + FaultReport.header() + "\n" + report.row())
        return report


def _coord(record: Record) -> tuple[int, int]:
    source = json.loads(record.value)["source"]
    return (source["partition"], source["offset"])


def order_violations(results: list[EmotionResult]) -> int:
    """First deliveries of a stream that came out before an earlier-numbered event's."""
    seen: set[str] = set()
    last: dict[str, int] = {}
    violations = 0
    for result in results:  # in output order (one output partition per stream key)
        if result.event_id in seen:
            continue  # a redelivered duplicate, expected in at-least-once mode
        seen.add(result.event_id)
        number = int(result.event_id.removeprefix("n"))
        if number < last.get(result.stream_id, -1):
            violations += 1
        last[result.stream_id] = max(number, last.get(result.stream_id, -1))
    return violations
