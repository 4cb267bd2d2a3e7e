"""Every config option composes; bad keys and values fail before any work, naming the key."""
import pytest
from conftest import CONF
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from hps_exp import app, config, plan
from hps_exp.config import ConfigError, build

GROUPS = ["loss", "sampler", "dataset", "model", "sft", "trainer", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_bare_default_composes(compose):
    cfg = compose()
    assert (cfg.loss.name, cfg.sampler.name, cfg.dataset.name, cfg.model.name) == ("dpo", "auto", "synthetic", "tiny")
    config.check_values(cfg)
    loss_fn, _ = plan.loss_and_sampler(cfg)
    assert cfg.sampler.name == "pair" and loss_fn.input_kind == "pair"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    config.check_values(cfg)
    if group in ("loss", "sampler"):
        loss_fn, sampler = plan.loss_and_sampler(cfg)
        assert type(loss_fn).__module__ == "hps_exp.losses" and type(sampler).__module__ == "hps_exp.samplers"
    if group == "dataset":
        assert cfg.dataset._target_ and cfg.dataset.name


@pytest.mark.parametrize("overrides,sampler", [([], "pair"), (["loss=bt"], "best_worst"), (["loss=pl"], "all"),
                                               (["loss=hps"], "all"), (["loss=hps", "loss.estimator=single"], "hard"),
                                               (["loss=pl", "sampler=uniform"], "uniform")])
def test_auto_sampler_follows_the_loss(compose, overrides, sampler):
    cfg = compose(overrides)
    plan.loss_and_sampler(cfg)
    assert cfg.sampler.name == sampler


def test_unknown_option_lists_the_allowed_ones(compose):
    with pytest.raises(MissingConfigException) as e:
        compose(["loss=foo"])
    assert "foo" in str(e.value) and "dpo" in str(e.value) and "hps" in str(e.value)


def test_wrong_type_names_the_key(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose(["trainer.lr=abc"])
    text = str(e.value) + str(e.value.__cause__)
    assert "trainer.lr" in text or "lr" in text and "abc" in text


def test_typo_key_is_rejected(compose):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose(["trainer.lrr=1"])
    assert "lrr" in str(e.value) + str(e.value.__cause__)


def test_bad_choice_names_key_and_choices(compose):
    cfg = compose(["trainer.schedule=cosinus"])
    with pytest.raises(ConfigError, match=r"trainer\.schedule='cosinus'.*\bcosine, linear, constant\b"):
        config.check_values(cfg)


def test_loss_knob_type_and_name_checked_at_build(compose):
    with pytest.raises(ConfigError, match=r"\bloss\.beta='abc'"):
        build(compose(["loss.beta=abc"]).loss, "loss")
    with pytest.raises(ConfigError, match=r"\bframework\b.*'foo'"):
        build(compose(["loss.framework=foo"]).loss, "loss")
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["loss.betta=0.2"])


def prepare(compose, overrides):
    return app.prepare(compose([*overrides, "dataset.n_train=20", "dataset.n_test=5"]))


def test_incompatible_loss_and_sampler_fail_at_setup(compose):
    with pytest.raises(ConfigError, match=r"\bloss=pl\b.*\bsampler=all\b.*\bsampler=pair\b"):
        prepare(compose, ["loss=pl", "sampler=pair"])


def test_authors_released_preset(compose):
    cfg = compose(["+experiment=hps_released"])
    loss_fn, sampler = plan.loss_and_sampler(cfg)
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.label_smoothing) == ("dpo", 0.25, 0.1)
    # their code: gamma = -5 + 10 i / (M - 1) at i = 20/40/60/80 % of the M rows
    assert [sampler.gamma_at(p) for p in (0.1, 0.3, 0.5, 0.7, 0.9)] == [-5.0, -3.0, -1.0, 1.0, 3.0]
    assert loss_fn.input_kind == "pair" and sampler.gamma_label == "authors(-5->5)"


