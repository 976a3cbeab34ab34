"""Face boxes: the whole image by default, event boxes checked, clipped and grown."""

from __future__ import annotations

import pytest
from PIL import Image

from consumer.decode.faces import crop_faces, event_boxes, grow, whole_image
from consumer.errors import EventError
from schemas import FaceBox


def test_no_boxes_means_the_whole_image() -> None:
    image = Image.new("RGB", (48, 40))
    boxes = whole_image(image.size)
    assert boxes == [FaceBox(x=0, y=0, width=48, height=40)]
    assert crop_faces(image, boxes)[0].size == (48, 40)


def test_boxes_are_cropped_and_clipped_to_the_image() -> None:
    image = Image.new("RGB", (100, 80))
    image.paste((255, 0, 0), (10, 10, 30, 30))
    boxes = event_boxes(
        image.size,
        [FaceBox(x=10, y=10, width=20, height=20), FaceBox(x=90, y=70, width=50, height=50)],
        margin=0.0,
    )
    assert boxes[1] == FaceBox(x=90, y=70, width=10, height=10)
    crops = crop_faces(image, boxes)
    assert crops[0].size == (20, 20) and crops[0].getpixel((5, 5)) == (255, 0, 0)
    assert crops[1].size == (10, 10)


def test_box_outside_the_image_is_refused_by_index() -> None:
    with pytest.raises(EventError) as info:
        event_boxes(
            (50, 50),
            [FaceBox(x=0, y=0, width=5, height=5), FaceBox(x=50, y=0, width=5, height=5)],
            margin=0.0,
        )
    assert info.value.kind == "bad_face_box"
    assert "faces[1]" in info.value.message and "50x50" in info.value.message


def test_margin_grows_each_side_by_a_fraction_of_the_box() -> None:
    box = FaceBox(x=40, y=30, width=20, height=10)
    assert grow(box, 0.25, (200, 200)) == FaceBox(x=35, y=28, width=30, height=14)
    assert grow(box, 0.0, (200, 200)) == box


def test_margin_is_clipped_at_the_image_edges() -> None:
    box = FaceBox(x=2, y=90, width=20, height=10)
    grown = grow(box, 0.5, (100, 100))
    assert grown == FaceBox(x=0, y=85, width=32, height=15)
    assert grown.x + grown.width <= 100 and grown.y + grown.height <= 100


def test_event_boxes_apply_the_margin() -> None:
    boxes = event_boxes((100, 100), [FaceBox(x=40, y=40, width=20, height=20)], margin=0.1)
    assert boxes == [FaceBox(x=38, y=38, width=24, height=24)]
