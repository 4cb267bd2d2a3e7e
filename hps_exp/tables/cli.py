"""`python -m hps_exp.tables SWEEP_DIR [SWEEP_DIR ...]`: collect, aggregate, test, render and plot; write
table.md, table.csv, runs.csv, examples.md (when the jobs kept their samples) and the PNGs (each atomically) into
--out (default: the first SWEEP_DIR)."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from hps_exp import stats
from hps_exp.io import atomic_write_text
from hps_exp.tables.aggregate import ABLATION_KEYS, MARGINS, ablation_table, main_table, timing_table
from hps_exp.tables.collect import Grid, Run, collect_runs, grids_of, missing_jobs
from hps_exp.tables.examples import examples_markdown
from hps_exp.tables.paired import paired_tests
from hps_exp.tables.plots import make_plots
from hps_exp.tables.render import (
    Report,
    render_csv,
    render_failed,
    render_markdown,
    render_never_started,
    render_runs_csv,
)


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
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="example generations: the first N held-out prompts, every method's first sample "
                        "(examples.md; 0: none)")
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
    examples = examples_markdown(runs, args.examples) if args.examples > 0 else None
    if examples:
        atomic_write_text(out / "examples.md", examples)
    print(markdown)
    print(f"[tables] wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'runs.csv'}"
          + (f", {out / 'examples.md'}" if examples else "") + "".join(f", {p}" for p in plots), file=sys.stderr)
    return 0
