"""Collect a sweep's `metrics.json` files into the paper's tables (Markdown + CSV) and plots.

    python -m hps_exp.tables SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--metric-margin reward_margin]
                             [--stage aligned] [--compare PREFERENCE_MODEL] [--sweep NAME]

Pipeline: collect_runs (every job dir, completed or not) -> rows (a method, split by settings that vary within
it; sorted by the loss's `run.row_order`) -> main_table / timing_table / ablation_table, every cell
"mean [lo, hi]" with a 95 % bootstrap interval (held-out prompts within seeds where the run reports per-prompt
values, else over seeds: hps_exp.stats) -> paired tests of the treatment preference model against the best
baseline of its framework -> render_markdown / render_csv -> make_plots. Failed and missing runs, and the grid's
jobs that never started, are listed, never dropped: the grid is the one `python -m hps_exp.sweep` recorded at
launch (`<sweep dir>/sweep_grid.json`, command-line extras included), or, for sweeps without a record, the one
expanded from the sweep yaml (said in a note).

No framework or preference-model name is known here: rows are ordered by `run.row_order` (supplied by the loss),
plots grouped by `run.framework` and coloured by `run.preference_model`, and the treatment of the paired test
comes from the sweep yaml (`compare: {treatment: X}`) or `--compare X`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hps_exp import stats
from hps_exp.data.schema import atomic_write_text

# Run settings that split one method into several rows when they vary within it.
GROUP_KEYS = ("train_dataset", "sampler", "n_responses", "gamma", "beta")
ABLATION_KEYS = ("n_responses", "gamma", "beta")
# Rows of the paired test are compared only when these agree (same data, same n).
COMPARABLE_KEYS = ("train_dataset", "n_responses")
KEY_LABELS = {"train_dataset": "train", "n_responses": "n_resp", "gamma": "γ", "beta": "β"}
METRIC_LABELS = {"bleu": "BLEU", "bleu_char": "BLEU (char)", "reward": "Reward", "reward_top1": "Reward top-1",
                 "reward_margin": "Reward margin", "reward_margin_hardest": "Reward margin (hardest)",
                 "win_rate": "Win rate vs SFT", "harmful_rate": "Harmful rate"}
TIMING_LABELS = {"pref_s": "Preference stage (s)", "pref_step_s": "Per preference step (s)",
                 "total_s": "Whole job (s)"}
# Recorded conditions of a job's timing (metrics.json timing), shown as ranges beside the cost: how many torch
# threads it used, and the machine's 1-minute load average at its start and end (absent in older runs).
SPAN_LABELS = {"threads": "Threads", "load": "Load avg (1 min) at start/end"}
MARGINS = ("reward_margin", "reward_margin_hardest")
# Main-table columns per eval set, in order; the optional ones only where some run reports them.
OPTIONAL_METRICS = ("bleu_char", "reward_top1", "win_rate", "harmful_rate")
LOWER_IS_BETTER = {"harmful_rate"}
MAX_DEPTH = 3
SFT_LABEL = "SFT (reference)"
LEVEL = 0.95
# Per-prompt values are used for an interval only when their mean reproduces the run's scalar (a corpus-level
# metric such as corpus BLEU is not the mean of its per-prompt sentence scores).
PER_PROMPT_RTOL = 1e-6
# Per-prompt lists stored under another name than their scalar (metrics.json: per_prompt.aligned.win).
PER_PROMPT_ALIASES = {"win_rate": "win", "harmful_rate": "harmful"}
# Okabe-Ito (colour-blind safe) then tab10-like extras: one colour per series, never reused; past the end,
# colours repeat with a hatch, so (colour, hatch) stays unique.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000",
           "#8C564B", "#7F7F7F", "#BCBD22", "#17BECF")
HATCHES = ("", "//", "..", "xx", "\\\\", "oo")


# ---------------------------------------------------------------------------------------------- collect

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
    extra = {k: data[k] for k in ("reward_model", "augment") if isinstance(data.get(k), dict)}
    return Run(job_dir, status, run if isinstance(run, dict) else {}, ev if isinstance(ev, dict) else {},
               data.get("error"), overrides, timing if isinstance(timing, dict) else {},
               data.get("circular_eval") is True, extra)


def collect_runs(sweep_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    return [load_run(d) for root in sweep_dirs for d in find_job_dirs(Path(root))]


# ------------------------------------------------------------------------------------------ read values

def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def metric_of(run: Run, eval_set: str, stage: str, metric: str) -> float | None:
    stages = run.eval.get(eval_set)
    values = stages.get(stage) if isinstance(stages, dict) else None
    return _number(values.get(metric)) if isinstance(values, dict) else None


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
    nums = [_number(v) for v in values]
    if any(v is None for v in nums):
        return None
    scalar = metric_of(run, eval_set, stage, metric)
    if scalar is None or abs(statistics.fmean(nums) - scalar) > PER_PROMPT_RTOL * max(1.0, abs(scalar)):
        return None
    return nums


# -------------------------------------------------------------------------------------------- aggregate

@dataclass
class Cell:
    mean: float
    lo: float
    hi: float
    n: int                  # samples (seeds) behind the cell
    per_prompt: bool        # interval over prompts within seeds (True) or over seeds only (False)
    std: float | None = None  # sample std over seeds (ddof=1), for the CSV; None with one seed


@dataclass
class Sample:
    """One seed's contribution to a cell: its scalar and, where usable, its per-prompt values."""
    value: float
    prompts: list[float] | None = None


