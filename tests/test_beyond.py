"""Beyond the paper (issue 19): LiPO-λ, SimPO rewards and the target margin, the S-DPO identity of HPS at γ = 0,
policy-adaptive hard negatives. Every expected value is computed independently (float64 loops over the definition)."""
from __future__ import annotations

import math

import pytest
import torch

from hps_exp.losses import HPSLoss, LiPOLoss, PairwiseLoss, PlackettLuceLoss

F64 = torch.float64


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


# ---------------------------------------------------------------- LiPO-λ

def _lipo_ref(policy, ref, mask, scores, beta, normalize):
    """The definition, one prompt at a time, on plain floats."""
    out = []
    for p, q, m, s in zip(policy, ref, mask, scores):
        real = [i for i in range(len(p)) if m[i]]
        r = {i: beta * (p[i] - q[i]) for i in real}
        if all(math.isnan(s[i]) for i in real):
            psi = {i: 1.0 if i == 0 else 0.0 for i in real}
        else:
            psi = {i: s[i] for i in real}
        if normalize:
            lo, hi = min(psi.values()), max(psi.values())
            psi = {i: (v - lo) / (hi - lo) if hi > lo else 0.0 for i, v in psi.items()}
        order = sorted(real, key=lambda i: (-r[i], i))
        disc = {i: math.log2(1 + order.index(i) + 1) for i in real}
        total = 0.0
        for i in real:
            for j in real:
                if psi[i] > psi[j]:
                    delta = abs(2 ** psi[i] - 2 ** psi[j]) * abs(1 / disc[i] - 1 / disc[j])
                    total += delta * math.log1p(math.exp(-(r[i] - r[j])))
        out.append(total)
    return out


NAN = float("nan")
# Mixed n (padding), ties in the scores (row 1: slots 1, 2) and in the rewards (row 2: slots 0, 2, 3 tie in r), a
# row of pair data without scores (row 3), a row whose scores all tie (row 4: no pair, loss 0).
POLICY = [[-1.0, -2.5, -0.7, -3.1, -2.0], [-4.0, -1.0, -1.5, -2.2, 9.9], [-2.0, -1.0, -2.0, -2.0, 0.0],
          [-1.2, -0.4, 0.0, 0.0, 0.0], [-1.0, -2.0, -3.0, 0.0, 0.0]]
REF = [[-1.5, -2.0, -1.0, -2.0, -1.0], [-3.0, -1.2, -1.4, -2.0, 0.0], [-1.0, -1.0, -1.0, -1.0, 0.0],
       [-1.0, -1.0, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0, 0.0]]
MASK = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
SCORES = [[3.0, 2.5, 1.0, -0.5, -2.0], [2.0, 1.0, 1.0, 0.0, NAN], [5.0, 4.0, 1.0, 0.5, NAN],
          [NAN, NAN, NAN, NAN, NAN], [1.0, 1.0, 1.0, NAN, NAN]]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_lipo_matches_the_definition(normalize, beta):
    loss = LiPOLoss(beta=beta, normalize_labels=normalize)
    mask = torch.tensor(MASK, dtype=torch.bool)
    policy = _t(POLICY).masked_fill(~mask, 123.0)          # padding garbage changes nothing
    out = loss(policy, _t(REF), mask, _t(SCORES))
    want = _lipo_ref(POLICY, REF, MASK, SCORES, beta, normalize)
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert want[4] == 0.0 and all(v > 0 for v in want[:4])
    if not normalize:   # labels as given: larger score gaps weigh more than after normalising
        assert want != pytest.approx(_lipo_ref(POLICY, REF, MASK, SCORES, beta, True))


def test_lipo_gradient_holds_delta_fixed():
    """Autograd equals the hand gradient of sum Delta_ij log(1 + e^{-(r_i - r_j)}) with Delta held fixed."""
    beta = 0.5
    mask = torch.tensor(MASK, dtype=torch.bool)
    policy = _t(POLICY).requires_grad_(True)
    LiPOLoss(beta=beta)(policy, _t(REF), mask, _t(SCORES)).losses.sum().backward()
    for b, (p, q, m, s) in enumerate(zip(POLICY, REF, MASK, SCORES)):
        real = [i for i in range(5) if m[i]]
        r = {i: beta * (p[i] - q[i]) for i in real}
        raw = {i: 1.0 if i == 0 else 0.0 for i in real} if math.isnan(s[0]) else {i: s[i] for i in real}
        lo, hi = min(raw.values()), max(raw.values())
        psi = {i: (v - lo) / (hi - lo) if hi > lo else 0.0 for i, v in raw.items()}
        order = sorted(real, key=lambda i: (-r[i], i))
        inv_d = {i: 1 / math.log2(2 + order.index(i)) for i in real}
        grad = [0.0] * 5
        for i in real:
            for j in real:
                if psi[i] > psi[j]:
                    delta = abs(2 ** psi[i] - 2 ** psi[j]) * abs(inv_d[i] - inv_d[j])
                    g = delta * -math.exp(_logsig(-(r[i] - r[j])))   # d/dh log(1 + e^-h) = -sigmoid(-h)
                    grad[i] += beta * g
                    grad[j] -= beta * g
        assert policy.grad[b].tolist() == pytest.approx(grad, rel=1e-10, abs=1e-14)


