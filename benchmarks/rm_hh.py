"""Bradley-Terry reward model on real HH-RLHF pairs (harmless-base, local file): held-out pair accuracy + time.

    .venv/bin/python benchmarks/rm_hh.py [--path ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz]
        [--epochs 3] [--vocab 4096] [--max-length 256] [--device auto] [--max-train N] [--max-test N]
    .venv/bin/python benchmarks/rm_hh.py --max-train 16 --max-test 8 --epochs 1 --vocab 512 --max-length 64 \
        --max-prompt-length 48   # a smoke test (seconds)

The file is split by prompt (test_fraction=0.2, seed=0); the tokenizer (byte-level BPE) is trained on the
train texts only; the RM is a 2-layer GPT-2 (n_embd 128) from hps_exp.reward_models.train_reward_model.
For reference it also prints two trivial baselines: "longer response wins" and "shorter response wins".
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hps_exp.data import hh_rlhf
from hps_exp.models import autocast_dtype, pick_device, train_tokenizer
from hps_exp.reward_models import pair_accuracy, train_reward_model

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=str(DEFAULT))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-train", type=int, default=None, help="cap the train pairs (default: all)")
    ap.add_argument("--max-test", type=int, default=None, help="cap the test pairs (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    splits = hh_rlhf.load(path=args.path, on_bad_row="skip", test_fraction=0.2, seed=0, max_train=args.max_train,
                          max_test=args.max_test)
    print(f"data: {len(splits.train)} train pairs, {len(splits.test)} test pairs from {args.path}")
    t = time.perf_counter()
    tok = train_tokenizer([e.prompt + r for e in splits.train for r in e.responses], args.vocab)
    print(f"tokenizer: vocab {len(tok)} in {time.perf_counter() - t:.1f}s")
    device = pick_device(args.device)
    autocast = autocast_dtype("auto", device)
    t = time.perf_counter()
    rm = train_reward_model(splits.train, tok=tok, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd,
                            n_positions=args.max_length, max_prompt_length=args.max_prompt_length,
                            max_length=args.max_length, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, device=device, autocast=autocast, dropout=args.dropout)
    train_s = time.perf_counter() - t
    params = sum(p.numel() for p in rm.model.parameters())
    t = time.perf_counter()
    test_acc = pair_accuracy(rm, splits.test)
    train_acc = pair_accuracy(rm, splits.train)
    score_s = time.perf_counter() - t

    def by_length(sign: int) -> float:
        return sum(sign * (len(e.responses[e.chosen]) - len(e.responses[e.rejected])) > 0 for e in splits.test) \
            / len(splits.test)

    print(f"model: {params / 1e6:.2f}M parameters, {rm.train_result['steps']} steps, "
          f"final train loss {rm.train_result.get('loss', float('nan')):.4f}, device {device}")
    print(f"held-out pair accuracy: {test_acc:.4f}  (n={len(splits.test)}; train accuracy {train_acc:.4f})")
    print(f"baselines: longer response wins {by_length(1):.4f}, shorter response wins {by_length(-1):.4f}")
    print(f"time: train {train_s:.1f}s, scoring {score_s:.1f}s, total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
