"""Structured config: the types and allowed keys of every group, checked by Hydra before any work.

Groups whose knobs depend on the chosen option (loss, sampler, dataset) are free-form here; their
keys are checked against the constructor named by `_target_` when they are built (`build`).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import II, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


@dataclass
class LoraConfig:
    """peft LoRA adapters (reward_model.lora with reward_model=train; the policy's adds `save`): the one place of
    their defaults. Typed Any: models.lora_settings checks the values and names the key, for both nodes alike (the
    reward_model group is free-form here; conf/reward_model/train.yaml composes this node under it)."""
    enabled: Any = False
    r: Any = 16
    alpha: Any = 32
    dropout: Any = 0.0
    target_modules: Any = "all-linear"    # a module name pattern or a list of names


@dataclass
class PolicyLoraConfig(LoraConfig):
    """model.lora: only the adapters train; the reference = the policy with adapters off."""
    save: Any = "merged"                  # merged (a plain HF model) | adapter (adapter weights only)


@dataclass
class ModelConfig:
    """The policy; these defaults are model=tiny's (conf/model/*.yaml override them)."""
    name: str = "tiny"
    name_or_path: Optional[str] = None
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    vocab_size: int = 1024
    max_prompt_length: int = 64
    max_length: int = 128
    dtype: str = "fp32"                   # weights as loaded: fp32 | bf16
    attn_implementation: str = "sdpa"     # sdpa | eager | flash_attention_2
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    chat_template: bool = False           # prompts written by the tokenizer's chat template (hps_exp/data/chat.py)
    lora: PolicyLoraConfig = field(default_factory=PolicyLoraConfig)


@dataclass
class SFTConfig:
    enabled: bool = True
    targets: str = "all"                  # all responses | best (argmax score / chosen): what the SFT policy imitates
    epochs: int = 8
    lr: float = 2e-3                      # the SFT stage's optimiser: trainer.* with this lr
    batch_size: int = 32


@dataclass
class OptimConfig:
    """How a stage's optimiser steps: part of every trained stage's cache key. The policy stages (SFT, preference)
    and reward_model=train take it whole; each stage sets `lr` from its own group (sft.lr, trainer.lr,
    reward_model.lr), the rest is trainer.*'s for all of them."""
    lr: float = 2e-4
    grad_accum: int = 1                   # micro-batches per optimiser step
    warmup_ratio: float = 0.1             # of the stage's steps, linear warmup
    schedule: str = "cosine"              # cosine | linear | constant (after warmup)
    weight_decay: float = 0.0             # AdamW's
    max_grad_norm: float = 1.0            # gradient clipping; 0 = off
    # error | skip: a NaN/inf loss or gradient. Keyed: a skipped step changes the weights, so a stage trained
    # under skip is never reused by a run that asked to fail instead.
    on_nonfinite: str = "error"


@dataclass
class RuntimeConfig:
    """Trainer settings that never change a result, so no cache key holds them: logging, checkpoint cadence and
    resume, the distributed strategy and its timeout (docs/scaling.md)."""
    log_every: int = 10
    save_every: int = 0                   # checkpoint every k steps (0: at the end of each epoch)
    resume: bool = True                   # continue from the run dir's checkpoint when one exists
    strategy: str = "none"                # none | ddp | fsdp2 (launch with torchrun)
    activation_checkpointing: bool = False
    dist_timeout_s: int = 1800            # a collective that waits longer fails instead of hanging
    # Keep <run dir>/checkpoints/ once the run has completed. Only a resume reads it, and a completed run is reused,
    # never resumed; a SmolLM2 tuning grid's kept 16 GB (when checkpoints still held the frozen base weights).
    keep_checkpoints: bool = False


@dataclass
class TrainerConfig(RuntimeConfig, OptimConfig):
    """trainer.*: one flat group (trainer.lr, trainer.grad_accum, trainer.log_every, ...) whose optimiser and
    runtime parts are `OptimConfig` and `RuntimeConfig` (`part` takes them out whole); the rest is the preference
    stage's own and the process's."""
    device: str = "auto"                  # auto (cuda if available) | cpu | cuda
    precision: str = "auto"               # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    batch_size: int = 16                  # prompts per micro-batch
    epochs: int = 2
    resample: str = "epoch"               # epoch: negatives drawn once per prompt per epoch | step: per step
    max_steps: Optional[int] = None       # stop early (smoke tests)
    num_threads: int = 0                  # torch CPU threads per process; 0 = auto (the cores, 1 on a busy machine)
    bucketing: bool = False               # length-bucketed preference batches (less padding, less mixing)
    seed: Optional[int] = None            # preference training + evaluation seed; null = the top-level seed


def part(cls: type, node: Any) -> Any:
    """The `cls` part of a config node (e.g. OptimConfig of trainer.*): every field of cls, read by name, so a
    field added to cls reaches every stage that takes it with no other edit."""
    return cls(**{f.name: node[f.name] for f in dataclasses.fields(cls)})


@dataclass
class EvalConfig:
    protocol: str = "default"             # default | paper (K samples, top-1 reward, best-vs-best BLEU)
    # Each protocol's own values (evaluate.PROTOCOLS: default 1 sample at 0.7, paper 5 at 0.9), read when the
    # config is resolved: config_resolved.yaml holds the numbers used; an override replaces them.
    num_samples: int = II("eval_protocol:${eval.protocol},num_samples")   # samples per prompt
    max_prompts: int = 100
    max_new_tokens: int = 48
    temperature: float = II("eval_protocol:${eval.protocol},temperature")
    top_p: float = 1.0
    batch_size: int = 32
    reward_model: Any = None
    datasets: list[str] = field(default_factory=list)      # eval sets; [] = the training dataset's test split
    dataset_args: dict[str, Any] = field(default_factory=dict)  # per-set overrides: dataset_args.<name>.<key>
    backend: str = "hf"                   # hf | vllm: generation engine
    vllm: dict[str, Any] = field(default_factory=dict)   # vLLM engine settings (tensor_parallel_size, ...)
    validation_prompts: int = 0           # training prompts held out as the validation set (never trained on)
    split: str = "test"                   # test | validation: what the policies are evaluated on


@dataclass
class LoggerConfig:
    mode: str = "auto"
    project: str = "hps-exp"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    loss: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    reward_model: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    run_name: Optional[str] = None
    label: Optional[str] = None
    sweep: Optional[str] = None
    cache_dir: str = "outputs/cache"
    dry_run: bool = False


CHOICES = {
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "trainer.schedule": ("cosine", "linear", "constant"),
    "trainer.resample": ("epoch", "step"),
    "trainer.strategy": ("none", "ddp", "fsdp2"),
    "trainer.on_nonfinite": ("error", "skip"),
    "sft.targets": ("all", "best"),
    "model.dtype": ("fp32", "bf16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "eval.backend": ("hf", "vllm"),
    "eval.protocol": ("default", "paper"),
    "eval.split": ("test", "validation"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
}
# key: (low, high, low inclusive): every numeric knob's allowed range, checked before any work.
INF = float("inf")
RANGES = {
    "trainer.batch_size": (1, INF, True), "trainer.grad_accum": (1, INF, True), "trainer.lr": (0, INF, False),
    "trainer.epochs": (1, INF, True), "trainer.max_steps": (1, INF, True), "trainer.warmup_ratio": (0, 1, True),
    "trainer.max_grad_norm": (0, INF, False), "trainer.weight_decay": (0, INF, True),
    "trainer.log_every": (1, INF, True), "trainer.save_every": (0, INF, True),
    "trainer.dist_timeout_s": (1, INF, True), "trainer.num_threads": (0, 4096, True),
    "sft.epochs": (0, INF, True), "sft.lr": (0, INF, False), "sft.batch_size": (1, INF, True),
    "eval.max_prompts": (1, INF, True), "eval.max_new_tokens": (1, INF, True), "eval.batch_size": (1, INF, True),
    "eval.temperature": (0, INF, True), "eval.top_p": (0, 1, False), "eval.num_samples": (1, 1000, True),
    "model.max_length": (2, INF, True), "model.max_prompt_length": (1, INF, True),
    "eval.validation_prompts": (0, INF, True), "trainer.seed": (0, 2**32 - 1, True),
}
# Sizes of the model built from its config (model.name_or_path unset); a pretrained model ignores them.
BUILT_MODEL_RANGES = {"model.n_layer": (1, INF, True), "model.n_head": (1, INF, True),
                      "model.n_embd": (1, INF, True), "model.n_positions": (2, INF, True),
                      "model.vocab_size": (16, INF, True)}

# Keys in a group's yaml that name the option rather than configure the object.
LABEL_KEYS = ("name",)
# Top-level keys that do not change an experiment's result (excluded from its config_key; never split a table row).
NOT_EXPERIMENT = ("cache_dir", "logger", "run_name", "sweep", "label")


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """The app's config for these overrides, as `python -m hps_exp <overrides>` composes it (for the commands
    that read a config outside Hydra's main: hps_exp.memory, hps_exp.ranked_margins; and the tests)."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def register() -> None:
    ConfigStore.instance().store(name="hps_exp_schema", node=Config)
    ConfigStore.instance().store(name="hps_exp_lora", node=LoraConfig)   # reward_model=train's lora node
    OmegaConf.register_new_resolver("eval_protocol", protocol_value, replace=True)


def protocol_value(protocol: str, key: str) -> Any:
    """eval.<key> as the evaluation protocol eval.protocol sets it (num_samples, temperature)."""
    from hps_exp.evaluate import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol={protocol!r} is not allowed; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[protocol][key]


OPTIONAL = ("trainer.max_steps", "trainer.seed")   # null means "the default"


def check_range(key: str, value: Any, lo: float, hi: float, lo_inclusive: bool) -> None:
    if value is None and key in OPTIONAL:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{key}={value!r} must be a number")
    above = value >= lo if lo_inclusive else value > lo
    if not (above and value <= hi):
        low = f"{'>=' if lo_inclusive else '>'} {lo:g}"
        raise ConfigError(f"{key}={value!r} is out of range; it must be {low}"
                          + (f" and <= {hi:g}" if hi < INF else ""))


def check_values(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express: choices and the range of every numeric knob."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    ranges = dict(RANGES)
    if not cfg.model.name_or_path:
        ranges.update(BUILT_MODEL_RANGES)
    for key, (lo, hi, inclusive) in ranges.items():
        check_range(key, OmegaConf.select(cfg, key), lo, hi, inclusive)
    if cfg.model.max_prompt_length >= cfg.model.max_length:
        raise ConfigError("model.max_prompt_length must be smaller than model.max_length")
    if not cfg.model.name_or_path and cfg.model.max_length > cfg.model.n_positions:
        raise ConfigError(f"model.max_length={cfg.model.max_length} exceeds model.n_positions="
                          f"{cfg.model.n_positions}, the longest sequence the built model can read")
    if cfg.model.n_embd and cfg.model.n_head and cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"model.n_embd={cfg.model.n_embd} must be a multiple of model.n_head={cfg.model.n_head}")


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list) or annotation in (tuple, list):
        return isinstance(value, (list, tuple))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def check_node(node: DictConfig, key: str, drop: tuple[str, ...] = (),
               provided: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """(target, kwargs) of `node._target_`, with every key checked against its signature (unknown keys, wrong
    types and missing required values name `key.<param>`). `provided`: parameters the caller passes later."""
    if "_target_" not in node:
        raise ConfigError(f"{key}: missing _target_")
    try:
        target = get_object(node._target_)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported: {e}") from None
    missing = [k for k in node if OmegaConf.is_missing(node, k)]
    if missing:
        raise ConfigError(f"{key}.{missing[0]} is required (set it on the command line: {key}.{missing[0]}=...)")
    kwargs = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
              if k != "_target_" and k not in LABEL_KEYS and k not in drop}
    params = inspect.signature(target).parameters
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for name, value in kwargs.items():
        if name not in params:
            if takes_kwargs:
                continue
            allowed = [p for p in params if p not in ("self", "args", "kwargs")]
            raise ConfigError(f"{key}.{name} is not a setting of {node._target_}; allowed: {', '.join(allowed)}")
        annotation = hints.get(name, params[name].annotation)
        if not _matches(value, annotation):
            raise ConfigError(f"{key}.{name}={value!r} has the wrong type; "
                              f"expected {getattr(annotation, '__name__', annotation)}")
    required = [n for n, p in params.items() if p.default is p.empty and p.kind is p.KEYWORD_ONLY
                and n not in kwargs and n not in provided]
    if required:
        raise ConfigError(f"{key}.{required[0]} is required by {node._target_}")
    return target, kwargs


def build(node: DictConfig, key: str, drop: tuple[str, ...] = (), **extra: Any) -> Any:
    """Instantiate `node._target_` with the node's keys (checked by `check_node`) and `extra`."""
    target, kwargs = check_node(node, key, drop, provided=tuple(extra))
    kwargs.update(extra)
    try:
        return target(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None
