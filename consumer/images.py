"""Fetch the bytes an event's image URI points at, and decode them into an RGB image."""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from consumer.config import FetchSettings
from consumer.errors import EventError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
_READ_CHUNK = 64 * 1024


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
        return _read_file(uri, settings.max_bytes)
    if scheme in ("http", "https"):
        return _read_http(uri, settings)
    raise EventError("invalid_event", f"image: scheme {scheme!r} is not supported")


def _read_file(uri: str, max_bytes: int) -> bytes:
    path = Path(unquote(urlsplit(uri).path))
    try:
        with path.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise EventError("image_not_found", f"image file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise EventError("image_not_found", f"image path {path} is a folder") from exc
    except PermissionError as exc:
        raise EventError("image_not_found", f"image file {path} is not readable") from exc
    if len(data) > max_bytes:
        raise EventError("image_too_large", f"image file {path} is over {max_bytes} bytes")
    return data


def _read_http(uri: str, settings: FetchSettings) -> bytes:
    request = urllib.request.Request(uri, headers={"User-Agent": "emotion-worker/0.1"})
    deadline = time.monotonic() + settings.timeout_s
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            chunks: list[bytes] = []
            size = 0
            # The cap is enforced while reading: Content-Length may be absent or a lie.
            while chunk := response.read(_READ_CHUNK):
                size += len(chunk)
                if size > settings.max_bytes:
                    raise EventError("image_too_large", f"{uri} is over {settings.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise EventError(
                        "image_fetch_failed",
                        f"{uri} took over {settings.timeout_s}s",
                        retriable=True,
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise EventError("image_not_found", f"{uri} answered HTTP {exc.code}") from exc
        retriable = exc.code >= 500 or exc.code in (408, 429)
        raise EventError(
            "image_fetch_failed", f"{uri} answered HTTP {exc.code}", retriable=retriable
        ) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EventError(
            "image_fetch_failed", f"{uri} could not be fetched: {reason}", retriable=True
        ) from exc


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an allowed format, apply EXIF orientation and return an RGB image."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; a bomb must be an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = opened.size
            if width * height > max_pixels:
                raise EventError(
                    "image_too_large",
                    f"image is {width}x{height}, over fetch.max_pixels={max_pixels}",
                )
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except EventError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fired (at open, before our check): the same verdict.
        raise EventError("image_too_large", f"image is a decompression bomb: {exc}") from exc
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        raise EventError("image_undecodable", f"image cannot be decoded: {exc}") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels become white rather than arbitrary colours."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
