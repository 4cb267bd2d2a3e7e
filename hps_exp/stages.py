"""The stages of a run, each a unit: a small frozen spec (the only config it reads), typed inputs (the results of
the stages before it) and a typed result.

    data -> sft -> reward_model -> augment -> reference -> preference -> evaluate

Cached stages (sft, reward_model=train, augment, reference, the SFT policy's evaluation) derive their key with
`cache.stage_entry` from exactly what their build function can see: the spec, the keys of the upstream results
(an `Examples` key is a fingerprint of the data's content) and `Env.numeric()` (device type, precision). A build
function is a closure over those arguments alone and never sees the Hydra config, so it cannot read a setting
its key does not cover. Settings that cannot change a result (logging, checkpoint cadence, the distributed
strategy) travel in `Env.runtime` and are not keyed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hps_exp import batching, evaluate, models
from hps_exp.augment import augment
from hps_exp.batching import Encoded, SequenceBatch
from hps_exp.cache import Entry, cached, content_key, readable, stage_entry
from hps_exp.config import TrainerConfig
from hps_exp.data.schema import Example, atomic_write_text, read_examples, write_examples
from hps_exp.generation import build_generator
from hps_exp.losses import implicit_rewards
from hps_exp.reward_models import TrainedRewardModel, pair_accuracy, train_reward_model
from hps_exp.samplers import Selection
from hps_exp.trainer import Trainer, compute_numerics

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


@dataclass(frozen=True)
class Runtime:
    """Trainer settings that never change a result (so they are not part of any key)."""
    log_every: int = 10
    save_every: int = 0
    resume: bool = True
    strategy: str = "none"
    activation_checkpointing: bool = False
    dist_timeout_s: int = 1800
    on_nonfinite: str = "error"
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

    def numeric(self) -> dict:
        """The numeric settings that change a stage's output: the device type and what it computes in (bf16 autocast
        and fsdp2's bf16 parameters give different numbers, so a cache entry of one is not reused by the other)."""
        distributed = self.world is not None and self.world.distributed
        return {"device": self.device.type, "autocast": str(self.autocast),
                "compute": compute_numerics(self.runtime.strategy, distributed, self.autocast)}

    def entry(self, name: str, spec, **inputs: str) -> Entry:
        """The stage's cache entry, keyed by its spec, the keys of its inputs and the numeric settings."""
        return stage_entry(name, spec, inputs, self.numeric())

    def plan(self, entry: Entry, cached: bool = True) -> None:
        exists = cached and entry.path(self.cache_dir).exists()
        self.planned.append((entry.name, entry.key, "hit" if exists else "run" if not cached else "miss"))


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
class OptimSpec:
    grad_accum: int
    warmup_ratio: float
    schedule: str
    weight_decay: float
    max_grad_norm: float


@dataclass(frozen=True)
class SFTSpec:
    model: ModelSpec
    enabled: bool
    targets: str
    epochs: int
    lr: float
    batch_size: int
    optim: OptimSpec
    seed: int


@dataclass(frozen=True)
class RewardModelSpec:
    """The annotation reward model to train (`reward_model=train`): its knobs and the encoding lengths."""
    knobs: dict
    max_prompt_length: int
    max_length: int
    seed: int


@dataclass(frozen=True)
class AugmentSpec:
    knobs: dict           # hps_exp.augment.augment's settings
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
    lr: float
    epochs: int
    batch_size: int
    max_steps: int | None
    resample: str
    optim: OptimSpec
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


def _trainer_config(runtime: Runtime, optim: OptimSpec, *, lr: float, epochs: int,
                    max_steps: int | None) -> TrainerConfig:
    trainer_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    run_only = {k: v for k, v in dataclasses.asdict(runtime).items() if k in trainer_fields}
    return TrainerConfig(lr=lr, epochs=epochs, max_steps=max_steps, **dataclasses.asdict(optim), **run_only)


def _encode(tok, examples, max_prompt_length: int, max_length: int) -> list[Encoded]:
    return batching.encode_examples(tok, list(examples), max_prompt_length, max_length)


