"""Samplers: draw frequencies, ties, γ schedules, determinism, slot order, stats and config checks."""
import math
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from conftest import CONF
from omegaconf import OmegaConf

from hps_exp.data.schema import Example
from hps_exp.samplers import (
    BestWorstSampler,
    HardSampler,
    PairSampler,
    RankingSampler,
    Selection,
    check_compatible,
    probabilities,
)


def ex_of(scores, chosen=0, rejected=1, source="t.jsonl:7"):
    n = len(scores) if scores is not None else 4
    return Example(prompt="\n\nHuman: hi\n\nAssistant:", responses=tuple(f" r{i}" for i in range(n)),
                   scores=None if scores is None else tuple(float(s) for s in scores),
                   chosen=chosen, rejected=rejected, source=source)


# index:           0    1    2    3    4     5
TIED = ex_of([3.0, 1.0, 0.5, 2.0, -1.0, 3.0])  # best = 0; 5 ties with it; eligible negatives 3, 1, 2, 4
RNG = lambda seed: np.random.default_rng(seed)  # noqa: E731

CHI2_DF3_CRIT = 16.266  # chi-square critical value, 3 degrees of freedom, alpha = 0.001


def chi2(counts: Counter, probs: dict[int, float], draws: int) -> float:
    return sum((counts[i] - draws * p) ** 2 / (draws * p) for i, p in probs.items())


def draw_counts(sampler, ex, seed, draws, progress=0.0):
    rng = RNG(seed)
    return Counter(sampler.select(ex, rng, progress).indices[1] for _ in range(draws))


# ---------------------------------------------------------------- probabilities and frequencies

def test_probabilities_are_softmax_over_eligible_negatives():
    for gamma in (-2.0, 0.0, 1.0, 3.0):
        p = probabilities(TIED, gamma)
        assert set(p) == {1, 2, 3, 4}  # never the best (0) nor its tie (5)
        z = sum(math.exp(gamma * TIED.scores[i]) for i in p)
        for i, q in p.items():
            assert q == pytest.approx(math.exp(gamma * TIED.scores[i]) / z, rel=1e-12)
    assert probabilities(TIED, 0.0) == pytest.approx({1: 0.25, 2: 0.25, 3: 0.25, 4: 0.25})
    assert list(probabilities(TIED, 1.0)) == [3, 1, 2, 4]  # keys by decreasing score


def test_probabilities_are_stable_for_huge_gamma():
    p = probabilities(TIED, 1e4)
    assert p[3] == pytest.approx(1.0) and all(math.isfinite(q) for q in p.values())
    q = probabilities(TIED, -1e4)
    assert q[4] == pytest.approx(1.0)
    rng = RNG(0)
    assert {HardSampler(gamma=1e4).select(TIED, rng, 0.0).indices[1] for _ in range(200)} == {3}
    assert {HardSampler(gamma=-1e4).select(TIED, rng, 0.0).indices[1] for _ in range(200)} == {4}


@pytest.mark.parametrize("gamma", [0.0, 1.0, -1.5, 2.5])
def test_draw_frequencies_match_softmax(gamma):
    draws = 20_000
    counts = draw_counts(HardSampler(gamma=gamma), TIED, seed=1234, draws=draws)
    probs = probabilities(TIED, gamma)
    assert set(counts) <= set(probs)
    stat = chi2(counts, probs, draws)
    assert stat < CHI2_DF3_CRIT, (gamma, counts, probs, stat)


def test_chi2_has_power_against_a_wrong_distribution():
    """The frequency test can fail: γ = 2.5 draws are far from uniform."""
    draws = 20_000
    counts = draw_counts(HardSampler(gamma=2.5), TIED, seed=1234, draws=draws)
    assert chi2(counts, probabilities(TIED, 0.0), draws) > 100 * CHI2_DF3_CRIT


