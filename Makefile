# Two commands: `make demo` (set up, then run the whole pipeline on Fashion-MNIST) and
# `make test` (set up, then run the test suite). Both start with `make install`.
SHELL := /bin/bash
PYTHON3 ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
                t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

# dvc.yaml calls `python`/`torchrun` from the active environment: make it the venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install demo smoke ui reproduce test test-fast fashion-mnist slurm bench clean

install: $(STAMP)

# idempotent: re-runs only when the requirements change
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON3) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "Python 3.11 is required (found $$($(PYTHON3) --version)); set PYTHON3=python3.11"; exit 1; }
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# the embedded default dataset: Debian's dataset-fashion-mnist
fashion-mnist:
	@missing=0; for f in $(FMNIST_FILES); do [ -f "$(FMNIST_DIR)/$$f" ] || missing=1; done; \
	if [ $$missing = 0 ]; then exit 0; fi; \
	if [ "$(FMNIST_DIR)" = /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then \
	    echo "Installing Debian's dataset-fashion-mnist (Fashion-MNIST IDX files)"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist && exit 0; \
	  fi; \
	fi; \
	echo "Fashion-MNIST files are missing from $(FMNIST_DIR): $(FMNIST_FILES)"; \
	echo "Install them with: sudo apt-get install dataset-fashion-mnist"; \
	echo "or download them from https://github.com/zalandoresearch/fashion-mnist, put them in a"; \
	echo "directory and set data.source_dir in params.yaml (and FMNIST_DIR=... for make)."; \
	exit 1

# Debian's SLURM for tests/test_slurm.py, which starts its own cluster (munged, slurmctld, two
# slurmd) under a scratch directory: no service is configured or started here. Without root or
# apt the SLURM tests skip, or fail under CI=true.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm:
	@missing=0; for f in /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged; do \
	  [ -x "$$f" ] || missing=1; done; \
	if [ $$missing = 0 ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's SLURM ($(SLURM_PACKAGES)) for the SLURM tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_PACKAGES) \
	    && exit 0; \
	fi; \
	echo "SLURM is not installed: the SLURM tests (pytest -m slurm) need root and"; \
	echo "  apt-get install $(SLURM_PACKAGES); they skip here, and fail when CI=true"

# stage processes forked from one that has torch, timm and MLflow imported (seed_core/warm.py):
# 1.5-4 s less start-up per stage; SEED_WARM_START=0 starts each stage as a fresh python
demo smoke reproduce: export SEED_WARM_START ?= 1
demo: install fashion-mnist
	time dvc repro
	@echo; cat reports/summary.md

# the whole DAG on tiny settings in a scratch copy (seed_core/smoke.py): a quick check that the
# pipeline runs here; the committed results, dvc.lock and mlflow.db are not touched
smoke: install fashion-mnist
	python -m seed_core.smoke

# MLflow's UI on 127.0.0.1:$(UI_PORT), on the runs table with one row per pipeline run and the
# headline metrics as columns (seed_core/ui.py); Ctrl-C stops it
UI_PORT ?= 5000
ui: install
	python -m seed_core.ui --port $(UI_PORT)

# the paper's student table in miniature: reproduce.students x {baseline, SEED} x reproduce.seeds,
# from the demo's teacher. reproduce/ is a DVC subrepo (its own dvc.yaml and dvc.lock, the
# project's cache), so the demo's `dvc dag` and `dvc status` hold the demo alone; it cannot run
# the demo's stages itself, hence the plain `dvc repro` first (cached after `make demo`)
reproduce: install fashion-mnist
	dvc repro
	cd reproduce && time dvc repro
	@echo; cat reports/reproduce.md

# two xdist workers, one test module at a time on a worker (tests/conftest.py says why)
PYTEST_WORKERS ?= 2
test: install fashion-mnist slurm
	python -m pytest -q -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder

# the unit tests only (no end-to-end dvc repro, no fault injection into real processes, no SLURM)
test-fast: install
	python -m pytest -q -m "not e2e and not faults and not slurm"

# every benchmark prints one JSON object, kept in bench/results/ (written whole or not at all);
# then docs/performance.md's section is rendered from them. The linear and versions
# benchmarks need the pipeline's outputs (make demo).
BENCH_RESULTS := bench/results
LINEAR_BENCH_INPUTS := data/features/student models/student data/shards/train data/shards/val
# the augmented protocol at the default 7 lrs x 100 epochs takes hours on 2 cores: both modes run
# with these same reduced settings (the report names them)
LINEAR_BENCH_ARGS := --features data/features/student --model models/student \
  --train-shards data/shards/train --val-shards data/shards/val \
  --set linear.epochs=10 --set 'linear.lrs=[0.03,0.1,0.3]'
define bench_run
python bench/bench_$(1).py $(2) > $(BENCH_RESULTS)/$(1).json.tmp && \
  mv $(BENCH_RESULTS)/$(1).json.tmp $(BENCH_RESULTS)/$(1).json && cat $(BENCH_RESULTS)/$(1).json
endef
bench: install
	mkdir -p $(BENCH_RESULTS)
	$(call bench_run,step)
	$(call bench_run,levers)
	$(call bench_run,loader)
	$(call bench_run,knn)
	$(call bench_run,shards)
	$(call bench_run,open_shards)
	$(call bench_run,remote_epoch)
	$(call bench_run,versions)
	$(call bench_run,startup)
	$(call bench_run,dvc)
	@if ls -d $(LINEAR_BENCH_INPUTS) >/dev/null 2>&1; then \
	  $(call bench_run,linear,$(LINEAR_BENCH_ARGS)); \
	else \
	  echo '{"benchmark": "linear", "skipped": "needs $(LINEAR_BENCH_INPUTS): run make demo first"}' \
	    | tee $(BENCH_RESULTS)/linear.json; \
	fi
	python bench/render.py docs/performance.md

clean:
	rm -rf $(VENV) .pytest_cache
