PYTHON ?= python
TORCH_VERSION ?= 2.13.0
# The lock: every dependency version the suite was last tested with (torch aside: it is
# platform-specific and installed first). `make lock` refreshes it with uv.
LOCK ?= requirements.lock
# Where the lock's resolver finds the CPU torch wheel (its metadata pulls no CUDA packages):
# these machines carry it in /opt/wheels; elsewhere PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--index https://download.pytorch.org/whl/cpu)
LATEST_VENV ?= .venv-latest

.PHONY: install lock lock-upgrade test test-fast test-latest test-slow lint format train train-ablation bench gpu-check experiments testbed default-job report clean

## install: CPU torch (no multi-GB CUDA download) + cwdpo with dev extras, at the locked versions
install:
	$(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -c $(LOCK) -e ".[dev]"
	DS_BUILD_OPS=0 $(PYTHON) -m pip install --no-build-isolation -c $(LOCK) deepspeed

## lock: re-resolve requirements.lock from pyproject.toml, keeping existing pins where they fit
## lock-upgrade: the same, every package at its newest release that fits (then run `make test`)
lock-upgrade: LOCK_FLAGS = --upgrade
lock lock-upgrade:
	$(PYTHON) -m pip install -q $(if $(wildcard $(LOCK)),-c $(LOCK)) uv
	echo "torch==$(TORCH_VERSION)+cpu" > .torch-override.txt
	$(PYTHON) -m uv pip compile pyproject.toml --extra dev --extra deepspeed --python-version 3.11 \
		$(TORCH_SOURCE) --override .torch-override.txt --no-emit-package torch \
		--no-build-isolation-package deepspeed \
		$(LOCK_FLAGS) --custom-compile-command "make lock" -o $(LOCK)
	rm -f .torch-override.txt

## test-latest: the suite against the newest releases pyproject.toml allows (drift shows here first)
test-latest:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install "torch==$(TORCH_VERSION)"
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager -e ".[dev]"
	DS_BUILD_OPS=0 $(LATEST_VENV)/bin/python -m pip install --no-build-isolation --upgrade deepspeed
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest -q

## test: the whole default suite (every test but `slow`) — what CI runs
test:
	$(PYTHON) -m pytest -q

## test-fast: the inner loop: `make test` less the multi-process (`dist`), per-family matrix
## (`families`) and process-starting (`subprocess`) tests; `make test` still runs them all
test-fast:
	$(PYTHON) -m pytest -q -m "not slow and not dist and not families and not subprocess"

## test-slow: long experiment-style tests (marker `slow`)
test-slow:
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

## train: the whole embedded pipeline (tiny VLM, ShapesWorld, CPU)
train:
	$(PYTHON) -m cwdpo.train

train-ablation:
	$(PYTHON) -m cwdpo.train +experiment=ablation_cooling

## bench: every tiny family ± gradient checkpointing + the image-heavy shape (576 image tokens),
## then one table (logs/bench/table.md), then the on-policy section (logs/bench/on_policy/);
## `python -m cwdpo.bench` alone benchmarks one model
BENCH_FAMILIES ?= llava llava_next llava_onevision qwen2_vl qwen2_5_vl qwen3_vl idefics3 smolvlm gemma3 paligemma
bench:
	@mkdir -p logs/bench
	for f in $(BENCH_FAMILIES); do for gc in "" --gradient-checkpointing; do \
	  $(PYTHON) -m cwdpo.bench --model tiny:$$f $$gc --no-lora --no-generation \
	    --out logs/bench/$$f$${gc:+_gc}.json || exit 1; done; done
	$(PYTHON) -m cwdpo.bench --image-tokens 576 --pairs 4 --no-lora --no-generation \
	  --out logs/bench/llava_576.json
	$(PYTHON) -m cwdpo.bench --summarize logs/bench/*.json | tee logs/bench/table.md
	@mkdir -p logs/bench/on_policy  # plain vs shared-prefill sampling, on-policy stage-2 cost
	$(PYTHON) -m cwdpo.bench --on-policy --out logs/bench/on_policy/on_policy.json | tee logs/bench/on_policy/table.md

## gpu-check: the GPU suite + cwdpo.bench on the GPU (every tiny family, one realistic shape),
## < 5 min on one GPU; writes gpu_check/gpu_check.{json,md}. Without CUDA: exits 2 at once.
gpu-check:
	$(PYTHON) -m cwdpo.gpu_check --out gpu_check

clean:
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

## experiments: the full ShapesWorld grid (SEEDS=0,1,2; 72 runs, ≈ 1 h 50 min on 2 cores) + report
experiments:
	bash experiments/shapes/run.sh

## default-job: the default job's stage-2 lr on val, then the job on 5 seeds (issue 28), ≈ 15 min
default-job:
	bash experiments/shapes/default_job.sh

## testbed: the co-occurrence testbed study (issue 28; experiments/testbed/README.md), ≈ 1 h 25 min
testbed:
	bash experiments/testbed/study.sh

report:
	$(PYTHON) -m cwdpo.report $(DIR)
