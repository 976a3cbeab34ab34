"""Find the faces in a frame when the event names none (``faces.detector``).

The classifier was fine-tuned on FER-style crops, so a frame from a camera has to be cut
into faces first. The detector here is OpenCV's Viola-Jones Haar cascade: its weights ship
inside the opencv-python-headless wheel (nothing to download or mount), it needs no torch
and no GPU, and it runs in the decoder processes beside the decoding. It finds frontal and
near-frontal faces; turned, tilted or half-covered ones are missed. Cost: roughly 150-400 ms
of one core per frame at detect_max_side=960, depending on how textured the frame is
(`python -m bench.detector_bench`; numbers in bench/README.md).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Protocol

import cv2
import cv2.data
import numpy as np
from PIL import Image

from consumer.config import FaceSettings
from schemas import FaceBox

# Chosen by `python -m bench.detector_bench` (numbers in bench/README.md): of the wheel's
# frontal-face cascades, "alt2" finds as many of the benchmark's faces as "default" (0.76
# of 161) with a tenth of its false positives (0.04 per frame against 0.46; none on bare
# textured backgrounds, where "default" fires 0.8 times a frame), in less CPU time.
HAAR_CASCADE = "haarcascade_frontalface_alt2.xml"
# faces.haar_cascade names; all three ship in the opencv-python-headless wheel.
CASCADES = {
    "alt2": HAAR_CASCADE,
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
}


class DetectorUnavailableError(RuntimeError):
    """The cascade file is missing or unreadable: the installation is broken, not the event."""


class FaceDetector(Protocol):
    """Anything that finds faces in a decoded frame."""

    def detect(self, image: Image.Image) -> list[FaceBox]:
        """Boxes in full-resolution pixel coordinates of `image`, largest first."""
        ...


def _single_threaded_opencv() -> None:
    # The worker decodes and detects in several processes at once (decode.workers), one
    # image each; OpenCV's own thread pool in every one of them would oversubscribe the
    # pod's cores and make each image slower, not faster. Process-wide and cheap, so it is
    # set again by every new detector in case something else changed it.
    cv2.setNumThreads(1)


def cascade_path(cascade: str | Path) -> Path:
    """A bare file name means one of the cascades inside the OpenCV wheel."""
    path = Path(cascade)
    if path.parent == Path("."):
        path = Path(cv2.data.haarcascades) / path
    return path


def _load_cascade(path: Path) -> Any:
    if not path.is_file():
        raise DetectorUnavailableError(
            f"face detector cascade {path} does not exist; the opencv-python-headless "
            "wheel ships it in cv2/data/ (reinstall it), or set faces.detector='none'"
        )
    problem = (
        f"face detector cascade {path} could not be loaded (not an OpenCV cascade XML, "
        "or corrupt); reinstall opencv-python-headless or set faces.detector='none'"
    )
    try:
        classifier = cv2.CascadeClassifier(str(path))
    except (cv2.error, SystemError) as exc:
        # A malformed file makes OpenCV's constructor raise (SystemError from the binding)
        # rather than return an empty classifier.
        raise DetectorUnavailableError(f"{problem}: {exc}") from exc
    if classifier.empty():
        raise DetectorUnavailableError(problem)
    return classifier


class HaarDetector:
    """OpenCV cascade face detection, tuned by `FaceSettings`.

    Frames are shrunk to `detect_max_side` first: the cascade's cost grows with the pixel
    count, and a face small enough to vanish at 960 pixels is too small for the classifier's
    input anyway. Boxes come back in the caller's full-resolution coordinates.

    Safe to share between threads (each thread gets its own classifier, because OpenCV's
    is not re-entrant) and to pickle into decoder processes (the classifier is reloaded
    there, not copied).
    """

    def __init__(self, settings: FaceSettings, cascade: str | Path = HAAR_CASCADE) -> None:
        self._setup(settings, cascade_path(cascade))

    def _setup(self, settings: FaceSettings, cascade: Path) -> None:
        self.settings = settings
        self.cascade = cascade
        _single_threaded_opencv()
        # Load now, so a broken installation fails at start-up and not on the first event.
        self._local = threading.local()
        self._local.classifier = _load_cascade(cascade)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "cascade": self.cascade}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["settings"], state["cascade"])

    def _classifier(self) -> Any:
        classifier = getattr(self._local, "classifier", None)
        if classifier is None:
            classifier = self._local.classifier = _load_cascade(self.cascade)
        return classifier

    def detect(self, image: Image.Image) -> list[FaceBox]:
        """Faces in `image` (any mode; RGB expected), largest first, at most max_faces."""
        settings = self.settings
        width, height = image.size
        gray = np.asarray(image.convert("L"))
        scale = min(1.0, settings.detect_max_side / max(width, height))
        small_w, small_h = width, height
        if scale < 1.0:
            # INTER_AREA averages the pixels it drops; nearest or bilinear would alias edges
            # into the Haar features.
            small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
            gray = cv2.resize(gray, (small_w, small_h), interpolation=cv2.INTER_AREA)
        # Back to full resolution per axis: rounding made the two scales differ slightly.
        back_x, back_y = width / small_w, height / small_h
        # Evens out exposure; the cascade was trained on equalised faces.
        gray = cv2.equalizeHist(gray)
        # The cascade cannot see faces smaller than its window (20 px for "alt2", 24 for
        # "default") in the shrunk frame, whatever min_face_px asks for.
        min_side = max(1, math.floor(settings.min_face_px * scale))
        found = self._classifier().detectMultiScale(
            gray,
            scaleFactor=settings.haar_scale_factor,
            minNeighbors=settings.haar_min_neighbors,
            minSize=(min_side, min_side),
        )
        boxes = []
        for x, y, w, h in np.asarray(found, dtype=np.int64).reshape(-1, 4).tolist():
            # Outward rounding, then clipping: the box covers at least what was detected.
            left = max(0, math.floor(x * back_x))
            top = max(0, math.floor(y * back_y))
            right = min(width, math.ceil((x + w) * back_x))
            bottom = min(height, math.ceil((y + h) * back_y))
            if min(right - left, bottom - top) < settings.min_face_px:
                continue
            boxes.append(FaceBox(x=left, y=top, width=right - left, height=bottom - top))
        # Largest first (the ones the classifier reads best); ties in reading order, so the
        # result does not depend on the cascade's internal order.
        boxes.sort(key=lambda b: (-b.width * b.height, b.y, b.x))
        return boxes[: settings.max_faces]

    def has_face(self, image: Image.Image) -> bool:
        """Whether a whole image (a pre-cropped face) holds a face at all.

        The image is padded by a quarter of its shorter side (edge pixels repeated): a
        tight crop cuts the forehead and chin the cascade's window expects. A detection of
        at least 0.4 of the shorter side counts (the cascade's smallest window is 20 px).
        """
        gray = np.asarray(image.convert("L"))
        pad = max(1, min(gray.shape) // 4)
        gray = cv2.copyMakeBorder(gray, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        side = max(20, round(0.4 * min(image.size)))
        found = self._classifier().detectMultiScale(
            cv2.equalizeHist(gray),
            scaleFactor=self.settings.haar_scale_factor,
            minNeighbors=self.settings.haar_min_neighbors,
            minSize=(side, side),
        )
        return len(found) > 0


def make_verifier(settings: FaceSettings) -> HaarDetector | None:
    """The whole-image check of faces.verify_whole_image (HaarDetector.has_face), or None
    when it is off."""
    if settings.detector != "none" or not settings.verify_whole_image:
        return None
    return HaarDetector(settings, CASCADES[settings.haar_cascade])


def make_detector(settings: FaceSettings) -> FaceDetector | None:
    """The configured detector, or None when every image is already one face ("none")."""
    if settings.detector == "none":
        return None
    if settings.detector == "haar":
        return HaarDetector(settings, CASCADES[settings.haar_cascade])
    raise ValueError(f"unknown faces.detector {settings.detector!r}")
