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

# The project's venv where there is one (a dev machine), else the host's Python.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
SITE=${GPU_SITE:-.cache/gpu-site}
export OUT=${OUT:-.cache/bench}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# What the worker imports beyond the host's packages (consumer.fetch.s3 imports boto3 at
# module level, so it is needed even though no event here is an s3:// one).
NEEDED="pydantic,pydantic_settings,structlog,confluent_kafka,boto3"

if "$PYTHON" -c "import $NEEDED" 2>/dev/null; then
    echo "gpu check: $NEEDED already importable; no wheels installed"
else
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu check: $PYTHON cannot import $NEEDED and $WHEELS has no wheels;" \
            "run \`make gpu-wheels\` where PyPI is reachable and bring $WHEELS along" >&2
        exit 2
    fi
    stamp=$(ls "$WHEELS"/*.whl | xargs -n1 basename | sort | sha1sum | cut -c1-12)
    if [ "$(cat "$SITE/.installed" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$SITE"
        mkdir -p "$SITE"
        echo "gpu check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
        else  # no pip on the host: a wheel is a zip laid out for site-packages
            for wheel in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
        fi
        echo "$stamp" > "$SITE/.installed"
    fi
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# Fail here, naming the module, rather than in the middle of a timed phase.
"$PYTHON" -c "import consumer.stream.worker, consumer.stream.memory_broker, consumer.engine" || {
    echo "gpu check: the worker does not import with $PYTHON (see above)" >&2
    exit 2
}

exec "$PYTHON" -m bench.gpu_check --started "$started" "$@"
