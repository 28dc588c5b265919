# `make test` is the command README.md gives a new user and the one .ci/run runs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test install bench clean serve nano

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	# Build the native kernels now (cached under ~/.cache/glmserve), not at the first quantized request; without a
	# compiler this warns once and glmserve runs on the torch references.
	$(BIN)/python -c 'from glmserve.kernels import native; native.extension()'
	touch $(BIN)/activate

install: $(BIN)/activate

test: install
	$(BIN)/ruff check .
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/glmserve bench offline bench-57m --engines glmserve transformers --threads 2 --retries 3 --quiet-wait 60

clean:
	rm -rf $(VENV) build *.egg-info

# Serves MODEL (a checkpoint directory), or glmserve's built-in default when MODEL is empty, on 127.0.0.1:PORT.
PORT ?= 8000
serve: install
	$(BIN)/glmserve serve $(MODEL) --host 127.0.0.1 --port $(PORT)

# Trains the embedded nano model (about an hour on 2 cores; run it on a quiet machine), then checks and scores it.
NANO_DIR ?= build/glm-nano
nano: install
	$(BIN)/python -m glmserve.nano.train --out $(NANO_DIR) --minutes 55
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m glmserve.nano.verify $(NANO_DIR)
	$(BIN)/python -m glmserve.nano.evaluate --model $(NANO_DIR)
