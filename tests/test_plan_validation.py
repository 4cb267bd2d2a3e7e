"""Hyperparameters are tuned on validation prompts carved from the training prompts (eval.validation_prompts,
eval.split=validation), and the trainer.seed repeats training on one shared pipeline."""
import pytest

from hps_exp import app, plan
from hps_exp.config import ConfigError

SMALL = ["dataset.n_train=24", "dataset.n_test=8"]


def test_validation_prompts_leave_training_and_are_the_same_for_tuning_and_final_runs(compose):
    tune = app.prepare(compose([*SMALL, "eval.validation_prompts=6", "eval.split=validation"]))
    final = app.prepare(compose([*SMALL, "eval.validation_prompts=6", "eval.split=test", "seed=3"]))
    plain = app.prepare(compose(SMALL))
    (val,) = tune.eval_sets
    assert val.name == "validation" and len(val.examples) == 6
    assert len(tune.train) == len(plain.train) - 6
    trained = {e.prompt for e in tune.train.items}
    assert not trained & {e.prompt for e in val.examples.items}   # never trained on
    assert tune.train.key == final.train.key                      # one split whatever the seed and eval split
    assert [s.name for s in final.eval_sets] == [s.name for s in plain.eval_sets]   # the test split, unchanged


@pytest.mark.parametrize("args", [["eval.split=validation"], ["eval.validation_prompts=100"]])
def test_validation_without_prompts_or_with_too_many_is_refused(compose, args):
    with pytest.raises(ConfigError, match="eval.validation_prompts"):
        app.prepare(compose([*SMALL, *args]))


def test_trainer_seed_seeds_training_and_evaluation_only(compose):
    cfg = compose([*SMALL, "seed=1", "trainer.seed=5"])
    p = plan.make_plan(cfg, app.prepare(cfg).loss_fn)
    assert (p.sft.seed, p.preference.seed, p.eval.seed) == (1, 5, 5)
    assert plan.training_seed(compose([*SMALL, "seed=2"])) == 2
