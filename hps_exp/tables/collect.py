"""Read what a sweep left on disk: every job dir (completed or not) with its metrics.json and Hydra overrides, the
values the tables need from a run, and the grid the jobs are checked against (the one `python -m hps_exp.sweep`
recorded at launch in `sweep_grid.json`, else the one expanded from the sweep yaml) to list never-started jobs."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hps_exp import sweep as sweep_mod

MAX_DEPTH = 3
# Per-prompt values are used for an interval only when their mean reproduces the run's scalar (a corpus-level
# metric such as corpus BLEU is not the mean of its per-prompt sentence scores).
PER_PROMPT_RTOL = 1e-6
# Per-prompt lists stored under another name than their scalar (metrics.json: per_prompt.aligned.win).
PER_PROMPT_ALIASES = {"win_rate": "win", "harmful_rate": "harmful"}
# metrics.json written before BLEU was named by its form (commit 3a82406) says "bleu" for both: the paper
# protocol's (it also writes bleu_char) is the sentence form, the default protocol's the corpus form.
LEGACY_BLEU = "bleu"
# Evaluation sets measured after the run by another command, in files beside metrics.json: {"eval": {set: ...}}
# (python -m hps_exp.ranked_margins). Read like the run's own sets; a name the run already has is not replaced.
POSTHOC_EVALS = ("ranked_margins.json",)


# ------------------------------------------------------------------------------------------ job dirs

@dataclass
class Run:
    """One job dir. status: completed | failed | missing | unreadable | whatever metrics.json says."""
    job_dir: Path
    status: str
    run: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    error: str | None = None
    overrides: list[str] = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    circular: bool = False  # metrics.json circular_eval: scored by the annotation reward model itself
    extra: dict = field(default_factory=dict)  # metrics.json's other blocks (reward_model, augment) for runs.csv
    warnings: list = field(default_factory=list)  # metrics.json warnings: divergence, skipped non-finite steps
    config: dict = field(default_factory=dict)  # metrics.json identity.config: every setting, flat (splits rows)
    sft_eval_key: str | None = None  # identity.stages' sft_eval key: runs sharing it re-report one SFT evaluation

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    @property
    def method(self) -> str:
        return str(self.run.get("method", "?"))


def _natural_key(path: Path) -> list:
    # Hydra job dirs are numbered: 2 sorts before 10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_job_dirs(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Dirs holding `.hydra/` or `metrics.json`, at most `max_depth` levels below root (root itself included)."""
    if (root / ".hydra").is_dir() or (root / "metrics.json").is_file():
        return [root]  # a job dir's own subdirs (checkpoints, ...) are not jobs
    if max_depth == 0:
        return []
    found = []
    for child in sorted(root.iterdir(), key=_natural_key):
        if child.is_dir() and not child.name.startswith("."):
            found += find_job_dirs(child, max_depth - 1)
    return found


