"""Evaluation-stage time split: generation vs log-probs (vs reward scoring), on the default config.

What the evaluation stage (hps_exp/stages.py: evaluate_sft / evaluate_policy) does for one policy on the
first evaluation set: sample eval.max_prompts generations (hps_exp.generation.HFGenerator), score them
with the evaluation reward model, and compute the policy's log-prob of every test response (for the
reward margins). Also times the former log-prob computation (LM head + log-softmax at every
position, one (prompt, response) row each) beside the current ones (head only at scored positions;
responses packed after their prompt), each min over --repeats.

    OMP_NUM_THREADS=1 python benchmarks/eval_split.py [--model-dir outputs/cache/sft-...] [--repeats 2] [overrides]

Extra arguments are Hydra overrides of the config (e.g. `eval.max_prompts=4 eval.max_new_tokens=8
dataset.n_train=8 dataset.n_test=4` for a smoke test).

Without --model-dir the tiny model is randomly initialised: it rarely samples eos, so every
generation runs the full eval.max_new_tokens (an upper bound on generation time); pass a trained
policy (an SFT cache dir from `make run`) for the realistic split.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import CONF, machine  # noqa: E402
from hps_exp import app, batching, config, evaluate, models  # noqa: E402
from hps_exp.generation import HFGenerator  # noqa: E402


def full_vocab_logps(model, batch: batching.SequenceBatch) -> torch.Tensor:
    """The computation before issue 10: logits and log-softmax at every position."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
    return (token_logps * batch.response_mask[:, 1:]).sum(-1)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the config")
    args = ap.parse_args()
    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    cpu = torch.device("cpu")
    r = app.prepare(cfg, cpu)
    train, test = r.train.items, r.eval_sets[0].examples.items
    reward_model = r.scorers.evaluation.model if r.scorers.evaluation is not None else None
    if args.model_dir:
        tok, model = models.load_saved(args.model_dir)
    else:
        tok = models.train_tokenizer([x.prompt + y for x in train for y in x.responses], cfg.model.vocab_size)
        model = models.build_tiny(cfg.model, len(tok), cfg.seed)
    model.eval()
    e = r.plan.eval   # the evaluation spec: the protocol's temperature resolved
    subset = list(test[:e.max_prompts])
    enc = batching.encode_examples(tok, list(test), e.max_prompt_length, e.max_length)
    generator = HFGenerator(model, tok, device=cpu, max_prompt_length=e.max_prompt_length, batch_size=e.batch_size)
    gens: list[str] = []

    def generate():
        gens[:] = [g[0] for g in generator.generate([x.prompt for x in subset], n=1, max_new_tokens=e.max_new_tokens,
                                                    temperature=e.temperature, top_p=e.top_p, seed=e.seed)]

    def logps(pack: bool = True):
        batching.all_response_logps(model, enc, tok.pad_token_id, e.batch_size, cpu, pack=pack)

    def logps_before():
        original = batching.sequence_logps
        batching.sequence_logps = full_vocab_logps  # all_response_logps looks it up at call time
        try:
            logps(pack=False)
        finally:
            batching.sequence_logps = original

    t_gen = timed(generate, args.repeats)
    t_score = timed(lambda: evaluate.evaluate_generations(subset, gens, reward_model), args.repeats)
    t_lp, t_lp_before = timed(logps, args.repeats), timed(logps_before, args.repeats)
    t_lp_rows = timed(lambda: logps(pack=False), args.repeats)
    new_tokens = sum(len(tok(g, add_special_tokens=False)["input_ids"]) for g in gens)
    total = t_gen + t_score + t_lp
    print(machine())
    print(f"{'model: ' + str(args.model_dir) if args.model_dir else 'model: random tiny (upper bound on generation)'}"
          f"; {len(subset)} prompts generated ({new_tokens / len(subset):.1f} tokens each, re-tokenised text), "
          f"{sum(len(x.responses) for x in enc)} test responses scored")
    print(f"generation      {t_gen:7.2f}s  {t_gen / total:5.1%}")
    print(f"reward scoring  {t_score:7.2f}s  {t_score / total:5.1%}")
    print(f"log-probs       {t_lp:7.2f}s  {t_lp / total:5.1%}   (before issue 10, full vocabulary on (prompt, "
          f"response) rows: {t_lp_before:.2f}s; head at scored positions only: {t_lp_rows:.2f}s; "
          f"packed as now: {t_lp / t_lp_before:.2f}x of before)")


if __name__ == "__main__":
    main()
