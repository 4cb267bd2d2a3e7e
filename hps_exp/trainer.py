"""One training loop for every stage (SFT and preference): the stage passes its batches and a step
function; the trainer owns device, precision, data-parallel strategy (none | ddp | fsdp2),
optimiser, schedule, accumulation, clipping, non-finite guards, signals, checkpoints/resume,
progress and logging. It knows no loss by name.

Batch semantics (same result with 1 or N processes): `trainer.batch_size` is the GLOBAL number of
prompts per micro-batch; `make_epoch` yields this rank's share of each micro-batch (see
`World.shard_padded`). A micro-batch may expose `weight`, its share of the accumulated loss: its real
prompts for a preference batch (0 for a padding share), its response tokens for an SFT batch — without
it a micro-batch weighs 1. Each optimiser step the trainer learns the global total N over ranks and
accumulated micro-batches and back-propagates loss * n * W / N, so after the data-parallel gradient
average (÷W) the gradient is that of the mean loss over the step's N prompts (tokens for SFT), uneven
last batch included. Every rank must yield the same number of micro-batches per epoch
(checked each step: a mismatch raises on every rank instead of hanging).
"""
from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from hps_exp.checkpoint import (
    CheckpointDamaged,
    check_meta,
    find_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from hps_exp.config import OptimConfig, RuntimeConfig
from hps_exp.distributed import DistributedError, World
from hps_exp.progress import progress_bar
from hps_exp.strategies import wrap

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from hps_exp.logger import RunLogger

# step_fn(model, micro_batch) -> (loss to backprop, metrics {name: float}); metrics["tokens"], if given, is the
# micro-batch's real token count: summed over the stage (and ranks) into fit()'s "tokens", not averaged
StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
# make_epoch(epoch, progress) -> iterator over micro-batches; progress() is the fraction of training done
EpochFn = Callable[[int, Callable[[], float]], Iterator[Any]]


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT during fit: the current optimiser step finished and a checkpoint was saved (when the
    trainer has a checkpoint path); rerunning the same command resumes from it."""

    def __init__(self, stage: str, step: int, checkpoint: Path | None, signum: int):
        self.stage, self.step, self.checkpoint, self.signum = stage, step, checkpoint, signum
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint path, nothing saved"
        super().__init__(f"[{stage}] interrupted by {signal.Signals(signum).name} after step {step} ({where})")


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient with trainer.on_nonfinite=error; names the step and the batch's rows."""


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


# ---------------------------------------------------------------- the weights' dtype against the learning rate

LOW_PRECISION = (torch.bfloat16, torch.float16)
STALL_LIMIT = 0.1   # refuse when a step of size lr leaves more than this fraction of the trainable weights unchanged


def stalled_fraction(params: Iterable[torch.nn.Parameter], lr: float) -> float:
    """The fraction of the trainable low-precision (bf16/fp16) weights that a step of size `lr` leaves unchanged
    (w + lr rounds back to w in the weight's dtype). AdamW moves a weight by about lr per step, so this is the
    fraction training cannot move. 0 when no trainable weight is low-precision (fp32 masters, LoRA adapters)."""
    stalled = total = 0
    for p in params:
        if not p.requires_grad or p.dtype not in LOW_PRECISION or p.is_meta:
            continue
        w = p.detach()
        stalled += int(((w + lr) == w).sum())
        total += w.numel()
    return stalled / total if total else 0.0


def check_lr_moves_weights(model: torch.nn.Module, lr: float, stage: str) -> None:
    """Pure bf16 training at a small learning rate stalls silently (a 1e-6 step leaves ~98 % of N(0, 0.02) bf16
    weights unchanged): refuse it before the first step."""
    frac = stalled_fraction(model.parameters(), lr)
    if frac > STALL_LIMIT:
        key = "sft.lr" if stage == "sft" else "trainer.lr"
        raise ValueError(f"[{stage}] {key}={lr:g} cannot move {100 * frac:.1f} % of the trainable weights: they are "
                         f"bf16 (model.dtype=bf16) and w + lr rounds back to w, so training would stall silently. "
                         f"Keep fp32 master weights with bf16 compute (model.dtype=fp32 trainer.precision=bf16), use "
                         f"LoRA (its adapters train in fp32), or raise the learning rate")


# ---------------------------------------------------------------- signals

class _StopRequests:
    """SIGTERM/SIGINT set a flag that the loop reads after each optimiser step (a second SIGINT stops at once)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False


def weight(batch: Any) -> int:
    n = getattr(batch, "weight", None)
    return 1 if n is None else int(n)


class Trainer:
    def __init__(self, model: torch.nn.Module, optim: OptimConfig, runtime: RuntimeConfig, epochs: int,
                 max_steps: int | None = None, *, device: torch.device,
                 autocast: torch.dtype | None, logger: RunLogger | None = None, stage: str = "train",
                 checkpoint: Path | None = None, world: World | None = None, key: str | None = None,
                 record: dict | None = None):
        self.model, self.device, self.autocast = model, device, autocast
        self.optim, self.runtime, self.epochs, self.max_steps = optim, runtime, epochs, max_steps
        # The stage's cache key (and the readable record it hashes): written into each checkpoint and required
        # of the one resumed from, so a checkpoint never resumes another run. None: not checked.
        self.key, self.record = key, record
        self.seconds_before = 0.0   # training seconds of the steps done before a resume (from the checkpoint)
        self.tokens = 0.0           # real tokens forwarded (step_fn's "tokens", summed over ranks), resumes too
        self._started = time.perf_counter()
        self.logger, self.stage = logger, stage
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.world = world if world is not None else World(device=device)
        self.module = model   # what step_fn gets: the model or its DDP wrapper (set in fit)
        self.step = 0
        self.total_steps = 0
        self.skipped = 0      # optimiser steps skipped for a non-finite loss/gradient (on_nonfinite=skip)
        self._keys_checked = False

    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))

    def fit(self, make_epoch: EpochFn, micro_batches_per_epoch: int, step_fn: StepFn) -> dict[str, float]:
        optim, run, world = self.optim, self.runtime, self.world
        if optim.on_nonfinite not in ("error", "skip"):
            raise ValueError(f"trainer.on_nonfinite={optim.on_nonfinite!r} is not allowed; choose error or skip")
        steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / optim.grad_accum))
        self.total_steps = steps_per_epoch * self.epochs
        if self.max_steps is not None:
            self.total_steps = min(self.total_steps, self.max_steps)
        check_lr_moves_weights(self.model, optim.lr, self.stage)
        if run.strategy == "fsdp2" and world.distributed:
            from hps_exp import models

            models.check_twin(self.model)   # the final save gathers into a rebuilt twin: fail now, not after training
        self.module = wrap(self.model, run, world, param_dtype=self.autocast)
        # Created after wrapping: FSDP2 replaces parameters by sharded DTensors.
        opt = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=optim.lr,
                                weight_decay=optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(optim.schedule, int(optim.warmup_ratio * self.total_steps), self.total_steps))
        self._resume(opt, sched)

        self._started, last = time.perf_counter(), {}
        # a bar on a terminal, a plain line every 10 % in a log file (hps_exp.progress)
        bar = progress_bar(total=self.total_steps, initial=self.step, desc=self.stage, disable=not world.is_main)
        start_epoch = self.step // steps_per_epoch
        with _StopRequests() as stop:
            for epoch in range(start_epoch, self.epochs):
                if self.step >= self.total_steps:
                    break
                self.module.train()
                # Re-create the epoch's batches (and sampler draws) from the seed; on resume skip those done.
                skip = (self.step - epoch * steps_per_epoch) * optim.grad_accum
                micro = iter(make_epoch(epoch, self.progress))
                for _ in range(skip):
                    next(micro, None)
                while self.step < min(self.total_steps, (epoch + 1) * steps_per_epoch):
                    group = [b for _, b in zip(range(optim.grad_accum), micro)]
                    out = self._optimizer_step(group, step_fn, opt, sched, stop)
                    if out is None:   # every rank's epoch ended
                        break
                    stop_now = out.pop("_stop")
                    last = out
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                    if self.logger is not None and world.is_main and (
                            self.step % run.log_every == 0 or self.step == self.total_steps):
                        self.logger.log({f"{self.stage}/{k}": v for k, v in last.items()}, step=self.step)
                    if stop_now:
                        self._save(opt)
                        bar.close()
                        raise TrainingInterrupted(self.stage, self.step, self.checkpoint, stop.signum or signal.SIGTERM)
                    if run.save_every and self.step % run.save_every == 0:
                        self._save(opt)
                self._save(opt)
        bar.close()
        # The seconds of every step, those before a resume included: a resumed stage's cost is its whole cost.
        return {**last, "steps": self.step, "seconds": self.seconds(), "tokens": self.tokens}

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self._started

    def _resume(self, opt, sched) -> None:
        if not (self.runtime.resume and self.checkpoint is not None):
            return
        found = find_checkpoint(self.checkpoint)
        if found is None:
            return
        meta = read_meta(found)
        if self.key is not None:
            check_meta(found, meta, self.key, self.record)
        try:
            self.step = load_checkpoint(found, self.module, opt, self.world.device)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:   # torch's CheckpointException is a BaseException
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointDamaged(f"[{self.stage}] checkpoint {found} cannot be loaded ({type(e).__name__}: "
                                    f"{first}): it is damaged; delete it, or trainer.resume=false starts this "
                                    f"stage afresh") from e
        self.seconds_before = float(meta.get("seconds", 0.0))
        self.tokens = float(meta.get("tokens", 0.0))
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying the schedule
            warnings.simplefilter("ignore")
            for _ in range(self.step):
                sched.step()
        if self.world.is_main:
            print(f"[{self.stage}] resumed from {found} at step {self.step}/{self.total_steps}")
            if self.logger is not None and hasattr(self.logger, "rewind"):
                self.logger.rewind(self.stage, self.step)

    def _optimizer_step(self, group, step_fn, opt, sched, stop) -> dict[str, float] | None:
        world = self.world
        counts = [weight(b) for b in group]
        # One collective per step: every rank's (micro-batches, total weight). Equal micro-batch counts are
        # required (DDP/FSDP2 collectives would otherwise hang until the timeout).
        seen = world.all_gather_tensor(torch.tensor([len(group), sum(counts)]))
        lengths = [int(x) for x in seen[:, 0]]
        if len(set(lengths)) > 1:
            raise DistributedError(f"[{self.stage}] step {self.step + 1}: ranks yielded different numbers of "
                                   f"micro-batches {lengths} (by rank); make_epoch must give every rank the same "
                                   f"number (pad with World.shard_padded)")
        if lengths[0] == 0:
            return None
        total = float(seen[:, 1].sum())
        if total <= 0:
            raise ValueError(f"[{self.stage}] step {self.step + 1}: the micro-batches hold no prompts (weight=0)")
        sums: dict[str, float] = {}
        bad_loss, tokens = False, 0.0
        for i, (batch, n) in enumerate(zip(group, counts)):
            last = i == len(group) - 1
            with self._grad_sync(last), torch.autocast(self.device.type, dtype=self.autocast,
                                                       enabled=self.autocast is not None):
                loss, metrics = step_fn(self.module, batch)
                # n * W / N: after the data-parallel average over W ranks, the mean over the step's N prompts (tokens).
                (loss * float(n * world.world_size) / total).backward()
            value = loss.item()
            bad_loss |= not math.isfinite(value)
            tokens += float(metrics.pop("tokens", 0.0))   # a count: summed, not averaged over prompts
            for k, v in {"loss": value, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n / total
        keys = sorted(sums)
        if world.distributed and not self._keys_checked:   # once: the reduced vectors must line up
            names = world.gather_all(keys)
            if any(n != keys for n in names):
                raise DistributedError(f"[{self.stage}] ranks returned different metric names from step_fn: "
                                       f"{names} (by rank)")
            self._keys_checked = True
        flags = [tokens, float(bad_loss), float(stop.signum is not None)]
        reduced = world.all_reduce_sum(torch.tensor([sums[k] for k in keys] + flags, dtype=torch.float64))
        out = {k: float(v) for k, v in zip(keys, reduced)}
        self.tokens += reduced[-3].item()
        any_bad_loss, want_stop = reduced[-2].item() > 0, reduced[-1].item() > 0
        max_norm = self.optim.max_grad_norm if self.optim.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.requires_grad], max_norm)
        if hasattr(grad_norm, "full_tensor"):   # FSDP2: a DTensor norm over the shards
            grad_norm = grad_norm.full_tensor()
        out["grad_norm"] = float(grad_norm)
        out["lr"] = sched.get_last_lr()[0]
        if any_bad_loss or not math.isfinite(out["grad_norm"]):
            what = "loss" if any_bad_loss else "gradient"
            if self.optim.on_nonfinite == "error":
                opt.zero_grad(set_to_none=True)
                raise NonFiniteError(f"[{self.stage}] step {self.step + 1}: non-finite {what} (loss={out['loss']}, "
                                     f"grad_norm={out['grad_norm']}); batch rows: {_sources(group)} "
                                     f"(trainer.on_nonfinite=skip skips such steps)")
            self.skipped += 1
        else:
            opt.step()
        sched.step()   # a skipped step still advances the schedule: lr stays a function of the step
        opt.zero_grad(set_to_none=True)
        if self.skipped:
            out["nonfinite_skipped"] = float(self.skipped)
        out["_stop"] = want_stop
        return out

    def _grad_sync(self, last: bool):
        """Gradient all-reduce only on the last accumulated micro-batch."""
        import contextlib

        m = self.module
        if hasattr(m, "no_sync") and not last:        # DDP
            return m.no_sync()
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _save(self, opt) -> None:
        if self.checkpoint is None:
            return
        meta = {"seconds": self.seconds(), "tokens": self.tokens, "stage": self.stage}
        if self.key is not None:
            meta.update(key=self.key, record=self.record)
        save_checkpoint(self.checkpoint, self.module, opt, self.step, self.world, meta)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded model state dict (CPU tensors) on rank 0, None elsewhere; a collective under FSDP2."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.runtime.strategy == "fsdp2" and self.world.distributed:
            sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return sd if self.world.is_main else None
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.world.is_main else None

    def save_pretrained(self, tok: PreTrainedTokenizerBase, directory: Path, save_fn: Callable | None = None,
                        **save_kwargs: Any) -> None:
        """Write the trained model as a plain HF directory (safetensors) on rank 0; every rank must call it.
        Under FSDP2 the full weights are gathered to rank 0 (CPU) into an unsharded twin of the model, which
        is saved (and, for a LoRA model with lora_save="merged", merged) like the unwrapped model.
        `save_fn(model, tok, directory, **save_kwargs)` defaults to hps_exp.models.save (e.g. lora_save="adapter")."""
        from hps_exp import models

        save_fn = save_fn or models.save
        if self.runtime.strategy == "fsdp2" and self.world.distributed:
            sd = self.full_state_dict()
            if self.world.is_main:
                assert sd is not None   # full_state_dict returns it on the main rank
                save_fn(models.unsharded_copy(self.model, sd), tok, Path(directory), keep_live=False, **save_kwargs)
                del sd
        elif self.world.is_main:
            save_fn(self.model, tok, Path(directory), **save_kwargs)
        self.world.barrier()


def _sources(group) -> str:
    rows = [s for b in group for s in (getattr(b, "sources", None) or [])]
    if not rows:
        return "unknown (the batch has no `sources`)"
    return ", ".join(rows[:10]) + (f" … ({len(rows)} rows)" if len(rows) > 10 else "")
