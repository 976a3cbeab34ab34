"""Face boxes: the whole image by default, event boxes clipped, boxes outside refused."""

from __future__ import annotations

import pytest
from PIL import Image

from consumer.errors import EventError
from consumer.faces import crop_faces, face_boxes
from schemas import FaceBox


def test_no_boxes_means_the_whole_image() -> None:
    image = Image.new("RGB", (48, 40))
    boxes = face_boxes(image, None)
    assert boxes == [FaceBox(x=0, y=0, width=48, height=40)]
    assert crop_faces(image, boxes)[0].size == (48, 40)


def test_boxes_are_cropped_and_clipped_to_the_image() -> None:
    image = Image.new("RGB", (100, 80))
    image.paste((255, 0, 0), (10, 10, 30, 30))
    boxes = face_boxes(
        image, [FaceBox(x=10, y=10, width=20, height=20), FaceBox(x=90, y=70, width=50, height=50)]
    )
    assert boxes[1] == FaceBox(x=90, y=70, width=10, height=10)
    crops = crop_faces(image, boxes)
    assert crops[0].size == (20, 20) and crops[0].getpixel((5, 5)) == (255, 0, 0)
    assert crops[1].size == (10, 10)


def test_box_outside_the_image_is_refused_by_index() -> None:
    image = Image.new("RGB", (50, 50))
    with pytest.raises(EventError) as info:
        face_boxes(
            image, [FaceBox(x=0, y=0, width=5, height=5), FaceBox(x=50, y=0, width=5, height=5)]
        )
    assert info.value.kind == "bad_face_box"
    assert "faces[1]" in info.value.message and "50x50" in info.value.message
