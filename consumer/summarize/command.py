"""The `emotion-worker summarize` command line: its flags, and running it.

Imported by the CLI at start-up, so it imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.config import WorkerSettings, flag_overrides

# Flag -> (section, field); flags beat the environment and the config file.
_FLAGS: dict[str, tuple[str, str]] = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "group_id": ("summarize", "group_id"),
    "results_topic": ("summarize", "results_topic"),
    "summaries_topic": ("summarize", "summaries_topic"),
    "state_topic": ("summarize", "state_topic"),
    "window_s": ("summarize", "window_s"),
    "grace_s": ("summarize", "grace_s"),
    "idle_close_s": ("summarize", "idle_close_s"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
}


def add_summarize_parser(sub: Any) -> None:
    """Add `summarize` to the CLI's subcommands (`sub` is argparse's subparsers action)."""
    cmd = sub.add_parser(
        "summarize",
        help="publish per-stream summaries of tumbling windows of the results, exactly once",
    )
    cmd.add_argument(
        "--config",
        type=Path,
        help="TOML config: the [summarize] section, and Kafka settings and security from [kafka]",
    )
    cmd.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    cmd.add_argument("--group-id", dest="group_id", help="summarize.group_id")
    cmd.add_argument("--results-topic", dest="results_topic", help="default: kafka.output_topic")
    cmd.add_argument("--summaries-topic", dest="summaries_topic")
    cmd.add_argument("--state-topic", dest="state_topic", help="default: <summaries topic>.state")
    cmd.add_argument("--window-s", dest="window_s", type=float, help="window length (10)")
    cmd.add_argument("--grace-s", dest="grace_s", type=float, help="grace for late results (5)")
    cmd.add_argument(
        "--idle-close-s",
        dest="idle_close_s",
        type=float,
        help="close a silent stream's windows after this long (30)",
    )
    cmd.add_argument("--log-format", dest="log_format", choices=["auto", "json", "console"])
    cmd.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])


def summarize_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The nested settings dict of the flags that were given."""
    return flag_overrides(args, _FLAGS)


def run_summarize(
    settings: WorkerSettings,
    effective_config: dict[str, Any],
    on_stop: Callable[[Callable[[], None]], None],
) -> int:
    """Run the summarizer until a stop signal (0) or a failure (1)."""
    # Imported here: `emotion-worker --help` must not load the Kafka client.
    from consumer.ops.logs import configure_logging, get_logger
    from consumer.summarize.health import ProbeServer, SummarizerHealth, SummarizerMetrics
    from consumer.summarize.loop import SummarizeError, Summarizer
    from consumer.summarize.restore import RestoreError
    from consumer.summarize.topics import TopicError

    configure_logging(settings.log)
    log = get_logger("consumer.summarize")
    used = ("kafka", "summarize", "health", "log")  # the model and fetch settings are the worker's
    log.info("effective config", config={k: v for k, v in effective_config.items() if k in used})
    metrics = SummarizerMetrics()
    health = SummarizerHealth(settings.health.loop_stall_s)
    server = None
    if settings.health.enabled:
        server = ProbeServer(settings.health.host, settings.health.port, metrics, health).start()
        log.info(
            "health server listening", port=server.port, paths=["/metrics", "/readyz", "/livez"]
        )
    try:
        summarizer = Summarizer(settings, metrics, health)
        on_stop(summarizer.request_stop)
        summarizer.run()
    except (SummarizeError, TopicError, RestoreError) as exc:
        log.error("summarizer failed", error=str(exc))
        return 1
    finally:
        if server is not None:
            server.close()
    return 0
