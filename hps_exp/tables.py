"""Collect a sweep's `metrics.json` files into the paper's tables (Markdown + CSV) and plots.

    python -m hps_exp.tables SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--metric-margin reward_margin] [--stage aligned]

Pipeline: collect_runs (every job dir, completed or not) -> main_table / ablation_table (mean ± std over
seeds) -> render_markdown / render_csv -> make_plots. Failed and missing runs are listed, never dropped.
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

from hps_exp.data.schema import atomic_write_text

FRAMEWORKS = ("DPO", "IPO", "EXO", "SPPO", "NCA")
PREFERENCE_MODELS = ("BT", "PL", "HPS")
# Run settings that split one method into several rows when they vary within it.
GROUP_KEYS = ("train_dataset", "n_responses", "gamma", "beta")
ABLATION_KEYS = ("n_responses", "gamma", "beta")
KEY_LABELS = {"train_dataset": "train", "n_responses": "n_resp", "gamma": "γ", "beta": "β"}
METRIC_LABELS = {"bleu": "BLEU", "reward": "Reward", "reward_margin": "Reward margin",
                 "reward_margin_hardest": "Reward margin (hardest)", "harmful_rate": "Harmful rate"}
LOWER_IS_BETTER = {"harmful_rate"}
MAX_DEPTH = 3
SFT_LABEL = "SFT (reference)"


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
    run, ev = data.get("run"), data.get("eval")
    if status == "completed" and not (isinstance(run, dict) and run.get("method") and isinstance(ev, dict)):
        return Run(job_dir, "unreadable", error="metrics.json says completed but lacks run.method or eval",
                   overrides=overrides)
    return Run(job_dir, status, run if isinstance(run, dict) else {}, ev if isinstance(ev, dict) else {},
               data.get("error"), overrides)


def collect_runs(sweep_dirs: Iterable[str | os.PathLike]) -> list[Run]:
    return [load_run(d) for root in sweep_dirs for d in find_job_dirs(Path(root))]


# -------------------------------------------------------------------------------------------- aggregate

@dataclass
class Cell:
    mean: float
    std: float | None  # sample std (ddof=1); None with one seed
    n: int


def summarize(values: Iterable[Any]) -> Cell | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return Cell(statistics.fmean(vals), statistics.stdev(vals) if len(vals) >= 2 else None, len(vals))


def metric_of(run: Run, eval_set: str, stage: str, metric: str) -> float | None:
    stages = run.eval.get(eval_set)
    values = stages.get(stage) if isinstance(stages, dict) else None
    v = values.get(metric) if isinstance(values, dict) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def method_sort_key(method: str) -> tuple:
    """DPO, IPO, EXO, SPPO, NCA, then BT, PL, HPS; anything unknown after, alphabetically."""
    fw, _, pm = method.partition("-")
    fw_rank = FRAMEWORKS.index(fw) if fw in FRAMEWORKS else len(FRAMEWORKS)
    pm_rank = PREFERENCE_MODELS.index(pm) if pm in PREFERENCE_MODELS else len(PREFERENCE_MODELS)
    return (fw_rank, pm_rank, method)


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


def varying_keys(runs: list[Run], keys: Iterable[str] = GROUP_KEYS) -> dict[str, list[str]]:
    """Per method, the setting keys that take two or more values among its runs."""
    keys = list(keys)
    seen: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in runs:
        for k in keys:
            seen[r.method][k].add(_hashable(r.run.get(k)))
    return {m: [k for k in keys if len(vs[k]) > 1] for m, vs in seen.items()}


def group_rows(runs: list[Run], exclude: Iterable[str] = ()) -> dict[str, list[Run]]:
    """Row label -> runs (the seeds). A row is a method, split by the settings that vary within it
    (e.g. "DPO-HPS (γ=0.5)") so different hyperparameters are never averaged together."""
    vary = {m: [k for k in ks if k not in set(exclude)] for m, ks in varying_keys(runs).items()}
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        settings = tuple((k, _hashable(r.run.get(k))) for k in vary[r.method])
        groups[(r.method, settings)].append(r)
    ordered = sorted(groups, key=lambda g: (method_sort_key(g[0]), [value_key(v) for _, v in g[1]]))
    return {row_label(m, s): groups[(m, s)] for m, s in ordered}


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

    def cell(self, row: str, col: tuple[str, Any]) -> Cell | None:
        return self.cells.get((row, col))


def _seed_notes(label: str, runs: list[Run]) -> list[str]:
    seeds = [r.run.get("seed") for r in runs]
    dup = sorted({fmt_value(s) for s in seeds if seeds.count(s) > 1})
    return [f"{label}: seed(s) {', '.join(dup)} appear more than once; each run counts as one sample."] if dup else []


def _sft_rows(done: list[Run], columns: list[tuple[str, str]]) -> tuple[dict, dict]:
    """SFT metrics, one row per train set. Every method's run re-reports the same SFT policy, so average
    within a seed first, then mean ± std over seeds (n = seeds, not runs)."""
    by_train: dict[Any, list[Run]] = defaultdict(list)
    for r in done:
        by_train[_hashable(r.run.get("train_dataset"))].append(r)
    cells, n = {}, {}
    for train in sorted(by_train, key=value_key):
        runs = by_train[train]
        label = SFT_LABEL if len(by_train) == 1 else f"SFT (reference, train={fmt_value(train)})"
        by_seed: dict[Any, list[Run]] = defaultdict(list)
        for r in runs:
            by_seed[_hashable(r.run.get("seed"))].append(r)
        for col in columns:
            per_seed = [summarize(metric_of(r, col[0], "sft", col[1]) for r in rs) for rs in by_seed.values()]
            cell = summarize(c.mean for c in per_seed if c is not None)
            if cell is not None:
                cells[(label, col)] = cell
        if any(key[0] == label for key in cells):
            n[label] = len(by_seed)
    return cells, n


def main_table(runs: list[Run], stage: str = "aligned", margin: str = "reward_margin") -> Table:
    """Rows = methods (+ the SFT reference), columns = per eval set: BLEU, Reward, margin [, Harmful rate]."""
    done = [r for r in runs if r.ok]
    eval_sets = sorted({e for r in done for e in r.eval})
    columns: list[tuple[str, str]] = []
    for e in eval_sets:
        metrics = ["bleu", "reward", margin]
        if any(metric_of(r, e, s, "harmful_rate") is not None for r in done for s in (stage, "sft")):
            metrics.append("harmful_rate")  # only sets with safety labels have it
        columns += [(e, m) for m in metrics]
    headers = [f"{e} · {METRIC_LABELS.get(m, m)} {'↓' if m in LOWER_IS_BETTER else '↑'}" for e, m in columns]
    table = Table(f"Main results ({stage} policy)", [], columns, headers, {}, {})
    if stage != "sft":
        sft_cells, sft_n = _sft_rows(done, columns)
        table.cells.update(sft_cells)
        table.n.update(sft_n)
        table.rows += list(sft_n)
        table.reference_rows = set(sft_n)
    for label, rs in group_rows(done).items():
        table.rows.append(label)
        table.n[label] = len(rs)
        table.notes += _seed_notes(label, rs)
        for col in columns:
            cell = summarize(metric_of(r, col[0], stage, col[1]) for r in rs)
            if cell is not None:
                table.cells[(label, col)] = cell
    return table


def ablation_table(runs: list[Run], key: str, metric: str = "reward_margin", stage: str = "aligned") -> Table | None:
    """`metric` vs the values of `key` (n_responses, gamma, beta, ...): rows = methods in which `key` takes
    two or more values, columns = (eval set, value). None when no method varies `key`."""
    done = [r for r in runs if r.ok]
    rows: dict[str, dict[Any, list[Run]]] = {}
    for label, rs in group_rows(done, exclude=[key]).items():
        by_value: dict[Any, list[Run]] = defaultdict(list)
        for r in rs:
            by_value[_hashable(r.run.get(key))].append(r)
        if len(by_value) > 1:
            rows[label] = by_value
    if not rows:
        return None
    eval_sets = sorted({e for by_value in rows.values() for rs in by_value.values() for r in rs for e in r.eval})
    values = sorted({v for by_value in rows.values() for v in by_value}, key=value_key)
    columns = [(e, v) for e in eval_sets for v in values]
    name = KEY_LABELS.get(key, key)
    headers = [f"{e} · {name}={fmt_value(v)}" for e, v in columns]
    table = Table(f"{METRIC_LABELS.get(metric, metric)} vs {name} ({stage} policy)", list(rows), columns,
                  headers, {}, {}, ranked=False)
    for label, by_value in rows.items():
        table.n[label] = max(len(rs) for rs in by_value.values())  # seeds per value; cells with fewer say so
        for col in columns:
            cell = summarize(metric_of(r, col[0], stage, metric) for r in by_value.get(col[1], []))
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


# ----------------------------------------------------------------------------------------------- render

def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_cell(cell: Cell | None, decimals: int, row_n: int | None = None, bold: bool = False) -> str:
    if cell is None:
        return "–"
    text = f"{cell.mean:.{decimals}f}"
    if cell.std is not None:
        text += f" ± {cell.std:.{decimals}f}"
    if row_n is not None and cell.n != row_n:
        text += f" (n={cell.n})"  # fewer seeds than the row's other cells
    return f"**{text}**" if bold else text


def render_table(table: Table, decimals: int = 2) -> str:
    bold = {col: best_rows(table, col, decimals) for col in table.columns} if table.ranked else {}
    lines = ["| Method | n | " + " | ".join(_md(h) for h in table.headers) + " |",
             "|:---|---:|" + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = [fmt_cell(table.cell(row, col), decimals, table.n.get(row), row in bold.get(col, ()))
                 for col in table.columns]
        lines.append(f"| {_md(row)} | {table.n.get(row, 0)} | " + " | ".join(cells) + " |")
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


def render_markdown(runs: list[Run], main: Table, ablations: dict[str, Table], sweep_dirs: list[Path],
                    command: str, decimals: int = 2) -> str:
    done, bad = [r for r in runs if r.ok], problem_runs(runs)
    parts = [
        f"# Results: {', '.join(str(d) for d in sweep_dirs)}",
        f"{len(done)} completed run(s), {len(bad)} failed or missing, out of {len(runs)} job dir(s).",
        "Cells: mean ± sample std (ddof=1) over seeds; a cell without ± has a single seed. "
        "n = completed runs (seeds) behind the row; a cell with fewer says so as (n=k). "
        "**Bold** = best mean of the column as displayed (highest for ↑, lowest for ↓; ties all bold); "
        "SFT reference rows are not ranked.",
        f"## {main.title}",
        render_table(main, decimals),
    ]
    parts += [f"- {note}" for note in main.notes]
    for table in ablations.values():
        parts += [f"## Ablation: {table.title}", render_table(table, decimals)]
    parts += ["## Failed or missing runs", render_failed(runs),
              "## Command", f"```\n{command}\n```"]
    return "\n\n".join(parts) + "\n"


def render_csv(table: Table) -> str:
    """Tidy format: one row per cell of the main table."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "eval_set", "metric", "mean", "std", "n_seeds"])
    for row in table.rows:
        for col in table.columns:
            cell = table.cell(row, col)
            if cell is not None:
                writer.writerow([row, col[0], col[1], repr(cell.mean),
                                 "" if cell.std is None else repr(cell.std), cell.n])
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plot_margin(plt, main: Table, margin: str, path: Path) -> None:
    """Grouped bars: one group per eval set, one bar per method, std as error bars."""
    eval_sets = [e for e, m in main.columns if m == margin]
    width = 0.8 / max(len(main.rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.5 * len(main.rows) * len(eval_sets)), 4.0))
    for i, row in enumerate(main.rows):
        cells = [main.cell(row, (e, margin)) for e in eval_sets]
        xs = [g + (i - (len(main.rows) - 1) / 2) * width for g in range(len(eval_sets))]
        ax.bar(xs, [c.mean if c else math.nan for c in cells], width,
               yerr=[(c.std or 0.0) if c else 0.0 for c in cells], capsize=3, label=row,
               color="0.7" if row in main.reference_rows else None)
    ax.set_xticks(range(len(eval_sets)), eval_sets)
    ax.set_ylabel(METRIC_LABELS.get(margin, margin))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(f"{METRIC_LABELS.get(margin, margin)} by method (mean ± std over seeds)")
    _save_png(fig, path)
    plt.close(fig)


