"""Camera-like test frames with known face boxes, for the detector bench and its tests.

Real labelled faces (FER-2013's 48x48 crops, or the 25x25 LFW crops that ship inside
scikit-image) are upscaled and pasted at random, non-overlapping places onto busy
backgrounds (smooth colour fields with noise, or tiled photo textures from skimage.data),
so the ground truth of every frame is exactly the boxes that were pasted. Everything is
drawn from one seed: the same arguments give the same frames, pixel for pixel.

The pasted box is the face crop as its dataset cut it. FER crops are tight (eyebrows to
chin, cheek to cheek) while a Haar cascade's box also takes in the forehead, so a correct
detection can overlap a FER box less than a loose one would; the bench reports that raw
rather than adjusting the ground truth.

Also here: scikit-image's astronaut photograph (Eileen Collins), with a hand-labelled box.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from schemas import FaceBox

REPO = Path(__file__).resolve().parent.parent
# The benches' faces: the 404 committed with the repository (data/faces), or any folder of
# class subfolders named by FER2013_TRAIN (e.g. the whole FER-2013 train folder).
FER_FACES = Path(os.environ.get("FER2013_TRAIN") or REPO / "data" / "faces")

# skimage.data.astronaut() is 512x512. Labelled by eye on a 5x enlarged crop with a 10 px
# grid: hairline (y=76) to the tip of the chin (y=183), outer edge of the left cheek
# (x=182) to that of the right (x=268), ears and hair left out. The same convention as a
# FER crop, only a little looser at the top.
ASTRONAUT_FACE = FaceBox(x=182, y=76, width=87, height=108)

FRAME_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1280, 720))
# Backgrounds: a smooth random colour field, or one of skimage.data's textures and photos
# (none of them holds a face: not "astronaut", "camera" or the cat "chelsea").
BACKGROUNDS: tuple[str, ...] = ("gradient", "brick", "grass", "gravel", "coffee")

GrayFace = NDArray[np.uint8]


@dataclass(frozen=True)
class Frame:
    """One test frame: an RGB image and the true face boxes in it."""

    name: str
    image: Image.Image
    faces: tuple[FaceBox, ...]


def fer_faces(count: int, seed: int, root: Path = FER_FACES) -> list[GrayFace]:
    """`count` FER crops (48x48 gray), round robin over the class folders, seeded picks."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"FER-2013 faces missing at {root}; restore data/faces or pass another folder"
        )
    rng = random.Random(seed)
    classes = [sorted(d.glob("*.png")) for d in sorted(root.iterdir()) if d.is_dir()]
    classes = [paths for paths in classes if paths]
    picked = []
    for index in range(count):
        paths = classes[index % len(classes)]
        picked.append(_gray(Image.open(rng.choice(paths))))
    return picked


