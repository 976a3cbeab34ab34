"""Fetch the bytes an event's image URI points at: the scheme dispatch and its retries."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from consumer.config import FetchSettings
from consumer.errors import EventError
from consumer.fetch.http import fetch_http
from consumer.fetch.local import read_data, read_file
from consumer.fetch.s3 import fetch_s3


def fetch_with_retries(uri: str, settings: FetchSettings) -> tuple[bytes, int]:
    """The image bytes and the number of attempts it took; raises the last EventError."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return fetch_bytes(uri, settings), attempt
        except EventError as exc:
            if not exc.retriable or attempt > settings.retries:
                exc.message = f"{exc.message} (after {attempt} attempt(s))"
                exc.attempts = attempt
                raise
            time.sleep(settings.retry_backoff_s * 2 ** (attempt - 1))


def fetch_bytes(uri: str, settings: FetchSettings) -> bytes:
    """One attempt at reading the image, capped at settings.max_bytes."""
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return read_file(uri, settings)
    if scheme in ("http", "https"):
        return fetch_http(uri, settings)
    if scheme == "s3":
        return fetch_s3(uri, settings)
    if scheme == "data":
        return read_data(uri, min(settings.max_data_uri_bytes, settings.max_bytes))
    raise EventError("invalid_event", f"image: scheme {scheme!r} is not supported")
