#!/usr/bin/env bash
# `make model` on a GPU host with no network: the CNN teacher, the distilled LLaVA, its
# temperature and both evaluations (with and without the test-time flip), into $OUT:
#   $OUT/llava-fer-small/   the checkpoint with its records (a cut run leaves .resume/ there)
#   $OUT/teacher/           the teacher (reused by a rerun with the same faces and settings)
#   $OUT/reports/           llava-fer-small-val/ and llava-fer-small-val-flip/
#   $OUT/model.log          everything the run printed
#
#   bench/gpu_model.sh                  # the GPU recipe: arch wide, 150 epochs, teacher 60
#   MODEL_ARCH=tiny MODEL_EPOCHS=1 TEACHER_EPOCHS=1 FER_DIR=data/faces bench/gpu_model.sh
#
# FER-2013 is not in the repository: `make fer-pack FER=<train folder>` writes
# .cache/fer2013-train.tar.gz (50 MB) where the folder is; it travels with the working tree
# (the device tool's carry) and is unpacked into a temporary folder here. The wheels are the
# training subset (`make gpu-wheels-train`, .cache/gpu-wheels-train, 3 MB). A rerun with the
# previous $OUT brought back resumes a cut run (MODEL_TIMEOUT_S) after its last epoch.
set -euo pipefail
cd "$(dirname "$0")/.."
export GPU_WHEELS=${GPU_WHEELS:-.cache/gpu-wheels-train}
export GPU_NEEDED=pydantic,pydantic_settings,structlog
source bench/_gpu_site.sh  # PYTHON, OUT, the offline wheel install, PYTHONPATH
mkdir -p "$OUT/reports"

if [ -z "${FER_DIR:-}" ]; then
    pack=${FER_PACK:-.cache/fer2013-train.tar.gz}
    [ -f "$pack" ] || { echo "gpu model: no FER_DIR and no $pack (make fer-pack FER=...)" >&2; exit 2; }
    unpacked=$(mktemp -d)
    trap 'rm -rf "$unpacked"' EXIT
    tar -xzf "$pack" -C "$unpacked"
    FER_DIR=$(find "$unpacked" -mindepth 1 -maxdepth 1 -type d | head -1)
fi
# The two commands' own entry points: `emotion-worker` itself also imports the worker's
# Kafka and S3 clients, which are not needed here (and not in the training wheels).
main_of() { echo "import sys; from $1 import main; sys.exit(main(sys.argv[1:]))"; }

model="$OUT/llava-fer-small"
extra=()
[ -n "${LR:-}" ] && extra+=(--lr "$LR")
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    started=$(date +%s)
    # A run cut by the limit keeps its state in $model/.resume: rerun to go on.
    timeout "${MODEL_TIMEOUT_S:-600}" "$PYTHON" -c "$(main_of consumer.training.cli)" \
        --data "$FER_DIR" --out "$model" --from-scratch --arch "${MODEL_ARCH:-wide}" \
        --epochs "${MODEL_EPOCHS:-150}" --batch-size "${BATCH_SIZE:-64}" --seed 0 \
        --threads "${THREADS:-8}" \
        --teacher "$OUT/teacher" --teacher-epochs "${TEACHER_EPOCHS:-60}" \
        --calibration-fraction 0.04 --select last --device "${DEVICE:-auto}" "${extra[@]}"
    echo "gpu model: training took $(( $(date +%s) - started )) s"
    for tta in none flip; do
        suffix=$([ "$tta" = flip ] && echo "-flip" || true)
        "$PYTHON" -c "$(main_of consumer.eval.cli)" --model "$model" --data "$FER_DIR" --split-file "$model/split.json" \
            --split val --tta "$tta" --quiet --out "$OUT/reports/llava-fer-small-val$suffix"
    done
    "$PYTHON" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
args = json.loads((out / "llava-fer-small" / "training_args.json").read_text())
teacher = args.get("teacher_summary") or {}
print("| run | accuracy | macro-F1 | ECE |")
print("|---|---|---|---|")
for name in ("llava-fer-small-val", "llava-fer-small-val-flip"):
    m = json.loads((out / "reports" / name / "report.json").read_text())["metrics"]
    print(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['calibration']['ece']:.4f} |")
last = teacher.get("last_epoch", {})
print(f"teacher val acc {last.get('val_accuracy')}, {teacher.get('wall_time_s')} s; "
      f"student {args.get('wall_time_s')} s, temperature {args.get('calibration')}")
PY
} 2>&1 | tee "$OUT/model.log"
