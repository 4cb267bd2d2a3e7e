"""The shared trainer: accumulation, schedule, checkpoint + resume reproduce an uninterrupted run."""
import numpy as np
import pytest
import torch

from hps_exp.checkpoint import load_checkpoint
from hps_exp.config import TrainerConfig
from hps_exp.trainer import Trainer, lr_lambda

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
    return TrainerConfig(**{"lr": 0.2, "epochs": 3, "grad_accum": 2, "warmup_ratio": 0.1, "log_every": 1, **kw})


CPU = torch.device("cpu")


def loop(c: TrainerConfig) -> tuple:
    """Trainer's (optim, runtime, epochs, max_steps) from one flat TrainerConfig (it is both parts)."""
    return c, c, c.epochs, c.max_steps


def test_training_reduces_loss_and_counts_steps():
    model = fresh()
    before = step(model, (X, Y))[0].item()
    out = Trainer(model, *loop(cfg()), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, step)
    assert out["steps"] == 3 * 4  # 8 micro-batches / 2 accumulated, 3 epochs
    assert step(model, (X, Y))[0].item() < 0.2 * before


def _crash_after_checkpoint(tmp_path, sleep=0.0, model=fresh, **run_identity):
    """Trains 8-step epochs with save_every=5 and dies in the 6th step: the step-5 checkpoint is left in tmp_path/ckpt.
    `run_identity` (key=, record=) goes to the Trainer as given."""
    import time

    class Crash(Exception):
        pass

    calls = 0

    def crashing_step(model, batch):   # dies in the 6th optimizer step, after the step-5 checkpoint
        nonlocal calls
        calls += 1
        if calls == 11:
            raise Crash
        time.sleep(sleep)
        return step(model, batch)

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        Trainer(model(), *loop(cfg(save_every=5)), device=torch.device("cpu"), autocast=None, checkpoint=ckpt,
                **run_identity).fit(make_epoch, 8, crashing_step)
    return ckpt


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    full = fresh()
    Trainer(full, *loop(cfg()), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, step)
    ckpt = _crash_after_checkpoint(tmp_path)
    assert ckpt.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left
    probe = fresh()
    assert load_checkpoint(ckpt, probe, torch.optim.AdamW(probe.parameters())) == 5
    resumed = fresh()  # a new process would start from scratch and find the checkpoint
    out = Trainer(resumed, *loop(cfg()), device=CPU, autocast=None, checkpoint=ckpt).fit(make_epoch, 8, step)
    assert out["steps"] == 12
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


