"""Reward models: the Bradley-Terry RM trained here, and Hugging Face sequence-classification RMs."""
import pytest
import torch

from hps_exp.data import synthetic
from hps_exp.data.schema import Example
from hps_exp.models import ModelError, train_tokenizer
from hps_exp.reward_models import (HFRewardModel, TrainedRewardModel, encode_pairs, pair_accuracy,
                                   preference_pairs, train_reward_model)

# Held-out accuracy of the short training below is 0.75-0.77 for seeds 0, 1, 2 (100 test pairs); chance is
# 0.5 and P(acc >= 0.65 | coin flips) < 0.2 %, so 0.65 is "clearly above chance" with room for numerics.
ACCURACY_THRESHOLD = 0.65
RM_KW = dict(n_layer=1, n_head=2, n_embd=64, n_positions=128, max_prompt_length=48, max_length=128,
             epochs=3, lr=3e-3, batch_size=32, device="cpu")


@pytest.fixture(scope="module")
def data():
    return synthetic.load(n_train=120, n_test=100, n_responses=2, seed=0)


@pytest.fixture(scope="module")
def tok(data):
    return train_tokenizer([e.prompt + r for e in data.train for r in e.responses], 512)


@pytest.fixture(scope="module")
def rm(data, tok):
    return train_reward_model(data.train, tok=tok, seed=0, **RM_KW)


def test_short_training_beats_chance_on_held_out_pairs(rm, data):
    assert rm.train_result["pairs"] == 120 and rm.train_result["steps"] == 3 * 4
    acc = pair_accuracy(rm, data.test)
    assert acc >= ACCURACY_THRESHOLD, acc


def test_untrained_model_is_near_chance(data, tok):
    """The accuracy test can fail: zero epochs of training do not order the pairs."""
    untrained = train_reward_model(data.train, tok=tok, seed=0, **{**RM_KW, "epochs": 0})
    assert pair_accuracy(untrained, data.test) < ACCURACY_THRESHOLD


def test_training_is_seeded(data, tok):
    few = data.train[:32]
    kw = {**RM_KW, "epochs": 1}
    a = train_reward_model(few, tok=tok, seed=5, **kw)
    b = train_reward_model(few, tok=tok, seed=5, **kw)
    c = train_reward_model(few, tok=tok, seed=6, **kw)
    p, r = [e.prompt for e in data.test[:8]], [e.responses[0] for e in data.test[:8]]
    assert a.score_batch(p, r) == b.score_batch(p, r)
    assert a.score_batch(p, r) != c.score_batch(p, r)


def test_save_load_round_trip_gives_identical_scores(rm, data, tmp_path):
    rm.save(tmp_path / "rm")
    loaded = TrainedRewardModel.load(tmp_path / "rm")
    p = [e.prompt for e in data.test[:20] for _ in e.responses]
    r = [x for e in data.test[:20] for x in e.responses]
    assert loaded.score_batch(p, r) == rm.score_batch(p, r)
    assert (loaded.max_prompt_length, loaded.max_length) == (rm.max_prompt_length, rm.max_length)


def test_load_rejects_a_directory_without_reward_model_config(tmp_path):
    with pytest.raises(ModelError, match="hps_reward_model.json"):
        TrainedRewardModel.load(tmp_path)


def test_scores_do_not_depend_on_padding_or_batch(rm, data):
    ex = data.test[0]
    short = min(ex.responses, key=len)
    alone = rm.score_batch([ex.prompt], [short])[0]
    long_prompt = data.test[1].prompt * 3
    long_resp = " ".join(data.test[1].responses) * 2
    # with batch_size=2 the short one shares a padded batch with the long one
    rm_small = TrainedRewardModel(rm.model, rm.tok, max_prompt_length=rm.max_prompt_length,
                                  max_length=rm.max_length, batch_size=2)
    batched = rm_small.score_batch([long_prompt, ex.prompt, long_prompt], [long_resp, short, long_resp + " x"])
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    assert len(encode_pairs(rm.tok, [ex.prompt], [short], 48, 128)[0][1]) < \
        len(encode_pairs(rm.tok, [long_prompt], [long_resp], 48, 128)[0][1])


