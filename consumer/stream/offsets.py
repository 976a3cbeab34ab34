"""Which input offsets may be committed: the contiguous done prefix of each partition.

Events of one partition finish out of order (a dead letter can be published before the
result of a slow image that came earlier). An offset is committable only when it and every
earlier tracked offset of its partition are done, i.e. acknowledged by the broker.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

PartitionId = tuple[str, int]


@dataclass
class _PartitionState:
    pending: deque[int] = field(default_factory=deque)  # offsets in the order they were read
    done: set[int] = field(default_factory=set)
    sizes: dict[int, int] = field(default_factory=dict)  # bytes held for each pending offset
    next_commit: int | None = None  # offset to commit (last done of the prefix + 1)
    committed: int | None = None


class OffsetTracker:
    """Thread-safe: offsets are tracked by the poll loop and marked done by delivery reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[PartitionId, _PartitionState] = {}
        self._bytes = 0
        self._done_since_commit = 0

    def assign(self, tp: PartitionId) -> None:
        with self._lock:
            self._partitions.setdefault(tp, _PartitionState())

    def revoke(self, tp: PartitionId) -> None:
        """Forget a partition: later marks for it are ignored, so it is never committed."""
        with self._lock:
            state = self._partitions.pop(tp, None)
            if state is not None:
                self._bytes -= sum(state.sizes.values())

    def owns(self, tp: PartitionId) -> bool:
        with self._lock:
            return tp in self._partitions

    def track(self, tp: PartitionId, offset: int, size: int = 0) -> None:
        """Record an offset as in flight; offsets of a partition must come in increasing order."""
        with self._lock:
            state = self._partitions.setdefault(tp, _PartitionState())
            if state.pending and offset <= state.pending[-1]:
                raise ValueError(f"offset {offset} of {tp} is not after {state.pending[-1]}")
            state.pending.append(offset)
            state.sizes[offset] = size
            self._bytes += size

    def add_size(self, tp: PartitionId, offset: int, size: int) -> None:
        """Account for more memory held by an in-flight event (its decoded faces)."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is not None and offset in state.sizes:
                state.sizes[offset] += size
                self._bytes += size

    def mark_done(self, tp: PartitionId, offset: int) -> None:
        """The event's result or dead letter was acknowledged by the broker."""
        with self._lock:
            state = self._partitions.get(tp)
            if state is None or offset not in state.sizes:
                return  # revoked meanwhile (another worker owns it now), or a repeat
            self._bytes -= state.sizes.pop(offset)
            self._done_since_commit += 1
            state.done.add(offset)
            while state.pending and state.pending[0] in state.done:
                finished = state.pending.popleft()
                state.done.discard(finished)
                state.next_commit = finished + 1

    def in_flight(self, partitions: Iterable[PartitionId] | None = None) -> int:
        """Events read but not yet done, over all partitions or the given ones."""
        with self._lock:
            if partitions is None:
                return sum(len(s.pending) for s in self._partitions.values())
            return sum(
                len(self._partitions[tp].pending) for tp in partitions if tp in self._partitions
            )

    def bytes_in_flight(self) -> int:
        with self._lock:
            return self._bytes

    def done_since_commit(self) -> int:
        with self._lock:
            return self._done_since_commit

    def committable(
        self,
        partitions: Iterable[PartitionId] | None = None,
    ) -> dict[PartitionId, int]:
        """Offsets to commit now (next offset to read), only where they moved since last time."""
        with self._lock:
            wanted = self._partitions.keys() if partitions is None else set(partitions)
            return {
                tp: s.next_commit
                for tp, s in self._partitions.items()
                if tp in wanted and s.next_commit is not None and s.next_commit != s.committed
            }

    def mark_committed(self, offsets: dict[PartitionId, int]) -> None:
        with self._lock:
            self._done_since_commit = 0
            for tp, offset in offsets.items():
                state = self._partitions.get(tp)
                if state is not None:
                    state.committed = offset

    def mark_commit_failed(self, offsets: dict[PartitionId, int]) -> None:
        """A commit was refused: those offsets become committable again."""
        with self._lock:
            for tp, offset in offsets.items():
                state = self._partitions.get(tp)
                if state is not None and state.committed == offset:
                    state.committed = None

    def committed(self) -> dict[PartitionId, int | None]:
        """The last offset committed per owned partition (None: nothing yet)."""
        with self._lock:
            return {tp: s.committed for tp, s in self._partitions.items()}
