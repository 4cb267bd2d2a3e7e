"""Wall time per preference-training step, per loss and n (responses per prompt), as ratios to DPO.

The paper's cost claim: PL's step cost grows with n (it forwards all n responses), HPS with the
single estimator does not (two sequences per prompt whatever n). Run:

    .venv/bin/python benchmarks/step_time.py [--n 4 8 16] [--steps 20] [--batch 16]

Same tiny model, same data, same number of steps for every arm; prints seconds/step and the ratio to
DPO (sampler=pair) measured in the same process.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from hps_exp import batching, config, models, pipeline
from hps_exp.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
ARMS = {
    "dpo": ["loss=dpo"],
    "bt": ["loss=bt"],
    "pl": ["loss=pl"],
    "hps-full": ["loss=hps"],
    "hps-single": ["loss=hps", "loss.estimator=single"],
}


class NullLogger:
    def log(self, metrics, step):
        pass

    def next_stage(self):
        pass


def step_seconds(arm: list[str], n: int, steps: int, batch: int, tmp: Path) -> float:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=arm + [
            f"dataset.n_responses={n}", f"dataset.n_train={steps * batch}", "dataset.n_test=4", "sft.enabled=false",
            "trainer.epochs=1", f"trainer.batch_size={batch}", f"cache_dir={tmp}"])
    splits, loss_fn, sampler, rm = pipeline.setup(cfg)
    run = pipeline.Run(cfg=cfg, run_dir=tmp / "run", cache_dir=tmp, device=torch.device("cpu"), autocast=None,
                       logger=NullLogger(), splits=splits, loss_fn=loss_fn, sampler=sampler, reward_model=rm)
    sft_dir = pipeline.sft_stage(run)
    tok, model = models.load_saved(sft_dir)
    enc = pipeline.encode_splits(cfg, tok, splits)
    ref = {"train": batching.all_response_logps(model, enc["train"], tok.pad_token_id, 64, torch.device("cpu"))}
    pipeline.preference_stage(run, sft_dir, {"ref": ref})
    return run.timing["pref_step_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tmp", type=Path, default=Path("outputs/bench_step_time"))
    args = ap.parse_args()
    config.register()
    os.environ["HPS_EXP_NO_PROGRESS"] = "1"
    from hps_exp.app import quiet_libraries

    quiet_libraries()
    print(f"torch threads: {torch.get_num_threads()}, {args.steps} steps x {args.batch} prompts per arm")
    print(f"{'n':>3} " + " ".join(f"{a:>18}" for a in ARMS))
    for n in args.n:
        with contextlib.redirect_stdout(io.StringIO()):  # the stages' own progress lines
            secs = {a: step_seconds(o, n, args.steps, args.batch, args.tmp / f"n{n}_{a}") for a, o in ARMS.items()}
        base = secs["dpo"]
        print(f"{n:>3} " + " ".join(f"{s * 1000:8.1f}ms ({s / base:4.2f}x)" for s in secs.values()), flush=True)


if __name__ == "__main__":
    main()