def test_uniform_config_is_gamma_zero():
    s = HardSampler(**{k: v
                       for k, v in OmegaConf.to_container(OmegaConf.load(CONF / "sampler" / "uniform.yaml")).items()
                       if k not in ("_target_", "name")})
    assert s.gamma_at(0.0) == s.gamma_at(1.0) == 0.0
    draws = 20_000
    counts = draw_counts(s, TIED, seed=99, draws=draws)
    assert chi2(counts, probabilities(TIED, 0.0), draws) < CHI2_DF3_CRIT


def test_two_negatives_follow_successive_sampling_without_replacement():
    ex = ex_of([5.0, 2.0, 1.0, 0.0, -1.0])
    gamma, draws = 1.0, 20_000
    p = probabilities(ex, gamma)
    expected = {tuple(sorted(ab, key=lambda i: -ex.scores[i])): p[ab[0]] * p[ab[1]] / (1 - p[ab[0]])
                + p[ab[1]] * p[ab[0]] / (1 - p[ab[1]]) for ab in combinations(p, 2)}
    assert sum(expected.values()) == pytest.approx(1.0)
    rng = RNG(7)
    counts = Counter(HardSampler(num_negatives=2, gamma=gamma).select(ex, rng, 0.0).indices[1:]
                     for _ in range(draws))
    assert set(counts) <= set(expected)
    for pair, q in expected.items():  # per-category tolerance: 4.5 binomial standard deviations
        assert abs(counts[pair] - draws * q) < 4.5 * math.sqrt(draws * q * (1 - q)), (pair, counts[pair], draws * q)


# ---------------------------------------------------------------- ties

def test_ties_with_the_best_are_never_sampled():
    rng = RNG(3)
    for gamma in (-5.0, 0.0, 5.0, 50.0):
        s = HardSampler(num_negatives=1, gamma=gamma)
        seen = {s.select(TIED, rng, 0.0).indices[1] for _ in range(3000)}
        assert 5 not in seen and 0 not in seen
    # asking for more negatives than eligible takes all eligible ones, still without the tie
    sel = HardSampler(num_negatives=10).select(TIED, rng, 0.0)
    assert sel.indices == (0, 3, 1, 2, 4) and sel.num_negatives == 4


def test_all_tied_prompt_raises_naming_the_row():
    with pytest.raises(ValueError, match=r"\bt\.jsonl:7\b.*\btie"):
        HardSampler().select(ex_of([1.0, 1.0, 1.0]), RNG(0), 0.0)


def test_negatives_are_the_examples_own():
    """Samplers use Example.negatives / num_negatives (one definition, tested in test_data_errors.py)."""
    assert TIED.num_negatives == 4 and list(TIED.negatives) == [3, 1, 2, 4]
    assert HardSampler(num_negatives=9).select(TIED, RNG(0), 0.0).indices[1:] == TIED.negatives
    assert RankingSampler().select(ex_of([1, 2, 3]), RNG(0), 0.0).num_negatives == 2


# ---------------------------------------------------------------- γ schedules

def test_step_schedule_matches_the_released_one():
    s = HardSampler(schedule="step")  # defaults: -5 -> 5 at 0.2, 0.4, 0.6, 0.8
    expected = {0.0: -5.0, 0.1: -5.0, 0.199: -5.0, 0.2: -2.5, 0.3: -2.5, 0.4: 0.0, 0.5: 0.0,
                0.6: 2.5, 0.79: 2.5, 0.8: 5.0, 0.9: 5.0, 1.0: 5.0}
    for progress, gamma in expected.items():
        assert s.gamma_at(progress) == pytest.approx(gamma), progress


def test_step_schedule_custom_milestones():
    s = HardSampler(schedule="step", gamma_start=0.0, gamma_end=1.0, milestones=[0.5])
    assert [s.gamma_at(p) for p in (0.0, 0.49, 0.5, 1.0)] == [0.0, 0.0, 1.0, 1.0]


def test_linear_and_constant_schedules():
    lin = HardSampler(schedule="linear", gamma_start=-5.0, gamma_end=5.0)
    for progress, gamma in {0.0: -5.0, 0.2: -3.0, 0.5: 0.0, 0.8: 3.0, 1.0: 5.0}.items():
        assert lin.gamma_at(progress) == pytest.approx(gamma), progress
    const = HardSampler(gamma=1.7, schedule="constant")
    assert const.gamma_at(0.0) == const.gamma_at(0.8) == const.gamma_at(1.0) == 1.7
    assert PairSampler().gamma_at(0.5) is None and RankingSampler().gamma_at(0.5) is None
    assert BestWorstSampler().gamma_at(0.5) is None


