#!/usr/bin/env bash
# make gpu-check: everything the GPU path is measured by, in one script that fits one lent GPU call.
#
#   scripts/gpu_check.sh [OUT_DIR]          (PY=python to use, DATA_ROOT=folder with office/ baby/ sports/ clothing/)
#
# Sections, in order of priority, each under its own time limit (SECONDS_<NAME> overrides it), each
# skipped when the budget left (BUDGET seconds, default 560) is smaller than its limit:
#   env         nvidia-smi, torch/CUDA versions
#   cuda_tests  tests/test_cuda.py: every CUDA path against its CPU result (the captured step included)
#   bench       make bench-gpu: graphs (baby, clothing), office/sports epochs with and without
#               model.cuda_graphs, the official loop structure, the GEMM floor, sports evaluation and a
#               torch.profiler of the training step (top kernels, launches per step)
#   grid        the 16-cell sports alpha x K_c grid through the CLI (random unit inputs, early stopping),
#               captured step, sequential and with hydra/launcher=parallel (4 jobs sharing the GPU)
#   zoo         Table 1's eleven models on office, one seed, BASELINE_EPOCHS epochs each (s/epoch)
#   grid_plain  the same grid without the captured step, parallel only
# Every section's log, bench.json, the grid and zoo summaries go to OUT_DIR/work; OUT_DIR/summary.txt
# says what ran, how long and its exit status, and OUT_DIR/gpu_check.tar.gz holds the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT_DIR=${1:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
DATA_ROOT=${DATA_ROOT:-../shared/datasets}
BUDGET=${BUDGET:-560}
BASELINE_EPOCHS=${BASELINE_EPOCHS:-5}
WORK="$OUT_DIR/work"
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
T0=$(date +%s)
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

section() {  # section NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local var="SECONDS_${name^^}"; limit=${!var:-$limit}
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if (( left < limit )); then
        echo "$name: SKIPPED (budget left ${left}s < its limit ${limit}s)" | tee -a "$SUMMARY"
        return
    fi
    echo "=== $name (limit ${limit}s, budget left ${left}s)"
    local start=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - start ))
    echo "$name: rc=$rc ${took}s$([ $rc = 124 ] && echo ' (TIMED OUT)')" | tee -a "$SUMMARY"
    grep -v -E '^\s*$|Warning|warn\(' "$WORK/$name.log" | tail -n "${TAIL_LINES:-6}"
}

section env 30 bash -c "nvidia-smi; $PY -c 'import torch, pytorch_lightning as pl; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"lightning\", pl.__version__, torch.cuda.get_device_name(0))'"
TAIL_LINES=14 section cuda_tests 200 "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfE
TAIL_LINES=30 section bench 240 "$PY" -m mllmrec.bench "data_root=$DATA_ROOT" device=cuda epochs=4 \
    "hydra.run.dir=$WORK/bench"
TAIL_LINES=8 section grid 170 "$PY" -m mllmrec.bench "data_root=$DATA_ROOT" device=cuda grid=true \
    'steps=[grid_graphed]' "hydra.run.dir=$WORK/grid"
TAIL_LINES=16 section zoo 110 "$PY" -m mllmrec.train experiment=baselines trainer=gpu encoder.model=random \
    trainer.max_epochs="$BASELINE_EPOCHS" logger=none trainer.enable_progress_bar=false \
    "paths.output_dir=$WORK/zoo_out" "hydra.sweep.dir=$WORK/zoo" -m
TAIL_LINES=8 section grid_plain 100 "$PY" -m mllmrec.bench "data_root=$DATA_ROOT" device=cuda grid=true \
    'steps=[grid_plain]' 'grid_launchers=[parallel]' "hydra.run.dir=$WORK/grid_plain"

for f in bench/bench.json grid/bench.json grid_plain/bench.json zoo/models.md; do
    [ -f "$WORK/$f" ] && { echo "--- $f"; [ "${f##*.}" = md ] && cat "$WORK/$f" || "$PY" -c "import json,sys; print(json.load(open(sys.argv[1])).get('table',''))" "$WORK/$f"; }
done
tar -czf "$OUT_DIR/gpu_check.tar.gz" -C "$WORK" --exclude='*.ckpt' --exclude='zoo_out' --exclude='*cache*' . 2>/dev/null
echo "total $(( $(date +%s) - T0 ))s; $SUMMARY, $OUT_DIR/gpu_check.tar.gz"
