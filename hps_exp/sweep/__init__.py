"""Run a grid from `sweeps/NAME.yaml`: one Hydra multirun per method arm, all jobs under one sweep dir.

Modules: grid (the file: validation, overrides, expansion into jobs), record (sweep_grid.json), runner (launching
the arms' multiruns, the summary), wandb_export (sweeps/wandb/*.yaml), cli.

    python -m hps_exp.sweep NAME [--dry-run] [--jobs-dir DIR] [--parallel | --no-parallel] [--python EXE]
                                 [--write-wandb] [key=value ...]

NAME is a file in sweeps/ (without .yaml) or a path to a sweep yaml. A sweep file:

    description: "..."
    arms:                  # method arm -> overrides that go together (a loss and its sampler, ...);
      ARM-A: [loss=<name>]                    # an arm may itself sweep a key (loss.gamma=0,1,2)
      ARM-B: [loss=<name>, loss.<knob>=<value>]
    grid:                  # sweep axes applied to every arm (a comma string or a YAML list)
      loss.framework: <f1>,<f2>
      seed: [0, 1, 2]
    fixed: [dataset.n_train=200]   # overrides for every job
    requires: [dataset.path]       # optional: keys the command line must set (e.g. a local data file)
    compare: {treatment: X, baselines: [A, B]}  # optional: the tables' paired test of preference model X against
                                                # the best of A, B (default: every other one) in each framework

Each arm runs as `python -m hps_exp -m <fixed> <grid> <arm> <extra> sweep=NAME hydra.sweep.dir=<jobs dir>/<arm>
hydra.sweep.subdir=${hydra.job.num}`, so job k of arm A lands in `<jobs dir>/A/k/` (default jobs dir:
outputs/sweeps/NAME; `python -m hps_exp.tables` finds the jobs there). When two overrides set the same key the
more specific one wins: extra (command line) > arm > grid > fixed. A failed job or arm does not stop the others;
the exit status is non-zero when any job failed.

Arms run one after another with Hydra's basic launcher (the jobs share this machine). With a cluster launcher
(`hydra/launcher=slurm`, conf/hydra/launcher/slurm.yaml) a multirun submits its jobs and then blocks until they
finish, so the arms' multiruns are started all at once (`--parallel`, the default whenever a hydra/launcher other
than basic is set), each logging to `<jobs dir>/.sweep_logs/<arm>.log`; `--no-parallel` forces one at a time.

When it starts (not with --dry-run), the runner records the launched grid in `<jobs dir>/sweep_grid.json`: the
sweep name and file, the command-line extras, and every arm's multirun overrides, command and jobs (each job's
override list, job k = `<arm>/k`). `python -m hps_exp.tables` lists the "never started" jobs against this record
(the grid that ran, e.g. only `seed=0` when the command line said so), and falls back to the sweep yaml only
where no record exists. A relaunch into the same jobs dir replaces the record (and says so when the grid differs).

Rerunning the same sweep (same NAME, extras and jobs dir) finishes it: each arm's multirun is relaunched with
the same job numbers into the same `<arm>/<k>/` dirs, so a completed job reuses its cached stages and final
checkpoint (or is skipped by the app where it skips a run dir with a completed metrics.json of the same
config), an interrupted job resumes from its checkpoint (trainer.resume=true), and jobs that never started run.
The summary counts a job as completed when its metrics.json says so, whichever launch finished it. Different
extras make a different grid whose job k overwrites the old job k: give those another --jobs-dir.

`--write-wandb` (re)writes the W&B sweep files of the grid under sweeps/wandb/ (one file per sweep, or one per
arm when an arm couples several overrides, which a W&B grid cannot express).
"""
from hps_exp.sweep.cli import main
from hps_exp.sweep.grid import (
    SWEEPS_DIR,
    Sweep,
    SweepError,
    arm_overrides,
    available,
    expand,
    jobs,
    key_of,
    launcher_of,
    load,
    merge,
)
from hps_exp.sweep.record import GRID_RECORD, grid_record, read_grid_record, write_grid_record
from hps_exp.sweep.runner import command, job_status, run, wants_parallel
from hps_exp.sweep.wandb_export import WANDB_DIR, render_wandb, wandb_jobs, wandb_sweeps, write_wandb

__all__ = ["GRID_RECORD", "SWEEPS_DIR", "WANDB_DIR", "Sweep", "SweepError", "arm_overrides", "available", "command",
           "expand", "grid_record", "job_status", "jobs", "key_of", "launcher_of", "load", "main", "merge",
           "read_grid_record", "render_wandb", "run", "wandb_jobs", "wandb_sweeps", "wants_parallel",
           "write_grid_record", "write_wandb"]
