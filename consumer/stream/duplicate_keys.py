"""Finding a key that a JSON object names twice, and where.

JSON parsers disagree on duplicate keys: most keep the last value, some the first, some
refuse. An event like {"image": "s3://ok/x", "image": "file:///etc/shadow"} can then mean
one thing to an upstream filter and another to the worker, a known way to smuggle a value
past a check. The worker refuses such events rather than pick a winner.
"""

from __future__ import annotations

import json
from typing import Any

# Keys are the event publisher's text: a message quotes at most this many characters.
_MAX_KEY_CHARS = 64


class _Duplicated(dict[str, Any]):
    """A decoded object that named `key` more than once (the last value is kept)."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key


def _first_repeat(pairs: list[tuple[str, Any]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than pairs means one repeats")


def _find(value: Any, path: str) -> tuple[str, str] | None:
    """(key, path of its object) of a duplicated key: the outermost such object, the first
    in document order among equals (an object holding a duplicate is reported first)."""
    if isinstance(value, _Duplicated):
        return value.key, path
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _find(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def duplicate_key(text: str) -> str | None:
    """A sentence naming a duplicated key of the JSON `text` and its path, or None.

    `text` must already be known to be valid JSON of bounded depth (the event schema
    accepted it): json.loads raises RecursionError on deep nesting.
    """
    duplicated = False

    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal duplicated
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj  # the common case: no key repeats, nothing more to do
        duplicated = True
        return _Duplicated(pairs, _first_repeat(pairs))

    # Numbers and constants stay text (their length): only the keys matter here, and
    # int() of a very long literal would raise.
    decoded = json.loads(
        text, object_pairs_hook=build, parse_int=len, parse_float=len, parse_constant=len
    )
    if not duplicated:
        return None  # the walk that locates the key runs only when there is one
    found = _find(decoded, "")
    if found is None:  # not expected: a replaced value's parent is itself a _Duplicated
        return "event JSON names a key twice in one object; each key may appear once"
    key, where = found
    shown = key if len(key) <= _MAX_KEY_CHARS else key[: _MAX_KEY_CHARS - 3] + "..."
    path = f"{where}.{shown}" if where else shown
    return (
        f"event JSON names the key {json.dumps(shown)} twice (at {path}); each key may "
        "appear once per object, since parsers disagree on which duplicate wins"
    )