def _drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _checkpoint(env: Env, entry: Entry) -> Path:
    """Where a cached training stage keeps its resume checkpoint: keyed like the entry, outside it."""
    path = entry.path(env.cache_dir)
    return path.with_name(f".{path.name}.checkpoint")


# ---------------------------------------------------------------------------------------------- SFT

def sft(spec: SFTSpec, train: Examples, env: Env) -> SFTResult:
    """The SFT policy (and its tokenizer): built or loaded from spec.model, fine-tuned on the training responses.
    Checkpoints like the preference stage (trainer.save_every / resume); a killed SFT resumes where it stopped."""
    entry = env.entry("sft", spec, train=train.key)
    load = {"dtype": spec.model.dtype, "attn_implementation": spec.model.attn_implementation}
    if env.dry_run:
        env.plan(entry)
        return SFTResult(Path(), entry.key, 0.0, **load)

    def build(out: Path) -> None:
        meta = spec.enabled and _weights_from_rank0(env)
        if spec.model.name_or_path:
            tok, model = models.load_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code,
                                                meta=meta, **load)
        else:
            texts = [e.prompt + r for e in train.items for r in e.responses]
            tok = models.train_tokenizer(texts, spec.model.vocab_size)
            model = models.build_tiny(spec.model, len(tok), spec.seed, meta=meta)
        if spec.enabled:
            torch.manual_seed(spec.seed)
            trainer = _train_sft(spec, train.items, model, tok, env, _checkpoint(env, entry), entry)
            trained_s[0] = trainer.seconds_before   # the steps done before a resume, by an earlier process
            trainer.save_pretrained(tok, out / "model")
        elif _is_main(env):
            models.save(model, tok, out / "model")

    started, trained_s = time.perf_counter(), [0.0]
    path, _ = cached(env.cache_dir, entry, build, env.world, all_ranks=spec.enabled)
    if _is_main(env):
        _drop(_checkpoint(env, entry))
    return SFTResult(path / "model", entry.key, time.perf_counter() - started + trained_s[0], **load)


def _is_main(env: Env) -> bool:
    return env.world is None or env.world.is_main


def _fsdp2_world(env: Env) -> bool:
    return env.runtime.strategy == "fsdp2" and env.world is not None and env.world.distributed


def _weights_from_rank0(env: Env) -> bool:
    """True on the ranks other than 0 of an fsdp2 world: they build the model to train on the meta device and get
    their shards of rank 0's weights (trainer.shard_from_rank0), so only rank 0 ever reads or holds the whole model
    (in host memory)."""
    return _fsdp2_world(env) and not _is_main(env)


def _gathered_for_scoring(model, env: Env):
    """The reference model under fsdp2: sharded from rank 0's weights (only rank 0 reads them, into host memory),
    then gathered once on every rank in the compute dtype (bf16 parameters on CUDA: half of fp32) and kept gathered,
    so each rank scores its own share of the prompts with no further collective (ranks run different numbers of
    forwards). Without gradients nothing else is held."""
    from torch.distributed.fsdp import FSDPModule

    from hps_exp.trainer import shard_from_rank0

    model = shard_from_rank0(model, env.world, env.autocast)
    model.set_reshard_after_forward(False, recurse=True)
    for m in model.modules():   # every rank, the same order: one all-gather per block, then the root
        if isinstance(m, FSDPModule):
            m.unshard()
    return model


def _shard(env: Env, idx) -> tuple[list, int]:
    """This rank's part of a global micro-batch (and how many of it are real, see World.shard_padded)."""
    idx = list(idx)
    return (idx, len(idx)) if env.world is None else env.world.shard_padded(idx)


@dataclass
class SFTBatch:
    sequences: SequenceBatch
    num_prompts: int    # response tokens: the trainer weights micro-batches by it, so the loss is a token mean


