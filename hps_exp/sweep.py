"""Run a grid from `sweeps/NAME.yaml`: one Hydra multirun per method arm, all jobs under one sweep dir.

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
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SWEEPS_DIR = REPO / "sweeps"
WANDB_DIR = SWEEPS_DIR / "wandb"
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
TOP_KEYS = {"description", "arms", "grid", "fixed", "requires", "compare"}
COMPARE_KEYS = {"treatment", "baselines"}
GRID_RECORD = "sweep_grid.json"   # the launched grid, in the jobs dir (a file: the tables never take it for a job)
GRID_RECORD_VERSION = 1
WANDB_COMMAND = ["${env}", "${interpreter}", "-m", "hps_exp", "${args_no_hyphens}"]


class SweepError(ValueError):
    """A bad sweep file or command line; the message says what to fix."""


@dataclass
class Sweep:
    name: str
    path: Path
    description: str
    arms: dict[str, list[str]]
    grid: dict[str, list[str]]          # key -> values (as Hydra override value strings)
    fixed: list[str]
    requires: list[str] = field(default_factory=list)
    # The tables' paired test: {"treatment": preference model, "baselines": [preference models] (default: all others)}
    compare: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ load

def available() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def locate(name: str) -> Path:
    """A sweep name in sweeps/ or a path to a yaml file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    candidate = SWEEPS_DIR / f"{name}.yaml"
    if "/" not in name and candidate.is_file():
        return candidate
    raise SweepError(f"unknown sweep {name!r}; available: {', '.join(available()) or '(none)'} "
                     f"(or give a path to a sweep .yaml file)")


def _value_str(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise SweepError(f"grid value {v!r}: use a scalar (string or number)")


def _values(key: str, raw: Any) -> list[str]:
    if isinstance(raw, str):
        vals = [v.strip() for v in raw.split(",")]
    elif isinstance(raw, list):
        vals = [_value_str(v) for v in raw]
    else:
        vals = [_value_str(raw)]
    if not vals or any(v == "" for v in vals):
        raise SweepError(f"grid.{key}: empty value in {raw!r}")
    return vals


def _overrides(where: str, raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(o, str) and "=" in o for o in raw):
        raise SweepError(f"{where}: expected a list of key=value overrides; got {raw!r}")
    return list(raw)


def _valid_compare(compare: Any) -> bool:
    if not isinstance(compare, dict) or set(compare) - COMPARE_KEYS:
        return False
    baselines = compare.get("baselines", [])
    return isinstance(compare.get("treatment"), str) and bool(compare["treatment"]) \
        and isinstance(baselines, list) and all(isinstance(b, str) and b for b in baselines)


def load(name: str) -> Sweep:
    import yaml

    path = locate(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with arms/grid/fixed")
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(TOP_KEYS))}")
    arms_raw = data.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise SweepError(f"{path}: 'arms' must map arm names to override lists")
    arms = {}
    for arm, ovs in arms_raw.items():
        if not ARM_NAME.match(str(arm)):
            raise SweepError(f"{path}: arm name {arm!r} must be a plain directory name ([A-Za-z0-9_.+-])")
        arms[str(arm)] = _overrides(f"{path}: arms.{arm}", ovs)
    grid_raw = data.get("grid") or {}
    if not isinstance(grid_raw, dict):
        raise SweepError(f"{path}: 'grid' must map keys to comma lists")
    grid = {str(k): _values(str(k), v) for k, v in grid_raw.items()}
    requires = data.get("requires") or []
    if not isinstance(requires, list):
        raise SweepError(f"{path}: 'requires' must be a list of keys")
    compare = data.get("compare") or {}
    if compare and not _valid_compare(compare):
        raise SweepError(f"{path}: 'compare' must be a mapping like {{treatment: <preference model>, baselines: "
                         f"[<preference model>, ...]}} (baselines optional); got {compare!r}")
    stem = path.stem
    return Sweep(stem, path, str(data.get("description", "")), arms, grid,
                 _overrides(f"{path}: fixed", data.get("fixed")), [str(r) for r in requires], dict(compare))


# ---------------------------------------------------------------------------------------------- expand

def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge(*layers: list[str]) -> list[str]:
    """Concatenate override lists; a later layer's key replaces an earlier one's (in the earlier position)."""
    out: dict[str, str] = {}
    for layer in layers:
        for o in layer:
            out[key_of(o)] = o
    return list(out.values())


def grid_overrides(sweep: Sweep) -> list[str]:
    return [f"{k}={','.join(vs)}" for k, vs in sweep.grid.items()]


def arm_overrides(sweep: Sweep, arm: str, extra: list[str] = ()) -> list[str]:
    """The overrides of one arm's multirun (without the hydra.sweep.* keys); `sweep=NAME` labels every job."""
    owned = [o for o in extra if key_of(o).startswith("hydra.sweep.")]
    if owned:
        raise SweepError(f"{' '.join(owned)}: the runner sets hydra.sweep.dir/subdir; use --jobs-dir DIR")
    return merge(sweep.fixed, grid_overrides(sweep), sweep.arms[arm], [f"sweep={sweep.name}"], list(extra))


