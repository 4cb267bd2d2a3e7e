"""Stage cache keys are derived, never hand-kept: every config knob and every input byte changes exactly the
stages that depend on it (checked through the app's own dry run), and a data file replaced in place misses."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from hps_exp import app, stages
from hps_exp.cache import clean_stale
from hps_exp.config import OptimConfig, RuntimeConfig

BASE = ["reward_model=train", "augment=sample", "dataset.n_train=24", "dataset.n_test=8"]
ALL = {"sft", "reward_model", "augment", "reference#0", "preference", "reference#1", "sft_eval", "eval"}
POLICY = {"preference", "eval"}
NONE: set = set()

# What a change of each knob must rebuild (with reward_model=train, augment=sample, one eval set).
EXPECTED = {
    "trainer.seed": {"preference", "sft_eval", "eval"},   # the shared pipeline (SFT, RM, augmentation) stays
    "eval.validation_prompts": ALL,                        # the held-out prompts leave the training data
    # reward=simpo needs no reference (both reference stages go) and the SFT policy's margins become its own
    "loss.reward": {"reference#0", "reference#1", "sft_eval", "preference", "eval"},
    "loss.": POLICY, "trainer.batch_size": POLICY, "trainer.lr": POLICY, "trainer.epochs": POLICY,
    "trainer.resample": POLICY, "trainer.max_steps": POLICY, "trainer.bucketing": POLICY,
    "dataset.n_test": {"reference#1", "sft_eval", "eval"},
    "dataset.stop": {"augment", "reference#0", "preference", "sft_eval", "eval"},   # not the data: what is generated
    "dataset.": ALL, "model.gradient_checkpointing": NONE, "model.lora.enabled": POLICY,
    "model.lora.": NONE,  # LoRA is off: its knobs change nothing (with it on, they change the policy)
    "model.": ALL, "sft.": ALL,
    "seed": ALL,
    "trainer.grad_accum": ALL, "trainer.warmup_ratio": ALL, "trainer.schedule": ALL, "trainer.weight_decay": ALL,
    "trainer.max_grad_norm": ALL, "trainer.on_nonfinite": ALL,   # a skipped step changes the weights
    "reward_model.lora.enabled": {"reward_model", "augment", "reference#0", "preference", "eval"},
    "reward_model.lora.": NONE,   # LoRA is off: its knobs change nothing
    "reward_model.": {"reward_model", "augment", "reference#0", "preference", "eval"},
    "augment.": {"augment", "reference#0", "preference", "eval"},
    "eval.": {"sft_eval", "eval"},
    "trainer.": NONE, "logger.": NONE, "run_name": NONE, "label": NONE, "sweep": NONE, "cache_dir": NONE,
}
# A valid different value where "+1 / flip / x0.5" would not be one.
CHANGE = {
    "loss.framework": "ipo", "loss.reward": "simpo", "loss.pairs": "best_worst", "loss.label_smoothing": 0.1,
    "sft.targets": "best",
    "model.n_head": 8, "model.n_embd": 64, "model.max_length": 120, "model.dtype": "bf16",
    "model.attn_implementation": "eager", "reward_model.n_head": 8, "reward_model.n_embd": 64,
    "reward_model.pairs": "chosen_rejected", "reward_model.subset": "half_a",
    "reward_model.lora.target_modules": "c_attn", "augment.top_p": 0.9, "dataset.n_responses": 6,
    "trainer.schedule": "linear", "trainer.resample": "step", "trainer.max_steps": 5, "trainer.device": "cpu",
    "trainer.precision": "fp32", "trainer.strategy": "ddp", "trainer.on_nonfinite": "skip",
    "trainer.warmup_ratio": 0.2, "eval.top_p": 0.9, "eval.backend": "vllm", "logger.mode": "offline",
    "logger.entity": "someone", "logger.project": "other", "run_name": "x", "label": "X", "sweep": "s",
    "cache_dir": "elsewhere",
    "model.lora.enabled": True, "model.lora.target_modules": "c_attn", "model.lora.save": "adapter",
    "augment.backend": "vllm", "eval.protocol": "paper", "trainer.seed": 7, "eval.validation_prompts": 4,
    "augment.max_prompts": 12, "eval.num_samples": 3, "eval.temperature": 0.5,
}
# model.chat_template: refused for the tiny model; with a template it rewrites the data (keys follow the content).
# eval.split: tested in test_plan_validation.py.
# reward_model.backbone needs a model dir: test_backbone_reward_model_keys
SKIP = ("._target_", ".name", "sampler.", "dry_run", "eval.datasets", "logger.tags", "model.name_or_path",
        "model.chat_template", "eval.split", "reward_model.backbone")


def planned(cfg, tmp_path, autocast=None, world=None) -> dict:
    r = app.prepare(cfg)
    env = stages.Env(device=r.device, autocast=autocast, cache_dir=tmp_path / "cache", runtime=r.plan.runtime,
                     world=world, dry_run=True)
    app.execute(cfg, r, env, tmp_path / "run")
    seen, out = {}, {}
    for name, key, _ in env.planned:
        if name == "reference":
            name = f"reference#{seen.setdefault(name, 0)}"
            seen["reference"] += 1
        out[name] = key
    return out


def leaves(node, prefix=""):
    for k, v in node.items():
        if OmegaConf.is_dict(v):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def changed_value(key, value):
    if key in CHANGE:
        return CHANGE[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.1
    raise AssertionError(f"no test value for {key}={value!r}: add one to CHANGE")


def expected_for(key):
    return next(v for prefix, v in EXPECTED.items() if key == prefix or key.startswith(prefix) and prefix.endswith("."))


def test_every_knob_changes_exactly_its_stages(compose, tmp_path, monkeypatch):
    from hps_exp import plan

    monkeypatch.setattr(plan, "check_engines", lambda cfg, device: [])   # backend=vllm without vllm: keys only
    base_cfg = compose(BASE)
    base = planned(compose(BASE), tmp_path)
    assert set(base) == ALL
    checked = []
    for key, value in leaves(base_cfg):
        if any(s in key for s in SKIP) or OmegaConf.is_list(value) or key.startswith("dataset.reward_model"):
            continue
        if key.startswith("eval.reward_model"):
            continue
        new = changed_value(key, OmegaConf.select(base_cfg, key))
        got = planned(compose([*BASE, f"{key}={json.dumps(new) if isinstance(new, str) else new}"]), tmp_path)
        diff = {s for s in ALL if got.get(s) != base[s]}
        assert diff == expected_for(key), f"{key}={new!r} rebuilt {sorted(diff)}, expected {sorted(expected_for(key))}"
        checked.append(key)
    assert len(checked) > 60  # every knob of every group was tried


ANNOTATOR = {"reward_model", "augment", "reference#0", "preference", "eval"}


def test_backbone_reward_model_keys(compose, tmp_path):
    """reward_model.backbone: the RM reads neither the SFT tokenizer nor the tiny net's sizes; the backbone and
    its LoRA reach its key, and backbone=policy is keyed as model.name_or_path itself."""
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(lm)
    with_backbone = [*BASE, f"reward_model.backbone={lm}"]
    base = planned(compose(with_backbone), tmp_path)
    assert {s for s in ALL if base[s] != planned(compose(BASE), tmp_path)[s]} == ANNOTATOR
    for change, expected in (("sft.lr=0.001", ALL - {"reward_model"}), ("reward_model.n_layer=3", NONE),
                             ("reward_model.lora.enabled=true", ANNOTATOR), ("reward_model.lora.r=4", NONE)):
        got = planned(compose([*with_backbone, change]), tmp_path)
        assert {s for s in ALL if got[s] != base[s]} == expected, change
    policy = planned(compose([*BASE, "reward_model.backbone=policy", f"model.name_or_path={lm}"]), tmp_path)
    named = planned(compose([*BASE, f"reward_model.backbone={lm}", f"model.name_or_path={lm}"]), tmp_path)
    assert policy == named


def test_trained_evaluation_reward_model_is_the_annotator_on_the_other_half(compose, tmp_path):
    args = [*BASE, "reward_model.subset=half_a", "eval.reward_model=trained"]
    plan = app.prepare(compose(args)).plan
    assert plan.eval_reward_model.knobs == {**plan.reward_model.knobs, "subset": "half_b"}
    base = planned(compose(args), tmp_path)
    assert set(base) == ALL | {"eval_reward_model"}
    judge = {"eval_reward_model", "sft_eval", "eval"}
    for change, expected in (("reward_model.lr=0.002", ANNOTATOR | judge), ("eval.max_prompts=7", {"sft_eval", "eval"}),
                             ("reward_model.subset=half_b", ANNOTATOR | judge), ("trainer.lr=0.001", POLICY)):
        got = planned(compose([*args, change]), tmp_path)
        assert {s for s in base if got[s] != base[s]} == expected, change


def test_bf16_parameters_under_fsdp2_and_bf16_autocast_do_not_share_cache_entries(compose, tmp_path):
    """Under bf16 (CUDA) fsdp2 computes with bf16 parameters and ddp/none with bf16 autocast: different numbers, so
    every stage misses; in fp32 the strategy changes nothing (the every-knob test: trainer.strategy rebuilds none)."""
    from hps_exp.distributed import World

    two = World(rank=0, world_size=2)   # rank 0 of a 2-process world (a dry run needs no process group)
    keys = {s: planned(compose([*BASE, f"trainer.strategy={s}"]), tmp_path, torch.bfloat16, two)
            for s in ("ddp", "fsdp2")}
    assert {s for s in ALL if keys["ddp"][s] != keys["fsdp2"][s]} == ALL
    fp32 = {s: planned(compose([*BASE, f"trainer.strategy={s}"]), tmp_path, None, two) for s in ("ddp", "fsdp2")}
    assert fp32["ddp"] == fp32["fsdp2"]


def test_fsdp2_keeps_fp32_parameters_under_trainer_precision_fp32():
    from hps_exp.models import autocast_dtype
    from hps_exp.strategies import compute_numerics

    fp32 = autocast_dtype("fp32", torch.device("cuda"))
    assert fp32 is None and compute_numerics("fsdp2", True, fp32) == "fp32"
    assert compute_numerics("fsdp2", True, torch.bfloat16) == "bfloat16 parameters (fsdp2)"
    assert compute_numerics("fsdp2", False, torch.bfloat16) == "bfloat16 autocast"   # one process: not wrapped


@pytest.mark.parametrize("base, change, expected", [
    (["loss=lipo"], "loss.normalize_labels=false", POLICY),
    (["sampler=hard"], "sampler.hardness=policy_reward", POLICY),
    (["sampler=hard", "sampler.hardness=policy_logp"], "sampler.gamma=2.0", POLICY),
    (["loss.reward=simpo"], "loss.beta=0.2", {"sft_eval", *POLICY}),   # the SFT policy's own simpo margins
    (["loss.reward=simpo"], "loss.margin=0.5", POLICY),
])
def test_knobs_outside_the_default_options_change_exactly_their_stages(compose, tmp_path, base, change, expected):
    """The every-knob test walks the default loss and skips the sampler group: their other options' knobs here."""
    before = planned(compose([*BASE, *base]), tmp_path)
    after = planned(compose([*BASE, *base, change]), tmp_path)
    assert set(before) == set(after)
    assert {s for s in before if before[s] != after[s]} == expected


