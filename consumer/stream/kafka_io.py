"""Thin edges over confluent-kafka: client configs, record copies and topic set-up."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.config import ConfigError, KafkaSettings
from consumer.stream.client_errors import ClientLogThrottle
from consumer.stream.records import InputRecord

# Settings the delivery guarantee depends on; a user override of these is refused.
_CONSUMER_FIXED = {
    "enable.auto.commit": False,  # offsets are committed by the worker, after results
    "enable.auto.offset.store": False,
}
_PRODUCER_FIXED = {
    "enable.idempotence": True,  # no duplicates or reordering from producer retries
    "acks": "all",
}


# librdkafka's own log lines go through the worker's logging instead of raw stderr,
# each kind at most once per interval (a dead bootstrap address means dozens a second).
CLIENT_LOGGER = logging.getLogger("librdkafka")
CLIENT_LOGGER.addFilter(ClientLogThrottle())


class KafkaConfigError(ConfigError):
    """A librdkafka override would break the worker's delivery guarantee."""


def _check_fixed(overrides: dict[str, Any], fixed: dict[str, Any], section: str) -> None:
    for name, required in fixed.items():
        if name in overrides and str(overrides[name]).lower() != str(required).lower():
            raise KafkaConfigError(
                f"kafka.{section}[{name!r}]={overrides[name]!r} is not allowed: the worker "
                f"needs {name}={required} to commit only published events; remove it"
            )


def consumer_config(
    settings: KafkaSettings,
    error_cb: Callable[[KafkaError], None] | None = None,
    on_commit: Callable[[KafkaError | None, list[Any]], None] | None = None,
    stats_cb: Callable[[str], None] | None = None,
    statistics_interval_s: float = 5.0,
) -> dict[str, Any]:
    """librdkafka consumer settings: ours, then the user's common and consumer overrides."""
    overrides = {**settings.common_config, **settings.consumer_config}
    _check_fixed(overrides, _CONSUMER_FIXED, "consumer_config")
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": settings.group_id,
        "auto.offset.reset": "earliest",
        # Incremental rebalances: a scale-up does not stop every worker's partitions.
        "partition.assignment.strategy": "cooperative-sticky",
        # Upstream may write frames in transactions; never read aborted ones.
        "isolation.level": "read_committed",
        "logger": CLIENT_LOGGER,
    }
    if settings.group_instance_id:
        config["group.instance.id"] = settings.group_instance_id
    if error_cb is not None:
        config["error_cb"] = error_cb
    if on_commit is not None:
        config["on_commit"] = on_commit
    if stats_cb is not None:
        # Consumer lag per partition comes from these statistics (served by poll).
        config["stats_cb"] = stats_cb
        config["statistics.interval.ms"] = int(statistics_interval_s * 1000)
    return {**config, **overrides, **_CONSUMER_FIXED}


def transactional_id(settings: KafkaSettings) -> str:
    """Stable per worker identity, so a restarted pod fences its previous incarnation."""
    identity = settings.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"
    return f"{settings.group_id}-{identity}"


def producer_config(
    settings: KafkaSettings, error_cb: Callable[[KafkaError], None] | None = None
) -> dict[str, Any]:
    """librdkafka producer settings: idempotent, acks=all, small linger for batching."""
    overrides = {**settings.common_config, **settings.producer_config}
    _check_fixed(overrides, _PRODUCER_FIXED, "producer_config")
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "linger.ms": 5,
        "compression.type": "lz4",
        "logger": CLIENT_LOGGER,
    }
    if settings.processing_guarantee == "exactly_once":
        config["transactional.id"] = transactional_id(settings)
    if error_cb is not None:
        config["error_cb"] = error_cb
    return {**config, **overrides, **_PRODUCER_FIXED}


def admin_config(settings: KafkaSettings) -> dict[str, Any]:
    """The producer's librdkafka settings (security included) less the producer-only ones."""
    config = producer_config(settings)
    for name in ("transactional.id", "enable.idempotence", "acks", "linger.ms", "compression.type"):
        config.pop(name, None)
    return config


def to_record(message: Message) -> InputRecord:
    """Copy what the pipeline needs out of a consumed message."""
    raw_headers = message.headers() or []
    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
    headers = tuple((k, v.encode() if isinstance(v, str) else v) for k, v in pairs)
    timestamp_type, timestamp = message.timestamp()
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("a consumed message without topic, partition or offset")
    return InputRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        key=message.key(),
        value=message.value() or b"",
        headers=headers,
        timestamp_ms=timestamp if timestamp_type else None,
        read_at=time.monotonic(),
    )


def run_topics(prefix: str, run_id: str) -> dict[str, str]:
    """Input, output and dead-letter topic names of one demo or benchmark run."""
    return {
        "input_topic": f"{prefix}-frames-{run_id}",
        "output_topic": f"{prefix}-emotions-{run_id}",
        "dead_letter_topic": f"{prefix}-dead-letters-{run_id}",
    }


def ensure_topics(
    bootstrap_servers: str,
    topics: Iterable[str],
    partitions: int = 1,
    extra_config: dict[str, Any] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create the topics that do not exist yet (for the demo, tests and development)."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, **(extra_config or {})})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [
        NewTopic(name, num_partitions=partitions, replication_factor=-1)
        for name in dict.fromkeys(topics)
        if name not in existing
    ]
    if not wanted:
        return
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc
