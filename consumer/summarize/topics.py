"""The summarizer's three topics: their names, and checking (or creating) them at start."""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.config import WorkerSettings
from consumer.stream.kafka_io import admin_config

# The state topic: compacted (only each window's latest record counts), in small segments
# so that compaction, which never touches the active segment, keeps what a restore reads
# near the live state: open windows are rewritten every commit (each record carries the
# window's result ids), which with the broker's 1 GiB / 7 day segments would leave a
# partition's restore reading up to a gigabyte of superseded records.
STATE_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    "segment.bytes": str(64 * 1024 * 1024),
    "segment.ms": str(15 * 60 * 1000),
    "min.cleanable.dirty.ratio": "0.2",
}


class TopicError(RuntimeError):
    """A topic is missing or unfit; the message says which and what to do."""


@dataclass(frozen=True)
class SummaryTopics:
    results: str
    summaries: str
    state: str


def topic_names(settings: WorkerSettings) -> SummaryTopics:
    """The topics as configured, defaults filled in (results: the worker's output topic)."""
    s = settings.summarize
    results = s.results_topic or settings.kafka.output_topic
    if results == s.summaries_topic:
        raise TopicError(
            f"the results topic and summarize.summaries_topic are both {results!r}; give "
            "summarize.summaries_topic a topic of its own"
        )
    return SummaryTopics(results, s.summaries_topic, s.state_topic or f"{s.summaries_topic}.state")


def prepare_topics(settings: WorkerSettings, topics: SummaryTopics, timeout_s: float) -> int:
    """Check the topics, create the missing ones if allowed; the results topic's partitions.

    The state topic is compacted (only the latest record per window counts) and needs a
    partition for every results partition: partition p of it holds the state of results
    partition p.
    """
    admin = AdminClient(admin_config(settings.kafka))
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise TopicError(f"cannot list the topics: {exc.args[0]}") from exc
    meta = existing.get(topics.results)
    if meta is None or meta.error is not None or not meta.partitions:
        raise TopicError(
            f"results topic {topics.results!r} does not exist (the worker's kafka.output_topic, "
            "or summarize.results_topic): start the worker first, or name the topic"
        )
    partitions = len(meta.partitions)
    wanted = {topics.summaries: {}, topics.state: STATE_TOPIC_CONFIG}
    missing = [name for name in wanted if name not in existing]
    if missing and not settings.summarize.create_topics:
        raise TopicError(
            f"topic(s) {', '.join(missing)} do not exist and summarize.create_topics is "
            f"false: create them ({topics.state} compacted, with {partitions} partitions)"
        )
    if missing:
        _create(admin, [NewTopic(n, partitions, config=wanted[n]) for n in missing], timeout_s)
    state_partitions = _partitions(admin, topics.state, timeout_s)
    if state_partitions < partitions:
        raise TopicError(
            f"state topic {topics.state!r} has {state_partitions} partitions, the results "
            f"topic {partitions}: partition p of it holds the state of results partition p; "
            f"add partitions (kafka-topics --alter --partitions {partitions})"
        )
    return partitions


def _partitions(admin: AdminClient, topic: str, timeout_s: float) -> int:
    """The topic's partition count, once its metadata shows them (a new topic: shortly)."""
    deadline = time.monotonic() + timeout_s
    while True:
        meta = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return len(meta.partitions)
        if time.monotonic() >= deadline:
            return 0
        time.sleep(0.2)


def _create(admin: AdminClient, new: list[NewTopic], timeout_s: float) -> None:
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # another replica's
                raise TopicError(f"could not create topic {name}: {exc.args[0]}") from exc
