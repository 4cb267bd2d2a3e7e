"""Evaluation on held-out prompts, under one of two protocols (`eval.protocol`):

default (one sample per prompt, eval.temperature default 0.7):
- bleu_corpus: sacrebleu corpus BLEU of one sampled generation per prompt against the prompt's best
  reference response (argmax score, or the dataset's chosen one).
- reward: mean evaluation-reward-model score of those generations.
- harmful_rate: fraction of generations the reward model's `is_harmful` flags (None without labels).

paper (the HPS authors' protocol; K = eval.num_samples, default 5, samples per prompt at temperature 0.9):
- reward: mean over all K samples; reward_top1: mean over prompts of the best of K.
- bleu_char (the authors' NLTK form: character 4-gram BLEU, no smoothing) and bleu_sentence (sacrebleu sentence BLEU) of
  the generation with the highest reward against the reference response with the highest reward, per prompt,
  averaged (hps_exp/eval_metrics.py). Needs an evaluation reward model.
- harmful_rate: over all K samples.

Both protocols:
- win_rate (aligned policy only): fraction of prompts whose aligned reward (mean of its samples) beats the SFT
  policy's on the same prompt, ties half: the reward-model stand-in for the paper's judge win rates.
- reward_margin: mean over prompts of r(best) - mean r(negatives), with the policy's implicit reward
  r = beta * (log pi(y|x) - log pi_ref(y|x)); negatives are the other responses not tied with the best.
  reward_margin_hardest uses the highest-scored negative instead (the dataset's rejected one for pair
  data). Both are exactly 0 for the reference (SFT) policy itself.
"""
from __future__ import annotations

from typing import Sequence

import sacrebleu
import torch

from hps_exp.data.schema import Example


def corpus_bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """(sacrebleu corpus BLEU 0..100, its signature) of one hypothesis per reference, both stripped."""
    metric = sacrebleu.BLEU()
    score = metric.corpus_score([h.strip() for h in hypotheses], [[r.strip() for r in references]])
    return score.score, str(metric.get_signature())


