"""Per-GPU memory plan of a run, before renting the GPUs:

    python -m hps_exp.memory model.name_or_path=known:llama-3-8b trainer.strategy=fsdp2 world_size=8 \\
        trainer.batch_size=64 model.max_length=1024 [responses=2] [gpu_gib=80]

takes the app's Hydra overrides (model.*, trainer.*, eval.*) plus `world_size`, `responses` (sequences per prompt:
2 for a pairwise loss, n for a listwise one) and `gpu_gib`, builds the model on the meta device (no weights: a
local directory, a config.json, `known:<name>` for the shapes in KNOWN_SHAPES, or model=tiny's sizes) and prints the
bytes each GPU holds for full and LoRA fine-tuning: parameters, gradients, AdamW states, fsdp2's gathered blocks,
activations per micro-batch, the reference pass and vLLM generation.

Parameters, gradients and optimiser states are counted from the meta-built model's tensors (exact). Activations
are measured, not guessed: the bytes autograd saves for backward (`saved_tensors_hooks`) in forward passes of the
same architecture at its real widths cut down on CPU (1-2 layers, a small vocabulary, 2 x 64 tokens), fitted as
    bytes = tokens x (beta x hidden x layers + gamma x vocab + delta x hidden)
and scaled to the real model's layers, vocabulary and tokens per micro-batch. CPU attention (sdpa) saves what
the CUDA flash kernel saves (q, k, v, output, log-sum-exp), so the per-layer figure carries over;
`attn_implementation=eager` adds the tokens^2 scores.
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import torch

from hps_exp import hub, models
from hps_exp.strategies import compute_numerics

GIB = 2 ** 30
KNOWN_PREFIX = "known:"
# Published shapes (the models' config.json on the hub), for planning without the weights or network access.
KNOWN_SHAPES = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
}
PLANNER_KEYS = {"world_size": 1, "responses": 2, "gpu_gib": 80.0}
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


class MemoryPlanError(ValueError):
    """A planner input that cannot work; the message names the key."""


# ---------------------------------------------------------------- the model's structure

def model_config(model_cfg):
    """The transformers config of model.name_or_path (a directory, a config.json, a hub id in the local cache,
    known:<name>) or, without one, model=tiny's GPT-2 sizes."""
    from transformers import AutoConfig, GPT2Config

    source = model_cfg.get("name_or_path")
    if not source:
        return GPT2Config(vocab_size=model_cfg.vocab_size, n_positions=model_cfg.n_positions, n_embd=model_cfg.n_embd,
                          n_layer=model_cfg.n_layer, n_head=model_cfg.n_head)
    if source.startswith(KNOWN_PREFIX):
        name = source[len(KNOWN_PREFIX):]
        if name not in KNOWN_SHAPES:
            raise MemoryPlanError(f"model.name_or_path={source!r}: no such known shape; known: "
                                  f"{', '.join(KNOWN_PREFIX + k for k in KNOWN_SHAPES)}")
        shape = dict(KNOWN_SHAPES[name])
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    directory, gguf_file, _ = hub.resolve_gguf(source)
    try:
        return AutoConfig.from_pretrained(directory, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as e:
        raise MemoryPlanError(f"model.name_or_path={source!r}: no config found ({str(e).splitlines()[0][:200]}); "
                              f"give a local directory or config.json, or one of "
                              f"{', '.join(KNOWN_PREFIX + k for k in KNOWN_SHAPES)}") from None


def meta_model(config, dtype: str, lora: dict | None = None):
    """The model (with LoRA adapters when enabled) on the meta device: shapes and dtypes, no memory."""
    model = models.build_on_meta(config, dtype=dtype)
    if lora and models.lora_settings(lora)["enabled"]:
        model = models.apply_lora(model, lora)
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    vocab: int
    kv_bytes_per_token: int   # K and V of every layer in bf16 (vLLM's cache)


def shape_of(config) -> Shape:
    text = config.get_text_config()
    hidden = text.hidden_size
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return Shape(hidden, layers, text.vocab_size, 2 * layers * kv_heads * head_dim * 2)


# ---------------------------------------------------------------- activations, measured on a shrunk twin

@contextlib.contextmanager
def saved_tensor_bytes(model, sink: list[int]):
    """Count the bytes autograd keeps for backward during the block (each storage once, the model's parameters
    left out) and append the total to `sink`: the activations. (Under bf16 autocast the weights' bf16 copies are
    counted: they live as long as the activations.)"""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    sink.append(sum(storages.values()))


def saved_bytes(model, tokens: torch.Tensor, compute: str) -> int:
    """The activations of one forward and backward of `tokens` (with the fp32 log-softmax the losses take) under
    `compute` (strategies.compute_numerics)."""
    sink: list[int] = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if compute.endswith("autocast") else contextlib.nullcontext()
    with saved_tensor_bytes(model, sink), autocast:
        torch.log_softmax(model(input_ids=tokens).logits.float(), dim=-1).sum().backward()
    return sink[0]


def cut_down(config, *, layers: int, vocab: int, dtype: str):
    """The same architecture and widths with `layers` layers and a `vocab`-token vocabulary, on CPU, weights
    allocated but not initialised (zeros: what autograd saves does not depend on the values)."""
    import copy

    c = copy.deepcopy(config.get_text_config())
    c.num_hidden_layers, c.vocab_size = layers, vocab
    model = models.build_on_meta(c, dtype=dtype).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.zero_()
    return model


@dataclass(frozen=True)
class ActivationFit:
    """Saved bytes = tokens x (beta x hidden x layers + gamma x vocab + delta x hidden)  (per token)
                   + per_layer x layers + per_vocab x vocab + base                      (per micro-batch: under bf16
    autocast the weights' bf16 copies, which live as long as the activations)."""
    beta: float
    gamma: float
    delta: float
    per_layer: float = 0.0
    per_vocab: float = 0.0
    base: float = 0.0

    def bytes(self, tokens: int, shape: Shape, checkpointing: bool, compute_bytes: int) -> int:
        per_layer = self.beta * shape.hidden
        # checkpointing keeps each layer's input and recomputes one layer at a time in backward
        if checkpointing:
            layers = shape.layers * shape.hidden * compute_bytes + per_layer
        else:
            layers = shape.layers * per_layer
        fixed = self.per_layer * shape.layers + self.per_vocab * shape.vocab + self.base
        return int(tokens * (layers + self.gamma * shape.vocab + self.delta * shape.hidden) + fixed)


def fit_activations(config, compute: str, dtype: str, seq: int = 64) -> ActivationFit:
    """Measure the model cut down to (1 layer, 2 layers) x (two vocabularies) at its real widths, with 1 and 2
    sequences of `seq` tokens, and solve for the per-token and per-micro-batch terms."""
    hidden = shape_of(config).hidden
    per_token, fixed = {}, {}
    for layers, vocab in ((1, 256), (2, 256), (1, 512)):
        model = cut_down(config, layers=layers, vocab=vocab, dtype=dtype)
        if compute.endswith("parameters (fsdp2)"):
            model.to(torch.bfloat16)
        models.disable_dropout(model)
        ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
        one, two = saved_bytes(model, ids[:1], compute), saved_bytes(model, ids, compute)
        per_token[layers, vocab] = (two - one) / seq
        fixed[layers, vocab] = one - per_token[layers, vocab] * seq
        del model
    beta = (per_token[2, 256] - per_token[1, 256]) / hidden
    gamma = (per_token[1, 512] - per_token[1, 256]) / 256
    delta = max(0.0, (per_token[1, 256] - beta * hidden - gamma * 256) / hidden)
    per_layer = fixed[2, 256] - fixed[1, 256]
    per_vocab = (fixed[1, 512] - fixed[1, 256]) / 256
    base = fixed[1, 256] - per_layer - per_vocab * 256
    return ActivationFit(beta, gamma, delta, per_layer, per_vocab, base)


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Setting:
    strategy: str
    world_size: int
    dtype: str                # model.dtype
    precision: str            # trainer.precision (on CUDA: auto = bf16)
    batch_size: int           # global prompts per micro-batch
    responses: int            # sequences per prompt
    max_length: int
    checkpointing: bool
    score_batch_size: int
    vllm_tp: int = 1
    gpu_gib: float = 80.0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2" and self.world_size > 1

    @property
    def compute(self) -> str:
        autocast = models.autocast_dtype(self.precision, torch.device("cuda"))
        return compute_numerics(self.strategy, self.world_size > 1, autocast)

    def tokens_per_rank(self) -> int:
        return math.ceil(self.batch_size / self.world_size) * self.responses * self.max_length


def block_bytes(model) -> int:
    """The largest decoder block's parameters (what fsdp2 gathers at a time)."""
    from hps_exp.strategies import decoder_block_classes

    blocks = decoder_block_classes(model)
    return max(tensor_bytes(m.parameters()) for m in model.modules() if isinstance(m, blocks))


def plan(model, config, s: Setting, fit: ActivationFit) -> dict[str, int]:
    """Bytes per GPU of one fine-tuning mode (the model as given: LoRA or not)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    shard = s.world_size if s.sharded else 1
    compute_bytes = 2 if s.compute != "fp32" else 4
    shape = shape_of(config)
    rows = {
        "parameters": math.ceil(tensor_bytes(params) / shard),
        # gradients in the parameters' dtype (fsdp2 reduces in fp32 into fp32 shards)
        "gradients": math.ceil(tensor_bytes(trainable) / shard),
        "AdamW states (2 moments)": math.ceil(2 * tensor_bytes(trainable) / shard),
        "fsdp2 gathered blocks (2 in flight)": (2 * block_bytes(model) * compute_bytes
                                                // DTYPE_BYTES[params[0].dtype]) if s.sharded else 0,
        "activations per micro-batch": fit.bytes(s.tokens_per_rank(), shape, s.checkpointing, compute_bytes),
    }
    rows["training total"] = sum(rows.values())
    return rows


def phases(config, s: Setting) -> dict[str, int]:
    """The phases outside training: the reference pass (no gradients: the SFT model whole in model.dtype, or under
    fsdp2 its shard plus the whole model gathered in the compute dtype; plus one scoring batch's fp32 logits) and
    vLLM (bf16 weights / tensor parallel, KV cache per token)."""
    base = meta_model(config, s.dtype)
    shape = shape_of(config)
    weights = tensor_bytes(base.parameters())
    per_byte = weights // DTYPE_BYTES[next(base.parameters()).dtype]   # parameters, counted once
    compute_bytes = 2 if s.compute != "fp32" else DTYPE_BYTES[next(base.parameters()).dtype]
    model = math.ceil(weights / s.world_size) + per_byte * compute_bytes if s.sharded else weights
    return {
        "reference pass (the model + a scoring batch's logits)":
            model + s.score_batch_size * s.max_length * shape.vocab * 4,
        "vLLM weights (bf16, per tensor-parallel rank)": per_byte * 2 // s.vllm_tp,
        "vLLM KV cache per token (bf16)": shape.kv_bytes_per_token // s.vllm_tp,
    }


def report(config, s: Setting, lora: dict) -> str:
    fit = fit_activations(config, s.compute, s.dtype)
    full = plan(meta_model(config, s.dtype), config, s, fit)
    lora_on = {**lora, "enabled": True}
    low = plan(meta_model(config, s.dtype, lora_on), config, s, fit)
    n_params = sum(p.numel() for p in meta_model(config, s.dtype).parameters())
    lines = [f"# memory per GPU: {type(config).__name__} {n_params / 1e9:.3f} B parameters, strategy={s.strategy} x "
             f"{s.world_size}, model.dtype={s.dtype}, compute={s.compute}, {s.tokens_per_rank()} tokens per rank "
             f"per micro-batch ({math.ceil(s.batch_size / s.world_size)} prompts x {s.responses} sequences x "
             f"{s.max_length}), activation checkpointing {'on' if s.checkpointing else 'off'}", "",
             f"| | full fine-tuning (GiB) | LoRA r={models.lora_settings(lora_on)['r']} (GiB) |", "|---|---:|---:|"]
    for key in full:
        lines.append(f"| {key} | {full[key] / GIB:.2f} | {low[key] / GIB:.2f} |")
    fits = {m: "fits" if v["training total"] <= s.gpu_gib * GIB else "does NOT fit" for m, v in
            (("full", full), ("LoRA", low))}
    lines += ["", f"{s.gpu_gib:g} GiB card: full fine-tuning {fits['full']}, LoRA {fits['LoRA']} (plus ~1-3 GiB CUDA "
              f"context and allocator slack).", ""]
    other = phases(config, s)
    for key, value in other.items():
        unit = f"{value / 2 ** 20:.3f} MiB" if "per token" in key else f"{value / GIB:.2f} GiB"
        lines.append(f"- {key}: {unit}")
    free = 0.9 * s.gpu_gib * GIB - other["vLLM weights (bf16, per tensor-parallel rank)"]
    kv_tokens = max(0, free) / other["vLLM KV cache per token (bf16)"]
    lines.append(f"- vLLM at gpu_memory_utilization=0.9: ~{kv_tokens / 1e3:.0f}k tokens of KV cache per GPU")
    lines.append(f"- activation fit (bytes per token): {fit.beta:.1f} x hidden x layers + {fit.gamma:.2f} x vocab + "
                 f"{fit.delta:.1f} x hidden (measured on the model cut down to 1-2 layers on CPU)")
    return "\n".join(lines)


def setting_from(cfg, extra: dict) -> Setting:
    t, m = cfg.trainer, cfg.model
    for key in ("world_size", "responses"):
        if not (isinstance(extra[key], int) and extra[key] >= 1):
            raise MemoryPlanError(f"{key}={extra[key]!r} must be a positive integer")
    return Setting(strategy=t.strategy, world_size=extra["world_size"], dtype=m.dtype, precision=t.precision,
                   batch_size=t.batch_size, responses=extra["responses"], max_length=m.max_length,
                   checkpointing=bool(t.activation_checkpointing or m.gradient_checkpointing),
                   score_batch_size=cfg.eval.batch_size,
                   vllm_tp=int((cfg.eval.vllm or {}).get("tensor_parallel_size", 1)), gpu_gib=float(extra["gpu_gib"]))


def split_overrides(argv: list[str]) -> tuple[list[str], dict]:
    """The app's Hydra overrides, and the planner's own keys (PLANNER_KEYS) parsed."""
    import yaml

    extra, rest = dict(PLANNER_KEYS), []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key in PLANNER_KEYS:
            extra[key] = yaml.safe_load(value)
        else:
            rest.append(arg)
    return rest, extra


def main(argv: list[str] | None = None) -> str:
    from hps_exp.config import compose

    overrides, extra = split_overrides(sys.argv[1:] if argv is None else argv)
    cfg = compose(overrides)
    text = report(model_config(cfg.model), setting_from(cfg, extra), dict(cfg.model.lora))
    print(text)
    return text


if __name__ == "__main__":
    main()
