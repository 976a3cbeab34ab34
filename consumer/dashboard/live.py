"""The summaries held, and the open pages they are pushed to as server-sent events."""

from __future__ import annotations

import json
import threading
from collections import deque
from typing import Any

from consumer.config import FER_LABELS
from consumer.dashboard.store import SummaryStore
from schemas.summary import WindowSummary


def format_event(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    """One server-sent event (the WHATWG `text/event-stream` format), blank line included.

    Every line of `data` gets its own `data:` field (the browser joins them with newlines);
    CR and LF are line ends there, so neither may hide inside `event` or `id`.
    """
    lines = []
    for name, value in (("event", event), ("id", event_id)):
        if value is not None:
            if "\n" in value or "\r" in value:
                raise ValueError(f"an SSE {name} must be one line, got {value!r}")
            lines.append(f"{name}: {value}")
    text = data.replace("\r\n", "\n").replace("\r", "\n")
    lines += [f"data: {line}" for line in text.split("\n")]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def format_comment(text: str = "keep-alive") -> bytes:
    """An SSE comment: ignored by the browser, it keeps proxies from closing an idle stream."""
    return f": {text}\n\n".encode()


class Subscription:
    """What one open page has not been sent yet: at most `limit` summaries.

    A page that falls further behind (a stalled connection) is not waited for: it is
    marked overflowed, its stream is closed, and the browser's EventSource reconnects and
    starts again from a fresh snapshot. The reader thread never blocks on a slow page.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.overflowed = False
        self.closed = False
        self._items: deque[str] = deque()
        self._changed = threading.Condition()

    def push(self, item: str) -> None:
        with self._changed:
            if len(self._items) >= self.limit:
                self.overflowed = True
            else:
                self._items.append(item)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def next(self, timeout_s: float) -> list[str] | None:
        """What arrived, oldest first; [] after `timeout_s` of nothing; None: stop sending."""
        with self._changed:
            self._changed.wait_for(
                lambda: bool(self._items) or self.closed or self.overflowed, timeout_s
            )
            if self.closed or self.overflowed:
                return None
            items = list(self._items)
            self._items.clear()
            return items


class LiveSummaries:
    """The store, and the pages subscribed to it, behind one lock: a page's snapshot and
    the summaries pushed to it afterwards never miss or repeat one."""

    def __init__(
        self, store: SummaryStore, topic: str, max_subscribers: int = 32, backlog: int = 2000
    ) -> None:
        self.store = store
        self.topic = topic
        self.max_subscribers = max_subscribers
        self.backlog = backlog
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()

    def add(self, summary: WindowSummary) -> bool:
        """Keep `summary` and push it to every open page; False when it changed nothing."""
        with self._lock:
            if not self.store.add(summary):
                return False
            payload = json.dumps(summary.model_dump(mode="json"), separators=(",", ":"))
            for subscription in self._subscribers:
                subscription.push(payload)
            return True

    @property
    def open_pages(self) -> int:
        """How many pages are subscribed now."""
        with self._lock:
            return len(self._subscribers)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "labels": list(FER_LABELS),
            "max_streams": self.store.max_streams,
            **self.store.snapshot(),
        }

    def subscribe(self) -> tuple[dict[str, Any], Subscription] | None:
        """(snapshot, subscription) for a new page; None when too many are open."""
        with self._lock:
            if len(self._subscribers) >= self.max_subscribers:
                return None
            subscription = Subscription(self.backlog)
            self._subscribers.add(subscription)
            return self._snapshot(), subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(subscription)
        subscription.close()

    def close(self) -> None:
        """End every open page's stream (the server is stopping)."""
        with self._lock:
            subscriptions, self._subscribers = self._subscribers, set()
        for subscription in subscriptions:
            subscription.close()
