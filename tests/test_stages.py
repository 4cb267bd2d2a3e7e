"""Stage cache keys are derived, never hand-kept: every config knob and every input byte changes exactly the
stages that depend on it (checked through the app's own dry run), and a data file replaced in place misses."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from hps_exp import app, stages
from hps_exp.cache import clean_stale

BASE = ["reward_model=train", "augment=sample", "dataset.n_train=24", "dataset.n_test=8"]
ALL = {"sft", "reward_model", "augment", "reference#0", "preference", "reference#1", "sft_eval", "eval"}
POLICY = {"preference", "eval"}
NONE: set = set()

# What a change of each knob must rebuild (with reward_model=train, augment=sample, one eval set).
EXPECTED = {
    "loss.": POLICY, "trainer.batch_size": POLICY, "trainer.lr": POLICY, "trainer.epochs": POLICY,
    "trainer.resample": POLICY, "trainer.max_steps": POLICY, "trainer.bucketing": POLICY,
    "dataset.n_test": {"reference#1", "sft_eval", "eval"},
    "dataset.stop": {"augment", "reference#0", "preference", "sft_eval", "eval"},   # not the data: what is generated
    "dataset.": ALL, "model.gradient_checkpointing": NONE, "model.lora.enabled": POLICY,
    "model.lora.": NONE,  # LoRA is off: its knobs change nothing (with it on, they change the policy)
    "model.": ALL, "sft.": ALL,
    "seed": ALL,
    "trainer.grad_accum": ALL, "trainer.warmup_ratio": ALL, "trainer.schedule": ALL, "trainer.weight_decay": ALL,
    "trainer.max_grad_norm": ALL,
    "reward_model.": {"reward_model", "augment", "reference#0", "preference", "eval"},
    "augment.": {"augment", "reference#0", "preference", "eval"},
    "eval.": {"sft_eval", "eval"},
    "trainer.": NONE, "logger.": NONE, "run_name": NONE, "label": NONE, "sweep": NONE, "cache_dir": NONE,
}
# A valid different value where "+1 / flip / x0.5" would not be one.
CHANGE = {
    "loss.framework": "ipo", "loss.pairs": "best_worst", "loss.label_smoothing": 0.1, "sft.targets": "best",
    "model.n_head": 8, "model.n_embd": 64, "model.max_length": 120, "model.dtype": "bf16",
    "model.attn_implementation": "eager", "reward_model.n_head": 8, "reward_model.n_embd": 64,
    "reward_model.pairs": "chosen_rejected", "augment.top_p": 0.9, "dataset.n_responses": 6,
    "trainer.schedule": "linear", "trainer.resample": "step", "trainer.max_steps": 5, "trainer.device": "cpu",
    "trainer.precision": "fp32", "trainer.strategy": "ddp", "trainer.on_nonfinite": "skip",
    "trainer.warmup_ratio": 0.2, "eval.top_p": 0.9, "eval.backend": "vllm", "logger.mode": "offline",
    "logger.entity": "someone", "logger.project": "other", "run_name": "x", "label": "X", "sweep": "s", "cache_dir": "elsewhere",
    "model.lora.enabled": True, "model.lora.target_modules": "c_attn", "model.lora.save": "adapter",
    "augment.backend": "vllm", "eval.protocol": "paper", "eval.num_samples": 3, "eval.temperature": 0.5,
}
SKIP = ("._target_", ".name", "sampler.", "dry_run", "eval.datasets", "logger.tags", "model.name_or_path")


def planned(cfg, tmp_path) -> dict:
    r = app.prepare(cfg)
    env = stages.Env(device=r.device, autocast=None, cache_dir=tmp_path / "cache", runtime=r.plan.runtime,
                     dry_run=True)
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
                          epochs=1, lr=1e-3, batch_size=8,
                          optim=stages.OptimSpec(1, 0.0, "constant", 0.0, 1.0), seed=0)
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
                          epochs=2, lr=1e-3, batch_size=8, optim=stages.OptimSpec(1, 0.0, "cosine", 0.0, 1.0), seed=0)
    train = stages.Examples.of(load(n_train=12, n_test=2, n_responses=2).train)
    runtime = stages.Runtime(save_every=1, log_every=1)
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
