"""RunLogger: W&B never stops a run (issue 11 item 2); metrics.jsonl continues correctly after a resume (item 5)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from hps_exp import logger as L

REPO = Path(__file__).resolve().parent.parent


def cfg(mode: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(mode=mode, project="hps-exp-tests", entity=None, tags=["t"])


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[hps_exp] warning:")]


# ----------------------------------------------------------------------------- real wandb, no network

def closed_loopback_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


CHILD = """
import json, sys
from types import SimpleNamespace
from pathlib import Path
from hps_exp.logger import RunLogger
cfg = SimpleNamespace(mode=sys.argv[2], project="hps-exp-tests", entity=None, tags=[])
log = RunLogger(Path(sys.argv[1]), cfg, {"seed": 0}, "job", None)
for step in (1, 2, 3):
    log.log({"sft/loss": 1.0 / step}, step=step)
log.summary({"eval/bleu_corpus": 1.0})
log.finish()
Path(sys.argv[3]).write_text(json.dumps({"mode": log.mode}))
"""


@pytest.mark.parametrize("mode,key", [
    ("auto", "not-a-real-key"),          # malformed: wandb refuses it before any connection
    ("online", "x" * 40),                # well-formed: wandb tries the (closed) server until the init timeout
])
def test_wandb_unreachable_falls_back_to_offline(tmp_path, mode, key):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and "proxy" not in k.lower()}
    env.update(
        WANDB_API_KEY=key,
        WANDB_BASE_URL=f"http://127.0.0.1:{closed_loopback_port()}",  # loopback only: nothing leaves the machine
        NO_PROXY="127.0.0.1,localhost", WANDB_ERROR_REPORTING="false", WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_DATA_DIR=str(tmp_path / "data"), HPS_EXP_WANDB_INIT_TIMEOUT="3", OMP_NUM_THREADS="1",
    )
    run_dir = tmp_path / "run"
    # the timeout is a hang guard for the whole child (wandb start + init timeout + offline run), not a timing check
    result = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), mode, str(result)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert json.loads(result.read_text()) == {"mode": "offline"}
    (warning,) = warnings_in(p.stderr)
    assert "W&B online init failed or timed out" in warning  # auto with a key means online
    assert "logging offline instead" in warning
    assert [(r["stage"], r["step"], r["sft/loss"]) for r in rows(run_dir)] == [
        ("sft", 1, 1.0), ("sft", 2, 0.5), ("sft", 3, 1.0 / 3)]
    assert list((run_dir / "wandb").glob("offline-run-*")), "the offline W&B run was not written"


# ----------------------------------------------------------------------------- a fake wandb: every failure path

class FakeRun:
    def __init__(self, fail_log=False, fail_finish=False):
        self.logged, self.finished, self.fail_log, self.fail_finish = [], [], fail_log, fail_finish
        self.summary = {}

    def log(self, metrics, step):
        if self.fail_log:
            raise ConnectionError("socket closed")
        self.logged.append((step, metrics))

    def finish(self, exit_code=0):
        self.finished.append(exit_code)
        if self.fail_finish:
            raise RuntimeError("upload failed")


def fake_wandb(monkeypatch, fail_modes=(), **run_kwargs) -> types.SimpleNamespace:
    calls = []

    def init(mode, settings, **kwargs):
        calls.append((mode, settings.init_timeout))
        assert settings.silent is True  # wandb's banner gives way to our one line
        if mode in fail_modes:
            raise TimeoutError(f"init {mode} timed out")
        module.run = FakeRun(**run_kwargs)
        return module.run

    module = types.SimpleNamespace(init=init, Settings=SimpleNamespace, calls=calls, run=None)
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_auto_mode_picks_online_only_with_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert L.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert L.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert L.wandb_mode("auto") == "disabled" and L.wandb_mode("offline") == "offline"


def test_init_timeout_from_env(monkeypatch, tmp_path, capsys):
    wb = fake_wandb(monkeypatch)
    monkeypatch.setenv(L.INIT_TIMEOUT_ENV, "7.5")
    L.RunLogger(tmp_path, cfg("offline"), {}, "job", None)
    monkeypatch.setenv(L.INIT_TIMEOUT_ENV, "soon")
    L.RunLogger(tmp_path, cfg("offline"), {}, "job", None)
    monkeypatch.delenv(L.INIT_TIMEOUT_ENV)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "4")  # wandb's own variable, when ours is not set
    L.RunLogger(tmp_path, cfg("offline"), {}, "job", None)
    assert wb.calls == [("offline", 7.5), ("offline", L.DEFAULT_INIT_TIMEOUT_S), ("offline", 4.0)]
    err = capsys.readouterr().err
    (warning,) = warnings_in(err)
    assert f"{L.INIT_TIMEOUT_ENV}='soon' is not a positive number of seconds" in warning
    # each successful start says where the run is, in one line of ours (wandb itself is silent)
    assert err.count(f"[hps_exp] W&B offline run: {tmp_path}") == 3


def test_online_failure_falls_back_to_offline_with_one_warning(monkeypatch, tmp_path, capsys):
    wb = fake_wandb(monkeypatch, fail_modes=("online",))
    log = L.RunLogger(tmp_path, cfg("online"), {}, "job", None)
    assert [m for m, _ in wb.calls] == ["online", "offline"] and log.mode == "offline"
    (warning,) = warnings_in(capsys.readouterr().err)
    assert (f"W&B online init failed or timed out after at most 20s (${L.INIT_TIMEOUT_ENV}) "
            "(online: TimeoutError: init online timed out); logging offline instead") in warning
    log.log({"sft/loss": 0.5}, step=1)
    assert wb.run.logged == [(1, {"sft/loss": 0.5})]


def test_offline_failure_too_disables_wandb_with_one_warning(monkeypatch, tmp_path, capsys):
    fake_wandb(monkeypatch, fail_modes=("online", "offline"))
    log = L.RunLogger(tmp_path, cfg("online"), {}, "job", None)
    assert log.run is None and log.mode == "disabled"
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "W&B disabled: init failed (online: TimeoutError" in warning and "offline: TimeoutError" in warning
    log.log({"sft/loss": 0.5}, step=1)
    log.summary({"x": 1})
    log.finish()
    assert [r["sft/loss"] for r in rows(tmp_path)] == [0.5]


def test_log_summary_finish_never_raise(monkeypatch, tmp_path, capsys):
    wb = fake_wandb(monkeypatch, fail_log=True, fail_finish=True)
    log = L.RunLogger(tmp_path, cfg("offline"), {}, "job", None)
    run = wb.run
    for step in (1, 2, 3):
        log.log({"train/loss": float(step)}, step=step)
    log.summary({"eval/bleu_corpus": 1.0})
    log.finish()
    (warning,) = warnings_in(capsys.readouterr().err)  # once, not once per step
    assert "W&B log failed (ConnectionError: socket closed); W&B is off for the rest of this job" in warning
    assert run.finished == [1]  # the broken run was closed when it was dropped
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]

    wb = fake_wandb(monkeypatch, fail_finish=True)
    log = L.RunLogger(tmp_path / "b", cfg("offline"), {}, "job", None)
    log.finish(exit_code=1)
    (warning,) = warnings_in(capsys.readouterr().err)
    assert "W&B finish failed (RuntimeError: upload failed)" in warning and wb.run.finished == [1]


def test_disabled_mode_never_imports_wandb(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would raise ImportError
    log = L.RunLogger(tmp_path, cfg("disabled"), {}, "job", None)
    log.log({"sft/loss": 1.0}, step=1)
    log.finish()
    assert rows(tmp_path) == [{"stage": "sft", "step": 1, "global_step": 1, "sft/loss": 1.0}]


# ----------------------------------------------------------------------------- metrics.jsonl and resume

def logger(run_dir: Path) -> L.RunLogger:
    return L.RunLogger(run_dir, cfg("disabled"), {}, "job", None)


def test_rows_carry_stage_local_steps_and_a_global_step(tmp_path):
    log = logger(tmp_path)
    for step in (10, 20):
        log.log({"sft/loss": 1.0}, step=step)
    log.next_stage()
    log.log({"rm/loss": 1.0}, step=5)
    log.log({"train/loss": 1.0}, step=10)          # a new stage name also starts a new segment
    log.log({"loss": 1.0}, step=20, stage="train")  # explicit stage
    assert [(r["stage"], r["step"], r["global_step"]) for r in rows(tmp_path)] == [
        ("sft", 10, 10), ("sft", 20, 20), ("rm", 5, 25), ("train", 10, 35), ("train", 20, 45)]


def test_rewind_after_resume_gives_each_step_once(tmp_path):
    log = logger(tmp_path)
    for step in (10, 20, 30):
        log.log({"train/loss": float(step)}, step=step)
    log.rewind("train", 20)   # resumed from the checkpoint at step 20
    for step in (30, 40):
        log.log({"train/loss": float(step) + 0.5}, step=step)
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [10, 20, 30, 40]
    assert [r["train/loss"] for r in got] == [10.0, 20.0, 30.5, 40.5]  # the rerun's step 30, not the lost one
    assert [r["global_step"] for r in got] == [10, 20, 30, 40]


def test_rerun_in_a_new_process_continues_the_file(tmp_path):
    first = logger(tmp_path)
    for step in (10, 20):
        first.log({"sft/loss": 1.0}, step=step)
    first.next_stage()
    for step in (10, 20, 30):
        first.log({"train/loss": 1.0}, step=step)
    # killed mid-write: half a line at the end of the file
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"stage": "train", "step": 4')

    second = logger(tmp_path)            # the rerun: SFT comes from the cache, training resumes at 20
    second.rewind("train", 20)
    second.log({"train/loss": 2.0}, step=30)
    got = rows(tmp_path)
    assert [(r["stage"], r["step"], r["global_step"]) for r in got] == [
        ("sft", 10, 10), ("sft", 20, 20), ("train", 10, 30), ("train", 20, 40), ("train", 30, 50)]
    assert got[-1]["train/loss"] == 2.0

    third = logger(tmp_path)             # a rerun whose SFT was redone from step 10: later stages go too
    third.rewind("sft", 10)
    third.log({"sft/loss": 3.0}, step=20)
    assert [(r["stage"], r["step"], r["global_step"]) for r in rows(tmp_path)] == [("sft", 10, 10), ("sft", 20, 20)]


def test_fresh_start_rewind_to_zero_drops_the_stage(tmp_path):
    log = logger(tmp_path)
    log.log({"sft/loss": 1.0}, step=10)
    log.log({"train/loss": 1.0}, step=10)
    again = logger(tmp_path)
    again.rewind("train", 0)
    again.log({"train/loss": 2.0}, step=10)
    assert [(r["stage"], r["step"], r["global_step"], r.get("train/loss")) for r in rows(tmp_path)] == [
        ("sft", 10, 10, None), ("train", 10, 20, 2.0)]