def test_selection_records_the_scheduled_gamma_and_draws_follow_it():
    s = HardSampler(schedule="step")
    rng = RNG(5)
    assert s.select(TIED, rng, 0.1).gamma == -5.0 and s.select(TIED, rng, 0.9).gamma == 5.0
    early = Counter(s.select(TIED, rng, 0.1).indices[1] for _ in range(2000))
    late = Counter(s.select(TIED, rng, 0.9).indices[1] for _ in range(2000))
    assert early.most_common(1)[0][0] == 4  # easiest negative (score -1) at γ = -5
    assert late.most_common(1)[0][0] == 3   # hardest negative (score 2) at γ = +5


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match=r"'cosine'.*\bconstant, linear, step\b"):
        HardSampler(schedule="cosine")
    with pytest.raises(ValueError, match=r"\bnum_negatives\b.*\b0\b"):
        HardSampler(num_negatives=0)
    with pytest.raises(ValueError, match=r"\bmilestones\b.*\[0\.6, 0\.4\]"):
        HardSampler(schedule="step", milestones=[0.6, 0.4])
    with pytest.raises(ValueError, match=r"\bgamma\b.*\binf\b"):
        HardSampler(gamma=float("inf"))


# ---------------------------------------------------------------- determinism and multi-negative draws

