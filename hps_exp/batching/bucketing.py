"""Length bucketing: batches of similar lengths (less padding), still random and reproducible."""
from __future__ import annotations

from hps_exp.batching.sequences import Encoded


def bucketed_batches(lengths: list[int], batch_size: int, rng, chunk_batches: int = 8) -> list[list[int]]:
    """Batches of indices with little padding, still random, and a pure function of (lengths, rng state).

    Shuffle, cut into chunks of `chunk_batches` batches, sort each chunk by length (so a batch holds
    similar lengths), cut it into batches, then shuffle all batches (so long and short batches
    alternate and the step order carries no length trend). Every index appears exactly once; the same
    seed gives the same batches, which is what resuming from a checkpoint relies on.
    """
    if batch_size < 1 or chunk_batches < 1:
        raise ValueError(f"bucketed_batches: batch_size={batch_size} and chunk_batches={chunk_batches} must be >= 1")
    order = rng.permutation(len(lengths))
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        # stable sort: ties keep the shuffled order, so equal lengths are still mixed
        part = sorted(order[start:start + chunk].tolist(), key=lambda i: lengths[i])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def preference_lengths(encoded: list[Encoded], all_responses: bool) -> list[int]:
    """Bucketing key of each prompt of a preference set, known before the sampler draws its slots.

    all_responses=False (two slots a prompt, one (prompt, response) row each): prompt + its longest
    response, which bounds the row; True (every response, packed after the prompt): prompt + all
    responses, the packed length.
    """
    if all_responses:
        return [len(e.prompt) + sum(len(r) for r in e.responses) for e in encoded]
    return [len(e.prompt) + max((len(r) for r in e.responses), default=0) for e in encoded]
