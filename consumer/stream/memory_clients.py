"""What the in-memory broker's consumer and producer share.

The clients (consumer.stream.memory_consumer, memory_producer) read the librdkafka config
dict they are given (callbacks, group.id, isolation.level, partition.assignment.strategy,
transactional.id, message.timeout.ms, ...), and serve every callback (error_cb, stats_cb,
on_commit, rebalance, delivery reports) on the caller's thread from consume(), poll() or
flush(), never while holding the broker's lock.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError

if TYPE_CHECKING:
    from consumer.stream.memory_broker import MemoryBroker

Call = Callable[[], Any]


def flag(value: object, default: bool) -> bool:
    return default if value is None else str(value).lower() in ("true", "1")


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None or timeout < 0 else time.monotonic() + timeout


def wait_s(now: float, deadline: float | None, timer: float) -> float | None:
    until = min(timer, deadline if deadline is not None else float("inf"))
    return None if until == float("inf") else max(0.0, until - now)


class ClientBase:
    """What both clients share: config, fault errors for error_cb, statistics, close."""

    kind = "client"

    def __init__(self, broker: MemoryBroker, config: dict[str, Any]) -> None:
        self._broker = broker
        self.config = dict(config)
        self._error_cb: Callable[[KafkaError], None] | None = config.get("error_cb")
        self._stats_cb: Callable[[str], None] | None = config.get("stats_cb")
        self._stats_every_s = int(config.get("statistics.interval.ms", 0)) / 1000
        self._next_stats = time.monotonic() + self._stats_every_s
        bootstrap = str(config.get("bootstrap.servers", broker.address))
        self._first_broker = bootstrap.split(",")[0]
        self._errors: deque[KafkaError] = deque()
        self._next_error_at = 0.0
        self._in_outage = False
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.kind} closed")

    def _fault_errors_locked(self, now: float) -> None:
        broker = self._broker
        if broker._reachable():
            self._in_outage = False
            return
        if now < self._next_error_at:
            return
        self._next_error_at = now + broker.error_interval_s
        where = f"{self._first_broker}/bootstrap"
        if broker.auth_failing:
            self._errors.append(
                KafkaError(
                    KafkaError._AUTHENTICATION,
                    f"{where}: SASL authentication error: Authentication failed during "
                    "authentication due to invalid credentials with SASL mechanism "
                    "SCRAM-SHA-512 (after 2ms in state AUTH_REQ)",
                )
            )
        else:
            self._errors.append(
                KafkaError(
                    KafkaError._TRANSPORT,
                    f"{where}: Connect to ipv4#{self._first_broker} failed: Connection "
                    "refused (after 0ms in state CONNECT)",
                )
            )
            if not self._in_outage:
                down = KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")
                self._errors.append(down)
        self._in_outage = True

    def _common_calls_locked(self, now: float) -> list[Call]:
        self._fault_errors_locked(now)
        calls: list[Call] = []
        error_cb, stats_cb = self._error_cb, self._stats_cb
        while self._errors:
            error = self._errors.popleft()
            if error_cb is not None:
                calls.append(partial(error_cb, error))
        if stats_cb is not None and self._stats_every_s > 0 and now >= self._next_stats:
            self._next_stats = now + self._stats_every_s
            calls.append(partial(stats_cb, json.dumps(self._statistics_locked())))
        return calls

    def _common_timer_locked(self) -> float:
        timer = float("inf")
        if not self._broker._reachable():
            timer = self._next_error_at
        if self._stats_cb is not None and self._stats_every_s > 0:
            timer = min(timer, self._next_stats)
        return timer

    def _statistics_locked(self) -> dict[str, Any]:
        return self._broker._statistics(self.kind, {}, None)