def read_overrides(job_dir: Path) -> list[str]:
    """Hydra's `.hydra/overrides.yaml` (a list of "key=value"); the raw text if it is not a list."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml  # ships with hydra/omegaconf

    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, list):
        return [str(x) for x in data]
    return [text.strip()] if text.strip() else []


def _rename_legacy_bleu(ev: dict) -> None:
    """In place: eval.<set>.<stage>.bleu and eval.<set>.per_prompt.<stage>.bleu of an older metrics.json under
    the name this code reads (bleu_sentence where the stage also has bleu_char, else bleu_corpus)."""
    for stages in ev.values():
        if not isinstance(stages, dict):
            continue
        blocks = [v for k, v in stages.items() if k != "per_prompt"]
        if isinstance(stages.get("per_prompt"), dict):
            blocks += list(stages["per_prompt"].values())
        for block in blocks:
            if isinstance(block, dict) and LEGACY_BLEU in block \
                    and "bleu_corpus" not in block and "bleu_sentence" not in block:
                block["bleu_sentence" if "bleu_char" in block else "bleu_corpus"] = block.pop(LEGACY_BLEU)


def _posthoc_eval(path: Path) -> dict:
    """The "eval" block of a post-hoc evaluation file; {} when there is none. An unreadable one is said, not
    skipped silently."""
    if not path.is_file():
        return {}
    try:
        ev = json.loads(path.read_text(encoding="utf-8")).get("eval")
    except (OSError, ValueError, AttributeError) as e:
        print(f"[tables] warning: {path}: unreadable ({type(e).__name__}), its evaluation sets left out")
        return {}
    return ev if isinstance(ev, dict) else {}


def load_run(job_dir: Path) -> Run:
    overrides = read_overrides(job_dir)
    path = job_dir / "metrics.json"
    if not path.is_file():
        return Run(job_dir, "missing", error="no metrics.json (crashed, killed or still running)",
                   overrides=overrides)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return Run(job_dir, "unreadable", error=f"metrics.json: {e}", overrides=overrides)
    if not isinstance(data, dict):
        return Run(job_dir, "unreadable", error="metrics.json is not a JSON object", overrides=overrides)
    status = str(data.get("status", "unknown"))
    run, ev, timing = data.get("run"), data.get("eval"), data.get("timing")
    if status == "completed" and not (isinstance(run, dict) and run.get("method") and isinstance(ev, dict)):
        return Run(job_dir, "unreadable", error="metrics.json says completed but lacks run.method or eval",
                   overrides=overrides)
    if isinstance(ev, dict):
        _rename_legacy_bleu(ev)
        for name in POSTHOC_EVALS:
            for eval_set, block in _posthoc_eval(job_dir / name).items():
                ev.setdefault(eval_set, block)
    extra = {k: data[k] for k in ("reward_model", "augment") if isinstance(data.get(k), dict)}
    return Run(job_dir, status, run if isinstance(run, dict) else {}, ev if isinstance(ev, dict) else {},
               data.get("error"), overrides, timing if isinstance(timing, dict) else {},
               data.get("circular_eval") is True, extra,
               [str(w) for w in data.get("warnings") or []] if isinstance(data.get("warnings"), list) else [],
               _config_of(data), _stage_key_of(data, "sft_eval"))


def _config_of(data: dict) -> dict:
    identity = data.get("identity")
    config = identity.get("config") if isinstance(identity, dict) else None
    return config if isinstance(config, dict) else {}


def _stage_key_of(data: dict, stage: str) -> str | None:
    identity = data.get("identity")
    stages = identity.get("stages") if isinstance(identity, dict) else None
    keys = [e[1] for e in stages or [] if isinstance(e, list) and len(e) == 2 and e[0] == stage] \
        if isinstance(stages, list) else []
    return str(keys[0]) if len(keys) == 1 else None


def collect_runs(sweep_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    return [load_run(d) for root in sweep_dirs for d in find_job_dirs(Path(root))]


# --------------------------------------------------------------------------------------- read values

def as_number(v: Any) -> float | None:
    """v as a float when it is a finite int or float (not a bool), else None."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metric_of(run: Run, eval_set: str, stage: str, metric: str) -> float | None:
    stages = run.eval.get(eval_set)
    values = stages.get(stage) if isinstance(stages, dict) else None
    return as_number(values.get(metric)) if isinstance(values, dict) else None


def per_prompt_of(run: Run, eval_set: str, stage: str, metric: str) -> list[float] | None:
    """eval.<set>.per_prompt.<stage>.<metric> when it is a non-empty list of finite numbers whose mean is the
    run's scalar for that metric; None otherwise (old runs, corpus-level metrics)."""
    stages = run.eval.get(eval_set)
    pp = stages.get("per_prompt") if isinstance(stages, dict) else None
    pp = pp.get(stage) if isinstance(pp, dict) else None
    values = None
    if isinstance(pp, dict):
        values = pp.get(metric, pp.get(PER_PROMPT_ALIASES.get(metric, metric)))
    if not isinstance(values, list) or not values:
        return None
    maybe = [as_number(v) for v in values]
    nums = [v for v in maybe if v is not None]
    if len(nums) != len(maybe):
        return None
    scalar = metric_of(run, eval_set, stage, metric)
    if scalar is None or abs(statistics.fmean(nums) - scalar) > PER_PROMPT_RTOL * max(1.0, abs(scalar)):
        return None
    return nums


# ----------------------------------------------------------------------------------- never-started jobs

