"""Evaluation metrics as pure functions of texts and numbers (no model): the paper's protocol and win rate.

- `char_bleu`: the HPS authors' BLEU. Their code calls NLTK `sentence_bleu([reference], hypothesis)` on raw
  strings, so NLTK iterates characters: character 1..4-gram BLEU, uniform weights, brevity penalty, no
  smoothing. Reimplemented here (nltk is not a dependency); reported x100 like sacrebleu.
- `sentence_sacrebleu`: sacrebleu's sentence BLEU (13a tokens, exp smoothing, effective order), with its
  signature string from `sacrebleu_signature()`.
- `paper_protocol`: K sampled generations per prompt -> mean reward, top-1 reward, BLEU of the best
  generation against the best reference (both forms), each averaged over prompts, plus per-prompt lists.
- `win_rate`: fraction of prompts where the aligned policy out-scores the SFT policy (ties count half).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import sacrebleu

MAX_ORDER = 4


def _ngrams(seq: str, n: int) -> Counter:
    return Counter(seq[i:i + n] for i in range(len(seq) - n + 1))


def char_bleu(hypothesis: str, reference: str) -> float:
    """Character 4-gram BLEU x 100 as NLTK's `sentence_bleu([reference], hypothesis)` computes it on strings.

    p_n = clipped matching character n-grams / max(1, hypothesis n-grams); BLEU = BP * exp(mean_n log p_n);
    BP = 1 if len(hyp) > len(ref) else exp(1 - len(ref)/len(hyp)). When any order has no match the score is 0
    (NLTK without smoothing substitutes the smallest float for that p_n and warns, which gives < 1e-70: 0 here).
    """
    if not isinstance(hypothesis, str) or not isinstance(reference, str):
        raise TypeError(f"char_bleu needs two strings; got {type(hypothesis).__name__}, {type(reference).__name__}")
    hyp_len, ref_len = len(hypothesis), len(reference)
    if hyp_len == 0:
        return 0.0
    log_sum = 0.0
    for n in range(1, MAX_ORDER + 1):
        hyp_counts, ref_counts = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
        if matches == 0:
            return 0.0
        log_sum += math.log(matches / max(1, hyp_len - n + 1))
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * bp * math.exp(log_sum / MAX_ORDER)


def _sacrebleu_metric() -> sacrebleu.BLEU:
    # effective_order: sacrebleu's recommended setting for one sentence (orders longer than the hypothesis
    # are left out instead of zeroing the score); smoothing is sacrebleu's default ("exp").
    return sacrebleu.BLEU(effective_order=True)


def sentence_sacrebleu(hypothesis: str, reference: str) -> float:
    """sacrebleu sentence BLEU (0..100) of one hypothesis against one reference, both stripped."""
    return float(_sacrebleu_metric().sentence_score(hypothesis.strip(), [reference.strip()]).score)


def sacrebleu_signature() -> str:
    """The signature of `sentence_sacrebleu`, e.g. nrefs:1|case:mixed|eff:yes|tok:13a|smooth:exp|version:2.6.0."""
    metric = _sacrebleu_metric()
    metric.sentence_score("a", ["a"])  # the signature reports nrefs only after a scoring call
    return str(metric.get_signature())


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first on ties (deterministic)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _check_nested(name: str, texts: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                  n_prompts: int) -> None:
    if len(texts) != n_prompts or len(rewards) != n_prompts:
        raise ValueError(f"{name}: {len(texts)} text lists and {len(rewards)} reward lists for {n_prompts} prompts")
    for i, (ts, rs) in enumerate(zip(texts, rewards)):
        if len(ts) == 0 or len(ts) != len(rs):
            raise ValueError(f"{name}[{i}]: {len(ts)} texts and {len(rs)} rewards (need the same number, >= 1)")
        bad = [j for j, r in enumerate(rs) if not (isinstance(r, (int, float)) and math.isfinite(r))]
        if bad:
            raise ValueError(f"{name}[{i}][{bad[0]}]: reward {rs[bad[0]]!r} is not a finite number")


def paper_protocol(generations: list[list[str]], generation_rewards: list[list[float]],
                   references: list[list[str]], reference_rewards: list[list[float]]) -> tuple[dict, dict]:
    """The paper's evaluation from K samples per prompt (all lists in prompt order).

    Returns (scalars, per_prompt):
    - reward: mean reward over all samples of all prompts; per prompt: the mean of its K samples.
    - reward_top1: mean over prompts of the best of K.
    - bleu_char / bleu_sentence: per prompt, the generation with the highest reward against the reference response
      with the highest reward (first on ties), in char_bleu / sentence_sacrebleu form, averaged over prompts.
    - bleu_signature (scalars only): sacrebleu's signature string.
    """
    n = len(generations)
    if n == 0:
        raise ValueError("paper_protocol: no prompts")
    _check_nested("generations", generations, generation_rewards, n)
    _check_nested("references", references, reference_rewards, n)
    per_prompt: dict[str, list[float]] = {"reward": [], "reward_top1": [], "bleu_char": [], "bleu_sentence": []}
    total, count = 0.0, 0
    for gens, g_rew, refs, r_rew in zip(generations, generation_rewards, references, reference_rewards):
        total += float(sum(g_rew))
        count += len(g_rew)
        best_gen, best_ref = gens[argmax(g_rew)], refs[argmax(r_rew)]
        per_prompt["reward"].append(float(sum(g_rew)) / len(g_rew))
        per_prompt["reward_top1"].append(float(max(g_rew)))
        per_prompt["bleu_char"].append(char_bleu(best_gen, best_ref))
        per_prompt["bleu_sentence"].append(sentence_sacrebleu(best_gen, best_ref))
    scalars: dict = {"reward": total / count}
    for key in ("reward_top1", "bleu_char", "bleu_sentence"):
        scalars[key] = sum(per_prompt[key]) / n
    scalars["bleu_signature"] = sacrebleu_signature()
    return scalars, per_prompt


def win_rate(aligned_rewards: Sequence[float], sft_rewards: Sequence[float]) -> tuple[float, list[float]]:
    """Per prompt 1 if aligned > sft, 0.5 on a tie, 0 otherwise; returns (mean, per-prompt list)."""
    if len(aligned_rewards) != len(sft_rewards):
        raise ValueError(f"win_rate: {len(aligned_rewards)} aligned rewards vs {len(sft_rewards)} SFT rewards")
    if not aligned_rewards:
        raise ValueError("win_rate: no prompts")
    wins = []
    for i, (a, s) in enumerate(zip(aligned_rewards, sft_rewards)):
        if not (math.isfinite(a) and math.isfinite(s)):
            raise ValueError(f"win_rate: prompt {i} has a non-finite reward (aligned={a!r}, sft={s!r})")
        wins.append(1.0 if a > s else 0.5 if a == s else 0.0)
    return sum(wins) / len(wins), wins
