"""Model loading: a hub id that cannot be reached gives an actionable message, not a stack trace."""
import pytest
import torch
from omegaconf import OmegaConf

from hps_exp import models


def test_offline_hub_model_says_how_to_use_a_local_copy():
    with pytest.raises(models.ModelError, match=r"model.name_or_path=/path/to/model_dir"):
        models.load_pretrained("gpt2")


def test_tiny_model_is_seeded_and_round_trips(tmp_path):
    tok = models.train_tokenizer(["hello world, how are you?"] * 10, vocab_size=300)
    cfg = OmegaConf.create({"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32})
    a, b = models.build_tiny(cfg, len(tok), seed=3), models.build_tiny(cfg, len(tok), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert tok.decode(tok("hello world, how are you?")["input_ids"]) == "hello world, how are you?"
    models.save(a, tok, tmp_path / "m")
    tok2, c = models.load_saved(tmp_path / "m")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert tok2.eos_token_id == tok.eos_token_id == tok2.pad_token_id


def test_device_and_precision_choice():
    assert models.pick_device("cpu").type == "cpu"
    assert models.autocast_dtype("auto", torch.device("cpu")) is None
    assert models.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert models.autocast_dtype("fp32", torch.device("cuda")) is None
    assert models.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_cpu_uses_native_bf16_for_pretrained_models(monkeypatch, native):
    """trainer.precision=auto on CPU: bf16 autocast only where the CPU has bf16 in hardware and the model is a
    pretrained one; the tiny model built from config stays fp32 (the embedded default's numbers)."""
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    dtype, why = models.resolve_precision("auto", cpu, pretrained=True)
    assert dtype is (torch.bfloat16 if native else None)
    assert ("native bf16" in why) if native else ("no native bf16" in why)
    assert models.resolve_precision("auto", cpu, pretrained=False)[0] is None
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelError, match="trainer.device=auto"):
            models.pick_device("cuda")


# ---------------------------------------------------------------- dtype, LoRA, saving

def tiny(tmp_path=None, **extra):
    tok = models.train_tokenizer(["hello world, how are you? fine thanks"] * 10, vocab_size=300)
    cfg = OmegaConf.create({"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64, **extra})
    model = models.build_tiny(cfg, len(tok), seed=0)
    models.disable_dropout(model)
    return tok, model


def batch(tok):
    from hps_exp import batching

    prompt = tok("hello world,", add_special_tokens=False)["input_ids"]
    resp = tok(" how are you?", add_special_tokens=False)["input_ids"]
    resp2 = tok(" fine thanks", add_special_tokens=False)["input_ids"]
    return batching.collate([(prompt, resp), (prompt, resp2)], tok.pad_token_id)


def test_lora_training_step_changes_only_adapter_weights(tmp_path):
    from hps_exp import batching

    tok, base = tiny()
    model = models.configure(base, OmegaConf.create({"lora": {"enabled": True, "r": 4, "alpha": 8}}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):   # step 1 moves B off zero, step 2 moves A too
        batching.sequence_nll(model, batch(tok)).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_lora_saving_merged_or_adapter_only(tmp_path, mode):
    from hps_exp import batching

    tok, base = tiny()
    model = models.configure(base, OmegaConf.create({"lora": {"enabled": True, "r": 4, "alpha": 8}}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
        expected = batching.sequence_logps(model, batch(tok))
    out = tmp_path / "policy"
    models.save(model, tok, out, lora_save=mode)
    names = sorted(p.name for p in out.iterdir())
    assert not list(tmp_path.glob(".policy*"))   # temp dir renamed away
    if mode == "merged":
        assert "model.safetensors" in names and "adapter_config.json" not in names
        _, loaded = models.load_saved(out)
    else:
        from peft import PeftModel

        assert "adapter_model.safetensors" in names and "model.safetensors" not in names
        _, fresh_base = tiny()
        loaded = PeftModel.from_pretrained(fresh_base, out)
    assert models.is_lora(model)   # merging for the save left the live model's adapters in place
    with torch.no_grad():
        assert torch.allclose(batching.sequence_logps(loaded, batch(tok)), expected, atol=1e-4)


def test_bad_lora_settings_are_named():
    with pytest.raises(models.ModelError, match=r"model\.lora\.rank is not a LoRA setting"):
        models.lora_settings({"enabled": True, "rank": 4})
    with pytest.raises(models.ModelError, match=r"model\.lora\.save='full'"):
        models.lora_settings({"save": "full"})


def test_dtype_attention_and_remote_code_reach_from_pretrained(tmp_path, monkeypatch):
    tok, model = tiny()
    models.save(model, tok, tmp_path / "m")
    tok2, m = models.load_pretrained(str(tmp_path / "m"), dtype="bf16", attn_implementation="eager")
    assert m.dtype == torch.bfloat16 and m.config._attn_implementation == "eager"
    seen = {}
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    models.load_pretrained(str(tmp_path / "m"))
    assert "trust_remote_code" not in seen and seen["dtype"] == torch.float32
    models.load_pretrained(str(tmp_path / "m"), trust_remote_code=True)
    assert seen["trust_remote_code"] is True
    with pytest.raises(models.ModelError, match=r"model\.dtype='fp16'"):
        models.torch_dtype("fp16")


def test_gradient_checkpointing_gives_the_same_gradients():
    from hps_exp import batching

    grads = []
    for ckpt in (False, True):
        tok, m = tiny()
        m = models.configure(m, OmegaConf.create({"gradient_checkpointing": ckpt}))
        m.train()
        batching.sequence_nll(m, batch(tok)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert getattr(m, "is_activation_checkpointing", None) or m.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
