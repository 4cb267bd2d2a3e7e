"""Render a report: the Markdown tables (best per column in bold, circular evaluations marked, failed and
never-started jobs listed), the tidy `table.csv` and `runs.csv` (one row per job dir, with the command that
reruns it)."""
from __future__ import annotations

import csv
import io
import math
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hps_exp import stats
from hps_exp.tables.aggregate import LEVEL, LOWER_IS_BETTER, METRIC_LABELS, SPAN_LABELS, Cell, Span, Table
from hps_exp.tables.collect import Grid, NeverStarted, Run
from hps_exp.tables.paired import PairedResult

CIRCULAR_MARK = "‡"
CIRCULAR_NOTE = (f"{CIRCULAR_MARK} circular evaluation (metrics.json `circular_eval`): the evaluation reward model is "
                 "the annotation one, whose labels the policy was trained on, so its reward, margins and win rate "
                 "can reward gaming the annotator; (k/n) = k of the row's n runs.")
RUNS_FIXED = ["job_dir", "status", "method", "seed", "circular_eval", "overrides", "command", "error"]


def _md(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def best_rows(table: Table, col: tuple[str, Any], decimals: int) -> set[str]:
    """Rows holding the best mean of a column, compared as displayed (so ties on screen are all bold)."""
    lower = col[1] in LOWER_IS_BETTER
    means = {row: round(c.mean, decimals) for row in table.rows if row not in table.reference_rows
             and (c := table.cell(row, col)) is not None and math.isfinite(c.mean)}
    if not means:
        return set()
    best = min(means.values()) if lower else max(means.values())
    return {row for row, m in means.items() if m == best}


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


def render_never_started(missing: list[NeverStarted], grids: list[Grid], notes: list[str]) -> str:
    parts = [f"- {n}" for n in notes]
    if not missing:
        # one sweep launched once per seed dir records one grid per dir: say it once, with the count
        kinds = Counter(f"{g.name}, {'recorded at launch' if g.recorded else 'from its yaml'}" for g in grids)
        described = "; ".join(k if n == 1 else f"{k} in {n} sweep dirs" for k, n in kinds.items())
        parts.append(f"None: every job of the grid ({described}) has a job dir." if grids else "No grid to check.")
        return "\n".join(parts)
    parts += ["| Sweep | Arm | Job | Overrides |", "|:---|:---|---:|:---|"]
    for m in missing:
        parts.append(f"| {_md(m.sweep)} | {_md(m.arm)} | {m.number} | "
                     f"{_md(' '.join(f'`{o}`' for o in m.overrides))} |")
    return "\n".join(parts)


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


def render_warnings(runs: list[Run]) -> str:
    """Completed runs whose metrics.json warns (a diverged margin, skipped non-finite steps): their numbers are in
    the tables above, so say which they are."""
    warned = [r for r in runs if r.ok and r.warnings]
    if not warned:
        return "None."
    lines = ["| Job dir | Method | Warnings |", "|:---|:---|:---|"]
    for r in warned:
        lines.append(f"| {_md(r.job_dir)} | {_md(r.method)} | {_md('; '.join(r.warnings))} |")
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
    parts += ["## Runs that warn (included above)", render_warnings(runs),
              "## Failed or missing runs", render_failed(runs),
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

