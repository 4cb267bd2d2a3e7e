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
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelError, match="trainer.device=auto"):
            models.pick_device("cuda")
