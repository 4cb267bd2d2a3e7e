"""The reward models a run scores with: the dataset's own scorer, a pretrained annotator and the evaluation reward
model, built (and keyed) from their `_target_` nodes, and the one decision of which annotates and which evaluates
(`choose_scorers`, `Scorers`). Reward models trained in the run are stages (hps_exp/stages/annotation.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from hps_exp.cache import content_key
from hps_exp.config import ConfigError, build, check_node
from hps_exp.plan import check_model_source, plain, trains_reward_model
from hps_exp.stages import Scorer


def _local_fingerprint(name_or_path: str) -> str | None:
    """Names, sizes and times of a local model directory's files: a model replaced in place gets a new key."""
    p = Path(name_or_path).expanduser()
    if not p.is_dir():
        return None
    return content_key([(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                        for f in sorted(p.rglob("*")) if f.is_file()])


def scorer_from_node(node, key: str, device, load: bool = True) -> Scorer | None:
    """A reward model built from a `_target_` node (the dataset's own scorer, an HF reward model, ...).

    load=False (the ranks of a multi-process run but 0, which never score): the node is checked and its model
    source found as when loading, the key is the same, but no weights are read: `Scorer.model` is None."""
    if node is None:
        return None
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"{key} must be a config with _target_ (or null / annotation), got {node!r}")
    values = plain(node)
    extra = {"device": device} if "device" in _params(node._target_) else {}
    if load:
        model = build(node, key, **extra)
    else:
        check_node(node, key, provided=tuple(extra))
        if isinstance(values.get("name_or_path"), str):
            check_model_source(values["name_or_path"], f"{key}.name_or_path")
        model = None
    fp = _local_fingerprint(values["name_or_path"]) if isinstance(values.get("name_or_path"), str) else None
    return Scorer(model, content_key({"node": values, "files": fp}))


@dataclass(frozen=True)
class Scorers:
    """Which reward model annotates the training data and which scores the evaluation, decided once from the
    config (`choose_scorers`). Reward models trained in the run exist only after SFT: `annotator` and `evaluator`
    take them then, and are the only place that picks among them."""
    dataset: Scorer | None       # the dataset's own scorer (dataset.reward_model)
    pretrained: Scorer | None    # reward_model=hf (or another _target_ that loads one), as the annotator
    evaluation: Scorer | None    # eval.reward_model=<_target_ node>
    eval_by: str | None          # eval.reward_model: "annotation" (the annotator itself), "trained" or None (a node)

    @property
    def circular(self) -> bool:
        """The annotator also scores the evaluation (eval.reward_model=annotation): warned, marked in the tables."""
        return self.eval_by == "annotation"

    def annotator(self, trained: Scorer | None) -> Scorer | None:
        """The annotation reward model: the one trained in the run (reward_model=train), else the pretrained one,
        else the dataset's own scorer (or none)."""
        return trained or self.pretrained or self.dataset

    def evaluator(self, annotator: Scorer | None, trained: Scorer | None) -> Scorer | None:
        """The evaluation reward model: the annotator, the one trained on the other half (eval.reward_model=trained)
        or eval.reward_model's node (default: the dataset's own scorer)."""
        by: dict[str | None, Scorer | None] = {"annotation": annotator, "trained": trained}
        return by.get(self.eval_by, self.evaluation)


def choose_scorers(cfg: DictConfig, device, load: bool = True) -> Scorers:
    """The run's reward models for annotation and evaluation, checked (and, with `load`, read) before any work."""
    node = cfg.eval.reward_model
    eval_by = node if node in ("annotation", "trained") else None
    if eval_by == "annotation" and "_target_" not in cfg.reward_model:
        raise ConfigError("eval.reward_model=annotation needs reward_model=train or reward_model=hf")
    dataset = scorer_from_node(cfg.dataset.get("reward_model"), "dataset.reward_model", device)
    # Pretrained reward models are read by the process that scores (rank 0: augmentation, evaluation) alone.
    pretrained = (scorer_from_node(cfg.reward_model, "reward_model", device, load)
                  if "_target_" in cfg.reward_model and not trains_reward_model(cfg) else None)
    evaluation = None if node is None or eval_by else scorer_from_node(node, "eval.reward_model", device, load)
    if cfg.eval.protocol == "paper" and evaluation is None and eval_by is None:
        raise ConfigError("eval.protocol=paper ranks generations and references by reward: set eval.reward_model "
                          "(or eval.reward_model=annotation with reward_model=train|hf)")
    return Scorers(dataset, pretrained, evaluation, eval_by)



def _params(target: str) -> tuple[str, ...]:
    import inspect

    from hydra.utils import get_object

    return tuple(inspect.signature(get_object(target)).parameters)
