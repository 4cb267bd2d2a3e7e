"""`python -m hps_exp [key=value ...]`: one Hydra job = one run (or one job of a --multirun sweep)."""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from hps_exp import config, models, pipeline
from hps_exp.config import ConfigError
from hps_exp.data.schema import DataError, atomic_write_text
from hps_exp.logger import RunLogger

log = logging.getLogger("hps_exp")
config.register()


class RunFailed(CompactHydraException):
    """Printed by Hydra as one line, no traceback; in a sweep the other jobs still run."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def job_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    try:
        return HydraConfig.get().job.override_dirname or "default"
    except ValueError:
        return "default"


def quiet_libraries() -> None:
    """Our own progress bars and tables are the output; silence transformers' per-load bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    quiet_libraries()
    config.check_values(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    splits, loss_fn, sampler, reward_model = pipeline.setup(cfg)  # fails here on bad config or data
    seed_everything(cfg.seed)
    device = models.pick_device(cfg.trainer.device)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    logger = RunLogger(run_dir, cfg.logger, resolved, job_name(cfg), cfg.sweep)
    label = pipeline.run_label(cfg, splits)
    try:
        r = pipeline.Run(cfg=cfg, run_dir=run_dir, cache_dir=Path(to_absolute_path(cfg.cache_dir)), device=device,
                         autocast=models.autocast_dtype(cfg.trainer.precision, device), logger=logger,
                         splits=splits, loss_fn=loss_fn, sampler=sampler, reward_model=reward_model)
        print(f"[hps_exp] {label['method']} (loss={cfg.loss.name}, sampler={cfg.sampler.name}) on "
              f"{cfg.dataset.name}: {len(splits.train)} train / {len(splits.test)} test prompts, "
              f"device={device}, run dir {run_dir}")
        sft_dir = pipeline.sft_stage(r)
        annotation_rm = pipeline.reward_model_stage(r, sft_dir)
        pipeline.augment_stage(r, sft_dir, annotation_rm)
        if cfg.eval.reward_model == "annotation":
            r.reward_model = annotation_rm
        ref = pipeline.reference_stage(r, sft_dir)
        tok, model, _ = pipeline.preference_stage(r, sft_dir, ref)
        t0 = time.perf_counter()
        enc_test = pipeline.encode(cfg, tok, splits.test)
        aligned, samples = pipeline.evaluate_policy(r, model, tok, enc_test, ref["ref"]["test"])
        r.timing["eval_s"] = time.perf_counter() - t0
        pipeline.write_jsonl(run_dir / "samples.jsonl", samples)
        r.timing["total_s"] = time.perf_counter() - started
        label = pipeline.run_label(cfg, r.splits)  # n_responses after augmentation
        result = {"status": "completed", "run": label,
                  "eval": {r.splits.name or cfg.dataset.name: {"sft": ref["sft_eval"], "aligned": aligned}},
                  "timing": r.timing, **r.extra}
        atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2))
        logger.summary({f"eval/{stage}/{k}": v for stage, m in (("sft", ref["sft_eval"]), ("aligned", aligned))
                        for k, v in m.items() if isinstance(v, (int, float))})
        print(results_table(ref["sft_eval"], aligned, label["method"]))
        print(f"[hps_exp] wrote {run_dir / 'metrics.json'} ({r.timing['total_s']:.0f}s)")
        logger.finish()
        return result
    except BaseException:
        logger.finish(exit_code=1)
        raise


def results_table(sft: dict, aligned: dict, method: str) -> str:
    cols = [("BLEU", "bleu"), ("reward", "reward"), ("margin", "reward_margin"),
            ("margin(hardest)", "reward_margin_hardest"), ("harmful", "harmful_rate")]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [("policy", [c for c, _ in cols]), ("SFT", [fmt(sft.get(k)) for _, k in cols]),
            (f"aligned ({method})", [fmt(aligned.get(k)) for _, k in cols])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  " + "  ".join(f"{v:>15}" for v in vals) for name, vals in rows]
    return "\n".join(lines)


# An absolute path: run as `python -m hps_exp` Hydra would otherwise look for a Python module `conf`.
@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return run(cfg)
    except Exception as e:  # record the failure for the tables, then report it
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        atomic_write_text(run_dir / "metrics.json",
                          json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}, indent=2))
        if isinstance(e, (ConfigError, DataError, models.ModelError)):
            raise RunFailed(f"error: {e}") from None
        raise


if __name__ == "__main__":
    main()
