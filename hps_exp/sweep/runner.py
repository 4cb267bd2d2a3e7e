"""Launch a sweep: one `python -m hps_exp -m ...` multirun per arm, one after another (basic launcher) or all at
once (a cluster launcher, whose multirun submits and then waits), record the grid first, and summarise every job's
status from its metrics.json."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from hps_exp.sweep.grid import Sweep, SweepError, arm_overrides, jobs, launcher_of, missing_required
from hps_exp.sweep.record import grid_record, write_grid_record


def _hydra_str(value: str) -> str:
    """A path as a Hydra override value: quoted unless it is plainly safe."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def command(sweep: Sweep, arm: str, jobs_dir: Path, extra: Sequence[str] = (),
            python: str = sys.executable) -> list[str]:
    # One sweep dir per arm: concurrent arms then never write the same multirun.yaml / .submitit folder.
    return [python, "-m", "hps_exp", "-m", *arm_overrides(sweep, arm, extra),
            f"hydra.sweep.dir={_hydra_str(str(jobs_dir / arm))}", "hydra.sweep.subdir=${hydra.job.num}"]



def wants_parallel(sweep: Sweep, extra: Sequence[str], parallel: bool | None) -> bool:
    """Explicit --parallel / --no-parallel, else concurrent arms exactly when a non-basic launcher is used."""
    return parallel if parallel is not None else launcher_of(sweep, extra) != "basic"


# ------------------------------------------------------------------------------------------------- run

