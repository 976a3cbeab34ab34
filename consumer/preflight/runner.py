"""The `check` run: load the settings, run every check in order, print a line each."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from consumer.config import ConfigError, WorkerSettings, load_settings
from consumer.preflight.kafka_access import check_group, check_producer
from consumer.preflight.kafka_probe import KafkaProbe, check_brokers
from consumer.preflight.kafka_topics import check_topics
from consumer.preflight.local_checks import (
    check_config,
    check_file_roots,
    check_health_port,
    check_model,
)
from consumer.preflight.results import CheckResult, exit_code, format_result, secret_values


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
    if (file_roots := check_file_roots(settings)) is not None:
        yield file_roots
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
