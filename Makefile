# The two commands a user needs: `make demo` and `make test`. Both check the machine's
# prerequisites (Python 3.11+, a JDK 17+, Maven), then set up .venv from the lock file.

# The first interpreter of this version that runs: on PATH, else pyenv's (a pyenv shim of a
# version that is not selected exists on PATH but fails, so each candidate is tried).
find_python = $(shell for c in python$(1) $$HOME/.pyenv/versions/$(1).*/bin/python$(1) \
	/usr/bin/python$(1) /usr/local/bin/python$(1); do "$$c" -c "" >/dev/null 2>&1 && \
	{ command -v "$$c" || echo "$$c"; } && break; done)
PYTHON ?= $(or $(call find_python,3.11),$(call find_python,3.12),$(call find_python,3.13),python3)
VENV := .venv
BIN := $(VENV)/bin
LOCK_HASH := $(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(LOCK_HASH)
# `make test-pythons`: the unit tests on these interpreters too, each in .venv-X.Y.
OTHER_PYTHONS ?= 3.12 3.13

.PHONY: prereqs chromium-check setup demo test test-pythons unit integration soak lint schemas docs lock broker \
	model model-eval gpu-wheels gpu-wheels-train fer-pack clean

# Pinned install: every package version comes from requirements.lock. pip's cache
# (~/.cache/pip) keeps the several-GB torch wheel across fresh clones on one machine.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test,train]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# One line naming everything that is missing and how to install it, before any work.
prereqs:
	@missing=""; \
	"$(PYTHON)" -c "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))" \
		>/dev/null 2>&1 || missing="$$missing; Python 3.11+ with venv and pip (apt-get install python3 python3-venv)"; \
	java_major=$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1); \
	[ "$${java_major:-0}" -ge 17 ] 2>/dev/null || missing="$$missing; a JDK 17+ as java on PATH (apt-get install openjdk-17-jdk-headless)"; \
	command -v mvn >/dev/null 2>&1 || missing="$$missing; Maven as mvn on PATH (apt-get install maven)"; \
	if [ -n "$$missing" ]; then echo "missing prerequisites$$missing" >&2; exit 2; fi

setup: prereqs $(STAMP)

demo: setup
	$(BIN)/emotion-worker demo

# Only the dashboard's browser test needs Chromium: said in one line up front, and that test
# fails (never skips) with the same words; the rest of `make test` runs.
chromium-check:
	@[ -n "$$CHROMIUM" ] || command -v chromium >/dev/null 2>&1 || \
		command -v chromium-browser >/dev/null 2>&1 || \
		echo "missing: chromium (apt-get install chromium), the dashboard's browser test needs it" >&2

test: chromium-check setup lint
	$(BIN)/python -m deploy.kafka.local_broker fetch > /dev/null
	$(BIN)/python -m pytest

# The unit tests (no broker) on Python 3.12 and 3.13 as well, from the same lock file.
test-pythons: prereqs
	@for v in $(OTHER_PYTHONS); do \
		py=$$(for c in python$$v $$HOME/.pyenv/versions/$$v.*/bin/python$$v; do \
			"$$c" -c "" >/dev/null 2>&1 && echo "$$c" && break; done); \
		[ -n "$$py" ] || { echo "missing prerequisite: Python $$v (pyenv install $$v)" >&2; exit 2; }; \
		venv=.venv-$$v; stamp=$$venv/.installed-$(LOCK_HASH); \
		if [ ! -f $$stamp ]; then \
			{ test -x $$venv/bin/python || "$$py" -m venv $$venv; } && \
			$$venv/bin/python -m pip install --quiet --upgrade "pip==26.3" && \
			$$venv/bin/python -m pip install --quiet -c requirements.lock -e ".[test,train]" && \
			rm -f $$venv/.installed-* && touch $$stamp || exit 1; \
		fi; \
		echo "== unit tests on $$($$venv/bin/python -V)"; \
		$$venv/bin/python -m pytest tests/unit -p no:cacheprovider || exit 1; \
	done

unit: setup
	$(BIN)/python -m pytest tests/unit

integration: chromium-check setup
	$(BIN)/python -m pytest tests/integration

# The chaos soak (tests/soak), long: MINUTES of random faults per processing guarantee
# (at_least_once, then exactly_once) on a broker and workers of its own, then the table of
# faults, lost events, duplicates and latency (also in .cache/soak-report.md). `make test`
# runs the short one (2 minutes each, seed 15); SOAK_SEED=<n> replays a seed's faults.
MINUTES ?= 30
SOAK_SEED ?= random
soak: setup
	$(BIN)/python -m deploy.kafka.local_broker fetch > /dev/null
	SOAK_MINUTES=$(MINUTES) SOAK_SEED=$(SOAK_SEED) $(BIN)/python -m pytest tests/soak -s

lint: setup
	$(BIN)/ruff check consumer schemas deploy tests bench
	$(BIN)/mypy

schemas: setup
	$(BIN)/python -m schemas.export

# docs/configuration.md, the reference of every setting, from the settings model.
docs: setup
	$(BIN)/python -m consumer.config.reference > docs/configuration.md

