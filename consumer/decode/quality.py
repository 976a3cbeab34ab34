"""How well the model can judge a face crop: size, sharpness, exposure, a score and flags.

Every measure is taken on the crop in grey scaled to 48x48, FER's own face size, which the
shipped model was trained on and the thresholds below were calibrated on: faces of any
size compare, and the cost per face grows only slowly with the crop (on one core, 64 us
at 48 px, 0.2 ms at 300 px, 0.6 ms at 800 px: `python -m bench.quality_bench`).

- sharpness: the variance of the 3x3 Laplacian (0 1 0 / 1 -4 1 / 0 1 0) of the grey
  levels on the 0..255 scale, over the interior pixels; the usual blur measure (Pech-Pacheco
  et al., 2000). A face smaller than 48 px is scaled up first and so reads as soft, and
  the measure falls with contrast too (a dark, flat face has little detail to read).
- brightness: the mean grey level, 0 black to 1 white.
- contrast: the standard deviation of the grey levels as a share of 0.5 (the largest it
  can be), clipped to 1. Reported, not scored: dark and overexposed faces are flagged by
  brightness and saturation, and a flat but well-lit face is still readable.
- saturated share: grey levels at 250 or above; not in the result, it only raises the
  overexposed flag.

Flags and the score. Each flag has a factor in [0, 1] that falls linearly from 1 at the
threshold to 0 at the worst possible value (0 px, a flat crop, black, white or all
saturated); the score is the smallest factor, 1 when nothing is flagged. So a face with
score 0.5 is, in its worst measure, half-way from the threshold to useless, and
`faces.min_quality` = 0.5 skips a face 24 px tall (min_face_px 48) or one darkened to
half the dark threshold.

`vouched_by` says who put the box there: the event ("event"), the face detector
("detector"), or nobody ("none": faces.detector = "none" takes the whole image as the
face, the normal case for pre-cropped FER-style input, so it is not flagged by itself).
`no_face_found` is set when faces.verify_whole_image asked the Haar cascade to check such
a whole image and it found no face: its factor is NO_FACE_FACTOR. The check is off by
default because the cascade finds a face in only 61-77% of the committed FER faces
(bench/README.md), so it would flag a quarter of good faces; it is for streams that may
carry images without any face.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image

from schemas import FaceQuality, QualityFlag

VouchedBy = Literal["event", "detector", "none"]

# The size every measure is taken at: FER-2013's faces are 48x48.
MEASURE_SIDE = 48
# Calibrated with `python -m bench.quality_bench --calibrate` on the 404 committed FER
# faces (data/faces) and on altered copies of them; the numbers are in bench/README.md.
# Sharpness: the FER faces' 1st/2nd/5th percentiles are 410/464/624 (median 1877); the
# same faces Gaussian-blurred with sigma 1 have a median of 143 and a 95th percentile of
# 303. FER faces are small and soft, so the 5th percentile would flag one good face in
# twenty; 300 flags 1.0% of them, 95% of the sigma-1 blurred ones, all of sigma 1.5 and
# 99% of the faces shrunk to 20 px.
BLURRY_SHARPNESS = 300.0
# Brightness: FER's 1st/2nd/5th percentiles are 0.19/0.23/0.27; the faces scaled to 30%
# of their grey levels have a median of 0.15 and a 95th percentile of 0.22. 0.2 flags
# 1.2% of FER's faces and 87% of the darkened ones.
DARK_BRIGHTNESS = 0.2
# Brightness: FER's 99th percentile is 0.80 (the brightest face 0.95); faces with 120
# grey levels added have a median of 0.89.
OVEREXPOSED_BRIGHTNESS = 0.8
# A grey level from which a pixel counts as saturated (clipped white), and the share of
# such pixels that flags a face overexposed: FER's 99th percentile share is 0.21; faces
# with their grey levels doubled (bright skin clipped) have a median share of 0.57. With
# the brightness threshold: 1.5% of FER's faces, 89% of the +120 and 87% of the doubled.
SATURATED_LEVEL = 250
OVERSATURATED_SHARE = 0.25

# An unverified whole image is not worthless (the cascade misses many real faces) but
# below faces.min_quality = 0.5, the natural setting for "drop what may not be a face".
NO_FACE_FACTOR = 0.4

# Scores keep three decimals, rounded down: a flagged face never shows 1.0.
_SCORE_STEPS = 1000


def _laplacian_variance(grey: np.ndarray) -> float:
    """The 3x3 Laplacian as sums of shifted views (no SciPy, no OpenCV in the parent)."""
    centre = grey[1:-1, 1:-1]
    lap = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * centre
    return float(lap.var())


def _scaled_grey(crop: Image.Image) -> np.ndarray:
    """The crop in grey at MEASURE_SIDE x MEASURE_SIDE, as float32 levels 0..255."""
    grey = crop.convert("L")
    if grey.size != (MEASURE_SIDE, MEASURE_SIDE):
        # Bilinear with Pillow's antialiasing when shrinking; reducing_gap first box-reduces
        # a big crop by an integer factor, so the cost stays small for any crop size.
        grey = grey.resize(
            (MEASURE_SIDE, MEASURE_SIDE), Image.Resampling.BILINEAR, reducing_gap=3.0
        )
    return np.asarray(grey, dtype=np.float32)


def _low(value: float, threshold: float) -> float:
    """The factor of a measure that is bad when low (worst value 0)."""
    return 1.0 if value >= threshold else max(0.0, value / threshold)


def _high(value: float, threshold: float, worst: float = 1.0) -> float:
    """The factor of a measure that is bad when high (worst value `worst`)."""
    return 1.0 if value <= threshold else max(0.0, (worst - value) / (worst - threshold))


def measure(
    crop: Image.Image,
    vouched_by: VouchedBy,
    min_face_px: int = 48,
    face_found: bool | None = None,
) -> FaceQuality:
    """The quality of one face crop (any mode; RGB expected). `min_face_px` is
    faces.min_face_px: a crop whose shorter side is under it is flagged small.
    `face_found` is the whole-image check's answer (None: not checked)."""
    width, height = crop.size
    grey = _scaled_grey(crop)
    sharpness = _laplacian_variance(grey)
    levels = grey / 255.0
    brightness = float(levels.mean())
    contrast = min(1.0, float(levels.std()) / 0.5)
    saturated = float((grey >= SATURATED_LEVEL).mean())
    factors: dict[QualityFlag, float] = {
        "small": _low(min(width, height), min_face_px),
        "blurry": _low(sharpness, BLURRY_SHARPNESS),
        "dark": _low(brightness, DARK_BRIGHTNESS),
        "overexposed": min(
            _high(brightness, OVEREXPOSED_BRIGHTNESS), _high(saturated, OVERSATURATED_SHARE)
        ),
        "no_face_found": NO_FACE_FACTOR if face_found is False else 1.0,
    }
    flags = [flag for flag, factor in factors.items() if factor < 1.0]
    return FaceQuality(
        width=width,
        height=height,
        sharpness=round(sharpness, 1),
        brightness=round(brightness, 4),
        contrast=round(contrast, 4),
        vouched_by=vouched_by,
        score=math.floor(min(factors.values()) * _SCORE_STEPS) / _SCORE_STEPS,
        flags=flags,
    )


def skip_reason(quality: FaceQuality, min_quality: float | None) -> str | None:
    """Why a face is not classified under faces.min_quality, or None to classify it."""
    if min_quality is None or quality.score >= min_quality:
        return None
    why = f" ({', '.join(quality.flags)})" if quality.flags else ""
    return f"quality {quality.score:.3g} < faces.min_quality {min_quality:g}{why}"