def summarize_samples(samples: list[Sample], n_boot: int = stats.DEFAULT_N_BOOT, level: float = LEVEL) -> Cell | None:
    """Mean [lo, hi]: the two-level bootstrap when every sample has per-prompt values, else over seeds."""
    if not samples:
        return None
    values = [s.value for s in samples]
    std = statistics.stdev(values) if len(values) >= 2 else None
    if all(s.prompts for s in samples):
        _, lo, hi = stats.bootstrap_ci([s.prompts for s in samples], level, n_boot)
        per_prompt = True
    else:
        _, lo, hi = stats.bootstrap_ci_seeds(values, level, n_boot)
        per_prompt = False
    # The displayed mean is the mean of the scalars (equal to the bootstrap's point estimate when per-prompt
    # values are used, since they were checked to reproduce each scalar).
    return Cell(statistics.fmean(values), lo, hi, len(values), per_prompt, std)


def summarize(values: Iterable[Any], n_boot: int = stats.DEFAULT_N_BOOT) -> Cell | None:
    """Seeds-only cell from plain numbers (None entries skipped)."""
    return summarize_samples([Sample(v) for v in (_number(x) for x in values) if v is not None], n_boot)


def samples_of(runs: list[Run], eval_set: str, stage: str, metric: str) -> list[Sample]:
    out = []
    for r in runs:
        v = metric_of(r, eval_set, stage, metric)
        if v is not None:
            out.append(Sample(v, per_prompt_of(r, eval_set, stage, metric)))
    return out


def value_key(v: Any) -> tuple:
    """Sort None, then numbers, then strings (a gamma may be a schedule like "linear(0->1)")."""
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(v))


def fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _hashable(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None))) else json.dumps(v, sort_keys=True)


def row_order_of(run: Run) -> tuple:
    """The loss's [framework rank, preference-model rank]; runs without one sort after, alphabetically."""
    order = run.run.get("row_order")
    if isinstance(order, (list, tuple)) and order and all(_number(x) is not None for x in order):
        return (0, tuple(float(x) for x in order))
    return (1, ())


def varying_keys(runs: list[Run], keys: Iterable[str] = GROUP_KEYS) -> dict[str, list[str]]:
    """Per method, the setting keys that take two or more values among its runs."""
    keys = list(keys)
    seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in runs:
        for k in keys:
            seen[r.method][k].add(_hashable(r.run.get(k)))
    return {m: [k for k in keys if len(vs[k]) > 1] for m, vs in seen.items()}


@dataclass
class Row:
    label: str
    method: str
    settings: tuple            # ((key, value), ...) that split this method
    runs: list[Run]

    def _common(self, key: str) -> Any:
        return self.runs[0].run.get(key) if self.runs else None

    @property
    def framework(self) -> str:
        return str(self._common("framework") or "")

    @property
    def preference_model(self) -> str:
        return str(self._common("preference_model") or self.method)

    @property
    def series(self) -> str:
        """What the plots colour by: the preference model plus the settings that split the row."""
        return row_label(self.preference_model, self.settings)

    def comparable(self) -> tuple:
        return tuple(_hashable(self._common(k)) for k in COMPARABLE_KEYS)


def build_rows(runs: list[Run], exclude: Iterable[str] = ()) -> list[Row]:
    """A row is a method, split by the settings that vary within it (e.g. "DPO-HPS (γ=0.5)") so different
    hyperparameters are never averaged together; rows sorted by run.row_order, then method, then settings."""
    excluded = set(exclude)
    vary = {m: [k for k in ks if k not in excluded] for m, ks in varying_keys(runs).items()}
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        settings = tuple((k, _hashable(r.run.get(k))) for k in vary[r.method])
        groups[(r.method, settings)].append(r)
    ordered = sorted(groups, key=lambda g: (row_order_of(groups[g][0]), g[0], [value_key(v) for _, v in g[1]]))
    return [Row(row_label(m, s), m, s, groups[(m, s)]) for m, s in ordered]


def row_label(method: str, settings: tuple) -> str:
    if not settings:
        return method
    return f"{method} (" + ", ".join(f"{KEY_LABELS.get(k, k)}={fmt_value(v)}" for k, v in settings) + ")"


@dataclass
class Table:
    title: str
    rows: list[str]
    columns: list[tuple[str, Any]]  # (eval set, metric name | ablation value)
    headers: list[str]              # one per column
    cells: dict[tuple[str, tuple[str, Any]], Cell]
    n: dict[str, int]               # completed runs behind each row
    reference_rows: set[str] = field(default_factory=set)  # shown, not ranked (SFT)
    ranked: bool = True             # bold the best cell of each column
    notes: list[str] = field(default_factory=list)
    row_info: dict[str, Row] = field(default_factory=dict)
    row_runs: dict[str, list[Run]] = field(default_factory=dict)  # SFT rows' runs (for the circular mark)
    mark_circular: bool = True  # results tables mark circularly evaluated rows; the cost table does not
    span_columns: list[str] = field(default_factory=list)  # SPAN_LABELS keys shown after the cells
    spans: dict[tuple[str, str], Span] = field(default_factory=dict)

    def cell(self, row: str, col: tuple[str, Any]) -> Cell | None:
        return self.cells.get((row, col))

    def circular(self, row: str) -> tuple[int, int]:
        """(circularly evaluated runs, runs) behind a row."""
        if not self.mark_circular:
            return 0, 0
        runs = self.row_info[row].runs if row in self.row_info else self.row_runs.get(row, [])
        return sum(r.circular for r in runs), len(runs)


@dataclass
class Span:
    """Lowest and highest of recorded values (no interval: conditions of a run, not results)."""
    lo: float
    hi: float
    mean: float
    n: int                  # runs that recorded it
    source: str = ""        # how the value was chosen, when every run says the same (threads_source)


def span_of(runs: list[Run], key: str) -> Span | None:
    """threads: timing.threads (with timing.threads_source); load: timing.load_start and load_end."""
    fields = ("load_start", "load_end") if key == "load" else (key,)
    per_run = [[v for f in fields if (v := _number(r.timing.get(f))) is not None] for r in runs]
    values = [v for vs in per_run for v in vs]
    if not values:
        return None
    sources = {str(r.timing.get("threads_source")) for r, vs in zip(runs, per_run)
               if vs and r.timing.get("threads_source")} if key == "threads" else set()
    return Span(min(values), max(values), statistics.fmean(values), sum(1 for vs in per_run if vs),
                sources.pop() if len(sources) == 1 else "mixed" if sources else "")