@dataclass
class Grid:
    """A sweep's jobs: as recorded by `python -m hps_exp.sweep` at launch, or expanded from its yaml."""
    name: str
    source: Path                      # the record or the yaml
    jobs: dict[str, list[list[str]]]  # arm -> job k's overrides
    dirs: list[Path]                  # where its `<arm>/<k>` job dirs live
    compare: dict = field(default_factory=dict)
    recorded: bool = False


@dataclass
class NeverStarted:
    sweep: str
    arm: str
    number: int
    overrides: list[str]


def find_grid_records(root: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Dirs at most `max_depth` below root (root included) holding a grid record; job dirs are not searched."""
    if (root / sweep_mod.GRID_RECORD).is_file():
        return [root]
    if max_depth == 0 or (root / ".hydra").is_dir() or (root / "metrics.json").is_file() or not root.is_dir():
        return []
    return [d for child in sorted(root.iterdir(), key=_natural_key)
            if child.is_dir() and not child.name.startswith(".") for d in find_grid_records(child, max_depth - 1)]


def _yaml_grid(name: str, sweep_dirs: list[Path]) -> Grid:
    s = sweep_mod.load(name)
    return Grid(name, s.path, sweep_mod.jobs(s), list(sweep_dirs), dict(s.compare))


def grids_of(runs: list[Run], sweep_dirs: list[Path], names: Iterable[str] | None = None
             ) -> tuple[list[Grid], list[str]]:
    """The grids to check the job dirs against, and notes. `names` (--sweep): those sweep yamls, as asked.
    Otherwise the grids recorded at launch under the sweep dirs (what ran, command-line extras included), and
    for each sweep the runs name (run.sweep, else the sweep dir's name) that has no record, its yaml: said in a
    note, since the yaml's seeds and values may not be the ones launched."""
    grids, notes = [], []
    if names is not None:
        for name in names:
            try:
                grids.append(_yaml_grid(name, sweep_dirs))
            except sweep_mod.SweepError as e:
                notes.append(f"sweep {name!r}: cannot list its grid ({e})")
        return grids, notes
    for d in dict.fromkeys(r for root in sweep_dirs for r in find_grid_records(root)):
        try:
            record = sweep_mod.read_grid_record(d)
            if record is None:   # find_grid_records saw the file: removed since by another process
                raise sweep_mod.SweepError(f"{d / sweep_mod.GRID_RECORD}: no longer exists")
        except sweep_mod.SweepError as e:
            notes.append(f"{e}: not used")
            continue
        grids.append(Grid(str(record.get("label") or record["sweep"]), d / sweep_mod.GRID_RECORD,
                          {arm: v["jobs"] for arm, v in record["arms"].items()}, [d],
                          record.get("compare") or {}, recorded=True))
    recorded = {g.name for g in grids}
    from_runs = sorted({str(r.run["sweep"]) for r in runs if r.run.get("sweep")})
    fallback = [n for n in from_runs if n not in recorded] if grids or notes else \
        (from_runs or [d.resolve().name for d in sweep_dirs])
    for name in fallback:
        try:
            grid = _yaml_grid(name, sweep_dirs)
        except sweep_mod.SweepError as e:
            notes.append(f"sweep {name!r}: no grid recorded at launch ({sweep_mod.GRID_RECORD}) and none to "
                         f"expand ({e})")
            continue
        grids.append(grid)
        notes.append(f"sweep {name!r}: no grid recorded at launch ({sweep_mod.GRID_RECORD}) under "
                     f"{', '.join(str(d) for d in sweep_dirs)}; its jobs are expanded from {grid.source}, whose "
                     "seeds and values may differ from what was launched")
    return grids, notes


def missing_jobs(runs: list[Run], grids: list[Grid]) -> list[NeverStarted]:
    """The grids' jobs with no job dir. A job counts as started when a job dir's overrides contain all of its
    overrides, or when `<dir>/<arm>/<job number>` exists (the runner's layout; covers jobs whose overrides
    were changed on the command line after the grid was expanded)."""
    seen = [set(r.overrides) for r in runs]
    missing = []
    for grid in grids:
        for arm, arm_jobs in grid.jobs.items():
            for k, job in enumerate(arm_jobs):
                if any(set(job) <= s for s in seen) or any((d / arm / str(k)).is_dir() for d in grid.dirs):
                    continue
                missing.append(NeverStarted(grid.name, arm, k, job))
    return missing

