"""Reward margins of finished runs against RANKED held-out responses: the paper's hardest-negative margin where the
evaluation set has only its dataset pair.

    python -m hps_exp.ranked_margins SWEEP_OR_JOB_DIR [...] [--n 4] [--max-new-tokens 48] [--seed 0]

A held-out prompt of HH-RLHF carries one chosen and one rejected reply, so a run's two margins (mean over the
negatives, hardest negative) are the same number and the paper's claim, a larger margin against the hardest
negative, goes untested. This command gives each held-out prompt of the runs' evaluation set(s) n more replies
sampled from the runs' SFT policy (the same sampler as augment=sample), scores all of them with the runs'
EVALUATION reward model (never the annotator the policies were trained on), so the best reply is the judge's
best and the hardest negative the judge's highest-scored other one, and measures every run's two margins on
these examples with its own implicit reward (its loss's reward and beta), against the SFT policy as reference.

The ranked set and its reference log-probs are cached stages (keyed like the pipeline's: inputs and code); each
run gets `ranked_margins.json` in its job dir (the eval set "<name> (ranked)" with per-prompt values), which the
tables read like the run's own evaluation sets (intervals, paired tests). It reads the SFT policy and the
evaluation reward model from the cache entries the runs' metrics.json names (identity.stages), so it works on runs
made by an older commit, and it refuses runs that do not share them or their evaluation data.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hps_exp import batching, evaluate, models
from hps_exp.augment import augment
from hps_exp.cache import CacheError, cached, code_fingerprint, published, stage_entry
from hps_exp.data.schema import Example, read_examples, read_jsonl, write_examples
from hps_exp.generation import build_generator
from hps_exp.io import atomic_write_text
from hps_exp.losses import implicit_rewards
from hps_exp.reward_models import TrainedRewardModel
from hps_exp.stages.env import encode
from hps_exp.stages.specs import EvalSet

OUTPUT = "ranked_margins.json"
SUFFIX = " (ranked)"
# Config keys that decide the evaluation data and the encoding: every run given must agree on them.
SAME_DATA = ("dataset.", "eval.split", "eval.validation_prompts", "eval.datasets", "eval.dataset_args",
             "model.name_or_path", "model.chat_template", "model.max_prompt_length", "model.max_length",
             "model.dtype", "model.attn_implementation")


@dataclass(frozen=True)
class Job:
    dir: Path
    metrics: dict

    @property
    def identity(self) -> dict:
        return self.metrics["identity"]

    def stage_key(self, name: str) -> str:
        keys = [k for stage, k in self.identity["stages"] if stage == name]
        if not keys:
            raise SystemExit(f"{self.dir}/metrics.json: identity.stages has no {name!r} stage "
                             f"(ranked margins need the SFT policy and an evaluation reward model: "
                             f"eval.reward_model=trained)")
        return keys[0]

    def data_config(self) -> dict:
        return {k: v for k, v in self.identity["config"].items() if k.startswith(SAME_DATA)}


def find_jobs(paths: list[str]) -> list[Job]:
    """The completed runs under `paths` (job dirs or sweep dirs); a failed or running one is skipped, said."""
    from hps_exp.tables.collect import find_job_dirs

    jobs = []
    for root in paths:
        if not Path(root).is_dir():
            raise SystemExit(f"{root}: not a directory")
        for d in find_job_dirs(Path(root)):
            path = d / "metrics.json"
            m = json.loads(path.read_text()) if path.is_file() else {}
            if m.get("status") != "completed":
                print(f"[ranked] skipping {d}: not completed ({m.get('status', 'no metrics.json')})")
                continue
            if "identity" not in m:
                raise SystemExit(f"{path}: no identity block (a run from before stage keys were recorded)")
            jobs.append(Job(d, m))
    if not jobs:
        raise SystemExit(f"no completed runs under {', '.join(paths)}")
    first = jobs[0]
    for job in jobs[1:]:
        for stage in ("sft", "eval_reward_model"):
            if job.stage_key(stage) != first.stage_key(stage):
                raise SystemExit(f"{job.dir}: its {stage} ({job.stage_key(stage)}) is not {first.dir}'s "
                                 f"({first.stage_key(stage)}); give runs of one pipeline per invocation")
        if job.data_config() != first.data_config():
            diff = sorted(k for k in job.data_config().keys() | first.data_config().keys()
                          if job.data_config().get(k) != first.data_config().get(k))
            raise SystemExit(f"{job.dir}: evaluation data differ from {first.dir}'s ({', '.join(diff)})")
    return jobs


def eval_sets_of(job: Job) -> list[EvalSet]:
    """The run's evaluation sets rebuilt from its overrides with this code's loaders, checked against what it
    evaluated (its number of margin prompts and its generations' prompts): a loader that changed since is caught."""
    from hps_exp import plan
    from hps_exp.config import compose

    sets = plan.load_data(compose(job.identity["overrides"]))[2]
    samples = _sample_prompts(job.dir)
    for s in sets:
        ev = job.metrics["eval"].get(s.name)
        if ev is None:
            raise SystemExit(f"{job.dir}: it has no evaluation set {s.name!r} (it has {sorted(job.metrics['eval'])})")
        want = len(ev["per_prompt"]["aligned"]["reward_margin"])
        have = sum(1 for e in s.examples.items if e.negatives)
        gen = samples.get(s.name, [])
        if want != have or any(p != e.prompt for p, e in zip(gen, s.examples.items)):
            raise SystemExit(f"{job.dir}: {s.name} as rebuilt here ({have} prompts with a negative) is not the set the "
                             f"run evaluated ({want}): the dataset or its loader changed")
    return sets


def _sample_prompts(job_dir: Path) -> dict[str, list[str]]:
    """Each eval set's prompts in the order the run generated for them (samples.jsonl: one row per prompt)."""
    out: dict[str, list[str]] = {}
    path = job_dir / "samples.jsonl"
    if path.is_file():
        for _, row in read_jsonl(path):
            out.setdefault(row.get("eval_set", ""), []).append(row["prompt"])
    return out


def verified_entry(cache_dir: Path, name: str, key: str) -> Path:
    """The runs' cache entry, verified (hps_exp.cache.published); a missing or corrupt one ends the command."""
    try:
        return published(cache_dir, name, key)
    except CacheError as e:
        raise SystemExit(f"{e} (the runs' {name} cache entry; --cache-dir?)") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hps_exp.ranked_margins", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="job dirs or sweep dirs (searched like the tables do)")
    p.add_argument("--n", type=int, default=4, help="replies sampled per held-out prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=None, help="default: the runs' cache_dir")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--force", action="store_true", help="recompute runs that already have these ranked margins")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    jobs = find_jobs(args.runs)
    first = jobs[0]
    cfg = first.identity["config"]
    cache_dir = Path(args.cache_dir or cfg["cache_dir"])
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda")
    autocast, why = models.resolve_precision(args.precision, device, pretrained=bool(cfg["model.name_or_path"]))
    print(f"[ranked] {len(jobs)} run(s); {why}; cache {cache_dir}")
    sft_dir = verified_entry(cache_dir, "sft", first.stage_key("sft")) / "model"
    judge_dir = verified_entry(cache_dir, "eval_reward_model", first.stage_key("eval_reward_model"))
    load = dict(dtype=cfg["model.dtype"], attn_implementation=cfg["model.attn_implementation"])
    lengths = (int(cfg["model.max_prompt_length"]), int(cfg["model.max_length"]))
    numeric = {"device": device.type, "autocast": str(autocast)}
    spec = {"n": args.n, "temperature": args.temperature, "top_p": 1.0, "max_new_tokens": args.max_new_tokens,
            "seed": args.seed, "stop": list(cfg.get("dataset.stop") or []), "lengths": list(lengths),
            "batch_size": args.batch_size}
    inputs = {"sft": first.stage_key("sft"), "judge": first.stage_key("eval_reward_model")}
    record = {**spec, **inputs, "scored_by": "the evaluation reward model (eval_reward_model)"}
    command = "python -m hps_exp.ranked_margins " + " ".join(sys.argv[1:] if argv is None else argv)
    todo = [job for job in jobs if args.force or not _done(job, record)]
    if len(todo) < len(jobs):
        print(f"[ranked] {len(jobs) - len(todo)} run(s) already have these ranked margins (--force recomputes)")
    if not todo:
        return
    sets = [(s.name + SUFFIX, *_ranked_set(s, spec, inputs, numeric, cache_dir, sft_dir, load, judge_dir, device,
                                           autocast))
            for s in eval_sets_of(first)]
    for job in todo:   # each run's file as soon as it is measured: an interrupted invocation keeps what it did
        ev = {name: _margins(job, ranked, ref, lengths, args.batch_size, device, autocast, load)
              for name, ranked, ref in sets}
        atomic_write_text(job.dir / OUTPUT, json.dumps({"eval": ev, "ranked": record, "code": code_fingerprint(),
                                                        "command": command}))
        print(f"[ranked] {job.dir}: " + ", ".join(
            f"{name}: margin {v['aligned']['reward_margin']:.4f}, hardest {v['aligned']['reward_margin_hardest']:.4f}"
            for name, v in ev.items()))


def _done(job: Job, record: dict) -> bool:
    """The run already has margins on the same ranked set, measured by this code."""
    try:
        old = json.loads((job.dir / OUTPUT).read_text())
    except (OSError, ValueError):
        return False
    return old.get("ranked") == record and old.get("code") == code_fingerprint()


def _ranked_set(s: EvalSet, spec: dict, inputs: dict, numeric: dict, cache_dir: Path, sft_dir: Path, load: dict,
                judge_dir: Path, device, autocast) -> tuple[list[Example], list[torch.Tensor]]:
    """The eval set with n sampled replies per prompt, all scored by the judge, and their reference log-probs."""
    entry = stage_entry("ranked_eval", spec, {**inputs, "examples": s.examples.key}, numeric)

    def build(out: Path) -> None:
        tok, sft = models.load_saved(sft_dir, **load)
        sft.to(device)
        judge = TrainedRewardModel.load(judge_dir, device=device, autocast=autocast)
        generator = build_generator("hf", model=sft, tok=tok, device=device, max_prompt_length=spec["lengths"][0],
                                    batch_size=spec["batch_size"], autocast=autocast)
        stats: dict = {}
        examples = augment(list(s.examples.items), generator=generator, reward_model=judge, n=spec["n"],
                           temperature=spec["temperature"], top_p=spec["top_p"],
                           max_new_tokens=spec["max_new_tokens"], seed=spec["seed"], placeholder=tok.eos_token,
                           stop=spec["stop"], stats=stats)
        enc = encode(tok, examples, *spec["lengths"])
        ref = batching.all_response_logps(sft, enc, tok.pad_token_id, spec["batch_size"], device, autocast)
        write_examples(out / "examples.jsonl", examples)
        torch.save([t.clone() for t in ref], out / "ref_logps.pt")
        atomic_write_text(out / "stats.json", json.dumps(stats, indent=2))

    path, hit = cached(cache_dir, entry, build)
    examples = read_examples(path / "examples.jsonl")
    per_prompt = sum(e.n for e in examples) / max(1, len(examples))
    print(f"[ranked] {s.name}: {len(examples)} prompts, {per_prompt:.1f} judged replies each "
          f"({'cached' if hit else 'built'} {path})")
    return examples, torch.load(path / "ref_logps.pt", weights_only=True)


def _margins(job: Job, examples: list, ref: list, lengths: tuple[int, int], batch_size: int, device, autocast,
             load: dict) -> dict:
    """The run's two margins on the ranked examples: {"sft": 0s, "aligned": ..., "per_prompt": {...}}."""
    run = job.metrics["run"]
    tok, policy = models.load_saved(job.dir / "policy", **load)
    policy.to(device)
    enc = encode(tok, examples, *lengths)
    pol = batching.all_response_logps(policy, enc, tok.pad_token_id, batch_size, device, autocast)
    reward = run.get("reward_type", "ratio")
    rewards = [implicit_rewards(p, r, torch.tensor([float(len(x)) for x in e.responses]), reward=reward,
                                beta=float(run["beta"])) for p, r, e in zip(pol, ref, enc)]
    # r is passed as the policy's log-probs against a zero reference at beta 1 (exact)
    zeros = [torch.zeros_like(r) for r in rewards]
    means, per_prompt = evaluate.reward_margins(examples, rewards, zeros, beta=1.0)
    # the SFT policy is the reference: its ratio rewards, and margins, are 0; under a reference-free reward its
    # margins are its own, not measured here
    sft_means, sft_pp = evaluate.reward_margins(examples, zeros, zeros, beta=1.0) if reward == "ratio" else ({}, {})
    return {"sft": sft_means, "aligned": means, "per_prompt": {"sft": sft_pp, "aligned": per_prompt}}


if __name__ == "__main__":
    main()
