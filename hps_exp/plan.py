"""From the Hydra config to what a run needs: the stage specs, the loss and sampler, the data and the reward
models, all checked before any training. This is the one place that reads the Hydra config; a stage only ever
sees its own frozen spec (hps_exp/stages/)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from hps_exp import hub, models
from hps_exp.cache import content_key
from hps_exp.config import (
    INF,
    NOT_EXPERIMENT,
    ConfigError,
    OptimConfig,
    RuntimeConfig,
    build,
    check_node,
    check_range,
    part,
)
from hps_exp.data import chat
from hps_exp.data.schema import Splits
from hps_exp.samplers import check_compatible
from hps_exp.stages import (
    AugmentSpec,
    EvalSet,
    EvalSpec,
    Examples,
    ModelSpec,
    PreferenceSpec,
    ReferenceSpec,
    RewardModelSpec,
    Runtime,
    SFTSpec,
)

CONF = Path(__file__).resolve().parents[1] / "conf"
# Dataset keys that are not the loader's: its scorer, and the strings that end a reply in its format.
NOT_LOADER = ("reward_model", "stop")


def plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True)


@dataclass(frozen=True)
class Plan:
    sft: SFTSpec
    reward_model: RewardModelSpec | None     # None unless reward_model=train
    eval_reward_model: RewardModelSpec | None   # None unless eval.reward_model=trained (the other half)
    augment: AugmentSpec | None              # None unless augment=sample
    reference: ReferenceSpec
    preference: PreferenceSpec
    eval: EvalSpec
    runtime: Runtime


# ---------------------------------------------------------------------------------------------- components

def resolve_sampler(cfg: DictConfig, loss_fn) -> None:
    """sampler=auto -> the loss's natural sampler, with any knob set on auto passed on (and refused when that
    sampler has no such knob). Written into cfg so the run records what it used."""
    if cfg.sampler.get("name") != "auto":
        return
    choice = loss_fn.natural_sampler
    node = OmegaConf.load(CONF / "sampler" / f"{choice}.yaml")
    for k, v in plain(cfg.sampler).items():
        if k == "name" or v is None:
            continue
        if k not in node:
            raise ConfigError(f"sampler.{k} does nothing with sampler=auto, which resolves to sampler={choice} for "
                              f"loss={cfg.loss.name}; set sampler=hard (or another sampler that takes {k}) to use it")
        node[k] = v
    with open_dict(cfg):
        cfg.sampler = node


def loss_and_sampler(cfg: DictConfig):
    loss_fn = build(cfg.loss, "loss")
    resolve_sampler(cfg, loss_fn)
    sampler = build(cfg.sampler, "sampler")
    return loss_fn, sampler


def _dataset_node(cfg: DictConfig, name: str) -> DictConfig:
    path = CONF / "dataset" / f"{name}.yaml"
    if not path.exists():
        options = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"eval.datasets: {name!r} is not a dataset config; choose one of {options}")
    args = cfg.eval.dataset_args.get(name, {}) if isinstance(cfg.eval.dataset_args, DictConfig) else {}
    return OmegaConf.merge(OmegaConf.load(path), args or {})


def load_data(cfg: DictConfig) -> tuple[Examples, Examples, list[EvalSet]]:
    """The training split, the training dataset's own test split and each evaluation set, all fingerprinted."""
    splits: Splits = build(cfg.dataset, "dataset", drop=NOT_LOADER)
    if not splits.train or not splits.test:
        raise ConfigError(f"dataset={cfg.dataset.name}: empty split "
                          f"(train {len(splits.train)}, test {len(splits.test)})")
    unknown = [k for k in cfg.eval.dataset_args if k not in (cfg.eval.datasets or [cfg.dataset.name])]
    if unknown:
        raise ConfigError(f"eval.dataset_args.{unknown[0]}: {unknown[0]!r} is not in eval.datasets "
                          f"({list(cfg.eval.datasets) or [cfg.dataset.name]})")
    sets = []
    for name in cfg.eval.datasets or [cfg.dataset.name]:
        if name == cfg.dataset.name and not cfg.eval.dataset_args.get(name):
            test = splits.test
        else:
            test = build(_dataset_node(cfg, name), f"eval.dataset_args.{name}", drop=NOT_LOADER).test
            if not test:
                raise ConfigError(f"eval.datasets: {name} has an empty test split")
        sets.append(EvalSet(name, Examples.of(test)))
    if len({s.name for s in sets}) != len(sets):
        raise ConfigError(f"eval.datasets lists a set twice: {list(cfg.eval.datasets)}")
    train, test = splits.train, splits.test
    if cfg.eval.validation_prompts or cfg.eval.split == "validation":
        train, validation = split_validation(train, cfg.eval.validation_prompts)
        if cfg.eval.split == "validation":
            sets = [EvalSet("validation", Examples.of(validation))]
    if cfg.model.chat_template:   # every set in the policy's own format (the eval sets too: transfer)
        tok = chat_tokenizer(cfg.model)
        train, test = chat.render(train, tok), chat.render(test, tok)
        sets = [EvalSet(s.name, Examples.of(chat.render(s.examples.items, tok))) for s in sets]
    return Examples.of(train), Examples.of(test), sets


