"""The annotation side: reward models trained in the run (reward_model=train, eval.reward_model=trained) and the
augmented training set they score (augment=sample). Both are built through their config's `_target_` (kept in
the spec, so a different target is a different key), with the run's values passed at call time."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hydra.utils import get_object

from hps_exp.data.schema import read_examples, write_examples
from hps_exp.generation import build_generator
from hps_exp.io import atomic_write_text, remove
from hps_exp.reward_models import TrainedRewardModel, pair_accuracy
from hps_exp.stages.env import Env, checkpoint_path
from hps_exp.stages.specs import AugmentResult, AugmentSpec, Examples, RewardModelSpec, Scorer, SFTResult

# ---------------------------------------------------------------------------------------------- reward models


def trained_reward_model(spec: RewardModelSpec, train: Examples, heldout: Examples, sft_result: SFTResult,
                         env: Env, name: str = "reward_model") -> Scorer:
    """A Bradley-Terry reward model trained on the training pairs (of `subset`): the tiny net with the SFT
    tokenizer, or a pretrained backbone with its own (then the SFT policy is not an input). Its held-out pair
    accuracy is measured on `heldout` each run (cheap), so a new test split does not retrain it. `name`:
    "reward_model" (the annotator) or "eval_reward_model" (eval.reward_model=trained). It is trained by one
    process (the main one: strategy none) with the run's other runtime settings (logging, checkpoints, resume)."""
    backbone = spec.knobs.get("backbone")
    entry = env.entry(name, spec, train=train.key, **({} if backbone else {"tokenizer": sft_result.key}))
    runtime = dataclasses.replace(env.runtime.trainer, strategy="none", activation_checkpointing=False)

    def build(out: Path) -> None:
        tok = None if backbone else sft_result.load()[0]
        rm = get_object(spec.target)(list(train.items), tok=tok, optim=spec.optim, runtime=runtime,
                                     max_prompt_length=spec.max_prompt_length, max_length=spec.max_length,
                                     seed=spec.seed, device=env.device, autocast=env.autocast, logger=env.logger,
                                     checkpoint=checkpoint_path(env, entry), stage=name, **spec.knobs)
        rm.save(out)
        atomic_write_text(out / "train.json", json.dumps({"pairs": rm.train_result["pairs"]}))

    def read(path: Path) -> Scorer:
        remove(checkpoint_path(env, entry), ignore_errors=True)
        rm = TrainedRewardModel.load(path, device=env.device, autocast=env.autocast)
        report = {**json.loads((path / "train.json").read_text()),
                  "heldout_pair_accuracy": pair_accuracy(rm, list(heldout.items)),
                  "backbone": backbone or "tiny (from scratch)", "subset": spec.knobs.get("subset", "all")}
        print(f"[{name}] held-out pair accuracy {report['heldout_pair_accuracy']:.3f}")
        return Scorer(rm, entry.key, report)

    return env.cached_stage(entry, build, read, lambda: Scorer(None, entry.key))


# ---------------------------------------------------------------------------------------------- augmentation


def augmented(spec: AugmentSpec, train: Examples, sft_result: SFTResult, annotator: Scorer, env: Env) -> AugmentResult:
    """n samples per training prompt from the SFT policy, scored by the annotation reward model (+ the originals)."""
    entry = env.entry("augment", spec, train=train.key, generator=sft_result.key, annotator=annotator.key)

    def build(out: Path) -> None:
        tok, model = sft_result.load()
        model.to(env.device)
        g = spec.generator
        generator = build_generator(g["backend"], model=model, tok=tok, model_dir=sft_result.path, device=env.device,
                                    max_prompt_length=spec.max_prompt_length, batch_size=g["batch_size"],
                                    top_k=g["top_k"], autocast=env.autocast,
                                    **({**g["vllm"], "seed": spec.seed} if g["backend"] == "vllm" else {}))
        stats: dict = {}
        examples = get_object(spec.target)(list(train.items), generator=generator, reward_model=annotator.model,
                                           seed=spec.seed, placeholder=tok.eos_token, progress=True, stats=stats,
                                           **spec.knobs)
        write_examples(out / "train.jsonl", examples)
        atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))

    def read(path: Path) -> AugmentResult:
        out = Examples.of(read_examples(path / "train.jsonl"))
        print(f"[augment] {len(out)} prompts, {sum(e.n for e in out.items) / max(1, len(out)):.1f} scored responses "
              f"per prompt")
        return AugmentResult(out, json.loads((path / "stats.json").read_text()))

    # A dry run: the augmented content is unknown until built; its stage key stands in for it.
    return env.cached_stage(entry, build, read, lambda: AugmentResult(Examples(train.items, entry.key), {}))
