"""The SFT policy and the reference log-probs it gives (pi_ref = the SFT policy)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hps_exp import batching, models
from hps_exp.batching import SequenceBatch
from hps_exp.cache import Entry, readable
from hps_exp.io import remove
from hps_exp.stages.env import Env, checkpoint_path, encode, fsdp2_world, is_main, shard, weights_from_rank0
from hps_exp.stages.specs import Examples, ReferenceSpec, RefLogps, SFTResult, SFTSpec
from hps_exp.trainer import Trainer

# ---------------------------------------------------------------------------------------------- SFT


def sft(spec: SFTSpec, train: Examples, env: Env) -> SFTResult:
    """The SFT policy (and its tokenizer): built or loaded from spec.model, fine-tuned on the training responses.
    Checkpoints like the preference stage (trainer.save_every / resume); a killed SFT resumes where it stopped."""
    entry = env.entry("sft", spec, train=train.key)
    load = {"dtype": spec.model.dtype, "attn_implementation": spec.model.attn_implementation}

    def build(out: Path) -> None:
        meta = spec.enabled and weights_from_rank0(env)
        if spec.model.name_or_path:
            tok, model = models.load_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code,
                                                meta=meta, **load)
        else:
            texts = [e.prompt + r for e in train.items for r in e.responses]
            tok = models.train_tokenizer(texts, spec.model.vocab_size)
            model = models.build_tiny(spec.model, len(tok), spec.seed, meta=meta)
        if spec.enabled:
            torch.manual_seed(spec.seed)
            trainer = _train_sft(spec, train.items, model, tok, env, checkpoint_path(env, entry), entry)
            trained_s[0] = trainer.seconds_before   # the steps done before a resume, by an earlier process
            trainer.save_pretrained(tok, out / "model")
        elif is_main(env):
            models.save(model, tok, out / "model")

    def read(path: Path) -> SFTResult:
        if is_main(env):
            remove(checkpoint_path(env, entry), ignore_errors=True)
        return SFTResult(path / "model", entry.key, time.perf_counter() - started + trained_s[0], **load)

    started, trained_s = time.perf_counter(), [0.0]
    return env.cached_stage(entry, build, read, lambda: SFTResult(Path(), entry.key, 0.0, **load),
                            all_ranks=spec.enabled)


@dataclass
class SFTBatch:
    sequences: SequenceBatch
    weight: int         # response tokens: the trainer weights micro-batches by it, so the loss is a token mean


def _train_sft(spec: SFTSpec, train, model, tok, env: Env, checkpoint: Path, entry: Entry) -> Trainer:
    encoded = encode(tok, train, spec.model.max_prompt_length, spec.model.max_length)
    if spec.targets == "best":
        pairs = [(enc.prompt, enc.responses[ex.best]) for ex, enc in zip(train, encoded)]
    else:
        pairs = [(enc.prompt, r) for enc in encoded for r in enc.responses]
    bs = spec.batch_size

    def make_epoch(epoch: int, progress):
        order = np.random.default_rng([spec.seed, 1, epoch]).permutation(len(pairs))
        for start in range(0, len(order), bs):
            part, real = shard(env, order[start:start + bs])
            batch = batching.collate([pairs[i] for i in part], tok.pad_token_id)
            yield SFTBatch(batch, int(batch.response_mask[:real, 1:].sum()) if real else 0)

    def step(model, batch: SFTBatch):
        return batching.sequence_nll(model, batch.sequences.to(env.device)), {}

    trainer = Trainer(model, spec.optim, env.runtime.trainer, spec.epochs, device=env.device, autocast=env.autocast,
                      logger=env.logger, stage="sft", checkpoint=checkpoint, world=env.world, key=entry.key,
                      record=readable(entry))
    trainer.fit(make_epoch, -(-len(pairs) // bs), step)
    if env.logger is not None:
        env.logger.next_stage()
    return trainer



# ---------------------------------------------------------------------------------------------- reference


def reference(spec: ReferenceSpec, sft_result: SFTResult, examples: Examples, env: Env) -> RefLogps:
    """log pi_ref(response | prompt) of every response (pi_ref = the SFT policy), computed once per data set.
    Under several processes each computes its share of the prompts and the main process merges and writes."""
    entry = env.entry("reference", spec, sft=sft_result.key, examples=examples.key)
    started = time.perf_counter()
    world = env.world
    parts = None   # every rank's share, computed (by every rank: collectives) before the main process builds
    if (not env.dry_run and world is not None and world.distributed
            and not world.broadcast_object(entry.path(env.cache_dir).exists())):
        mine = world.shard(list(range(len(examples))))
        parts = world.gather_object((mine, _ref_logps(spec, sft_result, [examples.items[i] for i in mine], env,
                                                      sharded=fsdp2_world(env))))

    def build(out: Path) -> None:
        if parts is None:
            logps = _ref_logps(spec, sft_result, examples.items, env)
        else:   # merge the ranks' shares back into data order
            logps = [None] * len(examples)
            for idx, values in parts:
                for i, v in zip(idx, values):
                    logps[i] = v
        torch.save(logps, out / "ref_logps.pt")

    def read(path: Path) -> RefLogps:
        logps = torch.load(path / "ref_logps.pt", weights_only=True)
        return RefLogps(tuple(logps), entry.key, time.perf_counter() - started)

    return env.cached_stage(entry, build, read, lambda: RefLogps((), entry.key, 0.0))


def _ref_logps(spec: ReferenceSpec, sft_result: SFTResult, items, env: Env, sharded: bool = False
               ) -> list[torch.Tensor]:
    """`sharded` (fsdp2, every rank calls it): the model gathered from rank 0's shards (_gathered_for_scoring)."""
    if sharded:
        tok, model = sft_result.load(meta=not is_main(env))
        model = _gathered_for_scoring(model, env)
    else:
        tok, model = sft_result.load()
        model.to(env.device)
    enc = encode(tok, items, spec.max_prompt_length, spec.max_length)
    return batching.all_response_logps(model, enc, tok.pad_token_id, env.runtime.score_batch_size, env.device,
                                       env.autocast)



def _gathered_for_scoring(model, env: Env):
    """The reference model under fsdp2: sharded from rank 0's weights (only rank 0 reads them, into host memory),
    then gathered once on every rank in the compute dtype (bf16 parameters on CUDA: half of fp32) and kept gathered,
    so each rank scores its own share of the prompts with no further collective (ranks run different numbers of
    forwards). Without gradients nothing else is held."""
    from torch.distributed.fsdp import FSDPModule

    from hps_exp.strategies import shard_from_rank0

    model = shard_from_rank0(model, env.world, env.autocast)
    model.set_reshard_after_forward(False, recurse=True)
    for m in model.modules():   # every rank, the same order: one all-gather per block, then the root
        if isinstance(m, FSDPModule):
            m.unshard()
    return model
