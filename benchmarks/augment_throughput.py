"""Throughput of hps_exp.augment.augment: responses/s for n samples per prompt, batched vs unbatched.

    .venv/bin/python benchmarks/augment_throughput.py [--prompts 50] [--n 4] [--batch-size 64] [--repeats 2]

Model: the embedded tiny GPT-2 (conf/model/tiny.yaml sizes: 2 layers, 4 heads, n_embd 128, vocab 1024),
randomly initialised, so nearly every sample runs the full --max-new-tokens (48, eval's default): the
comparison is not flattered by early stops. Reward model: the synthetic dataset's exact scorer.
Modes (each timed --repeats times, best kept, as the machine may be shared):
  batched          batch_size sequences per generate() call (batch_size // n prompts x n return sequences)
  one prompt       one prompt per call, its n samples via num_return_sequences
  one sequence     one prompt and one sample per call (n calls per prompt; augment(n=1) n times)
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from hps_exp.augment import augment
from hps_exp.data import synthetic
from hps_exp.generation import HFGenerator
from hps_exp.models import build_tiny, pick_device, train_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call when batched")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    splits = synthetic.load(n_train=400, n_test=args.prompts, n_responses=4, seed=0)
    tok = train_tokenizer([e.prompt + r for e in splits.train for r in e.responses], 1024)
    device = pick_device(args.device)
    model = build_tiny(SimpleNamespace(n_positions=256, n_embd=128, n_layer=2, n_head=4), len(tok), 0).to(device)
    prompts = splits.test
    common = dict(reward_model=synthetic.SyntheticScorer(), temperature=1.0, top_p=1.0,
                  max_new_tokens=args.max_new_tokens, placeholder=tok.eos_token, keep_original=True, progress=False)

    def generator(batch_size: int) -> HFGenerator:
        """A fresh generator per augment call (its stats accumulate over calls); top_k=0: augment's default."""
        return HFGenerator(model, tok, device=device, max_prompt_length=64, batch_size=batch_size, top_k=0)

    def timed(fn):
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            stats = fn()
            dt = time.perf_counter() - t
            if best is None or dt < best[0]:
                best = (dt, stats)
        return best

    def batched():
        st = {}
        augment(prompts, generator=generator(args.batch_size), n=args.n, seed=0, stats=st, **common)
        return st

    def one_prompt():
        st = {}
        augment(prompts, generator=generator(args.n), n=args.n, seed=0, stats=st, **common)
        return st

    def one_sequence():
        tot = {"generated": 0, "gen_tokens": 0}
        for k in range(args.n):
            st = {}
            augment(prompts, generator=generator(1), n=1, seed=k, stats=st, **common)
            tot["generated"] += st["generated"]
            tot["gen_tokens"] += st["gen_tokens"]
        return tot

    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(prompts)} prompts x n={args.n}, "
          f"max_new_tokens={args.max_new_tokens}")
    rows = {}
    for name, fn in (("batched", batched), ("one prompt", one_prompt), ("one sequence", one_sequence)):
        dt, st = timed(fn)
        rows[name] = st["generated"] / dt
        print(f"{name:>13}: {st['generated']} responses in {dt:6.2f}s = {rows[name]:7.1f} responses/s "
              f"({st['gen_tokens'] / dt:7.0f} new tokens/s)")
    print(f"batched / one prompt at a time:   {rows['batched'] / rows['one prompt']:.1f}x")
    print(f"batched / one sequence at a time: {rows['batched'] / rows['one sequence']:.1f}x")


if __name__ == "__main__":
    main()
