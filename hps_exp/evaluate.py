"""Evaluation on held-out prompts.

- bleu: sacrebleu corpus BLEU of one sampled generation per prompt against the prompt's best
  reference response (argmax score, or the dataset's chosen one).
- reward: mean evaluation-reward-model score of those generations.
- harmful_rate: fraction of generations the reward model's `is_harmful` flags (None without labels).
- reward_margin: mean over prompts of r(best) - mean r(negatives), with the policy's implicit reward
  r = beta * (log pi(y|x) - log pi_ref(y|x)); negatives are the other responses not tied with the best.
  reward_margin_hardest uses the highest-scored negative instead (the dataset's rejected one for pair
  data). Both are exactly 0 for the reference (SFT) policy itself.
"""
from __future__ import annotations

import sacrebleu
import torch

from hps_exp.data.schema import Example


@torch.no_grad()
def generate(model, tok, prompts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
             batch_size: int, device: torch.device, max_prompt_length: int, seed: int) -> list[str]:
    model.eval()
    tok.padding_side, tok.truncation_side = "left", "left"
    gen = torch.Generator().manual_seed(seed)
    out: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_prompt_length, add_special_tokens=False).to(device)
        # Sampling draws from torch's global RNG; seed it per batch from our own generator.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        sampled = model.generate(**enc, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                 top_p=top_p if temperature > 0 else None, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(sampled[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
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
    """BLEU, reward and harmful rate of one generation per example; also the per-sample records."""
    prompts = [e.prompt for e in examples]
    refs = [e.responses[e.best] for e in examples]
    score, signature = bleu(generations, refs)
    metrics: dict = {"bleu": score, "bleu_signature": signature, "reward": None, "harmful_rate": None}
    rewards = reward_model.score_batch(prompts, generations) if reward_model is not None else [None] * len(prompts)
    harmful = [None] * len(prompts)
    if reward_model is not None:
        metrics["reward"] = sum(rewards) / len(rewards)
        if hasattr(reward_model, "is_harmful"):
            harmful = [bool(reward_model.is_harmful(p, g)) for p, g in zip(prompts, generations)]
            metrics["harmful_rate"] = sum(harmful) / len(harmful)
    samples = [{"prompt": p, "generation": g, "reference": r, "reward": rw, "harmful": h}
               for p, g, r, rw, h in zip(prompts, generations, refs, rewards, harmful)]
    return metrics, samples


def evaluate_policy(model, tok, examples: list[Example], *, policy_logps: list[torch.Tensor],
                    ref_logps: list[torch.Tensor], reward_model, beta: float, max_prompts: int, max_new_tokens: int,
                    temperature: float, top_p: float, batch_size: int, max_prompt_length: int, seed: int,
                    device: torch.device) -> tuple[dict, dict, list[dict]]:
    """One policy on one evaluation set: (metrics, per-prompt values, samples).

    Generation-based metrics use the first `max_prompts` prompts; the reward margins use every prompt."""
    subset = examples[:max_prompts]
    gens = generate(model, tok, [x.prompt for x in subset], max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, batch_size=batch_size, device=device, max_prompt_length=max_prompt_length, seed=seed)
    metrics, samples = evaluate_generations(subset, gens, reward_model)
    margins, margin_values = reward_margins(examples, policy_logps, ref_logps, beta)
    metrics.update(margins)
    per_prompt = dict(margin_values)
    if reward_model is not None:
        per_prompt["reward"] = [s["reward"] for s in samples]
    return metrics, per_prompt, samples
