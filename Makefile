# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup demo test unit integration lint schemas lock broker model model-eval clean

# Pinned install: every package version comes from requirements.lock. pip's cache
# (~/.cache/pip) keeps the several-GB torch wheel across fresh clones on one machine.
$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test,train]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/emotion-worker demo

test: setup lint
	$(BIN)/python -m deploy.kafka.local_broker fetch > /dev/null
	$(BIN)/python -m pytest

unit: setup
	$(BIN)/python -m pytest tests/unit

integration: setup
	$(BIN)/python -m pytest tests/integration

lint: setup
	$(BIN)/ruff check consumer schemas deploy tests bench
	$(BIN)/mypy

schemas: setup
	$(BIN)/python -m schemas.export

# The shipped model (models/llava-fer-small): train from scratch on FER-2013 (about an hour
# on 2 CPU cores, seed 0), then evaluate it on its own validation split through the engine.
FER ?= ../shared/data/fer2013/train
MODEL_OUT ?= models/llava-fer-small
model: setup
	$(BIN)/emotion-worker train --data $(FER) --out $(MODEL_OUT) --from-scratch --arch small \
		--epochs 35 --threads 2 --seed 0
	$(MAKE) model-eval

model-eval: setup
	$(BIN)/emotion-worker eval --model $(MODEL_OUT) --data $(FER) \
		--split-file $(MODEL_OUT)/split.json --split val --out models/reports/$(notdir $(MODEL_OUT))-val

# Re-resolve the pins after changing dependencies in pyproject.toml.
lock: setup
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v "^emotion-worker" > requirements.lock

# A broker on 127.0.0.1:9092 in the foreground, for running the worker by hand.
broker: setup
	$(BIN)/python -m deploy.kafka.local_broker run --port 9092

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
