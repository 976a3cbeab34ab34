"""bench.prepare_bench runs end to end with a few images and prints its table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.prepare_bench import main
from tests.conftest import FER_FACES

ROWS = {
    "fer48-png",
    "fer48-png+process",
    "1080p-boxes",
    "1080p-boxes+process",
    "1080p-boxes+process+glibc-defaults",
    "1080p-haar",
    "720p-haar",
}
INLINE = {"fer48-png", "1080p-boxes", "1080p-haar", "720p-haar"}


def _table_rows(markdown: str) -> list[dict[str, str]]:
    """The markdown table as one dict per row, keyed by the header cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]  # after the header and the |---| line
    ]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    affinity = os.sched_getaffinity(0)
    out = tmp_path / "bench"

    argv = ["--images", "2", "--repeats", "2", "--data", str(FER_FACES), "--out", str(out)]
    assert main(argv) == 0

    assert os.sched_getaffinity(0) == affinity  # the pin to one core is undone
    printed = capsys.readouterr().out
    (table_file,) = out.glob("*.md")
    table = table_file.read_text(encoding="utf-8")
    assert table.strip() in printed
    assert "Fetch, decode and crop on one core" in table
    rows = {row["row"]: row for row in _table_rows(table)}
    assert set(rows) == ROWS
    for name, row in rows.items():
        assert _number(row["img/s/core"]) > 0, row
        assert _number(row["fetch ms"]) > 0, row
        faces = _number(row["faces/img"])
        if faces > 0:  # a detector may find nothing in two frames
            for column in ("cores @68 faces/s", "cores @100 faces/s"):
                assert _number(row[column]) > 0, row
            assert _number(row["cores @100 faces/s"]) > _number(row["cores @68 faces/s"])
        if name in INLINE:
            assert _number(row["decode ms"]) > 0, row
            assert _number(row["detect ms"]) >= 0 and _number(row["crop ms"]) >= 0, row
        else:
            assert _number(row["decoder call ms"]) > 0, row
            assert row["IPC ms"], row
    assert _number(rows["fer48-png"]["faces/img"]) == 1
    assert _number(rows["1080p-boxes"]["faces/img"]) == 3

    (json_file,) = out.glob("*.json")
    data = json.loads(json_file.read_text(encoding="utf-8"))
    assert data["environment"]["cpu_model"]
    assert {row["row"] for row in data["rows"]} == ROWS
    assert all(row["images_per_s"] > 0 and row["wall_images_per_s"] > 0 for row in data["rows"])
