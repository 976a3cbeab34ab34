"""Image bytes that need no network: file:// paths (within fetch.file_roots) and data: URIs."""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from consumer.config import FetchSettings
from consumer.errors import EventError


def read_file(uri: str, settings: FetchSettings) -> bytes:
    """A regular file's bytes, inside fetch.file_roots, capped at fetch.max_bytes.

    With no fetch.file_roots (the default) every file:// image is refused: the event's
    publisher would otherwise choose any file the worker can read.
    """
    max_bytes = settings.max_bytes
    path = Path(unquote(urlsplit(uri).path))
    if "\x00" in str(path):
        raise EventError("image_fetch_refused", f"image file path {str(path)!r} has a NUL byte")
    if not settings.file_roots:
        raise EventError(
            "image_fetch_refused",
            f"image fetch refused: file {path}: file:// images are off because "
            "fetch.file_roots is empty (the default); set fetch.file_roots to the folders "
            "the images lie in, e.g. EMOTION_WORKER_FETCH__FILE_ROOTS='[\"/srv/frames\"]'",
        )
    # The real path: ".." and symlinks must not lead out of the configured roots.
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(os.path.realpath(root)) for root in settings.file_roots):
        raise EventError(
            "image_fetch_refused",
            f"image fetch refused: file {path} (really {real}) is outside fetch.file_roots; "
            "add its folder to fetch.file_roots if it is meant to be readable",
        )
    path = real  # open what was checked, not the name that might be swapped meanwhile
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer. What was opened is then
        # checked to be a regular file, so pipes, devices and sockets are refused.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise EventError("image_not_found", f"image file {path} does not exist") from exc
    except PermissionError as exc:
        raise EventError("image_not_found", f"image file {path} is not readable") from exc
    except OSError as exc:  # ENOTDIR, ELOOP, ENAMETOOLONG, EISDIR...
        raise EventError(
            "image_not_found", f"image file {path} cannot be opened: {exc.strerror}"
        ) from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise EventError("image_not_found", f"image path {path} is a folder")
        raise EventError(
            "image_fetch_refused", f"image path {path} is not a regular file (a pipe or device)"
        )
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as exc:
            raise EventError(
                "image_fetch_failed", f"image file {path} could not be read: {exc}", retriable=True
            ) from exc
    if len(data) > max_bytes:
        raise EventError("image_too_large", f"image file {path} is over {max_bytes} bytes")
    return data


def read_data(uri: str, max_bytes: int) -> bytes:
    """The bytes of a data:[<type>];base64,<payload> URI, decoded strictly."""
    meta, comma, payload = uri[len("data:") :].partition(",")
    if not comma or not meta.lower().endswith(";base64"):
        raise EventError("image_undecodable", "image: only data:<type>;base64,<data> URIs work")
    # Checked before decoding: 4 base64 characters carry 3 bytes.
    if len(payload) // 4 * 3 > max_bytes:
        raise EventError(
            "image_too_large",
            f"image data URI is over {max_bytes} bytes (fetch.max_data_uri_bytes, fetch.max_bytes)",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EventError("image_undecodable", f"image data URI is not valid base64: {exc}") from exc
