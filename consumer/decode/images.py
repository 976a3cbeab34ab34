"""Decode image bytes into an RGB image, and say plainly why bytes that do not decode fail."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from consumer.errors import EventError, plain_message

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an allowed format, apply EXIF orientation and return an RGB image."""
    opened: Image.Image | None = None
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
    except UnidentifiedImageError as exc:
        # Pillow's message is "cannot identify image file <_io.BytesIO object at 0x...>":
        # say instead what the bytes are.
        raise EventError(
            "image_undecodable", f"image cannot be decoded: {describe_unidentified(data)}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise EventError(
            "image_undecodable", f"image cannot be decoded: {_describe_broken(data, opened, exc)}"
        ) from exc
    return to_rgb(image)


def sniff_format(data: bytes) -> str | None:
    """What the leading bytes say the file is ("PNG", "TIFF", "HTML/XML text"...), if known."""
    head = data[:32]
    signatures = (
        (b"\xff\xd8\xff", "JPEG"),
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"GIF87a", "GIF"),
        (b"GIF89a", "GIF"),
        (b"BM", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"%PDF", "PDF"),
        (b"\x00\x00\x01\x00", "ICO"),
        (b"8BPS", "PSD"),
        (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
        (b"\xffO\xffQ", "JPEG 2000"),
        (b"\x1f\x8b", "gzip"),
        (b"PK\x03\x04", "ZIP"),
    )
    for signature, name in signatures:
        if head.startswith(signature):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF/HEIC"
        return "MP4/QuickTime video"
    text = head.lstrip()
    if text.startswith(b"<"):
        return "HTML/XML text"
    if text.startswith((b"{", b"[")):
        return "JSON text"
    if head and all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "plain text"
    return None


def _leading(data: bytes) -> str:
    return f"{len(data)} bytes, starting {data[:16].hex(' ')}"


def _reason(exc: BaseException) -> str:
    """Pillow's reason, short and without object reprs."""
    text = plain_message(str(exc)) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def describe_unidentified(data: bytes) -> str:
    """Why no accepted decoder took `data`, from its leading bytes."""
    if not data:
        return "the file is empty (0 bytes)"
    accepted = ", ".join(ALLOWED_FORMATS)
    found = sniff_format(data)
    if found is None:
        return f"format not recognised ({_leading(data)}); accepted formats: {accepted}"
    if found not in ALLOWED_FORMATS:
        return f"it is {found}, not an accepted image format ({accepted}); {_leading(data)}"
    # It starts like an accepted format: ask that format's parser what is wrong.
    problem = "its header is broken"
    factory, _accept = Image.OPEN.get(found, (None, None))
    if factory is not None:
        try:
            factory(io.BytesIO(data), "")
        except Exception as exc:  # whatever the parser says about hostile bytes
            problem = f"its header is broken: {_reason(exc)}"
    return f"it starts like a {found} file but {problem} ({_leading(data)})"


def _describe_broken(data: bytes, opened: Image.Image | None, exc: BaseException) -> str:
    """A decoder failure after the format was recognised (or a header it refused)."""
    reason = _reason(exc)
    truncated = "truncat" in reason.lower()
    if opened is None:
        found = sniff_format(data) or "image"
        what = "file is truncated" if truncated else "header is broken or unsupported"
        return f"the {found} {what}: {reason} ({_leading(data)})"
    found = f"{opened.format or 'image'} {opened.width}x{opened.height}"
    what = "truncated" if truncated else "corrupt"
    return f"the {found} image data is {what}: {reason} ({len(data)} bytes)"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB; transparent pixels become white rather than arbitrary colours."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        # 16-bit (or wider) samples: Pillow's convert() would clip them at 255, turning
        # a 16-bit face white. Scale the full range down to 8 bits instead.
        samples = np.asarray(image, dtype=np.float64)
        wide = image.mode.startswith("I;16") or float(samples.max(initial=0)) > 255
        top = 65535.0 if wide else 255.0
        scaled = np.clip(np.rint(samples * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")
