"""Choose each method's hyperparameters on the validation split, never on the test prompts.

A tuning sweep runs every method over a small grid (e.g. loss.beta x trainer.lr) with `eval.split=validation`
(validation prompts carved from the training prompts: `eval.validation_prompts`). This reads its jobs, averages
the chosen validation metric over seeds for every (method, grid point), and prints the table and, per method, the
overrides with the best mean: the arms to paste into the final sweep (which runs with `eval.split=test`).

    python -m hps_exp.tune outputs/sweeps/smollm2_hh_tune --keys loss.beta trainer.lr [--metric reward] \
        [--write-sweep smollm2_hh sweeps/smollm2_hh_tuned.yaml]

`--write-sweep BASE OUT` writes the final sweep: BASE's file with each arm's chosen values appended to its
overrides (an arm is matched to its tuning jobs by their dir, `<jobs dir>/<arm>/<k>`); every arm of BASE must
have been tuned, so that every method gets the same tuning budget.

Jobs evaluated on anything but the validation split are refused: a choice made on test prompts would leak.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from hps_exp.io import atomic_write_text
from hps_exp.tables import Run, collect_runs, metric_of

VALIDATION = "validation"


class TuneError(ValueError):
    pass


def grid_point(run: Run, keys: list[str]) -> tuple[str, ...]:
    """The job's values of the tuned keys ("" where the job did not set one: the default)."""
    given = dict(o.split("=", 1) for o in run.overrides if "=" in o)
    return tuple(given.get(k, given.get(f"+{k}", "")) for k in keys)


def choose(runs: list[Run], keys: list[str], metric: str, stage: str = "aligned") -> dict[str, dict]:
    """{method: {"best": grid point, "means": {grid point: (mean, seeds)}}}; the higher mean wins (ties: the
    first grid point in sorted order)."""
    leaked = [r.job_dir for r in runs if r.ok and r.run.get("eval_split") != VALIDATION]
    if leaked:
        raise TuneError(f"{len(leaked)} job(s) were not evaluated on the validation split (eval.split=validation), "
                        f"e.g. {leaked[0]}: hyperparameters are never chosen on test prompts")
    values: dict = defaultdict(lambda: defaultdict(list))
    for r in runs:
        v = metric_of(r, VALIDATION, stage, metric) if r.ok else None
        if v is not None:
            values[r.method][grid_point(r, keys)].append(v)
    if not values:
        blocks = [(r, (r.eval.get(VALIDATION) or {}).get(stage)) for r in runs if r.ok]
        reported = sorted({k for r, b in blocks if isinstance(b, dict) for k in b
                           if metric_of(r, VALIDATION, stage, k) is not None})
        raise TuneError(f"no completed job has {VALIDATION}.{stage}.{metric}; they report "
                        f"{', '.join(reported) or 'none'}")
    out = {}
    for method, points in sorted(values.items()):
        means = {p: (statistics.fmean(v), len(v)) for p, v in sorted(points.items())}
        out[method] = {"best": max(means, key=lambda p: means[p][0]), "means": means}
    return out


def render(chosen: dict[str, dict], keys: list[str], metric: str) -> str:
    lines = [f"| method | {' | '.join(keys)} | validation {metric} (mean over seeds) | seeds |",
             f"|---|{'---|' * len(keys)}---|---|"]
    for method, c in chosen.items():
        for point, (mean, n) in c["means"].items():
            mark = "**" if point == c["best"] else ""
            lines.append(f"| {method} | {' | '.join(v or '(default)' for v in point)} | {mark}{mean:.4f}{mark} | {n} |")
    lines += ["", "chosen (arms for the final sweep, eval.split=test):"]
    for method, c in chosen.items():
        lines.append(f"  {method}: [{', '.join(f'{k}={v}' for k, v in zip(keys, c['best']) if v)}]")
    return "\n".join(lines)


