"""The preference stage: the SFT policy trained with the preference loss on the sampler's selections (negatives
drawn from the annotation or, sampler.hardness=policy_*, by the current policy). Not cached: it checkpoints into
the run dir."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hps_exp import batching, models
from hps_exp.cache import readable
from hps_exp.samplers import Selection
from hps_exp.stages.env import Env, encode, shard, weights_from_rank0
from hps_exp.stages.specs import Examples, PolicyResult, PreferenceSpec, RefLogps, SFTResult
from hps_exp.trainer import Trainer


def preference(spec: PreferenceSpec, loss_fn, sampler, sft_result: SFTResult, train: Examples, ref: RefLogps | None,
               env: Env, run_dir: Path) -> PolicyResult:
    """Train the SFT policy with the preference loss; the aligned policy is saved to run_dir/policy. Not cached:
    it checkpoints into run_dir and a rerun with the same run dir resumes. `ref` is None when the loss needs no
    reference (reward=simpo)."""
    if ref is None and loss_fn.needs_reference:
        raise ValueError(f"{loss_fn!r} needs the reference log-probs, but none were computed")
    entry = env.entry("preference", spec, sft=sft_result.key, train=train.key, reference=ref.key if ref else None)
    if env.planned_only(entry):
        return PolicyResult(Path(), entry.key, 0.0, 0, sft_result)
    tok, model = sft_result.load(meta=weights_from_rank0(env))
    models.disable_dropout(model)  # dropout would make the policy's log-probs noisy against the reference ones
    # LoRA adapters (the cached reference log-probs are the SFT policy's: the policy with adapters off).
    model = models.configure(model, {"gradient_checkpointing": env.runtime.gradient_checkpointing, "lora": spec.lora})
    torch.manual_seed(spec.seed)   # same stream whether or not SFT ran in this process (cache hit)
    items = train.items
    enc = encode(tok, items, spec.max_prompt_length, spec.max_length)
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
                part, real = shard(env, idx)
                yield PolicyDraws(part, [noise[i] for i in part], sampler.gamma_at(p), real,
                                  tuple(items[i].source for i in part))
                continue
            # Draw for the whole global micro-batch on every rank (the draws never depend on the world size),
            # then keep this rank's prompts.
            sels = {i: sampler.select(items[i], rng, p) for i in idx}
            stats = [sampler.stats(items[i], sels[i]) for i in idx]
            part, real = shard(env, idx)
            yield batching.preference_batch([items[i] for i in part], [enc[i] for i in part],
                                            [ref_logps[i] for i in part], [sels[i] for i in part], stats,
                                            tok.pad_token_id, weight=real)

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

    trainer = Trainer(model, spec.optim, env.runtime.trainer, spec.epochs, spec.max_steps, device=env.device,
                      autocast=env.autocast, logger=env.logger, stage="train",
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
    weight: int         # real prompts: the trainer's loss weight (0 for a rank's padding share)
    sources: tuple = ()


def _draw_by_policy(model, draws: PolicyDraws, items, enc, ref_logps, sampler, loss_fn, pad_id: int,
                    device) -> batching.PreferenceBatch:
    """The micro-batch of the negatives the current policy draws (`_policy_selections`)."""
    examples, encoded, refs = ([seq[i] for i in draws.indices] for seq in (items, enc, ref_logps))
    sels = _policy_selections(model, draws, examples, encoded, refs, sampler, loss_fn, pad_id, device)
    stats = [sampler.stats(e, sel) for e, sel in zip(examples, sels)]
    return batching.preference_batch(examples, encoded, refs, sels, stats, pad_id, weight=draws.weight)


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

