"""Preference-training step time and activation memory per loss and n (responses per prompt), relative to BT.

Every arm builds its losses and samplers from the project's config (conf/, `loss=... sampler=...`
overrides), its data from dataset=synthetic and its model from model=tiny (no SFT: the step cost does
not depend on the weights), then trains with the shared Trainer for --steps optimizer steps in a
fresh temporary directory with no checkpoint (a benchmark never measures a resumed run). The step
function is the preference stage's (hps_exp/stages.py): batching.preference_batch +
batching.preference_logps (packed listwise batches) + the loss. Arms are interleaved per n, each arm
run --repeats times.

- step time: median over steps (the first step of a run, which includes one-off checks, is dropped),
  then the min over repeats;
- memory: bytes of the tensors the forward saves for backward (activations, parameters excluded),
  the largest over the run's steps: the part of peak memory that grows with n. On CUDA the
  allocator's peak is printed as well.

    OMP_NUM_THREADS=1 python benchmarks/step_time.py [--n 2 4 8 16 32] [--steps 6] [--batch 16] [--plain]
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

import numpy as np
import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import CONF, StepClock, machine  # noqa: E402
from hps_exp import app, batching, config, models  # noqa: E402
from hps_exp.config import TrainerConfig  # noqa: E402
from hps_exp.memory import saved_tensor_bytes  # noqa: E402
from hps_exp.trainer import Trainer  # noqa: E402

BASELINE = "bt"
ARMS = {  # name -> config overrides
    "bt": ["loss=bt"],
    "pair": ["loss=dpo"],
    "pl": ["loss=pl"],
    "hps-full": ["loss=hps"],
    "hps-single": ["loss=hps", "loss.estimator=single"],
}


def compose_arm(overrides: list[str], n: int, n_train: int):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides + [f"dataset.n_responses={n}", f"dataset.n_train={n_train}",
                                                       "dataset.n_test=4"])
    r = app.prepare(cfg, torch.device("cpu"))  # every check a run does before training
    return cfg, list(r.train.items), r.loss_fn, r.sampler


def run_arm(overrides: list[str], n: int, steps: int, batch_size: int, pack: bool, bucket: bool) -> dict:
    cfg, train, loss_fn, sampler = compose_arm(overrides, n, steps * batch_size)
    tok = models.train_tokenizer([e.prompt + r for e in train for r in e.responses], cfg.model.vocab_size)
    model = models.build_tiny(cfg.model, len(tok), cfg.seed)
    models.disable_dropout(model)
    enc = batching.encode_examples(tok, train, cfg.model.max_prompt_length, cfg.model.max_length)
    with torch.no_grad():
        ref = batching.all_response_logps(model, enc, tok.pad_token_id, 64, torch.device("cpu"))
    lengths = batching.preference_lengths(enc, all_responses=sampler.kind == "ranking")

    def make_epoch(epoch, progress):
        rng = np.random.default_rng([cfg.seed, 2, epoch])
        batches = (batching.bucketed_batches(lengths, batch_size, rng) if bucket else
                   [list(b) for b in np.array_split(rng.permutation(len(train)), -(-len(train) // batch_size))])
        for idx in batches:
            sels = [sampler.select(train[i], rng, progress()) for i in idx]
            yield batching.preference_batch([train[i] for i in idx], [enc[i] for i in idx], [ref[i] for i in idx],
                                            sels, [{}] * len(idx), tok.pad_token_id)

    memory: list[int] = []
    tokens: list[int] = []

    def step(model, batch):
        tokens.append(int(batch.sequences.attention_mask.sum()))  # real tokens of its (prompt, response) rows
        with saved_tensor_bytes(model, memory):
            policy = batching.preference_logps(model, batch, pack=pack)
            out = loss_fn(policy, batch.ref_logps, batch.mask, batch.scores, batch.num_negatives)
        return out.losses.mean(), {}

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="hps_bench_"):  # fresh every arm; nothing to resume from
        tcfg = TrainerConfig(lr=cfg.trainer.lr, epochs=1, log_every=1, save_every=0, resume=False, max_steps=steps)
        trainer = Trainer(model, tcfg, tcfg, tcfg.epochs, tcfg.max_steps, device=torch.device("cpu"), autocast=None,
                          logger=clock, stage="bench", checkpoint=None)
        with contextlib.redirect_stdout(io.StringIO()):
            result = trainer.fit(make_epoch, -(-len(train) // batch_size), step)
    if result["steps"] != steps:
        raise RuntimeError(f"{overrides} n={n}: ran {result['steps']} steps, expected {steps}")
    secs = clock.step_seconds()
    return {"step_s": statistics.median(secs[1:] or secs), "saved_mb": max(memory) / 2**20,
            "tokens": statistics.mean(tokens)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--plain", action="store_true", help="one (prompt, response) row per slot: no packing")
    ap.add_argument("--bucket", action="store_true", help="length-bucketed batches")
    args = ap.parse_args()
    config.register()
    os.environ["HPS_EXP_NO_PROGRESS"] = "1"  # the Trainer's progress bar
    from hps_exp.app import quiet_libraries

    quiet_libraries()
    print(machine())
    print(f"step time (ms, median over steps, min over {args.repeats} repeat(s)) and activation memory (MB) "
          f"per loss, {args.steps} steps x {args.batch} prompts, {'plain rows' if args.plain else 'packed'}"
          f"{', bucketed' if args.bucket else ''}; (x) = ratio to {BASELINE} at the same n")
    arms = [a for a in args.arms if a != BASELINE]
    print("cells: step time, its ratio to BT; activation memory, its ratio; real tokens per step, their ratio")
    print(f"{'n':>3} {BASELINE:>23} " + " ".join(f"{a:>31}" for a in arms))
    for n in args.n:
        res: dict[str, list[dict]] = {a: [] for a in [BASELINE] + arms}
        for _ in range(args.repeats):
            for a in res:  # interleaved: each repeat runs every arm once
                res[a].append(run_arm(ARMS[a], n, args.steps, args.batch, not args.plain, args.bucket))
        best = {a: {"step_s": min(r["step_s"] for r in rs), "saved_mb": max(r["saved_mb"] for r in rs),
                    "tokens": rs[0]["tokens"]} for a, rs in res.items()}
        b = best[BASELINE]
        cells = [f"{best[a]['step_s'] * 1e3:6.0f}ms {best[a]['step_s'] / b['step_s']:5.2f}x "
                 f"{best[a]['saved_mb']:4.0f}MB {best[a]['saved_mb'] / b['saved_mb']:4.1f}x "
                 f"{best[a]['tokens'] / b['tokens']:4.1f}x" for a in arms]
        print(f"{n:>3} {b['step_s'] * 1e3:6.0f}ms {b['saved_mb']:4.0f}MB {b['tokens']:5.0f}t "
              + " ".join(f"{c:>31}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
