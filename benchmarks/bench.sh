#!/usr/bin/env bash
# `make bench`: every benchmark once, each printing its ratios (docs/benchmarks.md records the results).
# PY: the project's python (default .venv/bin/python). TRL runs only in .venv-bench (created here if missing).
# QUICK=1: smoke sizes (seconds each) and our side of the TRL comparison alone (no .venv-bench, no install).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
QUICK=${QUICK:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HPS_EXP_NO_PROGRESS=1
if [ "$QUICK" = 1 ]; then
  STEP="--n 2 --steps 2 --batch 2"; SHARE="--n 2 --batch 2 --repeats 1"; BUCKET="--n 2 --batches 1 --repeats 1"
  EVAL="--repeats 1 eval.max_prompts=4 eval.max_new_tokens=8 dataset.n_train=8 dataset.n_test=4"
else
  STEP="--n 2 4 8 16 32 --steps 6 --repeats 2"; SHARE="--n 2 8 32 --repeats 3"; BUCKET=""; EVAL=""
fi
echo "== load before: $(uptime)"
echo "== (1) step time and activation memory per loss, relative to BT"
$PY benchmarks/step_time.py $STEP
echo "== (1b) prompt sharing: plain rows vs KV-cache reuse vs packed rows"
$PY benchmarks/prompt_sharing.py $SHARE
echo "== (3) padding and tokens/s with and without length bucketing"
$PY benchmarks/bucketing.py $BUCKET
echo "== (4) evaluation-stage time split"
$PY benchmarks/eval_split.py $EVAL
if [ "$QUICK" = 1 ]; then
  echo "== (2) our pairwise loop alone (QUICK=1: no TRL)"
  $PY benchmarks/trl_compare.py --ours-only --steps 2 --batch 2 --repeats 1
  echo "== load after: $(uptime)"
  exit 0
fi
echo "== (2) our pairwise loop vs TRL DPOTrainer (bench venv)"
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench && .venv-bench/bin/python -m pip install --quiet -c constraints.txt \
    torch==2.13.0 trl==1.16.0 transformers hydra-core omegaconf \
    || { echo "skipped: could not install TRL into .venv-bench"; rm -rf .venv-bench; exit 0; }
fi
PYTHONPATH=. .venv-bench/bin/python benchmarks/trl_compare.py
echo "== load after: $(uptime)"
