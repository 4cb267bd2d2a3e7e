"""`python -m hps_exp [key=value ...]`: one Hydra job = one run (or one job of a --multirun sweep).

`run` reads as the recipe: plan (everything that can fail on bad config or data, before any work), then the
stages in order, each a call with typed inputs and a typed result (hps_exp/stages/).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from hps_exp import config, distributed, evaluate, models, plan, rundir, scorers, stages
from hps_exp.cache import CacheError
from hps_exp.checkpoint import CheckpointDamaged, CheckpointMismatch
from hps_exp.config import ConfigError
from hps_exp.data.schema import DataError
from hps_exp.io import atomic_write_text, remove
from hps_exp.logger import RunLogger
from hps_exp.trainer import NonFiniteError, TrainingInterrupted

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


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs, built and checked from the config before any work."""
    plan: plan.Plan
    loss_fn: Any
    sampler: Any
    train: stages.Examples
    heldout: stages.Examples           # the training dataset's own test split (reward-model accuracy)
    eval_sets: list
    device: torch.device
    scorers: scorers.Scorers           # which reward model annotates, which evaluates


def prepare(cfg: DictConfig, device: torch.device | None = None, load_reward_models: bool = True) -> Prepared:
    """Config, components and data, all checked: bad input fails here, before any training."""
    config.check_values(cfg)
    loss_fn, sampler = plan.loss_and_sampler(cfg)
    train, heldout, eval_sets = plan.load_data(cfg)
    plan.check_data(cfg, loss_fn, sampler, train)
    p = plan.make_plan(cfg, loss_fn)
    plan.check_model_source(cfg.model.name_or_path, "model.name_or_path")
    if "_target_" in cfg.reward_model and "name_or_path" in cfg.reward_model:
        plan.check_model_source(cfg.reward_model.name_or_path, "reward_model.name_or_path")
    if p.reward_model is not None:
        plan.check_model_source(p.reward_model.knobs.get("backbone"), "reward_model.backbone")
    device = device or models.pick_device(cfg.trainer.device)
    for line in plan.check_engines(cfg, device):   # peft, gguf, vllm: missing or unfit fails here, not later
        print(f"[hps_exp] {line}")
    return Prepared(p, loss_fn, sampler, train, heldout, eval_sets, device,
                    scorers.choose_scorers(cfg, device, load_reward_models))


def execute(cfg: DictConfig, r: Prepared, env: stages.Env, run_dir: Path) -> dict:
    """The stages, in order. Returns metrics.json's content (without status)."""
    p, train = r.plan, r.train
    sft = stages.sft(p.sft, train, env)
    annotator = r.scorers.annotator(stages.trained_reward_model(p.reward_model, train, r.heldout, sft, env)
                                    if p.reward_model else None)
    judge = (stages.trained_reward_model(p.eval_reward_model, train, r.heldout, sft, env, name="eval_reward_model")
             if p.eval_reward_model else None)   # eval.reward_model=trained: not the annotator
    augmented: stages.AugmentResult | None = None
    if p.augment:
        assert annotator is not None   # plan.check_data refuses augment=sample without an annotation reward model
        augmented = stages.augmented(p.augment, train, sft, annotator, env)
    if augmented is not None:
        train = augmented.examples
    label = plan.run_label(cfg, r.loss_fn, r.sampler, train)   # after augmentation: n_responses as trained

    def reference(examples, env):   # none when the loss's rewards need none (reward=simpo): the dry run shows it
        return stages.reference(p.reference, sft, examples, env) if r.loss_fn.needs_reference else None

    margin = stages.MarginReward(r.loss_fn.reward, r.loss_fn.margin_beta)
    ref_train = reference(train, env)
    policy = stages.preference(p.preference, r.loss_fn, r.sampler, sft, train, ref_train, env, run_dir)
    evaluator = r.scorers.evaluator(annotator, judge)
    results, samples = {}, []
    if env.world is not None and not env.world.is_main:   # one process evaluates (never inside FSDP)
        return {}
    env = dataclasses.replace(env, world=None)
    for eval_set in r.eval_sets:
        ref = reference(eval_set.examples, env)
        before = stages.evaluate_sft(p.eval, sft, eval_set, ref, evaluator, env, margin)
        after = stages.evaluate_policy(p.eval, policy, eval_set, ref, evaluator, env, margin)
        evaluate.add_win_rate(after.metrics, after.per_prompt, before.per_prompt)
        results[eval_set.name] = {"sft": before.metrics, "aligned": after.metrics,
                                  "per_prompt": {"sft": before.per_prompt, "aligned": after.per_prompt}}
        samples += [{"eval_set": eval_set.name, **s} for s in after.samples]
        if not env.dry_run:
            print(results_table(eval_set.name, before.metrics, after.metrics, label["method"]))
    timing = {"sft_s": sft.seconds, "pref_s": policy.seconds, "pref_step_s": policy.seconds / max(1, policy.steps),
              "pref_steps": policy.steps, "pref_tokens": policy.tokens,
              "pref_tokens_per_s": policy.tokens / policy.seconds if policy.seconds > 0 else 0.0}
    out: dict[str, Any] = {"run": label, "eval": results, "timing": timing, "samples": samples}
    if r.scorers.circular:   # the tables mark such rows (‡)
        out["circular_eval"] = True
    if warnings := divergence_warnings(policy.final, results):
        out["warnings"] = warnings
        for w in warnings:
            print(f"[hps_exp] warning: {w}", file=sys.stderr)
    if annotator is not None and annotator.report:   # which reward model scored what
        scored = [what for what, used in (("augment", augmented is not None), ("eval", r.scorers.circular)) if used]
        out["reward_model"] = {**annotator.report, "scored": scored}
    if judge is not None:
        out["eval_reward_model"] = {**judge.report, "scored": ["eval"]}
    out["circular_eval"] = r.scorers.circular   # the tables mark rows scored by the annotation reward model
    if augmented is not None:
        out["augment"] = augmented.stats
    return out