def _seed_notes(label: str, runs: list[Run]) -> list[str]:
    seeds = [r.run.get("seed") for r in runs]
    dup = sorted({fmt_value(s) for s in seeds if seeds.count(s) > 1})
    return [f"{label}: seed(s) {', '.join(dup)} appear more than once; each run counts as one sample."] if dup else []


def _by_seed(runs: list[Run]) -> dict[Any, list[Run]]:
    out: dict[Any, list[Run]] = defaultdict(list)
    for r in runs:
        out[_hashable(r.run.get("seed"))].append(r)
    return out


def _sft_rows(done: list[Run], columns: list[tuple[str, str]], n_boot: int,
              circular: dict[str, list[Run]] | None = None) -> tuple[dict, dict]:
    """SFT metrics, one row per SFT policy: per train set and number of responses (both change the SFT data).
    Every method's run re-reports the same SFT policy of its seed, so one sample per seed: the mean of the runs'
    scalars, with the first run's per-prompt values."""
    by_train: dict[Any, list[Run]] = defaultdict(list)
    for r in done:
        by_train[(_hashable(r.run.get("train_dataset")), _hashable(r.run.get("n_responses")))].append(r)
    trains = {t for t, _ in by_train}
    ns = {n_resp for _, n_resp in by_train}
    cells, n = {}, {}
    for train in sorted(by_train, key=lambda k: (value_key(k[0]), value_key(k[1]))):
        parts = ([f"train={fmt_value(train[0])}"] if len(trains) > 1 else []) + \
                ([f"{KEY_LABELS['n_responses']}={fmt_value(train[1])}"] if len(ns) > 1 else [])
        label = SFT_LABEL if not parts else f"SFT (reference, {', '.join(parts)})"
        by_seed = _by_seed(by_train[train])
        for col in columns:
            samples = []
            for rs in by_seed.values():
                seed_samples = samples_of(rs, col[0], "sft", col[1])
                if seed_samples:
                    samples.append(Sample(statistics.fmean(s.value for s in seed_samples), seed_samples[0].prompts))
            cell = summarize_samples(samples, n_boot)
            if cell is not None:
                cells[(label, col)] = cell
        if any(key[0] == label for key in cells):
            n[label] = len(by_seed)
            if circular is not None:
                circular[label] = by_train[train]
    return cells, n


def main_columns(done: list[Run], stage: str, margin: str | tuple[str, ...]) -> list[tuple[str, str]]:
    margins = [margin] if isinstance(margin, str) else list(margin)
    eval_sets = sorted({e for r in done for e in r.eval})
    columns: list[tuple[str, str]] = []
    for e in eval_sets:
        present = {m for m in OPTIONAL_METRICS
                   if any(metric_of(r, e, s, m) is not None for r in done for s in (stage, "sft"))}
        metrics = ["bleu"] + [m for m in ("bleu_char",) if m in present] + ["reward"] \
            + [m for m in ("reward_top1",) if m in present] + margins \
            + [m for m in ("win_rate", "harmful_rate") if m in present]
        columns += [(e, m) for m in metrics]
    return columns


def main_table(runs: list[Run], stage: str = "aligned", margin: str | tuple[str, ...] = "reward_margin",
               n_boot: int = stats.DEFAULT_N_BOOT) -> Table:
    """Rows = methods (+ the SFT reference), columns = per eval set: BLEU [, BLEU (char)], Reward [, top-1],
    margin (or several: the plots' table) [, win rate] [, harmful rate]."""
    done = [r for r in runs if r.ok]
    columns = main_columns(done, stage, margin)
    headers = [f"{e} · {METRIC_LABELS.get(m, m)} {'↓' if m in LOWER_IS_BETTER else '↑'}" for e, m in columns]
    table = Table(f"Main results ({stage} policy)", [], columns, headers, {}, {})
    if stage != "sft":
        sft_cells, sft_n = _sft_rows(done, columns, n_boot, table.row_runs)
        table.cells.update(sft_cells)
        table.n.update(sft_n)
        table.rows += list(sft_n)
        table.reference_rows = set(sft_n)
    for row in build_rows(done):
        table.rows.append(row.label)
        table.row_info[row.label] = row
        table.n[row.label] = len(row.runs)
        table.notes += _seed_notes(row.label, row.runs)
        for col in columns:
            cell = summarize_samples(samples_of(row.runs, col[0], stage, col[1]), n_boot)
            if cell is not None:
                table.cells[(row.label, col)] = cell
    return table


def timing_table(runs: list[Run], n_boot: int = stats.DEFAULT_N_BOOT) -> Table | None:
    """The paper's cost table: preference-stage time and time per preference step per row (over seeds)."""
    done = [r for r in runs if r.ok]
    keys = [k for k in TIMING_LABELS if any(_number(r.timing.get(k)) is not None for r in done)]
    if not keys:
        return None
    columns = [("timing", k) for k in keys]
    table = Table("Training cost (wall-clock seconds)", [], columns, [f"{TIMING_LABELS[k]} ↓" for k in keys],
                  {}, {}, ranked=False, mark_circular=False)
    for row in build_rows(done):
        table.rows.append(row.label)
        table.row_info[row.label] = row
        table.n[row.label] = len(row.runs)
        for col in columns:
            cell = summarize((r.timing.get(col[1]) for r in row.runs), n_boot)
            if cell is not None:
                table.cells[(row.label, col)] = cell
        for key in SPAN_LABELS:
            if (span := span_of(row.runs, key)) is not None:
                table.spans[(row.label, key)] = span
    table.span_columns = [k for k in SPAN_LABELS if any(key == k for _, key in table.spans)]
    if table.span_columns:
        table.notes.append("Threads: torch threads per job (how they were chosen, in brackets); load: the machine's "
                           "1-minute load average at each job's start and end, lowest–highest over the row's jobs. "
                           "A job that ran at a load above the machine's cores took longer than its method costs.")
    return table


