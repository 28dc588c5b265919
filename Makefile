# `make test` is the command README.md gives a new user and the one .ci/run runs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test install bench clean serve

$(BIN)/activate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/activate

install: $(BIN)/activate

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info

# Serves MODEL (a checkpoint directory), or glmserve's built-in default when MODEL is empty.
serve: install
	$(BIN)/glmserve serve $(MODEL) --host 127.0.0.1 --port 8000 --reasoning-parser glm45 --tool-call-parser glm45
