"""Every config option composes; bad keys and values fail before any work, naming the key."""
import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from conftest import CONF
from hps_exp import config, pipeline
from hps_exp.config import ConfigError, build

GROUPS = ["loss", "sampler", "dataset", "model", "sft", "trainer", "eval", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_bare_default_composes(compose):
    cfg = compose()
    assert (cfg.loss.name, cfg.sampler.name, cfg.dataset.name, cfg.model.name) == ("dpo", "auto", "synthetic", "tiny")
    config.check_values(cfg)
    pipeline.resolve_auto_sampler(cfg)
    assert cfg.sampler.name == "pair"
    assert build(cfg.loss, "loss").input_kind == "pair"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(compose, group, option):
    cfg = compose([f"{group}={option}"])
    config.check_values(cfg)
    pipeline.resolve_auto_sampler(cfg)
    if group in ("loss", "sampler"):
        obj = build(cfg[group], group)
        assert obj is not None
    if group == "dataset":
        assert cfg.dataset._target_ and cfg.dataset.name


@pytest.mark.parametrize("overrides,sampler", [([], "pair"), (["loss=bt"], "best_worst"), (["loss=pl"], "all"),
                                               (["loss=hps"], "all"), (["loss=hps", "loss.estimator=single"], "hard"),
                                               (["loss=pl", "sampler=uniform"], "uniform")])
def test_auto_sampler_follows_the_loss(compose, overrides, sampler):
    cfg = compose(overrides)
    pipeline.resolve_auto_sampler(cfg)
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
    with pytest.raises(ConfigError, match=r"trainer.schedule='cosinus'.*cosine, linear, constant"):
        config.check_values(cfg)


def test_loss_knob_type_and_name_checked_at_build(compose):
    with pytest.raises(ConfigError, match=r"loss.beta='abc'"):
        build(compose(["loss.beta=abc"]).loss, "loss")
    with pytest.raises(ConfigError, match=r"loss.*framework"):
        build(compose(["loss.framework=foo"]).loss, "loss")
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["loss.betta=0.2"])


def test_incompatible_loss_and_sampler_fail_at_setup(compose):
    with pytest.raises(ConfigError, match="sampler=all"):
        pipeline.setup(compose(["loss=pl", "sampler=pair", "dataset.n_train=20", "dataset.n_test=5"]))


def test_authors_released_preset(compose):
    cfg = compose(["+experiment=hps_released"])
    pipeline.resolve_auto_sampler(cfg)
    assert (cfg.loss.name, cfg.loss.beta, cfg.loss.label_smoothing) == ("dpo", 0.25, 0.1)
    sampler = build(cfg.sampler, "sampler")
    assert [sampler.gamma_at(p) for p in (0.0, 0.2, 0.5, 0.7, 0.9)] == [-5.0, -2.5, 0.0, 2.5, 5.0]
    assert build(cfg.loss, "loss").input_kind == "pair"


def test_transfer_eval_dataset_is_checked(compose, tmp_path):
    with pytest.raises(ConfigError, match=r"eval.dataset='pku'.*pku_safety"):
        pipeline.setup(compose(["eval.dataset=pku", "dataset.n_train=10", "dataset.n_test=3"]))
    with pytest.raises(ConfigError, match=r"nope.jsonl: file not found"):
        pipeline.setup(compose(["eval.dataset=ranked_jsonl", f"+eval.dataset_args.path={tmp_path}/nope.jsonl",
                                "dataset.n_train=10", "dataset.n_test=3"]))
    rows = tmp_path / "ranked.jsonl"
    rows.write_text("".join(
        '{"prompt": "\\n\\nHuman: q%d\\n\\nAssistant:", "responses": [" a", " b", " c"], "rewards": [1, 0, 2]}\n' % i
        for i in range(10)))
    splits, *_ = pipeline.setup(compose(["eval.dataset=ranked_jsonl", f"+eval.dataset_args.path={rows}",
                                         "+eval.dataset_args.test_fraction=0.5", "dataset.n_train=10", "dataset.n_test=3"]))
    assert splits.name == "ranked_jsonl" and len(splits.test) == 5 and len(splits.train) == 10


@pytest.mark.parametrize("override", ["trainer.weight_decay=0.1", "trainer.max_grad_norm=0.5", "sft.lr=1e-3",
                                      "model.n_embd=64", "dataset.seed=1", "seed=2"])
def test_sft_cache_key_covers_what_sft_uses(compose, override):
    assert pipeline.sft_inputs(compose([override])) != pipeline.sft_inputs(compose())


def test_sft_cache_key_ignores_preference_only_knobs(compose):
    assert pipeline.sft_inputs(compose(["trainer.lr=1e-5", "loss=pl"])) == pipeline.sft_inputs(compose())
