"""Choose each method's hyperparameters on the validation split, never on the test prompts.

A tuning sweep runs every method over a small grid (e.g. loss.beta x trainer.lr) with `eval.split=validation`
(validation prompts carved from the training prompts: `eval.validation_prompts`). This reads its jobs, averages
the chosen validation metric over seeds for every (method, grid point), and prints the table and, per method, the
overrides with the best mean: the arms to paste into the final sweep (which runs with `eval.split=test`).

    python -m hps_exp.tune outputs/sweeps/smollm2_hh_tune --keys loss.beta trainer.lr [--metric reward]

Jobs evaluated on anything but the validation split are refused: a choice made on test prompts would leak.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dirs", nargs="+", help="tuning sweep dirs (jobs run with eval.split=validation)")
    ap.add_argument("--keys", nargs="+", required=True, help="the tuned overrides, e.g. loss.beta trainer.lr")
    ap.add_argument("--metric", default="reward", help="the validation metric to maximise, as metrics.json names "
                    "it (e.g. reward, reward_margin, bleu_corpus, bleu_sentence; default: %(default)s)")
    args = ap.parse_args(argv)
    missing = [d for d in args.sweep_dirs if not Path(d).is_dir()]
    if missing:
        print(f"[tune] no such sweep dir: {missing[0]}", file=sys.stderr)
        return 2
    try:
        chosen = choose(collect_runs(args.sweep_dirs), args.keys, args.metric)
    except TuneError as e:
        print(f"[tune] {e}", file=sys.stderr)
        return 2
    print(render(chosen, args.keys, args.metric))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
