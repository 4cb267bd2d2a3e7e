"""Tests for hps_exp.losses: every expected value is computed independently (plain floats, enumeration)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from hps_exp.losses import FRAMEWORKS, HPSLoss, PairwiseLoss, PlackettLuceLoss, masked_logsumexp

F64 = torch.float64  # tight comparisons below; the module itself is dtype-agnostic


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return math.exp(_logsig(x))


# Each framework written out again, independently of the module, on plain floats.
def _ref_ell(name: str, rp: float, rn: float, beta: float, eps: float) -> float:
    h = rp - rn
    if name == "dpo":
        return -(1 - eps) * _logsig(h) - eps * _logsig(-h)
    if name == "ipo":
        return ((rp / beta - rn / beta) - 1 / (2 * beta)) ** 2
    if name == "exo":
        e = eps if eps > 0 else 1e-3
        return _sig(h) * (_logsig(h) - math.log(1 - e)) + _sig(-h) * (_logsig(-h) - math.log(e))
    if name == "sppo":
        return (rp / beta - 0.5 / beta) ** 2 + (rn / beta + 0.5 / beta) ** 2
    if name == "nca":
        return -_logsig(rp) - 0.5 * _logsig(-rp) - 0.5 * _logsig(-rn)
    raise AssertionError(name)


def _batch(policy, ref=None, mask=None, scores=None):
    p = torch.tensor(policy, dtype=torch.float64)
    r = torch.zeros_like(p) if ref is None else torch.tensor(ref, dtype=torch.float64)
    m = torch.ones_like(p, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    s = torch.full_like(p, float("nan")) if scores is None else torch.tensor(scores, dtype=torch.float64)
    return p, r, m, s


# ---------------------------------------------------------------- frameworks

def test_dpo_by_hand():
    # r0 = 0.1*(-1.0 - -1.5) = 0.05, r1 = 0.1*(-2.0 - -1.0) = -0.1, h = 0.15
    p, r, m, s = _batch([[-1.0, -2.0]], [[-1.5, -1.0]])
    out = PairwiseLoss(beta=0.1)(p, r, m, s, torch.tensor([1]))
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-12)
    smooth = PairwiseLoss(beta=0.1, label_smoothing=0.1)(p, r, m, s, torch.tensor([1]))
    expected = 0.9 * math.log(1 + math.exp(-0.15)) + 0.1 * math.log(1 + math.exp(0.15))
    assert smooth.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.05)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.1)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.15)
    assert out.metrics["rewards/accuracies"].item() == 1.0


@pytest.mark.parametrize("name,eps", [(n, e) for n in ("dpo", "ipo", "exo", "sppo", "nca") for e in (0.0, 0.2)
                                      if e == 0.0 or n in ("dpo", "exo")])  # the others refuse smoothing (below)
def test_framework_matches_formula(name, eps):
    beta = 0.5
    policy = [[-3.0, -4.5], [-2.0, -1.0], [-7.25, -7.0]]
    ref = [[-3.5, -4.0], [-2.5, -2.0], [-6.0, -8.0]]
    p, r, m, s = _batch(policy, ref)
    out = PairwiseLoss(beta=beta, label_smoothing=eps, framework=name)(p, r, m, s, torch.ones(3, dtype=torch.long))
    for b in range(3):
        rp = beta * (policy[b][0] - ref[b][0])
        rn = beta * (policy[b][1] - ref[b][1])
        assert out.losses[b].item() == pytest.approx(_ref_ell(name, rp, rn, beta, eps), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", ["ipo", "sppo", "nca"])
def test_smoothing_that_would_do_nothing_is_refused(name):
    with pytest.raises(ValueError, match=rf"label_smoothing=0\.1.*framework={name}"):
        PairwiseLoss(label_smoothing=0.1, framework=name)


def test_unknown_framework_lists_allowed():
    with pytest.raises(ValueError, match="dpo, ipo, exo, sppo, nca"):
        PairwiseLoss(framework="kto")
    with pytest.raises(ValueError, match="'hinge'.*dpo, ipo, exo, sppo, nca"):
        HPSLoss(framework="hinge")
    assert set(FRAMEWORKS) == {"dpo", "ipo", "exo", "sppo", "nca"}


def test_pairwise_all_is_mean_over_real_pairs():
    policy = [[1.0, 0.5, -0.3, 9e3], [0.2, 0.7, -1.0, 0.4]]
    mask = [[True, True, True, False], [True, True, True, True]]
    p, r, m, s = _batch(policy, mask=mask)
    loss = PairwiseLoss(beta=1.0, framework="nca", pairs="all")
    assert loss.input_kind == "ranking"
    out = loss(p, r, m, s, torch.tensor([2, 3]))
    for b, n in ((0, 3), (1, 4)):
        pairs = list(itertools.combinations(range(n), 2))
        expected = sum(_ref_ell("nca", policy[b][i], policy[b][j], 1.0, 0.0) for i, j in pairs) / len(pairs)
        assert out.losses[b].item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- Plackett-Luce

def _pl_prob(rewards: list[float]) -> float:
    """Probability of the ranking rewards[0] > rewards[1] > ... under PL, as a product of choices."""
    prob = 1.0
    for k in range(len(rewards) - 1):
        prob *= math.exp(rewards[k]) / sum(math.exp(x) for x in rewards[k:])
    return prob


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_pl_is_permutation_likelihood(n):
    g = torch.Generator().manual_seed(n)
    rewards = (torch.randn(n, generator=g) * 1.5).tolist()
    perms = list(itertools.permutations(range(n)))
    policy = [[rewards[i] for i in perm] for perm in perms]  # every ordering of the same n responses
    p, r, m, s = _batch(policy)
    out = PlackettLuceLoss(beta=1.0)(p, r, m, s, torch.full((len(perms),), n - 1))
    likelihood = torch.exp(-out.losses)
    for b in (0, len(perms) // 2, len(perms) - 1):
        assert likelihood[b].item() == pytest.approx(_pl_prob(policy[b]), rel=1e-10)
    assert likelihood.sum().item() == pytest.approx(1.0, abs=1e-10)  # a distribution over the n! rankings


def test_pl_padded_prompt_equals_alone():
    alone_p, alone_r, alone_m, alone_s = _batch([[0.3, -0.2, -1.1]], [[0.1, 0.4, -0.6]])
    loss = PlackettLuceLoss(beta=0.7, framework="dpo")
    alone_p.requires_grad_(True)
    alone = loss(alone_p, alone_r, alone_m, alone_s, torch.tensor([2]))
    alone.losses.sum().backward()

    # Same prompt padded to 5 slots with garbage, next to a full prompt.
    p, r, m, s = _batch([[0.3, -0.2, -1.1, 1e4, -1e4], [0.5, 0.1, 0.0, -0.4, -2.0]],
                        [[0.1, 0.4, -0.6, -1e4, 3.0], [0.0, 0.2, 0.1, 0.3, -1.0]],
                        mask=[[True, True, True, False, False], [True] * 5])
    p.requires_grad_(True)
    out = loss(p, r, m, s, torch.tensor([2, 4]))
    out.losses.sum().backward()
    assert out.losses[0].item() == pytest.approx(alone.losses.item(), rel=1e-12)
    assert torch.allclose(p.grad[0, :3], alone_p.grad[0])
    assert torch.all(p.grad[0, 3:] == 0)
    assert torch.isfinite(p.grad).all()
    assert out.metrics["rewards/rejected"].isfinite()


@pytest.mark.parametrize("name", ["dpo", "ipo", "exo", "sppo", "nca"])
def test_pl_with_two_responses_equals_pairwise(name):
    p, r, m, s = _batch([[-1.0, -1.3], [0.4, 0.9]], [[-1.2, -1.0], [0.0, 0.0]])
    n = torch.tensor([1, 1])
    eps = 0.1 if name in ("dpo", "exo") else 0.0
    pl = PlackettLuceLoss(beta=0.3, label_smoothing=eps, framework=name)(p, r, m, s, n)
    bt = PairwiseLoss(beta=0.3, label_smoothing=eps, framework=name)(p, r, m, s, n)
    assert torch.allclose(pl.losses, bt.losses, rtol=1e-12)


# ---------------------------------------------------------------- HPS

def test_hps_full_gamma_zero_is_softmax_best_vs_all():
    rewards = [0.4, 1.2, -0.5, 0.1, -2.0]
    p, r, m, s = _batch([rewards], scores=[[5.0, 4.0, 3.0, 2.0, 1.0]])
    out = HPSLoss(beta=1.0, gamma=0.0, estimator="full")(p, r, m, s, torch.tensor([4]))
    expected = -math.log(math.exp(rewards[0]) / sum(math.exp(x) for x in rewards))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["hps/weight_entropy"].item() == pytest.approx(math.log(4))


def test_hps_full_large_gamma_tends_to_hardest_by_score():
    # Slot 1 has the highest score among negatives but NOT the highest policy reward (slot 3 has).
    rewards = [0.5, -0.3, 0.1, 1.5]
    scores = [3.0, 2.0, 1.0, 0.0]
    p, r, m, s = _batch([rewards], scores=[scores])
    N = 3
    out = HPSLoss(beta=1.0, gamma=50.0)(p, r, m, s, torch.tensor([N]))
    by_score = math.log(1 + N * math.exp(-(rewards[0] - rewards[1])))
    by_reward = math.log(1 + N * math.exp(-(rewards[0] - rewards[3])))
    assert out.losses.item() == pytest.approx(by_score, rel=1e-6)
    assert abs(out.losses.item() - by_reward) > 1.0
    # Without log N the weights are the only multiplier.
    no_n = HPSLoss(beta=1.0, gamma=50.0, log_n=False)(p, r, m, s, torch.tensor([N]))
    assert no_n.losses.item() == pytest.approx(math.log(1 + math.exp(-(rewards[0] - rewards[1]))), rel=1e-6)


def test_hps_full_matches_formula_general_gamma():
    rewards = [0.2, -0.1, 0.6, -0.9]
    scores = [1.0, 0.8, 0.3, -0.5]
    gamma, N, beta = 2.0, 7, 0.5  # N counts negatives of the whole prompt, more than the slots present
    p, r, m, s = _batch([[x / beta for x in rewards]], scores=[scores])
    out = HPSLoss(beta=beta, gamma=gamma)(p, r, m, s, torch.tensor([N]))
    z = sum(math.exp(gamma * x) for x in scores[1:])
    w = [math.exp(gamma * x) / z for x in scores[1:]]
    inner = N * sum(wi * math.exp(ri) for wi, ri in zip(w, rewards[1:]))
    expected = -math.log(math.exp(rewards[0]) / (math.exp(rewards[0]) + inner))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    # Another framework gets l(r_0, log(inner)): our documented generalisation.
    ipo = HPSLoss(beta=beta, gamma=gamma, framework="ipo")(p, r, m, s, torch.tensor([N]))
    assert ipo.losses.item() == pytest.approx(_ref_ell("ipo", rewards[0], math.log(inner), beta, 0.0), rel=1e-10)


def test_hps_single_by_hand():
    p, r, m, s = _batch([[0.3, -0.4]], [[0.1, 0.2]])  # r0 = 0.2, r1 = -0.6 at beta = 1
    loss = HPSLoss(beta=1.0, estimator="single")
    assert (loss.input_kind, loss.needs_scores) == ("pair", False)
    out = loss(p, r, m, None, torch.tensor([5]))
    assert out.losses.item() == pytest.approx(-_logsig(0.2 - (-0.6) - math.log(5)), rel=1e-12)
    plain = HPSLoss(beta=1.0, estimator="single", log_n=False)(p, r, m, None, torch.tensor([5]))
    assert plain.losses.item() == pytest.approx(-_logsig(0.8), rel=1e-12)


def test_hps_single_is_unbiased_for_full_inner_term():
    # E_{k~w}[N e^{r_k}] = N sum_i w_i e^{r_i}; with dpo, exp(loss) - 1 = (inner term) * e^{-r_0}.
    # 20k seeded draws; the relative Monte Carlo error here is ~0.5%, tolerance 2%.
    rewards = [0.3, 0.9, -0.2, 0.4, -1.5, 0.0]
    scores = [2.0, 1.5, 1.2, 0.4, 0.1, -1.0]
    gamma, N, beta = 1.5, 5, 1.0
    p, r, m, s = _batch([rewards], scores=[scores])
    full = HPSLoss(beta=beta, gamma=gamma)(p, r, m, s, torch.tensor([N])).losses.item()

    w = torch.softmax(gamma * torch.tensor(scores[1:], dtype=F64), 0)
    draws = 1 + torch.multinomial(w, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
    pairs = torch.stack([torch.full_like(draws, 0), draws], 1)
    p2 = torch.tensor(rewards, dtype=F64)[pairs]
    m2 = torch.ones_like(p2, dtype=torch.bool)
    single = HPSLoss(beta=beta, estimator="single")(p2, torch.zeros_like(p2), m2, None,
                                                     torch.full((len(draws),), N)).losses
    estimate = torch.expm1(single).mean().item()
    assert estimate == pytest.approx(math.expm1(full), rel=0.02)
    exact = N * sum(wi * math.exp(ri - rewards[0]) for wi, ri in zip(w.tolist(), rewards[1:]))
    assert math.expm1(full) == pytest.approx(exact, rel=1e-12)


def test_hps_ties_with_best_are_not_negatives():
    rewards = [0.1, 2.0, -0.3, 0.5]
    scores = [4.0, 4.0, 1.0, 0.0]  # slot 1 ties with the best
    p, r, m, s = _batch([rewards], scores=[scores])
    p.requires_grad_(True)
    out = HPSLoss(beta=1.0, gamma=1.0)(p, r, m, s, torch.tensor([2]))
    out.losses.sum().backward()
    w2, w3 = math.exp(1.0) / (math.exp(1.0) + 1), 1 / (math.exp(1.0) + 1)
    inner = 2 * (w2 * math.exp(-0.3) + w3 * math.exp(0.5))
    assert out.losses.item() == pytest.approx(math.log(1 + inner / math.exp(0.1)), rel=1e-12)
    assert p.grad[0, 1].item() == 0.0
    p, r, m, s = _batch([rewards], scores=[[4.0, 4.0, 4.0, 4.0]])
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        HPSLoss()(p, r, m, s, torch.tensor([1]))


def test_hps_gradient_grows_with_hardness_and_skips_scores_and_padding():
    # Equal policy rewards on the negatives, so only the hardness weight tells them apart.
    p, r, m, s = _batch([[0.5, 0.0, 0.0, 0.0, 7e3]], scores=[[3.0, 2.0, 1.0, 0.0, 99.0]],
                        mask=[[True, True, True, True, False]])
    p.requires_grad_(True)
    s.requires_grad_(True)
    out = HPSLoss(beta=0.5, gamma=1.0)(p, r, m, s, torch.tensor([3]))
    out.losses.sum().backward()
    g = p.grad[0].abs()
    assert g[1] > g[2] > g[3] > 0
    assert g[4] == 0
    assert s.grad is None or torch.all(s.grad == 0)
    assert torch.isfinite(p.grad).all()


def test_padding_garbage_changes_nothing():
    base_p, base_r, m, base_s = _batch([[0.2, -0.1, 0.4, 0.0]], [[0.0, 0.3, -0.2, 0.0]],
                                       mask=[[True, True, True, False]], scores=[[2.0, 1.0, 0.5, 0.0]])
    junk_p, junk_r, _, junk_s = _batch([[0.2, -0.1, 0.4, 1e4]], [[0.0, 0.3, -0.2, -1e4]],
                                       scores=[[2.0, 1.0, 0.5, 1e4]])
    for loss in (HPSLoss(gamma=3.0), PlackettLuceLoss(framework="sppo"), PairwiseLoss(pairs="all")):
        outs = []
        for p, r, s in ((base_p, base_r, base_s), (junk_p, junk_r, junk_s)):
            p = p.clone().requires_grad_(True)
            out = loss(p, r, m, s, torch.tensor([2]))
            out.losses.sum().backward()
            outs.append((out.losses.detach(), p.grad, out.metrics))
        assert torch.equal(outs[0][0], outs[1][0]), loss
        assert torch.equal(outs[0][1], outs[1][1]), loss
        assert outs[1][1][0, 3] == 0
        for k in outs[0][2]:
            assert torch.equal(outs[0][2][k], outs[1][2][k]), (loss, k)


def test_padding_that_overflows_in_float32_gives_zero_gradient():
    # 3e38 - (-3e38) is inf in float32: the padded reward must never reach a loss or its backward.
    p = torch.tensor([[0.2, -0.1, 0.4, 3e38]], requires_grad=True)
    r = torch.tensor([[0.0, 0.3, -0.2, -3e38]])
    m = torch.tensor([[True, True, True, False]])
    s = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    for loss in (HPSLoss(framework="ipo"), PlackettLuceLoss(framework="sppo"), PairwiseLoss(pairs="all")):
        p.grad = None
        out = loss(p, r, m, s, torch.tensor([2]))
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(p.grad).all(), loss
        assert p.grad[0, 3] == 0, loss
        assert all(torch.isfinite(v) for v in out.metrics.values()), loss


def test_masked_logsumexp_empty_row_is_safe():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    out = masked_logsumexp(x, mask)
    out.sum().backward()
    assert out[0].item() == pytest.approx(math.log(math.exp(1) + math.exp(3)))
    assert out[1].item() == 0.0
    assert torch.equal(x.grad[1], torch.zeros(3)) and x.grad[0, 1] == 0


# ---------------------------------------------------------------- metrics and validation

def test_metrics_average_per_prompt_over_real_negatives():
    policy = [[1.0, 0.0, 2.0, 5e3], [0.0, -1.0, -2.0, -3.0]]
    mask = [[True, True, True, False], [True] * 4]
    p, r, m, s = _batch(policy, mask=mask, scores=[[3.0, 2.0, 1.0, 0.0]] * 2)
    out = HPSLoss(beta=1.0)(p, r, m, s, torch.tensor([2, 3]))
    mt = out.metrics
    assert all(v.dim() == 0 and not v.requires_grad for v in mt.values())
    assert mt["rewards/chosen"].item() == pytest.approx(0.5)
    assert mt["rewards/rejected"].item() == pytest.approx((1.0 + -2.0) / 2)  # prompt means 1.0 and -2.0
    assert mt["rewards/margins"].item() == pytest.approx(0.5 - (-0.5))
    assert mt["rewards/accuracies"].item() == pytest.approx((0.5 + 1.0) / 2)
    assert mt["rewards/margin_hardest"].item() == pytest.approx((1.0 + 1.0) / 2)
    assert mt["logps/chosen"].item() == pytest.approx(0.5)
    assert mt["logps/rejected"].item() == pytest.approx(-0.5)
    assert mt["hps/negatives_present"].item() == pytest.approx(2.5)


def test_attributes():
    assert (PairwiseLoss.input_kind, PairwiseLoss.needs_scores) == ("pair", False)
    assert (PlackettLuceLoss.input_kind, PlackettLuceLoss.needs_scores) == ("ranking", False)
    assert (HPSLoss.input_kind, HPSLoss.needs_scores) == ("ranking", True)
    assert (HPSLoss(estimator="single").input_kind, HPSLoss(estimator="single").needs_scores) == ("pair", False)


def test_validation_errors():
    p, r, m, s = _batch([[0.0, 1.0, 2.0]], scores=[[3.0, 2.0, 1.0]])
    n = torch.tensor([2])
    with pytest.raises(ValueError, match=r"ref_logps \(1, 2\)"):
        PlackettLuceLoss()(p, r[:, :2], m, s, n)
    with pytest.raises(ValueError, match="slots 0"):
        PlackettLuceLoss()(p, r, torch.tensor([[True, False, True]]), s, n)
    with pytest.raises(ValueError, match="input_kind 'pair'"):
        PairwiseLoss()(p, r, m, s, n)
    with pytest.raises(ValueError, match="scores"):
        HPSLoss()(p, r, m, None, n)
    with pytest.raises(ValueError, match="^scores"):
        HPSLoss()(p, r, m, torch.tensor([[3.0, float("nan"), 1.0]]), n)
    with pytest.raises(ValueError, match="num_negatives"):
        HPSLoss()(p, r, m, s, torch.tensor([0]))
    with pytest.raises(ValueError, match="num_negatives"):
        HPSLoss()(p, r, m, s, None)
    with pytest.raises(ValueError, match="mask.*torch.int64"):
        PlackettLuceLoss()(p, r, m.long(), s, n)
    with pytest.raises(ValueError):
        HPSLoss(estimator="double")
    with pytest.raises(ValueError):
        PairwiseLoss(beta=0.0)


# ---------------------------------------------------------------- peer check against TRL

_TRL_TYPES = {"dpo": "sigmoid", "ipo": "ipo", "exo": "exo_pair", "sppo": "sppo_hard", "nca": "nca_pair"}


@pytest.mark.parametrize("name", list(_TRL_TYPES))
def test_pair_losses_match_trl(name):
    """TRL's DPOTrainer.dpo_loss, called with a stand-in `self` (no model). TRL >= 1.0 inlined the loss into
    _compute_loss (and changed ipo/exo/sigmoid-smoothing), so this runs only where dpo_loss exists (TRL 0.x)."""
    from types import SimpleNamespace

    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    if not hasattr(trl_dpo.DPOTrainer, "dpo_loss"):
        pytest.skip("this TRL has no standalone DPOTrainer.dpo_loss")
    beta, eps = 0.3, 0.1 if name in ("dpo", "exo") else 0.0
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=F64) * 3 for _ in range(4))
    stand_in = SimpleNamespace(
        beta=beta, label_smoothing=eps, loss_type=_TRL_TYPES[name], f_divergence_type="reverse_kl",
        f_divergence_params={}, reference_free=False, use_weighting=False,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    trl_losses = trl_dpo.DPOTrainer.dpo_loss(stand_in, pc, pr, rc, rr)[0]
    p, r = torch.stack([pc, pr], 1), torch.stack([rc, rr], 1)
    ours = PairwiseLoss(beta=beta, label_smoothing=eps, framework=name)(
        p, r, torch.ones_like(p, dtype=torch.bool), None, torch.ones(16, dtype=torch.long)).losses
    assert torch.allclose(ours, trl_losses.to(ours.dtype), rtol=1e-6, atol=1e-8)
