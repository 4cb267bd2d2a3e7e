"""Our pairwise preference loop against TRL's DPOTrainer: real tokens/s, both TRL modes, same model and data.

Runs in the bench venv (TRL is not a dependency of hps-exp):

    python3 -m venv .venv-bench
    .venv-bench/bin/python -m pip install torch==2.13.0 trl transformers -c constraints.txt hydra-core omegaconf
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv-bench/bin/python benchmarks/trl_compare.py [--steps 12] [--batch 16]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trl_compare.py --ours-only --steps 2 --batch 2 --repeats 1  # no TRL

The project's tiny model (conf/model/tiny.yaml, random init: cost does not depend on the weights) is
saved to a temp dir and every arm loads it from there; the data are the synthetic set's (prompt,
chosen, rejected) pairs. Arms, interleaved, --repeats times each, all fp32 on CPU, same batch size,
AdamW, lr, clipping, beta:
- ours:             Trainer + preference_batch + preference_logps + conf/loss pair loss (cached reference log-probs);
- trl (reference):  DPOTrainer with an explicit reference model (forwarded every step);
- trl (precompute): DPOTrainer with precompute_ref_log_probs=True (reference log-probs computed up front).
Step time = median over steps of a run (first step dropped), min over repeats; real tokens = non-pad
prompt+response tokens of both sequences of every pair. Loss check: our policy after training is
scored by TRL's own loss (evaluate, explicit reference) and by ours on all pairs; they must agree to 1e-5.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import CONF, StepClock, machine  # noqa: E402
from hps_exp import batching, models  # noqa: E402
from hps_exp.config import ModelConfig, TrainerConfig, build  # noqa: E402
from hps_exp.data import synthetic  # noqa: E402
from hps_exp.samplers import Selection  # noqa: E402
from hps_exp.trainer import Trainer  # noqa: E402

BETA, LR = 0.1, 2e-4
PAIR_LOSS = "dpo"  # conf/loss/<name>.yaml: the pairwise loss TRL's sigmoid loss implements


def make_data(n_pairs: int):
    mcfg = OmegaConf.structured(ModelConfig)   # model=tiny: the schema's defaults
    splits = synthetic.load(n_train=n_pairs, n_test=4, n_responses=4, seed=0)
    train = splits.train
    tok = models.train_tokenizer([e.prompt + r for e in train for r in e.responses], mcfg.vocab_size)
    enc = batching.encode_examples(tok, train, mcfg.max_prompt_length, mcfg.max_length)
    rows = [{"prompt": e.prompt, "chosen": e.responses[e.chosen], "rejected": e.responses[e.rejected]} for e in train]
    sels = [Selection((e.chosen, e.rejected), 1) for e in train]
    return mcfg, train, tok, enc, rows, sels


def real_tokens(enc, sels) -> int:
    return sum(2 * len(e.prompt) + sum(len(e.responses[i]) for i in s.indices) for e, s in zip(enc, sels))


def our_loss_fn():
    return build(OmegaConf.load(CONF / "loss" / f"{PAIR_LOSS}.yaml"), "loss")


def run_ours(model_dir, train, enc, sels, steps, batch_size) -> tuple[float, object]:
    tok, model = models.load_saved(model_dir)
    _, ref_model = models.load_saved(model_dir)
    models.disable_dropout(model)
    ref = batching.all_response_logps(ref_model, enc, tok.pad_token_id, 64, torch.device("cpu"))
    loss_fn = our_loss_fn()

    def make_epoch(epoch, progress):
        order = np.random.default_rng([0, 2, epoch]).permutation(len(train))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield batching.preference_batch([train[i] for i in idx], [enc[i] for i in idx], [ref[i] for i in idx],
                                            [sels[i] for i in idx], [{}] * len(idx), tok.pad_token_id)

    def step(model, batch):
        out = loss_fn(batching.preference_logps(model, batch), batch.ref_logps, batch.mask, batch.scores,
                      batch.num_negatives)
        return out.losses.mean(), {}

    clock = StepClock()
    tcfg = TrainerConfig(lr=LR, epochs=1, warmup_ratio=0.0, schedule="linear", max_grad_norm=1.0, log_every=1,
                         resume=False, max_steps=steps)
    Trainer(model, tcfg, tcfg, tcfg.epochs, tcfg.max_steps, device=torch.device("cpu"), autocast=None, logger=clock,
            stage="ours", checkpoint=None).fit(make_epoch, -(-len(train) // batch_size), step)
    return clock.median_step(), model


def trl_trainer(model_dir, rows, tmp, steps, batch_size, precompute, policy=None):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.stamps = []

        def on_train_begin(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = policy if policy is not None else AutoModelForCausalLM.from_pretrained(model_dir)
    ref = None if precompute else AutoModelForCausalLM.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(tmp), per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                     max_steps=steps, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
                     max_grad_norm=1.0, beta=BETA, precompute_ref_log_probs=precompute, report_to=[],
                     save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False, fp16=False,
                     dataloader_num_workers=0, disable_tqdm=True, max_length=None, seed=0)
    clock = Clock()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[clock])
    return trainer, clock


def run_trl(model_dir, rows, steps, batch_size, precompute) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="hps_bench_trl_") as tmp:
        t0 = time.perf_counter()
        trainer, clock = trl_trainer(model_dir, rows, tmp, steps, batch_size, precompute)
        setup_s = time.perf_counter() - t0
        trainer.train()
    secs = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return statistics.median(secs[1:] or secs), setup_s


def loss_check(model_dir, policy, train, enc, sels, rows, tok, batch_size,
               with_trl: bool = True) -> tuple[float, float | None]:
    """Mean loss over all pairs of `policy` against the saved reference: (ours, TRL's evaluate or None)."""
    _, ref_model = models.load_saved(model_dir)
    ref = batching.all_response_logps(ref_model, enc, tok.pad_token_id, 64, torch.device("cpu"))
    policy.eval()
    with torch.no_grad():
        batch = batching.preference_batch(train, enc, ref, sels, [{}] * len(train), tok.pad_token_id)
        out = our_loss_fn()(batching.preference_logps(policy, batch), batch.ref_logps, batch.mask, batch.scores,
                            batch.num_negatives)
    ours = float(out.losses.double().mean())
    if not with_trl:
        return ours, None
    with tempfile.TemporaryDirectory(prefix="hps_bench_trl_") as tmp:
        from datasets import Dataset

        trainer, _ = trl_trainer(model_dir, rows, tmp, 1, batch_size, precompute=False, policy=policy)
        theirs = trainer.evaluate(eval_dataset=Dataset.from_list(rows))["eval_loss"]
    return ours, float(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ours-only", action="store_true",
                    help="only our arm and our loss (no TRL needed: a smoke test of the hps_exp side)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ["HPS_EXP_NO_PROGRESS"] = "1"
    import transformers

    transformers.utils.logging.disable_progress_bar()
    trl_arms = () if args.ours_only else (("trl (reference model)", False), ("trl (precompute)", True))
    if trl_arms:
        import datasets
        import trl

        datasets.disable_progress_bars()
    print(machine())
    print(f"{'TRL ' + trl.__version__ if trl_arms else 'ours only (no TRL)'}, transformers {transformers.__version__}; "
          f"{args.steps} steps x {args.batch} pairs")
    mcfg, train, tok, enc, rows, sels = make_data(args.steps * args.batch)
    tokens_per_step = real_tokens(enc, sels) / args.steps
    with tempfile.TemporaryDirectory(prefix="hps_bench_model_") as model_dir:
        models.save(models.build_tiny(mcfg, len(tok), 0), tok, Path(model_dir))
        times: dict[str, list[float]] = {"ours": [], **{name: [] for name, _ in trl_arms}}
        setup: dict[str, list[float]] = {k: [] for k in times}
        policy = None
        for _ in range(args.repeats):
            with contextlib.redirect_stdout(io.StringIO()):
                s, policy = run_ours(model_dir, train, enc, sels, args.steps, args.batch)
                times["ours"].append(s)
                for name, pre in trl_arms:
                    s, setup_s = run_trl(model_dir, rows, args.steps, args.batch, pre)
                    times[name].append(s)
                    setup[name].append(setup_s)
        ours_step = min(times["ours"])
        print(f"{'arm':<24}{'step ms':>9}{'tokens/s':>10}{'ours / arm':>12}  (TRL setup incl. precompute, s)")
        for name, ts in times.items():
            best = min(ts)
            extra = f"  ({min(setup[name]):.1f})" if setup[name] else ""
            print(f"{name:<24}{best * 1e3:9.1f}{tokens_per_step / best:10.0f}{best / ours_step:11.2f}x{extra}")
        with contextlib.redirect_stdout(io.StringIO()):
            ours, theirs = loss_check(model_dir, policy, train, enc, sels, rows, tok, args.batch, bool(trl_arms))
        if theirs is None:
            print(f"loss of our trained policy on all {len(train)} pairs: ours {ours:.8f} (TRL not run)")
            return
        print(f"loss of our trained policy on all {len(train)} pairs: ours {ours:.8f}  TRL {theirs:.8f}  "
              f"|diff| {abs(ours - theirs):.1e} ({'OK' if abs(ours - theirs) <= 1e-5 else 'MISMATCH'} at 1e-5)")


if __name__ == "__main__":
    main()
