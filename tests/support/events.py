"""Frame events for tests, built from real FER faces."""

from __future__ import annotations

import json
from pathlib import Path

from consumer.event_source import frame_event


def event_bytes(path: Path, stream_id: str = "cam-1", **fields: object) -> tuple[bytes, bytes]:
    """(key, value) of a frame event for a local image."""
    event = json.loads(frame_event(path, stream_id).model_dump_json())
    return stream_id.encode(), json.dumps({**event, **fields}).encode()
