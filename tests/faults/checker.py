"""The fault suite's checker: numbered events in, then what came out, offset by offset.

Each scenario publishes N uniquely numbered events (event_id "n000042", stream "s3") and
perhaps poison, lets its fault happen, then reads the output and dead-letter topics with
a read_committed reader up to their end offsets and accounts for every input offset:

- each offset produced has an outcome: a result (good events) or a dead letter (poison),
  so produced == distinct offsets covered by results and dead letters;
- a result names the event sent at its offset (event_id), a dead letter carries its bytes;
- no outcome refers to an offset never sent (or to another topic);
- after a fault, nothing below the offsets the group had committed before it comes out
  again (duplicates only at offsets >= the last commit before the fault);
- per-stream order of first deliveries.

`tally` does the accounting on plain outcomes (tests/faults/test_checker.py feeds it bad
ones); `Stream.report` reads the topics, tallies, records the row for the summary table
printed at the end of the run (and .cache/fault-report.md), and fails on any of the above.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from schemas import DeadLetter, EmotionResult
from tests.support.events import event_bytes
from tests.support.kafka import (
    NO_COMMIT,
    Record,
    TopicReader,
    commit_progress,
    committed,
    produce,
    wait_for_commit_progress,
)

REPORTS: list[FaultReport] = []

Coord = tuple[int, int]  # (partition, offset) on the input topic


@dataclass(frozen=True)
class Sent:
    """What was produced at one input offset."""

    event_id: str | None  # None: no event id can be read from the value
    value: bytes
    poison: bool = False  # expected to become a dead letter, not a result


@dataclass(frozen=True)
class Outcome:
    """One record on the output or dead-letter topic, reduced to what the checks need."""

    kind: str  # "result" or "dead letter"
    topic: str  # the source (input) topic it names
    partition: int
    offset: int
    event_id: str | None
    stream_id: str | None = None
    value: bytes | None = None  # a dead letter's copy of the input record's value
    timestamp_ms: int = 0  # when the worker produced it (CreateTime)
    error_kind: str | None = None  # a dead letter's kind (not_json, image_fetch_failed, ...)

    @property
    def coord(self) -> Coord:
        return (self.partition, self.offset)

    @classmethod
    def of_result(cls, record: Record) -> Outcome:
        result = EmotionResult.model_validate_json(record.value)
        source = result.source
        return cls(
            "result",
            source.topic,
            source.partition,
            source.offset,
            result.event_id,
            result.stream_id,
            None,
            record.timestamp_ms,
        )

    @classmethod
    def of_dead_letter(cls, record: Record) -> Outcome:
        letter = DeadLetter.from_record(record.key, record.value, record.headers)
        source = letter.source
        return cls(
            "dead letter",
            source.topic,
            source.partition,
            source.offset,
            letter.event_id,
            None,
            letter.value,
            record.timestamp_ms,
            letter.error_kind,
        )


@dataclass(frozen=True)
class Fault:
    """A fault the worker went through (a kill, a stop, a failure), and when.

    `committed` is the group's committed offsets read right after it: for a process that
    is gone, what it had committed before the fault.
    """

    name: str
    at_ms: int  # wall clock, ms since the epoch, after the faulty process was gone
    committed: Mapping[int, int]


@dataclass
class FaultReport:
    scenario: str
    produced: int
    results: int
    dead_letters: int
    distinct: int  # input offsets with a result or a dead letter
    duplicates: int  # outcomes beyond the first for an offset
    dup_below_commit: int  # outcomes produced after a fault for an offset committed before it
    missing: int  # input offsets with neither a result nor a dead letter
    wrong_event: int  # a result naming another event, a dead letter with other bytes
    unsent: int  # outcomes for an offset (or topic) never produced to
    misrouted: int  # a good event dead-lettered, or a poison event with a result
    order_violations: int
    note: str = ""
    problems: list[str] = field(default_factory=list, compare=False)

    ROW = (
        "| {:<34} | {:>8} | {:>7} | {:>12} | {:>8} | {:>10} | {:>16} | {:>7} | {:>11} "
        "| {:>6} | {:>9} | {:>16} | {} |"
    )
    NAMES = (
        "scenario",
        "produced",
        "results",
        "dead letters",
        "distinct",
        "duplicates",
        "dup below commit",
        "missing",
        "wrong event",
        "unsent",
        "misrouted",
        "order violations",
        "note",
    )

    @classmethod
    def header(cls) -> str:
        return cls.ROW.format(*cls.NAMES) + "\n" + cls.ROW.format(*(["---"] * len(cls.NAMES)))

    def row(self) -> str:
        return self.ROW.format(
            self.scenario,
            self.produced,
            self.results,
            self.dead_letters,
            self.distinct,
            self.duplicates,
            self.dup_below_commit,
            self.missing,
            self.wrong_event,
            self.unsent,
            self.misrouted,
            self.order_violations,
            self.note,
        )

    @property
    def complete(self) -> bool:
        """Every offset produced has exactly the outcome expected of it, and nothing else came."""
        return (
            self.missing == self.wrong_event == self.unsent == self.misrouted == 0
            and self.dup_below_commit == 0
            and self.distinct == self.produced
        )


def tally(
    scenario: str,
    input_topic: str,
    sent: Mapping[Coord, Sent],
    outcomes: list[Outcome],
    faults: Sequence[Fault] = (),
    note: str = "",
) -> FaultReport:
    """Account for every input offset: see the module docstring."""
    problems: list[str] = []
    per_coord: dict[Coord, list[Outcome]] = defaultdict(list)
    unsent = wrong = misrouted = 0
    for outcome in outcomes:
        where = f"{outcome.kind} for {outcome.partition}@{outcome.offset}"
        expected = sent.get(outcome.coord)
        if outcome.topic != input_topic or expected is None:
            unsent += 1
            problems.append(f"{where} of {outcome.topic}: nothing was produced there")
            continue
        per_coord[outcome.coord].append(outcome)
        if (outcome.kind == "result") == expected.poison:
            misrouted += 1
            problems.append(f"{where}: expected a {'dead letter' if expected.poison else 'result'}")
        if outcome.kind == "result" and outcome.event_id != expected.event_id:
            wrong += 1
            problems.append(f"{where} names {outcome.event_id}, sent {expected.event_id}")
        if outcome.kind == "dead letter" and (
            outcome.value != expected.value
            or (outcome.event_id is not None and outcome.event_id != expected.event_id)
        ):
            wrong += 1
            problems.append(f"{where} ({outcome.event_id}) is not the record sent there")
    missing = sorted(set(sent) - set(per_coord))
    for partition, offset in missing[:20]:
        problems.append(f"{partition}@{offset} ({sent[(partition, offset)].event_id}): no outcome")

    below = 0
    for coord, copies in per_coord.items():
        for copy in copies:
            after = [
                f
                for f in faults
                if copy.timestamp_ms > f.at_ms
                and copy.offset < f.committed.get(copy.partition, NO_COMMIT)
            ]
            if after:
                below += 1
                fault = after[0]
                problems.append(
                    f"{copy.kind} for {coord[0]}@{coord[1]} again after {fault.name}, which "
                    f"had committed {fault.committed.get(coord[0])} on partition {coord[0]}"
                )

    results = [o for o in outcomes if o.kind == "result"]
    return FaultReport(
        scenario=scenario,
        produced=len(sent),
        results=len(results),
        dead_letters=len(outcomes) - len(results),
        distinct=len(per_coord),
        duplicates=sum(len(c) - 1 for c in per_coord.values()),
        dup_below_commit=below,
        missing=len(missing),
        wrong_event=wrong,
        unsent=unsent,
        misrouted=misrouted,
        order_violations=order_violations(results),
        note=note,
        problems=problems,
    )


def order_violations(results: list[Outcome]) -> int:
    """First deliveries of a stream that came out before an earlier-numbered event's."""
    seen: set[str | None] = set()
    last: dict[str | None, int] = {}
    violations = 0
    for result in results:  # in output order (one output partition per stream key)
        if result.event_id in seen:
            continue  # a redelivered duplicate, expected in at-least-once mode
        seen.add(result.event_id)
        try:
            number = int(str(result.event_id).removeprefix("n"))
        except ValueError:
            continue  # not a numbered event (wrong events are counted elsewhere)
        if number < last.get(result.stream_id, -1):
            violations += 1
        last[result.stream_id] = max(number, last.get(result.stream_id, -1))
    return violations


