# mllmrec — set-up and common tasks. `make run` and `make test` install first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU wheel that these machines keep on disk; on a CUDA machine
# install the torch build you want first (or set TORCH_SPEC), then `make install`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: install run test bench bench-gpu gpu-check clean help

help:
	@echo "make install  create $(VENV) with everything the default run and the tests need"
	@echo "make run      train MLLMRec on the embedded office dataset (CPU, offline)"
	@echo "make test     run the test suite"
	@echo "make bench    speed/memory benchmarks vs the official algorithm (DATA_ROOT=$(DATA_ROOT))"
	@echo "make bench-gpu  the same on CUDA"
	@echo "make gpu-check  CUDA tests (each CUDA path against the CPU one) + bench-gpu"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m mllmrec.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(ARGS)

# folder holding baby/ sports/ clothing/ in MMRec format (../shared/datasets on the dev machines)
DATA_ROOT ?= $(if $(MLLMREC_DATA_ROOT),$(MLLMREC_DATA_ROOT),../shared/datasets)

bench: $(STAMP)
	$(PY) -m mllmrec.bench data_root=$(DATA_ROOT) $(ARGS)

bench-gpu: $(STAMP)
	$(PY) -m mllmrec.bench data_root=$(DATA_ROOT) device=cuda $(ARGS)

gpu-check: $(STAMP)
	$(PY) -m pytest tests/test_cuda.py
	$(PY) -m mllmrec.bench data_root=$(DATA_ROOT) device=cuda $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
