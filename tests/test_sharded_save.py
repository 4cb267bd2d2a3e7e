"""Saving a model sharded by FSDP2: the gathered full weights go into an unsharded twin (meta-built, no copy),
which saves plain, merged (LoRA) or adapter-only like the unwrapped model, each tied weight once. A one-rank
gloo group in this process (seconds); tests/test_app_distributed.py runs the app with 2 processes."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from hps_exp import batching, models
from hps_exp.config import TrainerConfig
from hps_exp.distributed import World
from hps_exp.trainer import Trainer
from tests.test_models import batch, tiny
from tests.test_wrapped_fast_paths import one_rank_group  # noqa: F401 - fixture


def sharded_trainer(model):
    """A Trainer whose model is sharded by fully_shard as trainer.strategy=fsdp2 does (a fake 2-rank World:
    Trainer.save_pretrained takes the sharded branch; the collectives run on the one-rank group)."""
    from hps_exp.strategies import wrap

    cfg = TrainerConfig(strategy="fsdp2")
    world = World(rank=0, world_size=2)
    world.barrier = lambda: None   # the group has one rank; the save's barrier is the only two-rank call
    trainer = Trainer(model, cfg, cfg, cfg.epochs, device=torch.device("cpu"), autocast=None, world=world)
    trainer.module = wrap(model, cfg, world)
    return trainer


@pytest.mark.parametrize("lora_save", [None, "merged", "adapter"])
def test_fsdp2_save_equals_the_unwrapped_save(one_rank_group, tmp_path, lora_save):  # noqa: F811
    tok, base = tiny()
    model = base
    if lora_save:
        model = models.configure(base, {"lora": {"enabled": True, "r": 4, "alpha": 8}})
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
    plain = copy.deepcopy(model)
    with torch.no_grad():
        expected = batching.sequence_logps(plain, batch(tok))
    kwargs = {"lora_save": lora_save} if lora_save else {}
    models.save(plain, tok, tmp_path / "plain", **kwargs)
    sharded_trainer(model).save_pretrained(tok, tmp_path / "sharded", **kwargs)
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == files
    weights = "adapter_model.safetensors" if lora_save == "adapter" else "model.safetensors"
    a, b = load_file(tmp_path / "plain" / weights), load_file(tmp_path / "sharded" / weights)
    assert a.keys() == b.keys() and "lm_head.weight" not in b   # the tied head is written once, as wte
    assert all(torch.equal(a[k], b[k]) for k in a)
    if lora_save == "adapter":
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(tiny()[1], tmp_path / "sharded")
    else:
        loaded = models.load_saved(tmp_path / "sharded")[1]
    with torch.no_grad():
        assert torch.allclose(batching.sequence_logps(loaded, batch(tok)), expected, atol=1e-4)


def test_a_model_its_config_cannot_rebuild_is_refused_before_training(tmp_path):
    tok, model = tiny()
    model.extra_head = torch.nn.Linear(4, 4)   # added after construction: a twin from the config lacks it
    cfg = TrainerConfig(strategy="fsdp2")
    trainer = Trainer(model, cfg, cfg, cfg.epochs, device=torch.device("cpu"), autocast=None,
                      world=World(rank=0, world_size=2))
    with pytest.raises(models.ModelError, match=r"first difference: extra_head\.bias.*trainer\.strategy=ddp"):
        trainer.fit(lambda epoch, progress: iter(()), 1, lambda m, b: None)
