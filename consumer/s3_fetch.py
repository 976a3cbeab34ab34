"""s3:// image fetching (placeholder until the S3 client lands)."""

from __future__ import annotations

from consumer.config import FetchSettings
from consumer.errors import EventError


def fetch_s3(uri: str, settings: FetchSettings) -> bytes:
    """The object's bytes, capped at settings.max_bytes."""
    raise EventError("image_fetch_failed", f"{uri}: s3 fetching is not built yet")
