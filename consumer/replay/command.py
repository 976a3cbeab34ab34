"""The `emotion-worker replay` command line: its flags, and running it."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer.config import WorkerSettings


def add_replay_parser(sub: Any) -> None:
    """Add `replay` to the CLI's subcommands (`sub` is argparse's subparsers action)."""
    replay = sub.add_parser(
        "replay",
        help="republish dead letters to the input topic, each once (transient kinds by default)",
    )
    replay.add_argument(
        "--config", type=Path, help="the worker's TOML config: Kafka settings, topics, group"
    )
    replay.add_argument("--bootstrap-servers", dest="bootstrap_servers")
    replay.add_argument(
        "--group-id",
        dest="group_id",
        help="the workers' kafka.group_id; the replay's progress groups are named after it",
    )
    replay.add_argument(
        "--from",
        dest="source",
        metavar="TOPIC",
        default=None,
        help="the dead-letter topic (default: kafka.dead_letter_topic)",
    )
    replay.add_argument(
        "--to",
        dest="target",
        metavar="TOPIC",
        default=None,
        help="where to republish (default: kafka.input_topic)",
    )
    replay.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help=(
            "replay letters of this error kind (repeat, or comma-separate); default: the "
            "transient kinds image_fetch_failed, image_not_found, model_error. Kinds that "
            "fail the same way every time (invalid_event, image_undecodable, ...) are "
            "replayed only when named"
        ),
    )
    replay.add_argument(
        "--since",
        metavar="TIME",
        help=(
            "only letters that failed at or after TIME (2026-12-01T08:00:00Z, or an age: "
            "90m, 6h, 2d); older letters of the chosen kinds are passed over for good"
        ),
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed; write nothing"
    )


def run_replay(args: argparse.Namespace, settings: WorkerSettings) -> int:
    # Imported here: `emotion-worker --help` must not load the Kafka client.
    from consumer.replay.replayer import replay
    from consumer.replay.selection import parse_kinds, parse_since

    return replay(
        settings.kafka,
        args.source,
        args.target,
        parse_kinds(args.kind),
        parse_since(args.since, datetime.now(UTC)),
        args.dry_run,
    )
