"""Kafka: the brokers, the topics, librdkafka's own settings and how offsets are committed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from consumer.config.base import Section


class KafkaSettings(Section):
    """Kafka: brokers, topics, librdkafka settings and how offsets are committed."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Brokers to connect to first, as comma-separated `host:port` pairs.",
    )
    group_id: str = Field(
        default="emotion-worker", description="Consumer group that all workers join."
    )
    input_topic: str = Field(default="frames", description="Topic the frame events are read from.")
    output_topic: str = Field(
        default="emotions", description="Topic the results are written to, keyed by `stream_id`."
    )
    dead_letter_topic: str = Field(
        default="frames.dead-letter",
        description="Topic of the dead letters (events that failed), keyed by the input key.",
    )
    common_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "Any librdkafka setting by its own dotted name (e.g. `security.protocol`: "
            "`SASL_SSL`), for both the consumer and the producer. `enable.auto.commit`, "
            "`enable.auto.offset.store`, `enable.idempotence` and `acks` are fixed by the "
            "worker and an override is refused."
        ),
    )
    consumer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "librdkafka settings for the consumer only; they override `kafka.common_config`."
        ),
    )
    producer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "librdkafka settings for the producer only; they override `kafka.common_config`."
        ),
    )
    poll_timeout_s: float = Field(
        default=0.1, gt=0, le=5, description="Longest wait in one poll, in seconds."
    )
    commit_interval_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "How often done offsets are committed, in seconds (or after `kafka.commit_every` "
            "events, whichever comes first; always on revoke and on shutdown)."
        ),
    )
    commit_every: int = Field(
        default=1000, ge=1, description="Also commit after this many finished events."
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description=(
            "`at_least_once`: results, then offsets; duplicates only from the uncommitted "
            "window. `exactly_once`: results and offsets in one Kafka transaction; "
            "`read_committed` readers see each result once (README: Delivery guarantees)."
        ),
    )
    # Static membership (Kubernetes: the pod name): a restart within session.timeout.ms
    # causes no rebalance, and in exactly_once mode it is the stable transactional id that
    # fences the previous incarnation.
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=249,
        description=(
            "Static membership id (Kubernetes: the pod name); in `exactly_once` mode it also "
            "names the transactional id. None: dynamic membership."
        ),
    )
    revoke_timeout_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description=(
            "How long a revoke waits for in-flight events of the revoked partitions to "
            "finish, in seconds."
        ),
    )
