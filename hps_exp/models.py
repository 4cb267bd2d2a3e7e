"""Policy model and tokenizer from config: a tiny GPT-2 built offline, or any Hugging Face causal LM."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from hps_exp import hub
from hps_exp.config import PolicyLoraConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


class ModelError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says how to fix it."""


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the given texts: exact round trip, no files needed."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  unk_token=EOS, pad_token=EOS)
    return tok


def build_tiny(cfg: Any, vocab_size: int, seed: int, meta: bool = False) -> PreTrainedModel:
    """A randomly initialised GPT-2 from model.* sizes; the seed fixes the init. `meta`: parameters on the meta
    device (no memory, no init), for a rank that receives its weights from rank 0 (strategies.shard_from_rank0)."""
    import contextlib

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    attn = cfg.get("attn_implementation") if hasattr(cfg, "get") else getattr(cfg, "attn_implementation", None)
    if attn is not None:
        config._attn_implementation = attn
    dtype = torch_dtype(cfg.get("dtype", "fp32") if hasattr(cfg, "get") else getattr(cfg, "dtype", "fp32"))
    with torch.device("meta") if meta else contextlib.nullcontext():
        return GPT2LMHeadModel(config).to(dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelError(f"model.dtype={name!r} is not allowed; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---------------------------------------------------------------- LoRA, gradient checkpointing

# the schema's (hps_exp/config.py PolicyLoraConfig): the one place of LoRA's defaults, and the keys allowed
LORA_DEFAULTS = dataclasses.asdict(PolicyLoraConfig())


def lora_settings(lora: Mapping | None, key: str = "model.lora") -> dict:
    """LoRA settings (model.lora, or reward_model.lora: `key` is the config key the errors name) with defaults
    filled in; unknown keys and bad values are named."""
    given = dict(lora or {})
    unknown = sorted(set(given) - set(LORA_DEFAULTS))
    if unknown:
        raise ModelError(f"{key}.{unknown[0]} is not a LoRA setting; allowed: {', '.join(LORA_DEFAULTS)}")
    out = {**LORA_DEFAULTS, **given}
    if out["save"] not in ("merged", "adapter"):
        raise ModelError(f"{key}.save={out['save']!r} is not allowed; choose merged or adapter")
    if not (isinstance(out["r"], int) and out["r"] > 0):
        raise ModelError(f"{key}.r={out['r']!r} must be a positive integer")
    def number(name: str) -> float:
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ModelError(f"{key}.{name}={v!r} must be a number")
        return float(v)

    if not 0.0 <= number("dropout") < 1.0:
        raise ModelError(f"{key}.dropout={out['dropout']!r} must be in [0, 1)")
    if not number("alpha") > 0:
        raise ModelError(f"{key}.alpha={out['alpha']!r} must be > 0")
    if not isinstance(out["enabled"], bool):
        raise ModelError(f"{key}.enabled={out['enabled']!r} must be true or false")
    tm = out["target_modules"]
    if not (isinstance(tm, str) and tm) and not (isinstance(tm, (list, tuple)) and tm
                                                 and all(isinstance(x, str) for x in tm)):
        raise ModelError(f"{key}.target_modules={tm!r} must be a module name pattern or a list of names")
    return out


def apply_lora(model: torch.nn.Module, lora: Mapping | None, task_type: str = "CAUSAL_LM",
               key: str = "model.lora") -> torch.nn.Module:
    """Wrap `model` in peft LoRA adapters with `lora`'s settings (`lora_settings(lora, key)`): only the adapter
    weights stay trainable. `task_type` is peft's: CAUSAL_LM for the policy; SEQ_CLS for a reward model, whose
    scalar head peft keeps out of "all-linear" and trains in full (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    s = lora_settings(lora, key)
    targets = s["target_modules"]
    config = LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=float(s["dropout"]), task_type=task_type,
                        target_modules=targets if isinstance(targets, str) else list(targets))
    return get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works under DDP, FSDP2 and
    with frozen LoRA inputs). transformers >= 5 names it activation_checkpointing_enable."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def configure(model: PreTrainedModel, model_cfg: Mapping) -> torch.nn.Module:
    """Apply model.gradient_checkpointing and model.lora (in that order) to a loaded model; returns the
    model to train (a peft model when LoRA is enabled)."""
    if model_cfg.get("gradient_checkpointing", False):
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ModelError(f"model.gradient_checkpointing=true: {type(model).__name__} does not support it")
        enable_activation_checkpointing(model)
    lora = model_cfg.get("lora") or {}
    if lora_settings(lora)["enabled"]:
        model = apply_lora(model, lora)
    return model


def load_pretrained(name_or_path: str, *, dtype: str = "fp32", attn_implementation: str | None = None,
                    trust_remote_code: bool = False,
                    meta: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer + causal LM from the hub, a local directory, or a GGUF file (see hub.resolve_gguf).

    GGUF weights are dequantised to fp32 by transformers; the returned model is a plain (trainable)
    transformers model that saves with save_pretrained like any other. `dtype` (model.dtype) is the
    weights' dtype as loaded; `trust_remote_code` runs a repository's own Python only when set.
    `meta`: the model is built from its config on the meta device, no weights read (see build_on_meta).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, kwargs = hub.source_and_kwargs(name_or_path, trust_remote_code)
    gguf_file = kwargs.get("gguf_file")
    model_kwargs = {**kwargs, **(hub.gguf_dense_kwargs() if gguf_file is not None else {}), "dtype": torch_dtype(dtype)}
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
        if meta:
            model = build_on_meta(source, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"could not load model '{name_or_path}' ({first}). Offline or no such model? "
            f"Point at a local copy saved with save_pretrained: model.name_or_path=/path/to/model_dir, "
            f"or use the embedded default model=tiny") from None
    if gguf_file is not None and not meta:
        hub.drop_gguf_marker(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (hub id, local dir or GGUF file), as load_pretrained loads it."""
    from transformers import AutoTokenizer

    source, kwargs = hub.source_and_kwargs(name_or_path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load the tokenizer of '{name_or_path}' ({first})") from None


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def save(model: torch.nn.Module, tok: PreTrainedTokenizerBase, directory: Path, lora_save: str = "merged",
         keep_live: bool = True) -> None:
    """A plain HF directory (safetensors), written to a temp dir then renamed: an interrupted save never
    leaves a half-written policy that evaluation or the cache would read.

    A LoRA (peft) model is saved merged into its base (`lora_save="merged"`, the default: loads like any
    model) or as the adapter only (`"adapter"`: small; load with peft on top of the same base). Merging
    works on a copy so the live model keeps its adapters; `keep_live=False` merges `model` itself (a
    throw-away twin, see `unsharded_copy`: no second copy in host memory).
    """
    from hps_exp.io import fresh_dir, owner_tag, publish_dir

    directory = Path(directory)
    tmp = fresh_dir(directory.with_name(f".{directory.name}.tmp-{owner_tag()}"))
    if is_lora(model) and lora_save == "merged":
        import copy

        (copy.deepcopy(model) if keep_live else model).merge_and_unload().save_pretrained(tmp)
    else:
        # safetensors: transformers 5 always writes them (it has no safe_serialization switch); peft's default
        model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    publish_dir(tmp, directory)


def empty_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A parameter-free (meta-device) copy of `model`'s structure: the same transformers class and config and,
    for a peft model, the same LoRA adapters. What a sharded model is gathered into for saving, and what the
    ranks that do not load weights build before sharding (docs/scaling.md)."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    lora = is_lora(model)
    base = model.get_base_model() if lora else model
    # fully_shard swaps a module's class for an FSDP subclass of it: build the original class
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        twin = cls(copy.deepcopy(base.config))
        if lora:
            from peft import get_peft_model

            name = model.active_adapter
            twin = get_peft_model(twin, copy.deepcopy(model.peft_config[name]), adapter_name=name)
    return twin


def check_twin(model: torch.nn.Module) -> None:
    """Refuse, before training, a model that `empty_twin` cannot rebuild with the same parameters and buffers
    (an FSDP2 save gathers into such a twin: it would otherwise fail after training)."""
    cls = type(model.get_base_model() if is_lora(model) else model).__name__
    try:
        twin = empty_twin(model)
    except Exception as e:  # noqa: BLE001 - any failure is reported with what to do instead
        raise ModelError(f"trainer.strategy=fsdp2 saves by gathering the weights into a {cls} rebuilt from its "
                         f"config, which fails here ({type(e).__name__}: {e}); use trainer.strategy=ddp") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise ModelError(f"trainer.strategy=fsdp2: a {cls} rebuilt from its config does not hold the same weights "
                         f"(first difference: {diff[0][0]}), so the sharded model could not be saved; use "
                         f"trainer.strategy=ddp")


def unsharded_copy(model: torch.nn.Module, state_dict: dict) -> torch.nn.Module:
    """`model` (sharded by FSDP2, or any) as a plain module holding `state_dict`'s full tensors (no copy of
    them): saves and merges like the unwrapped model, tied weights tied again (so save_pretrained writes each
    once). Keys must match exactly."""
    twin = empty_twin(model)
    twin.load_state_dict(state_dict, strict=True, assign=True)
    (twin.get_base_model() if is_lora(twin) else twin).tie_weights()
    return twin


def build_on_meta(source: str | Path | PretrainedConfig, *, dtype: str = "fp32", attn_implementation: str | None = None,
                  **config_kwargs: Any) -> PreTrainedModel:
    """The causal LM of `source` (a directory, hub id or GGUF file: its config only; or a config) on the meta
    device: the structure without memory or weights. What the ranks other than 0 build under fsdp2: they receive their
    shards from rank 0 (strategies.shard_from_rank0), so no rank but 0 ever holds the whole model."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    config = source if isinstance(source, PretrainedConfig) else AutoConfig.from_pretrained(source, **config_kwargs)
    kwargs = {"dtype": torch_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if config_kwargs.get("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def load_saved(directory: Path, *, dtype: str = "fp32", attn_implementation: str | None = None,
               meta: bool = False) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer + model of a saved HF directory; `meta`: the model on the meta device (build_on_meta)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if meta:
        return AutoTokenizer.from_pretrained(directory), build_on_meta(directory, dtype=dtype,
                                                                       attn_implementation=attn_implementation)
    kwargs = {"dtype": torch_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoTokenizer.from_pretrained(directory), AutoModelForCausalLM.from_pretrained(directory, **kwargs)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware (measured here: SmolLM2-135M training 1.5x, generation
    7x faster than fp32); without them bf16 is emulated and slower than fp32."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(precision: str, device: torch.device, pretrained: bool) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None = plain fp32) for trainer.precision, and why, for the run's first line.

    auto: bf16 on CUDA; on a CPU with native bf16, bf16 for pretrained models (model.name_or_path), fp32 for the
    tiny model built from config (the embedded default's numbers stay those of fp32); fp32 elsewhere."""
    if precision == "fp32":
        return None, "fp32 (trainer.precision=fp32)"
    if precision == "bf16":
        return torch.bfloat16, "bf16 autocast (trainer.precision=bf16)"
    if device.type == "cuda":
        return torch.bfloat16, "bf16 autocast (auto: CUDA)"
    if not cpu_has_native_bf16():
        return None, "fp32 (auto: this CPU has no native bf16)"
    if not pretrained:
        return None, "fp32 (auto: the model is built from config; trainer.precision=bf16 to use this CPU's bf16)"
    return torch.bfloat16, "bf16 autocast (auto: pretrained model, this CPU has native bf16)"


def autocast_dtype(precision: str, device: torch.device, pretrained: bool = False) -> torch.dtype | None:
    return resolve_precision(precision, device, pretrained)[0]