def skimage_data(name: str) -> Path:
    """A file that ships inside scikit-image's wheel (skimage/data/), no download."""
    from skimage import data

    path = Path(data.__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing; scikit-image (a test dependency) ships it")
    return path


def lfw_faces(faces: bool = True) -> list[GrayFace]:
    """scikit-image's LFW subset: the first 100 are 25x25 faces, the last 100 non-faces."""
    subset = np.load(skimage_data("lfw_subset.npy"))
    part = subset[:100] if faces else subset[100:]
    return [np.clip(np.rint(patch * 255), 0, 255).astype(np.uint8) for patch in part]


def astronaut() -> Frame:
    """The astronaut photograph and its hand-labelled face."""
    with Image.open(skimage_data("astronaut.png")) as image:
        return Frame("astronaut", image.convert("RGB"), (ASTRONAUT_FACE,))


def _gray(image: Image.Image) -> GrayFace:
    return np.asarray(image.convert("L"), dtype=np.uint8)


def background(width: int, height: int, kind: str, rng: np.random.Generator) -> NDArray[np.uint8]:
    """A width x height RGB background that is not trivially blank, drawn from `rng`."""
    if kind == "gradient":
        # A few random colours at coarse grid points, interpolated smoothly.
        coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        base = field.astype(np.float32)
    else:
        with Image.open(skimage_data(f"{kind}.png")) as image:
            texture = np.asarray(image.convert("L" if image.mode in ("L", "I;16") else "RGB"))
        if texture.ndim == 2:
            # A gray texture, tinted so the frames are not all gray.
            tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
            texture = np.stack([texture] * 3, axis=-1).astype(np.float32) * tint
        zoom = float(rng.uniform(0.75, 1.5))
        texture = cv2.resize(
            texture.astype(np.float32),
            None,
            fx=zoom,
            fy=zoom,
            interpolation=cv2.INTER_LINEAR,
        )
        th, tw = texture.shape[:2]
        # Mirrored tiles, so the seams are continuous, then a random window of them.
        tile = np.concatenate([texture, texture[:, ::-1]], axis=1)
        tile = np.concatenate([tile, tile[::-1]], axis=0)
        reps = (height // (2 * th) + 2, width // (2 * tw) + 2, 1)
        tiled = np.tile(tile, reps)
        top = int(rng.integers(0, 2 * th))
        left = int(rng.integers(0, 2 * tw))
        base = tiled[top : top + height, left : left + width]
    noise = rng.standard_normal(size=(height, width, 3), dtype=np.float32)
    return np.clip(base + 6.0 * noise, 0, 255).astype(np.uint8)


def _overlaps(box: FaceBox, others: Sequence[FaceBox], gap: float) -> bool:
    """True if `box`, grown by `gap` of its size on every side, touches any of `others`."""
    pad_x, pad_y = box.width * gap, box.height * gap
    left, right = box.x - pad_x, box.x + box.width + pad_x
    top, bottom = box.y - pad_y, box.y + box.height + pad_y
    return any(
        left < o.x + o.width and o.x < right and top < o.y + o.height and o.y < bottom
        for o in others
    )


def compose_frames(
    faces: Sequence[GrayFace],
    count: int,
    seed: int,
    *,
    name: str = "frame",
    sizes: Sequence[tuple[int, int]] = FRAME_SIZES,
    faces_per_frame: tuple[int, int] = (1, 4),
    face_px: tuple[int, int] = (64, 200),
    distractors: Sequence[GrayFace] = (),
    distractors_per_frame: tuple[int, int] = (0, 0),
    gap: float = 0.35,
) -> list[Frame]:
    """`count` frames with 1-4 of `faces` each (taken in order, cycling), at known boxes.

    Frames alternate between `sizes`. Faces are upscaled (bicubic) to a random square side
    in `face_px`, turned to RGB and pasted; no two come closer than `gap` of their size, so
    a detector's looser box cannot cover two of them. `distractors` (non-face patches) are
    pasted the same way but are no face: a detection on one is a false positive.
    """
    rng = np.random.default_rng(seed)
    frames = []
    cursor = 0
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        canvas = background(width, height, BACKGROUNDS[index % len(BACKGROUNDS)], rng)
        placed: list[FaceBox] = []
        truth: list[FaceBox] = []
        wanted = int(rng.integers(faces_per_frame[0], faces_per_frame[1] + 1))
        extra = int(rng.integers(distractors_per_frame[0], distractors_per_frame[1] + 1))
        jobs = [True] * wanted + [False] * (extra if distractors else 0)
        for is_face in jobs:
            for _ in range(200):
                side = int(rng.integers(face_px[0], min(face_px[1], height, width) + 1))
                x = int(rng.integers(0, width - side + 1))
                y = int(rng.integers(0, height - side + 1))
                box = FaceBox(x=x, y=y, width=side, height=side)
                if not _overlaps(box, placed, gap):
                    break
            else:
                continue  # no room left in this frame
            if is_face:
                patch = faces[cursor % len(faces)]
                cursor += 1
                truth.append(box)
            else:
                patch = distractors[int(rng.integers(0, len(distractors)))]
            placed.append(box)
            big = cv2.resize(patch, (side, side), interpolation=cv2.INTER_CUBIC)
            canvas[y : y + side, x : x + side] = big[:, :, None]
        frames.append(
            Frame(f"{name}-{index}-{width}x{height}", Image.fromarray(canvas), tuple(truth))
        )
    return frames


def blank_frames(
    count: int, seed: int, sizes: Sequence[tuple[int, int]] = FRAME_SIZES
) -> list[Frame]:
    """Backgrounds alone (every kind): any detection in them is a false positive."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        kind = BACKGROUNDS[index % len(BACKGROUNDS)]
        image = Image.fromarray(background(width, height, kind, rng))
        frames.append(Frame(f"blank-{kind}-{index}-{width}x{height}", image, ()))
    return frames
