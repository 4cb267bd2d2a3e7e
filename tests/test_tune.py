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
