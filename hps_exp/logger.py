"""Run logging: a local metrics.jsonl always, plus one W&B run per job (finished inside the job)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def wandb_mode(mode: str) -> str:
    """auto -> online when an API key is configured, otherwise offline (works with no network)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class RunLogger:
    def __init__(self, run_dir: Path, cfg, config: dict, name: str, group: str | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.mode = wandb_mode(cfg.mode)
        self.run = None
        self._base = self._last = 0   # W&B needs one increasing step across stages
        if self.mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=name, group=group,
                                  tags=list(cfg.tags), config=config, dir=str(run_dir), mode=self.mode,
                                  reinit="finish_previous")

    def next_stage(self) -> None:
        """Steps of the next stage continue after the last one logged."""
        self._base = self._last

    def log(self, metrics: dict[str, Any], step: int) -> None:
        step = self._last = self._base + step
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None