def _event_id(value: bytes) -> str | None:
    try:
        event_id = json.loads(value).get("event_id")
    except (ValueError, AttributeError):
        return None
    return event_id if isinstance(event_id, str) else None


@dataclass
class Stream:
    """A numbered stream of events on one input topic, and where its outcomes go."""

    bootstrap: str
    input_topic: str
    output_topic: str
    dead_letter_topic: str
    partitions: int
    group: str
    # (partition, offset) -> event number, for every good event produced
    sent: dict[Coord, int] = field(default_factory=dict)
    poison: set[Coord] = field(default_factory=set)
    # (partition, offset) -> what was produced there, good events and poison alike
    produced: dict[Coord, Sent] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    _reader: TopicReader | None = None
    _outcomes: list[Outcome] = field(default_factory=list)

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
        values: list[tuple[bytes | None, bytes]] = []
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
        for n, coord, (_, value) in zip(range(start, start + count), coords, values, strict=True):
            self.sent[coord] = n
            self.produced[coord] = Sent(f"n{n:06d}", value)

    def publish_poison(self, values: list[bytes], partition: int) -> list[Coord]:
        coords = produce(
            self.bootstrap,
            self.input_topic,
            [(b"poison", v) for v in values],
            partition_of=lambda _i: partition,
        )
        self.poison.update(coords)
        for coord, value in zip(coords, values, strict=True):
            self.produced[coord] = Sent(_event_id(value), value, poison=True)
        return coords

    # ---- reading what came out -----------------------------------------------------------

    def _read(self) -> TopicReader:
        if self._reader is None:
            self._reader = TopicReader(self.bootstrap, [self.output_topic, self.dead_letter_topic])
        return self._reader

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def outcomes(self) -> list[Outcome]:
        """Every outcome read so far, in output order (parsed once each)."""
        records = self._read().records
        for record in records[len(self._outcomes) :]:
            if record.topic == self.output_topic:
                self._outcomes.append(Outcome.of_result(record))
            else:
                self._outcomes.append(Outcome.of_dead_letter(record))
        return self._outcomes

    def _covered(self) -> bool:
        return {o.coord for o in self.outcomes()} >= set(self.produced)

    def wait_for_outcomes(self, timeout_s: float = 120.0, idle_s: float = 0.0) -> bool:
        """Read until every offset produced has an outcome (True) or the timeout (False).

        Then `idle_s` more, and up to the end offsets of that moment either way.
        """
        reader = self._read()
        done = reader.wait(lambda _records: self._covered(), timeout_s)
        if done and idle_s:
            reader.wait(lambda _records: False, idle_s)
        reader.catch_up()
        return done

    def results(self, timeout_s: float = 120.0, idle_s: float = 1.5) -> list[EmotionResult]:
        """Wait until every offset has an outcome (or the timeout); the results so far."""
        self.wait_for_outcomes(timeout_s, idle_s)
        return [
            EmotionResult.model_validate_json(r.value) for r in self._read().of(self.output_topic)
        ]

    def result_records(self) -> list[Record]:
        """The output topic's records read so far (with their timestamps)."""
        return self._read().of(self.output_topic)

    def dead_letters(self, timeout_s: float = 30.0) -> list[DeadLetter]:
        self.wait_for_outcomes(timeout_s)
        records = self._read().of(self.dead_letter_topic)
        return [DeadLetter.from_record(r.key, r.value, r.headers) for r in records]

    def distinct_so_far(self) -> int:
        """How many good events have a (committed) result now: read to the end offsets."""
        self._read().catch_up()
        return len({o.coord for o in self.outcomes() if o.kind == "result"} & set(self.sent))

    def wait_for_results(self, count: int, timeout_s: float = 90.0) -> None:
        """Wait until `count` good events have a result; fail at the timeout."""

        def enough(_records: list[Record]) -> bool:
            return len({o.coord for o in self.outcomes() if o.kind == "result"}) >= count

        if not self._read().wait(enough, timeout_s):
            raise AssertionError(f"fewer than {count} results within {timeout_s:.0f} s")

    # ---- commits and faults --------------------------------------------------------------

    def committed(self) -> dict[int, int]:
        return committed(self.bootstrap, self.group, self.input_topic, self.partitions)

    def last_commit(self) -> dict[int, int]:
        """The committed offsets at the last fault (nothing before the first)."""
        return dict(self.faults[-1].committed) if self.faults else {}

    def wait_for_commit_progress(
        self, running: Callable[[], bool], timeout_s: float = 60.0
    ) -> dict[int, int]:
        """Wait for a commit past the last fault's while the worker runs (see kafka.py)."""
        return wait_for_commit_progress(self.committed, self.last_commit(), timeout_s, running)

    def commits_at_faults(self) -> str:
        """Offsets committed in all at each fault, for a note: "0 -> 39 -> 55 -> 114"."""
        sums = [sum(max(o, 0) for o in f.committed.values()) for f in self.faults]
        return " -> ".join(str(n) for n in [0, *sums])

    def mark_fault(self, name: str) -> Fault:
        """Record a fault once the faulty process is gone: now, and the offsets it committed.

        Fails if the commits moved back since the previous fault.
        """
        before = self.last_commit()
        fault = Fault(name, time.time_ns() // 1_000_000, self.committed())
        assert commit_progress(before, fault.committed) >= 0, (
            f"committed offsets moved back at {name}: {before} -> {dict(fault.committed)}"
        )
        self.faults.append(fault)
        return fault

    def report(self, scenario: str, note: str = "", timeout_s: float = 120.0) -> FaultReport:
        """Account for every offset, record the row for the summary table, fail if incomplete."""
        self.wait_for_outcomes(timeout_s, idle_s=1.0)
        report = tally(
            scenario, self.input_topic, self.produced, list(self.outcomes()), self.faults, note
        )
        REPORTS.append(report)
        print("\n" + FaultReport.header() + "\n" + report.row())
        assert report.complete, "\n".join(report.problems[:40]) or "distinct != produced"
        return report
