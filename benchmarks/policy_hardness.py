"""What policy-adaptive hard negatives cost: preference step time with sampler.hardness=policy_reward and
policy_logp (one extra no-grad forward of all n responses per step) vs annotation (today's draw), at several n.

Each arm runs the real preference stage (hps_exp/stages.py: make_epoch, the step, the Trainer) on the tiny model
and synthetic data with the paper's one-sample HPS (loss=hps loss.estimator=single sampler=hard: two sequences
trained per prompt), from the same untrained SFT policy and cached reference log-probs. Arms are interleaved,
each run --repeats times; a cell is the median step time over a run's steps (the first dropped), min and median
over repeats, and its ratio to annotation at the same n.

    OMP_NUM_THREADS=1 python benchmarks/policy_hardness.py [--n 8 32] [--steps 6] [--batch 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import CONF, StepClock, machine  # noqa: E402
from hps_exp import app, config, stages  # noqa: E402

ARMS = {"annotation": "annotation", "policy_reward": "policy_reward", "policy_logp": "policy_logp"}
BASELINE = "annotation"


def run_arm(hardness: str, n: int, steps: int, batch: int, cache: Path) -> float:
    overrides = ["loss=hps", "loss.estimator=single", "sampler=hard", f"sampler.hardness={hardness}",
                 "sft.enabled=false", f"dataset.n_responses={n}", f"dataset.n_train={steps * batch}",
                 "dataset.n_test=4", f"trainer.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.epochs=1",
                 "trainer.log_every=1", "logger.mode=disabled"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    r = app.prepare(cfg, torch.device("cpu"))
    quiet = stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=cache, runtime=r.plan.runtime)
    with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory(prefix="hps_bench_") as tmp:
        sft = stages.sft(r.plan.sft, r.train, quiet)            # cached: the same for every arm at this n
        ref = stages.reference(r.plan.reference, sft, r.train, quiet)
        clock = StepClock()   # stamps from here: the preference stage's steps only
        result = stages.preference(r.plan.preference, r.loss_fn, r.sampler, sft, r.train, ref,
                                   stages.Env(**{**vars(quiet), "logger": clock}), Path(tmp))
    if result.steps != steps:
        raise RuntimeError(f"{hardness} n={n}: ran {result.steps} steps, expected {steps}")
    return clock.median_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    config.register()
    os.environ["HPS_EXP_NO_PROGRESS"] = "1"
    app.quiet_libraries()
    print(machine())
    print(f"preference step time (ms): median over {args.steps} steps (first dropped), min / median over "
          f"{args.repeats} interleaved repeats, {args.batch} prompts per step; (x) = min ratio to {BASELINE}")
    print(f"{'n':>3} " + " ".join(f"{a:>28}" for a in ARMS))
    with tempfile.TemporaryDirectory(prefix="hps_bench_cache_") as cache:
        for n in args.n:
            times: dict[str, list[float]] = {a: [] for a in ARMS}
            for _ in range(args.repeats):
                for a in ARMS:   # interleaved
                    times[a].append(run_arm(ARMS[a], n, args.steps, args.batch, Path(cache)))
            base = min(times[BASELINE])
            cells = [f"{min(t) * 1e3:6.0f} / {statistics.median(t) * 1e3:6.0f}ms {min(t) / base:5.2f}x"
                     for t in times.values()]
            print(f"{n:>3} " + " ".join(f"{c:>28}" for c in cells), flush=True)
    print(machine())


if __name__ == "__main__":
    main()
