"""`emotion-worker check`: the settings tried against the cluster and the checkpoint, read-only.

Each check is a small function that returns CheckResult(status, name, detail, setting);
`run_preflight` prints one line per check and returns the exit code: 0 when nothing FAILs,
1 when something does, 2 when the configuration itself is wrong (as `run` does).

Nothing is written: no message is published, no offset committed, no group joined. The
Kafka checks use the worker's own client configs (kafka_io.consumer_config and
producer_config, so common_config's security settings apply), and every broker call is
bounded by `timeout_s`. Secrets from the configuration never appear in a line.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AclOperation,
    AdminClient,
    ConfigResource,
    ResourceType,
)

from consumer.config import ConfigError, KafkaSettings, WorkerSettings, load_settings
from consumer.kafka_io import consumer_config, producer_config, transactional_id

Status = Literal["OK", "WARN", "FAIL"]

# Settings named in a FAIL/WARN line when the brokers cannot be reached or refuse us.
BOOTSTRAP = 'kafka.bootstrap_servers (and kafka.common_config "security.protocol")'
SASL = 'kafka.common_config "sasl.mechanism" / "sasl.username" / "sasl.password"'
TLS = (
    'kafka.common_config "ssl.ca.location" (broker certificate), "ssl.certificate.location" / '
    '"ssl.key.location" / "ssl.key.password" (client certificate), "security.protocol"'
)
_SECRET_WORDS = ("password", "secret", "token", "sasl.oauthbearer.config", "sasl.jaas")
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


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One line of the report; `setting` names what to fix when status is WARN or FAIL."""

    status: Status
    name: str
    detail: str
    setting: str | None = None


def format_result(result: CheckResult, secrets: Iterable[str] = ()) -> str:
    """`STATUS  name  detail [fix: setting]`, with every secret value replaced by ***."""
    line = f"{result.status:<4}  {result.name:<17}  {result.detail}"
    if result.status != "OK" and result.setting:
        line += f"  [fix: {result.setting}]"
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            line = line.replace(secret, "***")
    return line


def exit_code(results: Sequence[CheckResult]) -> int:
    """2 if the configuration does not load, 1 if any check FAILs, else 0."""
    if any(r.status == "FAIL" and r.name == "config" for r in results):
        return 2
    return 1 if any(r.status == "FAIL" for r in results) else 0


def secret_values(settings: KafkaSettings) -> set[str]:
    """The values of secret-looking librdkafka settings, to be masked in any output."""
    values = set()
    for config in (settings.common_config, settings.consumer_config, settings.producer_config):
        for name, value in config.items():
            if any(word in name.lower() for word in _SECRET_WORDS) and str(value):
                values.add(str(value))
    return values


def version_text() -> str:
    """`emotion-worker X.Y.Z` and the versions of the libraries that matter, without torch."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        import confluent_kafka

        librdkafka = str(confluent_kafka.libversion()[0])
    except ImportError:
        librdkafka = "not installed"
    return (
        f"emotion-worker {version('emotion-worker')}\n"
        f"confluent-kafka {version('confluent-kafka')} (librdkafka {librdkafka}), "
        f"torch {version('torch')}, transformers {version('transformers')}"
    )


# --- the run ---------------------------------------------------------------------------


def run_preflight(
    config_file: Path | None,
    overrides: dict[str, Any],
    *,
    timeout_s: float = 10.0,
    model: bool = True,
    echo: Callable[[str], None] = print,
) -> int:
    """Load the settings, run every check, print one line each; the exit code."""
    try:
        settings = load_settings(config_file, overrides)
    except ConfigError as exc:  # its message masks secrets already
        result = CheckResult("FAIL", "config", str(exc), "the setting named above")
        echo(format_result(result))
        return 2
    secrets = secret_values(settings.kafka)
    results: list[CheckResult] = []
    for result in run_checks(settings, config_file, timeout_s=timeout_s, model=model):
        results.append(result)
        echo(format_result(result, secrets))
    return exit_code(results)


def run_checks(
    settings: WorkerSettings,
    config_file: Path | None = None,
    *,
    timeout_s: float = 10.0,
    model: bool = True,
) -> Iterator[CheckResult]:
    """Every check in order, each yielded as soon as it is done."""
    config = check_config(settings, config_file)
    yield config
    if config.status == "FAIL":
        return
    kafka = KafkaProbe(settings.kafka, timeout_s)
    brokers = check_brokers(kafka)
    yield brokers
    if brokers.status == "FAIL":
        yield CheckResult(
            "WARN",
            "topics",
            "topics, group-read and producer-write not checked: the brokers check failed",
            "see brokers",
        )
    else:
        yield from check_topics(kafka)
        yield check_group(kafka)
        yield check_producer(kafka)
    if model:
        yield check_model(settings)
    yield check_health_port(settings)


# --- 1. config -------------------------------------------------------------------------


def check_config(settings: WorkerSettings, config_file: Path | None = None) -> CheckResult:
    """The settings loaded; the worker's client configs can be built from them."""
    try:
        consumer_config(settings.kafka)
        producer_config(settings.kafka)
    except ConfigError as exc:  # an override of a setting the delivery guarantee needs
        return CheckResult("FAIL", "config", str(exc), "kafka.*_config")
    kafka = settings.kafka
    source = str(config_file) if config_file is not None else "no config file"
    protocol = _client_setting(kafka, "security.protocol") or "PLAINTEXT"
    return CheckResult(
        "OK",
        "config",
        f"{source} + environment + flags; {kafka.processing_guarantee}, group "
        f"{kafka.group_id!r}, security.protocol={protocol}",
    )


