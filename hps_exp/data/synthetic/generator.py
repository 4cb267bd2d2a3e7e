"""Generate the synthetic splits: per topic a pool of candidate responses (the best answer, hard and easy
negatives, exact ties) scored by the scorer, then seeded prompts spread evenly over topics, each with n_responses
candidates drawn from its topic's pool (the draw order is fixed: the same seed gives the same data)."""
from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass, replace
from typing import Any

from hps_exp.data.schema import DataError, Example, Splits
from hps_exp.data.synthetic.content import (
    BENIGN,
    COMPLY_OPENERS,
    FILLERS,
    HARMFUL,
    PREFIXES,
    REFUSALS,
    SUFFIXES,
    TEST_TEMPLATES,
    TOPIC_BY_KEY,
    TRAIN_TEMPLATES,
    TWISTS,
    Topic,
    best_response,
    format_prompt,
    helpful_answer,
)
from hps_exp.data.synthetic.scorer import SyntheticScorer

MAX_RESPONSES = 32
TIE_PROBABILITY = 0.1

def _sentences(text: str) -> list[str]:
    return [s.strip() + "." for s in text.strip().split(".") if s.strip()]


def _insert(text: str, sentence: str, at_end: bool) -> str:
    sents = _sentences(text)
    pos = len(sents) if at_end or len(sents) < 2 else 1
    return " " + " ".join(sents[:pos] + [sentence] + sents[pos:])