def test_stop_strings_reach_augmentation_and_evaluation(compose, tmp_path):
    """dataset.stop (a list, so the loop above skips it) ends every generated reply: augmentation and evaluation."""
    base = planned(compose(BASE), tmp_path)
    for change in ("dataset.stop=[]", "dataset.stop=[END]"):
        got = planned(compose([*BASE, change]), tmp_path)
        assert {s for s in ALL if got[s] != base[s]} == expected_for("dataset.stop"), change


def _ranked_rows(n, tag=""):
    return "".join(json.dumps({"prompt": f"\n\nHuman: q{i}{tag}\n\nAssistant:",
                               "responses": [f" good answer {i}", f" bad {i}", f" meh {i}"],
                               "scores": [2.0, 0.0, 1.0]}) + "\n" for i in range(n))


def test_one_byte_of_each_input_file_misses_the_right_stages(compose, tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text(_ranked_rows(12))
    test.write_text(_ranked_rows(4, "t"))
    args = ["dataset=ranked_jsonl", f"dataset.path={train}", f"dataset.test_path={test}", "loss=hps"]
    base = planned(compose(args), tmp_path)
    train.write_text(train.read_text().replace("good answer 3", "good answer 4", 1))
    after_train = planned(compose(args), tmp_path)
    assert {s for s in base if base[s] != after_train[s]} == {"sft", "reference#0", "preference", "reference#1",
                                                              "sft_eval", "eval"}
    test.write_text(test.read_text().replace("q0t", "q0u", 1))
    after_test = planned(compose(args), tmp_path)
    assert {s for s in base if after_train[s] != after_test[s]} == {"reference#1", "sft_eval", "eval"}


def test_file_replaced_in_place_misses_the_sft_cache(tmp_path, capsys):
    """The verified defect: same path, new content, and SFT must retrain (a real build, tiny sizes)."""
    from hps_exp.data.ranked_jsonl import load

    spec = stages.SFTSpec(model=stages.ModelSpec(None, 1, 2, 16, 64, 300, 24, 48), enabled=True, targets="all",
                          epochs=1, batch_size=8,
                          optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="constant"), seed=0)
    env = stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "cache")
    path = tmp_path / "data.jsonl"
    path.write_text(_ranked_rows(10))
    first = stages.sft(spec, stages.Examples.of(load(path=str(path), test_fraction=0.2).train), env)
    assert stages.sft(spec, stages.Examples.of(load(path=str(path), test_fraction=0.2).train), env).key == first.key
    assert "sft: hit" in capsys.readouterr().out
    path.write_text(_ranked_rows(10, "new"))
    second = stages.sft(spec, stages.Examples.of(load(path=str(path), test_fraction=0.2).train), env)
    assert second.key != first.key and "sft: built" in capsys.readouterr().out


