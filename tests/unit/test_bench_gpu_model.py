"""bench/gpu_model.sh, the GPU host's `make model`, run end to end on the CPU with the tiny
recipe and the committed faces: the script a GPU session will run is the one tested here."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

from tests.conftest import FER_FACES

REPO = Path(__file__).resolve().parents[2]


def test_gpu_model_script_trains_calibrates_and_evaluates_from_a_packed_folder(
    tmp_path: Path,
) -> None:
    pack = tmp_path / "faces.tar.gz"
    with tarfile.open(pack, "w:gz") as tar:
        tar.add(FER_FACES, arcname="faces")  # any top-level name: the script finds it
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "FER_PACK": str(pack),
        "MODEL_ARCH": "tiny",
        "MODEL_EPOCHS": "1",
        "TEACHER_EPOCHS": "1",
        "THREADS": "1",
        "DEVICE": "cpu",
    }
    env.pop("FER_DIR", None)
    done = subprocess.run(
        ["bash", "bench/gpu_model.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = out / "llava-fer-small"
    args = json.loads((model / "training_args.json").read_text())
    assert args["status"] == "finished" and args["calibration"]["temperature"] > 0
    assert args["teacher_summary"]["config"]["epochs"] == 1
    assert not (model / ".resume").exists()
    val = json.loads((model / "split.json").read_text())["val"]
    for name in ("llava-fer-small-val", "llava-fer-small-val-flip"):
        report = json.loads((out / "reports" / name / "report.json").read_text())
        assert report["data"]["images"] == len(val)
    log = (out / "model.log").read_text()
    assert "| llava-fer-small-val-flip |" in log and "gpu model: training took" in log
    # Without data it says what to do, before anything runs.
    env["FER_PACK"] = str(tmp_path / "missing.tar.gz")
    done = subprocess.run(
        ["bash", "bench/gpu_model.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "make fer-pack FER=" in done.stderr
