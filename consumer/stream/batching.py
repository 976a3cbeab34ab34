"""Micro-batching: group prepared events into batches of faces by size and by waiting time.

Events are taken in the order they were read (a FIFO of fetch futures), so results of one
partition, and so of one stream, are published in input order even though images are
fetched concurrently.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from consumer.stream.records import Item, PreparedEvent


def face_count(item: Item) -> int:
    """The faces an item brings to the model (faces skipped for low quality do not count)."""
    return len(item.model_crops) if isinstance(item, PreparedEvent) else 0


class MicroBatcher:
    """Hands the engine thread batches of at most max_faces faces (a bigger event goes alone)."""

    def __init__(self, max_faces: int, max_wait_s: float, idle_poll_s: float = 0.05) -> None:
        if max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {max_faces}")
        self.max_faces = max_faces
        self.max_wait_s = max_wait_s
        self._idle_poll_s = idle_poll_s
        self._queue: queue.SimpleQueue[Future[Item]] = queue.SimpleQueue()
        self._head: Future[Item] | None = None  # taken from the queue, not yet in a batch

    def put(self, future: Future[Item]) -> None:
        self._queue.put(future)

    def empty(self) -> bool:
        return self._head is None and self._queue.empty()

    def next_batch(self, stop: threading.Event) -> list[Item]:
        """The next batch; [] only when `stop` is set and nothing is waiting."""
        items: list[Item] = []
        faces = 0
        deadline: float | None = None
        while True:
            wait = self._idle_poll_s if deadline is None else max(0.0, deadline - time.monotonic())
            item = self._take(wait)
            if item is None:
                if items and deadline is not None and time.monotonic() >= deadline:
                    return items
                if not items and stop.is_set() and self.empty():
                    return items
                continue
            count = face_count(item)
            if items and faces + count > self.max_faces:
                return items  # the head stays for the next batch
            items.append(item)
            self._head = None
            faces += count
            if deadline is None:
                deadline = time.monotonic() + self.max_wait_s
            if faces >= self.max_faces:
                return items

    def _take(self, wait_s: float) -> Item | None:
        """The head item if its fetch finishes within wait_s; it stays the head until used."""
        if self._head is None:
            try:
                self._head = (
                    self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                return None
        try:
            return self._head.result(timeout=wait_s)
        except TimeoutError:
            return None
