"""Preference losses: a preference model (which responses are compared) x a framework (the pairwise objective).

All losses are pure functions of summed log-prob tensors; there is no model in here. The policy's implicit
reward of a response is r_i = beta * (policy_logps_i - ref_logps_i). Slot 0 holds the best response; slots
1.. the dispreferred ones in decreasing annotation score (slot 1 = hardest by score).

Frameworks l(r_pos, r_neg), with h = r_pos - r_neg and eps = label_smoothing (as TRL's ``loss_type``):

| framework | l(r_pos, r_neg)                                                                              |
|-----------|----------------------------------------------------------------------------------------------|
| dpo       | -(1-eps) log s(h) - eps log s(-h)                        (TRL "sigmoid"; cDPO when eps > 0)  |
| ipo       | (h/beta - 1/(2 beta))^2                                                       (TRL "ipo")    |
| exo       | s(h)(log s(h) - log(1-e)) + s(-h)(log s(-h) - log e),  e = eps or 1e-3 if eps=0 (TRL "exo_pair") |
| sppo      | (r_pos/beta - 1/(2 beta))^2 + (r_neg/beta + 1/(2 beta))^2                     (TRL "sppo_hard") |
| nca       | -log s(r_pos) - 1/2 log s(-r_pos) - 1/2 log s(-r_neg)                         (TRL "nca_pair") |

Preference models (s = sigmoid, LSE = log-sum-exp, N = num_negatives, w = softmax(gamma * score) over negatives):

| class / setting            | per-prompt loss                       | with dpo, eps = 0                               |
|----------------------------|---------------------------------------|-------------------------------------------------|
| PairwiseLoss pairs="dataset"| l(r_0, r_1), the dataset's pair      | -log s(r_0 - r_1)                    (DPO)      |
|   / pairs="best_worst"     | l(r_0, r_1), best vs worst by score   | -log s(r_0 - r_1)                    (BT)       |
| PairwiseLoss pairs="all"   | mean over real i<j of l(r_i, r_j)     |                                                 |
| PlackettLuceLoss           | sum_{k<m-1} l(r_k, LSE_{j>k} r_j)     | -sum_k [r_k - LSE_{j>=k} r_j]        (PL NLL)   |
| HPSLoss estimator="full"   | l(r_0, log N + LSE_i (r_i + log w_i)) | -log(e^{r_0} / (e^{r_0} + N sum_i w_i e^{r_i})) |
| HPSLoss estimator="single" | l(r_0, r_k + log N),                  | -log s(r_0 - r_k - log N)                       |
|                            |   k ~ w drawn by sampler              |                                                 |
| LiPOLoss (dpo only)        | sum_{psi_i > psi_j}                   | LiPO-lambda (Liu et al. 2024),                  |
|                            |   Delta_ij l(r_i, r_j)                |   lambda weights Delta                          |

For frameworks other than dpo, PL applies l to (r_k, LSE of the rest) and HPS to (r_0, the soft hard
negative log N + LSE_i(r_i + log w_i)). That generalisation is our choice: no published definition exists.
`log_n=False` drops the log N term. Masked (padding) slots never change losses or gradients.

Rewards (`reward`, every loss): "ratio" r_i = beta (log pi(y_i|x) - log pi_ref(y_i|x)) (the default); "simpo"
r_i = beta / |y_i| log pi(y_i|x), |y_i| the response's token count (the `lengths` keyword), no reference model
(SimPO, Meng et al. 2024). `margin` (SimPO's target margin, default 0) is subtracted from r_pos inside every
framework term: l(r_pos - margin, r_neg) in each pair, each PL term, HPS before its log N. With reward="simpo",
margin=m, PairwiseLoss under dpo is exactly SimPO: -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - m).

Each loss object also describes itself, so nothing outside this module names a loss: `natural_sampler` (the
sampler `sampler=auto` picks), `row` (what it is: method name, framework, preference model, reward type; where it
goes in a table is hps_exp.tables' business), `margin_beta` (the beta of the implicit reward used by the
reward-margin metric), `needs_reference` (False under reward="simpo": the run skips the reference stage) and
`rewards(...)` (the r the loss and the margin metrics use).

Why one module (over 450 lines, this docstring included): the loss family is the two tables above, and every
class is a few lines on top of the same [B, M] helpers (the frameworks, `masked_logsumexp`, the input checks,
`implicit_rewards`, the metrics) and the `PreferenceLoss` base. Split, each file would hold one table row and
import the rest back; together, a change to the shared slot conventions is read and tested in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FRAMEWORKS", "REWARDS", "LossOutput", "PreferenceLoss", "PairwiseLoss",
           "PlackettLuceLoss", "HPSLoss", "LiPOLoss", "masked_logsumexp", "implicit_rewards"]


@dataclass
class LossOutput:
    losses: Tensor  # [B], one loss per prompt; the trainer averages
    metrics: dict[str, Tensor]  # scalar, detached


def _dpo(r_pos: Tensor, r_neg: Tensor, beta: float, eps: float) -> Tensor:
    h = r_pos - r_neg
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def _ipo(r_pos: Tensor, r_neg: Tensor, beta: float, eps: float) -> Tensor:
    return ((r_pos - r_neg) / beta - 1 / (2 * beta)) ** 2


def _exo(r_pos: Tensor, r_neg: Tensor, beta: float, eps: float) -> Tensor:
    e = eps if eps > 0 else 1e-3  # TRL's default when no smoothing is given
    h = r_pos - r_neg
    return torch.sigmoid(h) * (F.logsigmoid(h) - math.log(1 - e)) + torch.sigmoid(-h) * (
        F.logsigmoid(-h) - math.log(e)
    )


def _sppo(r_pos: Tensor, r_neg: Tensor, beta: float, eps: float) -> Tensor:
    return (r_pos / beta - 1 / (2 * beta)) ** 2 + (r_neg / beta + 1 / (2 * beta)) ** 2


def _nca(r_pos: Tensor, r_neg: Tensor, beta: float, eps: float) -> Tensor:
    return -F.logsigmoid(r_pos) - 0.5 * F.logsigmoid(-r_pos) - 0.5 * F.logsigmoid(-r_neg)


# l(r_pos, r_neg, beta, eps) -> elementwise loss; rewards are already beta-scaled.
FRAMEWORKS: dict[str, Callable[[Tensor, Tensor, float, float], Tensor]] = {
    "dpo": _dpo, "ipo": _ipo, "exo": _exo, "sppo": _sppo, "nca": _nca,
}


REWARDS = ("ratio", "simpo")
# Frameworks whose pairwise objective has no label-smoothing term: a non-zero value would silently do nothing.
_SMOOTHED = ("dpo", "exo")


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """logsumexp of x over `dim` using only entries where mask is True; 0 where a row has none.

    masked_fill (not torch.where on a computed value) sends exactly zero gradient to masked entries,
    even for a row with no entry, whose -inf result is replaced by 0.
    """
    out = torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=dim)
    return out.masked_fill(~mask.any(dim=dim), 0.0)


def _check_knobs(beta: float, label_smoothing: float, framework: str, reward: str, margin: float) -> None:
    if reward not in REWARDS:
        raise ValueError(f"reward must be one of {', '.join(REWARDS)}; got {reward!r}")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; allowed: {', '.join(FRAMEWORKS)}")
    if label_smoothing and framework not in _SMOOTHED:
        raise ValueError(f"label_smoothing={label_smoothing} does nothing under framework={framework} "
                         f"(only {' and '.join(_SMOOTHED)} use it); leave it at 0")


def _validate(policy_logps, ref_logps, mask, scores, num_negatives, lengths, *, input_kind, needs_scores,
              reward) -> None:
    given = {"policy_logps": policy_logps, "mask": mask,
             **({"ref_logps": ref_logps} if reward == "ratio" else {"lengths": lengths})}
    for name, t in given.items():
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [B, M], got {getattr(t, 'shape', type(t))}"
                             + (f" (reward={reward} needs it)" if t is None else ""))
        if t.shape != policy_logps.shape:
            raise ValueError("shape mismatch: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in given.items()))
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    B, M = policy_logps.shape
    if M < 2 or (input_kind == "pair" and M != 2):
        raise ValueError(f"input_kind {input_kind!r} needs {'exactly' if input_kind == 'pair' else 'at least'} "
                         f"2 slots, got M={M}")
    if not bool(mask[:, :2].all()):
        raise ValueError("slots 0 (best) and 1 (a dispreferred response) must be real in every row")
    if not bool(torch.isfinite(policy_logps[mask]).all()) or (
            reward == "ratio" and not bool(torch.isfinite(ref_logps[mask]).all())):
        raise ValueError("policy_logps / ref_logps must be finite on real slots")
    if reward == "simpo" and not bool((lengths[mask] > 0).all()):
        raise ValueError("lengths (response token counts) must be > 0 on real slots")
    if needs_scores:
        if scores is None or scores.shape != policy_logps.shape:
            raise ValueError(f"scores must be a [B, M] = {(B, M)} tensor, got {getattr(scores, 'shape', None)}")
        if not bool(torch.isfinite(scores[mask]).all()):
            raise ValueError("scores must be finite on real slots (this loss needs annotation scores)")
    if num_negatives is not None and tuple(num_negatives.shape) != (B,):
        raise ValueError(f"num_negatives must have shape [B] = ({B},), got {tuple(num_negatives.shape)}")


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor | None, lengths: Tensor | None, *, reward: str,
                     beta: float) -> Tensor:
    """The policy's implicit reward of each response: beta (log pi - log pi_ref) ("ratio") or beta / |y| log pi
    ("simpo"), elementwise on tensors of any shape (padding: the caller masks; a 0 length is read as 1)."""
    if reward == "simpo":
        if lengths is None:
            raise ValueError("reward 'simpo' needs the responses' lengths (lengths is None)")
        return beta * policy_logps / lengths.clamp(min=1).to(policy_logps.dtype)
    return beta * (policy_logps - ref_logps)


def _metrics(r: Tensor, policy_logps: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """TRL-style reward metrics; 'rejected' averages each prompt's real slots 1.. first, then the batch."""
    r, lp = r.detach(), policy_logps.detach()
    neg = mask.clone()
    neg[:, 0] = False
    n_neg = neg.sum(1).to(r.dtype)
    chosen = r[:, 0]
    rejected = torch.where(neg, r, 0.0).sum(1) / n_neg
    acc = (neg & (chosen[:, None] > r)).sum(1).to(r.dtype) / n_neg
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": acc.mean(),
        "rewards/margin_hardest": (chosen - r[:, 1]).mean(),
        "logps/chosen": lp[:, 0].mean(),
        "logps/rejected": (torch.where(neg, lp, 0.0).sum(1) / n_neg).mean(),
    }


