"""The paper's data pipeline: n sampled responses per prompt, scored by an annotation reward model.

`augment(examples, generator_model=..., tok=..., reward_model=..., n=..., ...)` returns, for each input
prompt, an Example whose responses are (the dataset's own responses, when keep_original) + n samples from the
generator (usually the SFT policy), every one scored with `reward_model.score_batch` (the originals are
re-scored too, so all scores of a prompt are on one scale); `harmful` comes from `reward_model.is_harmful`
when the reward model has one (else None, also for the originals); chosen = best (argmax score, first on
ties), rejected = worst (LAST index of the lowest score, as sampler=best_worst picks it).

Decisions (all counted in `stats`):
- Sampling: HF `generate` with do_sample, `temperature`, `top_p`, `top_k` (0 = off), `num_return_sequences=n`
  and the KV cache (use_cache=True). Prompts are left-padded and keep their LAST `max_prompt_length` tokens.
  `batch_size` counts generated SEQUENCES per call: batch_size // n prompts per call (at least one).
- Stop strings: a sample is cut at the first of `stop` (default: the next "\\n\\nHuman:" / "\\n\\nAssistant:"
  turn), since a causal LM trained on dialogues happily writes the user's next turn.
- Empty samples (nothing, or only whitespace, before eos / a stop string) are KEPT as the placeholder text
  `tok.eos_token` ("<|endoftext|>"; it tokenises back to the single eos token, i.e. "the model stopped at
  once"), and scored by the reward model like any response: an immediate stop is a real (usually poor) sample
  and keeping it keeps n fixed. Counted in stats["empty"].
- Duplicates: with dedup=True (default) a response whose whitespace-normalised text equals an earlier one of the
  same prompt is dropped (originals come first, so they win). Duplicates would count one response twice in
  the listwise losses (HPS weights, PL) and create spurious ties; so a prompt can end with fewer than
  n (+ originals) responses. Counted in stats["duplicates"].
- Prompts left with fewer than 2 responses, or whose scores all tie (no preference, and no negative for HPS),
  are dropped: stats["dropped_too_few"], stats["dropped_tied"]. With keep_original=True and a dataset whose
  pair differs in score this never happens.
- Determinism: prompts are processed in order of length (less padding); torch's global RNG is seeded per
  batch from a generator seeded with `seed` (as hps_exp.evaluate.generate does). Same inputs + seed +
  batch_size => identical output on the same hardware.
- Throughput: a tqdm bar (responses/s) while running; stats["responses_per_s"] (generated responses per second
  of the whole call, scoring included), stats["gen_responses_per_s"] and stats["gen_tokens_per_s"] (generation
  alone) and a one-line summary printed at the end (when progress=True).

The output round-trips through hps_exp.data.schema.write_examples / read_examples (the stage cache format).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from hps_exp.data.schema import Example

DEFAULT_STOP = ("\n\nHuman:", "\n\nAssistant:")


def _cut(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


def _norm(text: str) -> str:
    return " ".join(text.split())


def _new_token_counts(new: torch.Tensor, eos_id: int | None) -> list[int]:
    """Tokens actually generated per row: up to and including the first eos (the rest is padding)."""
    if eos_id is None:
        return [new.shape[1]] * new.shape[0]
    is_eos = new == eos_id
    first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full_like(is_eos[:, 0], new.shape[1],
                                                                                      dtype=torch.long))
    return first.tolist()


def _build(ex: Example, responses: list[str], scores: list[float], harmful: list[bool] | None,
           stats: dict) -> Example | None:
    if len(responses) < 2:
        stats["dropped_too_few"] += 1
        return None
    top, bottom = max(scores), min(scores)
    if top == bottom:
        stats["dropped_tied"] += 1
        return None
    scored = Example(prompt=ex.prompt, responses=tuple(responses), scores=tuple(float(s) for s in scores),
                     harmful=None if harmful is None else tuple(bool(h) for h in harmful), source=ex.source)
    return dataclasses.replace(scored, chosen=scored.best, rejected=scored.worst)


@torch.no_grad()
def augment(examples: list[Example], *, generator_model, tok, reward_model, n: int, temperature: float,
            top_p: float, max_new_tokens: int, batch_size: int, max_prompt_length: int, device, seed: int,
            keep_original: bool = True, progress: bool = True, dedup: bool = True, top_k: int = 0,
            stop: Sequence[str] = DEFAULT_STOP, autocast: torch.dtype | None = None,
            stats: dict | None = None) -> list[Example]:
    """n scored samples per prompt (+ the originals); see the module docstring for every decision.

    `stats`, if given, is filled with counts and timings (prompts, examples, generated, responses, empty,
    duplicates, dropped_too_few, dropped_tied, gen_tokens, gen_s, score_s, total_s, responses_per_s,
    gen_responses_per_s, gen_tokens_per_s).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"augment: n must be an integer >= 1, got {n!r}")
    if not keep_original and n < 2:
        raise ValueError("augment: keep_original=False needs n >= 2 (an example has at least 2 responses)")
    if n > 1 and not temperature > 0:
        raise ValueError(f"augment: n={n} samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    if batch_size < 1 or max_new_tokens < 1 or max_prompt_length < 1:
        raise ValueError("augment: batch_size, max_new_tokens and max_prompt_length must be >= 1")
    device = torch.device(device)
    st = stats if stats is not None else {}
    st.clear()
    st.update(prompts=len(examples), examples=0, generated=0, responses=0, empty=0, duplicates=0,
              dropped_too_few=0, dropped_tied=0, gen_tokens=0, gen_s=0.0, score_s=0.0)
    placeholder = tok.eos_token
    if not placeholder or not placeholder.strip():
        raise ValueError("augment: the tokenizer needs an eos token (the placeholder for empty samples)")
    has_harm = hasattr(reward_model, "is_harmful")

    generator_model.eval()
    saved_sides = (tok.padding_side, tok.truncation_side)
    tok.padding_side, tok.truncation_side = "left", "left"
    rng = torch.Generator().manual_seed(seed)
    per_call = max(1, batch_size // n)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))
    out: list[Example | None] = [None] * len(examples)
    bar = tqdm(total=len(examples) * n, desc="augment", unit="resp", dynamic_ncols=True,
               disable=not progress or os.environ.get("HPS_EXP_NO_PROGRESS") == "1")
    started = time.perf_counter()
    try:
        for start in range(0, len(order), per_call):
            idx = order[start:start + per_call]
            t0 = time.perf_counter()
            enc = tok([examples[i].prompt for i in idx], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_prompt_length, add_special_tokens=False).to(device)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                sampled = generator_model.generate(
                    **enc, do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                    top_p=top_p if temperature > 0 else None, top_k=top_k if temperature > 0 else None,
                    max_new_tokens=max_new_tokens, num_return_sequences=n, use_cache=True,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = sampled[:, enc["input_ids"].shape[1]:].cpu()
            st["gen_tokens"] += sum(_new_token_counts(new, tok.eos_token_id))
            texts = tok.batch_decode(new, skip_special_tokens=True)
            st["gen_s"] += time.perf_counter() - t0
            st["generated"] += len(texts)

            # responses per prompt: originals first, then this prompt's n samples (HF orders them prompt-major)
            cands: list[list[str]] = []
            for k, i in enumerate(idx):
                kept: list[str] = []
                seen: set[str] = set()
                pool = list(examples[i].responses) if keep_original else []
                for t in texts[k * n:(k + 1) * n]:
                    t = _cut(t, stop)
                    if not t.strip():
                        st["empty"] += 1
                        t = placeholder
                    pool.append(t)
                for t in pool:
                    key = _norm(t)
                    if dedup and key in seen:
                        st["duplicates"] += 1
                        continue
                    seen.add(key)
                    kept.append(t)
                cands.append(kept)

            t1 = time.perf_counter()
            flat_p = [examples[i].prompt for i, c in zip(idx, cands) for _ in c]
            flat_r = [r for c in cands for r in c]
            scores = [float(s) for s in reward_model.score_batch(flat_p, flat_r)]
            harm = [bool(reward_model.is_harmful(p, r)) for p, r in zip(flat_p, flat_r)] if has_harm else None
            st["score_s"] += time.perf_counter() - t1
            pos = 0
            for i, c in zip(idx, cands):
                sl = slice(pos, pos + len(c))
                out[i] = _build(examples[i], c, scores[sl], None if harm is None else harm[sl], st)
                pos += len(c)
            bar.update(len(texts))
            elapsed = time.perf_counter() - started
            bar.set_postfix(resp_s=f"{st['generated'] / max(elapsed, 1e-9):.1f}",
                            tok_s=f"{st['gen_tokens'] / max(st['gen_s'], 1e-9):.0f}")
    finally:
        bar.close()
        tok.padding_side, tok.truncation_side = saved_sides

    result = [e for e in out if e is not None]
    total = time.perf_counter() - started
    st.update(examples=len(result), responses=sum(e.n for e in result), total_s=total,
              responses_per_s=st["generated"] / max(total, 1e-9),
              gen_responses_per_s=st["generated"] / max(st["gen_s"], 1e-9),
              gen_tokens_per_s=st["gen_tokens"] / max(st["gen_s"], 1e-9))
    if progress:
        print(f"[augment] {st['prompts']} prompts x {n} samples: {st['generated']} generated in {total:.1f}s "
              f"({st['responses_per_s']:.1f} responses/s; generation {st['gen_responses_per_s']:.1f} responses/s, "
              f"{st['gen_tokens_per_s']:.0f} tokens/s; scoring {st['score_s']:.1f}s); {st['empty']} empty -> "
              f"placeholder, {st['duplicates']} duplicates removed, "
              f"{st['dropped_too_few'] + st['dropped_tied']} prompts dropped")
    return result
