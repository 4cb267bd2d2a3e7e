"""Samplers: which of a prompt's n responses the loss sees at a step, in slot order.

Slot 0 holds the preferred (best) response; slots 1.. the dispreferred ones in decreasing score (slot 1 =
hardest by score). Every sampler is built by Hydra from `conf/sampler/<name>.yaml` and answers
`select(example, rng, progress) -> Selection(indices, num_negatives, gamma)`.

| config      | class                | kind    | slots per prompt                                                    |
|-------------|----------------------|---------|---------------------------------------------------------------------|
| pair        | PairSampler          | pair    | (chosen, rejected): the dataset's own pair, scores ignored           |
| best_worst  | BestWorstSampler     | pair    | (best, worst) by score; (chosen, rejected) when there are no scores  |
| all         | RankingSampler       | ranking | all n, best first, then by decreasing score (ties by index)          |
| hard        | HardSampler          | hard    | best + `num_negatives` drawn without replacement, P ∝ exp(γ·r̂)      |
| uniform     | HardSampler(gamma=0) | hard    | best + `num_negatives` drawn uniformly                               |

Negatives ("eligible negatives") are the responses whose score is strictly below the best score: a response
tied with the best is never a negative and never drawn. `Selection.num_negatives` = N = their number over the
whole prompt (n - 1 without ties; n - 1 for data without scores), whatever the slots hold.

HardSampler's draw: with E eligible negatives and k = min(num_negatives, E), k distinct negatives are drawn
by successive sampling without replacement, each draw ∝ exp(γ·r̂_i) over those not yet drawn (Gumbel-top-k,
which is exactly that process). For k = 1 the probabilities are `probabilities(ex, γ)` = softmax(γ·r̂) over
the eligible negatives. γ = 0 is uniform, γ → +∞ the hardest negative, γ < 0 favours easy negatives.
γ schedules over training progress p ∈ [0, 1] (`gamma_at`): "constant" (γ = gamma), "linear"
(gamma_start → gamma_end), "step" (gamma_start → gamma_end in equal steps at the milestones, reaching gamma_end;
with the defaults γ = -5, -2.5, 0, 2.5, 5 on [0, .2), [.2, .4), [.4, .6), [.6, .8), [.8, 1]) and "authors" (the
HPS authors' released code: γ = gamma_start + (gamma_end - gamma_start)·m, m the last milestone passed, 0 before
the first — their -5 + 10·i/(M-1) at row i = 20/40/60/80 % of M rows, for large M; with the defaults γ = -5, -3,
-1, 1, 3, never +5). A progress value at a milestone already counts as past it.

Where hardness comes from (`hardness`, HardSampler only): "annotation" (default) the scores r̂ as above;
"policy_reward" the current policy's implicit rewards r_i (the loss's own r, no gradient); "policy_logp" its
log-probabilities log π_θ(y_i|x) (MC-PO's choice). The candidates are the same eligible negatives (strictly below
the best by r̂); only the logits change: γ·r_i or γ·log π_θ(y_i|x). The policy's values exist only inside a
training step, so the draw is split in two: `noise(ex, rng)` (the Gumbel noise, drawn where the annotation draw
would be drawn, from the same generator) and `select_by(ex, values, noise, γ)` (the top-k of logits + noise, in
the step, once the policy has scored all n responses). Same seed and step => same draws, whatever the world size.

Draws use only the `numpy.random.Generator` passed in; the caller seeds it from (seed, epoch), so draws are
fresh every epoch and reproducible. `check_compatible` rejects sampler/loss/data combinations that cannot work,
with a message saying what to use instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hps_exp.data.schema import Example

__all__ = ["Selection", "PairSampler", "BestWorstSampler", "RankingSampler", "HardSampler", "SCHEDULES",
           "probabilities", "gamma_schedule", "check_compatible"]

SCHEDULES = ("constant", "linear", "step", "authors")
HARDNESS = ("annotation", "policy_reward", "policy_logp")
KINDS = ("pair", "ranking", "hard")


@dataclass(frozen=True)
class Selection:
    """The responses of one prompt that enter the loss, in slot order (slot 0 = preferred)."""
    indices: tuple[int, ...]
    num_negatives: int          # N over the whole prompt (see module docstring), not the slots present
    gamma: float | None = None  # the γ a hard sampler drew with (for logging); None for the other samplers

    def __post_init__(self) -> None:
        if len(self.indices) < 2 or len(set(self.indices)) != len(self.indices):
            raise ValueError(f"a selection needs >= 2 distinct responses, got {self.indices}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")


# ---------------------------------------------------------------- helpers on one example

def _where(ex: Example) -> str:
    return ex.source or "example"


def _scores(ex: Example, who: str) -> np.ndarray:
    """The example's scores as float64, or a ValueError naming the row when there are none or they are bad."""
    if ex.scores is None:
        raise ValueError(f"{who} needs scores, but {_where(ex)} has none (only a chosen/rejected pair)")
    s = np.asarray(ex.scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"{_where(ex)}: scores must be finite for {who}, got {list(ex.scores)}")
    return s