# --- 2-5. Kafka --------------------------------------------------------------------------


@dataclass
class KafkaProbe:
    """Admin client and the facts later checks share; errors reported by librdkafka."""

    settings: KafkaSettings
    timeout_s: float
    errors: list[KafkaError] = field(default_factory=list)
    admin: Any = None
    # topic name -> TopicDescription, or the KafkaError describing it failed with
    descriptions: dict[str, Any] = field(default_factory=dict)
    logger: logging.Logger = field(init=False)

    def __post_init__(self) -> None:
        # librdkafka's own log lines are diagnostics here, not output: keep them off stderr.
        self.logger = logging.getLogger("consumer.preflight.librdkafka")
        self.logger.propagate = False
        if not self.logger.handlers:
            self.logger.addHandler(logging.NullHandler())

    def client_config(self, base: dict[str, Any]) -> dict[str, Any]:
        return {**base, "logger": self.logger, "error_cb": self.errors.append}

    def admin_config(self) -> dict[str, Any]:
        """The producer's config (common_config included) without what only producers use."""
        config = producer_config(self.settings)
        for name in ("transactional.id", "enable.idempotence", "acks", "linger.ms"):
            config.pop(name, None)
        return self.client_config(config)

    def wait(self, future: Any, poll: Callable[[float], Any]) -> Any:
        """future.result(), serving callbacks meanwhile; stops early on a definite refusal."""
        deadline = time.monotonic() + self.timeout_s
        while not future.done():
            poll(0.1)
            refusal = self.refusal()
            if refusal is not None:
                raise KafkaException(refusal)
            if time.monotonic() > deadline:
                raise KafkaException(
                    KafkaError(KafkaError._TIMED_OUT, f"no answer within {self.timeout_s:g} s")
                )
        return future.result()

    def refusal(self) -> KafkaError | None:
        """An authentication or TLS error: retrying within the timeout will not help."""
        for error in self.errors:
            if error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
                return error
        return None


def diagnose(probe: KafkaProbe, error: KafkaError | None) -> tuple[str, str]:
    """(detail, setting) of a failed broker call, from the call's error and the client's."""
    seen = [e for e in (probe.refusal(), error, *probe.errors) if e is not None]
    for err in seen:
        if err.code() == KafkaError._AUTHENTICATION:
            return f"authentication failed: {err.str()}", SASL
        if err.code() == KafkaError._SSL:
            return f"TLS failed: {err.str()}", TLS
    transport = [e for e in probe.errors if e.code() == KafkaError._TRANSPORT]
    if transport:
        return f"brokers not reachable: {transport[-1].str()}", BOOTSTRAP
    if error is not None and error.code() == KafkaError._INVALID_ARG:
        # "Failed to create ...: ssl.ca.location failed: ...": name the setting if it is ours.
        kafka = probe.settings
        for section in ("common_config", "consumer_config", "producer_config"):
            named = [key for key in getattr(kafka, section) if key in error.str()]
            if named:
                return f"the client could not be created: {error.str()}", (
                    f'kafka.{section} "{max(named, key=len)}"'
                )
        return f"the client could not be created: {error.str()}", "kafka.common_config"
    if any(e.code() == KafkaError._ALL_BROKERS_DOWN for e in probe.errors):
        return (
            "brokers not reachable: every broker connection was closed (a "
            "security.protocol that differs from the listener's?)",
            BOOTSTRAP,
        )
    text = error.str() if error is not None else "no answer"
    return f"brokers not reachable: {text}", BOOTSTRAP


def check_brokers(probe: KafkaProbe) -> CheckResult:
    """An admin client with the worker's security settings reaches the cluster."""
    kafka = probe.settings
    try:
        probe.admin = AdminClient(probe.admin_config())
        future = probe.admin.describe_cluster(request_timeout=probe.timeout_s)
        cluster = probe.wait(future, probe.admin.poll)
    except KafkaException as exc:
        error = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        if error is not None and error.code() > 0:  # a broker refused the request: it answered
            return CheckResult(
                "OK", "brokers", f"{kafka.bootstrap_servers} answered ({error.str()})"
            )
        detail, setting = diagnose(probe, error)
        return CheckResult("FAIL", "brokers", f"{kafka.bootstrap_servers}: {detail}", setting)
    protocol = _client_setting(kafka, "security.protocol") or "PLAINTEXT"
    mechanism = _client_setting(kafka, "sasl.mechanism")
    security = protocol + (f" {mechanism}" if mechanism and "SASL" in protocol.upper() else "")
    controller = cluster.controller
    return CheckResult(
        "OK",
        "brokers",
        f"{len(cluster.nodes)} broker(s), cluster {cluster.cluster_id}, controller "
        f"{controller.host}:{controller.port}, {security}"
        if controller is not None
        else f"{len(cluster.nodes)} broker(s), cluster {cluster.cluster_id}, {security}",
    )


