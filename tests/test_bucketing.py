"""Length bucketing: deterministic from the seed, every index once, less padding than a plain shuffle."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hps_exp.batching import bucketed_batches


def padding_fraction(batches: list[list[int]], lengths: list[int]) -> float:
    """Share of the padded [rows, max length] tokens of these batches that are padding."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 1.0 - real / max(1, padded)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 200), min_size=0, max_size=300), batch_size=st.integers(1, 20),
       chunk=st.integers(1, 10), seed=st.integers(0, 2**32 - 1))
def test_every_index_once_and_deterministic(lengths, batch_size, chunk, seed):
    a = bucketed_batches(lengths, batch_size, np.random.default_rng(seed), chunk)
    b = bucketed_batches(lengths, batch_size, np.random.default_rng(seed), chunk)
    assert a == b
    flat = [i for batch in a for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(batch) <= batch_size for batch in a)
    # only the last batch of each chunk may be short
    assert sum(len(batch) < batch_size for batch in a) <= -(-len(lengths) // (batch_size * chunk))


def test_batches_are_length_sorted_within_a_chunk_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=512).tolist()
    batches = bucketed_batches(lengths, 16, np.random.default_rng(1), chunk_batches=8)
    plain = [list(range(k, k + 16)) for k in range(0, 512, 16)]  # lengths are already random
    assert padding_fraction(batches, lengths) < 0.5 * padding_fraction(plain, lengths)
    # batch order is shuffled: the batches' mean lengths are not monotone
    means = [np.mean([lengths[i] for i in b]) for b in batches]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_different_seeds_give_different_batches():
    lengths = list(range(100))
    a = bucketed_batches(lengths, 8, np.random.default_rng(0))
    b = bucketed_batches(lengths, 8, np.random.default_rng(1))
    assert a != b


def test_padding_fraction_counts_pads():
    assert padding_fraction([[0, 1]], [3, 1]) == pytest.approx(2 / 6)
    assert padding_fraction([[0], [1]], [3, 1]) == 0.0


def test_bad_batch_size_is_refused():
    with pytest.raises(ValueError, match="batch_size=0"):
        bucketed_batches([1, 2], 0, np.random.default_rng(0))


def test_preference_lengths_keys():
    from hps_exp.batching import Encoded, preference_lengths

    enc = [Encoded([1, 2], [[3], [4, 5, 6]]), Encoded([1], [[2, 3]])]
    assert preference_lengths(enc, all_responses=False) == [5, 3]
    assert preference_lengths(enc, all_responses=True) == [6, 3]
