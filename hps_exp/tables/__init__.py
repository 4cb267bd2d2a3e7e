"""Collect a sweep's `metrics.json` files into the paper's tables (Markdown + CSV) and plots.

    python -m hps_exp.tables SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--metric-margin reward_margin]
                             [--stage aligned] [--compare PREFERENCE_MODEL] [--sweep NAME]

Pipeline, one module per step: collect.collect_runs (every job dir, completed or not) -> aggregate: rows (a
method, split by settings that vary within it; in the paper's order, aggregate.ROW_ORDER) -> main_table /
timing_table / ablation_table, every cell "mean [lo, hi]" with a 95 % bootstrap interval (held-out prompts within
seeds where the run reports per-prompt values, else over seeds: hps_exp.stats) -> paired.paired_tests of the
treatment preference model against the best baseline of its framework -> render.render_markdown / render_csv /
render_runs_csv -> plots.make_plots; cli.main runs them and writes the files. Failed and missing runs, and the
grid's jobs that never started (collect.missing_jobs), are listed, never dropped: the grid (collect.grids_of) is
the one `python -m hps_exp.sweep` recorded at launch (`<sweep dir>/sweep_grid.json`, command-line extras included), or,
for sweeps without a record, the one expanded from the sweep yaml (said in a note).

Rows are ordered by the paper's order of `run.framework` and `run.preference_model` (aggregate.ROW_ORDER: the one
place that ranks them; a loss says only what it is, and one not listed there comes after, alphabetically), plots
grouped by framework and coloured by preference model, and the treatment of the paired test comes from the sweep
yaml (`compare: {treatment: X}`) or `--compare X`.
"""
from hps_exp.tables.aggregate import (
    ABLATION_KEYS,
    HEADLINE_BLEU,
    MARGINS,
    Cell,
    Row,
    Table,
    ablation_table,
    build_rows,
    main_table,
    summarize,
    timing_table,
)
from hps_exp.tables.cli import main
from hps_exp.tables.collect import Run, collect_runs, find_job_dirs, metric_of, per_prompt_of
from hps_exp.tables.paired import PairedResult, paired_tests
from hps_exp.tables.plots import make_plots, plot_main, series_styles
from hps_exp.tables.render import best_rows, render_csv, render_failed, render_markdown, render_runs_csv, render_table

__all__ = ["ABLATION_KEYS", "HEADLINE_BLEU", "MARGINS", "Cell", "PairedResult", "Row", "Run", "Table",
           "ablation_table", "best_rows", "build_rows", "collect_runs", "find_job_dirs", "main", "main_table",
           "make_plots", "metric_of", "paired_tests", "per_prompt_of", "plot_main", "render_csv", "render_failed",
           "render_markdown", "render_runs_csv", "render_table", "series_styles", "summarize", "timing_table"]
