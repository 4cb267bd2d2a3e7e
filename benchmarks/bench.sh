#!/usr/bin/env bash
# `make bench`: every benchmark once, each printing its ratios (docs/benchmarks.md records the results).
# PY: the project's python (default .venv/bin/python). TRL runs only in .venv-bench (created here if missing).
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HPS_EXP_NO_PROGRESS=1
echo "== load before: $(uptime)"
echo "== (1) step time and activation memory per loss, relative to BT"
$PY benchmarks/step_time.py --n 2 4 8 16 32 --steps 6 --repeats 2
echo "== (1b) prompt sharing: plain rows vs KV-cache reuse vs packed rows"
$PY benchmarks/prompt_sharing.py --n 2 8 32 --repeats 3
echo "== (3) padding and tokens/s with and without length bucketing"
$PY benchmarks/bucketing.py
echo "== (4) evaluation-stage time split"
$PY benchmarks/eval_split.py
echo "== (2) our pairwise loop vs TRL DPOTrainer (bench venv)"
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench && .venv-bench/bin/python -m pip install --quiet -c constraints.txt \
    torch==2.13.0 trl==1.16.0 transformers hydra-core omegaconf \
    || { echo "skipped: could not install TRL into .venv-bench"; rm -rf .venv-bench; exit 0; }
fi
PYTHONPATH=. .venv-bench/bin/python benchmarks/trl_compare.py
echo "== load after: $(uptime)"
