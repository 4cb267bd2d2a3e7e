"""The stages of one run: data -> SFT -> reference log-probs -> preference training -> evaluation.

Each expensive stage is cached by its inputs (hps_exp/cache.py), so a sweep over losses trains one
SFT model per seed and computes the reference log-probs once.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from hps_exp import batching, evaluate, models
from hps_exp.batching import Encoded, SequenceBatch
from hps_exp.cache import cached_stage, content_key
from hps_exp.config import ConfigError, build
from hps_exp.augment import augment
from hps_exp.data.schema import Example, Splits, atomic_write_text, read_examples, write_examples
from hps_exp.reward_models import HFRewardModel, TrainedRewardModel, pair_accuracy, train_reward_model
from hps_exp.samplers import Selection, check_compatible
from hps_exp.trainer import TrainConfig, Trainer


@dataclass
class Run:
    """What the stages share within one job."""
    cfg: DictConfig
    run_dir: Path
    cache_dir: Path
    device: torch.device
    autocast: torch.dtype | None
    logger: Any
    splits: Splits
    loss_fn: Any
    sampler: Any
    reward_model: Any
    timing: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)   # stage reports for metrics.json


def plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True)


CONF = Path(__file__).resolve().parents[1] / "conf"


def resolve_auto_sampler(cfg: DictConfig) -> None:
    """sampler=auto -> the loss's natural sampler, written into cfg so the run records what it used."""
    if cfg.sampler.get("name") != "auto":
        return
    choice = "hard" if cfg.loss.get("estimator") == "single" else cfg.loss.get("default_sampler", "pair")
    with open_dict(cfg):
        cfg.sampler = OmegaConf.load(CONF / "sampler" / f"{choice}.yaml")


def load_eval_dataset(cfg: DictConfig) -> Splits:
    path = CONF / "dataset" / f"{cfg.eval.dataset}.yaml"
    if not path.exists():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"eval.dataset={cfg.eval.dataset!r} is not a dataset config; choose one of {options}")
    node = OmegaConf.merge(OmegaConf.load(path), cfg.eval.dataset_args)
    return build(node, "eval.dataset_args", drop=("reward_model",))


def setup(cfg: DictConfig) -> tuple[Splits, Any, Any, Any]:
    """Everything that can fail on bad config or data, done before any training."""
    resolve_auto_sampler(cfg)
    loss_fn = build(cfg.loss, "loss")
    sampler = build(cfg.sampler, "sampler")
    splits: Splits = build(cfg.dataset, "dataset", drop=("reward_model",))
    splits.name = cfg.dataset.name
    if cfg.eval.dataset:  # transfer: train on one dataset, evaluate on another's test split
        splits = Splits(train=splits.train, test=load_eval_dataset(cfg).test, name=cfg.eval.dataset)
    if not splits.train or not splits.test:
        raise ConfigError(f"dataset={cfg.dataset.name}: empty split (train {len(splits.train)}, test {len(splits.test)})")
    rm_node = cfg.eval.get("reward_model")
    # "annotation": evaluate with the annotation reward model (built later, by reward_model_stage)
    reward_model = build(rm_node, "eval.reward_model") if rm_node and rm_node != "annotation" else None
    has_scores = all(e.scores is not None for e in splits.train)
    max_n = max(e.n for e in splits.train)
    if cfg.augment.enabled:  # the loss will see scored, augmented data
        if cfg.reward_model.name == "none" and cfg.dataset.get("reward_model") is None:
            raise ConfigError("augment=sample needs an annotation reward model: reward_model=train or "
                              "reward_model=hf reward_model.name_or_path=<id or dir>")
        has_scores = True
        max_n = cfg.augment.n + (max_n if cfg.augment.keep_original else 0)
    if rm_node == "annotation" and cfg.reward_model.name == "none":
        raise ConfigError("eval.reward_model=annotation needs reward_model=train or reward_model=hf")
    try:
        check_compatible(loss_fn.input_kind, loss_fn.needs_scores, cfg.loss.name, sampler, cfg.sampler.name,
                         max_n, has_scores)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return splits, loss_fn, sampler, reward_model


# ---------------------------------------------------------------- SFT (cached)

def sft_inputs(cfg: DictConfig) -> dict:
    return {"dataset": plain(cfg.dataset), "model": plain(cfg.model), "sft": plain(cfg.sft), "seed": cfg.seed,
            "trainer": {k: cfg.trainer[k] for k in ("grad_accum", "warmup_ratio", "schedule", "max_grad_norm",
                                                    "weight_decay")}}