def ablation_table(runs: list[Run], key: str, metric: str = "reward_margin", stage: str = "aligned",
                   n_boot: int = stats.DEFAULT_N_BOOT) -> Table | None:
    """`metric` vs the values of `key` (n_responses, gamma, beta, ...): rows = methods in which `key` takes
    two or more values, columns = (eval set, value). None when no method varies `key`."""
    done = [r for r in runs if r.ok]
    rows: dict[str, dict[Any, list[Run]]] = {}
    info: dict[str, Row] = {}
    for row in build_rows(done, exclude=[key]):
        by_value: dict[Any, list[Run]] = defaultdict(list)
        for r in row.runs:
            by_value[_hashable(r.run.get(key))].append(r)
        if len(by_value) > 1:
            rows[row.label], info[row.label] = by_value, row
    if not rows:
        return None
    eval_sets = sorted({e for by_value in rows.values() for rs in by_value.values() for r in rs for e in r.eval})
    values = sorted({v for by_value in rows.values() for v in by_value}, key=value_key)
    columns = [(e, v) for e in eval_sets for v in values]
    name = KEY_LABELS.get(key, key)
    headers = [f"{e} · {name}={fmt_value(v)}" for e, v in columns]
    table = Table(f"{METRIC_LABELS.get(metric, metric)} vs {name} ({stage} policy)", list(rows), columns,
                  headers, {}, {}, ranked=False, row_info=info)
    for label, by_value in rows.items():
        table.n[label] = max(len(rs) for rs in by_value.values())  # seeds per value; cells with fewer say so
        for col in columns:
            cell = summarize_samples(samples_of(by_value.get(col[1], []), col[0], stage, metric), n_boot)
            if cell is not None:
                table.cells[(label, col)] = cell
    return table


def best_rows(table: Table, col: tuple[str, Any], decimals: int) -> set[str]:
    """Rows holding the best mean of a column, compared as displayed (so ties on screen are all bold)."""
    lower = col[1] in LOWER_IS_BETTER
    means = {row: round(c.mean, decimals) for row in table.rows if row not in table.reference_rows
             and (c := table.cell(row, col)) is not None and math.isfinite(c.mean)}
    if not means:
        return set()
    best = min(means.values()) if lower else max(means.values())
    return {row for row, m in means.items() if m == best}


# ------------------------------------------------------------------------------------------ paired tests

@dataclass
class PairedResult:
    eval_set: str
    metric: str
    framework: str
    treatment: str      # row label
    baseline: str       # row label: the best other preference model of the framework by mean
    diff: float         # mean over pairs of treatment - baseline
    n_seeds: int
    n_pairs: int
    per_prompt: bool    # paired by (seed, prompt); False: by seed only
    p: float
    circular: bool = False  # a run on either side was scored by its annotation reward model


def _one_per_seed(runs: list[Run]) -> dict[Any, Run]:
    out: dict[Any, Run] = {}
    for r in runs:
        out.setdefault(_hashable(r.run.get("seed")), r)  # duplicates of a seed: the first run (noted elsewhere)
    return out


def paired_comparison(t_runs: list[Run], b_runs: list[Run], eval_set: str, stage: str, metric: str,
                      ) -> tuple[list[list[float]], list[list[float]], bool] | None:
    """Treatment and baseline values paired by (seed, prompt) over their common seeds, or by seed when a seed
    lacks per-prompt values of equal length on both sides. None without a common seed."""
    t_seed, b_seed = _one_per_seed(t_runs), _one_per_seed(b_runs)
    common = [s for s in sorted(t_seed, key=value_key) if s in b_seed
              and metric_of(t_seed[s], eval_set, stage, metric) is not None
              and metric_of(b_seed[s], eval_set, stage, metric) is not None]
    if not common:
        return None
    tp = [per_prompt_of(t_seed[s], eval_set, stage, metric) for s in common]
    bp = [per_prompt_of(b_seed[s], eval_set, stage, metric) for s in common]
    if all(x is not None and y is not None and len(x) == len(y) for x, y in zip(tp, bp)):
        return tp, bp, True
    return ([[metric_of(t_seed[s], eval_set, stage, metric)] for s in common],
            [[metric_of(b_seed[s], eval_set, stage, metric)] for s in common], False)


