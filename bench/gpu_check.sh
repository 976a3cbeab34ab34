#!/usr/bin/env bash
# One command for a GPU host: bench/gpu_check.py (every engine mode at batch 1 and the best
# batch, the unchanged worker on the in-memory broker, time to ready cold and warm), within
# GPU_CHECK_BUDGET_S (default 350 s); one table, JSON + Markdown under $OUT.
#
#   bench/gpu_check.sh                 # CUDA: LLaVA-1.5-7B shape; no CUDA: tiny model, short
#   GPU_CHECK_QUICK=1 bench/gpu_check.sh
#
# The host is expected to have Python 3.12, torch, transformers, pillow, numpy, opencv and
# prometheus-client, but not the worker's other dependencies, and no network: those come
# from .cache/gpu-wheels (`make gpu-wheels` on a machine with network; the folder travels
# with the working tree), installed offline into .cache/gpu-site and put on PYTHONPATH.
# Nothing here opens a connection to anything but 127.0.0.1.
set -euo pipefail

started=$(date +%s.%N)  # the budget counts from here, the wheel install included
cd "$(dirname "$0")/.."

source bench/_gpu_site.sh  # PYTHON, OUT, the offline wheel install, PYTHONPATH

# Fail here, naming the module, rather than in the middle of a timed phase.
"$PYTHON" -c "import consumer.stream.worker, consumer.stream.memory_broker, consumer.engine" || {
    echo "gpu check: the worker does not import with $PYTHON (see above)" >&2
    exit 2
}

exec "$PYTHON" -m bench.gpu_check --started "$started" "$@"