def _train_sft(spec: SFTSpec, train, model, tok, env: Env, checkpoint: Path, entry: Entry) -> Trainer:
    encoded = _encode(tok, train, spec.model.max_prompt_length, spec.model.max_length)
    if spec.targets == "best":
        pairs = [(enc.prompt, enc.responses[ex.best]) for ex, enc in zip(train, encoded)]
    else:
        pairs = [(enc.prompt, r) for enc in encoded for r in enc.responses]
    bs = spec.batch_size

    def make_epoch(epoch: int, progress):
        order = np.random.default_rng([spec.seed, 1, epoch]).permutation(len(pairs))
        for start in range(0, len(order), bs):
            part, real = _shard(env, order[start:start + bs])
            batch = batching.collate([pairs[i] for i in part], tok.pad_token_id)
            yield SFTBatch(batch, int(batch.response_mask[:real, 1:].sum()) if real else 0)

    def step(model, batch: SFTBatch):
        return batching.sequence_nll(model, batch.sequences.to(env.device)), {}

    tcfg = _trainer_config(env.runtime, spec.optim, lr=spec.lr, epochs=spec.epochs, max_steps=None)
    trainer = Trainer(model, tcfg, device=env.device, autocast=env.autocast, logger=env.logger, stage="sft",
                      checkpoint=checkpoint, world=env.world, key=entry.key, record=readable(entry))
    trainer.fit(make_epoch, -(-len(pairs) // bs), step)
    if env.logger is not None:
        env.logger.next_stage()
    return trainer


# ---------------------------------------------------------------------------------------------- reward models

def trained_reward_model(spec: RewardModelSpec, train: Examples, heldout: Examples, sft_result: SFTResult,
                         env: Env, name: str = "reward_model") -> Scorer:
    """A Bradley-Terry reward model trained on the training pairs (of `subset`): the tiny net with the SFT
    tokenizer, or a pretrained backbone with its own (then the SFT policy is not an input). Its held-out pair
    accuracy is measured on `heldout` each run (cheap), so a new test split does not retrain it. `name`:
    "reward_model" (the annotator) or "eval_reward_model" (eval.reward_model=trained)."""
    backbone = spec.knobs.get("backbone")
    entry = env.entry(name, spec, train=train.key, **({} if backbone else {"tokenizer": sft_result.key}))
    if env.dry_run:
        env.plan(entry)
        return Scorer(None, entry.key)

    def build(out: Path) -> None:
        tok = None if backbone else sft_result.load()[0]
        rm = train_reward_model(list(train.items), tok=tok, max_prompt_length=spec.max_prompt_length,
                                max_length=spec.max_length, seed=spec.seed, device=env.device,
                                autocast=env.autocast, logger=env.logger, checkpoint=_checkpoint(env, entry),
                                save_every=env.runtime.save_every, stage=name, **spec.knobs)
        rm.save(out)
        atomic_write_text(out / "train.json", json.dumps({"pairs": rm.train_result["pairs"]}))

    path, _ = cached(env.cache_dir, entry, build, env.world)
    _drop(_checkpoint(env, entry))
    rm = TrainedRewardModel.load(path, device=env.device, autocast=env.autocast)
    report = {**json.loads((path / "train.json").read_text()),
              "heldout_pair_accuracy": pair_accuracy(rm, list(heldout.items)),
              "backbone": backbone or "tiny (from scratch)", "subset": spec.knobs.get("subset", "all")}
    print(f"[{name}] held-out pair accuracy {report['heldout_pair_accuracy']:.3f}")
    return Scorer(rm, entry.key, report)


# ---------------------------------------------------------------------------------------------- augmentation

def augmented(spec: AugmentSpec, train: Examples, sft_result: SFTResult, annotator: Scorer, env: Env) -> AugmentResult:
    """n samples per training prompt from the SFT policy, scored by the annotation reward model (+ the originals)."""
    entry = env.entry("augment", spec, train=train.key, generator=sft_result.key, annotator=annotator.key)
    if env.dry_run:  # the augmented content is unknown until built; its stage key stands in for it
        env.plan(entry)
        return AugmentResult(Examples(train.items, entry.key), {})

    def build(out: Path) -> None:
        tok, model = sft_result.load()
        model.to(env.device)
        g = spec.generator
        generator = build_generator(g["backend"], model=model, tok=tok, model_dir=sft_result.path, device=env.device,
                                    max_prompt_length=spec.max_prompt_length, batch_size=g["batch_size"],
                                    top_k=g["top_k"], autocast=env.autocast,
                                    **({**g["vllm"], "seed": spec.seed} if g["backend"] == "vllm" else {}))
        stats: dict = {}
        examples = augment(list(train.items), generator=generator, reward_model=annotator.model, seed=spec.seed,
                           placeholder=tok.eos_token, progress=True, stats=stats, **spec.knobs)
        write_examples(out / "train.jsonl", examples)
        atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))

    path, _ = cached(env.cache_dir, entry, build, env.world)
    out = Examples.of(read_examples(path / "train.jsonl"))
    print(f"[augment] {len(out)} prompts, {sum(e.n for e in out.items) / max(1, len(out)):.1f} scored responses "
          f"per prompt")
    return AugmentResult(out, json.loads((path / "stats.json").read_text()))


