"""A run dir belongs to one run (issue 18 item 1): a rerun of a finished job reuses its result untouched, a rerun
with other settings is refused naming them, and a whole multirun rerun into its dirs skips the finished jobs and
resumes the interrupted one."""
import json
import shutil

import pytest
from conftest import REPO
from test_end_to_end import run_app

from hps_exp import rundir

TINY = ["dataset.n_train=24", "dataset.n_test=6", "dataset.n_responses=2", "sft.epochs=1", "trainer.epochs=1",
        "eval.max_prompts=4", "eval.max_new_tokens=8", "model.n_embd=32", "logger.mode=disabled"]


def test_rerun_reuses_a_completed_run_and_refuses_other_settings(tmp_path):
    args = TINY + [f"hydra.run.dir={tmp_path}/run", f"cache_dir={tmp_path}/cache"]
    first = run_app(args, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    # item 9: the run's first line says how many threads and why
    assert first.stdout.splitlines()[0].startswith("[hps_exp] torch threads: 1 (OMP_NUM_THREADS), load average ")
    metrics = tmp_path / "run" / "metrics.json"
    recorded = metrics.read_bytes()
    assert json.loads(recorded)["identity"]["stages"]
    timing = json.loads(recorded)["timing"]
    assert timing["threads"] == 1 and timing["threads_source"] == "OMP_NUM_THREADS"   # conftest sets it
    assert all(isinstance(timing[k], float) for k in ("load_start", "load_end"))

    again = run_app(args + ["logger.mode=offline"], cwd=REPO)   # logging never changes a result
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds this run's completed result" in again.stdout and "[cache]" not in again.stdout
    assert metrics.read_bytes() == recorded            # status, numbers and timing untouched

    other = run_app(args + ["loss=pl", "trainer.lr=1e-2"], cwd=REPO)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "loss.name: 'dpo' -> 'pl'" in other.stderr and "trainer.lr: 0.0002 -> 0.01" in other.stderr
    assert "trainer.resume=false" in other.stderr
    assert metrics.read_bytes() == recorded
    assert "loss=pl" not in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()   # the job's own


def test_rerunning_a_multirun_skips_finished_jobs_and_resumes_the_interrupted_one(tmp_path):
    # trainer.keep_checkpoints: a completed run's checkpoint is removed; kept, it stands for a kill after it
    args = ["-m", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/sweep", "hydra.sweep.subdir=${hydra.job.num}",
            f"cache_dir={tmp_path}/cache", "trainer.keep_checkpoints=true"]
    first = run_app(args, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    job0, job1 = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    done0 = (job0 / "metrics.json").read_bytes()
    # Job 1 as a kill after its last checkpoint leaves it: no result, no policy.
    trained_s = json.loads((job1 / "metrics.json").read_text())["timing"]["pref_s"]
    (job1 / "metrics.json").unlink()
    shutil.rmtree(job1 / "policy")
    # ... and a kill in the middle of the final policy save, or of a checkpoint save (item 3)
    partial = [job1 / ".policy.tmp-4321", job1 / ".policy.old-4321",
               job1 / "checkpoints" / ".preference.tmp-host-4321-abc-step2"]
    for p in partial:
        p.mkdir()
    again = run_app(args, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already holds this run's completed result") == 1
    assert "resumed from" in again.stdout and "checkpoints/preference" in again.stdout
    assert (job0 / "metrics.json").read_bytes() == done0
    assert not any(p.exists() for p in partial)
    resumed = json.loads((job1 / "metrics.json").read_text())
    assert resumed["status"] == "completed"
    # Resumed at its last step: its cost is still that of all its steps (item 4), not ~0 s.
    assert resumed["timing"]["pref_s"] >= 0.5 * trained_s > 0


@pytest.mark.slow
def test_a_killed_runs_checkpoint_resumes_only_that_run(tmp_path):
    """Issue 18.1 as reported: a DPO run checkpointing every step, then `loss=pl trainer.lr=1e-2` in the same
    hydra.run.dir. After a kill that left no record (the trainer refuses the checkpoint) and after a SIGTERM
    (its record says interrupted: refused before any work), never a DPO checkpoint resumed as DPO-PL;
    trainer.resume=false starts afresh there."""
    run = tmp_path / "run"
    args = TINY + ["trainer.save_every=1", "trainer.max_steps=3", f"hydra.run.dir={run}", f"cache_dir={tmp_path}/cache",
                   "trainer.keep_checkpoints=true"]
    first = run_app(args, cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics, meta = run / "metrics.json", run / "checkpoints" / "preference" / "meta.json"
    dpo, dpo_meta = json.loads(metrics.read_text()), meta.read_bytes()
    metrics.unlink()                        # a SIGKILL after the last checkpoint: no record, no policy
    shutil.rmtree(run / "policy")
    pl = args + ["loss=pl", "trainer.lr=1e-2"]
    killed = run_app(pl, cwd=REPO)
    assert killed.returncode != 0 and "Traceback" not in killed.stderr, killed.stderr[-3000:]
    assert "was made by another run" in killed.stderr and "config.loss.name: 'dpo' -> 'pl'" in killed.stderr
    assert "config.optim.lr: 0.0002 -> 0.01" in killed.stderr and "trainer.resume=false" in killed.stderr
    assert "resumed from" not in killed.stdout and meta.read_bytes() == dpo_meta and not metrics.exists()

    recorded = json.dumps({"status": "interrupted", "error": "interrupted by SIGTERM", "stage": "train", "step": 3,
                           "identity": dpo["identity"]})
    metrics.write_text(recorded)
    termed = run_app(pl, cwd=REPO)
    assert termed.returncode != 0 and "Traceback" not in termed.stderr, termed.stderr[-3000:]
    assert "holds the checkpoint of an interrupted run with other settings" in termed.stderr
    assert "loss.name: 'dpo' -> 'pl'" in termed.stderr and "trainer.lr: 0.0002 -> 0.01" in termed.stderr
    assert "trainer.resume=false" in termed.stderr and "[cache]" not in termed.stdout   # before any work
    assert metrics.read_text() == recorded and meta.read_bytes() == dpo_meta

    afresh = run_app(pl + ["trainer.resume=false"], cwd=REPO)
    assert afresh.returncode == 0, afresh.stderr[-3000:]
    assert "resumed from" not in afresh.stdout
    done = json.loads(metrics.read_text())
    assert done["status"] == "completed" and done["identity"]["config"]["loss.name"] == "pl"
    assert json.loads(meta.read_text())["record"]["config"]["loss"]["name"] == "pl"   # the checkpoint replaced


def test_differences_name_the_settings_then_the_code_then_the_content():
    base = {"code": "c1", "stages": [["sft", "a"], ["preference", "b"]],
            "config": {"trainer.lr": 1.0, "x._target_": "A"}}
    lr = {**base, "config": {"trainer.lr": 2.0, "x._target_": "B"}}
    assert rundir.differences(base, lr) == "trainer.lr: 1.0 -> 2.0"
    assert "package code" in rundir.differences(base, {**base, "code": "c2"})
    data = {**base, "stages": [["sft", "z"], ["preference", "b"]]}
    assert rundir.differences(base, data).endswith("stage key of sft")


def test_decide(tmp_path):
    new = {"code": "c", "stages": [["sft", "a"]], "config": {}}
    assert rundir.decide(tmp_path, new, resume=True) is None                      # empty dir: run
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed", "identity": new}))
    assert rundir.decide(tmp_path, new, resume=True)["status"] == "completed"     # same keys: reuse
    assert rundir.decide(tmp_path, new, resume=False) is None                     # asked to redo
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "completed"}))  # an older version's record
    try:
        rundir.decide(tmp_path, new, resume=True)
    except rundir.RunDirConflict as e:
        assert "recorded no stage keys" in str(e)
    else:
        raise AssertionError("an unverifiable completed run was reused")