def test_same_seed_same_draws_different_seed_different_draws():
    ex = ex_of(np.linspace(3.0, -3.0, 20))
    s = HardSampler(num_negatives=3, gamma=0.5)

    def run(seed):
        rng = RNG([seed, 2, 0])
        return [s.select(ex, rng, 0.3).indices for _ in range(50)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_multiple_negatives_are_distinct_and_ordered_by_decreasing_score():
    scores = [0.3, 2.0, -1.0, 4.0, 1.0, 1.0, 0.0, 4.0, -2.0, 3.5]  # best = 3; 7 ties with it
    ex = ex_of(scores)
    s = HardSampler(num_negatives=4, gamma=0.0)
    rng = RNG(11)
    seen = set()
    for _ in range(500):
        sel = s.select(ex, rng, 0.0)
        assert sel.indices[0] == 3 and len(sel.indices) == 5
        negs = sel.indices[1:]
        assert len(set(negs)) == 4 and 7 not in negs and 3 not in negs
        keys = [(-scores[i], i) for i in negs]
        assert keys == sorted(keys)
        assert sel.num_negatives == 8
        seen.update(negs)
    assert seen == {0, 1, 2, 4, 5, 6, 8, 9}


# ---------------------------------------------------------------- pair, best_worst, all

def test_pair_sampler_returns_the_dataset_pair():
    ex = ex_of([1.0, 5.0, 2.0, 0.0], chosen=2, rejected=0)
    sel = PairSampler().select(ex, RNG(0), 0.0)
    assert sel == Selection((2, 0), 3)
    assert PairSampler().select(ex_of(None, chosen=1, rejected=3), RNG(0), 0.0).indices == (1, 3)
    assert PairSampler.kind == "pair" and not PairSampler.needs_scores


def test_best_worst_sampler():
    ex = ex_of([1.0, 5.0, -2.0, 0.0, -2.0, 5.0])
    sel = BestWorstSampler().select(ex, RNG(0), 0.0)
    assert sel.indices == (1, 4) and sel.num_negatives == 4  # first best, last of the equal worst
    assert BestWorstSampler().select(ex_of([2.0, 2.0, 2.0]), RNG(0), 0.0).indices == (0, 2)  # still distinct
    assert BestWorstSampler().select(ex_of(None, chosen=3, rejected=1), RNG(0), 0.0).indices == (3, 1)  # fallback


def test_ranking_sampler_orders_by_decreasing_score_stably():
    ex = ex_of([1.0, 5.0, 2.0, 5.0, 2.0, -1.0])
    sel = RankingSampler().select(ex, RNG(0), 0.0)
    assert sel.indices == (1, 3, 2, 4, 0, 5) and sel.num_negatives == 4
    assert RankingSampler.kind == "ranking"


def test_ranking_sampler_without_scores():
    two = Example("\n\nHuman: hi\n\nAssistant:", (" a", " b"), chosen=1, rejected=0)
    assert RankingSampler().select(two, RNG(0), 0.0) == Selection((1, 0), 1)
    with pytest.raises(ValueError, match=r"\bsampler=all\b.*\bt\.jsonl:7\b"):
        RankingSampler().select(ex_of(None), RNG(0), 0.0)


def test_hard_sampler_without_scores_raises_naming_the_row():
    with pytest.raises(ValueError, match=r"\bsampler=hard\b.*\bt\.jsonl:7\b"):
        HardSampler().select(ex_of(None), RNG(0), 0.0)


def test_samplers_do_not_use_rng_unless_they_draw():
    rng = RNG(0)
    before = rng.bit_generator.state
    for s in (PairSampler(), BestWorstSampler(), RankingSampler()):
        s.select(TIED, rng, 0.5)
    assert rng.bit_generator.state == before


# ---------------------------------------------------------------- stats

def test_stats_on_a_crafted_example():
    ex = ex_of([4.0, 1.0, 3.0, 4.0, 0.0])  # best 0 (tie 3); eligible by score: 2 (3.0), 1 (1.0), 4 (0.0)
    hard = HardSampler(num_negatives=2, gamma=0.7)
    st = hard.stats(ex, Selection((0, 2, 4), 3, 0.7))
    assert st == pytest.approx({"sampler/neg_rank": (1 + 3) / 2, "sampler/neg_gap": (1.0 + 4.0) / 2,
                                "sampler/gamma": 0.7})
    st = HardSampler(schedule="step").stats(ex, HardSampler(schedule="step").select(ex, RNG(0), 0.85))
    assert st["sampler/gamma"] == 5.0
    bw = BestWorstSampler()
    assert bw.stats(ex, bw.select(ex, RNG(0), 0.0)) == pytest.approx({"sampler/neg_rank": 3.0, "sampler/neg_gap": 4.0})
    rk = RankingSampler()
    # slots 0, 3(tie: rank 1, gap 0), 2, 1, 4 -> ranks 1, 1, 2, 3; gaps 0, 1, 3, 4
    assert rk.stats(ex, rk.select(ex, RNG(0), 0.0)) == pytest.approx({"sampler/neg_rank": 7 / 4,
                                                                      "sampler/neg_gap": 2.0})
    assert PairSampler().stats(ex_of(None), Selection((0, 1), 3)) == {}


def test_hard_stats_over_many_draws_track_gamma():
    rng = RNG(21)
    hard_ranks = np.mean([HardSampler(gamma=5.0).stats(TIED, HardSampler(gamma=5.0).select(TIED, rng, 0))
                          ["sampler/neg_rank"] for _ in range(500)])
    easy_ranks = np.mean([HardSampler(gamma=-5.0).stats(TIED, HardSampler(gamma=-5.0).select(TIED, rng, 0))
                          ["sampler/neg_rank"] for _ in range(500)])
    assert hard_ranks < 1.5 and easy_ranks > 3.5


# ---------------------------------------------------------------- check_compatible

HARD, HARD3, PAIR, BW, ALL = (HardSampler(), HardSampler(num_negatives=3), PairSampler(), BestWorstSampler(),
                              RankingSampler())


@pytest.mark.parametrize("args, match", [
    (("ranking", False, "pl", PAIR, "pair", 8, True), r"\bloss=pl\b.*\bsampler=all\b.*\bsampler=pair\b"),
    (("ranking", False, "pl", BW, "best_worst", 8, True), r"\bloss=pl\b.*\bsampler=all\b.*\bsampler=best_worst\b"),
    (("ranking", True, "hps", HARD, "hard", 8, True), r"\bloss=hps\b.*\bsampler=all\b.*\bsampler=hard\b"),
    (("ranking", False, "bt", HARD3, "hard", 8, True), r"\bloss=bt\b.*\bsampler=all\b.*\bsampler=hard\b"),
    (("ranking", False, "pl", PAIR, "pair", 8, False), r"\bloss=pl\b.*\bsampler=all\b.*\bscores\b"),
    (("pair", False, "dpo", ALL, "all", 8, True),
     r"\bloss=dpo\b.*\b2\b.*\bsampler=all\b.*\b8\b.*\bsampler=best_worst\b"),
    (("pair", False, "dpo", HARD, "hard", 2, False), r"\bsampler=hard\b.*\bscore.*\bsampler=pair\b.*\bbest_worst\b"),
    (("pair", False, "dpo", HARD, "uniform", 8, False), r"\bsampler=uniform\b.*\bscore"),
    (("ranking", False, "pl", ALL, "all", 8, False), r"\bsampler=all\b.*\bscore.*\bsampler=pair\b"),
    (("ranking", True, "hps", ALL, "all", 2, False), r"\bloss=hps\b.*\bscore"),
    (("pair", False, "dpo", HARD3, "hard", 8, True),
     r"\bloss=dpo\b.*\bnum_negatives=3\b.*\bsampler\.num_negatives=1\b"),
])
def test_check_compatible_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        check_compatible(*args)


@pytest.mark.parametrize("args", [
    ("pair", False, "dpo", PAIR, "pair", 2, False),
    ("pair", False, "dpo", PAIR, "pair", 8, True),
    ("pair", False, "bt", BW, "best_worst", 8, True),
    ("pair", False, "bt", BW, "best_worst", 2, False),  # documented fallback to (chosen, rejected)
    ("pair", False, "dpo", HARD, "hard", 8, True),      # the authors' released variant
    ("pair", False, "hps", HARD, "hard", 8, True),      # HPS single estimator
    ("pair", False, "dpo", HARD3, "hard", 2, True),     # only one negative exists anyway
    ("pair", False, "dpo", ALL, "all", 2, False),       # 2 responses: the ranking is the pair
    ("ranking", False, "pl", ALL, "all", 8, True),
    ("ranking", True, "hps", ALL, "all", 8, True),
    ("ranking", False, "pl", PAIR, "pair", 2, False),   # with 2 responses the pair is the full ranking
    ("ranking", False, "pl", ALL, "all", 2, False),
])
def test_check_compatible_accepts(args):
    check_compatible(*args)


# ---------------------------------------------------------------- built from the Hydra configs

@pytest.mark.parametrize("name, cls, kind", [("pair", PairSampler, "pair"), ("best_worst", BestWorstSampler, "pair"),
                                             ("all", RankingSampler, "ranking"), ("hard", HardSampler, "hard"),
                                             ("uniform", HardSampler, "hard")])
def test_configs_build(name, cls, kind):
    from hps_exp.config import build

    s = build(OmegaConf.load(CONF / "sampler" / f"{name}.yaml"), "sampler")
    assert type(s) is cls and s.kind == kind
    sel = s.select(TIED, RNG(0), 0.5)
    assert len(sel.indices) == 2 + (kind == "ranking") * 4
    assert isinstance(s.stats(TIED, sel), dict)


def test_authors_schedule_matches_their_formula():
    """Their code: gamma = -5 + 10 i / (M - 1) set at rows i = 20/40/60/80 % of M; for large M that is
    -5 + 10 m at the last milestone m passed."""
    from hps_exp.samplers import HardSampler

    s = HardSampler(schedule="authors", gamma_start=-5.0, gamma_end=5.0)
    M = 100_000
    for row in (0, 19_999, 20_000, 45_000, 60_000, 79_999, 80_000, 99_999):
        last_set = max((i for i in (0, 20_000, 40_000, 60_000, 80_000) if i <= row))
        theirs = -5 + 10 * last_set / (M - 1)
        assert s.gamma_at(row / M) == pytest.approx(theirs, abs=1e-3)
    assert max(s.gamma_at(p / 100) for p in range(101)) == 3.0