def sft_stage(run: Run) -> Path:
    cfg = run.cfg

    def build_sft(out: Path) -> None:
        if cfg.model.name_or_path:
            tok, model = models.load_pretrained(cfg.model.name_or_path)
        else:
            texts = [e.prompt + r for e in run.splits.train for r in e.responses]
            tok = models.train_tokenizer(texts, cfg.model.vocab_size)
            model = models.build_tiny(cfg.model, len(tok), cfg.seed)
        if cfg.sft.enabled:
            torch.manual_seed(cfg.seed)
            train_sft(run, model, tok)
        models.save(model, tok, out)

    started = time.perf_counter()
    path, _ = cached_stage(run.cache_dir, "sft", sft_inputs(cfg), build_sft)
    run.timing["sft_s"] = time.perf_counter() - started
    return path


def train_sft(run: Run, model, tok) -> None:
    cfg = run.cfg
    encoded = batching.encode_examples(tok, run.splits.train, cfg.model.max_prompt_length, cfg.model.max_length)
    if cfg.sft.targets == "best":
        pairs = [(enc.prompt, enc.responses[ex.best]) for ex, enc in zip(run.splits.train, encoded)]
    else:
        pairs = [(enc.prompt, r) for enc in encoded for r in enc.responses]
    bs = cfg.sft.batch_size

    def make_epoch(epoch: int, progress):
        order = np.random.default_rng([cfg.seed, 1, epoch]).permutation(len(pairs))
        for start in range(0, len(order), bs):
            yield batching.collate([pairs[i] for i in order[start:start + bs]], tok.pad_token_id)

    def step(model, batch: SequenceBatch):
        return batching.sequence_nll(model, batch.to(run.device)), {}

    tcfg = train_config(cfg, lr=cfg.sft.lr, epochs=cfg.sft.epochs, max_steps=None)
    Trainer(model, tcfg, device=run.device, autocast=run.autocast, logger=run.logger, stage="sft",
            checkpoint=None).fit(make_epoch, -(-len(pairs) // bs), step)
    run.logger.next_stage()


def train_config(cfg: DictConfig, **override) -> TrainConfig:
    t = cfg.trainer
    base = dict(lr=t.lr, epochs=t.epochs, grad_accum=t.grad_accum, warmup_ratio=t.warmup_ratio,
                schedule=t.schedule, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
                log_every=t.log_every, save_every=t.save_every, resume=t.resume, max_steps=t.max_steps)
    return TrainConfig(**{**base, **override})


# ---------------------------------------------------------------- annotation reward model + augmentation (cached)

def data_key(examples: list[Example]) -> str:
    return content_key([e.to_json() for e in examples])


def reward_model_stage(run: Run, sft_dir: Path):
    """The annotation reward model: none, a HF sequence classifier, or a BT model trained here."""
    cfg, node = run.cfg, run.cfg.reward_model
    if node.name == "none":
        return None
    if node.name == "hf":
        run.extra["reward_model_id"] = plain(node)
        return HFRewardModel(node.name_or_path, device=run.device, batch_size=node.batch_size,
                             max_length=node.max_length)
    knobs = {k: v for k, v in plain(node).items() if k != "name"}

    def build_rm(out: Path) -> None:
        tok, _ = models.load_saved(sft_dir)
        rm = train_reward_model(run.splits.train, tok=tok, max_prompt_length=cfg.model.max_prompt_length,
                                max_length=cfg.model.max_length, seed=cfg.seed, device=run.device,
                                autocast=run.autocast, logger=run.logger, **knobs)
        rm.save(out)
        acc = pair_accuracy(rm, run.splits.test)
        atomic_write_text(out / "accuracy.json", json.dumps({"heldout_pair_accuracy": acc,
                                                             "pairs": rm.train_result["pairs"]}))

    started = time.perf_counter()
    inputs = {"data": data_key(run.splits.train), "test": data_key(run.splits.test), "tokenizer": sft_dir.name,
              "reward_model": knobs, "model": plain(cfg.model), "seed": cfg.seed}
    path, _ = cached_stage(run.cache_dir, "reward_model", inputs, build_rm)
    run.timing["reward_model_s"] = time.perf_counter() - started
    run.extra["reward_model"] = json.loads((path / "accuracy.json").read_text())
    run.extra["reward_model_id"] = path.name
    print(f"[reward_model] held-out pair accuracy {run.extra['reward_model']['heldout_pair_accuracy']:.3f}")
    return TrainedRewardModel.load(path, device=run.device, autocast=run.autocast)


def augment_stage(run: Run, sft_dir: Path, annotation_rm) -> None:
    """Replace the training split by n scored samples per prompt from the SFT policy (+ the originals)."""
    cfg, a = run.cfg, run.cfg.augment
    if not a.enabled:
        return
    rm = annotation_rm if annotation_rm is not None else run.reward_model
    rm_id = run.extra.get("reward_model_id") if annotation_rm is not None else plain(cfg.dataset.reward_model)
    knobs = {k: v for k, v in plain(a).items() if k != "enabled"}

    def build_aug(out: Path) -> None:
        tok, model = models.load_saved(sft_dir)
        model.to(run.device)
        stats: dict = {}
        examples = augment(run.splits.train, generator_model=model, tok=tok, reward_model=rm, device=run.device,
                           max_prompt_length=cfg.model.max_prompt_length, seed=cfg.seed, autocast=run.autocast,
                           progress=True, stats=stats, **knobs)
        write_examples(out / "train.jsonl", examples)
        atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))

    started = time.perf_counter()
    inputs = {"data": data_key(run.splits.train), "generator": sft_dir.name, "reward_model": rm_id,
              "augment": knobs, "seed": cfg.seed, "max_prompt_length": cfg.model.max_prompt_length,
              "precision": str(run.autocast), "device": run.device.type}
    path, _ = cached_stage(run.cache_dir, "augment", inputs, build_aug)
    run.timing["augment_s"] = time.perf_counter() - started
    run.splits.train = read_examples(path / "train.jsonl")
    run.extra["augment"] = json.loads((path / "stats.json").read_text())
    print(f"[augment] {len(run.splits.train)} prompts, "
          f"{sum(e.n for e in run.splits.train) / len(run.splits.train):.1f} scored responses per prompt")


