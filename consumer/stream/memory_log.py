"""The in-memory broker's log: stored records, transactions, commits and group metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError, Message

from consumer.stream.memory_groups import TP

Headers = list[tuple[str, bytes | None]]


@dataclass(frozen=True)
class GroupMetadata:
    """What consumer_group_metadata() returns (opaque in confluent-kafka too)."""

    group_id: str
    generation: int
    member_id: str | None


@dataclass(eq=False)
class Transaction:
    """One producer transaction; hashable by identity."""

    transactional_id: str
    state: str = "open"  # open | committed | aborted
    first_offsets: dict[TP, int] = field(default_factory=dict)
    offsets: dict[str, dict[TP, int]] = field(default_factory=dict)  # group -> offsets
    members: dict[str, str | None] = field(default_factory=dict)  # group -> member id
    error: KafkaError | None = None  # a failed delivery: it can only abort


@dataclass(eq=False)
class StoredRecord:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    timestamp_ms: int
    seq: int  # broker-wide append order (see CommitRecord.seq)
    txn: Transaction | None = None
    control: bool = False  # a transaction marker: takes an offset, never delivered

    def visible(self, read_committed: bool) -> bool:
        if self.control:
            return False
        if self.txn is None or not read_committed:
            return True  # read_uncommitted sees open and aborted records too
        return self.txn.state == "committed"

    def message(self, topic: str, partition: int) -> Message:
        return Message(
            topic=topic,
            partition=partition,
            offset=self.offset,
            key=self.key,
            value=self.value,
            headers=list(self.headers) if self.headers else None,
            timestamp=(TIMESTAMP_CREATE_TIME, self.timestamp_ms),
        )


class Partition:
    def __init__(self) -> None:
        self.records: list[StoredRecord] = []
        self.open: dict[Transaction, int] = {}  # open transaction -> its first offset here

    def end(self) -> int:
        return len(self.records)

    def stable_end(self) -> int:
        """The last stable offset: read_committed readers stop before open transactions."""
        return min(self.open.values(), default=self.end())


@dataclass(frozen=True)
class CommitRecord:
    """One committed offset, for tests: who committed it, and whether it owned it then."""

    group: str
    member_id: str | None
    topic: str
    partition: int
    offset: int
    owned: bool
    seq: int  # the last record appended before this commit (seqs only grow)
    transactional: bool
