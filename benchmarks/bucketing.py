"""Padding fraction and real tokens/s with and without length bucketing (batching.bucketed_batches).

Three kinds of batch on the synthetic data (conf defaults: 8 responses per prompt) and the tiny model:
- sft:       (prompt, response) rows, every response, sft.batch_size rows per batch (sequence_nll);
- pairs:     (prompt, chosen, rejected) preference batches, plain rows (preference_logps);
- listwise:  all n responses of each prompt, packed after their prompt (preference_logps).
"plain" batches are a seeded shuffle; "bucketed" sorts by length within chunks of 8 batches and
shuffles the batches. Real tokens/s = non-pad tokens / forward+backward seconds over --batches
batches, arms interleaved, min over --repeats. Bucketing keys: batching.preference_lengths (known
before the sampler draws which responses enter a step).

    OMP_NUM_THREADS=1 python benchmarks/bucketing.py [--batches 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, tiny_setup  # noqa: E402
from hps_exp import batching  # noqa: E402
from hps_exp.samplers import Selection  # noqa: E402


def batch_indices(lengths, batch_size, bucket: bool, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    if bucket:
        return batching.bucketed_batches(lengths, batch_size, rng)
    order = rng.permutation(len(lengths)).tolist()
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def kinds(examples, enc, pad_id):
    """name -> (lengths, batch size, build(indices) -> (batch, real tokens, padded tokens), step(batch))."""
    sft_pairs = [(e.prompt, r) for e in enc for r in e.responses]

    def sft(idx):
        b = batching.collate([sft_pairs[i] for i in idx], pad_id)
        return b, int(b.attention_mask.sum()), b.attention_mask.numel()

    def pref(idx, listwise: bool):
        sels = [Selection(tuple(range(examples[i].n)) if listwise else (examples[i].chosen, examples[i].rejected),
                          examples[i].n - 1) for i in idx]
        b = batching.preference_batch([examples[i] for i in idx], [enc[i] for i in idx],
                                      [torch.zeros(examples[i].n) for i in idx], sels, [{}] * len(idx), pad_id)
        if listwise:  # what the packed path forwards
            return b, int((b.packed.segments >= 0).sum()), b.packed.segments.numel()
        return b, int(b.sequences.attention_mask.sum()), b.sequences.attention_mask.numel()

    return {
        "sft": ([len(p) + len(r) for p, r in sft_pairs], 32, sft, lambda m, b: batching.sequence_nll(m, b)),
        "pairs": (batching.preference_lengths(enc, all_responses=False), 16, lambda idx: pref(idx, False),
                  lambda m, b: batching.preference_logps(m, b, pack=False).sum()),
        "listwise": (batching.preference_lengths(enc, all_responses=True), 16, lambda idx: pref(idx, True),
                     lambda m, b: batching.preference_logps(m, b).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8, help="batches timed per arm")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    examples, enc, tok, model = tiny_setup(args.n, 400)
    print(machine())
    print(f"synthetic data, {len(examples)} prompts x {args.n} responses; padding over the whole epoch, "
          f"tokens/s over {args.batches} batches (fwd+bwd), min of {args.repeats} interleaved repeats")
    print(f"{'batches':<10}{'pad plain':>10}{'pad bucketed':>13}{'tok/s plain':>13}{'tok/s bucketed':>15}{'ratio':>7}")
    for name, (lengths, bs, build, step) in kinds(examples, enc, tok.pad_token_id).items():
        pads, runs = {}, {}
        for bucket in (False, True):
            built = [build(idx) for idx in batch_indices(lengths, bs, bucket)]
            pads[bucket] = 1 - sum(r for _, r, _ in built) / sum(p for _, _, p in built)
            runs[bucket] = built[:args.batches]
        step(model, runs[False][0][0]).backward()  # warm-up (one-off checks, allocator)
        speed = {False: 0.0, True: 0.0}
        for _ in range(args.repeats):
            for bucket in (False, True):
                t0 = time.perf_counter()
                for b, _, _ in runs[bucket]:
                    model.zero_grad(set_to_none=True)
                    step(model, b).backward()
                rate = sum(r for _, r, _ in runs[bucket]) / (time.perf_counter() - t0)
                speed[bucket] = max(speed[bucket], rate)
        print(f"{name:<10}{pads[False]:10.1%}{pads[True]:13.1%}{speed[False]:13.0f}{speed[True]:15.0f}"
              f"{speed[True] / speed[False]:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
