"""Aggregate runs into tables: a row per method (split by the settings that vary within it, in the paper's
order of frameworks and preference models: ROW_ORDER), a cell per (eval set, metric) = mean [lo, hi] with a
95 % bootstrap interval (hps_exp.stats: over held-out prompts within seeds where the runs report per-prompt
values, else over seeds), the SFT reference rows, the cost table and the ablation tables."""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

from hps_exp import stats
from hps_exp.config import NOT_EXPERIMENT, RuntimeConfig
from hps_exp.tables.collect import Run, as_number, metric_of, per_prompt_of

# The paper's table order: frameworks (run.framework), then preference models within a framework
# (run.preference_model; "DPO" is the dataset's own pair). Others come after these, alphabetically.
ROW_ORDER = {"framework": ("dpo", "ipo", "exo", "sppo", "nca"),
             "preference_model": ("DPO", "BT", "PL", "HPS", "HPS-full", "LiPO-λ")}
# Run settings that split one method into several rows when they vary within it.
GROUP_KEYS = ("train_dataset", "sampler", "n_responses", "gamma", "beta")
ABLATION_KEYS = ("n_responses", "gamma", "beta")
# Rows of the paired test are compared only when these agree (same data, same n).
COMPARABLE_KEYS = ("train_dataset", "n_responses", "beta")  # a margin is β·Δlog-ratio: β sets its scale
KEY_LABELS = {"train_dataset": "train", "n_responses": "n_resp", "gamma": "γ", "beta": "β", "trainer.lr": "lr"}
# Config keys (metrics.json identity.config) that never split a row: the seeds (a row is their mean) and the
# settings that change no result (threads, checkpointing, logging, where things are written). Any other key that
# varies among a row's runs splits it, so runs with different hyperparameters (e.g. a tuning grid's trainer.lr) are
# never averaged together.
NOT_SETTINGS = frozenset({"seed", "trainer.seed", "trainer.num_threads", "model.gradient_checkpointing",
                          *(f"trainer.{f.name}" for f in fields(RuntimeConfig))})
METRIC_LABELS = {"bleu_corpus": "BLEU (corpus)", "bleu_sentence": "BLEU (sentence)", "bleu_char": "BLEU (char)",
                 "reward": "Reward", "reward_top1": "Reward top-1",
                 "reward_margin": "Reward margin", "reward_margin_hardest": "Reward margin (hardest)",
                 "win_rate": "Win rate vs SFT", "harmful_rate": "Harmful rate"}
TIMING_LABELS = {"pref_s": "Preference stage (s)", "pref_step_s": "Per preference step (s)",
                 "pref_tokens_per_s": "Preference tokens/s", "total_s": "Whole job (s)"}
TIMING_HIGHER_BETTER = {"pref_tokens_per_s"}  # throughput; every other cost column is seconds
# Recorded conditions of a job's timing (metrics.json timing), shown as ranges beside the cost: how many torch
# threads it used, and the machine's 1-minute load average at its start and end (absent in older runs).
SPAN_LABELS = {"threads": "Threads", "load": "Load avg (1 min) at start/end"}
MARGINS = ("reward_margin", "reward_margin_hardest")
# The headline BLEU of each evaluation protocol (metrics.json key -> what it is), shown in the main table's "BLEU"
# column (a column per kind, labelled by kind, where a table holds both protocols).
HEADLINE_BLEU = {"bleu_corpus": "sacrebleu corpus BLEU of one sample per prompt (eval.protocol=default)",
                 "bleu_sentence": "mean over prompts of the sacrebleu sentence BLEU of the highest-reward sample "
                                  "(eval.protocol=paper)"}
