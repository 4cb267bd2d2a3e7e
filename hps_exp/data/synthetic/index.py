"""What the scorer looks up: every scored phrase (facts, wrong facts, redirects, harmful phrases, refusals) with
its role and topic, the generator's vocabulary, and the topic a prompt asks about."""
from __future__ import annotations

import functools
import re

from hps_exp.data.synthetic.content import (
    BENIGN,
    COMPLY_OPENERS,
    FILLERS,
    HARMFUL,
    PREFIXES,
    REFUSAL_PHRASES,
    REFUSALS,
    SUFFIXES,
    TEST_TEMPLATES,
    TOPIC_BY_KEY,
    TOPICS,
    TRAIN_TEMPLATES,
    TWISTS,
    Topic,
    format_prompt,
    words,
)

ROLE_TAG = re.compile(r"(?i)\b(?:human|assistant)\s*:")
MAX_WORDS = 1000


def _phrase_index() -> dict[tuple[str, ...], list[tuple[str, str]]]:
    """phrase (word tuple) -> list of (role, topic key); roles: correct, wrong, redirect, harm, refusal."""
    index: dict[tuple[str, ...], list[tuple[str, str]]] = {}

    def add(phrase: str, role: str, topic: str) -> None:
        index.setdefault(tuple(words(phrase)), []).append((role, topic))

    for t in BENIGN:
        for correct, wrongs in t.facts:
            add(correct, "correct", t.key)
            for w in wrongs:
                add(w, "wrong", t.key)
    for t in HARMFUL:
        add(t.redirect_key, "redirect", t.key)
        for _, marker in t.steps:
            add(marker, "harm", t.key)
    for _, marker in TWISTS:
        add(marker, "harm", "")
    for p in REFUSAL_PHRASES:
        add(p, "refusal", "")
    return index


INDEX = _phrase_index()
_PHRASE_LENGTHS = sorted({len(k) for k in INDEX})
HARM_PHRASES = frozenset(k for k, v in INDEX.items() if any(r == "harm" for r, _ in v))


def found_phrases(ws: list[str]) -> set[tuple[str, ...]]:
    """The indexed phrases occurring (as contiguous words) in `ws`, each once."""
    found = set()
    for i in range(len(ws)):
        for n in _PHRASE_LENGTHS:
            if i + n > len(ws):
                break
            key = tuple(ws[i:i + n])
            if key in INDEX:
                found.add(key)
    return found


def _all_texts() -> list[str]:
    out = list(REFUSALS) + list(FILLERS) + [s for s, _ in TWISTS] + list(COMPLY_OPENERS)
    out += list(PREFIXES) + list(SUFFIXES) + list(TRAIN_TEMPLATES) + list(TEST_TEMPLATES) + [format_prompt("")]
    for t in TOPICS:
        out += list(t.subjects) + [t.template, t.redirect] + [s for s, _ in t.steps]
        for correct, wrongs in t.facts:
            out += [correct, *wrongs]
    return out


VOCAB = frozenset(w for text in _all_texts() for w in words(text.replace("{s}", " ")) if w not in ("0", "1", "2"))

# Prompt -> topic: exact subject phrases first, then votes of each topic's distinctive subject words.
_SUBJECTS = {tuple(words(s)): t.key for t in TOPICS for s in t.subjects}
_SUBJECT_LENGTHS = sorted({len(k) for k in _SUBJECTS}, reverse=True)
_STOP = frozenset("a an the my i to at on in of for and that is not by what how do".split())


def _distinctive_words() -> dict[str, str]:
    owners: dict[str, set[str]] = {}
    for t in TOPICS:
        for s in t.subjects:
            for w in words(s):
                owners.setdefault(w, set()).add(t.key)
    return {w: next(iter(ts)) for w, ts in owners.items() if len(ts) == 1 and w not in _STOP}


_KEYWORDS = _distinctive_words()


@functools.lru_cache(maxsize=65536)
def topic_of(prompt: str) -> Topic | None:
    """The topic a prompt asks about (from its last Human turn), or None when it cannot be told."""
    if not isinstance(prompt, str):
        return None
    turns = re.split(r"(?i)\bhuman\s*:", prompt)
    ws = words(ROLE_TAG.split(turns[-1])[0])[:MAX_WORDS]
    for n in _SUBJECT_LENGTHS:
        for i in range(len(ws) - n + 1):
            key = _SUBJECTS.get(tuple(ws[i:i + n]))
            if key is not None:
                return TOPIC_BY_KEY[key]
    votes: dict[str, int] = {}
    for w in ws:
        if w in _KEYWORDS:
            votes[_KEYWORDS[w]] = votes.get(_KEYWORDS[w], 0) + 1
    if not votes:
        return None
    top = max(votes.values())
    winners = [k for k, v in votes.items() if v == top]
    return TOPIC_BY_KEY[winners[0]] if len(winners) == 1 else None