def test_examples_key_is_the_content():
    from hps_exp.data.schema import Example

    a = [Example("p", (" x", " y"), (1.0, 0.0), source="a.jsonl:1")]
    b = [Example("p", (" x", " y"), (1.0, 0.0), source="b.jsonl:9")]   # same content, other file
    c = [Example("p", (" x", " y"), (1.0, 0.5))]
    assert stages.Examples.of(a).key == stages.Examples.of(b).key != stages.Examples.of(c).key


def test_stale_temp_dirs_are_removed_by_lock_not_by_pid(tmp_path):
    """A temp dir is a dead builder's when its entry's lock is free; one whose builder holds the lock is kept even
    when its name's pid is gone here (a job in another pid namespace: containers on one node, issue 18 item 2)."""
    import subprocess
    import sys

    from hps_exp.io import owner_tag

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = owner_tag().split("-")[0]
    stale = tmp_path / f".sft-{'a' * 16}.tmp-{host}-{dead.pid}-x"
    busy = tmp_path / f".sft-{'b' * 16}.tmp-{host}-{dead.pid}-y"          # its pid is gone, its lock is held
    busy_ckpt = tmp_path / f"..sft-{'b' * 16}.checkpoint.tmp-{host}-{dead.pid}-y-step3"
    for d in (stale, busy, busy_ckpt):
        d.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, fcntl, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / f".sft-{'b' * 16}.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert clean_stale(tmp_path) == [stale]
        assert not stale.exists() and busy.exists() and busy_ckpt.exists()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(clean_stale(tmp_path)) == sorted([busy, busy_ckpt])   # its holder died: now stale