def _logits_to_probs(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()  # stable softmax: the largest exponent is 0
    w = np.exp(z)
    return w / w.sum()


def probabilities(ex: Example, gamma: float) -> dict[int, float]:
    """Exact probability that HardSampler (num_negatives=1, this γ) draws each eligible negative.

    softmax(γ·r̂) over the eligible negatives (score strictly below the best); tied-with-best responses are
    absent (probability 0). Keys are response indices, by decreasing score. Empty if every response ties.
    With num_negatives > 1 these are the probabilities of the first of the successive draws.
    """
    s = _scores(ex, "probabilities()")
    neg = list(ex.negatives)
    if not neg:
        return {}
    p = _logits_to_probs(float(gamma) * s[neg])
    return {i: float(q) for i, q in zip(neg, p)}


def gamma_schedule(progress: float, schedule: str, gamma: float, gamma_start: float, gamma_end: float,
                   milestones: tuple[float, ...]) -> float:
    """γ at a training progress in [0, 1] (values slightly outside are clipped; see the module docstring)."""
    if math.isnan(progress):
        raise ValueError("progress is NaN")
    p = min(1.0, max(0.0, float(progress)))
    if schedule == "constant":
        return float(gamma)
    if schedule == "linear":
        return float(gamma_start + (gamma_end - gamma_start) * p)
    if schedule == "step":
        passed = sum(1 for m in milestones if p >= m)
        return float(gamma_start + (gamma_end - gamma_start) * passed / len(milestones))
    if schedule == "authors":
        last = max((m for m in milestones if p >= m), default=0.0)
        return float(gamma_start + (gamma_end - gamma_start) * last)
    raise ValueError(f"unknown gamma schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def _rank_gap_stats(ex: Example, sel: Selection) -> dict[str, float]:
    """sampler/neg_rank: mean rank of the negatives in slots 1.. among the eligible negatives by decreasing
    score, 1 = hardest (rank = 1 + number of eligible negatives scoring strictly higher, so equal scores share a
    rank; a slot tied with the best gets 1). sampler/neg_gap: mean of score(slot 0) - score(negative), which is
    best - negative for every sampler but `pair` (there: the chosen/rejected score margin)."""
    if ex.scores is None:
        return {}
    s = ex.scores
    top = max(s)
    eligible = sorted((s[i] for i in range(ex.n) if s[i] < top), reverse=True)
    negs = sel.indices[1:]
    ranks = [1 + sum(1 for v in eligible if v > s[i]) for i in negs]
    gaps = [s[sel.indices[0]] - s[i] for i in negs]
    return {"sampler/neg_rank": float(np.mean(ranks)), "sampler/neg_gap": float(np.mean(gaps))}


# ---------------------------------------------------------------- samplers

class _Sampler:
    kind: str = "pair"
    needs_scores: bool = False

    def select(self, ex: Example, rng: np.random.Generator, progress: float) -> Selection:
        raise NotImplementedError

    def stats(self, ex: Example, sel: Selection) -> dict[str, float]:
        return _rank_gap_stats(ex, sel)

    def gamma_at(self, progress: float) -> float | None:
        return None

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({knobs})"


class PairSampler(_Sampler):
    """The dataset's own (chosen, rejected) pair, whatever the scores say (DPO on the raw data)."""

    kind = "pair"
    needs_scores = False

    def select(self, ex: Example, rng: np.random.Generator, progress: float) -> Selection:
        return Selection((ex.chosen, ex.rejected), ex.num_negatives)


class BestWorstSampler(_Sampler):
    """(best, worst) by score: best = first index of the top score (Example.best), worst = LAST index of the
    bottom score, so the two differ even when every score ties. Without scores: falls back to the dataset's
    (chosen, rejected) pair (for a 2-response dataset that is the same thing)."""

    kind = "pair"
    needs_scores = False

    def select(self, ex: Example, rng: np.random.Generator, progress: float) -> Selection:
        if ex.scores is None:
            return Selection((ex.chosen, ex.rejected), ex.num_negatives)
        _scores(ex, "sampler=best_worst")   # finite scores, or a ValueError naming the row
        return Selection((ex.best, ex.worst), ex.num_negatives)


class RankingSampler(_Sampler):
    """All n responses: best first, then the rest by decreasing score (stable: equal scores by index).

    Needs scores when n > 2 (a ValueError names the row otherwise); a 2-response row without scores gives
    (chosen, rejected). Config name: `all`.
    """

    kind = "ranking"
    needs_scores = False  # only for n > 2; check_compatible checks that against the data

    def select(self, ex: Example, rng: np.random.Generator, progress: float) -> Selection:
        if ex.scores is None:
            if ex.n > 2:
                raise ValueError(f"sampler=all needs scores to rank {ex.n} responses, but {_where(ex)} has none; "
                                 "use sampler=pair, or score the responses")
            return Selection((ex.chosen, ex.rejected), 1)
        s = _scores(ex, "sampler=all")
        order = sorted(range(ex.n), key=lambda i: (-s[i], i))  # order[0] == ex.best (first on ties)
        return Selection(tuple(order), ex.num_negatives)


class HardSampler(_Sampler):
    """Best + `num_negatives` negatives drawn without replacement ∝ exp(γ·r̂) over the eligible negatives.

    num_negatives: how many to draw per prompt (all of them when a prompt has fewer eligible negatives).
    gamma: γ for schedule="constant" (default 1). schedule: constant | linear | step | authors (see the module
    docstring); gamma_start, gamma_end (default -5, 5) configure the others, milestones (default .2 .. .8) step
    and authors. A knob the schedule does not use is refused (it would silently do nothing).
    Slots: best, then the drawn negatives by decreasing score (ties by index).
    A prompt whose responses all tie with the best has no negative: select raises a ValueError naming it.
    hardness: annotation | policy_reward | policy_logp (module docstring); the policy ones draw with
    `noise` + `select_by` in the training step (`needs_policy`), never with `select`.
    """

    kind = "hard"
    needs_scores = True

    def __init__(self, num_negatives: int = 1, gamma: float | None = None, schedule: str = "constant",
                 gamma_start: float | None = None, gamma_end: float | None = None,
                 milestones: tuple[float, ...] | list[float] | None = None, hardness: str = "annotation"):
        if hardness not in HARDNESS:
            raise ValueError(f"hardness must be one of {', '.join(HARDNESS)}; got {hardness!r}")
        if isinstance(num_negatives, bool) or int(num_negatives) != num_negatives or num_negatives < 1:
            raise ValueError(f"num_negatives must be an integer >= 1, got {num_negatives!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown gamma schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        uses = {"constant": ("gamma",), "linear": ("gamma_start", "gamma_end")}.get(
            schedule, ("gamma_start", "gamma_end", "milestones"))
        given = {"gamma": gamma, "gamma_start": gamma_start, "gamma_end": gamma_end, "milestones": milestones}
        unused = [k for k, v in given.items() if v is not None and k not in uses]
        if unused:
            raise ValueError(f"{unused[0]} does nothing with schedule={schedule} (it uses {', '.join(uses)}); "
                             f"remove it or pick another schedule")
        gamma = 1.0 if gamma is None else gamma
        gamma_start = -5.0 if gamma_start is None else gamma_start
        gamma_end = 5.0 if gamma_end is None else gamma_end
        milestones = (0.2, 0.4, 0.6, 0.8) if milestones is None else milestones
        for key, value in (("gamma", gamma), ("gamma_start", gamma_start), ("gamma_end", gamma_end)):
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value}")
        milestones = tuple(float(m) for m in milestones)
        if schedule in ("step", "authors"):
            if not milestones:
                raise ValueError("schedule=step needs at least one milestone")
            if any(not 0.0 < m <= 1.0 for m in milestones) or list(milestones) != sorted(set(milestones)):
                raise ValueError(f"milestones must be strictly increasing fractions in (0, 1], got {list(milestones)}")
        self.num_negatives = int(num_negatives)
        self.gamma = float(gamma)
        self.schedule = schedule
        self.gamma_start = float(gamma_start)
        self.gamma_end = float(gamma_end)
        self.milestones = milestones
        self.hardness = hardness
        if hardness != "annotation" and schedule == "constant" and self.gamma == 0:
            raise ValueError(f"hardness={hardness} does nothing at gamma=0 (uniform draws, whatever the policy); "
                             "set sampler.gamma or leave hardness=annotation")

    @property
    def needs_policy(self) -> bool:
        """Whether the draw needs the current policy's values (drawn in the training step: noise + select_by)."""
        return self.hardness != "annotation"

    @property
    def gamma_label(self) -> float | str:
        """γ as a table column: the value, or the schedule, e.g. "authors(-5->5)"."""
        if self.schedule == "constant":
            return self.gamma
        return f"{self.schedule}({self.gamma_start:g}->{self.gamma_end:g})"

    def gamma_at(self, progress: float) -> float:
        return gamma_schedule(progress, self.schedule, self.gamma, self.gamma_start, self.gamma_end,
                              self.milestones)

    def select(self, ex: Example, rng: np.random.Generator, progress: float) -> Selection:
        if self.needs_policy:
            raise ValueError(f"hardness={self.hardness} draws in the training step (noise + select_by), not select")
        return self.select_by(ex, _scores(ex, "sampler=hard"), self.noise(ex, rng), self.gamma_at(progress))

    def _negatives(self, ex: Example) -> list[int]:
        _scores(ex, "sampler=hard")
        neg = sorted(ex.negatives)   # index order: the Gumbel draws are assigned in this order
        if not neg:
            raise ValueError(f"{_where(ex)}: all {ex.n} responses tie with the best score, so there is no "
                             "negative to sample; drop such prompts from the data")
        return neg

    def noise(self, ex: Example, rng: np.random.Generator) -> np.ndarray | None:
        """The Gumbel noise of this prompt's draw, one per eligible negative in index order; None (and nothing
        drawn from rng) when all of them are taken."""
        neg = self._negatives(ex)
        return None if min(self.num_negatives, len(neg)) == len(neg) else rng.gumbel(size=len(neg))

    def select_by(self, ex: Example, values, noise: np.ndarray | None, gamma: float) -> Selection:
        """Best + the k negatives with the largest γ·values[i] + noise: k successive draws without replacement,
        each ∝ exp(γ·values[i]) among those left (Gumbel-top-k). values: one per response (r̂, r_i or log π)."""
        s = _scores(ex, "sampler=hard")
        neg = self._negatives(ex)
        k = min(self.num_negatives, len(neg))
        if noise is None:
            drawn = neg
        else:
            logits = gamma * np.asarray(values, dtype=np.float64)[neg]
            if not np.isfinite(logits).all():
                raise ValueError(f"{_where(ex)}: non-finite hardness values {list(np.asarray(values)[neg])} "
                                 f"(hardness={self.hardness})")
            keys = (logits - logits.max()) + noise
            drawn = [neg[j] for j in np.argsort(-keys, kind="stable")[:k]]
        drawn = sorted(drawn, key=lambda i: (-s[i], i))
        return Selection((ex.best, *drawn), len(neg), gamma)

    def stats(self, ex: Example, sel: Selection) -> dict[str, float]:
        out = _rank_gap_stats(ex, sel)
        gamma = sel.gamma if sel.gamma is not None else (self.gamma if self.schedule == "constant" else None)
        if gamma is not None:
            out["sampler/gamma"] = float(gamma)
        return out


# ---------------------------------------------------------------- config checks

def check_compatible(loss_input_kind: str, loss_needs_scores: bool, loss_name: str, sampler: Any,
                     sampler_name: str, max_n: int, has_scores: bool) -> None:
    """Raise ValueError (saying what to use instead) when this loss, sampler and data cannot work together.

    max_n: the largest number of responses per prompt in the training data; has_scores: every training
    example has scores.
    """
    kind = getattr(sampler, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"sampler={sampler_name} has kind {kind!r}; expected one of {', '.join(KINDS)}")
    if loss_input_kind not in ("pair", "ranking"):
        raise ValueError(f"loss={loss_name} has input_kind {loss_input_kind!r}; expected pair or ranking")
    unscored = "the training data has only chosen/rejected pairs (no scores)"
    augment = "or augment the data with n scored responses per prompt"
    if not has_scores:
        if getattr(sampler, "needs_scores", False):
            raise ValueError(f"sampler={sampler_name} needs scored responses; {unscored}; "
                             f"use sampler=pair or best_worst, {augment}")
        if kind == "ranking" and max_n > 2:
            raise ValueError(f"sampler={sampler_name} ranks responses by score; {unscored} with up to {max_n} "
                             f"responses per prompt; use sampler=pair, {augment}")
        if loss_needs_scores:
            raise ValueError(f"loss={loss_name} needs scored responses; {unscored}; use a loss that needs no "
                             f"scores (a pairwise one, see conf/loss/), {augment}")
    if loss_input_kind == "ranking" and kind in ("pair", "hard") and max_n > 2:
        fix = "use sampler=all" if has_scores else f"sampler=all needs scores, which this data lacks: {augment[3:]}"
        raise ValueError(f"loss={loss_name} needs sampler=all (full ranking of up to {max_n} responses); "
                         f"sampler={sampler_name} gives a subset; {fix}, or use a pairwise loss (see conf/loss/) "
                         "with this sampler")
    if loss_input_kind == "pair" and kind == "ranking" and max_n > 2:
        raise ValueError(f"loss={loss_name} compares exactly 2 responses, but sampler={sampler_name} gives all "
                         f"{max_n}; use sampler=best_worst, pair or hard, or a ranking loss (see conf/loss/)")
    if loss_input_kind == "pair" and kind == "hard":
        k = getattr(sampler, "num_negatives", 1)
        if min(k, max_n - 1) > 1:
            raise ValueError(f"loss={loss_name} compares exactly 2 responses, but sampler={sampler_name} has "
                             f"num_negatives={k}; set sampler.num_negatives=1")