class Terminated(BaseException):
    """SIGTERM outside a training loop (loading, the reference pass, evaluation): nothing in flight to save.
    A BaseException so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} outside training (cached stages and "
                         f"checkpoints are kept)")


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def choose_threads(num_threads: int, local_processes: int) -> tuple[int, str]:
    """(torch threads, where the number came from): trainer.num_threads when set, else an explicit
    OMP_NUM_THREADS, else the automatic choice (plan.environment_threads)."""
    if num_threads > 0:
        return num_threads, "trainer.num_threads"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    return plan.environment_threads(0, local_processes), "auto"


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


DIVERGED_MARGIN = 100.0   # |reward margin| (beta x log-ratio units) beyond which a run is called diverged


CIRCULAR = ("eval.reward_model=annotation: the evaluation is circular: the reward model that labelled the training "
            "data also scores the evaluation, so a policy that games it looks good (metrics.json circular_eval, ‡ in "
            "the tables). Score with an independent reward model: eval.reward_model=<_target_ node> or one trained "
            "on other pairs")


def eval_set_sizes(eval_set, max_prompts: int) -> str:
    n = len(eval_set.examples)
    generated = f": margins on all, generations on the first {max_prompts}" if max_prompts < n else ""
    return f"{eval_set.name} ({n} prompts{generated})"


def divergence_warnings(final: dict, results: dict) -> list[str]:
    """A run whose margins blew up, or that skipped non-finite steps, completes with a warning (README:
    "Failures, interruptions and resume"): |train margin| or |aligned eval margin| > DIVERGED_MARGIN."""
    out = []
    margin = final.get("rewards/margins")
    if margin is not None and not abs(margin) <= DIVERGED_MARGIN:
        out.append(f"diverged: the last training step's reward margin is {margin:.4g} (|margin| > "
                   f"{DIVERGED_MARGIN:g}); lower trainer.lr")
    for name, res in results.items():
        m = res["aligned"].get("reward_margin")
        if isinstance(m, (int, float)) and not abs(m) <= DIVERGED_MARGIN:
            out.append(f"diverged: the aligned policy's reward margin on {name} is {m:.4g} (|margin| > "
                       f"{DIVERGED_MARGIN:g}); lower trainer.lr")
    if final.get("nonfinite_skipped"):
        out.append(f"{int(final['nonfinite_skipped'])} training step(s) skipped for a non-finite loss or gradient "
                   f"(trainer.on_nonfinite=skip)")
    return out


def run(cfg: DictConfig) -> dict:
    """One job. SIGTERM anywhere in it raises Terminated: during the work it is recorded in metrics.json (_work);
    before (loading, planning, claiming the run dir) nothing is written there, the dir's record stays as it was."""
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    try:
        return _run(cfg)
    except Terminated as e:
        print(f"[hps_exp] {e}, before the run started: nothing recorded", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _run(cfg: DictConfig) -> dict:
    started = time.perf_counter()
    quiet_libraries()
    threads, threads_source = choose_threads(cfg.trainer.num_threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    load_start = load_average()
    world = distributed.init_world(cfg.trainer.device, cfg.trainer.dist_timeout_s)
    if world.distributed and cfg.trainer.strategy == "none":
        raise ConfigError(f"launched as {world.world_size} processes but trainer.strategy=none (each would train "
                          f"alone): set trainer.strategy=ddp or fsdp2")
    # Every process must use the main process's run dir (Hydra's timestamp may differ by a second).
    run_dir = Path(world.broadcast_object(str(HydraConfig.get().runtime.output_dir)))
    r = prepare(cfg, world.device, load_reward_models=world.is_main)
    autocast, precision_why = models.resolve_precision(cfg.trainer.precision, world.device,
                                                       pretrained=cfg.model.name_or_path is not None)
    env_args = dict(device=world.device, autocast=autocast,
                    cache_dir=Path(to_absolute_path(cfg.cache_dir)), runtime=r.plan.runtime,
                    world=world if world.distributed else None)
    dry = stages.Env(**env_args, dry_run=True)
    execute(cfg, r, dry, run_dir)   # every stage's key, nothing built
    if cfg.dry_run:
        for name, key, status in dry.planned:
            print(f"[plan] {name:<13} {key}  {status}")
        return {"status": "planned", "stages": dry.planned}
    identity = rundir.identity(OmegaConf.to_container(cfg, resolve=True), dry.planned, _task_overrides())
    lock, reuse = _claim(run_dir, identity, cfg.trainer.resume, world)
    try:
        if reuse is not None:
            if world.is_main:
                print(f"[hps_exp] {run_dir} already holds this run's completed result (same stage keys): reusing "
                      f"its metrics.json, nothing redone (trainer.resume=false redoes it)")
            distributed.shutdown()
            return reuse
        if world.is_main:
            rundir.check_writable(run_dir, env_args["cache_dir"], dry.planned)
        return _work(cfg, r, env_args, run_dir, world, identity, started,
                     {"threads": threads, "threads_source": threads_source, "load_start": load_start,
                      "precision": precision_why})
    finally:
        if lock is not None:
            lock.release()


def _work(cfg, r: Prepared, env_args: dict, run_dir: Path, world, identity: dict, started: float,
          timing: dict) -> dict:
    if world.is_main:
        print(f"[hps_exp] torch threads: {timing['threads']} ({timing['threads_source']}), load average "
              f"{timing['load_start']}, precision {timing['precision']}")
        if warning := plan.oversubscribed():
            print(warning)
    seed_everything(cfg.seed)
    logger = None
    if world.is_main:   # the main process alone writes the config, W&B and metrics
        atomic_write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        logger = RunLogger(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), job_name(cfg), cfg.sweep)
    env = stages.Env(**env_args, logger=logger)

    def interrupted(error: str, stage, step, signum: int) -> NoReturn:
        if logger is not None:
            atomic_write_text(run_dir / "metrics.json", json.dumps(
                {"status": "interrupted", "error": error, "stage": stage, "step": step, "identity": identity},
                indent=2))
            logger.finish(exit_code=128 + signum)
        print(f"[hps_exp] {error}; rerun with hydra.run.dir={run_dir} to resume", file=sys.stderr)
        raise SystemExit(128 + signum) from None

    try:
        if world.is_main:
            print(f"[hps_exp] {cfg.label or r.loss_fn.row['method']} "
                  f"(loss={cfg.loss.name}, sampler={cfg.sampler.name}) "
                  f"on {cfg.dataset.name}: {len(r.train)} train prompts, eval on "
                  f"{', '.join(eval_set_sizes(s, cfg.eval.max_prompts) for s in r.eval_sets)}, device={world.device}"
                  f"{f' x {world.world_size} processes' if world.distributed else ''}, run dir {run_dir}")
            if r.scorers.circular:
                print(f"[hps_exp] warning: {CIRCULAR}", file=sys.stderr)
        out = execute(cfg, r, env, run_dir)
        if not world.is_main:
            return {}
        write_jsonl(run_dir / "samples.jsonl", out.pop("samples"))
        out["timing"].update(timing, load_end=load_average(), total_s=time.perf_counter() - started)
        result = {"status": "completed", **out, "stages": env.used, "identity": identity}
        atomic_write_text(run_dir / "metrics.json", json.dumps(result, indent=2))
        if not cfg.trainer.keep_checkpoints:   # completed: reused from now on, never resumed
            remove(run_dir / "checkpoints", ignore_errors=True)
        assert logger is not None   # made on the main process, and only the main process gets here
        logger.summary({f"eval/{name}/{stage}/{k}": v for name, res in out["eval"].items()
                        for stage in ("sft", "aligned") for k, v in res[stage].items()
                        if isinstance(v, (int, float))})
        print(f"[hps_exp] wrote {run_dir / 'metrics.json'} ({out['timing']['total_s']:.0f}s)")
        logger.finish()
        return result
    except TrainingInterrupted as e:   # preemption: the checkpoint is saved; a rerun resumes
        interrupted(str(e), e.stage, e.step, e.signum)
    except Terminated as e:
        interrupted(str(e), None, None, e.signum)
    except KeyboardInterrupt:
        interrupted("interrupted by SIGINT (Ctrl-C twice)", None, None, signal.SIGINT)
    except BaseException:
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    finally:
        distributed.shutdown()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _task_overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _claim(run_dir: Path, identity: dict, resume: bool, world):
    """The main process takes the run dir's lock (a second job in the same dir is refused, never interleaved)
    and reads its record: (lock, a completed result to reuse or None to run), or a refusal (RunDirConflict on
    every process). Hydra has already rewritten .hydra/overrides.yaml with this job's overrides; when the dir
    keeps its run (reused or refused) its own overrides are put back."""
    decision: tuple[str, Any] | None = None
    lock = None
    if world.is_main:
        try:
            lock = rundir.lock(run_dir)
            reuse = rundir.decide(run_dir, identity, resume)
            decision = ("reuse", reuse) if reuse is not None else ("run", None)
        except rundir.RunDirConflict as e:
            decision = ("refuse", str(e))
        if decision[0] == "reuse" or decision[0] == "refuse" and lock is not None:
            rundir.restore_overrides(run_dir)
        if decision[0] == "run":
            rundir.clean_partial(run_dir)
    kind, value = world.broadcast_object(decision)
    if kind == "refuse":
        if lock is not None:
            lock.release()
        distributed.shutdown()
        raise rundir.RunDirConflict(value)
    return lock, value


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


COLUMNS = [("corpus BLEU", "bleu_corpus"), ("sentence BLEU", "bleu_sentence"), ("char BLEU", "bleu_char"),
           ("reward", "reward"), ("reward@top1", "reward_top1"),
           ("margin", "reward_margin"), ("margin(hardest)", "reward_margin_hardest"), ("harmful", "harmful_rate"),
           ("win rate", "win_rate")]


def results_table(eval_set: str, sft: dict, aligned: dict, method: str) -> str:
    cols = [(c, k) for c, k in COLUMNS if k in sft or k in aligned]
    fmt = lambda v: "n/a" if v is None else "-" if v == "" else f"{v:.3f}"  # noqa: E731
    rows = [(f"[{eval_set}] policy", [c for c, _ in cols]), ("SFT", [fmt(sft.get(k, "")) for _, k in cols]),
            (f"aligned ({method})", [fmt(aligned.get(k, "")) for _, k in cols])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{name:<{width}}  " + "  ".join(f"{v:>15}" for v in vals) for name, vals in rows]
    return "\n".join(lines)


# An absolute path: run as `python -m hps_exp` Hydra would otherwise look for a Python module `conf`.
@hydra.main(config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return run(cfg)
    except (rundir.RunDirConflict, CheckpointMismatch) as e:   # the dir holds another run: its record stays
        raise RunFailed(f"error: {e}") from None
    except (SystemExit, KeyboardInterrupt, GeneratorExit):   # interrupted: recorded by run
        raise
    except BaseException as e:  # record the failure for the tables, then report it
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
            atomic_write_text(run_dir / "metrics.json",
                              json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}"}, indent=2))
        if isinstance(e, (ConfigError, DataError, models.ModelError, distributed.DistributedError, CacheError,
                          CheckpointDamaged, NonFiniteError)):
            raise RunFailed(f"error: {e}") from None
        if not isinstance(e, Exception):   # e.g. torch's CheckpointException: as an Exception, so that Hydra
            raise RuntimeError(f"{type(e).__name__}: {e}") from e   # records the job and a multirun goes on
        raise


if __name__ == "__main__":
    main()