def split_validation(train: list, n: int) -> tuple[list, list]:
    """(train without the validation prompts, the validation prompts): n training prompts drawn by a fixed
    generator, the same whatever the run's seed, so tuning runs (eval.split=validation) and final runs
    (eval.split=test) train on exactly the same prompts and share every cached stage up to evaluation."""
    if not 0 < n < len(train):
        raise ConfigError(f"eval.validation_prompts={n}: must be between 1 and the {len(train) - 1} training "
                          f"prompts that leave one to train on (eval.split=validation needs it > 0)")
    held = set(np.random.default_rng(0).permutation(len(train))[:n].tolist())
    return ([e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held])


def chat_tokenizer(model: DictConfig):
    """The tokenizer whose chat template model.chat_template=true applies; refused for models without one."""
    if model.name_or_path is None:
        raise ConfigError("model.chat_template=true needs a pretrained model with a chat template "
                          "(model.name_or_path); the tiny model built from config has none")
    tok = models.load_tokenizer(model.name_or_path, trust_remote_code=model.trust_remote_code)
    if not tok.chat_template:
        raise ConfigError(f"model.chat_template=true but {model.name_or_path} has no chat template")
    return tok


def check_data(cfg: DictConfig, loss_fn, sampler, train: Examples) -> None:
    """The loss, sampler and data must work together (after augmentation, if any): fails before any work."""
    has_scores = all(e.scores is not None for e in train.items)
    max_n = max(e.n for e in train.items)
    if "_target_" in cfg.augment:  # the loss will see scored, augmented data
        if "_target_" not in cfg.reward_model and cfg.dataset.get("reward_model") is None:
            raise ConfigError("augment=sample needs an annotation reward model: reward_model=train or "
                              "reward_model=hf reward_model.name_or_path=<id or dir>")
        has_scores = True
        max_n = cfg.augment.n + (max_n if cfg.augment.keep_original else 0)
    try:
        check_compatible(loss_fn.input_kind, loss_fn.needs_scores, cfg.loss.name, sampler, cfg.sampler.name,
                         max_n, has_scores)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_model_source(name_or_path: str | None, key: str) -> None:
    """Fail fast (before W&B or any training) when a model cannot be had: a missing local dir or package, or a hub
    id that is neither cached nor reachable. Without this an offline hub id fails after ~50 s of retries."""
    if not name_or_path:
        return
    if name_or_path.startswith(hub.PKG_PREFIX) or name_or_path.endswith(".gguf"):
        hub.resolve_gguf(name_or_path)   # raises ModelError naming the package / file
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        return
    hint = (f"point {key} at a local copy saved with save_pretrained ({key}=/path/to/dir), or use the embedded "
            f"default model=tiny")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise models.ModelError(f"{key}={name_or_path!r}: no such directory; {hint}")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    from hps_exp.data.common import _hub_offline, _hub_unreachable_reason

    try:
        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return   # in the local hub cache: loads offline
    except HFValidationError:
        raise models.ModelError(f"{key}={name_or_path!r} is neither a local directory nor a valid hub id "
                                f"(owner/name); {hint}") from None
    reason = "offline mode (HF_HUB_OFFLINE) and not in the local cache" if _hub_offline() else _hub_unreachable_reason()
    if reason:
        raise models.ModelError(f"{key}={name_or_path!r} cannot be loaded: {reason}. Offline? {hint}")