def paired_tests(runs: list[Run], treatment: str, stage: str = "aligned", metrics: Iterable[str] = MARGINS,
                 baselines: Iterable[str] | None = None) -> list[PairedResult]:
    """For each eval set and margin metric: each row whose preference model is `treatment` against the row of
    the same framework (and same train set and n) with the best mean among the baseline preference models
    (`baselines`; default: every other preference model)."""
    allowed = set(baselines) if baselines else None
    done = [r for r in runs if r.ok]
    rows = build_rows(done)
    eval_sets = sorted({e for r in done for e in r.eval})
    results = []
    for metric in metrics:
        for e in eval_sets:
            means = {row.label: statistics.fmean(s.value for s in samples) for row in rows
                     if (samples := samples_of(row.runs, e, stage, metric))}
            for t in rows:
                if t.preference_model != treatment or t.label not in means:
                    continue
                candidates = [b for b in rows if b.framework == t.framework and b.preference_model != treatment
                              and (allowed is None or b.preference_model in allowed)
                              and b.comparable() == t.comparable() and b.label in means]
                if not candidates:
                    continue
                best = max(candidates, key=lambda b: means[b.label])
                paired = paired_comparison(t.runs, best.runs, e, stage, metric)
                if paired is None:
                    continue
                a, b, per_prompt = paired
                diffs = [x - y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
                results.append(PairedResult(e, metric, t.framework, t.label, best.label, statistics.fmean(diffs),
                                            len(a), len(diffs), per_prompt, stats.paired_test(a, b),
                                            any(r.circular for r in t.runs + best.runs)))
    return results


def render_paired(results: list[PairedResult], treatment: str | None, decimals: int,
                  baselines: list[str] | None = None) -> str:
    if treatment is None:
        return ("No treatment named: set `compare: {treatment: <preference model>}` in the sweep yaml or pass "
                "`--compare <preference model>`.")
    among = ", ".join(baselines) if baselines else "every other preference model"
    if not results:
        return (f"No row with preference model {treatment!r} has a baseline ({among}) of the same framework to "
                "compare with.")
    lines = [f"Two-sided paired sign-flip permutation test (hps_exp.stats.paired_test) of each {treatment} row "
             f"against the best of its framework's baselines ({among}) by mean; pairs = (seed, held-out "
             "prompt) where the runs report per-prompt values, else seeds. Δ = treatment − baseline.", "",
             "| Eval set | Metric | Treatment | Best baseline | Δ | pairs | p | treatment better at p < 0.05 |",
             "|:---|:---|:---|:---|---:|---:|---:|:---|"]
    for r in results:
        pairs = f"{r.n_pairs}" + ("" if r.per_prompt else " (seeds)")
        # a difference within float rounding (e.g. n = 2, where the losses coincide) is no difference
        better = "equal" if abs(r.diff) <= 1e-6 else "yes" if r.diff > 0 and r.p < 0.05 else "no"
        treatment_text = f"{r.treatment} {CIRCULAR_MARK}" if r.circular else r.treatment
        lines.append(f"| {_md(r.eval_set)} | {_md(METRIC_LABELS.get(r.metric, r.metric))} | {_md(treatment_text)} | "
                     f"{_md(r.baseline)} | {r.diff:+.{decimals}f} | {pairs} | {stats.fmt_p(r.p)} | {better} |")
    if any(r.circular for r in results):
        lines += ["", CIRCULAR_NOTE]
    return "\n".join(lines)


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
    from hps_exp.sweep import GRID_RECORD

    if (root / GRID_RECORD).is_file():
        return [root]
    if max_depth == 0 or (root / ".hydra").is_dir() or (root / "metrics.json").is_file() or not root.is_dir():
        return []
    return [d for child in sorted(root.iterdir(), key=_natural_key)
            if child.is_dir() and not child.name.startswith(".") for d in find_grid_records(child, max_depth - 1)]


def _yaml_grid(name: str, sweep_dirs: list[Path]) -> Grid:
    from hps_exp import sweep as sweep_mod

    s = sweep_mod.load(name)
    return Grid(name, s.path, sweep_mod.jobs(s), list(sweep_dirs), dict(s.compare))


def grids_of(runs: list[Run], sweep_dirs: list[Path], names: Iterable[str] | None = None
             ) -> tuple[list[Grid], list[str]]:
    """The grids to check the job dirs against, and notes. `names` (--sweep): those sweep yamls, as asked.
    Otherwise the grids recorded at launch under the sweep dirs (what ran, command-line extras included), and
    for each sweep the runs name (run.sweep, else the sweep dir's name) that has no record, its yaml: said in a
    note, since the yaml's seeds and values may not be the ones launched."""
    from hps_exp import sweep as sweep_mod

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


def never_started(runs: list[Run], sweep_dirs: list[Path], sweep_names: Iterable[str] | None = None
                  ) -> tuple[list[NeverStarted], list[str]]:
    """(jobs of the grid that never started, notes): grids_of + missing_jobs."""
    grids, notes = grids_of(runs, sweep_dirs, sweep_names)
    return missing_jobs(runs, grids), notes


def render_never_started(missing: list[NeverStarted], grids: list[Grid], notes: list[str]) -> str:
    parts = [f"- {n}" for n in notes]
    if not missing:
        described = ", ".join(f"{g.name}, {'recorded at launch' if g.recorded else 'from its yaml'}" for g in grids)
        parts.append(f"None: every job of the grid ({described}) has a job dir." if grids else "No grid to check.")
        return "\n".join(parts)
    parts += ["| Sweep | Arm | Job | Overrides |", "|:---|:---|---:|:---|"]
    for m in missing:
        parts.append(f"| {_md(m.sweep)} | {_md(m.arm)} | {m.number} | "
                     f"{_md(' '.join(f'`{o}`' for o in m.overrides))} |")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------- render

def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_cell(cell: Cell | None, decimals: int, row_n: int | None = None, bold: bool = False) -> str:
    if cell is None:
        return "–"
    text = f"{cell.mean:.{decimals}f} [{cell.lo:.{decimals}f}, {cell.hi:.{decimals}f}]"
    if not cell.per_prompt:
        text += "†"  # interval over seeds only
    if row_n is not None and cell.n != row_n:
        text += f" (n={cell.n})"  # fewer seeds than the row's other cells
    return f"**{text}**" if bold else text


def fmt_span(span: Span | None, key: str, decimals: int, row_n: int | None = None) -> str:
    if span is None:
        return "–"
    fmt = (lambda v: f"{v:g}") if key == "threads" else (lambda v: f"{v:.{decimals}f}")  # noqa: E731
    text = fmt(span.lo) if fmt(span.lo) == fmt(span.hi) else f"{fmt(span.lo)}–{fmt(span.hi)}"
    if span.source:
        text += f" ({span.source})"
    if row_n is not None and span.n != row_n:
        text += f" (n={span.n})"
    return text


CIRCULAR_MARK = "‡"
CIRCULAR_NOTE = (f"{CIRCULAR_MARK} circular evaluation (metrics.json `circular_eval`): the evaluation reward model is "
                 "the annotation one, whose labels the policy was trained on, so its reward, margins and win rate "
                 "can reward gaming the annotator; (k/n) = k of the row's n runs.")


def row_text(table: Table, row: str) -> str:
    k, n = table.circular(row)
    return row if not k else f"{row} {CIRCULAR_MARK}" if k == n else f"{row} {CIRCULAR_MARK} ({k}/{n})"


def render_table(table: Table, decimals: int = 2) -> str:
    bold = {col: best_rows(table, col, decimals) for col in table.columns} if table.ranked else {}
    headers = [*table.headers, *(SPAN_LABELS[k] for k in table.span_columns)]
    lines = ["| Method | n | " + " | ".join(_md(h) for h in headers) + " |",
             "|:---|---:|" + "---:|" * len(headers)]
    for row in table.rows:
        cells = [fmt_cell(table.cell(row, col), decimals, table.n.get(row), row in bold.get(col, ()))
                 for col in table.columns]
        cells += [_md(fmt_span(table.spans.get((row, k)), k, decimals, table.n.get(row))) for k in table.span_columns]
        lines.append(f"| {_md(row_text(table, row))} | {table.n.get(row, 0)} | " + " | ".join(cells) + " |")
    if any(table.circular(row)[0] for row in table.rows):
        lines += ["", CIRCULAR_NOTE]
    return "\n".join(lines)


def problem_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if not r.ok]


