"""Jobs that share a cache or a run dir cannot collide (issue 18 item 2): one builder per cache entry (the others
wait and reuse it), per-process temp paths, a run dir used by one job at a time."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from test_end_to_end import run_app
from test_rundir import TINY

from hps_exp.io import FileLock


def _start(args):
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "hps_exp", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _each_entry_built_once(outputs: list[str]) -> None:
    """The jobs' outputs: every shared entry built by one job, and the jobs did overlap (one waited for another's
    build at least once; else the test proved nothing about concurrency)."""
    text = "".join(outputs)
    assert text.count("[cache] sft: built") == 1 and text.count("[cache] sft_eval: built") == 1, text
    assert text.count("[cache] reference: built") == 2, text      # the training set's and the eval set's
    assert "is building it; waiting for it" in text, text


def test_three_jobs_at_once_on_one_cache_build_each_entry_once(tmp_path):
    # Same SFT and reference entries, three preference runs; SFT saves a checkpoint every step (where two
    # builders used to share a temp path and one died).
    common = [*TINY, "sft.epochs=2", "trainer.save_every=1", f"cache_dir={tmp_path}/cache"]
    jobs = [_start([*common, f"trainer.lr={lr}", f"hydra.run.dir={tmp_path}/run{i}"])
            for i, lr in enumerate((1e-4, 2e-4, 3e-4))]
    outs = [p.communicate(timeout=600) for p in jobs]
    for p, (out, err) in zip(jobs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    for i in range(3):
        assert json.loads((tmp_path / f"run{i}" / "metrics.json").read_text())["status"] == "completed"
    _each_entry_built_once([out for out, _ in outs])
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name or p.name.endswith(".checkpoint")]
    assert leftovers == []


def test_a_run_dir_in_use_is_refused_and_left_alone(tmp_path):
    run_dir = tmp_path / "run"
    lock = FileLock(run_dir / ".hps_exp.lock").acquire()   # a live job in that dir
    try:
        p = run_app([*TINY, f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path}/cache"], cwd=REPO)
    finally:
        lock.release()
    assert p.returncode != 0 and "another job is running in" in p.stderr and "Traceback" not in p.stderr
    assert f"pid {os.getpid()}" in p.stderr                    # names the holder
    assert not (run_dir / "metrics.json").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_submitit_local_launcher_runs_three_arms_at_once(tmp_path):
    p = run_app(["-m", "trainer.lr=1e-4,2e-4,3e-4", "hydra/launcher=submitit_local", *TINY, "trainer.save_every=1",
                 f"hydra.sweep.dir={tmp_path}/sweep", f"cache_dir={tmp_path}/cache"], cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    for k in range(3):
        assert json.loads((tmp_path / "sweep" / str(k) / "metrics.json").read_text())["status"] == "completed"
    assert len(list((tmp_path / "cache").glob("sft-*"))) == 1
    _each_entry_built_once([f.read_text() for f in (tmp_path / "sweep" / ".submitit").glob("*/*_log.out")])


BUILDER = """
import sys, time
from pathlib import Path
from hps_exp import cache

cache_dir, mode = Path(sys.argv[1]), sys.argv[2]

def build(out):
    if mode == "hang":             # a builder that dies mid-build (the test kills it)
        (out / "partial.bin").write_bytes(b"x" * 100)
        print("building", flush=True)
        time.sleep(300)
    (out / "eval.json").write_text('{"value": 1}')

print(cache.cached(cache_dir, cache.stage_entry("sft_eval", {"value": 1}, {}, {}), build), flush=True)
"""


def test_a_waiting_builder_takes_over_the_entry_of_a_killed_one(tmp_path):
    """Two jobs build one entry: the second waits on the lock (never builds beside the first); when the first
    is killed mid-build (SIGKILL: no cleanup runs) its lock dies with it, and the second builds the entry,
    removing the dead one's temp dir."""
    import signal

    script, cache_dir = tmp_path / "builder.py", tmp_path / "cache"
    script.write_text(BUILDER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def builder(mode):
        return subprocess.Popen([sys.executable, str(script), str(cache_dir), mode], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = builder("hang")
    second = None
    try:
        assert first.stdout.readline().strip() == "building", first.stderr.read()
        second = builder("quick")
        assert "is building it; waiting for it" in second.stdout.readline()   # it waits instead of building
        assert f"pid {first.pid}" in next(cache_dir.glob(".sft_eval-*.lock")).read_text()
        first.send_signal(signal.SIGKILL)
        first.wait()
        out, err = second.communicate(timeout=120)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert second.returncode == 0, err[-3000:]
    assert "sft_eval: built" in out and "False)" in out                      # built by the second, not a hit
    entries = [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1 and entries[0].startswith("sft_eval-")          # the dead builder's temp dir is gone
    assert json.loads((cache_dir / entries[0] / "eval.json").read_text()) == {"value": 1}
    assert not (cache_dir / entries[0] / "partial.bin").exists()


@pytest.mark.slow
def test_the_reported_parallel_sweep_completes_every_arm(tmp_path):
    """Issue 18.2 as reported: `python -m hps_exp.sweep main_dpo_small --parallel ... seed=0` lost 3 of its 4
    arms (four jobs building one SFT entry on one cache). Tiny data, a checkpoint every step."""
    jobs_dir = tmp_path / "jobs"
    env = {**os.environ, "HPS_EXP_NO_PROGRESS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "hps_exp.sweep", "main_dpo_small", "--parallel", "--jobs-dir",
                        str(jobs_dir), "seed=0", "dataset.n_train=24", "dataset.n_test=6", "eval.max_prompts=4",
                        "eval.max_new_tokens=8", "sft.epochs=1", "trainer.epochs=1", "model.n_embd=32",
                        "logger.mode=disabled", "trainer.save_every=1", f"cache_dir={tmp_path}/cache"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0 and "total: 4 job(s), 4 completed" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    logs = [f.read_text() for f in (jobs_dir / ".sweep_logs").glob("*.log")]
    assert len(logs) == 4
    text = "".join(logs)
    assert text.count("[cache] sft: built") == 1 and "is building it; waiting for it" in text, text[-5000:]
