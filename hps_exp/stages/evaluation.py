"""Evaluation: a policy generates on an evaluation set, its reward margins are measured against the reference, and
a reward model scores the generations (hps_exp.evaluate). The SFT policy's evaluation is cached, the aligned
policy's is not."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from hps_exp import batching, evaluate
from hps_exp.generation import build_generator
from hps_exp.io import atomic_write_text
from hps_exp.losses import implicit_rewards
from hps_exp.stages.env import Env, encode
from hps_exp.stages.specs import EvalResult, EvalSet, EvalSpec, MarginReward, PolicyResult, RefLogps, Scorer, SFTResult

RATIO = MarginReward()   # the ratio reward at beta 1


def _margin_rewards(margin: MarginReward, policy_logps, ref: RefLogps | None, enc) -> list[torch.Tensor]:
    """Each example's r [n_i] under the loss's reward (enc: the token counts, read by simpo only)."""
    out = []
    for i, pol in enumerate(policy_logps):
        lengths = torch.tensor([float(len(r)) for r in enc[i].responses]) if enc is not None else None
        out.append(implicit_rewards(pol, ref.logps[i] if ref else None, lengths, reward=margin.reward,
                                    beta=margin.beta))
    return out


def evaluate_sft(spec: EvalSpec, sft_result: SFTResult, eval_set: EvalSet, ref: RefLogps | None,
                 scorer: Scorer | None, env: Env, margin: MarginReward = RATIO) -> EvalResult:
    """The SFT policy's evaluation, cached: a sweep over losses evaluates the reference policy once per eval set.
    Under ratio rewards the SFT policy is the reference, so its policy log-probs are the reference ones (margins
    exactly 0, whatever beta); under reference-free (simpo) rewards its margins are its own, keyed by reward and
    beta."""
    own = None if margin.reward == "ratio" else f"{margin.reward}:beta={margin.beta!r}"
    entry = env.entry("sft_eval", spec, sft=sft_result.key, examples=eval_set.examples.key,
                      reference=ref.key if ref else None, scorer=scorer.key if scorer else None, margin=own)
    def build(out: Path) -> None:
        tok, model = sft_result.load()
        model.to(env.device)
        result = _evaluate(spec, model, tok, eval_set, ref, ref.logps if ref else None, scorer, env, margin,
                           model_dir=sft_result.path)
        atomic_write_text(out / "eval.json", json.dumps({"metrics": result.metrics, "per_prompt": result.per_prompt,
                                                         "samples": result.samples, "seconds": result.seconds}))

    def read(path: Path) -> EvalResult:
        d = json.loads((path / "eval.json").read_text())
        return EvalResult(d["metrics"], d["per_prompt"], d["samples"], d["seconds"])

    return env.cached_stage(entry, build, read, lambda: EvalResult({}, {}, [], 0.0))


def evaluate_policy(spec: EvalSpec, policy: PolicyResult, eval_set: EvalSet, ref: RefLogps | None,
                    scorer: Scorer | None, env: Env, margin: MarginReward) -> EvalResult:
    if env.planned_only(env.entry("eval", spec, policy=policy.key, examples=eval_set.examples.key,
                                  scorer=scorer.key if scorer else None)):
        return EvalResult({}, {}, [], 0.0)
    tok, model = policy.load()
    model.to(env.device)
    return _evaluate(spec, model, tok, eval_set, ref, None, scorer, env, margin, model_dir=policy.path)


def _evaluate(spec: EvalSpec, model, tok, eval_set: EvalSet, ref: RefLogps | None, policy_logps,
              scorer: Scorer | None, env: Env, margin: MarginReward, model_dir: Path | None = None) -> EvalResult:
    started = time.perf_counter()
    examples = list(eval_set.examples.items)
    enc = None
    if policy_logps is None or margin.reward != "ratio":
        enc = encode(tok, examples, spec.max_prompt_length, spec.max_length)
    if policy_logps is None:
        policy_logps = batching.all_response_logps(model, enc, tok.pad_token_id, spec.batch_size, env.device,
                                                   env.autocast)
    if spec.backend == "vllm":
        # vLLM sets up its own torch.distributed world. Evaluation runs on rank 0 alone (the other ranks have left
        # theirs after training): leave ours first. Local, no collective; a no-op in one process.
        from hps_exp import distributed

        distributed.shutdown()
    # The margins use the loss's own r, passed as "policy log-probs" against a zero reference at beta 1 (exact).
    rewards = _margin_rewards(margin, policy_logps, ref, enc)
    generator = build_generator(spec.backend, model=model, tok=tok, model_dir=model_dir, device=env.device,
                                max_prompt_length=spec.max_prompt_length, batch_size=spec.batch_size,
                                autocast=env.autocast, **({**spec.vllm, "seed": spec.seed} if spec.backend == "vllm"
                                                          else {}))
    metrics, per_prompt, samples = evaluate.evaluate_policy(
        generator, examples, policy_logps=rewards, ref_logps=[torch.zeros_like(r) for r in rewards],
        reward_model=scorer.model if scorer else None, beta=1.0, protocol=spec.protocol,
        num_samples=spec.num_samples, max_prompts=spec.max_prompts, max_new_tokens=spec.max_new_tokens,
        temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed, stop=spec.stop)
    return EvalResult(metrics, per_prompt, samples, time.perf_counter() - started)