class PreferenceLoss:
    """Base of every loss: beta, label smoothing and a framework, the implicit rewards, metrics and the
    self-description. A new loss subclasses it, sets the class attributes and implements `_losses`."""

    input_kind: str = "pair"
    needs_scores: bool = False
    natural_sampler: str = "pair"      # the sampler config sampler=auto resolves to
    preference_model: str = "DPO"      # which responses it compares ("DPO": the dataset's own pair)

    @property
    def margin_beta(self) -> float:
        """beta of the implicit reward r = beta (log pi - log pi_ref) that the reward-margin metric reports."""
        return self.beta

    @property
    def row(self) -> dict:
        """What the run is (metrics.json "run"): e.g. method "IPO-HPS", framework "ipo", preference model "HPS".
        `reward_type` ("ratio" | "simpo") says which r its margins measure: margins of different rewards are not
        comparable. SimPO rewards name the method "SimPO-<model>" (framework dpo) or "<FW>-SimPO-<model>"."""
        fw = self.framework.upper()
        pm = self.preference_model
        if self.reward == "simpo":
            name = "SimPO" if pm == "DPO" else f"SimPO-{pm}"
            method = name if self.framework == "dpo" else f"{fw}-{name}"
        else:
            method = fw if pm == "DPO" else f"{fw}-{pm}"
        row: dict[str, Any] = {"method": method, "framework": self.framework, "preference_model": pm,
                               "reward_type": self.reward}
        if self.margin:
            row["target_margin"] = self.margin
        return row

    @property
    def needs_reference(self) -> bool:
        """Whether the rewards read the reference policy's log-probs (False: the run skips the reference stage)."""
        return self.reward == "ratio"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, framework: str = "dpo",
                 reward: str = "ratio", margin: float = 0.0):
        _check_knobs(beta, label_smoothing, framework, reward, margin)
        self.beta, self.label_smoothing, self.framework = float(beta), float(label_smoothing), framework
        self.reward, self.margin = reward, float(margin)
        self._ell = FRAMEWORKS[framework]

    def ell(self, r_pos: Tensor, r_neg: Tensor) -> Tensor:
        return self._ell(r_pos - self.margin, r_neg, self.beta, self.label_smoothing)

    def rewards(self, policy_logps: Tensor, ref_logps: Tensor | None, lengths: Tensor | None = None) -> Tensor:
        """r of every response (no masking): what the loss compares and the margin metrics report."""
        return implicit_rewards(policy_logps, ref_logps, lengths, reward=self.reward, beta=self.beta)

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor | None, mask: Tensor,
                 scores: Tensor | None = None, num_negatives: Tensor | None = None, *,
                 lengths: Tensor | None = None) -> LossOutput:
        """`lengths` [B, M]: each response's token count (read by reward="simpo" only; ref_logps may then be
        None)."""
        _validate(policy_logps, ref_logps, mask, scores, num_negatives, lengths,
                  input_kind=self.input_kind, needs_scores=self.needs_scores, reward=self.reward)
        # Zero the padding rewards with where (not multiply) so garbage there cannot leak in as inf/NaN.
        r = torch.where(mask, self.rewards(policy_logps, ref_logps, lengths), 0.0)
        losses, extra = self._losses(r, mask, scores, num_negatives)
        metrics = _metrics(r, policy_logps, mask)
        metrics.update({k: v.detach() for k, v in extra.items()})
        return LossOutput(losses=losses, metrics=metrics)

    def _losses(self, r, mask, scores, num_negatives) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({knobs})"