# ---------------------------------------------------------------- reference log-probs + SFT eval (cached)

def reference_stage(run: Run, sft_dir: Path) -> dict:
    """Reference (= SFT policy) log-probs of every train/test response, and the SFT policy's eval."""
    cfg = run.cfg
    inputs = {"sft": sft_dir.name, "eval": plain(cfg.eval), "seed": cfg.seed,
              "train": data_key(run.splits.train), "test": data_key(run.splits.test),
              "eval_reward_model": eval_reward_model_id(run)}

    def build_ref(out: Path) -> None:
        tok, model = models.load_saved(sft_dir)
        model.to(run.device)
        enc = encode_splits(cfg, tok, run.splits)
        ref = {name: batching.all_response_logps(model, e, tok.pad_token_id, cfg.eval.batch_size, run.device,
                                                 run.autocast) for name, e in enc.items()}
        torch.save(ref, out / "ref_logps.pt")
        # the SFT policy is the reference: its test log-probs are ref["test"] itself
        metrics, samples = evaluate_policy(run, model, tok, enc["test"], ref["test"], policy_test=ref["test"])
        atomic_write_text(out / "sft_eval.json", json.dumps(metrics, indent=2))
        write_jsonl(out / "sft_samples.jsonl", samples)

    started = time.perf_counter()
    path, _ = cached_stage(run.cache_dir, "reference", inputs, build_ref)
    run.timing["reference_s"] = time.perf_counter() - started
    ref = torch.load(path / "ref_logps.pt")
    return {"ref": ref, "sft_eval": json.loads((path / "sft_eval.json").read_text()),
            "sft_samples": path / "sft_samples.jsonl"}


def eval_reward_model_id(run: Run) -> Any:
    node = run.cfg.eval.reward_model
    return run.extra.get("reward_model_id") if node == "annotation" else plain(node) if node else None


def encode(cfg: DictConfig, tok, examples: list[Example]) -> list[Encoded]:
    return batching.encode_examples(tok, examples, cfg.model.max_prompt_length, cfg.model.max_length)


def encode_splits(cfg: DictConfig, tok, splits: Splits) -> dict[str, list[Encoded]]:
    return {"train": encode(cfg, tok, splits.train), "test": encode(cfg, tok, splits.test)}


# ---------------------------------------------------------------- preference training

@dataclass
class PreferenceBatch:
    sequences: SequenceBatch
    mask: torch.Tensor            # [B, M] real slots
    ref_logps: torch.Tensor       # [B, M]
    scores: torch.Tensor          # [B, M] (NaN without scores)
    num_negatives: torch.Tensor   # [B]
    stats: dict[str, float]


def preference_batch(examples: list[Example], encoded: list[Encoded], ref: list[torch.Tensor],
                     selections: list[Selection], stats: list[dict], pad_id: int) -> PreferenceBatch:
    B, M = len(selections), max(len(s.indices) for s in selections)
    mask = torch.zeros(B, M, dtype=torch.bool)
    ref_t = torch.zeros(B, M)
    scores = torch.full((B, M), float("nan"))
    pairs = []
    for b, (ex, enc, r, sel) in enumerate(zip(examples, encoded, ref, selections)):
        for m, i in enumerate(sel.indices):
            mask[b, m] = True
            ref_t[b, m] = r[i]
            if ex.scores is not None:
                scores[b, m] = ex.scores[i]
            pairs.append((enc.prompt, enc.responses[i]))  # row-major order == mask order
    keys = {k for s in stats for k in s}
    mean_stats = {k: float(np.mean([s[k] for s in stats if k in s])) for k in keys}
    return PreferenceBatch(batching.collate(pairs, pad_id), mask, ref_t, scores,
                           torch.tensor([s.num_negatives for s in selections]), mean_stats)


