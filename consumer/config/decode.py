"""Decoding the fetched images, finding the faces in them and cropping them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from consumer.config.base import Section


class DecodeSettings(Section):
    """Decoding, face detection and cropping of the fetched images."""

    # "process" isolates the decoder: a file that crashes or hangs it costs one dead
    # letter, not the worker.
    isolation: Literal["process", "thread"] = Field(
        default="process",
        description=(
            "`process`: decode, detect and crop in separate worker processes "
            "(crash-isolated). `thread`: in the fetch threads (no isolation; for debugging "
            "and single-process profiling)."
        ),
    )
    workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Decoder processes; the fetch threads queue for them.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "Longest one image may take to decode, detect and crop before its process is "
            "killed, in seconds."
        ),
    )
    # A bomb that gets past the pixel check fails with image_too_large instead of
    # exhausting the pod's memory.
    max_memory_mb: int = Field(
        default=2048,
        ge=512,
        description="Address-space cap of each decoder process, in MiB.",
    )
    # Replacing decoder processes bounds slow leaks.
    max_tasks_per_process: int = Field(
        default=1000,
        ge=1,
        description="Images a decoder process handles before it is replaced.",
    )


class FaceSettings(Section):
    """Finding the faces in a frame and cropping them."""

    # The Haar cascade's weights ship inside the opencv-python-headless wheel.
    detector: Literal["none", "haar"] = Field(
        default="none",
        description=(
            "Used when an event carries no boxes. `none`: the whole image is one face (right "
            "for pre-cropped, FER-style input). `haar`: OpenCV's frontal-face Haar cascade."
        ),
    )
    # Off by default: the Haar cascade finds a face in only 61-77% of the committed FER
    # faces (bench/README.md), so checking would flag a quarter of good faces.
    verify_whole_image: bool = Field(
        default=False,
        description=(
            "With `faces.detector = none`: check with OpenCV's Haar cascade that the whole "
            "image really holds a face. Found: the face's `vouched_by` is `detector`; not "
            "found: it stays `none` and is flagged `no_face_found` (quality score at most "
            "0.4, so `faces.min_quality = 0.5` skips it). For streams that may carry "
            "non-facial images; it misses about a quarter of real FER-style faces."
        ),
    )
    # The classifier was trained on crops with some forehead and chin.
    margin: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Every box (the event's or the detector's) grows by this fraction of its width "
            "and height on each side, then is clipped to the image."
        ),
    )
    # 48 is FER's own face size; below it there is little expression left to read, and
    # starting the cascade's search there saves ~40% of its time (bench/detector_bench.py).
    min_face_px: int = Field(
        default=48,
        ge=8,
        le=4096,
        description=(
            "Detections smaller than this (pixels, shorter side) are ignored, and any face "
            "under it (the event's box, or the whole image) is flagged `small` in its quality."
        ),
    )
    # Off by default: every face is classified and its quality only reported. The score's
    # scale is in consumer/decode/quality.py; 0.5 skips e.g. a face half min_face_px tall.
    min_quality: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "Faces whose quality score (0-1, in every result: the smallest of the size, "
            "sharpness, darkness and overexposure factors, 1 when nothing is flagged) is "
            "below this are not classified: the result lists them with status `skipped` and "
            "the reason, and they cost no model time. Unset: every face is classified."
        ),
    )
    max_faces: int = Field(
        default=16,
        ge=1,
        le=64,
        description="Most faces per frame; detections beyond it (largest first) are dropped.",
    )
    # 64 boxes over a whole frame would otherwise turn one small file into hundreds of MB
    # of crops.
    max_crop_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description=(
            "Pixels of all of one event's crops together (after the margin); over it the "
            "event is `image_too_large`."
        ),
    )
    # Shrinking before detection is for speed.
    detect_max_side: int = Field(
        default=960,
        ge=64,
        le=8192,
        description=(
            "Frames are shrunk so their longer side is at most this (pixels) before "
            "detection; boxes are scaled back to full-resolution coordinates."
        ),
    )
    haar_scale_factor: float = Field(
        default=1.1,
        gt=1.0,
        le=2.0,
        description="Haar cascade tuning: the image pyramid's step.",
    )
    haar_min_neighbors: int = Field(
        default=5,
        ge=0,
        le=50,
        description="Haar cascade tuning: how many overlapping hits make a face.",
    )
    # alt2 has the fewest false positives at the same recall on the benchmark.
    haar_cascade: Literal["alt2", "default", "alt"] = Field(
        default="alt2",
        description="Which of the OpenCV wheel's frontal-face Haar cascades is used.",
    )

    @model_validator(mode="after")
    def _verify_needs_whole_images(self) -> FaceSettings:
        if self.verify_whole_image and self.detector != "none":
            raise ValueError(
                "faces.verify_whole_image checks whole images, which are only taken as "
                f"faces with faces.detector = none (it is {self.detector!r}): the detector "
                "already vouches for its faces; remove faces.verify_whole_image"
            )
        return self
