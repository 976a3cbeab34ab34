"""bench.gpu_check's parts: startup_check on the tiny model, the rows and summary made of
its reports, the bench command, the variants.

The whole script (bench/gpu_check.sh) takes ~1.5 minutes on a CPU, too long here; the bench
it runs, worker-memory row included, is test_bench_smoke.py."""

from __future__ import annotations

import json
from pathlib import Path

from bench._bench_core import Row
from bench._variants import ENGINE_MODES, skip_reason, variant_settings
from bench.gpu_check import DEFAULT_VARIANTS, bench_command, parse_args, startup_row, summary
from bench.startup_check import main as startup_check


def _write(path: Path, **data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_startup_check_reports_time_to_ready(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "cold.json"
    argv = ["--label", "cold", "--out", str(out), "--model", "tiny", "--device", "cpu"]
    argv += ["--model-path", str(tiny_checkpoint), "--batch", "2", "--compile", "off"]
    assert startup_check(argv) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["complete"] is True and data["compiled"] is False
    assert [size for size, _ in data["warmup_calls"]] == [2]  # uncompiled: one warm-up call
    assert data["ready_s"] == data["construct_s"] + data["warmup_s"]
    assert data["images_per_s"] > 0
    row = startup_row("cold", out, 0, 60.0)
    assert row.warmup_s == data["ready_s"] and row.batch == 2


def test_a_complete_startup_run_becomes_a_time_to_ready_row(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "cold.json",
        batch=2,
        complete=True,
        load_s=3.0,
        construct_s=1.0,
        warmup_s=40.0,
        ready_s=41.0,
        images_per_s=900.0,
        p50_ms=2.2,
        warmup_calls=[[1, 30.0], [2, 10.0]],
        buckets=[1, 2],
        compiled=True,
        precision="none",
        import_s=2.0,
    )
    row = startup_row("cold", path, 0, 90.0)
    assert (row.variant, row.batch, row.warmup_s, row.load_s) == ("startup-cold", 2, 41.0, 3.0)
    assert row.note.startswith("time to ready 41.0s = construction 1.0s + warm_up 40.0s")
    assert "[1: 30.0s, 2: 10.0s]" in row.note


def test_a_run_cut_by_its_time_limit_says_how_far_it_got(tmp_path: Path) -> None:
    path = _write(tmp_path / "warm.json", batch=4, warmup_calls=[[1, 12.5]], buckets=[1, 2, 4])
    row = startup_row("warm", path, None, 50.0)
    assert row.warmup_s is None
    assert row.note.startswith("CUT at the 50s limit; warm-up calls by batch [1: 12.5s]")
    assert startup_row("cold", tmp_path / "missing.json", 1, 50.0).note == "no result (exit 1)"


def test_summary_names_the_worker_ratio_and_both_times_to_ready() -> None:
    rows = [
        Row("worker-memory", 32, ratio_to_engine=0.981),
        Row("startup-cold", 1, warmup_s=95.0),
        Row("startup-warm", 1, warmup_s=21.0),
    ]
    assert summary(rows) == [
        "worker-memory: 0.981x the eager engine at batch 32 (meets the 0.97 target)",
        "time to ready: cold 95.0s, warm 21.0s",
    ]


def test_the_bench_runs_every_engine_mode_at_batch_one_and_the_best(tmp_path: Path) -> None:
    args = parse_args([])
    full = bench_command(args, False, tmp_path, 200)
    assert full[full.index("--variants") + 1] == ",".join(DEFAULT_VARIANTS)
    assert full[full.index("--other-batches") + 1] == "1,best"
    assert full[full.index("--worker-broker") + 1] == "memory"
    quick = bench_command(args, True, tmp_path, 200)
    assert "compiled" not in quick[quick.index("--variants") + 1].split(",")
    assert quick[quick.index("--model") + 1] == "tiny"


def test_variants_adapt_to_the_engine_settings(tmp_path: Path) -> None:
    import torch

    base = {"path": tmp_path, "device": "cpu"}
    eager, _ = variant_settings(base, "eager")
    assert eager.compile == "off" and eager.preprocess == "device"
    # No quantization for eager, whichever setting this engine has for it.
    assert getattr(eager, "precision", "bf16") in ("bf16", "none")
    assert getattr(eager, "fp8", False) is False
    cpu = torch.device("cpu")
    assert skip_reason("fp8", None, cpu) == "needs a CUDA GPU of compute capability 8.9+"
    assert skip_reason("fp8", ["fp8"], cpu) is not None  # a GPU kernel: never forced
    assert skip_reason("compiled", ["compiled"], cpu) is None  # slow on a CPU: forced
    assert skip_reason("eager", ["fp8"], cpu) == "not in --variants"
    assert set(DEFAULT_VARIANTS) <= set(ENGINE_MODES)