class Adapted(torch.nn.Module):
    """A frozen base (a LoRA run's pretrained weights) plus a trainable adapter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base, self.adapter = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1, bias=False)
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.adapter(x)


def test_a_checkpoint_holds_the_trainable_weights_only_and_resumes_exactly(tmp_path):
    """A LoRA checkpoint left the frozen base weights out (they were ~90 % of a SmolLM2 one): the resumed run rebuilds
    them as built and ends where the uninterrupted run ends; a checkpoint lacking a trainable weight is refused."""
    import torch.distributed.checkpoint as dcp

    from hps_exp.checkpoint import save_checkpoint
    from hps_exp.distributed import World

    full = Adapted()
    Trainer(full, *loop(cfg()), device=CPU, autocast=None).fit(make_epoch, 8, step)
    ckpt = _crash_after_checkpoint(tmp_path, model=Adapted)
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert "model.adapter.weight" in saved and not any(k.startswith("model.base") for k in saved)
    resumed = Adapted()
    Trainer(resumed, *loop(cfg()), device=CPU, autocast=None, checkpoint=ckpt).fit(make_epoch, 8, step)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

    frozen_adapter = Adapted()   # trained with the adapter frozen too: its checkpoint has no adapter weight
    frozen_adapter.adapter.requires_grad_(False)
    frozen_adapter.base.requires_grad_(True)
    opt = torch.optim.AdamW(p for p in frozen_adapter.parameters() if p.requires_grad)
    save_checkpoint(tmp_path / "other", frozen_adapter, opt, 1, World(device=CPU))
    probe = Adapted()
    with pytest.raises(BaseException) as refused:   # torch's CheckpointException is a BaseException
        load_checkpoint(tmp_path / "other", probe, torch.optim.AdamW(p for p in probe.parameters() if p.requires_grad))
    assert "Missing key in checkpoint state_dict: model.adapter.weight" in str(refused.value)


def test_lr_schedules():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert f(0) < f(1) < f(2) == 1.0 and abs(f(10)) < 1e-9
    g = lr_lambda("linear", warmup=0, total=10)
    assert g(5) == 0.5
    assert lr_lambda("constant", 0, 10)(7) == 1.0


# ---------------------------------------------------------------- reliability: non-finite, weighting, signals

class Rows:
    """A micro-batch that names its source rows and its loss weight (its number of prompts)."""

    def __init__(self, x, y, sources, weight=None):
        self.x, self.y, self.sources = x, y, sources
        if weight is not None:
            self.weight = weight


def poisoned_epoch(bad_batch):
    def make(epoch, progress):
        for k, (x, y) in enumerate(make_epoch(epoch, progress)):
            if k == bad_batch:
                y = y.clone()
                y[0] = float("nan")
            yield Rows(x, y, [f"data.jsonl:{8 * k + i + 1}" for i in range(len(x))])
    return make


def rows_step(model, batch):
    return step(model, (batch.x, batch.y))


def test_nonfinite_loss_raises_naming_step_and_rows():
    from hps_exp.trainer import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"\bstep 2\b.*\bloss\b.*\bdata\.jsonl:9\b.*\bdata\.jsonl:10\b"):
        Trainer(fresh(), *loop(cfg(grad_accum=1)), device=torch.device("cpu"), autocast=None).fit(
            poisoned_epoch(1), 8, rows_step)  # micro-batch 1 of epoch 0 -> step 2 (accum 1)


def test_nonfinite_skip_counts_and_leaves_parameters_finite():
    class Log:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append((step, metrics))

    log = Log()
    model = fresh()
    out = Trainer(model, *loop(cfg(grad_accum=1, on_nonfinite="skip")), device=torch.device("cpu"), autocast=None,
                  logger=log).fit(poisoned_epoch(1), 8, rows_step)
    assert out["steps"] == 24 and out["nonfinite_skipped"] == 3.0   # one bad batch per epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # steps 2, 10, 18 are the poisoned ones (8 steps per epoch)
    assert [m.get("train/nonfinite_skipped", 0.0) for s, m in log.rows if s in (1, 2, 9, 10)] == [0, 1, 1, 2]


def test_loss_weighted_by_prompts_equals_the_mean_over_prompts():
    """Two accumulated micro-batches of 3 and 1 prompts: one step equals a step on the 4 prompts' mean."""
    x, y = X[:4], Y[:4]
    a, b = fresh(), fresh()
    uneven = lambda e, p: iter([Rows(x[:3], y[:3], [], 3), Rows(x[3:], y[3:], [], 1)])  # noqa: E731
    whole = lambda e, p: iter([Rows(x, y, [], 4)])  # noqa: E731
    c = dict(epochs=1, warmup_ratio=0.0, max_grad_norm=1e9, schedule="constant")
    Trainer(a, *loop(cfg(grad_accum=2, **c)), device=torch.device("cpu"), autocast=None).fit(uneven, 2, rows_step)
    Trainer(b, *loop(cfg(grad_accum=1, **c)), device=torch.device("cpu"), autocast=None).fit(whole, 1, rows_step)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    assert not torch.allclose(a.weight, fresh().weight)


def test_resume_rewinds_the_logger(tmp_path):
    class Log:
        rewound = None

        def log(self, metrics, step):
            pass

        def rewind(self, stage, step):
            self.rewound = (stage, step)

    ckpt = tmp_path / "ckpt"
    Trainer(fresh(), *loop(cfg(max_steps=5)), device=torch.device("cpu"), autocast=None, checkpoint=ckpt).fit(
        make_epoch, 8, step)
    log = Log()
    Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None, logger=log, stage="sft",
            checkpoint=ckpt).fit(make_epoch, 8, step)
    assert log.rewound == ("sft", 5)