def test_score_batch_checks_lengths_and_allows_empty_response(rm):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        rm.score_batch(["a", "b"], ["x"])
    assert len(rm.score_batch(["\n\nHuman: hi\n\nAssistant:"], [""])) == 1
    assert rm.score_batch([], []) == []


def test_preference_pairs_modes():
    ex = Example("p", ("a", "b", "c"), scores=(1.0, 3.0, 2.0), chosen=1, rejected=0)
    assert preference_pairs(ex, "chosen_rejected") == [(1, 0)]
    assert preference_pairs(ex, "best_vs_rest") == [(1, 0), (1, 2)]
    assert sorted(preference_pairs(ex, "all")) == [(1, 0), (1, 2), (2, 0)]
    assert preference_pairs(ex, "auto") == preference_pairs(ex, "all")
    no_scores = Example("p", ("a", "b"), chosen=1, rejected=0)
    assert preference_pairs(no_scores, "auto") == [(1, 0)]
    with pytest.raises(ValueError, match="pairs must be"):
        preference_pairs(ex, "bogus")


def test_pair_accuracy_counts_ties_as_wrong():
    class Const:
        def score_batch(self, prompts, responses):
            return [len(r) for r in responses]

    exs = [Example("p", ("long answer", "x")), Example("p", ("y", "longer one"))]
    assert pair_accuracy(Const(), exs) == 0.5
    assert pair_accuracy(Const(), [Example("p", ("ab", "cd"))]) == 0.0


# ---------------------------------------------------------------- Hugging Face reward models

def test_hf_reward_model_offline_hub_id_raises_model_error():
    with pytest.raises(ModelError, match=r"reward_model\.name_or_path") as info:
        HFRewardModel("hps-exp-no-such-org/no-such-reward-model")
    assert "reward_model=train" in str(info.value)


@pytest.fixture(scope="module")
def tiny_hf_rm(tmp_path_factory, tok):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("hf_rm")
    GPT2ForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_hf_reward_model_loads_local_dir_and_scores_deterministically(tiny_hf_rm, data):
    rm = HFRewardModel(str(tiny_hf_rm), batch_size=3, max_length=64)
    p = [e.prompt for e in data.test[:5] for _ in e.responses]
    r = [x for e in data.test[:5] for x in e.responses]
    s = rm.score_batch(p, r)
    assert len(s) == 10 and all(isinstance(v, float) for v in s)
    assert len(set(s)) > 1  # a real function of the text, not a constant
    assert HFRewardModel(str(tiny_hf_rm), batch_size=3, max_length=64).score_batch(p, r) == s
    # padding: scoring one text alone equals scoring it inside a padded batch
    alone = HFRewardModel(str(tiny_hf_rm), batch_size=1, max_length=64).score_batch(p, r)
    assert alone == pytest.approx(s, abs=1e-5)


def test_hf_reward_model_truncates_from_the_left(tiny_hf_rm):
    filler = " please answer quickly" * 6 + "\n\nAssistant:"
    prompts = ["\n\nHuman: tell me about bread." + filler, "\n\nHuman: how do i swim?" + filler]
    resp = [" bake the bread in a hot oven."] * 2
    a, b = HFRewardModel(str(tiny_hf_rm), max_length=16).score_batch(prompts, resp)
    assert a == pytest.approx(b, abs=1e-5)  # only the last 16 tokens (shared filler + response) are seen
    a, b = HFRewardModel(str(tiny_hf_rm), max_length=128).score_batch(prompts, resp)
    assert a != pytest.approx(b, abs=1e-5)  # the full texts differ


def test_hf_reward_model_rejects_checkpoint_without_head(tmp_path, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a reward model"):
        HFRewardModel(str(tmp_path))


def test_hf_reward_model_bad_input_format():
    with pytest.raises(ValueError, match="input_format"):
        HFRewardModel("whatever", input_format="chat")