class PairwiseLoss(PreferenceLoss):
    """Bradley–Terry / DPO: l(r_0, r_1) per prompt, or the mean of l(r_i, r_j) over all real slot pairs i < j
    (pairs="all", a ranking input). Which pair fills slots 0 and 1 is the sampler's job; `pairs` names it:
    "dataset" = the dataset's (chosen, rejected) pair (DPO), "best_worst" = best vs worst by score (BT).

    Call: (policy_logps [B, M], ref_logps [B, M], mask bool [B, M], scores [B, M] (unused), num_negatives [B]
    (unused)) -> LossOutput(losses [B], metrics). "dataset" / "best_worst" take M == 2 (input_kind "pair").
    """

    _PAIRS = {"dataset": ("pair", "DPO"), "best_worst": ("best_worst", "BT"), "all": ("all", "BT")}

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, framework: str = "dpo",
                 pairs: str = "dataset", reward: str = "ratio", margin: float = 0.0):
        super().__init__(beta, label_smoothing, framework, reward, margin)
        if pairs not in self._PAIRS:
            raise ValueError(f"pairs must be one of {', '.join(self._PAIRS)}; got {pairs!r}")
        self.pairs = pairs
        self.input_kind = "ranking" if pairs == "all" else "pair"
        self.natural_sampler, self.preference_model = self._PAIRS[pairs]

    def _losses(self, r, mask, scores, num_negatives):
        if self.pairs != "all":
            return self.ell(r[:, 0], r[:, 1]), {}
        M = r.shape[1]
        upper = torch.ones(M, M, dtype=torch.bool, device=r.device).triu(1)
        pair_mask = upper & mask[:, :, None] & mask[:, None, :]  # [B, i, j]
        ell = torch.where(pair_mask, self.ell(r[:, :, None], r[:, None, :]), 0.0)
        return ell.sum((1, 2)) / pair_mask.sum((1, 2)), {}


