"""Errors a single event can cause; each maps to a dead-letter kind."""

from __future__ import annotations

from schemas import ErrorKind


class EventError(Exception):
    """This event cannot become a result; `retriable` errors may succeed when tried again."""

    def __init__(self, kind: ErrorKind, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.retriable = retriable
        self.attempts = 1
