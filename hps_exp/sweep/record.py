"""The launched grid, recorded in `<jobs dir>/sweep_grid.json` when a sweep starts: sweep name and file, the
command-line extras, every arm's multirun overrides, command and jobs. The tables list never-started jobs against
it (the grid that ran), and a relaunch replaces it (saying so when the grid differs)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence, TextIO

from hps_exp.io import atomic_write_text
from hps_exp.sweep.grid import Sweep, SweepError, arm_overrides, key_of, launcher_of

GRID_RECORD = "sweep_grid.json"   # the launched grid, in the jobs dir (a file: the tables never take it for a job)
GRID_RECORD_VERSION = 1


def grid_record(sweep: Sweep, extra: Sequence[str], all_jobs: dict[str, list[list[str]]],
                commands: dict[str, list[str]]) -> dict:
    """What was launched: enough to list the jobs that never started and to relaunch any arm by hand."""
    labels = [key_value.split("=", 1)[1] for key_value in arm_overrides(sweep, next(iter(sweep.arms)), extra)
              if key_of(key_value) == "sweep"]
    return {"version": GRID_RECORD_VERSION, "sweep": sweep.name, "label": labels[-1] if labels else sweep.name,
            "sweep_file": str(sweep.path.resolve()),
            "description": sweep.description, "extra": list(extra), "launcher": launcher_of(sweep, extra),
            "compare": dict(sweep.compare),
            "launched_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "arms": {arm: {"overrides": arm_overrides(sweep, arm, extra), "command": commands[arm],
                           "jobs": arm_jobs} for arm, arm_jobs in all_jobs.items()}}


def read_grid_record(jobs_dir: Path) -> dict | None:
    """The record in jobs_dir, None when there is none; SweepError naming the file when it is not a record."""
    path = Path(jobs_dir) / GRID_RECORD
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SweepError(f"{path}: unreadable grid record ({e})") from None
    arms = data.get("arms") if isinstance(data, dict) else None
    ok = isinstance(arms, dict) and isinstance(data.get("sweep"), str) and all(
        isinstance(a, dict) and isinstance(a.get("jobs"), list)
        and all(isinstance(j, list) and all(isinstance(o, str) for o in j) for j in a["jobs"])
        for a in arms.values())
    if not ok:
        raise SweepError(f"{path}: not a grid record (needs sweep and arms.<arm>.jobs, lists of overrides)")
    return data


def write_grid_record(jobs_dir: Path, record: dict, out: TextIO) -> Path:
    path = Path(jobs_dir) / GRID_RECORD
    try:
        old = read_grid_record(jobs_dir)
    except SweepError as e:
        print(f"[sweep] warning: {e}; replacing it", file=out)
        old = None
    if old is not None and {a: v.get("jobs") for a, v in old["arms"].items()} != \
            {a: v["jobs"] for a, v in record["arms"].items()}:
        print(f"[sweep] note: {path} recorded another grid (sweep {old.get('sweep')}, launched "
              f"{old.get('launched_at', '?')}, extras {' '.join(old.get('extra') or []) or 'none'}); replaced by "
              "this launch's", file=out)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path
