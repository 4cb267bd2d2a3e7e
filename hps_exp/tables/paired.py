"""Paired tests of the treatment preference model against the best baseline of its framework: pairs by (seed,
held-out prompt) where both runs report per-prompt values, else by seed (hps_exp.stats.paired_test)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from hps_exp import stats
from hps_exp.tables.aggregate import MARGINS, build_rows, hashable, samples_of, value_key
from hps_exp.tables.collect import Run, metric_of, per_prompt_of


@dataclass
class PairedResult:
    eval_set: str
    metric: str
    framework: str
    treatment: str      # row label
    baseline: str       # row label: the best other preference model of the framework by mean
    diff: float         # mean over pairs of treatment - baseline
    n_seeds: int
    n_pairs: int
    per_prompt: bool    # paired by (seed, prompt); False: by seed only
    p: float
    circular: bool = False  # a run on either side was scored by its annotation reward model


def _one_per_seed(runs: list[Run]) -> dict[Any, Run]:
    out: dict[Any, Run] = {}
    for r in runs:
        out.setdefault(hashable(r.run.get("seed")), r)  # duplicates of a seed: the first run (noted elsewhere)
    return out


def paired_comparison(t_runs: list[Run], b_runs: list[Run], eval_set: str, stage: str, metric: str,
                      ) -> tuple[list[list[float]], list[list[float]], bool] | None:
    """Treatment and baseline values paired by (seed, prompt) over their common seeds, or by seed when a seed
    lacks per-prompt values of equal length on both sides. None without a common seed."""
    t_seed, b_seed = _one_per_seed(t_runs), _one_per_seed(b_runs)
    common = [s for s in sorted(t_seed, key=value_key) if s in b_seed
              and metric_of(t_seed[s], eval_set, stage, metric) is not None
              and metric_of(b_seed[s], eval_set, stage, metric) is not None]
    if not common:
        return None
    tp = [per_prompt_of(t_seed[s], eval_set, stage, metric) for s in common]
    bp = [per_prompt_of(b_seed[s], eval_set, stage, metric) for s in common]
    both = [(x, y) for x, y in zip(tp, bp) if x is not None and y is not None and len(x) == len(y)]
    if len(both) == len(common):
        return [x for x, _ in both], [y for _, y in both], True

    def scalar(run: Run) -> float:
        value = metric_of(run, eval_set, stage, metric)
        assert value is not None   # `common` keeps only the seeds with the metric on both sides
        return value
    return [[scalar(t_seed[s])] for s in common], [[scalar(b_seed[s])] for s in common], False


def paired_tests(runs: list[Run], treatment: str, stage: str = "aligned", metrics: Iterable[str] = MARGINS,
                 baselines: Iterable[str] | None = None) -> list[PairedResult]:
    """For each eval set and margin metric: each row whose preference model is `treatment` against the row of
    the same framework (and same train set and n) with the best mean among the baseline preference models
    (`baselines`; default: every other preference model), named recipes (`label=`) excepted."""
    allowed = set(baselines) if baselines else None
    done = [r for r in runs if r.ok]
    rows = build_rows(done)
    eval_sets = sorted({e for r in done for e in r.eval})
    results = []
    for metric in metrics:
        for e in eval_sets:
            means = {row.label: statistics.fmean(s.value for s in samples) for row in rows
                     if (samples := samples_of(row.runs, e, stage, metric))}
            for t in rows:
                if t.preference_model != treatment or t.label not in means:
                    continue
                # a named recipe (label=) is no baseline: the released HPS recipe's loss is DPO's
                candidates = [b for b in rows if b.framework == t.framework and b.preference_model != treatment
                              and not b.labelled and (allowed is None or b.preference_model in allowed)
                              and b.comparable() == t.comparable() and b.label in means]
                if not candidates:
                    continue
                best = max(candidates, key=lambda b: means[b.label])
                paired = paired_comparison(t.runs, best.runs, e, stage, metric)
                if paired is None:
                    continue
                a, b, per_prompt = paired
                diffs = [x - y for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
                results.append(PairedResult(e, metric, t.framework, t.label, best.label, statistics.fmean(diffs),
                                            len(a), len(diffs), per_prompt, stats.paired_test(a, b),
                                            any(r.circular for r in t.runs + best.runs)))
    return results