# ---------------------------------------------------------------------------------------------- reference

def reference(spec: ReferenceSpec, sft_result: SFTResult, examples: Examples, env: Env) -> RefLogps:
    """log pi_ref(response | prompt) of every response (pi_ref = the SFT policy), computed once per data set.
    Under several processes each computes its share of the prompts and the main process merges and writes."""
    entry = env.entry("reference", spec, sft=sft_result.key, examples=examples.key)
    if env.dry_run:
        env.plan(entry)
        return RefLogps((), entry.key, 0.0)
    started = time.perf_counter()
    world = env.world
    parts = None
    if world is not None and world.distributed and not world.broadcast_object(entry.path(env.cache_dir).exists()):
        mine = world.shard(list(range(len(examples))))
        parts = world.gather_object((mine, _ref_logps(spec, sft_result, [examples.items[i] for i in mine], env,
                                                      sharded=_fsdp2_world(env))))

    def build(out: Path) -> None:
        if parts is None:
            logps = _ref_logps(spec, sft_result, examples.items, env)
        else:   # merge the ranks' shares back into data order
            logps = [None] * len(examples)
            for idx, values in parts:
                for i, v in zip(idx, values):
                    logps[i] = v
        torch.save(logps, out / "ref_logps.pt")

    path, _ = cached(env.cache_dir, entry, build, world)
    logps = torch.load(path / "ref_logps.pt", weights_only=True)
    return RefLogps(tuple(logps), entry.key, time.perf_counter() - started)


def _ref_logps(spec: ReferenceSpec, sft_result: SFTResult, items, env: Env, sharded: bool = False
               ) -> list[torch.Tensor]:
    """`sharded` (fsdp2, every rank calls it): the model gathered from rank 0's shards (_gathered_for_scoring)."""
    if sharded:
        tok, model = sft_result.load(meta=not _is_main(env))
        model = _gathered_for_scoring(model, env)
    else:
        tok, model = sft_result.load()
        model.to(env.device)
    enc = _encode(tok, items, spec.max_prompt_length, spec.max_length)
    return batching.all_response_logps(model, enc, tok.pad_token_id, env.runtime.score_batch_size, env.device,
                                       env.autocast)


# ---------------------------------------------------------------------------------------------- preference

