"""Text generation behind one small interface, so evaluation and augmentation do not care which engine
samples: `generator.generate(prompts, n, max_new_tokens, temperature, top_p, seed) -> list[list[str]]`
(n raw continuations per prompt, in prompt order; stop strings and empty samples are the caller's business).

- `hf` (default; the CPU path): transformers `generate`, batched, left padding (prompts keep their LAST
  `max_prompt_length` tokens), KV cache, `num_return_sequences=n`. Prompts go in order of length (less
  padding); torch's global RNG is seeded per batch from a generator seeded with `seed` — exactly what
  hps_exp.evaluate.generate and hps_exp.augment did, so the same inputs + seed + batch_size give the
  same texts. `batch_size` counts generated sequences per call (batch_size // n prompts, at least one).
- `vllm` (GPU): imported only when chosen; reads the model from a saved HF directory. Each prompt gets its
  own SamplingParams seed derived from (seed, prompt index), so results do not depend on batching.
  Never generate inside FSDP: give the engine a saved model directory (Trainer.save_pretrained).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

BACKENDS = ("hf", "vllm")


class Generator(Protocol):
    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[list[str]]: ...


def _check(prompts, n, max_new_tokens, temperature) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"generate: n must be an integer >= 1, got {n!r}")
    if n > 1 and not temperature > 0:
        raise ValueError(f"generate: n={n} samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")


def new_token_counts(new: torch.Tensor, eos_id: int | None) -> list[int]:
    """Tokens actually generated per row: up to and including the first eos (the rest is padding)."""
    if eos_id is None:
        return [new.shape[1]] * new.shape[0]
    is_eos = new == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
    return first.tolist()


class HFGenerator:
    """`stats` accumulates generated (sequences), gen_tokens and gen_s over calls (throughput reports)."""

    def __init__(self, model, tok, *, device, max_prompt_length: int, batch_size: int = 32,
                 top_k: int | None = None, autocast: torch.dtype | None = None):
        if batch_size < 1 or max_prompt_length < 1:
            raise ValueError("HFGenerator: batch_size and max_prompt_length must be >= 1")
        self.model, self.tok, self.device = model, tok, torch.device(device)
        self.max_prompt_length, self.batch_size = max_prompt_length, batch_size
        # None: the model's generation config decides (evaluate's behaviour); 0: off (augment's default).
        self.top_k, self.autocast = top_k, autocast
        self.stats = {"generated": 0, "gen_tokens": 0, "gen_s": 0.0}

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int = 1, max_new_tokens: int = 48, temperature: float = 0.7,
                 top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
        _check(prompts, n, max_new_tokens, temperature)
        tok, model = self.tok, self.model
        model.eval()
        saved_sides = (tok.padding_side, tok.truncation_side)
        tok.padding_side, tok.truncation_side = "left", "left"
        rng = torch.Generator().manual_seed(seed)
        per_call = max(1, self.batch_size // n)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # less padding per batch
        out: list[list[str] | None] = [None] * len(prompts)
        sample = temperature > 0
        try:
            for start in range(0, len(order), per_call):
                idx = order[start:start + per_call]
                t0 = time.perf_counter()
                enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_prompt_length, add_special_tokens=False).to(self.device)
                # Sampling draws from torch's global RNG; seed it per batch from our own generator.
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
                extra = {} if self.top_k is None else {"top_k": self.top_k if sample else None}
                with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    sampled = model.generate(
                        **enc, do_sample=sample, temperature=temperature if sample else None,
                        top_p=top_p if sample else None, max_new_tokens=max_new_tokens, num_return_sequences=n,
                        use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
                new = sampled[:, enc["input_ids"].shape[1]:].cpu()
                texts = tok.batch_decode(new, skip_special_tokens=True)
                self.stats["gen_tokens"] += sum(new_token_counts(new, tok.eos_token_id))
                self.stats["gen_s"] += time.perf_counter() - t0
                self.stats["generated"] += len(texts)
                for k, i in enumerate(idx):   # HF orders the n samples prompt-major
                    out[i] = texts[k * n:(k + 1) * n]
        finally:
            tok.padding_side, tok.truncation_side = saved_sides
        return out  # type: ignore[return-value]


VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


class VLLMGenerator:
    """vLLM engine over a saved HF model directory; built lazily on the first call (imports vllm then)."""

    def __init__(self, model_dir: str | Path, *, max_prompt_length: int, tensor_parallel_size: int = 1,
                 dtype: str = "bf16", enable_prefix_caching: bool = True, gpu_memory_utilization: float = 0.9,
                 seed: int = 0, top_k: int | None = None, trust_remote_code: bool = False,
                 max_model_len: int | None = None):
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"vllm dtype={dtype!r} is not allowed; choose one of {', '.join(VLLM_DTYPES)}")
        self.model_dir, self.max_prompt_length = str(model_dir), max_prompt_length
        self.engine_args = dict(model=self.model_dir, tensor_parallel_size=tensor_parallel_size,
                                dtype=VLLM_DTYPES[dtype], enable_prefix_caching=enable_prefix_caching,
                                gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        if trust_remote_code:
            self.engine_args["trust_remote_code"] = True
        if max_model_len is not None:
            self.engine_args["max_model_len"] = max_model_len
        self.top_k = top_k
        self._llm = None
        self._vllm = None
        self.stats = {"generated": 0, "gen_tokens": 0, "gen_s": 0.0}

    def _engine(self):
        if self._llm is None:
            try:
                import vllm
            except ImportError as e:
                raise ImportError(f"eval.backend/augment.backend=vllm needs the vllm package (GPU only): "
                                  f"pip install vllm ({e})") from None
            self._vllm = vllm
            self._llm = vllm.LLM(**self.engine_args)
        return self._llm

    def generate(self, prompts: list[str], n: int = 1, max_new_tokens: int = 48, temperature: float = 0.7,
                 top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
        _check(prompts, n, max_new_tokens, temperature)
        llm = self._engine()
        tok = llm.get_tokenizer()
        # Same truncation as the hf backend: keep the LAST max_prompt_length tokens, no special tokens added.
        inputs = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"][-self.max_prompt_length:]}
                  for p in prompts]
        sample = temperature > 0
        params = [self._vllm.SamplingParams(
            n=n, temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
            top_k=self.top_k if self.top_k else -1, max_tokens=max_new_tokens,   # -1: off
            seed=prompt_seed(seed, i)) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        texts = [[c.text for c in o.outputs] for o in outputs]
        self.stats["gen_s"] += time.perf_counter() - t0
        self.stats["generated"] += sum(len(t) for t in texts)
        self.stats["gen_tokens"] += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return texts


def prompt_seed(seed: int, index: int) -> int:
    """A well-mixed per-prompt seed: distinct for every (seed, prompt), independent of batching."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


