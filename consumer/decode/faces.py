"""Face boxes: validate and clip the event's, grow them by the margin, and crop."""

from __future__ import annotations

from PIL import Image

from consumer.errors import EventError
from schemas import FaceBox


def event_boxes(size: tuple[int, int], boxes: list[FaceBox], margin: float) -> list[FaceBox]:
    """The event's boxes checked against the image, clipped to it and grown by `margin`.

    A box that starts outside the image is an upstream mistake (usually boxes computed on
    a resized frame): the event becomes a dead letter naming the box, rather than a
    result for a face that is not there.
    """
    width, height = size
    checked = []
    for index, box in enumerate(boxes):
        if box.x >= width or box.y >= height:
            raise EventError(
                "bad_face_box",
                f"faces[{index}] starts at ({box.x},{box.y}), outside the {width}x{height} "
                "image; boxes are pixel coordinates of the full-resolution image",
            )
        checked.append(grow(box, margin, size))
    return checked


def grow(box: FaceBox, margin: float, size: tuple[int, int]) -> FaceBox:
    """`box` grown by `margin` of its width and height on each side, clipped to the image."""
    width, height = size
    dx, dy = round(box.width * margin), round(box.height * margin)
    left, top = max(0, box.x - dx), max(0, box.y - dy)
    right = min(width, box.x + box.width + dx)
    bottom = min(height, box.y + box.height + dy)
    return FaceBox(x=left, y=top, width=right - left, height=bottom - top)


def whole_image(size: tuple[int, int]) -> list[FaceBox]:
    """Pre-cropped, FER-style input: the whole image is the face."""
    return [FaceBox(x=0, y=0, width=size[0], height=size[1])]


def crop_faces(image: Image.Image, boxes: list[FaceBox]) -> list[Image.Image]:
    """One RGB crop per box (the boxes must lie inside the image)."""
    return [image.crop((b.x, b.y, b.x + b.width, b.y + b.height)) for b in boxes]
