"""What every stage runs in: the `Env` (device, precision, cache, logger, the process world, the unkeyed runtime
settings) and the cached-stage protocol, written once (`Env.cached_stage`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from hps_exp import batching
from hps_exp.batching import Encoded
from hps_exp.cache import Entry, cached, stage_entry
from hps_exp.config import RuntimeConfig
from hps_exp.strategies import compute_numerics

T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """Settings that never change a result (so they are not part of any key)."""
    trainer: RuntimeConfig = field(default_factory=RuntimeConfig)   # trainer.*'s runtime part, as it is
    # Sequences per scoring forward (reference log-probs): changes a result only by float rounding.
    score_batch_size: int = 32
    gradient_checkpointing: bool = False   # recompute activations in backward: same result, less memory
    lora_save: str = "merged"              # how a LoRA policy is saved beside the merged one (docs/scaling.md)


@dataclass(frozen=True)
class Env:
    device: torch.device
    autocast: torch.dtype | None
    cache_dir: Path
    logger: Any = None
    runtime: Runtime = field(default_factory=Runtime)
    world: Any = None
    dry_run: bool = False       # compute every stage's key, build nothing (`python -m hps_exp dry_run=true`)
    planned: list = field(default_factory=list)   # (stage, key, cached already?) in call order, when dry_run
    # What a real run used, in call order: {stage, key, status (hit | built | run: uncached), cache dir}. The planned
    # keys downstream of augmentation stand in for its unknown content; these are the keys the run actually used
    # (metrics.json "stages": where to find each stage's output).
    used: list = field(default_factory=list)

    def numeric(self) -> dict:
        """The numeric settings that change a stage's output: the device type and what it computes in (bf16 autocast
        and fsdp2's bf16 parameters give different numbers, so a cache entry of one is not reused by the other)."""
        distributed = self.world is not None and self.world.distributed
        return {"device": self.device.type, "autocast": str(self.autocast),
                "compute": compute_numerics(self.runtime.trainer.strategy, distributed, self.autocast)}

    def entry(self, name: str, spec, **inputs: str | None) -> Entry:
        """The stage's cache entry, keyed by its spec, the keys of its inputs and the numeric settings."""
        return stage_entry(name, spec, inputs, self.numeric())

    def plan(self, entry: Entry, cached: bool = True) -> None:
        exists = cached and entry.path(self.cache_dir).exists()
        self.planned.append((entry.name, entry.key, "hit" if exists else "run" if not cached else "miss"))

    def cached_stage(self, entry: Entry, build: Callable[[Path], None], load: Callable[[Path], T],
                     stub: Callable[[], T], all_ranks: bool = False) -> T:
        """A cached stage: in a dry run its entry is recorded and `stub()` stands in for the result (nothing is
        built or read); otherwise `build(dir)` fills the entry unless it is cached already (cache.cached; with
        `all_ranks` every process builds, see there) and `load(dir)` reads the result from it."""
        if self.dry_run:
            self.plan(entry)
            return stub()
        path, hit = cached(self.cache_dir, entry, build, self.world, all_ranks=all_ranks)
        self.used.append({"stage": entry.name, "key": entry.key, "status": "hit" if hit else "built",
                          "dir": str(path)})
        return load(path)

    def planned_only(self, entry: Entry) -> bool:
        """An uncached stage (preference, the policy's evaluation): True in a dry run, which records its key."""
        if self.dry_run:
            self.plan(entry, cached=False)
        else:
            self.used.append({"stage": entry.name, "key": entry.key, "status": "run", "dir": None})
        return self.dry_run


def encode(tok, examples, max_prompt_length: int, max_length: int) -> list[Encoded]:
    return batching.encode_examples(tok, list(examples), max_prompt_length, max_length)


def checkpoint_path(env: Env, entry: Entry) -> Path:
    """Where a cached training stage keeps its resume checkpoint: keyed like the entry, outside it."""
    path = entry.path(env.cache_dir)
    return path.with_name(f".{path.name}.checkpoint")


def is_main(env: Env) -> bool:
    return env.world is None or env.world.is_main


def fsdp2_world(env: Env) -> bool:
    return env.runtime.trainer.strategy == "fsdp2" and env.world is not None and env.world.distributed


def weights_from_rank0(env: Env) -> bool:
    """True on the ranks other than 0 of an fsdp2 world: they build the model to train on the meta device and get
    their shards of rank 0's weights (strategies.shard_from_rank0), so only rank 0 ever reads or holds the whole model
    (in host memory)."""
    return fsdp2_world(env) and not is_main(env)


def shard(env: Env, idx) -> tuple[list, int]:
    """This rank's part of a global micro-batch (and how many of it are real, see World.shard_padded)."""
    idx = list(idx)
    return (idx, len(idx)) if env.world is None else env.world.shard_padded(idx)