SIGNAL_WORKER = r"""
import sys, time, torch
sys.path.insert(0, {root!r})
from tests.test_trainer import make_epoch, step, fresh, cfg, loop
from hps_exp.trainer import Trainer, TrainingInterrupted
from pathlib import Path
ckpt, out, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
calls = 0
def slow_step(model, batch):
    global calls
    calls += 1
    if calls == 7:                 # inside optimiser step 4 (2 micro-batches per step)
        marker.write_text("go")    # the parent sends the signal now, in the middle of the step
        time.sleep(3)
    return step(model, batch)
model = fresh()
try:
    Trainer(model, *loop(cfg()), device=torch.device("cpu"), autocast=None,
            checkpoint=ckpt).fit(make_epoch, 8, slow_step)
except TrainingInterrupted as e:
    print("INTERRUPTED", e.step, flush=True)
    sys.exit(3)
torch.save(model.state_dict(), out)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_the_rerun_resumes(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "worker.py"
    script.write_text(SIGNAL_WORKER.format(root=root))
    ckpt, out, marker = tmp_path / "ckpt", tmp_path / "final.pt", tmp_path / "marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HPS_EXP_NO_PROGRESS": "1"}
    args = [sys.executable, str(script), str(ckpt), str(out), str(marker)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[0]
    proc.send_signal(getattr(signal, sig))
    text = proc.communicate(timeout=60)[0]
    assert proc.returncode == 3 and "INTERRUPTED 4" in text, text
    probe = fresh()
    assert load_checkpoint(ckpt, probe, torch.optim.AdamW(probe.parameters())) == 4
    assert not out.exists()
    marker.unlink()
    rerun = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout
    assert "resumed from" in rerun.stdout and "at step 4/12" in rerun.stdout
    full = fresh()
    Trainer(full, *loop(cfg()), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, step)
    final = torch.load(out, weights_only=True)
    for k, v in full.state_dict().items():
        assert torch.allclose(v, final[k], atol=1e-6)


def test_strategy_choice_is_checked():
    from hps_exp.distributed import DistributedError, World
    from hps_exp.strategies import decoder_block_classes, wrap

    with pytest.raises(DistributedError, match=r"\b2 processes\b.*\btrainer\.strategy=none\b"):
        wrap(fresh(), cfg(strategy="none"), World(rank=0, world_size=2))
    with pytest.raises(ValueError, match=r"\btrainer\.strategy='zero3'"):
        wrap(fresh(), cfg(strategy="zero3"), World())
    one = fresh()
    assert wrap(one, cfg(strategy="fsdp2"), World()) is one   # one process: nothing to shard or sync
    with pytest.raises(ValueError, match=r"\b_no_split_modules\b"):
        decoder_block_classes(fresh())
    with pytest.raises(ValueError, match=r"\btrainer\.on_nonfinite='ignore'"):
        Trainer(fresh(), *loop(cfg(on_nonfinite="ignore")), device=CPU, autocast=None).fit(make_epoch, 8, step)


# ---------------------------------------------------------------- issue 18: a checkpoint resumes only its own run



def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    from hps_exp.checkpoint import CheckpointMismatch

    ckpt = _crash_after_checkpoint(tmp_path, key="k1", record={"config": {"lr": 0.2, "loss": "dpo"}})
    other = Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None, checkpoint=ckpt, key="k2",
                    record={"config": {"lr": 0.01, "loss": "pl"}})
    with pytest.raises(CheckpointMismatch, match=r"\bconfig\.loss\b.*'dpo'.*'pl'.*\bconfig\.lr\b.*\b0\.2\b.*\b0\.01\b"):
        other.fit(make_epoch, 8, step)
    # trainer.resume=false starts afresh instead (and replaces the checkpoint)
    out = Trainer(fresh(), *loop(cfg(resume=False)), device=CPU, autocast=None, checkpoint=ckpt, key="k2",
                  record={"config": {"lr": 0.01}}).fit(make_epoch, 8, step)
    assert out["steps"] == 12
    same = Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None, checkpoint=ckpt, key="k2")
    same.fit(make_epoch, 8, step)
    assert same.step == 12


def test_a_resumed_stage_keeps_the_time_of_the_steps_before(tmp_path):
    per_call = 0.05
    ckpt = _crash_after_checkpoint(tmp_path, sleep=per_call, key="k1", record={"config": {"lr": 0.2}})
    # 5 steps x 2 micro-batches saved
    import time

    def slow_step(model, batch):
        time.sleep(per_call)
        return step(model, batch)

    out = Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None, checkpoint=ckpt, key="k1",
                  record={"config": {"lr": 0.2}}).fit(make_epoch, 8, slow_step)
    assert out["steps"] == 12
    assert out["seconds"] >= 12 * 2 * per_call * 0.95          # all 12 steps, not only the 7 after the resume


def test_a_damaged_checkpoint_is_named(tmp_path):
    from hps_exp.checkpoint import CheckpointDamaged

    ckpt = _crash_after_checkpoint(tmp_path, key="k1", record={"config": {"lr": 0.2}})
    data = next(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:50])
    with pytest.raises(CheckpointDamaged, match=r"/ckpt\b.*\btrainer\.resume=false\b"):
        Trainer(fresh(), *loop(cfg()), device=torch.device("cpu"), autocast=None, checkpoint=ckpt, key="k1",
                record={"config": {"lr": 0.2}}).fit(make_epoch, 8, step)


# ---------------------------------------------------------------- issue 17: dtype honesty, CUDA RNG in checkpoints

def test_pure_bf16_at_a_small_lr_is_refused_before_the_first_step():
    """A 1e-6 step leaves ~98 % of N(0, 0.02) bf16 weights unchanged: training would stall silently."""
    from hps_exp.trainer import stalled_fraction

    torch.manual_seed(0)
    w = torch.nn.Parameter((torch.randn(200_000) * 0.02).bfloat16())
    assert 0.97 < stalled_fraction([w], 1e-6) < 0.99        # the figure of docs/scaling.md
    assert stalled_fraction([w], 1e-3) == 0.0
    assert stalled_fraction([w.detach().float().requires_grad_()], 1e-9) == 0.0   # fp32 masters move
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    before = model.weight.detach().clone()
    refused = r"\btrainer\.lr=1e-06\b.*\b9\d\.\d ?%.*\bmodel\.dtype=fp32\b.*\btrainer\.precision=bf16\b"
    with pytest.raises(ValueError, match=refused):
        Trainer(model, *loop(cfg(lr=1e-6)), device=torch.device("cpu"), autocast=None).fit(make_epoch, 8, step)
    assert torch.equal(model.weight, before)
    with pytest.raises(ValueError, match=r"\bsft\.lr=1e-06\b"):
        Trainer(model, *loop(cfg(lr=1e-6)), device=CPU, autocast=None, stage="sft").fit(make_epoch, 8, step)


def test_a_checkpoint_keeps_and_restores_the_cuda_rng_state_on_cuda(tmp_path, monkeypatch):
    """On CUDA the dropout masks come from the CUDA generator: a resumed stage must get it back. (No GPU here: the
    CUDA generator is a fake; what is checked is that the trainer saves and restores it.)"""
    from hps_exp.checkpoint import save_checkpoint
    from hps_exp.distributed import World

    cuda = torch.device("cuda", 0)
    state = {"now": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: state["now"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, device=None: state.update(now=value.clone()))
    model = fresh()
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "ck", model, opt, 3, World(device=cuda))
    saved = state["now"].clone()
    state["now"] = torch.zeros(16, dtype=torch.uint8)
    assert load_checkpoint(tmp_path / "ck", model, opt, cuda) == 3
    assert torch.equal(state["now"], saved)
    state["now"] = torch.zeros(16, dtype=torch.uint8)
    save_checkpoint(tmp_path / "cpu", model, opt, 4, World())   # a CPU checkpoint resumed on CUDA: kept as is
    assert load_checkpoint(tmp_path / "cpu", model, opt, cuda) == 4 and not state["now"].any()
