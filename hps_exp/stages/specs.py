"""What the stages pass: the data values, each stage's frozen spec (the only config it reads, part of its cache key)
and each stage's typed result."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hps_exp import models
from hps_exp.cache import content_key
from hps_exp.config import OptimConfig
from hps_exp.data.schema import Example

# ---------------------------------------------------------------------------------------------- values

@dataclass(frozen=True)
class Examples:
    """A list of examples with a fingerprint of their content: the data part of every downstream key."""
    items: tuple[Example, ...]
    key: str

    @classmethod
    def of(cls, items) -> "Examples":
        items = tuple(items)
        return cls(items, content_key([e.to_json() for e in items]))

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class EvalSet:
    name: str
    examples: Examples



# ---------------------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class ModelSpec:
    name_or_path: str | None
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    max_prompt_length: int
    max_length: int
    dtype: str = "fp32"
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class SFTSpec:
    model: ModelSpec
    enabled: bool
    targets: str
    epochs: int
    batch_size: int
    optim: OptimConfig    # trainer.*'s with lr = sft.lr
    seed: int


@dataclass(frozen=True)
class RewardModelSpec:
    """A reward model to train (`reward_model=train`): `target` (reward_model._target_, called with the runtime
    arguments by the stage), its knobs, the optimiser (trainer.*'s with lr = reward_model.lr) and the lengths."""
    target: str
    knobs: dict
    optim: OptimConfig
    max_prompt_length: int
    max_length: int
    seed: int


@dataclass(frozen=True)
class AugmentSpec:
    target: str           # augment._target_ (hps_exp.augment.augment), called with the runtime arguments
    knobs: dict           # its settings
    generator: dict       # backend, batch_size, top_k, vllm (hps_exp.generation.build_generator)
    max_prompt_length: int
    seed: int


@dataclass(frozen=True)
class ReferenceSpec:
    max_prompt_length: int
    max_length: int


@dataclass(frozen=True)
class EvalSpec:
    protocol: str
    num_samples: int
    max_prompts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    max_prompt_length: int
    max_length: int
    seed: int
    backend: str = "hf"
    vllm: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()     # the strings that end a reply (the evaluation sets' dataset.stop)


@dataclass(frozen=True)
class PreferenceSpec:
    loss: dict            # the loss and sampler configs, recorded (the objects are built from them at start-up)
    sampler: dict
    epochs: int
    batch_size: int
    max_steps: int | None
    resample: str
    optim: OptimConfig    # trainer.*'s
    max_prompt_length: int
    max_length: int
    seed: int
    lora: dict = field(default_factory=dict)   # model.lora: adapters trained on top of the SFT policy
    bucketing: bool = False                    # trainer.bucketing: length-bucketed batches


# ---------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class SFTResult:
    path: Path
    key: str
    seconds: float
    dtype: str = "fp32"                 # how its weights load (model.dtype / attn_implementation)
    attn_implementation: str = "sdpa"

    def load(self, meta: bool = False):
        return models.load_saved(self.path, dtype=self.dtype, attn_implementation=self.attn_implementation, meta=meta)


@dataclass(frozen=True)
class Scorer:
    """A reward model (`score_batch`, maybe `is_harmful`) with a key naming it; `report` goes to metrics.json."""
    model: Any
    key: str
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AugmentResult:
    examples: Examples    # the new training set (its key is its content's fingerprint)
    stats: dict           # counts and throughput (hps_exp/augment.py)


@dataclass(frozen=True)
class RefLogps:
    logps: tuple[torch.Tensor, ...]   # one [n_i] tensor per example: log pi_ref(response | prompt)
    key: str
    seconds: float


@dataclass(frozen=True)
class MarginReward:
    """The implicit reward r the reward-margin metrics report: the loss's own (hps_exp.losses.implicit_rewards),
    "ratio" beta (log pi - log pi_ref) or "simpo" beta / |y| log pi."""
    reward: str = "ratio"
    beta: float = 1.0


@dataclass(frozen=True)
class PolicyResult:
    path: Path            # a plain HF directory (LoRA merged)
    key: str
    seconds: float
    steps: int
    sft: SFTResult | None = None   # how to load it: the SFT policy's dtype and attention
    final: dict = field(default_factory=dict)   # the last step's training metrics (divergence check)
    tokens: int = 0       # real tokens forwarded in training (batching.forwarded_tokens), resumed steps included

    def load(self):
        return models.load_saved(self.path, dtype=self.sft.dtype, attn_implementation=self.sft.attn_implementation)


@dataclass(frozen=True)
class EvalResult:
    metrics: dict
    per_prompt: dict
    samples: list
    seconds: float