# The shipped model (models/llava-fer-small), from FER-2013 on any machine: a VGG-style CNN
# teacher on the training part (kept in .cache/teacher, reused by a rerun with the same faces
# and settings), then the LLaVA distilled from it online (the teacher scores the student's
# augmented view), a temperature fitted on 4% of the training part that nobody trains on, the
# last epoch kept; then the evaluation on the validation split through the engine, with and
# without the test-time flip. Seed 0. Time: docs/training.md (2 CPU cores: hours; a GPU:
# minutes). MODEL_ARCH, MODEL_EPOCHS and TEACHER_EPOCHS change the recipe.
FER ?= $(FER2013_TRAIN)
MODEL_OUT ?= models/llava-fer-small
FER_HELP := it must hold one folder of images per class (angry/, disgusted/, fearful/, \
happy/, neutral/, sad/, surprised/); for FER-2013 use the train folder of the Kaggle dataset \
"emotion-detection-fer" (FER-2013 of the ICML 2013 representation-learning challenge); for a \
smoke run the 404 faces committed in data/faces are enough (--data data/faces)
ifneq ($(filter model model-eval,$(MAKECMDGOALS)),)
ifeq ($(strip $(FER)),)
$(error --data is not set (give FER=<folder> or FER2013_TRAIN=<folder>): $(FER_HELP))
else ifeq ($(wildcard $(FER)/.),)
$(error --data $(FER) does not exist (or is not a folder): $(FER_HELP))
endif
endif
MODEL_ARCH ?= base
MODEL_EPOCHS ?= 45
TEACHER_EPOCHS ?= 40
model: setup
	$(BIN)/emotion-worker train --data $(FER) --out $(MODEL_OUT) --from-scratch \
		--arch $(MODEL_ARCH) --epochs $(MODEL_EPOCHS) --threads 2 --seed 0 \
		--teacher .cache/teacher --teacher-epochs $(TEACHER_EPOCHS) \
		--calibration-fraction 0.04 --select last
	$(MAKE) model-eval

model-eval: setup
	$(BIN)/emotion-worker eval --model $(MODEL_OUT) --data $(FER) \
		--split-file $(MODEL_OUT)/split.json --split val --out models/reports/$(notdir $(MODEL_OUT))-val
	$(BIN)/emotion-worker eval --model $(MODEL_OUT) --data $(FER) --tta flip \
		--split-file $(MODEL_OUT)/split.json --split val \
		--out models/reports/$(notdir $(MODEL_OUT))-val-flip

# Re-resolve the pins after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v "^emotion-worker" > requirements.lock

# A broker on 127.0.0.1:9092 in the foreground, for running the worker by hand.
broker: setup
	$(BIN)/python -m deploy.kafka.local_broker run --port 9092

# Wheels for bench/gpu_check.sh on a GPU host with no network that has Python 3.12, torch,
# transformers, pillow, numpy, opencv and prometheus-client but not the rest of what the worker
# imports: pinned to requirements.lock, cp312 manylinux x86_64 (GPU_PYTHON=3.11 for another
# Python), no dependencies resolved (the list is complete). Any Python with pip downloads them.
GPU_WHEELS ?= .cache/gpu-wheels
GPU_PYTHON ?= 3.12
GPU_WHEEL_PACKAGES := pydantic pydantic_core pydantic-settings python-dotenv annotated-types \
	typing-inspection typing_extensions structlog confluent-kafka boto3 botocore s3transfer \
	jmespath python-dateutil six urllib3
gpu-wheels:
	@pins=$$(for p in $(GPU_WHEEL_PACKAGES); do grep -i "^$$p==" requirements.lock || \
		{ echo "gpu-wheels: $$p is not pinned in requirements.lock" >&2; exit 1; }; done) && \
	mkdir -p $(GPU_WHEELS) && \
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
		--no-deps --implementation cp --python-version $(GPU_PYTHON) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 -d $(GPU_WHEELS) $$pins
	@ls -1 $(GPU_WHEELS)/*.whl

# bench/gpu_model.sh (`make model` on a GPU host without network) needs the FER folder and
# the training subset of the wheels: both travel with the working tree (66 MB of the device
# tool's 64 MiB carry would not fit with all of gpu-wheels; these are ~53 MB).
gpu-wheels-train:
	$(MAKE) --no-print-directory gpu-wheels GPU_WHEELS=.cache/gpu-wheels-train \
		GPU_WHEEL_PACKAGES="pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection typing_extensions structlog"

fer-pack:
	@[ -d "$(FER)" ] || { echo "fer-pack: give FER=<FER-2013 train folder>" >&2; exit 2; }
	mkdir -p .cache
	tar -czf .cache/fer2013-train.tar.gz -C "$(dir $(abspath $(FER)))" "$(notdir $(abspath $(FER)))"
	@ls -l .cache/fer2013-train.tar.gz

clean:
	rm -rf $(VENV) .venv-3.* .cache .pytest_cache .mypy_cache .ruff_cache
