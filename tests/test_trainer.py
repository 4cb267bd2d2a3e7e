"""The shared trainer: accumulation, schedule, checkpoint + resume reproduce an uninterrupted run."""
import numpy as np
import pytest
import torch

from hps_exp.trainer import TrainConfig, Trainer, lr_lambda

X = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


def make_epoch(epoch, progress):
    order = np.random.default_rng([0, epoch]).permutation(len(X))
    for start in range(0, len(X), 8):
        idx = torch.as_tensor(order[start:start + 8])
        yield X[idx], Y[idx]


def step(model, batch):
    x, y = batch
    return ((model(x).squeeze(-1) - y) ** 2).mean(), {}


def fresh():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def cfg(**kw):
    return TrainConfig(**{"lr": 0.2, "epochs": 3, "grad_accum": 2, "warmup_ratio": 0.1, "log_every": 1, **kw})


def test_training_reduces_loss_and_counts_steps():
    model = fresh()
    before = step(model, (X, Y))[0].item()
    out = Trainer(model, cfg(), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, step)
    assert out["steps"] == 3 * 4  # 8 micro-batches / 2 accumulated, 3 epochs
    assert step(model, (X, Y))[0].item() < 0.2 * before


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    full = fresh()
    Trainer(full, cfg(), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, step)

    class Crash(Exception):
        pass

    calls = 0

    def crashing_step(model, batch):  # dies in the 6th optimizer step, after the step-5 checkpoint
        nonlocal calls
        calls += 1
        if calls == 11:
            raise Crash
        return step(model, batch)

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Crash):
        Trainer(fresh(), cfg(save_every=5), device=torch.device("cpu"), autocast=None,
                checkpoint=ckpt).fit(make_epoch, 8, crashing_step)
    assert ckpt.exists() and not list(tmp_path.glob("*.tmp"))
    assert torch.load(ckpt, weights_only=False)["step"] == 5
    resumed = fresh()  # a new process would start from scratch and find the checkpoint
    out = Trainer(resumed, cfg(), device=torch.device("cpu"), autocast=None, checkpoint=ckpt).fit(make_epoch, 8, step)
    assert out["steps"] == 12
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_lr_schedules():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert f(0) < f(1) < f(2) == 1.0 and abs(f(10)) < 1e-9
    g = lr_lambda("linear", warmup=0, total=10)
    assert g(5) == 0.5
    assert lr_lambda("constant", 0, 10)(7) == 1.0