def render_failed(runs: list[Run]) -> str:
    bad = problem_runs(runs)
    if not bad:
        return f"None: all {len(runs)} job dirs completed."
    lines = ["| Job dir | Status | Method | Overrides | Error |", "|:---|:---|:---|:---|:---|"]
    for r in bad:
        overrides = " ".join(f"`{o}`" for o in r.overrides) or "–"
        lines.append(f"| {_md(r.job_dir)} | {_md(r.status)} | {_md(r.run.get('method', '–'))} | "
                     f"{_md(overrides)} | {_md(r.error or '–')} |")
    return "\n".join(lines)


@dataclass
class Report:
    runs: list[Run]
    main: Table
    ablations: dict[str, Table]
    timing: Table | None
    paired: list[PairedResult]
    treatment: str | None
    baselines: list[str] | None
    never: list[NeverStarted]
    grids: list[Grid]
    never_notes: list[str]


def render_markdown(report: Report, sweep_dirs: list[Path], command: str, decimals: int = 2) -> str:
    runs = report.runs
    done, bad = [r for r in runs if r.ok], problem_runs(runs)
    parts = [
        f"# Results: {', '.join(str(d) for d in sweep_dirs)}",
        f"{len(done)} completed run(s), {len(bad)} failed or missing, out of {len(runs)} job dir(s); "
        f"{len(report.never)} job(s) of the grid never started.",
        f"Cells: mean [lo, hi] with a {LEVEL:.0%} percentile bootstrap interval: seeds resampled, then held-out "
        "prompts within each seed, where the runs report per-prompt values; † = interval over seeds only (no "
        "per-prompt values, e.g. corpus BLEU or timings; with one seed it collapses to the mean). "
        "n = completed runs (seeds) behind the row; a cell with fewer says so as (n=k). "
        "**Bold** = best mean of the column as displayed (highest for ↑, lowest for ↓; ties all bold); "
        "SFT reference rows are not ranked.",
        f"## {report.main.title}",
        render_table(report.main, decimals),
    ]
    parts += [f"- {note}" for note in report.main.notes]
    parts += ["## Paired tests (reward margin)",
              render_paired(report.paired, report.treatment, decimals + 1, report.baselines)]
    if report.timing is not None:
        parts += [f"## {report.timing.title}", render_table(report.timing, decimals)]
        parts += [f"- {note}" for note in report.timing.notes]
    for table in report.ablations.values():
        parts += [f"## Ablation: {table.title}", render_table(table, decimals)]
    parts += ["## Failed or missing runs", render_failed(runs),
              "## Jobs of the grid that never started",
              render_never_started(report.never, report.grids, report.never_notes),
              "## Command", f"```\n{command}\n```"]
    return "\n\n".join(parts) + "\n"


def render_csv(table: Table, timing: Table | None = None) -> str:
    """Tidy format: one row per cell of the main table (and of the timing table, eval_set = "timing")."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "eval_set", "metric", "mean", "lo", "hi", "interval", "std", "n_seeds"])
    for t in (table, timing):
        if t is None:
            continue
        for row in t.rows:
            for col in t.columns:
                cell = t.cell(row, col)
                if cell is not None:
                    writer.writerow([row, col[0], col[1], repr(cell.mean), repr(cell.lo), repr(cell.hi),
                                     "prompts_x_seeds" if cell.per_prompt else "seeds",
                                     "" if cell.std is None else repr(cell.std), cell.n])
            for key in t.span_columns:  # recorded conditions: lowest / highest, no interval
                if (span := t.spans.get((row, key))) is not None:
                    writer.writerow([row, "timing", key, repr(span.mean), repr(span.lo), repr(span.hi), "range",
                                     "", span.n])
    return buf.getvalue()


def scalar_metrics(run: Run) -> dict[str, Any]:
    """Every scalar a job reports, flattened: eval/<set>/<stage>/<metric>, timing/<key>, reward_model/<key>,
    augment/<key> (per-prompt lists and samples left out)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k != "per_prompt":
                    walk(f"{prefix}/{k}", v)
        elif isinstance(node, (int, float, str)) or node is None:
            out[prefix] = node
    walk("eval", run.eval)
    walk("timing", run.timing)
    for name, block in run.extra.items():
        walk(name, block)
    return out


RUNS_FIXED = ["job_dir", "status", "method", "seed", "circular_eval", "overrides", "command", "error"]