class PlackettLuceLoss(PreferenceLoss):
    """Plackett–Luce over the ranked slots: sum_{k=0}^{m-2} l(r_k, LSE_{j>k, real} r_j), m = real slots.

    With framework "dpo" and eps = 0 this is the PL negative log-likelihood of the observed ranking.
    Call: (policy_logps [B, M], ref_logps [B, M], mask bool [B, M], scores (unused), num_negatives (unused))
    -> LossOutput(losses [B], metrics). Padding slots are skipped, so a short prompt in a padded batch gets
    exactly the loss it would get alone. Cost is O(M^2) per prompt.
    """

    input_kind = "ranking"
    natural_sampler = "all"
    preference_model = "PL"

    def _losses(self, r, mask, scores, num_negatives):
        M = r.shape[1]
        later = torch.ones(M, M, dtype=torch.bool, device=r.device).triu(1)  # later[k, j] = j > k
        rest = later & mask[:, None, :]  # [B, k, j]: the real slots still in the race after slot k
        lse_rest = masked_logsumexp(r[:, None, :].expand(-1, M, -1), rest, dim=-1)  # [B, M]
        step = mask & rest.any(-1)  # slot k is placed by a real choice only if someone is left behind it
        return torch.where(step, self.ell(r, lse_rest), 0.0).sum(1), {}


