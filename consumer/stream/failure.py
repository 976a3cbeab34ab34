"""The worker's one failure: the first reason any thread gives for stopping.

The poll loop, the engine thread, delivery reports, commits and client error callbacks
can each decide that the worker must stop; the first reason wins (it is the cause, later
ones are usually its consequences) and the loop ends on its next turn.
"""

from __future__ import annotations

import threading

import structlog

# Logged as the worker's line: operators search for "worker failing" under that logger.
log = structlog.get_logger("consumer.stream.worker")


class Failure:
    """Set once, from any thread; `reason` is None while the worker is healthy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None

    @property
    def reason(self) -> str | None:
        return self._reason

    def __bool__(self) -> bool:
        return self._reason is not None

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
        log.error("worker failing", reason=reason)
