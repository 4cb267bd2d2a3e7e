"""augment(): n sampled responses per prompt, scored by a reward model, chosen = best, rejected = worst."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hps_exp.augment import augment
from hps_exp.data import synthetic
from hps_exp.data.schema import Example, read_examples, write_examples
from hps_exp.generation import HFGenerator
from hps_exp.models import build_tiny, train_tokenizer

N = 3


@pytest.fixture(scope="module")
def data():
    return synthetic.load(n_train=6, n_test=2, n_responses=2, seed=0)


@pytest.fixture(scope="module")
def tok():
    texts = [e.prompt + r for e in synthetic.load(n_train=60, n_test=0, n_responses=4, seed=1).train
             for r in e.responses]
    return train_tokenizer(texts, 384)


@pytest.fixture(scope="module")
def model(tok):
    return build_tiny(SimpleNamespace(n_positions=96, n_embd=32, n_layer=1, n_head=2), len(tok), 0)


def run(data, model, tok, seed=0, stats=None, **kw):
    generator = HFGenerator(model, tok, device="cpu", max_prompt_length=40, batch_size=8, top_k=0)
    args = dict(generator=generator, reward_model=synthetic.SyntheticScorer(), n=N, temperature=1.0,
                top_p=1.0, max_new_tokens=8, seed=seed, placeholder=tok.eos_token, progress=False, stats=stats)
    return augment(data, **{**args, **kw})


@pytest.fixture(scope="module")
def augmented(data, model, tok):
    stats = {}
    return run(data.train, model, tok, stats=stats), stats


def test_n_samples_plus_originals_scored_by_the_reward_model(augmented, data):
    out, stats = augmented
    scorer = synthetic.SyntheticScorer()
    assert [e.prompt for e in out] == [e.prompt for e in data.train]
    for ex, orig in zip(out, data.train):
        assert ex.responses[:2] == orig.responses                  # originals first
        assert ex.n == 2 + N - 0                                    # random samples: no duplicates here
        assert list(ex.scores) == scorer.score_batch([ex.prompt] * ex.n, list(ex.responses))
        assert list(ex.harmful) == [scorer.is_harmful(ex.prompt, r) for r in ex.responses]
        assert ex.best == max(range(ex.n), key=lambda i: (ex.scores[i], -i))
        # the dataset's own pair stays the pair (sampler=pair is DPO on it), whatever the new scores say
        assert (ex.chosen, ex.rejected) == (orig.chosen, orig.rejected)
    assert stats["generated"] == N * len(data.train) and stats["responses"] == (2 + N) * len(data.train)
    # the dataset's best answer beats the random model's samples
    assert all(ex.best == orig.best for ex, orig in zip(out, data.train))


def test_sampler_pair_is_the_datasets_pair_and_best_worst_the_annotators():
    """DPO (sampler=pair) and BT (sampler=best_worst) train on different pairs of the same augmented prompt."""
    from hps_exp.samplers import BestWorstSampler, PairSampler

    class Gen:
        def generate(self, prompts, n, **kw):
            return [["great answer", "bad", "bad"] for _ in prompts]   # one duplicate among the samples

    class Judge:   # scores by length: the sample "great answer" beats the dataset's chosen reply
        def score_batch(self, prompts, responses):
            return [float(len(r)) for r in responses]

    ex = Example(prompt="q", responses=("ok", "no"), chosen=0, rejected=1)
    dup = Example(prompt="q", responses=("same", " same "), chosen=1, rejected=0)   # the pair dedups to one text
    out = augment([ex, dup], generator=Gen(), reward_model=Judge(), n=3, temperature=1.0, top_p=1.0,
                  max_new_tokens=4, seed=0, placeholder="<eos>", progress=False)
    assert out[0].responses == ("ok", "no", "great answer", "bad")
    rng = np.random.default_rng(0)
    assert PairSampler().select(out[0], rng, 0.0).indices == (0, 1)            # the dataset's pair
    assert BestWorstSampler().select(out[0], rng, 0.0).indices == (2, 1)       # the judge's best, worst (last)
    assert (out[1].chosen, out[1].rejected) == (out[1].best, out[1].worst)     # no pair left: best / worst
    fresh = augment([ex], generator=Gen(), reward_model=Judge(), n=3, temperature=1.0, top_p=1.0, max_new_tokens=4,
                    seed=0, placeholder="<eos>", progress=False, keep_original=False)
    assert (fresh[0].chosen, fresh[0].rejected) == (fresh[0].best, fresh[0].worst)


def test_throughput_numbers_are_reported(augmented, data, model, tok, capsys):
    _, stats = augmented
    for k in ("responses_per_s", "gen_responses_per_s", "gen_tokens_per_s", "gen_s", "score_s", "total_s"):
        assert stats[k] > 0, k
    assert 0 < stats["gen_tokens"] <= stats["generated"] * 8
    run(data.train[:2], model, tok, progress=True)
    assert "responses/s" in capsys.readouterr().out


def test_same_seed_same_output_other_seed_differs(augmented, data, model, tok):
    out, _ = augmented
    assert run(data.train, model, tok, seed=0) == out
    other = run(data.train, model, tok, seed=1)
    assert [e.responses for e in other] != [e.responses for e in out]


def test_without_originals(data, model, tok):
    out = run(data.train, model, tok, keep_original=False)
    assert out, "random samples of distinct quality should leave some prompts"
    for ex, orig in zip(out, data.train):
        assert not set(ex.responses) & set(orig.responses)
        assert 2 <= ex.n <= N


def test_round_trip_through_the_cache_format(augmented, tmp_path):
    out, _ = augmented
    write_examples(tmp_path / "augmented.jsonl", out)
    back = read_examples(tmp_path / "augmented.jsonl")
    assert back == out
    assert [e.scores for e in back] == [e.scores for e in out]


class ScriptedLM:
    """Stands in for a causal LM: returns fixed continuations, records the generate() arguments."""

    def __init__(self, tok, continuations):
        self.tok, self.continuations, self.calls = tok, continuations, []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, num_return_sequences, max_new_tokens, **kw):
        self.calls.append({"num_return_sequences": num_return_sequences, **kw})
        eos = self.tok.eos_token_id
        rows = []
        for _ in range(input_ids.shape[0]):
            for text in self.continuations:
                ids = (self.tok(text, add_special_tokens=False)["input_ids"] + [eos])[:max_new_tokens]
                rows.append(ids + [eos] * (max_new_tokens - len(ids)))
        new = torch.tensor(rows, dtype=torch.long)
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, 0), new], 1)


def test_empty_samples_become_the_eos_placeholder_and_duplicates_are_dropped(data, tok):
    lm = ScriptedLM(tok, ["", " sure thing", "  sure   thing ", " \n\n", " ok then\n\nHuman: and more"])
    stats = {}
    out = run(data.train[:2], lm, tok, n=5, max_new_tokens=12, stats=stats)
    assert lm.calls[0]["use_cache"] is True and lm.calls[0]["num_return_sequences"] == 5
    assert lm.calls[0]["do_sample"] is True
    for ex, orig in zip(out, data.train):
        # "" and " \n\n" are both empty -> one placeholder; "  sure   thing " duplicates " sure thing";
        # the stop string cuts the next Human turn
        assert ex.responses == (*orig.responses, tok.eos_token, " sure thing", " ok then")
        assert tok(tok.eos_token, add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert stats["empty"] == 2 * 2 and stats["duplicates"] == 2 * 2
    back = Example.from_json(out[0].to_json())  # the placeholder passes Example validation
    assert back == out[0]


def test_dedup_off_keeps_every_sample(data, tok):
    lm = ScriptedLM(tok, [" sure thing", " sure thing", " no"])
    out = run(data.train[:1], lm, tok, dedup=False)
    assert out[0].n == 2 + 3


def test_prompts_without_a_preference_are_dropped(data, tok):
    lm = ScriptedLM(tok, [" same", " same"])
    stats = {}
    assert run(data.train[:2], lm, tok, n=2, keep_original=False, stats=stats) == []  # 1 distinct response
    assert stats["dropped_too_few"] == 2

    class Flat:
        def score_batch(self, prompts, responses):
            return [0.0] * len(prompts)

    lm = ScriptedLM(tok, [" one", " two"])
    assert run(data.train[:2], lm, tok, n=2, keep_original=False, reward_model=Flat(), stats=stats) == []
    assert stats["dropped_tied"] == 2


def test_reward_model_without_is_harmful_gives_no_labels(data, model, tok):
    class LengthRM:
        def score_batch(self, prompts, responses):
            return [float(len(r)) for r in responses]

    out = run(data.train[:2], model, tok, reward_model=LengthRM())
    assert all(e.harmful is None for e in out)
    assert all(e.scores == tuple(float(len(r)) for r in e.responses) for e in out)


def test_bad_arguments(data, model, tok):
    with pytest.raises(ValueError, match=r"\bn=\d+\b.*\btemperature\b"):
        run(data.train[:1], model, tok, temperature=0.0)
    with pytest.raises(ValueError, match=r"\bkeep_original=False\b.*\bn\b.*\b2\b"):
        run(data.train[:1], model, tok, n=1, keep_original=False)
    with pytest.raises(ValueError, match=r"\bn\b.*\b0$"):
        run(data.train[:1], model, tok, n=0)


def test_ties_chosen_is_first_best_rejected_is_last_worst(data, tok):
    class TableRM:
        def __init__(self, table):
            self.table = table

        def score_batch(self, prompts, responses):
            return [self.table[r.strip()] for r in responses]

    lm = ScriptedLM(tok, [" alpha", " beta", " gamma", " delta"])
    out = run(data.train[:1], lm, tok, n=4, keep_original=False,
              reward_model=TableRM({"alpha": 0.0, "beta": 2.0, "gamma": 2.0, "delta": 0.0}))
    assert (out[0].chosen, out[0].rejected) == (1, 3)


def test_max_prompts_augments_the_first_prompts_only(data, model, tok):
    """augment.max_prompts: the policy's budget of prompts; the same samples as without the cap for those."""
    stats = {}
    capped = run(data.train, model, tok, max_prompts=2, stats=stats)
    assert stats["prompts"] == 2 and {e.prompt for e in capped} <= {e.prompt for e in data.train[:2]}
    assert capped == run(data.train[:2], model, tok)
    with pytest.raises(ValueError, match="augment.max_prompts"):
        run(data.train, model, tok, max_prompts=0)