class HPSLoss(PreferenceLoss):
    """Hard Preference Sampling: the best response against a hardness-weighted soft negative.

    estimator="full" (input_kind "ranking", needs_scores): negatives are the real slots i >= 1 whose score is
    strictly below slot 0's (ties with the best are not negatives); w = softmax(gamma * score) over them, with
    no gradient (scores are fixed annotations); loss = l(r_0, [log N] + LSE_i (r_i + log w_i)).
    estimator="single" (input_kind "pair"): slot 1 is one negative the sampler drew from w;
    loss = l(r_0, r_1 + [log N]). log_n=False drops [log N].

    Call: (policy_logps [B, M], ref_logps [B, M], mask bool [B, M], scores [B, M] (full only),
    num_negatives long [B] = N, the prompt's negatives in total, >= 1 (needed when log_n))
    -> LossOutput(losses [B], metrics); "full" adds hps/weight_entropy and hps/negatives_present
    (negative slots present per prompt, batch mean; N itself may be larger).
    """

    input_kind = "ranking"
    needs_scores = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, framework: str = "dpo",
                 estimator: str = "full", gamma: float | None = None, log_n: bool = True, reward: str = "ratio",
                 margin: float = 0.0):
        super().__init__(beta, label_smoothing, framework, reward, margin)
        if estimator not in ("full", "single"):
            raise ValueError(f"estimator must be 'full' or 'single', got {estimator!r}")
        if estimator == "single" and gamma is not None:
            raise ValueError("gamma does nothing with estimator=single (the sampler draws the negative: set "
                             "sampler.gamma, or sampler.schedule=...); remove it")
        gamma = 1.0 if gamma is None else gamma
        if not math.isfinite(gamma):
            raise ValueError(f"gamma must be finite, got {gamma}")
        self.estimator, self.gamma, self.log_n = estimator, float(gamma), bool(log_n)
        self.input_kind = "ranking" if estimator == "full" else "pair"
        self.needs_scores = estimator == "full"
        # The paper's method is the one-sample estimator (two sequences per prompt); full HPS is its own row.
        self.natural_sampler = "all" if estimator == "full" else "hard"
        self.preference_model = "HPS-full" if estimator == "full" else "HPS"

    @property
    def row(self) -> dict:
        row = super().row
        if self.estimator == "full":  # the single estimator's hardness is the sampler's gamma
            row["gamma"] = self.gamma
        return row

    def _log_n(self, num_negatives: Tensor | None, like: Tensor) -> Tensor:
        if not self.log_n:
            return torch.zeros_like(like)
        if num_negatives is None:
            raise ValueError("HPSLoss with log_n=True needs num_negatives [B]")
        if not bool((num_negatives >= 1).all()):
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives.tolist()}")
        return num_negatives.to(like.dtype).log()

    def _losses(self, r, mask, scores, num_negatives):
        if self.estimator == "single":
            return self.ell(r[:, 0], r[:, 1] + self._log_n(num_negatives, r[:, 0])), {}
        s = torch.where(mask, scores.detach(), 0.0)  # detached: the weights are data, not parameters
        neg = mask & (s < s[:, :1])
        neg[:, 0] = False
        if not bool(neg.any(1).all()):
            bad = (~neg.any(1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {bad} have no negative: every real slot ties with the best score")
        logits = self.gamma * s
        log_w = torch.where(neg, logits - masked_logsumexp(logits, neg)[:, None], 0.0)
        r_neg = self._log_n(num_negatives, r[:, 0]) + masked_logsumexp(r + log_w, neg)
        w = torch.where(neg, log_w.exp(), 0.0)
        entropy = -(w * log_w).sum(1)
        return self.ell(r[:, 0], r_neg), {
            "hps/weight_entropy": entropy.mean(),
            "hps/negatives_present": neg.sum(1).to(r.dtype).mean(),
        }


class LiPOLoss(PreferenceLoss):
    """LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank"): pairwise
    logistic terms over every ordered pair of the list, each weighted by the lambda weight of LambdaRank.

    Labels psi_i: the annotation scores, min-max normalised per prompt to [0, 1] (normalize_labels=True; a prompt
    whose scores all tie gets psi = 0 everywhere: no pair, loss 0) or as given (False). A row without scores
    (pair data: NaN scores) gets psi = 1 for slot 0 (the chosen response) and 0 for the others.
    Gains G_i = 2^psi_i - 1; tau(i) = 1-based rank of response i by the current rewards r (detached), decreasing,
    ties by lower slot first; discount D(tau) = log2(1 + tau); Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|.
    Per prompt: sum over real pairs with psi_i > psi_j of Delta_ij l(r_i, r_j) (a sum, not a mean), l the dpo
    framework's term: with eps = 0 and margin 0 exactly log(1 + exp(-(r_i - r_j))). Delta carries no gradient.
    Only framework dpo (no published definition under the others).

    Call: (policy_logps [B, M], ref_logps [B, M], mask bool [B, M], scores [B, M] (NaN rows: pair data),
    num_negatives (unused)) -> LossOutput(losses [B], metrics + lipo/pairs, lipo/delta_mean). O(M^2) per prompt.
    """

    input_kind = "ranking"
    natural_sampler = "all"
    preference_model = "LiPO-λ"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, framework: str = "dpo",
                 normalize_labels: bool = True, reward: str = "ratio", margin: float = 0.0):
        super().__init__(beta, label_smoothing, framework, reward, margin)
        if framework != "dpo":
            raise ValueError(f"loss=lipo has no published definition under framework={framework}; use "
                             f"framework=dpo")
        self.normalize_labels = bool(normalize_labels)

    @property
    def row(self) -> dict:
        row = super().row
        row["method"] = "SimPO-LiPO-λ" if self.reward == "simpo" else "LiPO-λ"
        return row

    def labels(self, scores: Tensor | None, mask: Tensor) -> Tensor:
        """psi [B, M] (0 on padding): see the class docstring."""
        if scores is None:
            scores = torch.full(mask.shape, float("nan"), device=mask.device)
        scores = scores.detach()
        scored = torch.isfinite(scores) & mask
        unscored = ~scored.any(1, keepdim=True)          # pair data: the chosen response (slot 0) is the best
        if bool((mask & ~scored & ~unscored).any()):
            raise ValueError("loss=lipo: a row has scores on some real slots but not on others")
        chosen = (torch.arange(mask.shape[1], device=mask.device) == 0).to(scores.dtype).expand_as(scores)
        s = torch.where(mask, torch.where(unscored, chosen, scores), 0.0)
        if not self.normalize_labels:
            return s
        lo = s.masked_fill(~mask, float("inf")).amin(1, keepdim=True)
        span = s.masked_fill(~mask, float("-inf")).amax(1, keepdim=True) - lo
        return torch.where(mask & (span > 0), (s - lo) / torch.where(span > 0, span, 1.0), 0.0)

    def _losses(self, r, mask, scores, num_negatives):
        psi = self.labels(scores, mask).to(r.dtype)
        rd = r.detach()
        M = r.shape[1]
        slot = torch.arange(M, device=r.device)
        # tau(i) = 1 + #{real j ranked before i}: r_j > r_i, or r_j == r_i and j < i.
        r_j, r_i = rd[:, None, :], rd[:, :, None]
        before = (r_j > r_i) | ((r_j == r_i) & (slot[None, :] < slot[:, None]))   # [B, i, j]
        tau = 1 + (before & mask[:, None, :]).sum(-1).to(r.dtype)          # [B, i]
        inv_d = 1.0 / torch.log2(1.0 + tau)
        gain = torch.exp2(psi) - 1.0
        delta = (gain[:, :, None] - gain[:, None, :]).abs() * (inv_d[:, :, None] - inv_d[:, None, :]).abs()
        pairs = mask[:, :, None] & mask[:, None, :] & (psi[:, :, None] > psi[:, None, :])   # [B, i, j]
        ell = torch.where(pairs, delta * self.ell(r[:, :, None], r[:, None, :]), 0.0)
        n_pairs = pairs.sum((1, 2)).to(r.dtype)
        return ell.sum((1, 2)), {
            "lipo/pairs": n_pairs.mean(),
            "lipo/delta_mean": (torch.where(pairs, delta, 0.0).sum((1, 2)) / n_pairs.clamp(min=1)).mean(),
        }