def job_status(job_dir: Path) -> str:
    path = job_dir / "metrics.json"
    if not path.is_file():
        return "missing"
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("status", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unreadable"


def existing_jobs(jobs_dir: Path, arms: list[str]) -> list[Path]:
    return [p for arm in arms if (jobs_dir / arm).is_dir() for p in (jobs_dir / arm).iterdir() if p.is_dir()]


@dataclass
class ArmResult:
    arm: str
    n_jobs: int
    rc: int
    seconds: float
    statuses: list[str]

    @property
    def done(self) -> int:
        return self.statuses.count("completed")


def _arm_result(arm: str, n_jobs: int, rc: int, seconds: float, jobs_dir: Path) -> ArmResult:
    return ArmResult(arm, n_jobs, rc, seconds, [job_status(jobs_dir / arm / str(k)) for k in range(n_jobs)])


def run_sequential(commands: dict[str, list[str]], n_jobs: dict[str, int], jobs_dir: Path,
                   out: TextIO) -> list[ArmResult]:
    results = []
    for arm, cmd in commands.items():
        t0 = time.perf_counter()
        print(f"[sweep] === arm {arm} ({n_jobs[arm]} job(s)) ===", file=out, flush=True)
        rc = subprocess.call(cmd, cwd=os.getcwd())
        results.append(_arm_result(arm, n_jobs[arm], rc, time.perf_counter() - t0, jobs_dir))
    return results


def run_parallel(commands: dict[str, list[str]], n_jobs: dict[str, int], jobs_dir: Path, out: TextIO,
                 poll_s: float = 0.5) -> list[ArmResult]:
    """Start every arm's multirun at once (each submits its jobs, then waits on them); output to log files."""
    log_dir = jobs_dir / ".sweep_logs"  # hidden: the tables never take it for a job dir
    log_dir.mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    finished: dict[str, ArmResult] = {}
    try:
        for arm, cmd in commands.items():
            log = open(log_dir / f"{arm}.log", "w", encoding="utf-8")
            running[arm] = (subprocess.Popen(cmd, cwd=os.getcwd(), stdout=log, stderr=subprocess.STDOUT),
                            log, time.perf_counter())
            print(f"[sweep] started arm {arm} ({n_jobs[arm]} job(s)), pid {running[arm][0].pid}, "
                  f"log {log_dir / f'{arm}.log'}", file=out, flush=True)
        while running:
            for arm in list(running):
                proc, log, t0 = running[arm]
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[arm]
                finished[arm] = _arm_result(arm, n_jobs[arm], rc, time.perf_counter() - t0, jobs_dir)
                print(f"[sweep] arm {arm} finished: exit {rc}, {finished[arm].done}/{n_jobs[arm]} job(s) "
                      "completed", file=out, flush=True)
            if running:
                time.sleep(poll_s)
    finally:
        for proc, log, _ in running.values():  # interrupted: stop only the processes started here
            proc.terminate()
            proc.wait()
            log.close()
    return [finished[arm] for arm in commands]


def print_summary(sweep: Sweep, jobs_dir: Path, results: list[ArmResult], total: int, wall: float,
                  out: TextIO) -> bool:
    print(f"\n[sweep] summary of {sweep.name} ({jobs_dir}):", file=out)
    print(f"  {'arm':<24} {'jobs':>5} {'done':>5} {'failed':>6} {'exit':>5} {'wall':>9}", file=out)
    any_failed = False
    for r in results:
        failed = r.n_jobs - r.done
        any_failed |= failed > 0 or r.rc != 0
        print(f"  {r.arm:<24} {r.n_jobs:>5} {r.done:>5} {failed:>6} {r.rc:>5} {r.seconds:>8.0f}s", file=out)
        for k, status in enumerate(r.statuses):
            if status != "completed":
                print(f"    job {r.arm}/{k}: {status}", file=out)
    print(f"  total: {total} job(s), {sum(r.done for r in results)} completed, wall {wall:.0f}s", file=out)
    print(f"[sweep] tables: python -m hps_exp.tables {shlex.quote(str(jobs_dir))}", file=out)
    return any_failed


def run(sweep: Sweep, jobs_dir: Path, extra: Sequence[str], dry_run: bool = False, out: TextIO | None = None,
        parallel: bool | None = None, python: str = sys.executable) -> int:
    out = out or sys.stdout
    all_jobs = jobs(sweep, extra)
    total = sum(len(j) for j in all_jobs.values())
    concurrent = wants_parallel(sweep, extra, parallel)
    print(f"[sweep] {sweep.name}: {len(all_jobs)} arm(s), {total} job(s) -> {jobs_dir}", file=out)
    if sweep.description:
        print(f"[sweep] {sweep.description.strip()}", file=out)
    missing = missing_required(sweep, extra)
    if missing:
        msg = f"sweep {sweep.name} needs {', '.join(f'{k}=...' for k in missing)} on the command line"
        if not dry_run:
            raise SweepError(msg)
        print(f"[sweep] note: {msg}", file=out)
    print(f"[sweep] launcher {launcher_of(sweep, extra)}: arms run "
          + ("all at once" if concurrent else "one after another"), file=out)
    commands = {arm: command(sweep, arm, jobs_dir, extra, python) for arm in all_jobs}
    for arm, arm_jobs in all_jobs.items():
        print(f"[sweep] arm {arm}: {len(arm_jobs)} job(s)", file=out)
        print("  " + shlex.join(commands[arm]), file=out)
    if dry_run:
        print(f"[sweep] dry run: {total} job(s) in {len(all_jobs)} arm(s); nothing launched", file=out)
        return 0
    old = existing_jobs(jobs_dir, list(all_jobs))
    if old:
        print(f"[sweep] warning: {jobs_dir} already holds {len(old)} job dir(s) of these arms; jobs with the same "
              "number are overwritten and resume from their checkpoints (trainer.resume=true). Use --jobs-dir "
              "or delete the dir for a fresh sweep.", file=out)
    record = write_grid_record(jobs_dir, grid_record(sweep, extra, all_jobs, commands), out)
    print(f"[sweep] recorded the launched grid in {record}", file=out)
    n_jobs = {arm: len(j) for arm, j in all_jobs.items()}
    started = time.perf_counter()
    runner = run_parallel if concurrent else run_sequential
    results = runner(commands, n_jobs, jobs_dir, out)
    any_failed = print_summary(sweep, jobs_dir, results, total, time.perf_counter() - started, out)
    return 1 if any_failed else 0