# Main-table columns per eval set, in order; the optional ones only where some run reports them.
OPTIONAL_METRICS = (*HEADLINE_BLEU, "bleu_char", "reward_top1", "win_rate", "harmful_rate")
LOWER_IS_BETTER = {"harmful_rate"}
SFT_LABEL = "SFT (reference)"
LEVEL = 0.95


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
    prompts = [s.prompts for s in samples if s.prompts]
    if len(prompts) == len(samples):   # every sample has per-prompt values
        _, lo, hi = stats.bootstrap_ci(prompts, level, n_boot)
        per_prompt = True
    else:
        _, lo, hi = stats.bootstrap_ci_seeds(values, level, n_boot)
        per_prompt = False
    # The displayed mean is the mean of the scalars (equal to the bootstrap's point estimate when per-prompt
    # values are used, since they were checked to reproduce each scalar).
    return Cell(statistics.fmean(values), lo, hi, len(values), per_prompt, std)


def summarize(values: Iterable[Any], n_boot: int = stats.DEFAULT_N_BOOT) -> Cell | None:
    """Seeds-only cell from plain numbers (None entries skipped)."""
    return summarize_samples([Sample(v) for v in (as_number(x) for x in values) if v is not None], n_boot)


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


def hashable(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None))) else json.dumps(v, sort_keys=True)


def row_order_of(run: Run) -> tuple[int, int]:
    """(framework rank, preference-model rank) in ROW_ORDER; a name not there ranks after every one that is."""
    fw, pm = (order.index(v) if (v := run.run.get(key)) in order else len(order) for key, order in ROW_ORDER.items())
    return fw, pm


def varying_keys(runs: list[Run], keys: Iterable[str] = GROUP_KEYS) -> dict[str, list[str]]:
    """Per method, the setting keys that take two or more values among its runs."""
    keys = list(keys)
    seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in runs:
        for k in keys:
            seen[r.method][k].add(hashable(r.run.get(k)))
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
    def labelled(self) -> bool:
        """A recipe the user named (`label=`, e.g. the authors' released recipe DPO-HPS(released), whose loss is
        pairwise DPO on hard-sampled pairs): its preference model says what its loss compares, not what it is."""
        return bool(self.runs and self.runs[0].config.get("label"))

    @property
    def series(self) -> str:
        """What the plots colour by: the method without its framework (the preference model, or what names the
        method beyond it, e.g. "HPS(released)", whose preference model is DPO) plus the settings that split the row."""
        prefix = f"{self.framework.upper()}-"
        name = self.method[len(prefix):] if self.framework and self.method.startswith(prefix) else None
        return row_label(name or self.preference_model, self.settings)

    def comparable(self) -> tuple:
        """What must match for two rows' margins to be compared: the data, n, β (the margin's unit: the authors'
        released recipe at β = 0.25 reports 2.5× the margin of the same log-ratios at β = 0.1) and the implicit
        reward (a SimPO margin, β/|y|·log π, is not a log-ratio margin)."""
        reward = _reward_of(self.runs[0]) if self.runs else "ratio"
        return (*(hashable(self._common(k)) for k in COMPARABLE_KEYS), reward)


def build_rows(runs: list[Run], exclude: Iterable[str] = ()) -> list[Row]:
    """A row is a method, split by the settings that vary within it (e.g. "DPO-HPS (γ=0.5)") so different
    hyperparameters are never averaged together; rows sorted by ROW_ORDER, then method, then settings."""
    excluded = set(exclude)
    vary = {m: [k for k in ks if k not in excluded] for m, ks in varying_keys(runs).items()}
    coarse: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        coarse[(r.method, tuple((k, hashable(r.run.get(k))) for k in vary[r.method]))].append(r)
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for (method, settings), members in coarse.items():
        split = config_splits(members, excluded)
        for r in members:
            groups[(method, settings + tuple((k, hashable(r.config.get(k))) for k in split))].append(r)
    ordered = sorted(groups, key=lambda g: (row_order_of(groups[g][0]), g[0], [value_key(v) for _, v in g[1]]))
    return [Row(row_label(m, s), m, s, groups[(m, s)]) for m, s in ordered]


