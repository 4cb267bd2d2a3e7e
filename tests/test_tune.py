"""hps_exp.tune: per-method hyperparameters chosen on the validation split of a tuning sweep."""
import pytest

from hps_exp import tune
from hps_exp.tables import collect_runs
from tests.test_tables import write_job


def job(method, seed, beta, lr, reward, split="validation"):
    run = {"method": method, "seed": seed, "eval_split": split}
    return {"status": "completed", "run": run, "eval": {split: {"aligned": {"reward": reward}}}}


def make_sweep(root, split="validation"):
    # DPO-BT: beta 0.5 wins on the mean over seeds although beta 0.1 has the single best job
    grid = {("DPO-BT", "0.1", "1e-5"): [3.0, 0.0], ("DPO-BT", "0.5", "1e-5"): [2.0, 2.0],
            ("DPO-HPS", "0.1", "1e-5"): [1.0, 1.2], ("DPO-HPS", "0.1", "5e-5"): [1.5, 1.1]}
    num = 0
    for (method, beta, lr), rewards in grid.items():
        for seed, reward in enumerate(rewards):
            write_job(root / str(num), job(method, seed, beta, lr, reward, split),
                      [f"loss.beta={beta}", f"trainer.lr={lr}", f"trainer.seed={seed}"])
            num += 1
    return root


def test_best_mean_over_seeds_per_method(tmp_path, capsys):
    chosen = tune.choose(collect_runs([make_sweep(tmp_path / "s")]), ["loss.beta", "trainer.lr"], "reward")
    assert chosen["DPO-BT"]["best"] == ("0.5", "1e-5") and chosen["DPO-BT"]["means"][("0.1", "1e-5")] == (1.5, 2)
    assert chosen["DPO-HPS"]["best"] == ("0.1", "5e-5")
    assert tune.main([str(tmp_path / "s"), "--keys", "loss.beta", "trainer.lr"]) == 0
    assert "DPO-BT: [loss.beta=0.5, trainer.lr=1e-5]" in capsys.readouterr().out


def test_jobs_evaluated_on_test_prompts_are_refused(tmp_path):
    with pytest.raises(tune.TuneError, match="eval.split=validation"):
        tune.choose(collect_runs([make_sweep(tmp_path / "s", split="test")]), ["loss.beta"], "reward")


def test_a_metric_no_job_reports_names_those_they_do(tmp_path):
    with pytest.raises(tune.TuneError, match=r"validation\.aligned\.bleu\b.*reward$"):
        tune.choose(collect_runs([make_sweep(tmp_path / "s")]), ["loss.beta"], "bleu")


BASE = """# the final sweep (test prompts)
description: two arms
requires: [dataset.path]
arms:
  BT: [loss=bt]
  HPS: [loss=hps, loss.beta=0.3]
fixed:
  - trainer.epochs=1
  - eval.split=test
"""


def make_arm_sweep(root):
    """make_sweep's jobs laid out as the sweep runner does: <jobs dir>/<arm>/<k>."""
    flat = make_sweep(root / "flat")
    for job in sorted(flat.iterdir()):
        arm = {"DPO-BT": "BT", "DPO-HPS": "HPS"}[collect_runs([job])[0].method]
        (root / arm).mkdir(exist_ok=True)
        job.rename(root / arm / job.name)
    flat.rmdir()
    return root


def test_the_final_sweep_is_the_base_with_each_arms_chosen_values(tmp_path):
    from hps_exp import sweep

    (tmp_path / "base.yaml").write_text(BASE)
    rewards = {("BT", "DPO-BT"): {"0.1": 1.0, "0.5": 2.0}, ("HPS", "DPO-HPS"): {"0.1": 3.0, "0.5": 1.0}}
    for (arm, method), by_beta in rewards.items():   # every arm on the same grid: beta x lr 1e-5, 5e-5
        for k, (beta, lr) in enumerate((b, lr) for b in by_beta for lr in ("1e-5", "5e-5")):
            write_job(tmp_path / "tune" / arm / str(k), job(method, 0, beta, lr, by_beta[beta] + (lr == "5e-5")),
                      [f"loss.beta={beta}", f"trainer.lr={lr}"])
    out = tmp_path / "tuned.yaml"
    assert tune.main([str(tmp_path / "tune"), "--keys", "loss.beta", "trainer.lr",
                      "--write-sweep", str(tmp_path / "base.yaml"), str(out)]) == 0
    tuned, base = sweep.load(str(out)), sweep.load(str(tmp_path / "base.yaml"))
    assert tuned.fixed == base.fixed and tuned.requires == base.requires
    # the chosen beta replaces the arm's own (in its place); lr is appended
    assert tuned.arms == {"BT": ["loss=bt", "loss.beta=0.5", "trainer.lr=5e-5"],
                          "HPS": ["loss=hps", "loss.beta=0.1", "trainer.lr=5e-5"]}
    assert out.read_text().startswith("# GENERATED from sweeps/base.yaml")


def write_sweep_from(tmp_path, tuning_dir: str) -> int:
    """tune --write-sweep over make_arm_sweep's jobs (under tmp_path/tune) read from `tuning_dir`."""
    (tmp_path / "base.yaml").write_text(BASE)
    make_arm_sweep(tmp_path / "tune")
    return tune.main([str(tmp_path / tuning_dir), "--keys", "loss.beta", "trainer.lr",
                      "--write-sweep", str(tmp_path / "base.yaml"), str(tmp_path / "tuned.yaml")])


def test_an_arm_without_tuning_jobs_is_refused_naming_it(tmp_path, capsys):
    assert write_sweep_from(tmp_path, "tune/BT") == 2
    assert "arm 'HPS' of base.yaml has no tuning jobs" in capsys.readouterr().err
    assert not (tmp_path / "tuned.yaml").exists()


def test_an_arm_missing_a_grid_point_is_refused(tmp_path, capsys):
    """DPO-HPS was tuned at lr 1e-5 and 5e-5 with beta 0.1; DPO-BT at beta 0.1 and 0.5 with lr 1e-5: unequal."""
    assert write_sweep_from(tmp_path, "tune") == 2
    assert "has no completed tuning job at" in capsys.readouterr().err
