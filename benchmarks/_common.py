"""Shared pieces of the benchmarks: the project's tiny model and synthetic data, timing, machine info."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from hps_exp import batching, models
from hps_exp.config import ModelConfig
from hps_exp.data import synthetic

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_setup(n_responses: int, n_train: int, seed: int = 0):
    """(examples, encoded, tokenizer, model): model=tiny on conf/dataset/synthetic.yaml data."""
    mcfg = OmegaConf.structured(ModelConfig)   # model=tiny: the schema's defaults
    splits = synthetic.load(n_train=n_train, n_test=4, n_responses=n_responses, seed=seed)
    tok = models.train_tokenizer([e.prompt + r for e in splits.train for r in e.responses], mcfg.vocab_size)
    model = models.build_tiny(mcfg, len(tok), seed)
    models.disable_dropout(model)
    enc = batching.encode_examples(tok, splits.train, mcfg.max_prompt_length, mcfg.max_length)
    return splits.train, enc, tok, model


def interleaved(arms: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each arm, arms interleaved round-robin so load drifts hit all alike."""
    for fn in arms.values():  # warm-up (allocator, lazy init)
        fn()
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(ts: list[float]) -> tuple[float, float]:
    return min(ts), statistics.median(ts)


def machine() -> str:
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.node()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} thread(s) | {load}")


class StepClock:
    """A logger that records when each optimizer step finished (the Trainer logs every step here)."""

    def __init__(self):
        self.stamps = [time.perf_counter()]

    def log(self, metrics, step, stage=None):
        self.stamps.append(time.perf_counter())

    def next_stage(self):
        pass

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    def median_step(self) -> float:
        """Median step time, the first (warm-up) step left out when there are others."""
        secs = self.step_seconds()
        return statistics.median(secs[1:] or secs)
