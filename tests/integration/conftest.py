"""Fixtures for tests against the real broker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import FER_FACES

pytestmark = pytest.mark.kafka


@pytest.fixture
def junk_files(tmp_path: Path) -> dict[str, Path]:
    """Files that are not images, and a copy of a face, for hostile events."""
    folder = tmp_path / "junk"
    folder.mkdir()
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    text = folder / "notes.jpg"
    text.write_text("hello")
    face = folder / "face.png"
    shutil.copy(next(FER_FACES.joinpath("happy").glob("*.png")), face)
    return {"garbage": garbage, "text": text, "face": face}
