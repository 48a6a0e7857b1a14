# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install autoprune, run a real search on the embedded default, export the policy
#   make test   create or update .venv with the dev extras and run the tests (what CI runs)
#   make test-all   the tests and the slow ones (every torchvision classifier pruned)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: demo test test-all lint quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	mkdir -p $(OUT)
	$(BIN)/autoprune search --agent random --trials 12 --finetune-steps 30 --budget-flops 50% \
		--storage sqlite:///$(OUT)/autoprune.db -o $(OUT)/best.json
	$(BIN)/autoprune apply $(OUT)/best.json -o $(OUT)/pruned.pt

# one pytest worker per core (pytest-xdist), each computing on one thread (tests/conftest.py)
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n auto

test-all: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n auto -m 'slow or not slow'

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check autoprune tests benchmarks

# search quality on Fashion-MNIST (apt-get install dataset-fashion-mnist); about an hour on 2 cores per seed
FMNIST ?= /usr/share/datasets/fashion-mnist
quality: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/quality.py --data-root $(FMNIST) -o $(OUT)/quality

clean:
	rm -rf $(OUT) .pytest_cache
