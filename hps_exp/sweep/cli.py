"""`python -m hps_exp.sweep NAME [--dry-run] [--jobs-dir DIR] [--parallel | --no-parallel] [--python EXE]
[--write-wandb] [key=value ...]` (the sweep file format and what a launch does: hps_exp/sweep/__init__.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hps_exp.sweep.grid import SweepError, load
from hps_exp.sweep.runner import run
from hps_exp.sweep.wandb_export import write_wandb


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m hps_exp.sweep",
                                description="Run a sweeps/NAME.yaml grid: one Hydra multirun per method arm.")
    p.add_argument("name", metavar="NAME", help="sweep name in sweeps/ (or a path to a sweep .yaml)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and job counts; launch nothing")
    p.add_argument("--jobs-dir", default=None, help="sweep output dir (default: outputs/sweeps/NAME)")
    p.add_argument("--write-wandb", action="store_true", help="(re)write sweeps/wandb/ files for this grid")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="start all arms' multiruns at once (default: only with a non-basic hydra/launcher, e.g. "
                        "hydra/launcher=slurm)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs `-m hps_exp` (default: this one)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra overrides for every job")
    args = p.parse_intermixed_args(argv)  # options may come after key=value overrides
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"extra overrides must be key=value; got {' '.join(bad)}")
    return args, args.overrides


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        sweep = load(args.name)
        if args.write_wandb:
            write_wandb(sweep)
            return 0
        jobs_dir = Path(args.jobs_dir) if args.jobs_dir else Path("outputs") / "sweeps" / sweep.name
        return run(sweep, jobs_dir, extra, dry_run=args.dry_run, parallel=args.parallel, python=args.python)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
