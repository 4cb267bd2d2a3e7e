"""Issue 19 under torchrun (2 gloo processes): policy-hard negatives (the scoring forward on each prompt's own
rank, the noise drawn for the global batch) and reference-free SimPO rewards give one process's numbers. Slow:
several app runs."""
import json

import pytest
from test_app_distributed import app, max_diff, weights

pytestmark = pytest.mark.slow


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "train"]


@pytest.mark.parametrize("args", [
    ["loss=hps", "loss.estimator=single", "sampler.hardness=policy_reward", "sampler.gamma=2.0"],
    ["loss=lipo", "loss.reward=simpo", "loss.beta=2.0", "loss.margin=0.3"],
])
def test_torchrun_ddp_and_fsdp2_match_one_process(tmp_path, args):
    args = [*args, "trainer.log_every=1"]
    one = app([*args, f"hydra.run.dir={tmp_path}/one", f"cache_dir={tmp_path}/c1"])
    assert one.returncode == 0, one.stderr[-3000:]
    ref = json.loads((tmp_path / "one" / "metrics.json").read_text())
    if "loss.reward=simpo" in args:
        assert "reference" not in one.stdout and ref["run"]["reward_type"] == "simpo"
    train_one = _train_rows(tmp_path / "one")
    assert train_one and all("train/sampler/neg_rank" in r for r in train_one)
    for strategy in ("ddp", "fsdp2"):
        run = tmp_path / strategy
        p = app([*args, f"trainer.strategy={strategy}", f"hydra.run.dir={run}", f"cache_dir={tmp_path}/c2"], nproc=2)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert "x 2 processes" in p.stdout
        assert max_diff(weights(tmp_path / "one"), weights(run)) < 5e-5
        got = json.loads((run / "metrics.json").read_text())["eval"]["synthetic"]["aligned"]
        for key in ("reward_margin", "reward_margin_hardest"):
            assert got[key] == pytest.approx(ref["eval"]["synthetic"]["aligned"][key], abs=1e-5)
        train = _train_rows(run)
        assert [r["step"] for r in train] == [r["step"] for r in train_one]
        for a, b in zip(train_one, train):   # the same negatives drawn (their mean score rank) and losses
            assert b["train/sampler/neg_rank"] == pytest.approx(a["train/sampler/neg_rank"], abs=1e-9)
            assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-5)
