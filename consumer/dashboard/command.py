"""The `emotion-worker dashboard` command line: its flags, and running it.

Imported by the CLI on every start: nothing heavy here at import time (the Kafka client
and the server are imported when the command runs).
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from consumer.config import flag_overrides, load_settings

# Flag -> (section, field) of WorkerSettings; flags beat the environment and the file.
_FLAGS: dict[str, tuple[str, str]] = {
    "bootstrap_servers": ("kafka", "bootstrap_servers"),
    "host": ("dashboard", "host"),
    "port": ("dashboard", "port"),
    "summaries_topic": ("summarize", "summaries_topic"),
    "history_minutes": ("dashboard", "history_minutes"),
}


def add_dashboard_parser(sub: Any) -> None:
    """Add `dashboard` to the CLI's subcommands (`sub` is argparse's subparsers action)."""
    dashboard = sub.add_parser(
        "dashboard",
        help="serve a live page of the window summaries per stream (summaries topic)",
        description=(
            "Serve one page that shows, per stream, the label mix of the last minutes and "
            "the latest windows, updated live from the summaries topic. Listens on "
            "127.0.0.1 unless --host says otherwise; any other address needs "
            "dashboard.auth_token (EMOTION_WORKER_DASHBOARD__AUTH_TOKEN)."
        ),
    )
    dashboard.add_argument(
        "--config", type=Path, help="the worker's TOML config: Kafka settings, [dashboard]"
    )
    dashboard.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    dashboard.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, help="port to listen on (default: 8080; 0: any)")
    dashboard.add_argument(
        "--summaries-topic",
        dest="summaries_topic",
        help="topic to read (default: summarize.summaries_topic, emotions.summaries)",
    )
    dashboard.add_argument(
        "--history-minutes",
        dest="history_minutes",
        type=float,
        help="minutes of summaries shown per stream (default: 10)",
    )


def dashboard_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The nested settings dict of the flags that were given."""
    return flag_overrides(args, _FLAGS)


def run_dashboard(args: argparse.Namespace) -> int:
    """Serve the page until SIGTERM or Ctrl-C; the exit code."""
    from consumer.dashboard.app import start_dashboard
    from consumer.ops.logs import configure_logging

    settings = load_settings(args.config, dashboard_overrides(args))
    configure_logging(settings.log)
    running = start_dashboard(settings)
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    print(f"dashboard: {running.url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        running.stop()
    return 0