def test_lipo_refuses_other_frameworks_and_half_scored_rows():
    with pytest.raises(ValueError, match=r"\bloss=lipo\b.*\bframework=ipo\b"):
        LiPOLoss(framework="ipo")
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\bloss=lipo\b.*\bscores\b.*\bslots\b"):
        LiPOLoss()(_t([[-1.0, -2.0, -3.0]]), _t([[0.0, 0.0, 0.0]]), mask, _t([[1.0, NAN, 0.0]]))


def test_lipo_row_and_sampler():
    loss = LiPOLoss()
    assert loss.natural_sampler == "all" and loss.input_kind == "ranking" and not loss.needs_scores
    assert loss.row["method"] == "LiPO-λ" and loss.row["reward_type"] == "ratio"
    assert LiPOLoss(reward="simpo").row["method"] == "SimPO-LiPO-λ"


# ---------------------------------------------------------------- SimPO rewards and the target margin

def test_simpo_pair_loss_is_the_formula_and_needs_no_reference():
    beta, gamma = 2.0, 0.7
    p, lengths = _t([[-6.0, -9.0], [-2.0, -12.0]]), _t([[3, 6], [4, 5]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss = PairwiseLoss(beta=beta, reward="simpo", margin=gamma, pairs="best_worst")
    assert not loss.needs_reference and loss.row["method"] == "SimPO-BT" and loss.row["target_margin"] == gamma
    out = loss(p, None, mask, lengths=lengths)
    want = [-_logsig(beta / 3 * -6 - beta / 6 * -9 - gamma), -_logsig(beta / 4 * -2 - beta / 5 * -12 - gamma)]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    # the metrics report the same r as the loss
    assert out.metrics["rewards/chosen"].item() == pytest.approx((beta / 3 * -6 + beta / 4 * -2) / 2)
    with pytest.raises(ValueError, match=r"\blengths\b.*\breward=simpo\b"):
        loss(p, None, mask)
    with pytest.raises(ValueError, match=r"\blengths\b.*> 0\b"):
        loss(p, None, mask, lengths=_t([[3, 0], [4, 5]]))


@pytest.mark.parametrize("framework", ["dpo", "ipo", "exo", "sppo", "nca"])
def test_margin_is_subtracted_from_the_preferred_reward(framework):
    """l(r_pos - m, r_neg) for every framework: the same as shifting the preferred log-prob by m / beta."""
    beta, m = 0.5, 0.3
    p, ref = _t([[-1.0, -2.0]]), _t([[-1.2, -1.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    shifted = PairwiseLoss(beta=beta, framework=framework, margin=m)(p, ref, mask).losses
    moved = PairwiseLoss(beta=beta, framework=framework)(p - _t([[m / beta, 0.0]]), ref, mask).losses
    assert shifted.item() == pytest.approx(moved.item(), rel=1e-12)
    assert shifted.item() != pytest.approx(PairwiseLoss(beta=beta, framework=framework)(p, ref, mask).losses.item())


def _simpo_r(p, lengths, beta):
    return [[beta * a / n if n else 0.0 for a, n in zip(row, ln)] for row, ln in zip(p, lengths)]


def test_pl_with_simpo_and_margin():
    beta, m = 1.5, 0.2
    P, L = [[-4.0, -5.0, -9.0, 0.0], [-1.0, -6.0, -2.0, -3.0]], [[2, 4, 3, 0], [1, 3, 2, 6]]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = PlackettLuceLoss(beta=beta, reward="simpo", margin=m)(_t(P), None, mask, lengths=_t(L))
    for b, r in enumerate(_simpo_r(P, L, beta)):
        real = r[:int(mask[b].sum())]
        want = sum(-_logsig(real[k] - m - math.log(sum(math.exp(x) for x in real[k + 1:])))
                   for k in range(len(real) - 1))
        assert out.losses[b].item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 1.3])
def test_hps_full_with_simpo_and_margin(gamma):
    beta, m = 1.0, 0.4
    P, L, S = [[-4.0, -5.0, -9.0, -6.0]], [[2, 4, 3, 5]], [[3.0, 2.0, 1.0, -1.0]]
    mask = torch.ones(1, 4, dtype=torch.bool)
    out = HPSLoss(beta=beta, gamma=gamma, reward="simpo", margin=m)(_t(P), None, mask, _t(S), torch.tensor([3]),
                                                                    lengths=_t(L))
    r = _simpo_r(P, L, beta)[0]
    z = sum(math.exp(gamma * s) for s in S[0][1:])
    soft = math.log(3) + math.log(sum(math.exp(gamma * s) / z * math.exp(x) for s, x in zip(S[0][1:], r[1:])))
    assert out.losses.item() == pytest.approx(-_logsig(r[0] - m - soft), rel=1e-12)
    assert HPSLoss(reward="simpo", estimator="single").row["method"] == "SimPO-HPS"


def test_hps_gamma_zero_is_softmax_dpo():
    """S-DPO / InfoNCA: full HPS at γ = 0 with log N is -log σ(-log Σ_{j≥1} exp(r_j - r_0)), padded rows too."""
    beta = 0.3
    P = [[-1.0, -2.0, -0.5, -3.0], [-2.0, -1.0, -4.0, 0.0]]
    R = [[-1.5, -1.0, -1.0, -2.0], [-1.0, -2.0, -3.0, 0.0]]
    S = [[4.0, 3.0, 2.0, 1.0], [2.0, 1.0, 0.0, NAN]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    out = HPSLoss(beta=beta, gamma=0.0)(_t(P), _t(R), mask, _t(S), torch.tensor([3, 2]))
    for b in range(2):
        r = [beta * (p - q) for p, q, k in zip(P[b], R[b], mask[b]) if k]
        want = -_logsig(-math.log(sum(math.exp(x - r[0]) for x in r[1:])))
        assert out.losses[b].item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- policy-adaptive hard negatives

import numpy as np  # noqa: E402

from hps_exp import batching, stages  # noqa: E402
from hps_exp.data.schema import Example  # noqa: E402
from hps_exp.samplers import HardSampler  # noqa: E402
from hps_exp.stages import training  # noqa: E402
from tests.test_batching import manual_logp, tiny_model_and_tok  # noqa: E402

SCORED = [
    Example(prompt="\n\nHuman: how do i bake bread?\n\nAssistant:",
            responses=(" mix flour and water, then bake it.", " bake it.", " no.", " hello there.", " hi"),
            scores=(3.0, 2.0, 1.0, 0.0, -1.0)),
    Example(prompt="\n\nHuman: hi\n\nAssistant:", responses=(" hello there.", " hi", " no.", " bake it."),
            scores=(2.0, 1.0, 2.0, -1.0)),   # slot 2 ties with the best: never a negative
    Example(prompt="\n\nHuman: hello\n\nAssistant:",
            responses=(" hello.", " bread", " mix it.", " hi there.", " no no.", " water"),
            scores=(1.0, 0.0, -1.0, -2.0, -3.0, -4.0)),
]
REFS = [torch.tensor([0.3, -0.2, 0.1, -0.4, 0.5, 0.0][:e.n]) for e in SCORED]   # a fixed reference, not the policy


def _manual_values(model, tok, examples, hardness, loss):
    """The hardness value of every response from unbatched, unpadded forwards (independent of the packed path)."""
    out = []
    for _, enc, ref in zip(examples, batching.encode_examples(tok, examples, 32, 64), REFS):
        with torch.no_grad():
            lp = [manual_logp(model, enc.prompt, r) for r in enc.responses]
        if hardness == "policy_logp":
            out.append(lp)
        elif loss.reward == "simpo":
            out.append([loss.beta * a / len(r) for a, r in zip(lp, enc.responses)])
        else:
            out.append([loss.beta * (a - float(q)) for a, q in zip(lp, ref)])
    return out


def _draw(model, tok, indices, sampler, loss, gamma, rng):
    enc = batching.encode_examples(tok, SCORED, 32, 64)
    examples, encoded, refs = ([seq[i] for i in indices] for seq in (SCORED, enc, REFS))
    draws = stages.PolicyDraws(list(indices), [sampler.noise(e, rng) for e in examples], gamma, len(indices))
    with torch.no_grad():
        return training._policy_selections(model, draws, examples, encoded, refs, sampler, loss, tok.pad_token_id,
                                         torch.device("cpu"))


@pytest.mark.parametrize("hardness, reward", [("policy_logp", "ratio"), ("policy_reward", "ratio"),
                                              ("policy_reward", "simpo")])
def test_policy_hard_draw_frequencies_are_the_closed_form_softmax(hardness, reward):
    model, tok = tiny_model_and_tok()
    loss = HPSLoss(estimator="single", beta=0.5, reward=reward)
    sampler = HardSampler(hardness=hardness)
    values = _manual_values(model, tok, SCORED, hardness, loss)[0]
    neg = [1, 2, 3, 4]
    gamma = 2.0 / (max(values[i] for i in neg) - min(values[i] for i in neg))   # spread probabilities
    z = sum(math.exp(gamma * values[i]) for i in neg)
    probs = {i: math.exp(gamma * values[i]) / z for i in neg}
    rng = np.random.default_rng(7)
    counts = {i: 0 for i in neg}
    for _ in range(4):   # 4 x 1000 copies of prompt 0, each with its own noise: one forward per 1000 draws
        for sel in _draw(model, tok, [0] * 1000, sampler, loss, gamma, rng):
            counts[sel.indices[1]] += 1
    chi2 = lambda p: sum((counts[i] - 4000 * p[i]) ** 2 / (4000 * p[i]) for i in neg)  # noqa: E731
    assert chi2(probs) < 16.266, (counts, probs)                         # df 3, alpha 0.001
    assert chi2({i: 0.25 for i in neg}) > 16.266 * 5, (counts, probs)    # ... and far from uniform (power)


@pytest.mark.parametrize("hardness", ["policy_logp", "policy_reward"])
def test_policy_hard_draw_follows_the_policy(hardness):
    """γ large: each prompt's negative is the one the policy rates highest, never a tie with the best; a policy
    trained towards another negative draws that one from the same noise."""
    model, tok = tiny_model_and_tok()
    loss = HPSLoss(estimator="single", beta=0.5)
    sampler = HardSampler(hardness=hardness)

    def drawn():
        values = _manual_values(model, tok, SCORED, hardness, loss)
        sels = _draw(model, tok, [0, 1, 2], sampler, loss, 1e4, np.random.default_rng(0))
        for e, v, sel in zip(SCORED, values, sels):
            assert sel.indices == (e.best, max(sorted(e.negatives), key=lambda i: v[i])) and sel.gamma == 1e4
        return sels[0].indices[1]

    before = drawn()
    target = 4 if before != 4 else 3
    enc = batching.encode_examples(tok, SCORED[:1], 32, 64)[0]
    seq = batching.collate([(enc.prompt, enc.responses[target])], tok.pad_token_id)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(10):   # raise log pi(target) only
        opt.zero_grad()
        (-batching.sequence_logps(model, seq).sum()).backward()
        opt.step()
    assert drawn() == target != before


def test_policy_hardness_never_draws_in_select_and_annotation_draws_are_unchanged():
    with pytest.raises(ValueError, match=r"\bhardness=policy_logp\b.*\btraining step\b"):
        HardSampler(hardness="policy_logp").select(SCORED[0], np.random.default_rng(0), 0.0)
    with pytest.raises(ValueError, match=r"\bhardness\b.*\bannotation, policy_reward, policy_logp\b.*'policy'"):
        HardSampler(hardness="policy")
    with pytest.raises(ValueError, match=r"\bhardness=policy_reward\b.*\bgamma=0\b"):
        HardSampler(hardness="policy_reward", gamma=0.0)
    # annotation: select == select_by(scores, noise) on the same generator state
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    s = HardSampler(gamma=0.7)
    for _ in range(50):
        want = s.select(SCORED[2], a, 0.0)
        assert s.select_by(SCORED[2], SCORED[2].scores, s.noise(SCORED[2], b), 0.7) == want


def test_reference_free_run_plans_no_reference_stage(compose, tmp_path):
    """reward=simpo: the dry run (what the app will build) has no reference stage, for training or evaluation."""
    from test_stages import planned

    small = ["dataset.n_train=8", "dataset.n_test=4"]
    assert set(planned(compose(["loss=hps", "loss.reward=simpo", *small]), tmp_path)) == {
        "sft", "preference", "sft_eval", "eval"}
    assert "reference#0" in planned(compose(["loss=hps", *small]), tmp_path)