def _topic_roles(kafka: KafkaSettings) -> list[tuple[str, str, str]]:
    """(check name, setting, topic) of the input, output and dead-letter topics."""
    return [
        ("input-topic", "kafka.input_topic", kafka.input_topic),
        ("output-topic", "kafka.output_topic", kafka.output_topic),
        ("dead-letter-topic", "kafka.dead_letter_topic", kafka.dead_letter_topic),
    ]


def check_topics(probe: KafkaProbe) -> list[CheckResult]:
    """The three topics exist; their partitions and cleanup.policy."""
    kafka = probe.settings
    roles = _topic_roles(kafka)
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
    policies = _cleanup_policies(probe, [n for n in names if not _is_error(probe, n)])
    results = []
    for check, setting, topic in roles:
        results.append(_topic_result(probe, check, setting, topic, policies.get(topic)))
    return results


def _is_error(probe: KafkaProbe, topic: str) -> bool:
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
            for _, setting, topic in _topic_roles(kafka)[1:]
            if not _is_error(probe, topic)
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


def _client_setting(kafka: KafkaSettings, name: str) -> str | None:
    """A librdkafka setting as the producer sees it (common_config, then producer_config)."""
    value = {**kafka.common_config, **kafka.producer_config}.get(name)
    return None if value is None else str(value)


# --- 6. model ----------------------------------------------------------------------------


def model_setting(message: str) -> str:
    """The model.* setting a ModelLoadError message is about."""
    if "model.device" in message:
        return "model.device"
    if "model.fp8" in message:
        return "model.fp8"
    if "merges with the end of model.prompt" in message:
        return "model.prompt"
    if "answer word" in message or "answer_words" in message or "labels" in message:
        return "model.labels / model.answer_words"
    if "model.prompt" in message:
        return "model.prompt"
    return "model.path"


def check_model(settings: WorkerSettings) -> CheckResult:
    """The worker's loader loads the checkpoint, the label tokens work, one forward runs."""
    try:
        from PIL import Image

        from consumer.engine import EmotionEngine

        started = time.perf_counter()
        engine = EmotionEngine.load(settings.model, max_batch_size=settings.batch.max_batch_size)
        loaded = time.perf_counter()
        # A grey face, resized and normalised like every face the worker will see.
        scores = engine.classify([Image.new("RGB", (224, 224), (128, 128, 128))])[0]
        forward_s = time.perf_counter() - loaded
    except ConfigError as exc:  # ModelLoadError names the path or setting and the fix
        return CheckResult("FAIL", "model", str(exc), model_setting(str(exc)))
    except Exception as exc:  # a forward that fails (out of memory, a broken checkpoint)
        return CheckResult(
            "FAIL",
            "model",
            f"model.path {settings.model.path}: {type(exc).__name__}: {exc}",
            f"model.path / model.device ({settings.model.device}) / model.dtype",
        )
    probabilities = list(scores.scores.values())
    if not all(math.isfinite(p) for p in probabilities) or abs(sum(probabilities) - 1) > 1e-6:
        return CheckResult(
            "FAIL",
            "model",
            f"the forward pass gave non-finite scores {probabilities} on {engine.device} "
            f"{str(engine.dtype).removeprefix('torch.')}",
            "model.dtype / model.path",
        )
    multi = sum(1 for seq in engine.label_sequences if len(seq) > 1)
    tokens = "each one token" if not multi else f"{multi} of several tokens (scored as sequences)"
    return CheckResult(
        "OK",
        "model",
        f"{engine.model_id} on {engine.device} {str(engine.dtype).removeprefix('torch.')}: "
        f"{len(engine.labels)} labels, {tokens}; load {loaded - started:.1f} s, one forward "
        f"{forward_s * 1000:.0f} ms",
    )


# --- 7. health port ----------------------------------------------------------------------


def check_health_port(settings: WorkerSettings) -> CheckResult:
    """The health server's port(s) can be bound right now."""
    health = settings.health
    if not health.enabled:
        return CheckResult("OK", "health-port", "health server disabled")
    if health.port == 0:
        return CheckResult("OK", "health-port", "port 0: any free port")
    devices = settings.processes.devices
    count = len(devices) if isinstance(devices, tuple) else 1
    ports = [health.port + i for i in range(count)]
    taken = []
    for port in ports:
        try:
            with socket.create_server((health.host, port)):
                pass
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            taken.append(f"{health.host}:{port} ({reason})")
    if taken:
        return CheckResult(
            "WARN",
            "health-port",
            f"cannot listen on {', '.join(taken)}: another process has it, or the host "
            "is not an address of this machine",
            "health.port / health.host",
        )
    shown = ", ".join(str(p) for p in ports)
    return CheckResult("OK", "health-port", f"{health.host}:{shown} free")
