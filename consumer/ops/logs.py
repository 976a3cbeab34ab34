"""structlog set-up: JSON lines in production, readable lines in a terminal.

Library loggers (librdkafka through confluent-kafka, transformers) go through the same
renderer, so a production log stream is all JSON.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

from consumer.config import ENV_PREFIX, LogSettings

# Not a setting: set by the multi-GPU supervisor for each worker process it starts.
PROCESS_INDEX_ENV = f"{ENV_PREFIX}PROCESS_INDEX"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _add_process_index(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Under the multi-GPU supervisor, which worker process wrote the line."""
    index = os.environ.get(PROCESS_INDEX_ENV)
    if index is not None:
        event.setdefault("process", int(index) if index.isdigit() else index)
    return event


def configure_logging(settings: LogSettings, stream: Any = None) -> None:
    """Route structlog and the stdlib loggers of libraries to one renderer on stderr."""
    stream = stream or sys.stderr
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        # Bound per event in the pipeline: event_id, stream_id, partition, offset.
        structlog.contextvars.merge_contextvars,
        _add_process_index,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries are chatty at info; their warnings and errors are what an operator needs.
    root.setLevel(max(_LEVELS[settings.level], logging.WARNING))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
