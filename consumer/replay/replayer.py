"""`emotion-worker replay`: dead letters back onto the input topic, each at most once.

A replay is a consume-produce loop of its own, in Kafka transactions: the republished
records and the progress of every chosen kind commit together, so a replay that crashes
or is fenced republishes nothing twice (the next run starts from the committed progress,
and the aborted records are never seen by read_committed workers). Progress is kept per
error kind, in a consumer group `<kafka.group_id>.replay.<kind>` that never joins (its
offsets are only committed through the transaction): a letter of a kind that was not
chosen stays replayable by a later run that names it. The dead-letter topic is read up
to its end offsets as they are when the replay starts, so a replay ends even while the
worker keeps adding letters.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from pydantic import ValidationError

from consumer.config import ConfigError, KafkaSettings
from consumer.replay.legacy import from_envelope
from consumer.replay.selection import VERDICTS, Selection, Verdict
from consumer.stream.kafka_io import consumer_config, producer_config, to_record
from schemas import DeadLetter, ErrorKind

# Republished letters per transaction: bounds what one abort throws away.
LETTERS_PER_TRANSACTION = 500


class ReplayError(Exception):
    """The replay could not finish. What its committed transactions republished stays
    (and is not republished again); the rest is left for the next run."""


@dataclass
class ReplayReport:
    """Letters read per (kind, verdict); `kind` is "?" for unreadable records."""

    source: str
    target: str
    dry_run: bool
    counts: Counter[tuple[str, Verdict]] = field(default_factory=Counter)

    @property
    def replayed(self) -> int:
        return sum(n for (_, verdict), n in self.counts.items() if verdict == "replayed")

    def lines(self) -> list[str]:
        """A table, one row per kind seen, then the totals."""
        kinds = sorted({kind for kind, _ in self.counts})
        width = max([len("kind"), *(len(k) for k in kinds)])
        names = [v.replace("_", " ") for v in VERDICTS]
        if self.dry_run:
            names[0] = "would replay"
        rows = [f"{'kind':<{width}}  " + "  ".join(f"{n:>15}" for n in names)]
        for kind in [*kinds, "total"]:
            cells = [
                sum(n for (k, v), n in self.counts.items() if v == verdict and kind in (k, "total"))
                for verdict in VERDICTS
            ]  # the total row counts every kind
            rows.append(f"{kind:<{width}}  " + "  ".join(f"{c:>15}" for c in cells))
        done = "would republish" if self.dry_run else "republished"
        rows.append(f"{done} {self.replayed} dead letter(s) from {self.source} to {self.target}")
        return rows


def progress_group(settings: KafkaSettings, kind: str) -> str:
    return f"{settings.group_id}.replay.{kind}"


class Replayer:
    """One replay run; `run()` returns its report or raises ReplayError."""

    def __init__(
        self,
        settings: KafkaSettings,
        source: str,
        target: str,
        kinds: tuple[ErrorKind, ...],
        since: datetime | None,
        dry_run: bool = False,
        timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.source = source
        self.target = target
        self.kinds = kinds
        self.since = since
        self.dry_run = dry_run
        self.timeout_s = timeout_s
        self.report = ReplayReport(source, target, dry_run)

    def _consumer(self, group: str) -> Consumer:
        config = consumer_config(self.settings)
        config.pop("group.instance.id", None)  # never the worker's static identity
        config.update({"group.id": group, "enable.partition.eof": True})
        return Consumer(config)

    def run(self) -> ReplayReport:
        # One consumer per chosen kind, never subscribed: its group holds that kind's
        # progress, read with committed() and written through the transaction.
        groups = {kind: self._consumer(progress_group(self.settings, kind)) for kind in self.kinds}
        reader = self._consumer(f"{self.settings.group_id}.replay")
        producer: Producer | None = None
        try:
            partitions = self._partitions(reader)
            selection = Selection(self.kinds, self.since, self._progress(groups, partitions))
            if not self.dry_run:
                config = producer_config(self.settings)
                # Fixed: a second replay of the same group fences this one (and a crashed
                # one's open transaction is aborted when the next starts).
                config["transactional.id"] = f"{self.settings.group_id}.replay"
                producer = Producer(config)
                producer.init_transactions(self.timeout_s)
            self._replay(reader, partitions, selection, producer, groups)
        except KafkaException as exc:
            if producer is not None:
                _abort_quietly(producer, self.timeout_s)
            raise ReplayError(f"Kafka refused the replay: {exc.args[0]}") from exc
        finally:
            reader.close()
            for consumer in groups.values():
                consumer.close()
        return self.report

    def _partitions(self, reader: Consumer) -> dict[int, tuple[int, int]]:
        """Each partition of the source: (low, end) offsets, end as of now (read_committed)."""
        meta = reader.list_topics(self.source, timeout=self.timeout_s).topics.get(self.source)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ReplayError(
                f"dead-letter topic {self.source!r} does not exist or has no partitions "
                f"({meta.error if meta else 'not found'}); name it with --from"
            )
        return {
            p: reader.get_watermark_offsets(TopicPartition(self.source, p), self.timeout_s)
            for p in sorted(meta.partitions)
        }

    def _progress(
        self, groups: dict[ErrorKind, Consumer], partitions: dict[int, tuple[int, int]]
    ) -> dict[str, dict[int, int]]:
        progress: dict[str, dict[int, int]] = {}
        for kind, consumer in groups.items():
            committed = consumer.committed(
                [TopicPartition(self.source, p) for p in partitions], self.timeout_s
            )
            progress[kind] = {tp.partition: tp.offset for tp in committed if tp.offset >= 0}
        return progress

    def _replay(
        self,
        reader: Consumer,
        partitions: dict[int, tuple[int, int]],
        selection: Selection,
        producer: Producer | None,
        groups: dict[ErrorKind, Consumer],
    ) -> None:
        next_offset = {p: selection.start(p, low) for p, (low, _end) in partitions.items()}
        pending = {p for p, (_low, end) in partitions.items() if next_offset[p] < end}
        reader.assign([TopicPartition(self.source, p, next_offset[p]) for p in sorted(pending)])
        in_transaction = 0
        if producer is not None:
            producer.begin_transaction()
        idle_since = time.monotonic()
        while pending:
            messages = reader.consume(500, timeout=0.5)
            if messages:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.timeout_s:
                behind = {p: (next_offset[p], partitions[p][1]) for p in sorted(pending)}
                raise ReplayError(f"no records for {self.timeout_s:.0f} s; at/end: {behind}")
            for msg in messages:
                partition = int(msg.partition() or 0)
                if partition not in pending:
                    continue
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    next_offset[partition] = max(next_offset[partition], int(msg.offset() or 0))
                else:
                    in_transaction += self._one(msg, selection, producer)
                    next_offset[partition] = int(msg.offset() or 0) + 1
                if next_offset[partition] >= partitions[partition][1]:
                    pending.discard(partition)
                if producer is not None and in_transaction >= LETTERS_PER_TRANSACTION:
                    self._commit(producer, groups, selection, next_offset)
                    producer.begin_transaction()
                    in_transaction = 0
        if producer is not None:  # the rest, and the progress of a run that found nothing
            self._commit(producer, groups, selection, next_offset)

    def _one(self, msg: Message, selection: Selection, producer: Producer | None) -> int:
        """Judge one record and republish it if chosen; 1 if it was republished."""
        record = to_record(msg)
        letter: DeadLetter | None
        try:
            letter = DeadLetter.from_record(record.key, record.value, record.headers)
        except (ValidationError, ValueError):
            letter = from_envelope(record.value)  # a 0.3.x letter, or not a letter at all
        verdict = selection.verdict(letter, record.partition, record.offset)
        self.report.counts[(letter.error_kind if letter else "?", verdict)] += 1
        if verdict != "replayed" or producer is None or letter is None:
            return 0
        # The record as upstream sent it: from_record left out the worker's emotion.* headers.
        headers: list[tuple[str, str | bytes | None]] = list(letter.headers)
        producer.produce(self.target, value=letter.value, key=letter.key, headers=headers)
        producer.poll(0)
        return 1

    def _commit(
        self,
        producer: Producer,
        groups: dict[ErrorKind, Consumer],
        selection: Selection,
        next_offset: dict[int, int],
    ) -> None:
        """The republished records and every chosen kind's progress, in one transaction."""
        for kind, consumer in groups.items():
            before = selection.progress.get(kind, {})
            # Never backwards: a kind ahead of the others was read again below its mark.
            offsets = [
                TopicPartition(self.source, p, max(offset, before.get(p, 0)))
                for p, offset in sorted(next_offset.items())
            ]
            producer.send_offsets_to_transaction(
                offsets, consumer.consumer_group_metadata(), self.timeout_s
            )
        producer.commit_transaction(self.timeout_s)


def _abort_quietly(producer: Producer, timeout_s: float) -> None:
    # Failing that, the transaction times out on the broker, or the next replay fences it.
    with contextlib.suppress(KafkaException):
        producer.abort_transaction(timeout_s)


def replay(
    settings: KafkaSettings,
    source: str | None,
    target: str | None,
    kinds: tuple[ErrorKind, ...],
    since: datetime | None,
    dry_run: bool,
    echo: Callable[[str], Any] = print,
) -> int:
    """Run one replay and print its report: 0 when done, 1 when Kafka stopped it."""
    source = source or settings.dead_letter_topic
    target = target or settings.input_topic
    if source == target:
        raise ConfigError(f"--from and --to are both {source!r}; replay into the input topic")
    chosen = ", ".join(kinds)
    window = f" that failed since {since.isoformat()}" if since else ""
    echo(f"replaying {chosen} dead letters{window}: {source} -> {target}")
    started = datetime.now(UTC)
    try:
        report = Replayer(settings, source, target, kinds, since, dry_run).run()
    except ReplayError as exc:
        echo(f"emotion-worker replay: {exc}")
        return 1
    for line in report.lines():
        echo(line)
    echo(f"took {(datetime.now(UTC) - started).total_seconds():.1f} s")
    return 0