def tuned_sweep(base_name: str, runs: list[Run], chosen: dict[str, dict], keys: list[str], command: str) -> str:
    """The text of the final sweep file: `base_name`'s with each arm's chosen values (TuneError: an arm of the
    base without tuning jobs, or whose jobs are of several methods)."""
    import yaml

    from hps_exp import sweep as sweep_mod

    base = sweep_mod.load(base_name)
    methods: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        if r.ok:
            methods[r.job_dir.parent.name].add(r.method)
    arms, grids = {}, {}
    for arm, overrides in base.arms.items():
        found = methods.get(arm, set()) & set(chosen)
        if len(found) != 1:
            what = "jobs of several methods: " + ", ".join(sorted(found)) if found else "no tuning jobs"
            raise TuneError(f"arm {arm!r} of {base.path.name} has {what} (tuning jobs are matched by their dir "
                            f"<jobs dir>/<arm>/<k>; tuned arms: {', '.join(sorted(methods)) or 'none'})")
        method = found.pop()
        grids[arm] = set(chosen[method]["means"])
        best = chosen[method]["best"]
        arms[arm] = sweep_mod.merge(overrides, [f"{k}={v}" for k, v in zip(keys, best) if v])
    every = set().union(*grids.values())
    for arm, points in grids.items():   # the same tuning budget for every method, or no final sweep
        if points != every:
            missing = ", ".join("/".join(v or "(default)" for v in p) for p in sorted(every - points))
            raise TuneError(f"arm {arm!r} has no completed tuning job at {missing} ({', '.join(keys)}), which other "
                            f"arms have: finish (or rerun) its tuning jobs first")
    data = {"description": f"{base.description} Tuned: each arm's {', '.join(keys)} chosen on the validation prompts "
                           f"({base.path.name} + the tuning sweep's choice).",
            "requires": base.requires, "arms": arms, **({"grid": {k: ",".join(v) for k, v in base.grid.items()}}
                                                       if base.grid else {}),
            "fixed": base.fixed, **({"compare": base.compare} if base.compare else {})}
    header = (f"# GENERATED from sweeps/{base.path.name} by the tuning step; edit that file and regenerate:\n"
              f"#   {command}\n# Every arm's overrides are its own in {base.path.name} plus the values chosen for it "
              f"on the validation prompts\n# (python -m hps_exp.tune prints the whole grid). Comments on the fixed "
              f"settings: {base.path.name}.\n")
    return header + yaml.safe_dump(data, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", help="tuning sweep dirs (jobs run with eval.split=validation)")
    ap.add_argument("--keys", nargs="+", required=True, help="the tuned overrides, e.g. loss.beta trainer.lr")
    ap.add_argument("--metric", default="reward", help="the validation metric to maximise, as metrics.json names "
                    "it (e.g. reward, reward_margin, bleu_corpus, bleu_sentence; default: %(default)s)")
    ap.add_argument("--write-sweep", nargs=2, metavar=("BASE", "OUT"),
                    help="write OUT: the sweep BASE (a name in sweeps/ or a path) with each arm's chosen values")
    args = ap.parse_args(argv)
    missing = [d for d in args.sweep_dirs if not Path(d).is_dir()]
    if missing:
        print(f"[tune] no such sweep dir: {missing[0]}", file=sys.stderr)
        return 2
    runs = collect_runs(args.sweep_dirs)
    try:
        chosen = choose(runs, args.keys, args.metric)
        text = None
        if args.write_sweep:
            command = "python -m hps_exp.tune " + " ".join(sys.argv[1:] if argv is None else argv)
            text = tuned_sweep(args.write_sweep[0], runs, chosen, args.keys, command)
    except TuneError as e:
        print(f"[tune] {e}", file=sys.stderr)
        return 2
    print(render(chosen, args.keys, args.metric))
    if text is not None:
        atomic_write_text(Path(args.write_sweep[1]), text)
        print(f"[tune] wrote {args.write_sweep[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
