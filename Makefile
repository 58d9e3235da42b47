PYTHON ?= python
TORCH_VERSION ?= 2.13.0

.PHONY: install test test-slow lint format train train-ablation bench experiments report clean

## install: CPU torch (no multi-GB CUDA download) + cwdpo with dev extras
install:
	$(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -e ".[dev]"

## test: the default (fast) test suite — what CI runs
test:
	$(PYTHON) -m pytest -q

## test-slow: long experiment-style tests (marker `slow`)
test-slow:
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check cwdpo tests

format:
	$(PYTHON) -m ruff check --fix cwdpo tests
	$(PYTHON) -m ruff format cwdpo tests

## train: the whole embedded pipeline (tiny VLM, ShapesWorld, CPU)
train:
	$(PYTHON) -m cwdpo.train

train-ablation:
	$(PYTHON) -m cwdpo.train +experiment=ablation_cooling

bench:
	$(PYTHON) -m cwdpo.bench

clean:
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

## experiments: the full ShapesWorld grid (SEEDS=0,1,2; 72 runs, ≈ 1 h 50 min on 2 cores) + report
experiments:
	bash experiments/shapes/run.sh

report:
	$(PYTHON) -m cwdpo.report $(DIR)
