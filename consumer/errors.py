"""Errors a single event can cause; each maps to a dead-letter kind."""

from __future__ import annotations

import re

from schemas import ErrorKind

# " at 0x7f3a..." inside a Python repr such as "<_io.BytesIO object at 0x7f3a...>".
_OBJECT_ADDRESS = re.compile(r"\s+at 0x[0-9a-fA-F]+(?=>)")


class EventError(Exception):
    """This event cannot become a result; `retriable` errors may succeed when tried again."""

    def __init__(self, kind: ErrorKind, message: str, *, retriable: bool = False) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.retriable = retriable
        self.attempts = 1


def plain_message(text: str) -> str:
    """`text` without the memory addresses of object reprs (they mean nothing to a reader).

    "<_io.BytesIO object at 0x7f3a2c1d0e50>" becomes "<_io.BytesIO object>".
    """
    return _OBJECT_ADDRESS.sub("", text)
