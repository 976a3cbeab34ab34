"""Bytes to face crops: decode, find or check the face boxes, crop.

This is the part of an event's preparation that runs hostile input through C code
(Pillow's and OpenCV's decoders and detectors), so consumer.decode.pool runs it in
separate processes. The same FrameCropper runs in-process when isolation is "thread".

The wire format between the worker and a decoder process is deliberately not pickle: a
decoder that a hostile file has taken over must not be able to make the worker run code.
A frame is a 12-byte prefix (magic, header length, payload length), a JSON header and a
raw payload: the image bytes going in, the crops' RGB pixels coming out.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import IO, Any, get_args

from PIL import Image

from consumer.config import FaceSettings
from consumer.decode.detect import FaceDetector, make_detector, make_verifier
from consumer.decode.faces import crop_faces, event_boxes, grow, whole_image
from consumer.decode.images import decode_image
from consumer.decode.quality import VouchedBy
from consumer.errors import EventError
from schemas import FaceBox

_PREFIX = struct.Struct(">4sII")
_MAGIC = b"EWD1"
# A header is a few boxes' worth of JSON; anything bigger means the stream is corrupt.
_MAX_HEADER = 1 << 20


@dataclass(frozen=True, slots=True)
class Cropped:
    """The faces of one frame: their boxes in full-image pixels and an RGB crop each.

    No boxes means the detector found no face (the result's status is no_face).
    `vouched_by` says where the boxes came from: the event, the detector, or nobody (the
    whole image, faces.detector = "none").
    """

    boxes: list[FaceBox]
    crops: list[Image.Image]
    vouched_by: VouchedBy
    # faces.verify_whole_image: False when the check found no face; None when not checked.
    face_found: bool | None = None


class FrameCropper:
    """Decode one image and cut out its faces; holds the detector, loaded once."""

    def __init__(self, faces: FaceSettings, max_pixels: int) -> None:
        self.faces = faces
        self.max_pixels = max_pixels
        self.detector: FaceDetector | None = make_detector(faces)
        self.verifier = make_verifier(faces)

    def __call__(self, data: bytes, boxes: list[FaceBox] | None) -> Cropped:
        image = decode_image(data, self.max_pixels)
        vouched_by: VouchedBy
        face_found: bool | None = None
        if boxes:
            found, vouched_by = event_boxes(image.size, boxes, self.faces.margin), "event"
        elif self.detector is None:
            found, vouched_by = whole_image(image.size), "none"
            if self.verifier is not None:
                face_found = self.verifier.has_face(image)
                vouched_by = "detector" if face_found else "none"
        else:
            detected = self.detector.detect(image)
            found = [grow(b, self.faces.margin, image.size) for b in detected]
            vouched_by = "detector"
        area = sum(b.width * b.height for b in found)
        if area > self.faces.max_crop_pixels:
            raise EventError(
                "image_too_large",
                f"the {len(found)} face box(es) cover {area} pixels in all, over "
                f"faces.max_crop_pixels={self.faces.max_crop_pixels}; send fewer or smaller "
                "boxes",
            )
        crops = crop_faces(image, found)
        for crop in crops:
            # Crops are views in Pillow's lazy sense; load now so the frame can be freed.
            crop.load()
        return Cropped(found, crops, vouched_by, face_found)


# ---- wire format -------------------------------------------------------------------------


def write_frame(stream: IO[bytes], header: dict[str, Any], payload: bytes) -> None:
    head = json.dumps(header, separators=(",", ":")).encode()
    stream.write(_PREFIX.pack(_MAGIC, len(head), len(payload)))
    stream.write(head)
    stream.write(payload)
    stream.flush()


def parse_prefix(prefix: bytes, max_payload: int) -> tuple[int, int]:
    """Header and payload lengths from a frame's prefix; ValueError if it is not one."""
    magic, head_len, payload_len = _PREFIX.unpack(prefix)
    if magic != _MAGIC or head_len > _MAX_HEADER or payload_len > max_payload:
        raise ValueError(f"not a decoder frame (magic {magic!r}, sizes {head_len}/{payload_len})")
    return head_len, payload_len


PREFIX_SIZE = _PREFIX.size


def boxes_to_json(boxes: list[FaceBox] | None) -> list[list[int]] | None:
    return None if boxes is None else [[b.x, b.y, b.width, b.height] for b in boxes]


def boxes_from_json(raw: Any) -> list[FaceBox] | None:
    if raw is None:
        return None
    return [FaceBox(x=x, y=y, width=w, height=h) for x, y, w, h in raw]


def encode_cropped(cropped: Cropped) -> tuple[dict[str, Any], bytes]:
    """A decoder's reply header and payload: boxes, crop sizes, where the boxes came
    from, concatenated RGB pixels."""
    header = {
        "ok": True,
        "boxes": boxes_to_json(cropped.boxes),
        "sizes": [list(c.size) for c in cropped.crops],
        "vouched_by": cropped.vouched_by,
        "face_found": cropped.face_found,
    }
    return header, b"".join(c.tobytes() for c in cropped.crops)


def decode_cropped(header: dict[str, Any], payload: bytes) -> Cropped:
    """The parent's side of encode_cropped; sizes are checked against the payload."""
    boxes = boxes_from_json(header["boxes"]) or []
    sizes = [(int(w), int(h)) for w, h in header["sizes"]]
    if len(sizes) != len(boxes) or sum(w * h * 3 for w, h in sizes) != len(payload):
        raise ValueError("decoder reply: crop sizes do not match the payload")
    vouched_by: VouchedBy = header.get("vouched_by", "")
    if vouched_by not in get_args(VouchedBy):
        raise ValueError(f"decoder reply: unknown vouched_by {vouched_by!r}")
    crops, cursor = [], 0
    view = memoryview(payload)  # slices without copying; frombytes makes the one copy
    for width, height in sizes:
        end = cursor + width * height * 3
        crops.append(Image.frombytes("RGB", (width, height), view[cursor:end]))
        cursor = end
    face_found = header.get("face_found")
    if face_found not in (True, False, None):
        raise ValueError(f"decoder reply: face_found is {face_found!r}, not a boolean")
    return Cropped(boxes, crops, vouched_by, face_found)


def encode_error(exc: EventError) -> dict[str, Any]:
    return {"ok": False, "kind": exc.kind, "message": exc.message}
