"""The app as a user runs it: `python -m hps_exp ...` (a few subprocesses; each pays the imports once)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

SMALL = ["dataset.n_train=60", "dataset.n_test=12", "dataset.n_responses=4", "sft.epochs=1",
         "trainer.epochs=1", "trainer.batch_size=8", "eval.max_prompts=12", "eval.max_new_tokens=16",
         "model.n_embd=64", "logger.mode=disabled"]


def run_app(args, cwd, timeout=300):
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hps_exp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_short_run_writes_results_and_reuses_the_cache(tmp_path):
    args = SMALL + [f"hydra.run.dir={tmp_path}/run1", f"cache_dir={tmp_path}/cache"]
    p = run_app(args, cwd=REPO)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run_dir = tmp_path / "run1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["run"]["method"] == "DPO"
    ev = metrics["eval"]["synthetic"]
    for stage in ("sft", "aligned"):
        for key in ("bleu_corpus", "reward", "reward_margin", "reward_margin_hardest", "harmful_rate"):
            assert isinstance(ev[stage][key], float), (stage, key)
    assert len(ev["per_prompt"]["aligned"]["reward_margin"]) == 12 and len(ev["per_prompt"]["sft"]["reward"]) == 12
    assert "BLEU" in p.stdout and "aligned (DPO)" in p.stdout
    assert (run_dir / "config_resolved.yaml").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all("generation" in s for s in samples)
    _assert_stages_name_their_cache_dirs(metrics, {"sft", "reference", "preference", "eval"})
    assert (run_dir / "policy").is_dir() and not (run_dir / "checkpoints").exists()   # a completed run: no resume
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/rewards/margins" in row for row in logged) and any("sft/loss" in row for row in logged)

    # Same inputs again: SFT and reference stages come from the cache; same seed, same numbers.
    p2 = run_app(SMALL + [f"hydra.run.dir={tmp_path}/run2", f"cache_dir={tmp_path}/cache"], cwd=REPO)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "[cache] sft: hit" in p2.stdout and "[cache] reference: hit" in p2.stdout
    assert "[cache] sft_eval: hit" in p2.stdout
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert again["eval"] == metrics["eval"]


def test_multirun_gives_one_dir_per_job(tmp_path):
    args = ["-m", "seed=0,1", "dataset.n_train=24", "dataset.n_test=6", "dataset.n_responses=2", "sft.epochs=1",
            "trainer.epochs=1", "eval.max_prompts=4", "eval.max_new_tokens=8", "model.n_embd=32",
            "logger.mode=disabled", f"hydra.sweep.dir={tmp_path}/sweep", f"cache_dir={tmp_path}/cache"]
    p = run_app(args, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    seeds = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text())["run"]["seed"] for i in (0, 1)]
    assert seeds == [0, 1]


def test_bad_input_fails_with_a_message_not_a_traceback(tmp_path):
    p = run_app(["loss.beta=abc", f"hydra.run.dir={tmp_path}/bad"], cwd=REPO, timeout=120)
    assert p.returncode != 0
    assert "loss.beta='abc'" in p.stderr and "Traceback" not in p.stderr
    assert json.loads((tmp_path / "bad" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_real_hh_pipeline_sft_rm_augment_hps_eval(tmp_path):
    """~200 real HH-RLHF rows: SFT -> train a reward model -> sample n=4 per prompt, scored -> HPS -> eval."""
    from conftest import HH_TEST

    if not HH_TEST.exists():
        pytest.skip(f"real HH-RLHF data not found at {HH_TEST}")
    args = ["dataset=hh_rlhf", f"dataset.path={HH_TEST}", "dataset.max_train=160", "dataset.max_test=40",
            "dataset.test_fraction=0.2", "reward_model=train", "reward_model.epochs=2", "augment=sample",
            "augment.n=4", "augment.max_new_tokens=24", "loss=hps", "eval.reward_model=annotation",
            "sft.epochs=1", "trainer.epochs=1", "eval.max_prompts=16", "eval.max_new_tokens=24",
            "model.max_prompt_length=96", "model.max_length=160", "model.vocab_size=2048", "model.n_embd=64",
            "logger.mode=disabled", f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    p = run_app(args, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["run"]["method"] == "DPO-HPS-full" and m["run"]["n_responses"] >= 5  # 2 originals + up to 4 samples
    assert m["reward_model"]["pairs"] == m["augment"]["prompts"]  # one (chosen, rejected) pair per training prompt
    assert m["augment"]["generated"] == 160 * 4 and m["augment"]["responses_per_s"] > 0
    ev = m["eval"]["hh_rlhf"]
    assert isinstance(ev["aligned"]["reward"], float) and isinstance(ev["aligned"]["bleu_corpus"], float)
    assert ev["aligned"]["harmful_rate"] is None  # no safety labels for generations on HH
    assert "[augment]" in p.stdout and "held-out pair accuracy" in p.stdout
    # downstream of augmentation the keys used are not the planned ones (those stand in for unknown content)
    _assert_stages_name_their_cache_dirs(m, {"sft", "reward_model", "augment", "reference", "preference", "eval"})


def _assert_stages_name_their_cache_dirs(metrics: dict, expected: set) -> None:
    """metrics.json "stages": each stage the run used, and where its cached output is (what a reader opens)."""
    used = metrics["stages"]
    assert expected <= {s["stage"] for s in used}
    for s in used:
        if s["status"] == "run":   # uncached: its output is in the run dir
            assert s["dir"] is None and s["stage"] in ("preference", "eval")
        else:
            assert s["status"] in ("hit", "built") and (Path(s["dir"]) / "manifest.json").exists(), s
            assert Path(s["dir"]).name == f"{s['stage']}-{s['key']}", s


@pytest.mark.parametrize("override,message", [
    ("model.name_or_path=nobody/no-such-model", "offline mode"),
    ("model.name_or_path=/nonexistent/dir", "no such directory"),
])
def test_unloadable_model_fails_before_any_work(tmp_path, override, message):
    """Resolved in prepare: no W&B run, no config written, no stage started (an offline hub id used to take ~50 s
    of retries after a W&B run had been created)."""
    p = run_app([override, f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache", "logger.mode=offline"],
                cwd=REPO, timeout=120)
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "config_resolved.yaml").exists() and not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "cache").exists()
