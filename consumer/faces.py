"""Cut the faces to classify out of a decoded frame."""

from __future__ import annotations

from PIL import Image

from consumer.errors import EventError
from schemas import FaceBox


def face_boxes(image: Image.Image, boxes: list[FaceBox] | None) -> list[FaceBox]:
    """The boxes to classify: the event's (clipped to the image), or the whole image."""
    width, height = image.size
    if not boxes:
        # Pre-cropped, FER-style input: the whole image is the face.
        return [FaceBox(x=0, y=0, width=width, height=height)]
    clipped = []
    for index, box in enumerate(boxes):
        if box.x >= width or box.y >= height:
            raise EventError(
                "bad_face_box",
                f"faces[{index}] starts at ({box.x},{box.y}), outside the "
                f"{width}x{height} image; boxes are pixel coordinates of the full image",
            )
        clipped.append(
            FaceBox(
                x=box.x,
                y=box.y,
                width=min(box.width, width - box.x),
                height=min(box.height, height - box.y),
            )
        )
    return clipped


def crop_faces(image: Image.Image, boxes: list[FaceBox]) -> list[Image.Image]:
    """One RGB crop per box (the boxes must lie inside the image)."""
    return [image.crop((b.x, b.y, b.x + b.width, b.y + b.height)) for b in boxes]