def render_runs_csv(runs: list[Run]) -> str:
    """One row per job dir (completed or not): its overrides, seed, every scalar metric, and the command that
    reruns it (`python -m hps_exp` with the job's own overrides; add hydra.run.dir=... and a fresh cache_dir
    to retrain rather than reuse the cached stages)."""
    metrics = [scalar_metrics(r) for r in runs]
    columns = list(dict.fromkeys(k for m in metrics for k in m))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RUNS_FIXED + columns)
    for r, m in zip(runs, metrics):
        seed = r.run.get("seed", next((o.split("=", 1)[1] for o in r.overrides if o.startswith("seed=")), ""))
        fixed = [str(r.job_dir), r.status, r.run.get("method", ""), seed, "true" if r.circular else "",
                 " ".join(r.overrides), shlex.join(["python", "-m", "hps_exp", *r.overrides]), r.error or ""]
        writer.writerow(fixed + ["" if m.get(c) is None else repr(m[c]) if isinstance(m[c], float) else m[c]
                                 for c in columns])
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ plots

def _save_png(fig, path: Path) -> None:
    # Render to memory, then temp file + rename: a crash never leaves half a PNG.
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file 0600; a plot is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def series_styles(rows: list[Row]) -> dict[str, tuple[str, str]]:
    """Series (preference model + split settings) -> (colour, hatch), in row order: never two alike."""
    def key(row: Row) -> tuple:  # by preference-model rank (row_order[1:]), then name
        flag, order = row_order_of(row.runs[0]) if row.runs else (1, ())
        return (flag, order[1:], row.series)
    series = list(dict.fromkeys(row.series for row in sorted(rows, key=key)))
    return {s: (PALETTE[i % len(PALETTE)], HATCHES[(i // len(PALETTE)) % len(HATCHES)]) for i, s in enumerate(series)}


def _err(cells: list[Cell | None]) -> list[list[float]]:
    """Asymmetric error bars (below, above the mean) from the intervals."""
    return [[max(0.0, c.mean - c.lo) if c else 0.0 for c in cells],
            [max(0.0, c.hi - c.mean) if c else 0.0 for c in cells]]


def plot_main(plt, main: Table, margins: Iterable[str], path: Path) -> None:
    """One panel row per (framework, eval set), one column per metric (BLEU, reward, then every margin given,
    e.g. the mean and the hardest-negative one): a bar per preference model (the same colour and place in every
    panel), the intervals as error bars, SFT as a dashed line, and the values in a strip along the top of each
    panel, above every error bar (never on one)."""
    rows = [main.row_info[r] for r in main.rows if r in main.row_info]
    margins = [m for m in margins if any(c[1] == m for c in main.columns)]
    eval_sets = sorted({e for e, m in main.columns if m in margins})
    metrics = [m for m in ("bleu", "reward") if any(c[1] == m for c in main.columns)] + margins
    frameworks = list(dict.fromkeys(row.framework for row in rows))
    panels = [(fw, e) for fw in frameworks for e in eval_sets]
    styles = series_styles(rows)
    series = list(styles)
    vertical = len(series) > 5  # many bars: labels turned, so they keep to their bar
    fig, axes = plt.subplots(len(panels), len(metrics), squeeze=False, sharex=True,
                             figsize=(max(2.4, 0.45 * len(series) + 0.6) * len(metrics), 2.1 * len(panels) + 0.9))
    for i, (fw, e) in enumerate(panels):
        for j, m in enumerate(metrics):
            ax = axes[i][j]
            bars = []
            for k, s in enumerate(series):
                match = [row for row in rows if row.framework == fw and row.series == s]
                cell = main.cell(match[0].label, (e, m)) if match else None
                if cell is None:
                    continue
                colour, hatch = styles[s]
                ax.bar([k], [cell.mean], 0.8, yerr=_err([cell]), capsize=2, color=colour, hatch=hatch,
                       edgecolor="white" if not hatch else "black", linewidth=0.5, label=s)
                bars.append((k, cell))
            sft = [main.cell(r, (e, m)) for r in main.rows if r in main.reference_rows]
            values = [v for _, c in bars for v in (c.lo, c.hi, c.mean)] + [0.0]
            if sft and sft[0] is not None and m not in margins:
                ax.axhline(sft[0].mean, color="0.4", linestyle="--", linewidth=1, label=SFT_LABEL)
                values.append(sft[0].mean)
            ax.axhline(0.0, color="black", linewidth=0.6)
            lo, hi = min(values), max(values)
            span = (hi - lo) or 1.0
            strip = 0.32 if vertical else 0.16  # the top share of the panel that holds the value labels
            top = hi + 0.03 * span
            ax.set_ylim(lo - 0.05 * span, top + (top - (lo - 0.05 * span)) * strip / (1 - strip))
            for k, c in bars:  # x in data, y in axes coordinates: inside the strip, above every error bar
                ax.annotate(f"{c.mean:.2f}", (k, 0.985), xycoords=ax.get_xaxis_transform(), ha="center",
                            va="top", fontsize=6.5, rotation=90 if vertical else 0)
            ax.set_xticks(range(len(series)), series, rotation=30, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
            if i == 0:
                ax.set_title(METRIC_LABELS.get(m, m), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{fw.upper() or '–'} · {e}", fontsize=9, fontweight="bold")
    handles, labels = [], []
    for ax in axes.flat:  # the union of legends, once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), fontsize=8, title_fontsize=9,
               title=f"Mean over seeds, error bars = {LEVEL:.0%} bootstrap interval", bbox_to_anchor=(0.5, 1.0))
    _save_png(fig, path)
    plt.close(fig)


def plot_ablation(plt, table: Table, key: str, metric: str, path: Path) -> None:
    """Metric vs the ablation value, one line per method, one panel per eval set, intervals as error bars."""
    eval_sets = sorted({e for e, _ in table.columns})
    values = [v for e, v in table.columns if e == eval_sets[0]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    fig, axes = plt.subplots(1, len(eval_sets), figsize=(5.0 * len(eval_sets), 3.8), squeeze=False)
    markers = "osD^v<>p"
    for ax, e in zip(axes[0], eval_sets):
        for i, row in enumerate(table.rows):
            pts = [(v, c) for v in values if (c := table.cell(row, (e, v))) is not None]
            xs = [v if numeric else values.index(v) for v, _ in pts]
            ax.errorbar(xs, [c.mean for _, c in pts], yerr=_err([c for _, c in pts]), marker=markers[i % len(markers)],
                        capsize=3, label=row, color=PALETTE[i % len(PALETTE)])  # one colour per line
        ax.set_xticks(values if numeric else range(len(values)), [fmt_value(v) for v in values])
        ax.set_xlabel(KEY_LABELS.get(key, key))
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(e)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{table.title}; error bars = {LEVEL:.0%} bootstrap interval", fontsize=9)
    _save_png(fig, path)
    plt.close(fig)


def make_plots(main: Table, ablations: dict[str, Table], out: Path, margin: str,
               plot_table: Table | None = None) -> list[Path]:
    """`<margin>.png` (from plot_table, which carries both margins, else the main table) and `vs_<key>.png`."""
    try:
        import matplotlib  # lazy: the tables work without it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[tables] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    if any(m == margin for _, m in main.columns) and main.row_info:
        plot_main(plt, plot_table or main, [margin, *(m for m in MARGINS if m != margin)], out / f"{margin}.png")
        written.append(out / f"{margin}.png")
    for key, table in ablations.items():
        plot_ablation(plt, table, key, margin, out / f"vs_{key}.png")
        written.append(out / f"vs_{key}.png")
    return written


# -------------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hps_exp.tables",
                                description="Collect sweep runs (metrics.json) into Markdown/CSV tables and plots.")
    p.add_argument("sweep_dirs", nargs="+", metavar="SWEEP_DIR", help="sweep dir(s) holding Hydra job dirs")
    p.add_argument("--out", default=None, help="output dir (default: the first SWEEP_DIR)")
    p.add_argument("--metric-margin", default="reward_margin",
                   help="margin metric for the tables and plots (e.g. reward_margin_hardest)")
    p.add_argument("--stage", default="aligned", choices=("aligned", "sft"), help="which policy's metrics to table")
    p.add_argument("--decimals", type=int, default=2, help="decimals shown in the Markdown tables")
    p.add_argument("--compare", default=None, metavar="PREFERENCE_MODEL",
                   help="preference model tested against the best baseline of each framework "
                        "(default: the sweep yaml's compare.treatment)")
    p.add_argument("--baselines", default=None, metavar="PM[,PM...]",
                   help="preference models the treatment is compared with (default: the sweep yaml's "
                        "compare.baselines, else every other one)")
    p.add_argument("--sweep", action="append", default=None, metavar="NAME",
                   help="sweep yaml(s) whose grid lists the never-started jobs (default: the grid recorded at "
                        "launch in the sweep dir's sweep_grid.json, else the yaml of run.sweep or of the dir name)")
    p.add_argument("--n-boot", type=int, default=stats.DEFAULT_N_BOOT, help="bootstrap replicates per cell")
    return p.parse_args(argv)


def compare_of(grids: list[Grid]) -> tuple[str | None, list[str] | None]:
    """(treatment, baselines) from the grids' `compare` (None where none names one)."""
    found = {(g.compare["treatment"], tuple(g.compare.get("baselines") or ())) for g in grids
             if g.compare.get("treatment")}
    if len(found) > 1:
        described = "; ".join(f"{t} vs {', '.join(b) or 'all others'}" for t, b in sorted(found))
        raise ValueError(f"sweeps {', '.join(g.name for g in grids)} name different comparisons ({described}): "
                         "pass --compare")
    if not found:
        return None, None
    treatment, baselines = found.pop()
    return treatment, list(baselines) or None


def build_report(runs: list[Run], sweep_dirs: list[Path], args: argparse.Namespace) -> Report:
    main_tab = main_table(runs, args.stage, args.metric_margin, args.n_boot)
    ablations = {k: t for k in ABLATION_KEYS
                 if (t := ablation_table(runs, k, args.metric_margin, args.stage, args.n_boot))}
    grids, notes = grids_of(runs, sweep_dirs, args.sweep)
    treatment, baselines = compare_of(grids)
    if args.compare:  # the command line wins; its baselines too, else every other preference model
        treatment, baselines = args.compare, None
    if args.baselines:
        baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    paired = paired_tests(runs, treatment, args.stage, baselines=baselines) if treatment else []
    return Report(runs, main_tab, ablations, timing_table(runs, args.n_boot), paired, treatment, baselines,
                  missing_jobs(runs, grids), grids, notes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    sweep_dirs = [Path(d) for d in args.sweep_dirs]
    not_dirs = [str(d) for d in sweep_dirs if not d.is_dir()]
    if not_dirs:
        print(f"error: not a directory: {', '.join(not_dirs)}", file=sys.stderr)
        return 1
    runs = collect_runs(sweep_dirs)
    if not any(r.ok for r in runs):
        where = ", ".join(str(d) for d in sweep_dirs)
        print(f"error: no completed runs under {where} ({len(runs)} job dir(s) found)", file=sys.stderr)
        if runs:
            print(render_failed(runs), file=sys.stderr)
        grids, notes = grids_of(runs, sweep_dirs, args.sweep)
        never = missing_jobs(runs, grids)
        if never or notes:
            print("Jobs of the grid that never started:\n" + render_never_started(never, grids, notes),
                  file=sys.stderr)
        return 1
    try:
        report = build_report(runs, sweep_dirs, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m hps_exp.tables " + shlex.join(argv)
    markdown = render_markdown(report, sweep_dirs, command, args.decimals)
    out = Path(args.out) if args.out else sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", markdown)
    atomic_write_text(out / "table.csv", render_csv(report.main, report.timing))
    atomic_write_text(out / "runs.csv", render_runs_csv(runs))
    both = (args.metric_margin, *(m for m in MARGINS if m != args.metric_margin))  # the figure shows both margins
    plots = make_plots(report.main, report.ablations, out, args.metric_margin,
                       main_table(runs, args.stage, both, args.n_boot))
    print(markdown)
    print(f"[tables] wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'runs.csv'}"
          + "".join(f", {p}" for p in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
