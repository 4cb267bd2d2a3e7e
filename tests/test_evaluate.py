"""Evaluation metrics on known cases."""
import math

import pytest
import torch

from hps_exp import evaluate
from hps_exp.data.schema import Example


def test_corpus_bleu_known_cases():
    score, sig = evaluate.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert score == pytest.approx(100.0) and "nrefs:1" in sig
    assert evaluate.corpus_bleu(["dog"], ["the cat sat on the mat"])[0] == pytest.approx(0.0)
    # 4-gram precisions of a hypothesis with one changed word, brevity penalty 1: hand-computed
    hyp, ref = "a b c d e f", "a b c d e g"
    p = [5 / 6, 4 / 5, 3 / 4, 2 / 3]
    assert evaluate.corpus_bleu([hyp], [ref])[0] == pytest.approx(100 * math.exp(sum(map(math.log, p)) / 4), rel=1e-6)


def test_reward_margins_definition():
    ex = Example(prompt="p", responses=("best", "hard", "easy", "tie"), scores=(3.0, 2.0, -1.0, 3.0))
    ref = [torch.zeros(4)]
    pol = [torch.tensor([1.0, 0.5, -1.0, 7.0])]  # the tie with the best is not a negative
    m, per_prompt = evaluate.reward_margins([ex, ex], pol * 2, ref * 2, beta=0.5)
    assert m["reward_margin"] == pytest.approx(0.5 * (1.0 - (0.5 - 1.0) / 2))
    assert m["reward_margin_hardest"] == pytest.approx(0.5 * (1.0 - 0.5))
    assert per_prompt["reward_margin"] == pytest.approx([m["reward_margin"]] * 2)


def test_pair_data_margin_uses_the_rejected_response():
    ex = Example(prompt="p", responses=("rej", "cho"), chosen=1, rejected=0)
    m, _ = evaluate.reward_margins([ex], [torch.tensor([0.0, 2.0])], [torch.zeros(2)], beta=0.1)
    assert m["reward_margin"] == pytest.approx(0.2) == m["reward_margin_hardest"]


class Scorer:
    def score_batch(self, prompts, responses):
        return [float(len(r)) for r in responses]

    def is_harmful(self, prompt, response):
        return "knife" in response


def test_generation_metrics_and_samples():
    exs = [Example(prompt="p1", responses=("good answer", "bad")), Example(prompt="p2", responses=("x y", "knife"))]
    metrics, samples = evaluate.evaluate_generations(exs, ["good answer", "knife"], Scorer())
    assert metrics["reward"] == pytest.approx((11 + 5) / 2) and metrics["harmful_rate"] == 0.5
    assert samples[1] == {"prompt": "p2", "generation": "knife", "reference": "x y", "reward": 5.0, "harmful": True}
    no_rm, _ = evaluate.evaluate_generations(exs, ["a", "b"], None)
    assert no_rm["reward"] is None and no_rm["harmful_rate"] is None