def test_eval_datasets_are_checked(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"\beval\.datasets\b.*'pku'.*\bpku_safety\b"):
        prepare(compose, ["eval.datasets=[pku]"])
    with pytest.raises(ConfigError, match=r"\bnope\.jsonl\b.*\bnot found\b"):
        prepare(compose, ["eval.datasets=[ranked_jsonl]",
                          f"+eval.dataset_args.ranked_jsonl.path={tmp_path}/nope.jsonl"])
    with pytest.raises(ConfigError, match=r"\beval\.dataset_args\.hh_rlhf\b.*\beval\.datasets\b"):
        prepare(compose, [f"+eval.dataset_args.hh_rlhf.path={tmp_path}/x.jsonl"])
    rows = tmp_path / "ranked.jsonl"
    rows.write_text("".join(
        '{"prompt": "\\n\\nHuman: q%d\\n\\nAssistant:", "responses": [" a", " b", " c"], "rewards": [1, 0, 2]}\n' % i
        for i in range(10)))
    r = prepare(compose, ["eval.datasets=[synthetic,ranked_jsonl]", f"+eval.dataset_args.ranked_jsonl.path={rows}",
                          "+eval.dataset_args.ranked_jsonl.test_fraction=0.5"])
    assert [(s.name, len(s.examples)) for s in r.eval_sets] == [("synthetic", 5), ("ranked_jsonl", 5)]
    assert len(r.train) == 20


@pytest.mark.parametrize("override,key", [
    ("trainer.epochs=-1", "trainer.epochs"), ("trainer.epochs=0", "trainer.epochs"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.grad_accum=0", "trainer.grad_accum"),
    ("trainer.lr=0", "trainer.lr"), ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm"), ("eval.max_prompts=0", "eval.max_prompts"),
    ("eval.top_p=0", "eval.top_p"), ("eval.temperature=-0.1", "eval.temperature"),
    ("model.n_layer=0", "model.n_layer"), ("model.n_head=0", "model.n_head"), ("sft.epochs=-2", "sft.epochs"),
    ("model.n_head=3", "model.n_embd"), ("model.max_length=300", "model.max_length"),
    ("trainer.strategy=zero3", "trainer.strategy"), ("model.dtype=fp8", "model.dtype"),
])
def test_out_of_range_knobs_fail_before_work(compose, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.check_values(compose([override]))


def test_pretrained_model_ignores_built_model_sizes(compose):
    config.check_values(compose(["model=gpt2"]))   # n_layer=0 etc. are unused there


@pytest.mark.parametrize("overrides,match", [
    (["loss=hps", "loss.estimator=single", "loss.gamma=2"], r"\bgamma\b.*\bestimator=single\b"),
    (["loss.framework=ipo", "loss.label_smoothing=0.1"], r"\blabel_smoothing=0\.1\b.*\bframework=ipo\b"),
    (["loss=hps", "loss.estimator=single", "sampler=hard", "sampler.schedule=step", "sampler.gamma=2"],
     r"\bgamma\b.*\bschedule=step\b"),
    (["loss=hps", "loss.estimator=single", "sampler=hard", "sampler.gamma_start=-1"],
     r"\bgamma_start\b.*\bschedule=constant\b"),
    (["loss=pl", "sampler.gamma=2"], r"\bsampler\.gamma\b.*\bsampler=auto\b.*\bsampler=all\b.*\bsampler=hard\b"),
])
def test_knob_that_would_do_nothing_fails(compose, overrides, match):
    with pytest.raises(ConfigError, match=match):
        plan.loss_and_sampler(compose(overrides))


def test_sampler_knobs_pass_through_auto(compose):
    cfg = compose(["loss=hps", "loss.estimator=single", "sampler.gamma=2.5", "sampler.num_negatives=1"])
    _, sampler = plan.loss_and_sampler(cfg)
    assert cfg.sampler.name == "hard" and sampler.gamma == 2.5


def test_reward_model_knobs_reach_the_constructor(compose):
    """reward_model=hf's input_format (its own example model needs "pair") is a real, checked setting."""
    with pytest.raises(ConfigError, match=r"\breward_model\.input_formatt\b"):
        config.check_node(compose(["reward_model=hf", "reward_model.name_or_path=x",
                                   "+reward_model.input_formatt=pair"]).reward_model, "reward_model")
    _, kwargs = config.check_node(compose(["reward_model=hf", "reward_model.name_or_path=x",
                                           "reward_model.input_format=pair"]).reward_model, "reward_model")
    assert kwargs["input_format"] == "pair"
