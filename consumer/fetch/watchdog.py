"""The whole-fetch deadline: one shared watchdog thread that cuts off overdue fetches.

``fetch.timeout_s`` bounds the whole fetch (redirects and body included);
``fetch.connect_timeout_s`` bounds the TCP connect to each address (and each TLS handshake
read) and ``fetch.read_timeout_s`` the silence before any one read returns, each never
beyond what is left of ``timeout_s`` (`Fetch.timeout`). Per-read timeouts alone cannot hold
the total: a server that trickles its headers a byte a second satisfies every read. So each
fetch also registers its deadline with one shared watchdog thread (a heap of deadlines, not
a thread per fetch), which shuts down the socket of any fetch still running at its deadline;
the fetch then fails with a retriable ``took over {timeout_s}s``. The watchdog shuts the
socket down through a duplicate descriptor that is closed only under its lock, and leaves
closing the connection to the fetch: it never acts on a descriptor number the fetch has
closed and the process may have reused. (Name resolution cannot be interrupted: a slow DNS
answer is bounded by the resolver's own timeouts, not by these.)
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass

from consumer.config import FetchSettings
from consumer.errors import EventError


class Watch:
    """One fetch's deadline, and the socket it uses now as a duplicate the watchdog owns."""

    __slots__ = ("deadline", "done", "dup", "fired")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False  # the watchdog found this fetch still running at its deadline
        self.done = False  # fired, or the fetch has finished
        # A dup() of the connection's descriptor: shutting it down stops the connection,
        # and it is only closed under the watchdog's lock, so a descriptor number the fetch
        # has closed (and the process may have reused) is never shut down by mistake.
        self.dup: socket.socket | None = None


class Watchdog:
    """One daemon thread that shuts down the connection of any fetch past its deadline.

    Socket timeouts bound each read; this bounds their sum. Shutting a socket down (unlike
    closing it) wakes a thread blocked reading it, in plain TCP and under TLS alike.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Watch]] = []
        self._order = itertools.count()  # ties: never compare Watch objects
        self._live = 0  # watches in the heap that are not done
        self._thread: threading.Thread | None = None

    def start(self, deadline: float) -> Watch:
        watch = Watch(deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), watch))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="http-fetch-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()  # an earlier deadline than the one it sleeps towards
        return watch

    def attach(self, watch: Watch, sock: socket.socket) -> None:
        """`sock` is the fetch's connection now (shut down at once if already too late)."""
        dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        with self._cond:
            old, watch.dup = watch.dup, dup
            if watch.fired:
                _shutdown(dup)
            if old is not None:
                old.close()

    def detach(self, watch: Watch) -> None:
        """The fetch is about to close or pool its connection: hands off."""
        with self._cond:
            old, watch.dup = watch.dup, None
            if old is not None:
                old.close()

    def stop(self, watch: Watch) -> None:
        with self._cond:
            old, watch.dup = watch.dup, None
            if old is not None:
                old.close()
            if not watch.done:
                watch.done = True
                self._live -= 1
                # Finished watches stay in the heap until their deadline; drop them in bulk
                # when they outnumber the live ones, so the heap stays near the in-flight size.
                if len(self._heap) > 2 * self._live + 64:
                    self._heap = [entry for entry in self._heap if not entry[2].done]
                    heapq.heapify(self._heap)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                watch = heapq.heappop(self._heap)[2]
                watch.fired = watch.done = True
                self._live -= 1
                if watch.dup is not None:
                    _shutdown(watch.dup)


def _shutdown(sock: socket.socket) -> None:
    # Not connected (yet, or any more): the fetch's own timeouts and checks apply.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Fetch:
    """What every step of one fetch needs: its URI, settings and deadline."""

    uri: str
    settings: FetchSettings
    watch: Watch

    def timeout(self, limit: float) -> float:
        """`limit` (connect or read timeout), cut to what is left of the total deadline."""
        left = self.watch.deadline - time.monotonic()
        if left <= 0 or self.watch.fired:
            raise self.took_over()
        return min(limit, left)

    def overdue(self) -> bool:
        return self.watch.fired or time.monotonic() >= self.watch.deadline

    def took_over(self) -> EventError:
        return EventError(
            "image_fetch_failed",
            f"{self.uri} took over {self.settings.timeout_s}s",
            retriable=True,
        )


_watchdog = Watchdog()


def start(deadline: float) -> Watch:
    """Watch a new fetch that must be done by `deadline` (time.monotonic())."""
    return _watchdog.start(deadline)


def attach(watch: Watch, sock: socket.socket) -> None:
    """`sock` is the fetch's connection now (shut down at once if already too late)."""
    _watchdog.attach(watch, sock)


def detach(watch: Watch) -> None:
    """The fetch is about to close or pool its connection: hands off."""
    _watchdog.detach(watch)


def stop(watch: Watch) -> None:
    """The fetch is over, done or failed: its deadline no longer matters."""
    _watchdog.stop(watch)


def _reset_after_fork() -> None:
    """A forked child must not share the parent's lock state or thread."""
    global _watchdog
    _watchdog = Watchdog()


os.register_at_fork(after_in_child=_reset_after_fork)