def preference_stage(run: Run, sft_dir: Path, ref: dict) -> tuple[Any, Any, dict]:
    cfg = run.cfg
    tok, model = models.load_saved(sft_dir)
    # Dropout would make the policy's log-probs noisy against the (dropout-free) reference ones.
    models.disable_dropout(model)
    torch.manual_seed(cfg.seed)  # same stream whether or not SFT ran in this process (cache hit)
    train = run.splits.train
    enc = encode(cfg, tok, train)
    ref_train, bs = ref["ref"]["train"], cfg.trainer.batch_size

    def make_epoch(epoch: int, progress):
        rng = np.random.default_rng([cfg.seed, 2, epoch])  # fresh draws every epoch, reproducible
        order = rng.permutation(len(train))
        epoch_progress = progress()
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            p = progress() if cfg.trainer.resample == "step" else epoch_progress
            sels = [run.sampler.select(train[i], rng, p) for i in idx]
            stats = [run.sampler.stats(train[i], s) for i, s in zip(idx, sels)]
            yield preference_batch([train[i] for i in idx], [enc[i] for i in idx], [ref_train[i] for i in idx],
                                   sels, stats, tok.pad_token_id)

    def step(model, batch: PreferenceBatch):
        dev = run.device
        flat = batching.sequence_logps(model, batch.sequences.to(dev)).float()
        mask = batch.mask.to(dev)
        policy = torch.zeros(mask.shape, device=dev).masked_scatter(mask, flat)
        out = run.loss_fn(policy, batch.ref_logps.to(dev), mask, batch.scores.to(dev), batch.num_negatives.to(dev))
        metrics = {k: float(v) for k, v in out.metrics.items()}
        return out.losses.mean(), {**metrics, **batch.stats}

    trainer = Trainer(model, train_config(cfg), device=run.device, autocast=run.autocast, logger=run.logger,
                      stage="train", checkpoint=run.run_dir / "checkpoints" / "preference.pt")
    result = trainer.fit(make_epoch, -(-len(train) // bs), step)
    run.timing["pref_s"] = result["seconds"]
    run.timing["pref_step_s"] = result["seconds"] / max(1, result["steps"])
    models.save(model, tok, run.run_dir / "policy")
    return tok, model, result


# ---------------------------------------------------------------- evaluation

def evaluate_policy(run: Run, model, tok, enc_test: list[Encoded], ref_test: list[torch.Tensor],
                    policy_test: list[torch.Tensor] | None = None):
    cfg, e = run.cfg, run.cfg.eval
    test = run.splits.test
    subset = test[:e.max_prompts]
    gens = evaluate.generate(model, tok, [x.prompt for x in subset], max_new_tokens=e.max_new_tokens,
                             temperature=e.temperature, top_p=e.top_p, batch_size=e.batch_size, device=run.device,
                             max_prompt_length=cfg.model.max_prompt_length, seed=cfg.seed)
    metrics, samples = evaluate.evaluate_generations(subset, gens, run.reward_model)
    pol = policy_test if policy_test is not None else batching.all_response_logps(
        model, enc_test, tok.pad_token_id, e.batch_size, run.device, run.autocast)
    metrics.update(evaluate.reward_margins(test, pol, ref_test, beta_of(cfg)))
    return metrics, samples


def beta_of(cfg: DictConfig) -> float:
    return float(cfg.loss.get("beta", 0.1))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def run_label(cfg: DictConfig, splits: Splits) -> dict:
    """The run's coordinates in the paper's tables (metrics.json "run")."""
    framework = str(cfg.loss.get("framework", "dpo"))
    pm = str(cfg.loss.get("preference_model", cfg.loss.name))
    method = cfg.label or (framework.upper() if pm == "pair" else f"{framework.upper()}-{pm}")
    gamma = cfg.loss.get("gamma") if cfg.loss.get("estimator") == "full" else cfg.sampler.get("gamma")
    if cfg.sampler.get("schedule") not in (None, "constant") and cfg.loss.get("estimator") != "full":
        gamma = f"{cfg.sampler.schedule}({cfg.sampler.gamma_start}->{cfg.sampler.gamma_end})"
    return {"method": method, "loss": cfg.loss.name, "framework": framework, "preference_model": pm,
            "sampler": cfg.sampler.name, "train_dataset": cfg.dataset.name, "seed": cfg.seed,
            "n_responses": max(e.n for e in splits.train), "gamma": gamma, "beta": beta_of(cfg),
            "sweep": cfg.sweep, "config_key": content_key(plain(cfg))}
