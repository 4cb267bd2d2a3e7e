"""The generator interface: hf backend reproduces evaluate/augment sampling; vllm argument mapping
checked against a fake `vllm` module (the real one needs a GPU)."""
import sys
import types

import pytest
from omegaconf import OmegaConf

from hps_exp import generation, models

TEXTS = ["hello world, how are you?", "fine thanks, and you?", "the cat sat on the mat."] * 8
PROMPTS = ["hello world,", "the cat", "fine thanks, and you? hello", "how"]


@pytest.fixture(scope="module")
def tiny():
    tok = models.train_tokenizer(TEXTS, vocab_size=300)
    cfg = OmegaConf.create({"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64})
    model = models.build_tiny(cfg, len(tok), seed=0)
    return tok, model


def test_hf_shapes_order_and_seed(tiny):
    tok, model = tiny
    g = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=16, batch_size=6)
    a = g.generate(PROMPTS, n=3, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=5)
    b = g.generate(PROMPTS, n=3, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=5)
    c = g.generate(PROMPTS, n=3, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=6)
    assert len(a) == len(PROMPTS) and all(len(x) == 3 for x in a)
    assert a == b and a != c
    assert g.stats["generated"] == 3 * 3 * len(PROMPTS) and g.stats["gen_tokens"] > 0
    assert tok.padding_side == "right"   # restored after the call


def test_hf_matches_augment_samples(tiny):
    from hps_exp.augment import augment

    tok, model = tiny

    class Flat:
        def score_batch(self, prompts, responses):
            return list(range(len(responses)))   # all distinct: nothing dropped as tied

    examples = [types.SimpleNamespace(prompt=p, responses=("a", "b"), source=f"x:{i}") for i, p in enumerate(PROMPTS)]
    generator = generation.HFGenerator(model, tok, device="cpu", max_prompt_length=16, batch_size=6, top_k=0)
    got = augment(examples, generator=generator, reward_model=Flat(), n=3, temperature=1.0, top_p=1.0,
                  max_new_tokens=6, seed=2, placeholder=tok.eos_token, keep_original=False, progress=False,
                  dedup=False, stop=())
    new = generation.HFGenerator(model, tok, device="cpu", max_prompt_length=16, batch_size=6, top_k=0).generate(
        PROMPTS, n=3, max_new_tokens=6, temperature=1.0, top_p=1.0, seed=2)
    placeholder = tok.eos_token
    expected = [[t if t.strip() else placeholder for t in texts] for texts in new]
    assert [list(e.responses) for e in got] == expected


def test_bad_arguments_are_named(tiny):
    tok, model = tiny
    g = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=16)
    with pytest.raises(ValueError, match="n=3 samples per prompt need temperature > 0"):
        g.generate(PROMPTS, n=3, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match="backend 'sglang' is not allowed"):
        generation.build_generator("sglang", max_prompt_length=16)
    with pytest.raises(ValueError, match="backend=vllm needs model_dir"):
        generation.build_generator("vllm", max_prompt_length=16)


def fake_vllm(monkeypatch):
    seen = {"llm": None, "params": [], "inputs": None}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw
            seen["params"].append(kw)

    class FakeTok:
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) for c in text]}

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def get_tokenizer(self):
            return FakeTok()

        def generate(self, inputs, params, use_tqdm=True):
            seen["inputs"] = inputs
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"p{i}s{j}", token_ids=[1] * (j + 1))
                                                   for j in range(p.kw["n"])])
                    for i, p in enumerate(params)]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return seen


def test_vllm_argument_mapping(monkeypatch, tmp_path):
    seen = fake_vllm(monkeypatch)
    g = generation.build_generator("vllm", model_dir=tmp_path, max_prompt_length=4, tensor_parallel_size=2,
                                   dtype="bf16", enable_prefix_caching=True, seed=11, top_k=0)
    assert seen["llm"] is None   # lazy: nothing imported or built before the first call
    out = g.generate(["abcdef", "xy"], n=3, max_new_tokens=7, temperature=0.8, top_p=0.9, seed=4)
    assert seen["llm"] == dict(model=str(tmp_path), tensor_parallel_size=2, dtype="bfloat16",
                               enable_prefix_caching=True, gpu_memory_utilization=0.9, seed=11)
    assert out == [["p0s0", "p0s1", "p0s2"], ["p1s0", "p1s1", "p1s2"]]
    assert seen["inputs"] == [{"prompt_token_ids": [ord(c) for c in "cdef"]},   # last 4 tokens kept
                              {"prompt_token_ids": [ord("x"), ord("y")]}]
    p0, p1 = seen["params"]
    assert {k: v for k, v in p0.items() if k != "seed"} == dict(n=3, temperature=0.8, top_p=0.9, top_k=-1,
                                                                 max_tokens=7)
    assert p0["seed"] != p1["seed"] and p0["seed"] == generation.prompt_seed(4, 0)
    assert g.stats["generated"] == 6 and g.stats["gen_tokens"] == 2 * (1 + 2 + 3)
    # greedy: temperature 0 maps to vLLM's greedy (0.0), top_p neutral; trust_remote_code only when set
    g2 = generation.build_generator("vllm", model_dir=tmp_path, max_prompt_length=8, trust_remote_code=True)
    g2.generate(["a"], n=1, max_new_tokens=2, temperature=0.0, top_p=0.5, seed=0)
    assert seen["params"][-1]["temperature"] == 0.0 and seen["params"][-1]["top_p"] == 1.0
    assert seen["llm"]["trust_remote_code"] is True and seen["llm"]["dtype"] == "bfloat16"


def test_vllm_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)   # import vllm -> ImportError
    g = generation.build_generator("vllm", model_dir=tmp_path, max_prompt_length=8)
    with pytest.raises(ImportError, match="needs the vllm package"):
        g.generate(["a"], n=1, max_new_tokens=2, temperature=0.0, top_p=1.0, seed=0)