def config_splits(runs: list[Run], excluded: Iterable[str] = ()) -> list[str]:
    """The config keys that vary among these runs (one method, the same run settings) and change a result: not the
    seeds nor a runtime knob (NOT_SETTINGS), nor one that follows from an excluded run setting (an ablation's key:
    loss.beta when the table's columns are β)."""
    excluded = list(excluded)
    keys = sorted({k for r in runs for k in r.config})
    split = []
    for k in keys:
        if k in NOT_SETTINGS or k.split(".")[0] in NOT_EXPERIMENT or k.endswith("._target_"):
            continue
        if len({hashable(r.config.get(k)) for r in runs}) < 2:
            continue
        by_excluded: dict[tuple, set] = defaultdict(set)
        for r in runs:
            by_excluded[tuple(hashable(r.run.get(e)) for e in excluded)].add(hashable(r.config.get(k)))
        if excluded and all(len(v) == 1 for v in by_excluded.values()):
            continue   # the ablation's own key, under its config name
        split.append(k)
    return split


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
    metric_labels: dict[str, str] = field(default_factory=dict)  # the main table's label per metric (plots)

    def cell(self, row: str, col: tuple[str, Any]) -> Cell | None:
        return self.cells.get((row, col))

    def add_row(self, row: Row) -> None:
        """Append a method's row: its label, its runs (row_info) and how many there are (n)."""
        self.rows.append(row.label)
        self.row_info[row.label] = row
        self.n[row.label] = len(row.runs)

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
    per_run = [[v for f in fields if (v := as_number(r.timing.get(f))) is not None] for r in runs]
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


def _reward_of(run: Run) -> str:
    """The implicit reward behind the run's margins: "ratio" (β·log π/π_ref), or e.g. "simpo β=2" (β/|y|·log π,
    whose SFT margins depend on β)."""
    kind = str(run.run.get("reward_type") or "ratio")
    return kind if kind == "ratio" else f"{kind} β={fmt_value(run.run.get('beta'))}"


def _by_seed(runs: list[Run]) -> dict[Any, list[Run]]:
    out: dict[Any, list[Run]] = defaultdict(list)
    for r in runs:
        out[hashable(r.run.get("seed"))].append(r)
    return out


def _sft_rows(done: list[Run], columns: list[tuple[str, str]], n_boot: int,
              circular: dict[str, list[Run]] | None = None) -> tuple[dict, dict]:
    """SFT metrics, one row per SFT policy: per train set and number of responses (both can change the SFT data), and
    per reward type (a reference-free run's SFT margins are the SFT policy's own β/|y|·log π, not 0: never averaged
    with the log-ratio margins). Groups whose runs re-report the same SFT evaluations (their sft_eval stage keys,
    one per seed, are the same) are one row: an arm trained on the dataset pair (n = 2) beside augmented arms
    (n = 6) shares their SFT policy. Every method's run re-reports the same SFT policy of its seed, so one sample
    per seed: the mean of the runs' scalars, with the first run's per-prompt values."""
    by_train: dict[Any, list[Run]] = defaultdict(list)
    for r in done:
        by_train[(hashable(r.run.get("train_dataset")), hashable(r.run.get("n_responses")), _reward_of(r))].append(r)
    merged: dict[Any, tuple[list[tuple], list[Run]]] = {}
    for group in sorted(by_train, key=lambda k: (value_key(k[0]), value_key(k[1]), value_key(k[2]))):
        keys = {r.sft_eval_key for r in by_train[group]}
        same_eval = ("sft_eval", group[2], frozenset(keys)) if None not in keys else ("group", group)
        members, runs = merged.setdefault(same_eval, ([], []))
        members.append(group)
        runs += by_train[group]
    shown = [tuple(",".join(fmt_value(v) for v in dict.fromkeys(m[i] for m in members)) for i in range(3))
             for members, _ in merged.values()]
    varies = [len({s[i] for s in shown}) > 1 for i in range(3)]
    cells, n = {}, {}
    for values, (_, runs) in zip(shown, merged.values()):
        parts = [f"{name}={v}" for name, v, vary in
                 zip(("train", KEY_LABELS["n_responses"], "reward"), values, varies) if vary]
        label = SFT_LABEL if not parts else f"SFT (reference, {', '.join(parts)})"
        by_seed = _by_seed(runs)
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
                circular[label] = runs
    return cells, n


