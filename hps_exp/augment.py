"""The paper's data pipeline: n sampled responses per prompt, scored by an annotation reward model.

`augment(examples, generator=..., reward_model=..., n=..., temperature=..., top_p=..., max_new_tokens=..., seed=...,
placeholder=..., ...)` returns, for each input prompt, an Example whose responses are (the dataset's own responses,
when keep_original) + n samples from the generator (a hps_exp.generation.Generator over the SFT policy, usually),
every one scored with `reward_model.score_batch` (the originals are re-scored too, so all scores of a prompt are on
one scale); `harmful` comes from `reward_model.is_harmful` when the reward model has one (else None, also for the
originals); chosen/rejected stay the DATASET's pair when the originals are kept (sampler=pair is DPO on the
dataset's own pair, whatever the annotator says), else they are the best (argmax score, first on ties) and the worst
(LAST index of the lowest score, as sampler=best_worst picks it). Before 2026-12-05 they were always best/worst,
which made loss=dpo on augmented data BT under another name.

Decisions (all counted in `stats`):
- Sampling: a hps_exp.generation.Generator (`augment.backend`: hf = HF `generate` with do_sample, the KV cache,
  left padding, prompts keeping their LAST `max_prompt_length` tokens, `batch_size` generated SEQUENCES per call;
  vllm, on GPU or on CPU with .venv-vllm; `augment.top_k`, 0 = off, is the generator's), with `temperature`,
  `top_p` and n samples per prompt; a progress bar over the samples (`progress`).
- Where a reply ends: the generator stops it at the model's eos and at the first of `stop` (the run passes the
  dataset's `dataset.stop`, its turn markers; default here: the next "\\n\\nHuman:" / "\\n\\nAssistant:"
  turn, since a causal LM trained on dialogues happily writes the user's next turn) and returns the text before it.
- Empty samples (nothing, or only whitespace, before eos / a stop string) are KEPT as the `placeholder` text (the
  run passes the tokenizer's eos token, e.g. "<|endoftext|>": it tokenises back to the single eos token, i.e. "the
  model stopped at once"), and scored by the reward model like any response: an immediate stop is a real (usually
  poor) sample and keeping it keeps n fixed. Counted in stats["empty"].
- Duplicates: with dedup=True (default) a response whose whitespace-normalised text equals an earlier one of the
  same prompt is dropped (originals come first, so they win). Duplicates would count one response twice in
  the listwise losses (HPS weights, PL) and create spurious ties; so a prompt can end with fewer than
  n (+ originals) responses. Counted in stats["duplicates"].
- Prompts left with fewer than 2 responses, or whose scores all tie (no preference, and no negative for HPS),
  are dropped: stats["dropped_too_few"], stats["dropped_tied"]. With keep_original=True and a dataset whose
  pair differs in score this never happens.
- Determinism: the generator's (hf: prompts in order of length, torch's RNG seeded per batch from `seed`).
  Same inputs + seed + batch_size => identical output on the same hardware.
- Throughput: stats["responses_per_s"] (generated responses per second
  of the whole call, scoring included), stats["gen_responses_per_s"] and stats["gen_tokens_per_s"] (generation
  alone) and a one-line summary printed at the end (when progress=True).

The output round-trips through hps_exp.data.schema.write_examples / read_examples (the stage cache format).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

from hps_exp.data.schema import Example

DEFAULT_STOP = ("\n\nHuman:", "\n\nAssistant:")   # the HH-RLHF turn markers (conf/dataset/*.yaml: stop)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _build(ex: Example, responses: list[str], scores: list[float], harmful: list[bool] | None,
           stats: dict, pair: tuple[int | None, int | None] = (None, None)) -> Example | None:
    """The scored example, or None (counted) when it has no preference. `pair`: where the dataset's chosen and
    rejected responses ended up among `responses` (None: not kept)."""
    if len(responses) < 2:
        stats["dropped_too_few"] += 1
        return None
    top, bottom = max(scores), min(scores)
    if top == bottom:
        stats["dropped_tied"] += 1
        return None
    scored = Example(prompt=ex.prompt, responses=tuple(responses), scores=tuple(float(s) for s in scores),
                     harmful=None if harmful is None else tuple(bool(h) for h in harmful), source=ex.source)
    chosen, rejected = pair
    if chosen is None or rejected is None or chosen == rejected:
        chosen, rejected = scored.best, scored.worst
    return dataclasses.replace(scored, chosen=chosen, rejected=rejected)


def augment(examples: list[Example], *, generator, reward_model, n: int, temperature: float, top_p: float,
            max_new_tokens: int, seed: int, placeholder: str, keep_original: bool = True, progress: bool = True,
            dedup: bool = True, stop: Sequence[str] = DEFAULT_STOP, max_prompts: int | None = None,
            stats: dict | None = None) -> list[Example]:
    """n scored samples per prompt (+ the originals); see the module docstring for every decision.

    `max_prompts`: only the first max_prompts examples are augmented (and so trained on by the preference stage),
    while the stages before (SFT, the reward models) use them all: on a small machine the reward models get every
    training pair and the policy a budget it can afford.

    `generator` is a hps_exp.generation.Generator (HF or vLLM); `placeholder` stands for an empty sample (the
    tokenizer's eos token); `stop`: the strings that end a reply (the dataset format's turn markers). `stats`, if
    given, is filled with counts and timings (prompts, examples, generated,
    responses, empty, duplicates, dropped_too_few, dropped_tied, gen_tokens, gen_s, score_s, total_s,
    responses_per_s, gen_responses_per_s, gen_tokens_per_s).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"augment: n must be an integer >= 1, got {n!r}")
    if not keep_original and n < 2:
        raise ValueError("augment: keep_original=False needs n >= 2 (an example has at least 2 responses)")
    if n > 1 and not temperature > 0:
        raise ValueError(f"augment: n={n} samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    if max_new_tokens < 1:
        raise ValueError("augment: max_new_tokens must be >= 1")
    if not placeholder or not placeholder.strip():
        raise ValueError("augment: the tokenizer needs an eos token (the placeholder for empty samples)")
    if max_prompts is not None:
        if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
            raise ValueError(f"augment.max_prompts must be null or an integer >= 1, got {max_prompts!r}")
        examples = examples[:max_prompts]
    st = stats if stats is not None else {}
    st.clear()
    st.update(prompts=len(examples), examples=0, generated=0, responses=0, empty=0, duplicates=0,
              dropped_too_few=0, dropped_tied=0, gen_tokens=0, gen_s=0.0, score_s=0.0)
    has_harm = hasattr(reward_model, "is_harmful")
    started = time.perf_counter()
    # One call: the generator batches (and, for vLLM, schedules) all prompts itself; same seed, same texts.
    samples = generator.generate([e.prompt for e in examples], n=n, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop),
                                 progress="augment" if progress else None)
    gen_stats = getattr(generator, "stats", {})
    st["gen_s"] = gen_stats.get("gen_s", time.perf_counter() - started)
    st["gen_tokens"] = gen_stats.get("gen_tokens", 0)
    st["generated"] = sum(len(t) for t in samples)

    # responses per prompt: originals first (they win a duplicate), then its n samples
    cands: list[list[str]] = []
    pairs: list[tuple[int | None, int | None]] = []   # the dataset's (chosen, rejected) among the kept responses
    for ex, texts in zip(examples, samples):
        kept: list[str] = []
        seen: dict[str, int] = {}
        where: list[int] = []   # each pool response's index among the kept (a duplicate: its first copy's)
        pool = list(ex.responses) if keep_original else []
        for t in texts:   # already cut at eos / stop by the generator
            if not t.strip():
                st["empty"] += 1
                t = placeholder
            pool.append(t)
        for t in pool:
            key = _norm(t)
            if dedup and key in seen:
                st["duplicates"] += 1
                where.append(seen[key])
                continue
            seen[key] = len(kept)
            where.append(len(kept))
            kept.append(t)
        # the originals open the pool, so the dataset's pair sits at where[chosen], where[rejected]
        pairs.append((where[ex.chosen], where[ex.rejected]) if keep_original else (None, None))
        cands.append(kept)

    t1 = time.perf_counter()
    flat_p = [ex.prompt for ex, c in zip(examples, cands) for _ in c]
    flat_r = [r for c in cands for r in c]
    scores = [float(s) for s in reward_model.score_batch(flat_p, flat_r)]
    harm = [bool(reward_model.is_harmful(p, r)) for p, r in zip(flat_p, flat_r)] if has_harm else None
    st["score_s"] = time.perf_counter() - t1
    result, pos = [], 0
    for ex, c, pair in zip(examples, cands, pairs):
        sl = slice(pos, pos + len(c))
        built = _build(ex, c, scores[sl], None if harm is None else harm[sl], st, pair)
        pos += len(c)
        if built is not None:
            result.append(built)

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