def reply_stop(node, key: str) -> tuple[str, ...]:
    """A dataset's `stop`: the strings that end a reply in its format (its turn markers); none when unset."""
    stop = plain(node).get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"{key}.stop={stop!r} must be a list of non-empty strings (the markers that end a reply), "
                          f"or [] for none")
    return tuple(stop)


def eval_stop(cfg: DictConfig) -> tuple[str, ...]:
    """Every evaluation set's stop strings, in order, once: one generation setting for all sets."""
    stops: list[str] = []
    for name in cfg.eval.datasets or [cfg.dataset.name]:
        own = name == cfg.dataset.name and not cfg.eval.dataset_args.get(name)
        stops += reply_stop(cfg.dataset, "dataset") if own else reply_stop(_dataset_node(cfg, name),
                                                                             f"eval.dataset_args.{name}")
    return tuple(dict.fromkeys(stops))


def check_engines(cfg: DictConfig, device) -> list[str]:
    """The engines a run chose can run here, checked before any work (prepare, so the dry run too): peft for
    model.lora, gguf for a GGUF model, and vllm (its version; on CPU the model's head size) for eval.backend and
    augment.backend. One line per vllm backend, or a ConfigError / ModelError of one line naming the key."""
    import importlib.util

    from hps_exp import generation

    if cfg.model.lora.enabled and importlib.util.find_spec("peft") is None:
        raise ConfigError("model.lora.enabled=true needs the peft package, not installed here: pip install peft")
    if cfg.model.name_or_path:
        _, gguf_file, package = hub.resolve_gguf(cfg.model.name_or_path)
        if gguf_file is not None:
            hub.check_gguf_support(package)
    chosen = [("eval.backend", cfg.eval.backend)]
    if "_target_" in cfg.augment:
        chosen.append(("augment.backend", cfg.augment.get("backend", "hf")))
    lines = []
    for key, backend in chosen:
        if backend == "vllm":
            try:
                lines.append(generation.check_vllm(key, device, *_head_size(cfg.model)))
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return lines