def preference(spec: PreferenceSpec, loss_fn, sampler, sft_result: SFTResult, train: Examples, ref: RefLogps | None,
               env: Env, run_dir: Path) -> PolicyResult:
    """Train the SFT policy with the preference loss; the aligned policy is saved to run_dir/policy. Not cached:
    it checkpoints into run_dir and a rerun with the same run dir resumes. `ref` is None when the loss needs no
    reference (reward=simpo)."""
    if ref is None and loss_fn.needs_reference:
        raise ValueError(f"{loss_fn!r} needs the reference log-probs, but none were computed")
    entry = env.entry("preference", spec, sft=sft_result.key, train=train.key, reference=ref.key if ref else None)
    if env.dry_run:
        env.plan(entry, cached=False)
        return PolicyResult(Path(), entry.key, 0.0, 0, sft_result)
    tok, model = sft_result.load(meta=_weights_from_rank0(env))
    models.disable_dropout(model)  # dropout would make the policy's log-probs noisy against the reference ones
    # LoRA adapters (the cached reference log-probs are the SFT policy's: the policy with adapters off).
    model = models.configure(model, {"gradient_checkpointing": env.runtime.gradient_checkpointing, "lora": spec.lora})
    torch.manual_seed(spec.seed)   # same stream whether or not SFT ran in this process (cache hit)
    items = train.items
    enc = _encode(tok, items, spec.max_prompt_length, spec.max_length)
    # Without a reference the batches carry zeros in its place; the loss's rewards do not read them.
    ref_logps = ref.logps if ref is not None else [torch.zeros(e.n) for e in items]
    bs = spec.batch_size
    # Optional length bucketing (seeded, so resume re-creates the same batches): less padding per step, but
    # batches of similar lengths (measured: 1.03-1.06x tokens/s here; docs/benchmarks.md), so off by default.
    lengths = batching.preference_lengths(enc, all_responses=getattr(sampler, "kind", None) == "ranking")

    def batches(rng):
        if spec.bucketing:
            return batching.bucketed_batches(lengths, bs, rng)
        order = rng.permutation(len(items))
        return [order[i:i + bs] for i in range(0, len(order), bs)]

    def make_epoch(epoch: int, progress):
        rng = np.random.default_rng([spec.seed, 2, epoch])  # fresh draws every epoch, reproducible
        epoch_progress = progress()
        for idx in batches(rng):
            p = progress() if spec.resample == "step" else epoch_progress
            if getattr(sampler, "needs_policy", False):
                # The policy's values exist only in the step: the noise is drawn here (the same generator and
                # order as an annotation draw, for the global micro-batch), the negatives there.
                noise = {i: sampler.noise(items[i], rng) for i in idx}
                part, real = _shard(env, idx)
                yield PolicyDraws(part, [noise[i] for i in part], sampler.gamma_at(p), real,
                                  tuple(items[i].source for i in part))
                continue
            # Draw for the whole global micro-batch on every rank (the draws never depend on the world size),
            # then keep this rank's prompts.
            sels = {i: sampler.select(items[i], rng, p) for i in idx}
            stats = [sampler.stats(items[i], sels[i]) for i in idx]
            part, real = _shard(env, idx)
            yield batching.preference_batch([items[i] for i in part], [enc[i] for i in part],
                                            [ref_logps[i] for i in part], [sels[i] for i in part], stats,
                                            tok.pad_token_id, num_prompts=real)

    def step(model, batch: batching.PreferenceBatch | PolicyDraws):
        if isinstance(batch, PolicyDraws):
            batch = _draw_by_policy(model, batch, items, enc, ref_logps, sampler, loss_fn, tok.pad_token_id, env.device)
        dev = env.device
        mask = batch.mask.to(dev)
        policy = batching.preference_logps(model, batch)
        finite = bool(torch.isfinite(policy[mask]).all())
        # A diverged policy's log-probs overflow: the loss would refuse them; give the trainer a NaN loss instead
        # (still connected to the graph) so that its non-finite guard decides (error names the rows, skip skips).
        inputs = policy if finite else torch.nan_to_num(policy.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        out = loss_fn(inputs, batch.ref_logps.to(dev), mask, batch.scores.to(dev), batch.num_negatives.to(dev),
                      lengths=_slot_lengths(batch).to(dev))
        metrics = {k: float(v) for k, v in out.metrics.items()}
        loss = out.losses.mean() if finite else (policy[mask] * float("nan")).sum()
        return loss, {**metrics, **batch.stats, "tokens": batching.forwarded_tokens(model, batch)}

    tcfg = _trainer_config(env.runtime, spec.optim, lr=spec.lr, epochs=spec.epochs, max_steps=spec.max_steps)
    trainer = Trainer(model, tcfg, device=env.device, autocast=env.autocast, logger=env.logger, stage="train",
                      checkpoint=run_dir / "checkpoints" / "preference", world=env.world, key=entry.key,
                      record=readable(entry))
    result = trainer.fit(make_epoch, -(-len(items) // bs), step)
    _check_finite_weights(model, env, result)
    lora_adapter = models.is_lora(model) and env.runtime.lora_save == "adapter"
    if lora_adapter:   # the small adapter for sharing; evaluation reads the merged policy below
        trainer.save_pretrained(tok, run_dir / "policy_adapter", lora_save="adapter")
    trainer.save_pretrained(tok, run_dir / "policy", lora_save="merged")
    return PolicyResult(run_dir / "policy", entry.key, result["seconds"], int(result["steps"]), sft_result,
                        final=dict(result), tokens=int(result["tokens"]))


@dataclass
class PolicyDraws:
    """A micro-batch whose negatives the current policy picks (sampler.hardness=policy_*): this rank's prompts,
    each one's Gumbel noise (drawn for the global micro-batch: the same whatever the world size) and the step's γ."""
    indices: list[int]
    noise: list
    gamma: float
    num_prompts: int    # real prompts (the trainer's loss weight)
    sources: tuple = ()


def _draw_by_policy(model, draws: PolicyDraws, items, enc, ref_logps, sampler, loss_fn, pad_id: int,
                    device) -> batching.PreferenceBatch:
    """The micro-batch of the negatives the current policy draws (`_policy_selections`)."""
    examples, encoded, refs = ([seq[i] for i in draws.indices] for seq in (items, enc, ref_logps))
    sels = _policy_selections(model, draws, examples, encoded, refs, sampler, loss_fn, pad_id, device)
    stats = [sampler.stats(e, sel) for e, sel in zip(examples, sels)]
    return batching.preference_batch(examples, encoded, refs, sels, stats, pad_id, num_prompts=draws.num_prompts)


def _policy_selections(model, draws: PolicyDraws, examples, encoded, refs, sampler, loss_fn, pad_id: int,
                       device) -> list[Selection]:
    """Score every response of these prompts with the current policy (one forward, no gradient: the hardness is
    data, not a parameter), then draw each prompt's negatives ∝ exp(γ · value) with its own noise.
    value = the loss's reward r_i (hardness=policy_reward) or log pi(y_i|x) (policy_logp)."""
    every = [Selection(tuple(range(e.n)), e.num_negatives) for e in examples]   # slot m = response m
    scoring = batching.preference_batch(examples, encoded, refs, every, [], pad_id)
    with torch.no_grad():
        values = batching.preference_logps(model, scoring)
        if sampler.hardness == "policy_reward":
            values = loss_fn.rewards(values, scoring.ref_logps.to(device), _slot_lengths(scoring).to(device))
    values = values.double().cpu().numpy()
    return [sampler.select_by(e, values[b, :e.n], noise, draws.gamma)
            for b, (e, noise) in enumerate(zip(examples, draws.noise))]


def _slot_lengths(batch: batching.PreferenceBatch) -> torch.Tensor:
    """[B, M] each slot's response token count |y| (0 on padding): the rows are row-major over the mask."""
    counts = batch.sequences.response_mask.sum(1).to(torch.float32)
    return torch.zeros(batch.mask.shape).masked_scatter(batch.mask, counts)


def _check_finite_weights(model, env: Env, result: dict) -> None:
    """A policy whose weights overflowed (every later step skipped under on_nonfinite=skip) cannot be evaluated:
    stop with one line instead of a sampling error deep in generation."""
    from hps_exp.trainer import NonFiniteError

    bad = sum(int(not torch.isfinite(getattr(p, "to_local", lambda p=p: p)()).all()) for p in model.parameters())
    if env.world is not None:
        bad = int(env.world.all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64))[0])
    skipped = int(result.get("nonfinite_skipped", 0))
    if bad:
        raise NonFiniteError(f"[train] the trained policy has non-finite weights ({bad} tensor(s); {skipped} "
                             f"step(s) skipped): training diverged; lower trainer.lr")
    if not math.isfinite(result.get("loss", 0.0)):   # the final policy gives non-finite log-probs on its data
        raise NonFiniteError(f"[train] the last training step's loss is non-finite ({skipped} step(s) skipped): "
                             f"training diverged and the policy cannot be evaluated; lower trainer.lr")


# ---------------------------------------------------------------------------------------------- evaluation

def _margin_rewards(margin: MarginReward, policy_logps, ref: RefLogps | None, enc) -> list[torch.Tensor]:
    """Each example's r [n_i] under the loss's reward (enc: the token counts, read by simpo only)."""
    out = []
    for i, pol in enumerate(policy_logps):
        lengths = torch.tensor([float(len(r)) for r in enc[i].responses]) if enc is not None else None
        out.append(implicit_rewards(pol, ref.logps[i] if ref else None, lengths, reward=margin.reward,
                                    beta=margin.beta))
    return out


def evaluate_sft(spec: EvalSpec, sft_result: SFTResult, eval_set: EvalSet, ref: RefLogps | None,
                 scorer: Scorer | None, env: Env, margin: MarginReward = MarginReward()) -> EvalResult:
    """The SFT policy's evaluation, cached: a sweep over losses evaluates the reference policy once per eval set.
    Under ratio rewards the SFT policy is the reference, so its policy log-probs are the reference ones (margins
    exactly 0, whatever beta); under reference-free (simpo) rewards its margins are its own, keyed by reward and
    beta."""
    own = None if margin.reward == "ratio" else f"{margin.reward}:beta={margin.beta!r}"
    entry = env.entry("sft_eval", spec, sft=sft_result.key, examples=eval_set.examples.key,
                      reference=ref.key if ref else None, scorer=scorer.key if scorer else None, margin=own)
    if env.dry_run:
        env.plan(entry)
        return EvalResult({}, {}, [], 0.0)

    def build(out: Path) -> None:
        tok, model = sft_result.load()
        model.to(env.device)
        result = _evaluate(spec, model, tok, eval_set, ref, ref.logps if ref else None, scorer, env, margin,
                           model_dir=sft_result.path)
        atomic_write_text(out / "eval.json", json.dumps({"metrics": result.metrics, "per_prompt": result.per_prompt,
                                                         "samples": result.samples, "seconds": result.seconds}))

    path, _ = cached(env.cache_dir, entry, build, env.world)
    d = json.loads((path / "eval.json").read_text())
    return EvalResult(d["metrics"], d["per_prompt"], d["samples"], d["seconds"])


def evaluate_policy(spec: EvalSpec, policy: PolicyResult, eval_set: EvalSet, ref: RefLogps | None,
                    scorer: Scorer | None, env: Env, margin: MarginReward) -> EvalResult:
    if env.dry_run:
        env.plan(env.entry("eval", spec, policy=policy.key, examples=eval_set.examples.key,
                           scorer=scorer.key if scorer else None), cached=False)
        return EvalResult({}, {}, [], 0.0)
    tok, model = policy.load()
    model.to(env.device)
    return _evaluate(spec, model, tok, eval_set, ref, None, scorer, env, margin, model_dir=policy.path)


def _evaluate(spec: EvalSpec, model, tok, eval_set: EvalSet, ref: RefLogps | None, policy_logps,
              scorer: Scorer | None, env: Env, margin: MarginReward, model_dir: Path | None = None) -> EvalResult:
    started = time.perf_counter()
    examples = list(eval_set.examples.items)
    enc = None
    if policy_logps is None or margin.reward != "ratio":
        enc = _encode(tok, examples, spec.max_prompt_length, spec.max_length)
    if policy_logps is None:
        policy_logps = batching.all_response_logps(model, enc, tok.pad_token_id, spec.batch_size, env.device,
                                                   env.autocast)
    if spec.backend == "vllm":
        # vLLM sets up its own torch.distributed world. Evaluation runs on rank 0 alone (the other ranks have left
        # theirs after training): leave ours first. Local, no collective; a no-op in one process.
        from hps_exp import distributed

        distributed.shutdown()
    # The margins use the loss's own r, passed as "policy log-probs" against a zero reference at beta 1 (exact).
    rewards = _margin_rewards(margin, policy_logps, ref, enc)
    generator = build_generator(spec.backend, model=model, tok=tok, model_dir=model_dir, device=env.device,
                                max_prompt_length=spec.max_prompt_length, batch_size=spec.batch_size,
                                autocast=env.autocast, **({**spec.vllm, "seed": spec.seed} if spec.backend == "vllm"
                                                          else {}))
    metrics, per_prompt, samples = evaluate.evaluate_policy(
        generator, examples, policy_logps=rewards, ref_logps=[torch.zeros_like(r) for r in rewards],
        reward_model=scorer.model if scorer else None, beta=1.0, protocol=spec.protocol,
        num_samples=spec.num_samples, max_prompts=spec.max_prompts, max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed, stop=spec.stop)
    return EvalResult(metrics, per_prompt, samples, time.perf_counter() - started)