def plot_ablation(plt, table: Table, key: str, metric: str, path: Path) -> None:
    """Metric vs the ablation value, one line per method, one panel per eval set."""
    eval_sets = sorted({e for e, _ in table.columns})
    values = [v for e, v in table.columns if e == eval_sets[0]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    fig, axes = plt.subplots(1, len(eval_sets), figsize=(5.0 * len(eval_sets), 3.8), squeeze=False)
    for ax, e in zip(axes[0], eval_sets):
        for row in table.rows:
            pts = [(v, c) for v in values if (c := table.cell(row, (e, v))) is not None]
            xs = [v if numeric else values.index(v) for v, _ in pts]
            ax.errorbar(xs, [c.mean for _, c in pts], yerr=[c.std or 0.0 for _, c in pts],
                        marker="o", capsize=3, label=row)
        ax.set_xticks(values if numeric else range(len(values)), [fmt_value(v) for v in values])
        ax.set_xlabel(KEY_LABELS.get(key, key))
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(e)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(table.title)
    _save_png(fig, path)
    plt.close(fig)


def make_plots(main: Table, ablations: dict[str, Table], out: Path, margin: str) -> list[Path]:
    try:
        import matplotlib  # lazy: the tables work without it
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[tables] matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    written = []
    if any(m == margin for _, m in main.columns):
        plot_margin(plt, main, margin, out / f"{margin}.png")
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
    return p.parse_args(argv)


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
        return 1
    main_tab = main_table(runs, args.stage, args.metric_margin)
    ablations = {k: t for k in ABLATION_KEYS if (t := ablation_table(runs, k, args.metric_margin, args.stage))}
    command = "python -m hps_exp.tables " + shlex.join(argv)
    markdown = render_markdown(runs, main_tab, ablations, sweep_dirs, command, args.decimals)
    out = Path(args.out) if args.out else sweep_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", markdown)
    atomic_write_text(out / "table.csv", render_csv(main_tab))
    plots = make_plots(main_tab, ablations, out, args.metric_margin)
    print(markdown)
    print(f"[tables] wrote {out / 'table.md'}, {out / 'table.csv'}"
          + "".join(f", {p}" for p in plots), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
