# emotion-worker: one worker process per container, one GPU per container.
# Build:  docker build -t emotion-worker:0.4.0 .
# Run:    docker run --gpus 1 -v /srv/models/llava-1.5-7b-fer:/models/llava-1.5-7b-fer:ro \
#           -e EMOTION_WORKER_MODEL__PATH=/models/llava-1.5-7b-fer \
#           -e EMOTION_WORKER_KAFKA__BOOTSTRAP_SERVERS=kafka-1:9092 -p 8080:8080 emotion-worker:0.4.0
# Kubernetes manifests: deploy/k8s (see docs/operations.md).
#
# Base image: Debian's python:3.11-slim, not nvidia/cuda. The worker runs on Python 3.11 to
# 3.13; 3.11 is the version its whole test suite runs on in CI (3.12 and 3.13 run the unit
# tests), and the nvidia/cuda:13.2.x-*-ubuntu24.04 images ship 3.12 only. The CUDA user-space libraries are
# not needed from the base image either: torch 2.15.0 in requirements.lock is the CUDA 13.2
# build whose wheels bring their own runtime, cuBLAS, cuDNN, NCCL, nvrtc and nvjitlink
# (the nvidia-*-cu13 / cuda-toolkit==13.2.2 pins), exactly the versions torch was tested
# with. The only CUDA piece from outside is the driver (libcuda.so, nvidia-smi), which the
# NVIDIA container toolkit (Docker `--gpus`, Kubernetes device plugin / GPU operator)
# mounts into the container at start. CUDA 13.x needs a driver of branch 580 or newer.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml or the lock
# file change, not on every source edit (torch and the CUDA wheels are several GB). Only the
# runtime dependencies of pyproject.toml are installed, every version from the lock file.
COPY pyproject.toml requirements.lock ./
RUN python -m pip install "pip==26.3" \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(*deps, sep='\n')" > /tmp/runtime-requirements.txt \
 && python -m pip install -c requirements.lock -r /tmp/runtime-requirements.txt

# Then the worker itself (no dependency resolution: they are all in place already).
COPY README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
RUN python -m pip install --no-deps . \
 && python -m pip check

# -------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE}

# gcc and libc6-dev: Triton (torch.compile, model.compile="auto" on CUDA) compiles a small
# C launcher for its kernels at warm-up and refuses to start without a C compiler.
# tini: PID 1 that forwards SIGTERM/SIGINT to the worker unchanged (graceful drain) and
# reaps orphaned grandchildren (compiler and decoder subprocesses); not a shell.
# Versions are not pinned: the suite's versions are those of the pinned base image, and
# pins of Debian point releases break the build when the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev tini \
 && rm -rf /var/lib/apt/lists/*

# Non-root, numeric uid so Kubernetes can check runAsNonRoot without runAsUser.
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid worker --home-dir /home/worker --create-home \
      --shell /usr/sbin/nologin worker \
 && mkdir -p /models

COPY --from=build /opt/venv /opt/venv

# Configuration comes from the environment (EMOTION_WORKER_<SECTION>__<NAME>) and/or a
# TOML file given with `run --config`; the image sets no EMOTION_WORKER_* variable, so it
# never overrides a config file. The model is never in the image: mount the checkpoint
# folder read-only (conventionally under /models) and point EMOTION_WORKER_MODEL__PATH at
# it. Everything written at run time goes under /tmp (compile caches), so the root file
# system can be read-only; nothing is downloaded (HF_HUB_OFFLINE).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/worker \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TRITON_CACHE_DIR=/tmp/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/cache/torchinductor \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"

USER 10001:10001
WORKDIR /home/worker

# /metrics, /readyz and /livez (health.port).
EXPOSE 8080

# For Docker and Compose (Kubernetes uses the pod's probes instead). /livez answers 200
# while the model loads, so the start period only covers the interpreter start.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMOTION_WORKER_HEALTH__PORT', '8080') + '/livez', timeout=4)"]

# Exec form: SIGTERM reaches tini and from it the worker, which drains in-flight events
# (flow.drain_timeout_s), flushes the producer, commits and exits 0.
ENTRYPOINT ["/usr/bin/tini", "--", "emotion-worker"]
CMD ["run"]
