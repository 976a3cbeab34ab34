"""The admin client the Kafka checks share, the brokers check, and naming what to fix."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from consumer.config import KafkaSettings
from consumer.preflight.results import CheckResult
from consumer.stream.kafka_io import admin_config

# Settings named in a FAIL/WARN line when the brokers cannot be reached or refuse us.
BOOTSTRAP = 'kafka.bootstrap_servers (and kafka.common_config "security.protocol")'
SASL = 'kafka.common_config "sasl.mechanism" / "sasl.username" / "sasl.password"'
TLS = (
    'kafka.common_config "ssl.ca.location" (broker certificate), "ssl.certificate.location" / '
    '"ssl.key.location" / "ssl.key.password" (client certificate), "security.protocol"'
)


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
        probe.admin = AdminClient(probe.client_config(admin_config(kafka)))
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
    protocol = client_setting(kafka, "security.protocol") or "PLAINTEXT"
    mechanism = client_setting(kafka, "sasl.mechanism")
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


def client_setting(kafka: KafkaSettings, name: str) -> str | None:
    """A librdkafka setting as the producer sees it (common_config, then producer_config)."""
    value = {**kafka.common_config, **kafka.producer_config}.get(name)
    return None if value is None else str(value)
