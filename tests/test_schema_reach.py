"""Adding a knob is one schema field and one use: every field of the structured config is read somewhere, and
every optimiser field (OptimConfig, which every trained stage takes whole) changes what the Trainer trains."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from hps_exp import config
from hps_exp.config import OptimConfig, RuntimeConfig
from hps_exp.trainer import Trainer
from tests.test_trainer import CPU, fresh, make_epoch, step

PACKAGE = Path(config.__file__).parent
SCHEMA = (config.ModelConfig, config.SFTConfig, OptimConfig, RuntimeConfig, config.TrainerConfig,
          config.EvalConfig, config.LoggerConfig, config.Config)


def _code_outside_config() -> str:
    return "\n".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if p.name != "config.py")


@pytest.mark.parametrize("cls", SCHEMA, ids=lambda c: c.__name__)
def test_every_schema_field_is_read_by_the_code(cls):
    """A field no code reads (as `.name`, `["name"]` or `get("name")`) would be a knob that does nothing."""
    code = _code_outside_config()
    unread = [f.name for f in dataclasses.fields(cls)
              if not re.search(rf"\.{f.name}\b|\[\"{f.name}\"\]|get\(\"{f.name}\"", code)]
    assert not unread, f"{cls.__name__}: no code reads {unread}"


BASE = OptimConfig(lr=0.2, grad_accum=2, warmup_ratio=0.1, schedule="cosine", weight_decay=0.0, max_grad_norm=1.0)
CHANGED = {"lr": 0.05, "grad_accum": 1, "warmup_ratio": 0.5, "schedule": "constant", "weight_decay": 0.5,
           "max_grad_norm": 0.01}


def _trained(optim: OptimConfig) -> torch.Tensor:
    model = fresh()
    Trainer(model, optim, RuntimeConfig(), 3, device=CPU, autocast=None).fit(make_epoch, 8, step)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# on_nonfinite changes the weights only when a step is non-finite, where the default (error) stops the run instead:
# test_trainer's skip tests train through such steps.
ONLY_ON_NONFINITE = {"on_nonfinite"}


def test_every_optimiser_field_changes_the_trained_weights():
    # a new field needs a value here
    assert set(CHANGED) | ONLY_ON_NONFINITE == {f.name for f in dataclasses.fields(OptimConfig)}
    base = _trained(BASE)
    for name, value in CHANGED.items():
        assert not torch.equal(_trained(dataclasses.replace(BASE, **{name: value})), base), name