def build_generator(backend: str, *, model=None, tok=None, model_dir: str | Path | None = None, device="cpu",
                    max_prompt_length: int, batch_size: int = 32, top_k: int | None = None,
                    autocast: torch.dtype | None = None, **vllm_args) -> Generator:
    """`hf` uses `model`/`tok` (or loads them from `model_dir`); `vllm` needs `model_dir` (a saved HF
    directory) and takes tensor_parallel_size, dtype, enable_prefix_caching, gpu_memory_utilization, seed,
    trust_remote_code, max_model_len."""
    if backend == "hf":
        if vllm_args:
            raise ValueError(f"backend=hf takes no vllm settings: {', '.join(sorted(vllm_args))}")
        if model is None:
            if model_dir is None:
                raise ValueError("backend=hf needs a model (or model_dir)")
            from hps_exp.models import load_saved

            tok, model = load_saved(Path(model_dir))
            model.to(device)
        return HFGenerator(model, tok, device=device, max_prompt_length=max_prompt_length, batch_size=batch_size,
                           top_k=top_k, autocast=autocast)
    if backend == "vllm":
        if model_dir is None:
            raise ValueError("backend=vllm needs model_dir: a saved HF model directory (vLLM loads it itself)")
        return VLLMGenerator(model_dir, max_prompt_length=max_prompt_length, top_k=top_k, **vllm_args)
    raise ValueError(f"generation backend {backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
