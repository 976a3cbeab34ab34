"""Face quality: the measures, the flags and score, on real FER faces and altered copies,
and where `vouched_by` comes from (the event, the detector, or nobody)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from consumer.config import FaceSettings
from consumer.decode.decoding import FrameCropper, decode_cropped, encode_cropped
from consumer.decode.quality import (
    BLURRY_SHARPNESS,
    DARK_BRIGHTNESS,
    measure,
    skip_reason,
)
from schemas import FaceBox, FaceQuality
from tests.conftest import FER_FACES

PATHS = sorted(FER_FACES.rglob("*.png"))


@pytest.fixture(scope="module")
def fer() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in PATHS]


def _share(faces: list[Image.Image], flag: str) -> float:
    return sum(flag in measure(f, "none").flags for f in faces) / len(faces)


def test_real_fer_faces_are_rarely_flagged(fer: list[Image.Image]) -> None:
    assert len(fer) == 404
    qualities = [measure(face, "none") for face in fer]
    # FER faces are small and soft: "blurry" must not mark most of them (1.0% at calibration).
    assert sum("blurry" in q.flags for q in qualities) / len(fer) < 0.02
    assert sum("dark" in q.flags for q in qualities) / len(fer) < 0.03
    assert sum("overexposed" in q.flags for q in qualities) / len(fer) < 0.03
    assert not any("small" in q.flags or "no_face_found" in q.flags for q in qualities)
    assert sum(q.score == 1.0 for q in qualities) / len(fer) > 0.95
    assert float(np.median([q.sharpness for q in qualities])) > 4 * BLURRY_SHARPNESS


@pytest.mark.parametrize(
    ("alter", "flag", "share"),
    [
        (lambda im: im.filter(ImageFilter.GaussianBlur(1.5)), "blurry", 0.99),
        (lambda im: im.point(lambda v: v * 0.3), "dark", 0.8),
        (lambda im: im.point(lambda v: min(255, v + 120)), "overexposed", 0.8),
        (lambda im: im.point(lambda v: min(255, v * 2)), "overexposed", 0.8),
        (lambda im: im.resize((20, 20)), "small", 1.0),
    ],
    ids=["gaussian-blur", "darkened", "brightened", "clipped", "20px"],
)
def test_altered_faces_are_flagged(
    fer: list[Image.Image], alter: object, flag: str, share: float
) -> None:
    altered = [alter(face) for face in fer[::4]]  # type: ignore[operator]
    assert _share(altered, flag) >= share


def test_score_is_the_worst_factor_and_one_without_flags(fer: list[Image.Image]) -> None:
    for face in fer[:40]:
        q = measure(face, "event")
        assert 0.0 <= q.score <= 1.0 and (q.score == 1.0) == (not q.flags)
    tiny = measure(fer[0].resize((20, 20)), "event")
    assert tiny.flags[:1] == ["small"] and tiny.score <= round(20 / 48, 3)
    assert measure(Image.new("RGB", (64, 64)), "event").score == 0.0  # black and flat
    white = measure(Image.new("RGB", (64, 64), (255, 255, 255)), "event")
    assert white.score == 0.0 and "overexposed" in white.flags
    # min_face_px is faces.min_face_px: the same 40 px face is small only under 48.
    assert "small" in measure(fer[0].resize((40, 40)), "event", min_face_px=48).flags
    assert "small" not in measure(fer[0].resize((40, 40)), "event", min_face_px=32).flags


def test_measures_have_the_documented_scales() -> None:
    # A 0/255 checkerboard: every interior Laplacian is +-4*255, so the variance is 1020^2.
    board = (np.indices((48, 48)).sum(axis=0) % 2 * 255).astype(np.uint8)
    q = measure(Image.fromarray(board).convert("RGB"), "detector")
    assert q.sharpness == pytest.approx(1020.0**2)
    assert q.brightness == pytest.approx(0.5) and q.contrast == pytest.approx(1.0)
    assert q.vouched_by == "detector" and (q.width, q.height) == (48, 48)
    grey = measure(Image.new("L", (100, 50), 51), "event")
    assert grey.brightness == pytest.approx(0.2) and grey.contrast == 0 and grey.sharpness == 0
    assert (grey.width, grey.height) == (100, 50)
    assert measure(Image.new("RGBA", (30, 30), (0, 0, 0, 0)), "none").brightness == 0
    assert "dark" in measure(Image.new("L", (48, 48), int(DARK_BRIGHTNESS * 255) - 2), "none").flags
    FaceQuality.model_validate(q.model_dump())  # in range for the schema


def test_big_crops_are_measured_at_48px_and_compare(fer: list[Image.Image]) -> None:
    face = fer[10]
    small = measure(face, "event")
    big = measure(face.resize((480, 480), Image.Resampling.LANCZOS), "event")
    assert big.brightness == pytest.approx(small.brightness, abs=0.02)
    assert big.flags == small.flags == []


def test_skip_reason_names_score_setting_and_flags() -> None:
    q = measure(Image.open(PATHS[0]).convert("RGB").resize((12, 12)), "event")
    assert skip_reason(q, None) is None and skip_reason(q, 0.0) is None
    assert skip_reason(q, q.score) is None  # at the threshold the face is kept
    reason = skip_reason(q, 0.5)
    assert reason == f"quality {q.score:.3g} < faces.min_quality 0.5 (small, blurry)"


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_vouched_by_says_where_the_boxes_came_from() -> None:
    photo = Image.fromarray(np.asarray(data.astronaut()))
    frame = _png(photo)
    box = FaceBox(x=182, y=76, width=87, height=108)
    plain = FrameCropper(FaceSettings(), 50_000_000)
    assert plain(frame, [box]).vouched_by == "event"
    # No boxes, no detector: the whole image is the face, and nobody vouched for it.
    assert plain(frame, None).vouched_by == "none"
    haar = FrameCropper(FaceSettings(detector="haar"), 50_000_000)
    found = haar(frame, None)
    assert found.vouched_by == "detector" and found.boxes
    assert haar(frame, [box]).vouched_by == "event"  # the event's boxes win
    # It crosses the decoder processes' wire format, and nothing else is accepted.
    header, payload = encode_cropped(found)
    assert decode_cropped(header, payload).vouched_by == "detector"
    with pytest.raises(ValueError, match="vouched_by"):
        decode_cropped({**header, "vouched_by": "me"}, payload)


def test_who_vouched_changes_no_score_or_flag() -> None:
    # vouched_by "none" is the normal case for pre-cropped input: it lowers nothing by
    # itself (no_face_found needs faces.verify_whole_image).
    face = Image.open(PATHS[1]).convert("RGB")
    measured = [measure(face, "event"), measure(face, "detector"), measure(face, "none")]
    assert len({(q.score, tuple(q.flags)) for q in measured}) == 1
    assert [q.vouched_by for q in measured] == ["event", "detector", "none"]


def test_the_bench_runs_and_its_calibration_matches_the_thresholds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from bench.quality_bench import main

    assert main(["--rounds", "1"]) == 0
    assert "| 48x48 |" in capsys.readouterr().out
    assert main(["--calibrate"]) == 0
    printed = capsys.readouterr().out
    as_committed = printed.split("## as committed")[1].split("##")[0]
    assert "blurry=1.0%" in as_committed and "small=0.0%" in as_committed


def test_verify_whole_image_flags_images_without_a_face(fer: list[Image.Image]) -> None:
    """faces.verify_whole_image: the Haar cascade vouches for a pre-cropped face it finds,
    and an image with no face in it is flagged no_face_found with a score of 0.4."""
    checking = FrameCropper(FaceSettings(verify_whole_image=True), 50_000_000)
    rng = np.random.default_rng(0)
    no_faces = [
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).convert("RGB"),
        Image.new("RGB", (64, 64), (128, 128, 128)),
        Image.fromarray(np.asarray(data.camera())).convert("RGB").resize((96, 96)),
    ]
    for image in no_faces:
        cropped = checking(_png(image), None)
        assert (cropped.vouched_by, cropped.face_found) == ("none", False)
        quality = measure(cropped.crops[0], cropped.vouched_by, 48, cropped.face_found)
        assert "no_face_found" in quality.flags and quality.score <= 0.4
        assert skip_reason(quality, 0.5) is not None
    verified = [checking(_png(face), None) for face in fer]
    found = [c for c in verified if c.face_found]
    # The cascade finds most real faces (69% of the committed ones: not all, hence off
    # by default), and those are vouched for by the detector, unflagged.
    assert 0.6 < len(found) / len(verified) < 0.8
    assert all(c.vouched_by == "detector" for c in found)
    quality = measure(found[0].crops[0], "detector", 48, True)
    assert "no_face_found" not in quality.flags
    # Off by default, and the answer crosses the decoder processes' wire format.
    assert FrameCropper(FaceSettings(), 50_000_000)(_png(fer[0]), None).face_found is None
    header, payload = encode_cropped(checking(_png(no_faces[0]), None))
    assert decode_cropped(header, payload).face_found is False
    with pytest.raises(ValueError, match="face_found"):
        decode_cropped({**header, "face_found": "no"}, payload)