def reward_margins(examples: list[Example], policy_logps: list[torch.Tensor], ref_logps: list[torch.Tensor],
                   beta: float) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(means, per-prompt values) of both margins over the prompts that have a negative."""
    mean_m, hard_m = [], []
    for ex, pol, ref in zip(examples, policy_logps, ref_logps):
        neg = list(ex.negatives)
        if not neg:
            continue
        r = beta * (pol - ref)
        mean_m.append(float(r[ex.best] - r[neg].mean()))
        hard_m.append(float(r[ex.best] - r[ex.hardest]))
    n = max(1, len(mean_m))
    return ({"reward_margin": sum(mean_m) / n, "reward_margin_hardest": sum(hard_m) / n},
            {"reward_margin": mean_m, "reward_margin_hardest": hard_m})


def evaluate_generations(examples: list[Example], generations: list[str], reward_model) -> tuple[dict, list[dict]]:
    """Corpus BLEU, reward and harmful rate of one generation per example; also the per-sample records."""
    prompts = [e.prompt for e in examples]
    refs = [e.responses[e.best] for e in examples]
    score, signature = corpus_bleu(generations, refs)
    metrics: dict = {"bleu_corpus": score, "bleu_signature": signature, "reward": None, "harmful_rate": None}
    rewards = reward_model.score_batch(prompts, generations) if reward_model is not None else [None] * len(prompts)
    harmful: Sequence[bool | None] = [None] * len(prompts)
    if reward_model is not None:
        metrics["reward"] = sum(rewards) / len(rewards)
        if hasattr(reward_model, "is_harmful"):
            flags = [bool(reward_model.is_harmful(p, g)) for p, g in zip(prompts, generations)]
            metrics["harmful_rate"] = sum(flags) / len(flags)
            harmful = flags
    samples = [{"prompt": p, "generation": g, "reference": r, "reward": rw, "harmful": h}
               for p, g, r, rw, h in zip(prompts, generations, refs, rewards, harmful)]
    return metrics, samples


PROTOCOLS = {"default": {"num_samples": 1, "temperature": 0.7}, "paper": {"num_samples": 5, "temperature": 0.9}}


def evaluate_policy(generator, examples: list[Example], *, policy_logps: list[torch.Tensor],
                    ref_logps: list[torch.Tensor], reward_model, beta: float, protocol: str, num_samples: int,
                    max_prompts: int, max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, stop: Sequence[str] = ()) -> tuple[dict, dict, list[dict]]:
    """One policy on one evaluation set: (metrics, per-prompt values, samples). `generator` is a
    hps_exp.generation.Generator; a generation ends at eos or the first of `stop` (dataset.stop: the turn
    markers), so BLEU and the reward score the reply alone. Generation metrics use the first `max_prompts`
    prompts; the margins all."""
    subset = examples[:max_prompts]
    prompts = [x.prompt for x in subset]
    gens = generator.generate(prompts, n=num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, stop=stop)
    if protocol == "paper":
        metrics, per_prompt, samples = _paper(subset, gens, reward_model)
    else:
        metrics, samples = evaluate_generations(subset, [g[0] for g in gens], reward_model)
        per_prompt = {} if reward_model is None else {"reward": [s["reward"] for s in samples]}
        if metrics["harmful_rate"] is not None:
            per_prompt["harmful"] = [float(s["harmful"]) for s in samples]
    margins, margin_values = reward_margins(examples, policy_logps, ref_logps, beta)
    metrics.update(margins)
    per_prompt.update(margin_values)
    return metrics, per_prompt, samples


def _paper(examples: list[Example], gens: list[list[str]], reward_model) -> tuple[dict, dict, list[dict]]:
    from hps_exp.eval_metrics import argmax, paper_protocol

    if reward_model is None:
        raise ValueError("eval.protocol=paper ranks generations and references by reward: it needs an evaluation "
                         "reward model (eval.reward_model)")
    flat_p = [e.prompt for e, g in zip(examples, gens) for _ in g]
    flat_g = [t for g in gens for t in g]
    flat_r = reward_model.score_batch(flat_p, flat_g)
    ref_p = [e.prompt for e in examples for _ in e.responses]
    ref_r = reward_model.score_batch(ref_p, [r for e in examples for r in e.responses])
    rewards, refs_rewards, k, j = [], [], 0, 0
    for e, g in zip(examples, gens):
        rewards.append(flat_r[k:k + len(g)])
        refs_rewards.append(ref_r[j:j + e.n])
        k, j = k + len(g), j + e.n
    metrics, per_prompt = paper_protocol(gens, rewards, [list(e.responses) for e in examples], refs_rewards)
    metrics["harmful_rate"] = None
    if hasattr(reward_model, "is_harmful"):
        flags = [[bool(reward_model.is_harmful(e.prompt, t)) for t in g] for e, g in zip(examples, gens)]
        metrics["harmful_rate"] = sum(map(sum, flags)) / max(1, sum(map(len, flags)))
        per_prompt["harmful"] = [sum(f) / len(f) for f in flags]
    samples = [{"prompt": e.prompt, "generations": g, "rewards": r, "reference": e.responses[argmax(rr)],
                "reference_reward": max(rr)} for e, g, r, rr in zip(examples, gens, rewards, refs_rewards)]
    return metrics, per_prompt, samples


def add_win_rate(aligned: dict, aligned_per_prompt: dict, sft_per_prompt: dict) -> None:
    """win_rate of the aligned policy against the SFT policy on the same prompts (needs per-prompt rewards)."""
    from hps_exp.eval_metrics import win_rate

    if "reward" in aligned_per_prompt and "reward" in sft_per_prompt:
        aligned["win_rate"], aligned_per_prompt["win"] = win_rate(aligned_per_prompt["reward"],
                                                                  sft_per_prompt["reward"])
