"""The topic checks: input, output and dead-letter topics exist, with a usable cleanup.policy."""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException, TopicCollection
from confluent_kafka.admin import ConfigResource, ResourceType  # type: ignore[attr-defined]

from consumer.config import KafkaSettings
from consumer.preflight.kafka_probe import KafkaProbe, diagnose
from consumer.preflight.results import CheckResult


def topic_roles(kafka: KafkaSettings) -> list[tuple[str, str, str]]:
    """(check name, setting, topic) of the input, output and dead-letter topics."""
    return [
        ("input-topic", "kafka.input_topic", kafka.input_topic),
        ("output-topic", "kafka.output_topic", kafka.output_topic),
        ("dead-letter-topic", "kafka.dead_letter_topic", kafka.dead_letter_topic),
    ]


def check_topics(probe: KafkaProbe) -> list[CheckResult]:
    """The three topics exist; their partitions and cleanup.policy."""
    kafka = probe.settings
    roles = topic_roles(kafka)
    names = list(dict.fromkeys(topic for _, _, topic in roles))
    try:
        futures = probe.admin.describe_topics(
            TopicCollection(names),
            request_timeout=probe.timeout_s,
            include_authorized_operations=True,
        )
    except KafkaException as exc:
        detail, setting = diagnose(probe, exc.args[0])
        return [CheckResult("FAIL", name, detail, setting) for name, _, _ in roles]
    for name, future in futures.items():
        try:
            probe.descriptions[name] = probe.wait(future, probe.admin.poll)
        except KafkaException as exc:
            probe.descriptions[name] = exc.args[0]
    policies = _cleanup_policies(probe, [n for n in names if not is_error(probe, n)])
    results = []
    for check, setting, topic in roles:
        results.append(_topic_result(probe, check, setting, topic, policies.get(topic)))
    return results


def is_error(probe: KafkaProbe, topic: str) -> bool:
    return isinstance(probe.descriptions.get(topic), KafkaError)


def _cleanup_policies(probe: KafkaProbe, topics: list[str]) -> dict[str, str | KafkaError]:
    """cleanup.policy of each topic, or the error reading its configs failed with."""
    if not topics:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in topics]
    policies: dict[str, str | KafkaError] = {}
    try:
        futures = probe.admin.describe_configs(resources, request_timeout=probe.timeout_s)
    except KafkaException as exc:
        return {name: exc.args[0] for name in topics}
    for resource, future in futures.items():
        try:
            entries = probe.wait(future, probe.admin.poll)
            entry = entries.get("cleanup.policy")
            policies[resource.name] = str(entry.value) if entry is not None else "delete"
        except KafkaException as exc:
            policies[resource.name] = exc.args[0]
    return policies


def _topic_result(
    probe: KafkaProbe, check: str, setting: str, topic: str, policy: str | KafkaError | None
) -> CheckResult:
    kafka = probe.settings
    description = probe.descriptions[topic]
    if check != "input-topic" and topic == kafka.input_topic:
        return CheckResult(
            "FAIL",
            check,
            f"{topic!r} is also the input topic: the worker would consume its own output",
            setting,
        )
    if isinstance(description, KafkaError):
        if description.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return CheckResult(
                "FAIL",
                check,
                f"topic {topic!r} does not exist; create it (kafka-topics.sh --bootstrap-server "
                f"{kafka.bootstrap_servers} --create --topic {topic} --partitions N) or name "
                "an existing one",
                setting,
            )
        if description.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            return CheckResult(
                "FAIL",
                check,
                f"topic {topic!r} is missing or the principal may not DESCRIBE it "
                f"({description.str()}); grant DESCRIBE/{_needed(check)} on it",
                setting,
            )
        detail, fix = diagnose(probe, description)
        return CheckResult("FAIL", check, f"topic {topic!r}: {detail}", fix)
    partitions = len(description.partitions)
    detail = f"{topic!r}: {partitions} partition(s)"
    if isinstance(policy, KafkaError):
        return CheckResult(
            "WARN",
            check,
            f"{detail}; cleanup.policy not checked: {policy.str()} (DESCRIBE_CONFIGS on the "
            "topic is needed to read it)",
            setting,
        )
    if policy is None:
        return CheckResult("OK", check, detail)
    detail += f", cleanup.policy={policy}"
    if "compact" in policy:
        why = {
            "input-topic": "frames of the same key may be compacted away before the worker "
            "reads them",
            "output-topic": "compaction keeps only the latest result per stream_id, and older "
            "results are dropped",
            "dead-letter-topic": "compaction keeps only the latest dead letter per key, and a "
            "compacted topic refuses dead letters of events without a key",
        }[check]
        return CheckResult(
            "WARN",
            check,
            f"{detail}: {why}; use cleanup.policy=delete",
            f"{setting} (or the topic's cleanup.policy)",
        )
    return CheckResult("OK", check, detail)


def _needed(check: str) -> str:
    return "READ" if check == "input-topic" else "WRITE"