def expand(overrides: list[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of these overrides, in job-number order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise SweepError(f"bad override: {e}") from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def jobs(sweep: Sweep, extra: list[str] = ()) -> dict[str, list[list[str]]]:
    """Arm -> the override list of each of its jobs (job k = element k)."""
    return {arm: expand(arm_overrides(sweep, arm, extra)) for arm in sweep.arms}


def missing_required(sweep: Sweep, extra: list[str]) -> list[str]:
    given = {key_of(o) for o in extra}
    return [k for k in sweep.requires if k not in given]


def _hydra_str(value: str) -> str:
    """A path as a Hydra override value: quoted unless it is plainly safe."""
    if re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def command(sweep: Sweep, arm: str, jobs_dir: Path, extra: list[str] = (), python: str = sys.executable) -> list[str]:
    # One sweep dir per arm: concurrent arms then never write the same multirun.yaml / .submitit folder.
    return [python, "-m", "hps_exp", "-m", *arm_overrides(sweep, arm, extra),
            f"hydra.sweep.dir={_hydra_str(str(jobs_dir / arm))}", "hydra.sweep.subdir=${hydra.job.num}"]


def launcher_of(sweep: Sweep, extra: list[str] = ()) -> str:
    """The hydra/launcher the jobs use ("basic" unless the sweep file or the command line sets one)."""
    chosen = [o.split("=", 1)[1] for o in merge(sweep.fixed, list(extra)) if key_of(o) == "hydra/launcher"]
    return chosen[-1] if chosen else "basic"


def wants_parallel(sweep: Sweep, extra: list[str], parallel: bool | None) -> bool:
    """Explicit --parallel / --no-parallel, else concurrent arms exactly when a non-basic launcher is used."""
    return parallel if parallel is not None else launcher_of(sweep, extra) != "basic"


# ----------------------------------------------------------------------------------------- grid record

def grid_record(sweep: Sweep, extra: list[str], all_jobs: dict[str, list[list[str]]],
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


def write_grid_record(jobs_dir: Path, record: dict, out) -> Path:
    from hps_exp.data.schema import atomic_write_text

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


def run_sequential(commands: dict[str, list[str]], n_jobs: dict[str, int], jobs_dir: Path, out) -> list[ArmResult]:
    results = []
    for arm, cmd in commands.items():
        t0 = time.perf_counter()
        print(f"[sweep] === arm {arm} ({n_jobs[arm]} job(s)) ===", file=out, flush=True)
        rc = subprocess.call(cmd, cwd=os.getcwd())
        results.append(_arm_result(arm, n_jobs[arm], rc, time.perf_counter() - t0, jobs_dir))
    return results


def run_parallel(commands: dict[str, list[str]], n_jobs: dict[str, int], jobs_dir: Path, out,
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


def print_summary(sweep: Sweep, jobs_dir: Path, results: list[ArmResult], total: int, wall: float, out) -> bool:
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


def run(sweep: Sweep, jobs_dir: Path, extra: list[str], dry_run: bool = False, out=None,
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


# ----------------------------------------------------------------------------------------- W&B sweeps

def _split_override(o: str) -> tuple[str, list[Any]]:
    """key=v1,v2 -> (key, [v1, v2]) with Hydra's own parsing of the values (numbers stay numbers)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(o)
    values = list(parsed.sweep_iterator()) if parsed.is_sweep_override() else [parsed.value()]
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
        raise SweepError(f"{o}: a W&B sweep parameter takes only strings and numbers")
    return parsed.get_key_element(), values


def wandb_sweeps(sweep: Sweep) -> dict[str, dict]:
    """W&B grid sweep configs driving `python -m hps_exp key=value ...` with the same jobs as the Hydra grid.

    One config when every arm sets only one and the same key (e.g. loss=a|b|c): that key becomes a grid
    parameter. Otherwise one config per arm (file stem `<name>.<arm>`), since W&B cannot couple parameters."""
    arm_keys = {arm: [key_of(o) for o in ovs] for arm, ovs in sweep.arms.items()}
    one_key = len({tuple(k) for k in arm_keys.values()}) == 1 and all(len(k) == 1 for k in arm_keys.values()) \
        and all(len(_split_override(ovs[0])[1]) == 1 for ovs in sweep.arms.values())
    groups = {sweep.name: list(sweep.arms)} if one_key else {f"{sweep.name}.{arm}": [arm] for arm in sweep.arms}
    out = {}
    for stem, arms in groups.items():
        params: dict[str, dict] = {}
        for o in arm_overrides(sweep, arms[0]):
            key, values = _split_override(o)
            params[key] = {"values": values} if len(values) > 1 else {"value": values[0]}
        if one_key:
            key = arm_keys[arms[0]][0]
            params[key] = {"values": [_split_override(sweep.arms[a][0])[1][0] for a in arms]}
        desc = sweep.description.strip() + ("" if one_key else f" (arm {arms[0]})")
        out[stem] = {"program": "hps_exp", "name": stem, "description": desc, "method": "grid",
                     "parameters": params, "command": list(WANDB_COMMAND)}
    return out


def wandb_jobs(config: dict) -> list[list[str]]:
    """The key=value argument lists a W&B grid agent runs for this config (what ${args_no_hyphens} renders)."""
    keys, choices = [], []
    for key, spec in config["parameters"].items():
        keys.append(key)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*choices)]


def render_wandb(config: dict) -> str:
    import yaml

    header = ("# Generated by `python -m hps_exp.sweep NAME --write-wandb` from sweeps/"
              f"{config['name'].split('.')[0]}.yaml; do not edit by hand.\n"
              f"# wandb sweep sweeps/wandb/{config['name']}.yaml  &&  wandb agent <entity/project/sweep id>\n")
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=110)


def write_wandb(sweep: Sweep, out=None) -> list[Path]:
    out = out or sys.stdout
    WANDB_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, config in wandb_sweeps(sweep).items():
        path = WANDB_DIR / f"{stem}.yaml"
        path.write_text(render_wandb(config), encoding="utf-8")
        written.append(path)
        print(f"[sweep] wrote {path} ({len(wandb_jobs(config))} run(s))", file=out)
    return written


# ------------------------------------------------------------------------------------------------- CLI

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


if __name__ == "__main__":
    sys.exit(main())
