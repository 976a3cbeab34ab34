"""One line of the `check` report: the result type, its formatting, secret masking, exit code."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.config import KafkaSettings

Status = Literal["OK", "WARN", "FAIL"]

_SECRET_WORDS = ("password", "secret", "token", "sasl.oauthbearer.config", "sasl.jaas")


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
