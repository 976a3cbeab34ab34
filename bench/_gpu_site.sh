# Sourced by the GPU host scripts (bench/gpu_check.sh, bench/gpu_model.sh) from the repository
# root: picks PYTHON and OUT, and makes what the worker imports beyond the host's packages
# importable, installing .cache/gpu-wheels offline into .cache/gpu-site (once per set of
# wheels) and putting it on PYTHONPATH. The host has no network; nothing here opens any
# connection.

# The project's venv where there is one (a dev machine), else the host's Python.
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEELS=${GPU_WHEELS:-.cache/gpu-wheels}
SITE=${GPU_SITE:-.cache/gpu-site}
export OUT=${OUT:-.cache/bench}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# What the worker imports beyond the host's packages (consumer.fetch.s3 imports boto3 at
# module level, so it is needed even though no event here is an s3:// one); training and
# evaluation need only the first three (GPU_NEEDED).
NEEDED=${GPU_NEEDED:-pydantic,pydantic_settings,structlog,confluent_kafka,boto3}

if "$PYTHON" -c "import $NEEDED" 2>/dev/null; then
    echo "gpu site: $NEEDED already importable; no wheels installed"
else
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu site: $PYTHON cannot import $NEEDED and $WHEELS has no wheels;" \
            "run \`make gpu-wheels\` where PyPI is reachable and bring $WHEELS along" >&2
        exit 2
    fi
    stamp=$(ls "$WHEELS"/*.whl | xargs -n1 basename | sort | sha1sum | cut -c1-12)
    if [ "$(cat "$SITE/.installed" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$SITE"
        mkdir -p "$SITE"
        echo "gpu site: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE"
        if "$PYTHON" -m pip --version >/dev/null 2>&1; then
            "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
        else  # no pip on the host: a wheel is a zip laid out for site-packages
            for wheel in "$WHEELS"/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done
        fi
        echo "$stamp" > "$SITE/.installed"
    fi
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
