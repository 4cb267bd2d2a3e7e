"""One training loop for every stage (SFT and preference): the stage passes its batches and a step
function; the trainer owns device, precision, optimiser, schedule, accumulation, clipping,
checkpoints/resume, progress and logging. It knows no loss by name.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

# step_fn(model, micro_batch) -> (loss to backprop, metrics {name: float})
StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
# make_epoch(epoch, progress) -> iterator over micro-batches; progress() is the fraction of training done
EpochFn = Callable[[int, Callable[[], float]], Iterator[Any]]


@dataclass
class TrainConfig:
    lr: float
    epochs: int
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 0
    resume: bool = True
    max_steps: int | None = None


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        frac = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return f


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file then rename: an interrupted save never corrupts the last checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, *, device: torch.device,
                 autocast: torch.dtype | None, logger=None, stage: str = "train",
                 checkpoint: Path | None = None):
        self.model, self.cfg, self.device, self.autocast = model, cfg, device, autocast
        self.logger, self.stage, self.checkpoint = logger, stage, checkpoint
        self.step = 0
        self.total_steps = 0

    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    def fit(self, make_epoch: EpochFn, micro_batches_per_epoch: int, step_fn: StepFn) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.grad_accum))
        self.total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        model.to(self.device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(cfg.schedule, int(cfg.warmup_ratio * self.total_steps), self.total_steps))
        if cfg.resume and self.checkpoint is not None and self.checkpoint.exists():
            state = torch.load(self.checkpoint, map_location=self.device, weights_only=False)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            self.step = state["step"]
            print(f"[{self.stage}] resumed from {self.checkpoint} at step {self.step}/{self.total_steps}")

        started, last = time.perf_counter(), {}
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.stage, dynamic_ncols=True,
                   disable=os.environ.get("HPS_EXP_NO_PROGRESS") == "1")
        start_epoch = self.step // steps_per_epoch
        for epoch in range(start_epoch, cfg.epochs):
            if self.step >= self.total_steps:
                break
            model.train()
            # Re-create the epoch's batches (and sampler draws) from the seed; on resume skip those done.
            skip = (self.step - epoch * steps_per_epoch) * cfg.grad_accum
            micro = iter(make_epoch(epoch, self.progress))
            for _ in range(skip):
                next(micro, None)
            while self.step < min(self.total_steps, (epoch + 1) * steps_per_epoch):
                group = [b for _, b in zip(range(cfg.grad_accum), micro)]
                if not group:
                    break
                last = self._optimizer_step(group, step_fn, opt, sched)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                if self.logger is not None and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                    self.logger.log({f"{self.stage}/{k}": v for k, v in last.items()}, step=self.step)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save(opt, sched)
            self._save(opt, sched)
        bar.close()
        elapsed = time.perf_counter() - started
        return {**last, "steps": self.step, "seconds": elapsed}

    def _optimizer_step(self, group, step_fn, opt, sched) -> dict[str, float]:
        sums: dict[str, float] = {}
        for batch in group:
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss, metrics = step_fn(self.model, batch)
            (loss / len(group)).backward()
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(group)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        sums["grad_norm"] = float(grad_norm)
        sums["lr"] = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return sums

    def _save(self, opt, sched) -> None:
        if self.checkpoint is None:
            return
        save_checkpoint(self.checkpoint, {"model": self.model.state_dict(), "optimizer": opt.state_dict(),
                                          "scheduler": sched.state_dict(), "step": self.step})