def _benign_pool(t: Topic) -> dict[str, list[str]]:
    best = helpful_answer(t)
    other_steps = [s for h in HARMFUL for s, _ in h.steps]
    harm_sents = [s for s, _ in TWISTS] + other_steps
    pool: dict[str, list[str]] = {
        "harm_insert": [_insert(best, s, at_end) for s in harm_sents for at_end in (True, False)],
        "swap1": [" " + helpful_answer(t, {i: j}) for i, (_, w) in enumerate(t.facts) for j in range(len(w))],
        "swap2": [" " + helpful_answer(t, {i: 0, k: 0}) for i, k in itertools.combinations(range(len(t.facts)), 2)],
        "truncated": [" " + " ".join(best.split()[:k]) for k in (len(best.split()) // 3, 2 * len(best.split()) // 3)],
        "repeat": [" " + " ".join([" ".join(best.split()[:k])] * 3) for k in (5, 8)],
        "refusal": [" " + r for r in REFUSALS],
        "offtopic": [best_response(o) for o in BENIGN if o is not t],
        "ramble": [f" {a} {b}" for a, b in itertools.permutations(FILLERS, 2)],
        "harmful_other": [f" {COMPLY_OPENERS[0]} " + " ".join(s for s, _ in h.steps) for h in HARMFUL],
    }
    return pool


def _harmful_pool(t: Topic) -> dict[str, list[str]]:
    best = best_response(t)
    steps = [s for s, _ in t.steps]
    return {
        "harm_insert": [_insert(best, s, at_end) for s in steps for at_end in (True, False)],
        "refusal_only": [" " + r for r in REFUSALS],
        "comply": [f" {o} " + " ".join(steps) for o in COMPLY_OPENERS],
        "partial": [f" {o} " + " ".join(c) for o in COMPLY_OPENERS[:2]
                    for k in (1, 2) for c in itertools.combinations(steps, k)],
        "redirect_only": [" " + t.redirect],
        "other_refusal": [f" {r} {o.redirect}" for o in HARMFUL if o is not t for r in REFUSALS],
        "offtopic": [best_response(o) for o in BENIGN],
        "ramble": [f" {a} {b}" for a, b in itertools.permutations(FILLERS, 2)],
    }


REQUIRED = {"benign": ("harm_insert", "swap1", "refusal", "offtopic"),
            "harmful": ("harm_insert", "refusal_only", "comply", "offtopic")}


def _tie(t: Topic) -> list[str]:
    if t.kind == "benign":
        return [" sure, " + helpful_answer(t)]
    return [f" {r} {t.redirect}" for r in REFUSALS[1:]]


@dataclass
class _Pool:
    best: str
    best_score: float
    ties: list[str]
    cats: dict[str, list[tuple[str, float]]]  # category -> (text, score) strictly below the best
    harmful: dict[str, bool]                   # text -> is_harmful


@functools.lru_cache(maxsize=None)
def _pool(key: str) -> _Pool:
    t = TOPIC_BY_KEY[key]
    prompt = format_prompt("how do i " + t.subjects[0] + "?")
    scorer = SyntheticScorer()
    best = best_response(t)
    best_score = scorer.score(prompt, best)
    raw = _benign_pool(t) if t.kind == "benign" else _harmful_pool(t)
    seen = {best}
    cats: dict[str, list[tuple[str, float]]] = {}
    for cat, texts in raw.items():
        kept = []
        for text in texts:
            if text in seen:
                continue
            seen.add(text)
            s = scorer.score(prompt, text)
            if s < best_score:
                kept.append((text, s))
        cats[cat] = kept
    ties = [x for x in _tie(t) if scorer.score(prompt, x) == best_score and x not in seen]
    harmful = {x: scorer.is_harmful(prompt, x) for x in [best, *ties, *(x for v in cats.values() for x, _ in v)]}
    return _Pool(best, best_score, ties, cats, harmful)


def _negatives(pool: _Pool, kind: str, need: int, rng: random.Random) -> list[tuple[str, float]]:
    remaining = {c: list(v) for c, v in pool.cats.items() if v}
    required = [c for c in REQUIRED[kind] if c in remaining]
    picks = rng.sample(required, need) if need <= len(required) else list(required)
    out = []
    for c in picks:
        out.append(remaining[c].pop(rng.randrange(len(remaining[c]))))
        if not remaining[c]:
            del remaining[c]
    while len(out) < need:
        if not remaining:
            raise DataError(f"synthetic: not enough distinct candidate responses for n_responses={need + 1}")
        c = rng.choice(sorted(remaining))
        out.append(remaining[c].pop(rng.randrange(len(remaining[c]))))
        if not remaining[c]:
            del remaining[c]
    return out


def _example(topic: Topic, question: str, n: int, rng: random.Random, source: str) -> Example:
    pool = _pool(topic.key)
    prompt = format_prompt(question)
    items = [(pool.best, pool.best_score)]
    if n >= 3 and pool.ties and rng.random() < TIE_PROBABILITY:
        items.append((rng.choice(pool.ties), pool.best_score))
    items += _negatives(pool, topic.kind, n - len(items), rng)
    rng.shuffle(items)
    # The pooled scores are the scorer's scores: the score depends on the prompt only through its topic.
    responses = tuple(text for text, _ in items)
    scores = tuple(score for _, score in items)
    harmful = tuple(pool.harmful[text] for text in responses)
    scored = Example(prompt=prompt, responses=responses, scores=scores, harmful=harmful, source=source)
    # chosen = Example.best; rejected = a seeded-random negative, drawn from the negatives in index order
    # (the order this generator has always drawn from, so the data stays the same for a seed).
    rejected = rng.choice(sorted(scored.negatives))
    return replace(scored, chosen=scored.best, rejected=rejected)


# ----------------------------------------------------------------------------- loader

def _questions(topic: Topic, templates: tuple[str, ...]) -> list[str]:
    return [p + tpl.format(s=s) + x for s in topic.subjects for tpl in templates for p in PREFIXES for x in SUFFIXES]


def _split(split: str, n: int, harmful_fraction: float, n_responses: int, rng: random.Random) -> list[Example]:
    templates = TRAIN_TEMPLATES if split == "train" else TEST_TEMPLATES
    n_harm = round(n * harmful_fraction)
    if 0 < harmful_fraction < 1 and n >= 2:
        n_harm = min(max(n_harm, 1), n - 1)
    plan: list[tuple[Topic, str]] = []
    for topics, count in ((HARMFUL, n_harm), (BENIGN, n - n_harm)):
        order = list(topics)
        rng.shuffle(order)
        queues: dict[str, list[str]] = {t.key: [] for t in topics}
        for i in range(count):
            t = order[i % len(order)]
            if not queues[t.key]:  # refill (a prompt string repeats only once all were used)
                queues[t.key] = _questions(t, templates)
                rng.shuffle(queues[t.key])
            plan.append((t, queues[t.key].pop()))
    rng.shuffle(plan)
    return [_example(t, q, n_responses, rng, f"synthetic:{split}:{i}") for i, (t, q) in enumerate(plan)]


def _check_int(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise DataError(f"{key}: must be an integer {rng}; got {value!r}")
    return value


def load(n_train: int = 400, n_test: int = 100, n_responses: int = 8, harmful_fraction: float = 0.5,
         seed: int = 0) -> Splits:
    """Generate the synthetic dataset: `n_train` / `n_test` prompts with `n_responses` scored responses each."""
    _check_int("n_train", n_train, 0)
    _check_int("n_test", n_test, 0)
    _check_int("n_responses", n_responses, 2, MAX_RESPONSES)
    _check_int("seed", seed, -(2**63))
    if isinstance(harmful_fraction, bool) or not isinstance(harmful_fraction, (int, float)) \
            or not 0 <= harmful_fraction <= 1:
        raise DataError(f"harmful_fraction: must be a number in [0, 1]; got {harmful_fraction!r}")
    rng = random.Random(seed)
    train = _split("train", n_train, float(harmful_fraction), n_responses, rng)
    test = _split("test", n_test, float(harmful_fraction), n_responses, rng)
    return Splits(train=train, test=test, name="synthetic")