def metric_labels(metrics: Iterable[str]) -> dict[str, str]:
    """Column label per metric: METRIC_LABELS, except that the one headline BLEU of a table is plain "BLEU"."""
    metrics = list(dict.fromkeys(metrics))
    bleus = [m for m in metrics if m in HEADLINE_BLEU]
    return {m: "BLEU" if m in HEADLINE_BLEU and len(bleus) == 1 else METRIC_LABELS.get(m, m) for m in metrics}


def main_columns(done: list[Run], stage: str, margin: str | tuple[str, ...]) -> list[tuple[str, str]]:
    margins = [margin] if isinstance(margin, str) else list(margin)
    eval_sets = sorted({e for r in done for e in r.eval})
    columns: list[tuple[str, str]] = []
    for e in eval_sets:
        if not any(metric_of(r, e, s, "reward") is not None for r in done for s in (stage, "sft")):
            # a set measured for its margins alone (python -m hps_exp.ranked_margins): both of them
            columns += [(e, m) for m in dict.fromkeys([*margins, *MARGINS])]
            continue
        present = {m for m in OPTIONAL_METRICS
                   if any(metric_of(r, e, s, m) is not None for r in done for s in (stage, "sft"))}
        bleus = [m for m in HEADLINE_BLEU if m in present] or [next(iter(HEADLINE_BLEU))]  # an empty column else
        metrics = bleus + [m for m in ("bleu_char",) if m in present] + ["reward"] \
            + [m for m in ("reward_top1",) if m in present] + margins \
            + [m for m in ("win_rate", "harmful_rate") if m in present]
        columns += [(e, m) for m in metrics]
    return columns


def main_table(runs: list[Run], stage: str = "aligned", margin: str | tuple[str, ...] = "reward_margin",
               n_boot: int = stats.DEFAULT_N_BOOT) -> Table:
    """Rows = methods (+ the SFT reference), columns = per eval set: BLEU [, BLEU (char)], Reward [, top-1],
    margin (or several: the plots' table) [, win rate] [, harmful rate]. BLEU is the protocol's headline BLEU
    (HEADLINE_BLEU), said in a note."""
    done = [r for r in runs if r.ok]
    columns = main_columns(done, stage, margin)
    labels = metric_labels(m for _, m in columns)
    headers = [f"{e} · {labels[m]} {'↓' if m in LOWER_IS_BETTER else '↑'}" for e, m in columns]
    table = Table(f"Main results ({stage} policy)", [], columns, headers, {}, {}, metric_labels=labels)
    table.notes += [f"{labels[m]}: {HEADLINE_BLEU[m]}." for m in dict.fromkeys(m for _, m in columns)
                    if m in HEADLINE_BLEU]
    if stage != "sft":
        sft_cells, sft_n = _sft_rows(done, columns, n_boot, table.row_runs)
        table.cells.update(sft_cells)
        table.n.update(sft_n)
        table.rows += list(sft_n)
        table.reference_rows = set(sft_n)
    for row in build_rows(done):
        table.add_row(row)
        table.notes += _seed_notes(row.label, row.runs)
        for col in columns:
            cell = summarize_samples(samples_of(row.runs, col[0], stage, col[1]), n_boot)
            if cell is not None:
                table.cells[(row.label, col)] = cell
    return table


def timing_table(runs: list[Run], n_boot: int = stats.DEFAULT_N_BOOT) -> Table | None:
    """The paper's cost table: preference-stage time, time per preference step and the preference stage's
    tokens/s (real tokens of the policy passes per second, where metrics.json records them) per row (over seeds)."""
    done = [r for r in runs if r.ok]
    keys = [k for k in TIMING_LABELS if any(as_number(r.timing.get(k)) is not None for r in done)]
    if not keys:
        return None
    columns = [("timing", k) for k in keys]
    table = Table("Training cost (wall clock)", [], columns,
                  [f"{TIMING_LABELS[k]} {'↑' if k in TIMING_HIGHER_BETTER else '↓'}" for k in keys],
                  {}, {}, ranked=False, mark_circular=False)
    for row in build_rows(done):
        table.add_row(row)
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
            by_value[hashable(r.run.get(key))].append(r)
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


