"""Issue 18: every training stage resumes, every ending is recorded, divergence is not silent, bad input fails
before any work (scores beyond float32, lone surrogates, relative paths under hydra.job.chdir, unwritable dirs),
and the thread count is what the user asked for."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from test_end_to_end import run_app
from test_rundir import TINY
from test_stages import _Crash, _CrashingLogger

from hps_exp import app, config, rundir, stages
from hps_exp.config import OptimConfig, RuntimeConfig
from hps_exp.data.schema import DataError, Example


def _run_with(patch: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m hps_exp ARGS` with `patch` (Python source) run first: a fault injected into a real job."""
    code = f"import sys\n{patch}\nfrom hps_exp.app import main\nsys.argv[0] = 'hps_exp'\nmain()\n"
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ----------------------------------------------------------------------------- item 8: the reward model resumes

def test_the_reward_model_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    from hps_exp.data.synthetic import load

    data = load(n_train=16, n_test=4, n_responses=2)
    train, heldout = stages.Examples.of(data.train), stages.Examples.of(data.test)
    sft_spec = stages.SFTSpec(model=stages.ModelSpec(None, 1, 2, 16, 64, 300, 24, 48), enabled=False, targets="all",
                              epochs=1, batch_size=8, optim=OptimConfig(lr=1e-3, warmup_ratio=0.0, schedule="cosine"),
                              seed=0)
    spec = stages.RewardModelSpec(target="hps_exp.reward_models.train_reward_model", optim=OptimConfig(lr=1e-3),
                                  knobs={"n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 48, "epochs": 2,
                                         "batch_size": 4}, max_prompt_length=24, max_length=48, seed=0)
    runtime = stages.Runtime(RuntimeConfig(save_every=1, log_every=1))

    def env(cache, logger=None):
        return stages.Env(device=torch.device("cpu"), autocast=None, cache_dir=tmp_path / cache, runtime=runtime,
                          logger=logger)

    def scores(scorer):
        return scorer.model.score_batch([e.prompt for e in heldout.items], [e.responses[0] for e in heldout.items])

    whole = stages.trained_reward_model(spec, train, heldout, stages.sft(sft_spec, train, env("a")), env("a"))
    sft_b = stages.sft(sft_spec, train, env("b"))
    with pytest.raises(_Crash):
        # its last step (it logs every step here, trainer.log_every=1), and has saved the one before
        stages.trained_reward_model(spec, train, heldout, sft_b, env("b", _CrashingLogger(at=8)))
    assert list((tmp_path / "b").glob(".reward_model-*.checkpoint"))
    capsys.readouterr()
    resumed = stages.trained_reward_model(spec, train, heldout, sft_b, env("b"))
    assert "[reward_model] resumed from" in capsys.readouterr().out and resumed.key == whole.key
    assert scores(resumed) == pytest.approx(scores(whole), abs=1e-6)
    assert not list((tmp_path / "b").glob(".reward_model-*.checkpoint"))   # dropped once the entry exists


