"""The changelog of the summarizer's state, and restoring the state from it.

The state topic is compacted; its partition p holds the state of results partition p, so
a partition's state moves with the partition. Keys are JSON arrays, values JSON objects:

    ["window", stream_id, start_ms]   an open window's aggregate, with the result ids
                                      counted (for dropping duplicates); a tombstone
                                      (null value) once it is closed
    ["stream", stream_id]             the stream's watermark and the end of its latest
                                      closed window (late results for it are dropped)
    ["position"]                      the results offset the partition's state has
                                      counted up to (the next offset to read)

Each transaction writes the records of what changed together with the summaries of the
windows it closed and the consumed offsets, so the state topic read with read_committed
is always the state as of one transaction; its position record says which.
"""

from __future__ import annotations

import json
from typing import Any

from consumer.summarize.windows import Changes, PartitionWindows, StreamWindows, Window

VERSION = 1
POSITION_KEY = b'["position"]'

Record = tuple[bytes, bytes | None]  # key, value (None: a tombstone)


class StateError(ValueError):
    """A state record this version cannot read."""


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def window_key(stream_id: str, start_ms: int) -> bytes:
    return _dump(["window", stream_id, start_ms])


def stream_key(stream_id: str) -> bytes:
    return _dump(["stream", stream_id])


def encode_window(window: Window) -> bytes:
    return _dump(
        {
            "v": VERSION,
            "length_ms": window.length_ms,
            "ids": sorted(window.result_ids),
            "faces": window.faces,
            "classified": window.classified,
            "skipped": window.skipped,
            "top": window.top_labels,
            "sums": window.score_sums,  # floats as repr: they read back bit for bit
            "confidence_sum": window.confidence_sum,
        }
    )


def decode_window(start_ms: int, value: bytes) -> Window:
    data = _load(value)
    return Window(
        start_ms=start_ms,
        length_ms=int(data["length_ms"]),
        result_ids=set(data["ids"]),
        faces=int(data["faces"]),
        classified=int(data["classified"]),
        skipped=int(data["skipped"]),
        top_labels={str(k): int(v) for k, v in data["top"].items()},
        score_sums={str(k): float(v) for k, v in data["sums"].items()},
        confidence_sum=float(data["confidence_sum"]),
    )


def encode_stream(stream: StreamWindows) -> bytes:
    return _dump(
        {
            "v": VERSION,
            "watermark_ms": stream.watermark_ms,
            "closed_until_ms": stream.closed_until_ms,
        }
    )


def encode_position(next_offset: int) -> bytes:
    return _dump({"v": VERSION, "next_offset": next_offset})


def changelog_records(changes: Changes) -> list[Record]:
    """The records that bring the changelog up to date with `changes`."""
    records: list[Record] = [
        (window_key(stream_id, start), None if window is None else encode_window(window))
        for (stream_id, start), window in changes.windows.items()
    ]
    records += [(stream_key(sid), encode_stream(s)) for sid, s in changes.streams.items()]
    return records


def _load(value: bytes) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise StateError(f"state record is not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("v") != VERSION:
        version = data.get("v") if isinstance(data, dict) else None
        raise StateError(
            f"state record of version {version!r}, this summarizer reads version {VERSION} "
            "(written by a newer release? run that release, or start over with a new "
            "summarize.state_topic and summarize.group_id)"
        )
    return data


class Restorer:
    """Applies changelog records, in the order of their partition, to a partition's state."""

    def __init__(self, windows: PartitionWindows) -> None:
        self.windows = windows
        self.position: int | None = None  # None: no position record (yet)
        self.records = 0

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        self.records += 1
        try:
            parts = json.loads(key or b"null")
        except ValueError as exc:
            raise StateError(f"state record key {key!r} is not JSON") from exc
        match parts:
            case ["window", str(stream_id), int(start)]:
                if value is None:
                    self.windows.forget_window(stream_id, start)
                else:
                    self.windows.restore_window(stream_id, decode_window(start, value))
            case ["stream", str(stream_id)] if value is not None:
                data = _load(value)
                self.windows.restore_stream(
                    stream_id, data["watermark_ms"], data["closed_until_ms"]
                )
            case ["position"] if value is not None:
                self.position = int(_load(value)["next_offset"])
            case _:
                raise StateError(f"state record key {key!r} is not one this summarizer writes")
