"""`emotion-worker check`: the settings tried against the cluster and the checkpoint, read-only.

Each check is a small function that returns CheckResult(status, name, detail, setting);
`run_preflight` prints one line per check and returns the exit code: 0 when nothing FAILs,
1 when something does, 2 when the configuration itself is wrong (as `run` does).

Nothing is written: no message is published, no offset committed, no group joined. The
Kafka checks use the worker's own client configs (kafka_io.consumer_config and
producer_config, so common_config's security settings apply), and every broker call is
bounded by `timeout_s`. Secrets from the configuration never appear in a line.

Modules, in the direction imports go: `runner` runs the checks of `local_checks`,
`kafka_probe` (brokers), `kafka_topics` and `kafka_access` (group, producer); they all
build on `results`. `versions` is the `--version` text.
"""

from consumer.preflight.local_checks import (
    check_config,
    check_file_roots,
    check_health_port,
    check_model,
    model_setting,
)
from consumer.preflight.results import CheckResult, exit_code, format_result, secret_values
from consumer.preflight.runner import run_checks, run_preflight
from consumer.preflight.versions import version_text

__all__ = [
    "CheckResult",
    "check_config",
    "check_file_roots",
    "check_health_port",
    "check_model",
    "exit_code",
    "format_result",
    "model_setting",
    "run_checks",
    "run_preflight",
    "secret_values",
    "version_text",
]