@pytest.mark.slow
def test_sigterm_during_reward_model_training_is_recorded_and_the_rerun_resumes(tmp_path):
    cache_dir, run_dir = tmp_path / "cache", tmp_path / "run"
    args = [*TINY, "sft.enabled=false", "dataset.n_train=100", "reward_model=train", "reward_model.n_layer=1",
            "reward_model.n_head=2", "reward_model.n_embd=32", "reward_model.epochs=1", "reward_model.batch_size=2",
            "trainer.save_every=1", f"hydra.run.dir={run_dir}", f"cache_dir={cache_dir}"]
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.Popen([sys.executable, "-m", "hps_exp", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        while p.poll() is None and not list(cache_dir.glob(".reward_model-*.checkpoint")):   # its first save
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and record["stage"] == "reward_model" and record["step"] >= 1
    assert not list(cache_dir.glob("reward_model-*"))                  # no entry yet: only its checkpoint
    again = run_app(args, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[reward_model] resumed from {cache_dir}" in again.stdout and f"at step {record['step']}/" in again.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["reward_model"]["heldout_pair_accuracy"] >= 0
    assert not list(cache_dir.glob(".reward_model-*.checkpoint"))


# ----------------------------------------------------------------------------- item 10: every ending is recorded

def test_sigterm_outside_training_is_recorded_as_interrupted(tmp_path):
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    run_dir = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "hps_exp", *TINY, "sft.enabled=false", "dataset.n_train=400",
                          f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path}/cache"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:          # the job's start line: next come the tokenizer and the SFT entry (no training)
        if line.startswith("[hps_exp] DPO"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "interrupted" and "outside training" in record["error"]


def test_sigterm_while_loading_exits_143_and_leaves_the_run_dir_as_it_was(tmp_path):
    """Before the job holds its run dir (here: loading the data) a SIGTERM writes nothing there: the dir may hold
    a completed run that this job would only have reused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "completed"}')
    patch = ("import os, signal\nfrom hps_exp import plan\nreal = plan.load_data\n"
             "def load_data(cfg):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(cfg)\n"
             "plan.load_data = load_data")
    p = _run_with(patch, [*TINY, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path}/cache"])
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "interrupted by SIGTERM" in p.stderr and "nothing recorded" in p.stderr
    assert (run_dir / "metrics.json").read_text() == '{"status": "completed"}'


def test_a_base_exception_is_recorded_and_does_not_stop_a_multirun(tmp_path, monkeypatch):
    """Hydra's job runner catches Exception only: a BaseException would end a multirun's loop."""
    from hydra.core.hydra_config import HydraConfig

    class CheckpointLike(BaseException):   # torch's CheckpointException is a BaseException
        pass

    cfg = config.compose([f"hydra.runtime.output_dir={tmp_path}"], return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)   # as it was, after the test
    HydraConfig.instance().set_config(cfg)

    def failing_run(cfg):
        raise CheckpointLike("EOFError inside")

    monkeypatch.setattr(app, "run", failing_run)
    with pytest.raises(RuntimeError, match=r"\bCheckpointLike\b.*\bEOFError inside\b"):   # an Exception: Hydra goes on
        app.main.__wrapped__(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"status": "failed",
                                                                   "error": "CheckpointLike: EOFError inside"}


def test_after_a_base_exception_a_multirun_runs_its_next_job(tmp_path):
    """The same, end to end: job 0 of a `-m` multirun dies of a BaseException, job 1 still runs."""
    patch = ("from hps_exp import app\n"
             "class CheckpointLike(BaseException): pass\n"
             "real = app.run\n"
             "def run(cfg):\n"
             "    if cfg.seed == 0: raise CheckpointLike('EOFError inside')\n"
             "    return real(cfg)\n"
             "app.run = run")
    p = _run_with(patch, ["-m", "seed=0,1", "dry_run=true", *TINY, f"hydra.sweep.dir={tmp_path}/sweep",
                          "hydra.sweep.subdir=${hydra.job.num}", f"cache_dir={tmp_path}/cache"])
    assert json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text()) == {
        "status": "failed", "error": "CheckpointLike: EOFError inside"}
    assert "#1 : seed=1" in p.stdout and "[plan] preference" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]


# ----------------------------------------------------------------------------- item 5: divergence is not silent

def test_divergence_is_warned_in_metrics_json():
    assert app.divergence_warnings({"rewards/margins": 3.0}, {"s": {"aligned": {"reward_margin": 2.0}}}) == []
    warned = app.divergence_warnings({"rewards/margins": -8000.0, "nonfinite_skipped": 2.0},
                                     {"s": {"aligned": {"reward_margin": float("nan")}}})
    assert len(warned) == 3 and "diverged" in warned[0] and "on s" in warned[1] and "2 training step(s)" in warned[2]


def test_a_diverged_run_warns_in_its_log_and_metrics_json(tmp_path):
    p = run_app([*TINY, "trainer.lr=10", f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"], cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["warnings"]
    assert all(w.startswith("diverged:") and "lower trainer.lr" in w for w in record["warnings"])
    assert all(f"[hps_exp] warning: {w}" in p.stderr for w in record["warnings"])


def test_log_probs_that_overflow_reach_the_non_finite_guard(tmp_path):
    p = run_app([*TINY, "trainer.lr=1e30", "trainer.epochs=3", "trainer.on_nonfinite=skip",
                 f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"], cwd=REPO)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "training diverged" in p.stderr and "step(s) skipped" in p.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------- items 6, 11: checked before work

@pytest.mark.parametrize("score", [1e39, 1e308, -1e308, float("nan")])
def test_scores_beyond_float32_are_refused_at_load(score):
    with pytest.raises(DataError, match=r"\btrain\.jsonl:3\b.*\bscore 1\b.*\bfloat32\b"):
        Example("p", (" a", " b"), (0.0, score), source="train.jsonl:3")


@pytest.mark.parametrize("score", [1e39, 1e308, -1e308])
def test_a_file_with_scores_beyond_float32_is_refused_at_its_line(tmp_path, score):
    from hps_exp.data.ranked_jsonl import load

    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "responses": [" a", " b"], "scores": [1.0, 0.0]} for i in range(4)]
    rows[2]["scores"] = [score, 0.0]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"\btrain\.jsonl:3\b.*\bscore 0\b.*\bfloat32\b"):
        load(path=str(path), test_fraction=0.25)


def test_a_lone_surrogate_is_refused_with_file_and_line(tmp_path):
    from hps_exp.data.ranked_jsonl import load

    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "responses": [" a", " b"], "scores": [1.0, 0.0]} for i in range(4)]
    rows[2]["prompt"] = "q\ud800"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))   # json.dumps writes it as \\ud800
    with pytest.raises(DataError, match=r"\btrain\.jsonl:3\b.*\bprompt\b.*\bsurrogate\b"):
        load(path=str(path), test_fraction=0.25)


def test_a_relative_dataset_path_is_resolved_from_the_launch_dir_under_chdir(tmp_path):
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "responses": [f" good {i}", f" bad {i}"],
             "scores": [1.0, 0.0]} for i in range(20)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_app(["dataset=ranked_jsonl", "dataset.path=data.jsonl", "hydra.job.chdir=true", "dry_run=true",
                 "model.n_embd=32", "logger.mode=disabled", f"hydra.run.dir={tmp_path}/run",
                 f"cache_dir={tmp_path}/cache"], cwd=tmp_path)
    assert p.returncode == 0 and "[plan] sft" in p.stdout, p.stderr[-3000:]


def test_an_unwritable_cache_missing_an_entry_fails_before_work(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(rundir, "_writable", lambda p: p != cache_dir)   # (root may write anywhere)
    with pytest.raises(Exception, match=rf"\bcache_dir={re.escape(str(cache_dir))}.*\bwritable\b.*\bsft_eval\b"):
        rundir.check_writable(tmp_path, cache_dir, [("sft", "k", "hit"), ("sft_eval", "e", "miss")])
    rundir.check_writable(tmp_path, cache_dir, [("sft", "k", "hit")])   # a read-only cache that has it all


def test_a_job_on_a_read_only_cache_missing_an_entry_fails_before_work(tmp_path):
    """Through the app: the job stops before building anything. (Tests may run as root, who may write anywhere:
    the job's permission check is told that the cache is read-only.)"""
    cache_dir = tmp_path / "ro-cache"
    patch = (f"from pathlib import Path\nfrom hps_exp import rundir\n"
             f"rundir._writable = lambda p: Path(p).resolve() != Path({str(cache_dir)!r}).resolve()")
    p = _run_with(patch, [*TINY, f"hydra.run.dir={tmp_path}/run", f"cache_dir={cache_dir}"])
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert f"cache_dir={cache_dir} is not writable and lacks the entries of sft, " in p.stderr
    assert "[cache]" not in p.stdout and not cache_dir.exists()   # nothing was built
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only dir")
def test_writable_sees_a_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert not rundir._writable(ro / "cache") and rundir._writable(tmp_path / "new" / "cache")
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- item 9: threads as asked

def test_threads_explicit_settings_win_over_auto(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert app.choose_threads(0, 1) == (3, "OMP_NUM_THREADS")
    assert app.choose_threads(2, 1) == (2, "trainer.num_threads")
    monkeypatch.delenv("OMP_NUM_THREADS")
    n, source = app.choose_threads(0, 1)
    assert source == "auto" and n >= 1