def _head_size(m: DictConfig) -> tuple[int | None, str]:
    """(attention head size, the settings that give it) of the policy; None when its config cannot be read."""
    if not m.name_or_path:
        return m.n_embd // m.n_head, f"model.n_embd={m.n_embd} / model.n_head={m.n_head}"
    from transformers import AutoConfig

    source, gguf_file, _ = hub.resolve_gguf(m.name_or_path)
    try:
        c = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}),
                                       trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError):
        return None, f"model.name_or_path={m.name_or_path}"
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    width = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    size = getattr(c, "head_dim", None) or (width // heads if width and heads else None)
    return size, f"model.name_or_path={m.name_or_path}"


# ---------------------------------------------------------------------------------------------- specs

def _lora_spec(lora: dict, key: str = "model.lora") -> dict:
    """What of `key` (model.lora or reward_model.lora) changes training: nothing when disabled; `save` (the saved
    format) never does."""
    from hps_exp.models import lora_settings

    settings = lora_settings(lora, key)   # ModelError naming the key
    return {k: v for k, v in settings.items() if k != "save"} if settings["enabled"] else {"enabled": False}


def _reward_model_knobs(knobs: dict, policy: str | None) -> dict:
    """reward_model=train's knobs as they change the model: backbone=policy resolved to model.name_or_path, the
    tiny net's sizes dropped with a backbone, LoRA as `_lora_spec` keeps it. Knobs at their default (no backbone,
    LoRA off, subset all) are left out, so the from-scratch default keeps its spec."""
    from hps_exp.models import ModelError
    from hps_exp.reward_models import SUBSETS, TINY_KNOBS

    out = dict(knobs)
    if out.get("backbone") == "policy":
        if not policy:
            raise ConfigError("reward_model.backbone=policy means the policy's pretrained model, but "
                              "model.name_or_path is unset (model=tiny is built from scratch); set "
                              "reward_model.backbone=<hub id | dir | pkg:...gguf> or a pretrained model=...")
        out["backbone"] = policy
    for k in (TINY_KNOBS if out.get("backbone") else ("backbone",)):
        out.pop(k, None)
    try:
        lora = _lora_spec(out.pop("lora", None), key="reward_model.lora")
    except ModelError as e:
        raise ConfigError(str(e)) from None
    if lora["enabled"]:
        out["lora"] = lora
    if out.get("subset", "all") not in SUBSETS:
        raise ConfigError(f"reward_model.subset={out['subset']!r} is not allowed; choose one of {', '.join(SUBSETS)}")
    if out.get("subset") == "all":
        del out["subset"]
    return out


def _eval_reward_model(cfg: DictConfig, annotator: RewardModelSpec | None) -> RewardModelSpec | None:
    """eval.reward_model=trained: the annotator's settings on the other half of the training prompts, so the
    policy is not scored by the reward model that labelled its data."""
    if cfg.eval.reward_model != "trained":
        return None
    half = annotator.knobs.get("subset", "all") if annotator else None
    if half not in ("half_a", "half_b"):
        raise ConfigError("eval.reward_model=trained trains the evaluation reward model on the half of the prompts "
                          "the annotator did not see: set reward_model=train reward_model.subset=half_a (or half_b)")
    assert annotator is not None   # half is None without an annotator
    return dataclasses.replace(annotator, knobs={**annotator.knobs,
                                                 "subset": "half_b" if half == "half_a" else "half_a"})


def make_plan(cfg: DictConfig, loss_fn) -> Plan:
    m, t, e = cfg.model, cfg.trainer, cfg.eval
    train_seed = training_seed(cfg)
    lengths = {"max_prompt_length": m.max_prompt_length, "max_length": m.max_length}
    model = ModelSpec(name_or_path=m.name_or_path, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd,
                      n_positions=m.n_positions, vocab_size=m.vocab_size, dtype=m.dtype,
                      attn_implementation=m.attn_implementation, trust_remote_code=m.trust_remote_code, **lengths)
    optim = part(OptimConfig, t)   # every trained stage's optimiser: trainer.*, each with its own lr
    sft = SFTSpec(model=model, enabled=cfg.sft.enabled, targets=cfg.sft.targets, epochs=cfg.sft.epochs,
                  batch_size=cfg.sft.batch_size, optim=dataclasses.replace(optim, lr=cfg.sft.lr), seed=cfg.seed)
    rm = _reward_model_spec(cfg, optim) if trains_reward_model(cfg) else None
    aug = _augment_spec(cfg) if "_target_" in cfg.augment else None
    pref = PreferenceSpec(loss=plain(cfg.loss), sampler=plain(cfg.sampler), epochs=t.epochs,
                          batch_size=t.batch_size, max_steps=t.max_steps, resample=t.resample, optim=optim,
                          seed=train_seed, lora=_lora_spec(plain(m.lora)), bucketing=t.bucketing, **lengths)
    ev = EvalSpec(protocol=e.protocol, num_samples=e.num_samples, max_prompts=e.max_prompts,
                  max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p, batch_size=e.batch_size,
                  seed=train_seed, backend=e.backend, vllm=plain(e.vllm), stop=eval_stop(cfg), **lengths)
    if ev.backend == "hf" and ev.vllm:
        raise ConfigError("eval.vllm does nothing with eval.backend=hf")
    if ev.num_samples > 1 and ev.temperature == 0:
        raise ConfigError(f"eval.num_samples={ev.num_samples} samples per prompt need eval.temperature > 0")
    runtime = Runtime(trainer=part(RuntimeConfig, t), score_batch_size=e.batch_size,
                      gradient_checkpointing=m.gradient_checkpointing, lora_save=m.lora.get("save", "merged"))
    return Plan(sft=sft, reward_model=rm, eval_reward_model=_eval_reward_model(cfg, rm), augment=aug,
                reference=ReferenceSpec(**lengths), preference=pref, eval=ev, runtime=runtime)


def trains_reward_model(cfg: DictConfig) -> bool:
    """reward_model=train: a reward model trained in the run (its `_target_` trains one; reward_model=hf's loads
    one). The option's name says which; every caller asks here."""
    return cfg.reward_model.get("name") == "train" and "_target_" in cfg.reward_model


# The arguments the stage passes to reward_model._target_ and augment._target_ at call time (not config keys).
RM_RUNTIME_ARGS = ("optim", "runtime", "tok", "max_prompt_length", "max_length", "seed", "device", "autocast",
                   "logger", "checkpoint", "stage")
AUGMENT_RUNTIME_ARGS = ("generator", "reward_model", "seed", "placeholder", "progress", "stats")
GENERATOR_KEYS = ("backend", "batch_size", "top_k", "vllm")   # augment's keys that configure the generator


def _reward_model_spec(cfg: DictConfig, optim: OptimConfig) -> RewardModelSpec:
    """reward_model=train: its knobs checked against its `_target_`; reward_model.lr is its optimiser's lr (the
    other optimiser settings are trainer.*'s)."""
    lr = cfg.reward_model.get("lr")
    check_range("reward_model.lr", lr, 0, INF, False)
    _, knobs = check_node(cfg.reward_model, "reward_model", drop=("lr",), provided=RM_RUNTIME_ARGS)
    return RewardModelSpec(target=cfg.reward_model._target_, knobs=_reward_model_knobs(knobs, cfg.model.name_or_path),
                           optim=dataclasses.replace(optim, lr=lr), seed=cfg.seed,
                           max_prompt_length=cfg.model.max_prompt_length, max_length=cfg.model.max_length)


def _augment_spec(cfg: DictConfig) -> AugmentSpec:
    _, knobs = check_node(cfg.augment, "augment", drop=GENERATOR_KEYS, provided=AUGMENT_RUNTIME_ARGS)
    gen = {"backend": "hf", "batch_size": 64, "top_k": 0, "vllm": {},
           **{k: v for k, v in plain(cfg.augment).items() if k in GENERATOR_KEYS}}
    if gen["backend"] not in ("hf", "vllm"):
        raise ConfigError(f"augment.backend={gen['backend']!r} is not allowed; choose one of hf, vllm")
    if gen["backend"] == "hf" and gen["vllm"]:
        raise ConfigError("augment.vllm does nothing with augment.backend=hf")
    if "stop" in knobs:
        raise ConfigError("augment.stop: the strings that end a reply are the dataset's; set dataset.stop")
    knobs["stop"] = list(reply_stop(cfg.dataset, "dataset"))
    return AugmentSpec(target=cfg.augment._target_, knobs=knobs, generator=gen,
                       max_prompt_length=cfg.model.max_prompt_length, seed=cfg.seed)


def training_seed(cfg: DictConfig) -> int:
    """The preference stage's and the evaluation's seed: trainer.seed, else the top-level seed."""
    return cfg.seed if cfg.trainer.seed is None else cfg.trainer.seed


def run_label(cfg: DictConfig, loss_fn, sampler, train: Examples) -> dict:
    """The run's coordinates in the paper's tables (metrics.json "run"), as the loss describes itself."""
    row = dict(loss_fn.row)
    hardness = getattr(sampler, "hardness", "annotation")
    if hardness != "annotation":   # the negatives come from the policy: its own row (e.g. "HPS (policy-hard)")
        row["method"] += {"policy_reward": " (policy-hard)", "policy_logp": " (policy-logp-hard)"}[hardness]
        row["hardness"] = hardness
    if cfg.label:
        row["method"] = cfg.label
    gamma = row.pop("gamma", None)
    if gamma is None and getattr(sampler, "kind", None) == "hard":
        gamma = sampler.gamma_label
    experiment = {k: v for k, v in plain(cfg).items() if k not in NOT_EXPERIMENT}
    return {**row, "loss": cfg.loss.name, "sampler": cfg.sampler.name, "train_dataset": cfg.dataset.name,
            "seed": training_seed(cfg), "pipeline_seed": cfg.seed, "n_responses": max(e.n for e in train.items),
            "gamma": gamma, "eval_split": cfg.eval.split,
            "beta": loss_fn.margin_beta, "sweep": cfg.sweep, "config_key": content_key(experiment)}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment_threads(requested: int, local_processes: int = 1) -> int:
    """trainer.num_threads=0 (auto): the cores this process may use, split between the processes of this node;
    one thread when the machine is already busy (load average above 3/4 of the cores): on a shared 2-core machine
    two threads then ran 7-15x slower than one. `make run` measured 60 s with 2 threads vs 96 s with 1 (idle)."""
    if requested > 0:
        return requested
    cores = max(1, _cores() // max(1, local_processes))
    try:
        busy = os.getloadavg()[0] > 0.75 * _cores()
    except OSError:
        busy = False
    return 1 if busy else cores


def oversubscribed() -> str | None:
    """A warning when the machine's load already exceeds its cores (timings will be noisy), else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = _cores()
    if load > cores:
        return (f"[hps_exp] warning: load average {load:.1f} exceeds the {cores} cores; steps will be slow "
                f"(trainer.num_threads=1 keeps torch from competing with itself)")
    return None
