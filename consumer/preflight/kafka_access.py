"""The access checks: the group's offsets can be read, the producer can write (and the ACLs)."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AclOperation  # type: ignore[attr-defined]

from consumer.preflight.kafka_probe import BOOTSTRAP, KafkaProbe, diagnose
from consumer.preflight.kafka_topics import is_error, topic_roles
from consumer.preflight.results import CheckResult
from consumer.stream.kafka_io import consumer_config, producer_config, transactional_id

# Broker answers worth retrying within the timeout (the group coordinator moving, loading).
_RETRIABLE = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError.REQUEST_TIMED_OUT,
}

# Errors an idempotent producer reports through error_cb when its principal is refused.
_REFUSED = {KafkaError.CLUSTER_AUTHORIZATION_FAILED, KafkaError.TOPIC_AUTHORIZATION_FAILED}


def _operations(description: Any) -> set[Any] | None:
    """The principal's authorized operations on a topic or group; None if not reported."""
    operations = getattr(description, "authorized_operations", None)
    return set(operations) if operations else None


def _permission_notes(
    probe: KafkaProbe, subjects: list[tuple[str, str, Any, Any]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, unknown, allowed) descriptions for (what, setting, description, operation)."""
    missing, unknown, allowed = [], [], []
    for what, setting, description, operation in subjects:
        operations = _operations(description)
        name = operation.name
        if operations is None:
            unknown.append(f"{name} on {what}")
        elif operation in operations or AclOperation.ALL in operations:
            allowed.append(f"{name} on {what}")
        else:
            missing.append(f"{name} on {what} ({setting})")
    return missing, unknown, allowed


def check_group(probe: KafkaProbe) -> CheckResult:
    """The group's committed offsets of the input partitions can be fetched (no join)."""
    kafka = probe.settings
    description = probe.descriptions.get(kafka.input_topic)
    if description is None or isinstance(description, KafkaError):
        return CheckResult(
            "WARN", "group-read", "not checked: the input topic is not usable", "kafka.input_topic"
        )
    partitions = [TopicPartition(kafka.input_topic, p.id) for p in description.partitions]
    consumer = None
    try:
        consumer = Consumer(probe.client_config(consumer_config(kafka)))
        committed = _committed(probe, consumer, partitions)
    except KafkaException as exc:
        error = exc.args[0]
        if error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
            return CheckResult(
                "FAIL",
                "group-read",
                f"the principal may not use group {kafka.group_id!r} ({error.str()}); grant "
                "READ on the group",
                "kafka.group_id",
            )
        if error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            return CheckResult(
                "FAIL",
                "group-read",
                f"the principal may not read {kafka.input_topic!r} ({error.str()}); grant "
                "READ on the topic",
                "kafka.input_topic",
            )
        detail, setting = diagnose(probe, error)
        return CheckResult(
            "FAIL",
            "group-read",
            f"committed offsets of group {kafka.group_id!r}: {detail}",
            setting if setting != BOOTSTRAP else "kafka.consumer_config / kafka.group_id",
        )
    finally:
        if consumer is not None:
            consumer.close()
    done = sum(1 for tp in committed if tp.offset >= 0)
    detail = (
        f"group {kafka.group_id!r}: committed offsets on {done}/{len(committed)} partition(s) "
        f"of {kafka.input_topic!r}"
    )
    group = _describe_group(probe)
    if isinstance(group, KafkaError):
        return CheckResult(
            "WARN",
            "group-read",
            f"{detail}; READ permissions not checked: describing the group failed ({group.str()})",
            "kafka.group_id",
        )
    state = group.state.name.lower()
    detail += (
        " (no such group yet)"
        if state == "dead"
        else f" (state {state}, {len(group.members)} member(s))"
    )
    missing, unknown, allowed = _permission_notes(
        probe,
        [
            (f"group {kafka.group_id!r}", "kafka.group_id", group, AclOperation.READ),
            (f"topic {kafka.input_topic!r}", "kafka.input_topic", description, AclOperation.READ),
        ],
    )
    if missing:
        return CheckResult(
            "FAIL",
            "group-read",
            f"{detail}; the principal lacks {', '.join(missing)}",
            "kafka.group_id / kafka.input_topic (grant the ACLs)",
        )
    if unknown:
        return CheckResult(
            "WARN",
            "group-read",
            f"{detail}; could not check {', '.join(unknown)}: the broker reported no "
            "authorized operations (the principal may not describe its ACLs)",
            "kafka.group_id / kafka.input_topic (verify the ACLs)",
        )
    return CheckResult("OK", "group-read", f"{detail}; {', '.join(allowed)} allowed")


def _committed(
    probe: KafkaProbe, consumer: Any, partitions: list[TopicPartition]
) -> list[TopicPartition]:
    """consumer.committed(), retried while the group coordinator is moving, within the timeout."""
    deadline = time.monotonic() + probe.timeout_s
    while True:
        left = max(0.5, deadline - time.monotonic())
        try:
            committed: list[TopicPartition] = consumer.committed(partitions, timeout=left)
        except KafkaException as exc:
            refusal = probe.refusal()
            if refusal is not None:
                raise KafkaException(refusal) from exc
            if exc.args[0].code() in _RETRIABLE and time.monotonic() < deadline - 0.5:
                time.sleep(0.2)
                continue
            raise
        for tp in committed:
            if tp.error is not None:
                raise KafkaException(tp.error)
        return committed


def _describe_group(probe: KafkaProbe) -> Any:
    group_id = probe.settings.group_id
    try:
        futures = probe.admin.describe_consumer_groups(
            [group_id], request_timeout=probe.timeout_s, include_authorized_operations=True
        )
        return probe.wait(futures[group_id], probe.admin.poll)
    except KafkaException as exc:
        return exc.args[0]


def check_producer(probe: KafkaProbe) -> CheckResult:
    """The worker's producer config works: exactly_once inits a throw-away transactional id."""
    kafka = probe.settings
    config = producer_config(kafka)
    exactly_once = kafka.processing_guarantee == "exactly_once"
    if exactly_once:
        # Another id than the worker's: fencing the real one would abort its transaction.
        config["transactional.id"] = f"{transactional_id(kafka)}-check"
    producer = None
    probe.errors.clear()
    try:
        producer = Producer(probe.client_config(config))
        if exactly_once:
            producer.init_transactions(probe.timeout_s)
            done = f"init_transactions OK (transactional.id {config['transactional.id']!r})"
        else:
            for topic in (kafka.output_topic, kafka.dead_letter_topic):
                producer.list_topics(topic, timeout=probe.timeout_s)
            producer.poll(min(1.0, probe.timeout_s))  # an idempotence (PID) refusal shows here
            fatal = [e for e in probe.errors if e.fatal() or e.code() in _REFUSED]
            if fatal:
                raise KafkaException(fatal[0])
            done = "idempotent producer connected"
    except KafkaException as exc:
        error = exc.args[0]
        detail, setting = diagnose(probe, error)
        if error.code() == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
            detail = (
                f"the principal may not use transactional.id {config['transactional.id']!r} "
                f"({error.str()}); grant WRITE and DESCRIBE on transactional ids with the "
                f"prefix '{kafka.group_id}-'"
            )
            setting = "kafka.group_id / kafka.group_instance_id (transactional id ACL)"
        elif error.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
            detail = f"idempotent writes are refused ({error.str()}); grant IDEMPOTENT_WRITE"
            setting = 'the principal\'s ACLs (kafka.common_config "sasl.username")'
        elif error.code() == KafkaError._TIMED_OUT and exactly_once:
            detail = (
                f"no transaction coordinator answered within {probe.timeout_s:g} s "
                f"({error.str()}); check the brokers' transaction.state.log settings"
            )
            setting = "kafka.processing_guarantee"
        elif error.code() > 0:
            detail = f"{error.str()}"
            setting = "kafka.producer_config"
        return CheckResult("FAIL", "producer-write", detail, setting)
    finally:
        if producer is not None:
            producer.flush(0)
    missing, unknown, allowed = _permission_notes(
        probe,
        [
            (f"topic {topic!r}", setting, probe.descriptions.get(topic), AclOperation.WRITE)
            for _, setting, topic in topic_roles(kafka)[1:]
            if not is_error(probe, topic)
        ],
    )
    if missing:
        return CheckResult(
            "FAIL",
            "producer-write",
            f"{done}; the principal lacks {', '.join(missing)}",
            "kafka.output_topic / kafka.dead_letter_topic (grant the ACLs)",
        )
    if unknown:
        return CheckResult(
            "WARN",
            "producer-write",
            f"{done}; could not check {', '.join(unknown)}: the broker reported no authorized "
            "operations (the principal may not describe its ACLs)",
            "kafka.output_topic / kafka.dead_letter_topic (verify the ACLs)",
        )
    return CheckResult(
        "OK",
        "producer-write",
        f"{done}; {', '.join(allowed)} allowed" if allowed else done,
    )