def test_config_key_ignores_where_results_go(compose):
    from hps_exp import plan

    def label(overrides):
        cfg = compose([*overrides, "dataset.n_train=10", "dataset.n_test=4"])
        r = app.prepare(cfg)
        return plan.run_label(cfg, r.loss_fn, r.sampler, r.train)

    a, b = label(["cache_dir=/tmp/a"]), label(["cache_dir=/tmp/b", "logger.mode=disabled", "run_name=x"])
    assert a["config_key"] == b["config_key"] != label(["trainer.lr=1e-3"])["config_key"]


class _Crash(RuntimeError):
    pass


class _CrashingLogger:
    """Raises when step `at` is logged: a crash mid-stage, after the checkpoint of step `at - 1`."""

    def __init__(self, at):
        self.at = at

    def log(self, metrics, step):
        if step == self.at:
            raise _Crash(f"killed at step {step}")

    def next_stage(self):
        pass


def test_sft_resumes_from_its_checkpoint_after_a_crash(tmp_path, capsys):
    from hps_exp import models
    from hps_exp.data.synthetic import load

    spec = stages.SFTSpec(model=stages.ModelSpec(None, 1, 2, 16, 64, 300, 24, 48), enabled=True, targets="all",
                          epochs=2, batch_size=8, seed=0,
                          optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="cosine"))
    train = stages.Examples.of(load(n_train=12, n_test=2, n_responses=2).train)
    runtime = stages.Runtime(RuntimeConfig(save_every=1, log_every=1))
    whole = stages.sft(spec, train, stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "a",
                                               runtime=runtime))
    crashing = stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "b", runtime=runtime,
                          logger=_CrashingLogger(at=4))
    with pytest.raises(_Crash):
        stages.sft(spec, train, crashing)
    assert not list((tmp_path / "b").glob("sft-*")) and list((tmp_path / "b").glob(".sft-*.checkpoint"))
    capsys.readouterr()
    resumed = stages.sft(spec, train, stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / "b",
                                                 runtime=runtime))
    assert "resumed from" in capsys.readouterr().out and resumed.key == whole.key
    assert not list((tmp_path / "b").glob(".sft-*.checkpoint"))  # dropped once the entry exists
    a, b = models.load_saved(whole.path)[1].state_dict(), models.load_saved(resumed.path)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
