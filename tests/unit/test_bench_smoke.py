"""bench.llava_bench runs end to end on the CPU with the tiny model and writes its table,
the worker-memory row (the unchanged Worker on the in-memory broker) included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.llava_bench import main


def _table_rows(markdown: str) -> list[dict[str, str]]:
    """The markdown table as one dict per row, keyed by the header cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True))
        for line in lines[2:]  # after the header and the |---| line
    ]


def test_tiny_model_on_cpu(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    argv = ["--model", "tiny", "--model-path", str(tiny_checkpoint), "--device", "cpu"]
    argv += ["--batch-sizes", "1,4", "--iterations", "2", "--agree-faces", "8"]
    # The worker row on the in-memory broker, images over loopback HTTP: a few events.
    argv += ["--worker-broker", "memory", "--worker-events", "12", "--out", str(out)]

    assert main(argv) == 0

    printed = capsys.readouterr().out
    (table_file,) = out.glob("*.md")
    table = table_file.read_text(encoding="utf-8")
    assert table.strip() in printed  # the printed table is the written one
    rows = {(row["variant"], row["batch"]): row for row in _table_rows(table)}
    for variant in ("eager", "processor-preprocess"):
        for batch in ("1", "4"):
            row = rows[(variant, batch)]
            assert float(row["images/s"].replace(",", "")) > 0, row
            assert 0.0 <= float(row["agree"]) <= 1.0, row
    assert rows[("worker-kafka", "")]["note"] == "skipped: --worker-broker memory"
    worker = next(row for (variant, _), row in rows.items() if variant == "worker-memory")
    assert worker["note"].startswith("12/12 results, 0 dead letters"), worker
    assert float(worker["images/s"].replace(",", "")) > 0, worker
    assert float(worker["vs engine"]) > 0, worker
    # The worker's fetch/decode path feeds the model what a direct call does.
    assert float(worker["max Δ"]) < 1e-3, worker

    (json_file,) = out.glob("*.json")
    data = json.loads(json_file.read_text(encoding="utf-8"))
    assert data["complete"] is True
    assert {"torch", "transformers", "date"} <= set(data["environment"])
    eager = [row for row in data["rows"] if row["variant"] == "eager"]
    assert sorted(row["batch"] for row in eager) == [1, 4]
    assert all(row["images_per_s"] > 0 and 0 <= row["agreement"] <= 1 for row in eager)
    (memory,) = [row for row in data["rows"] if row["variant"] == "worker-memory"]
    assert memory["batch"] in (1, 4)  # the fastest eager batch
    assert {"model_busy_share", "queue_wait_ms", "model_ms_per_call"} <= set(memory["details"])
