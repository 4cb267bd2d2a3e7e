"""Run logging: a local metrics.jsonl always, plus one W&B run per job (finished inside the job).

metrics.jsonl: one JSON object per logged step,
    {"stage": "sft", "step": 40, "global_step": 40, "sft/loss": ...}
`step` is the stage-local optimizer step (what a checkpoint stores); `global_step` keeps increasing across the
stages of a job (W&B needs one increasing step per run): a stage's steps continue after the last one logged.
After a stage resumes from a checkpoint at step k, `rewind(stage, k)` drops the rows the interrupted run logged
beyond k (and those of later stages), so the file reads as one uninterrupted run: 10, 20, 30, 40, never
10, 20, 30, 10, 20, 30. The file is appended one line per step and rewritten only atomically.

W&B never stops a run:
- `logger.mode=auto`: WANDB_MODE when set, else online when WANDB_API_KEY is set, else offline;
- an online init that fails (bad key, no network, server error) or takes longer than the init timeout
  falls back to offline with one warning line; if offline fails too, W&B is disabled with one warning line.
  Explicit `online` falls back the same way (the run's local outputs matter more than the dashboard);
- the init timeout is HPS_EXP_WANDB_INIT_TIMEOUT seconds (else WANDB_INIT_TIMEOUT, else 20), passed to
  wandb as `Settings(init_timeout=...)`. wandb runs silent (one "[hps_exp] W&B <mode> run: <url or dir>"
  line instead of its banner) unless WANDB_SILENT is set: a non-silent wandb first looks up "logged in as",
  which waits up to 10 s more on an unreachable server;
- `log` / `summary` / `finish` never raise for W&B: the first failure prints one warning line and W&B is
  dropped for the rest of the job; metrics.jsonl keeps every step.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hps_exp.io import atomic_write_text

if TYPE_CHECKING:
    from hps_exp.config import LoggerConfig

INIT_TIMEOUT_ENV = "HPS_EXP_WANDB_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 20.0
DEFAULT_STAGE = "train"


def wandb_mode(mode: str) -> str:
    """auto -> WANDB_MODE if set, else online when an API key is configured, otherwise offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def init_timeout_s() -> float:
    """Seconds wandb.init may take before we give up on it: $HPS_EXP_WANDB_INIT_TIMEOUT, else wandb's own
    $WANDB_INIT_TIMEOUT, else 20."""
    raw = (os.environ.get(INIT_TIMEOUT_ENV) or os.environ.get("WANDB_INIT_TIMEOUT") or "").strip()
    try:
        value = float(raw) if raw else DEFAULT_INIT_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        warn(f"{INIT_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; using {DEFAULT_INIT_TIMEOUT_S:g}")
        return DEFAULT_INIT_TIMEOUT_S
    return value


def warn(message: str) -> None:
    """One line on stderr (the job's log), never a traceback."""
    print(f"[hps_exp] warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    """The exception's type and first line (wandb appends advice lines we replace with our own)."""
    first = (str(e).strip().splitlines() or [""])[0]
    text = " ".join(first.split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def stage_of(metrics: dict[str, Any]) -> str:
    """The stage a row belongs to when the caller does not say: the shared "<stage>/" prefix of its keys
    (the trainer logs "sft/loss", "train/loss", ...)."""
    prefixes = {k.split("/", 1)[0] for k in metrics if "/" in k}
    return prefixes.pop() if len(prefixes) == 1 else DEFAULT_STAGE


def read_rows(path: Path) -> tuple[list[dict], bool]:
    """Rows of a metrics.jsonl and whether it needs a rewrite (a line cut by a kill, no final newline)."""
    if not path.exists():
        return [], False
    text = path.read_text(encoding="utf-8", errors="replace")
    rows, damaged = [], bool(text) and not text.endswith("\n")
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            damaged = True
            continue
        # every row `log` writes has these three; a row without them was not written by it
        if not (isinstance(row, dict) and isinstance(row.get("stage"), str)
                and all(isinstance(row.get(k), int) for k in ("step", "global_step"))):
            damaged = True
            continue
        rows.append(row)
    return rows, damaged


def write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class RunLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, name: str, group: str | None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A rerun in the same run dir continues the file; a line cut by a kill is dropped first, so the
        # next row never lands on the end of a half-written one.
        rows, damaged = read_rows(self.path)
        if damaged:
            write_rows(self.path, rows)
        self._stage: str | None = None
        self._base = 0                 # global_step = _base + stage-local step
        self._last = rows[-1]["global_step"] if rows else 0
        self._wandb_last = -1          # last step sent to W&B (it rejects decreasing steps)
        self._warned_rewind = False
        self.requested_mode = wandb_mode(cfg.mode)
        self.run: Any = None   # a wandb Run (wandb is not type-checked), None while W&B is off
        self.mode = "disabled"
        if self.requested_mode != "disabled":
            self._start_wandb(cfg, config, name, group, Path(run_dir))

    # ------------------------------------------------------------------------- W&B start-up

    def _start_wandb(self, cfg, config: dict, name: str, group: str | None, run_dir: Path) -> None:
        try:
            import wandb
        except Exception as e:  # not installed or broken install: the run goes on without it
            warn(f"W&B disabled: cannot import wandb ({_reason(e)}); metrics go to {self.path} only")
            return
        timeout = init_timeout_s()
        kwargs = dict(project=cfg.project, entity=cfg.entity, name=name, group=group, tags=list(cfg.tags),
                      config=config, dir=str(run_dir), reinit="finish_previous")
        tries = [self.requested_mode] + (["offline"] if self.requested_mode != "offline" else [])
        failures = []
        # Silent unless WANDB_SILENT says otherwise: wandb's own start-up lines (and its "logged in as" lookup,
        # which waits up to 10 s more on an unreachable server) give way to one line of ours.
        silent = {} if os.environ.get("WANDB_SILENT") else {"silent": True}
        for mode in tries:
            try:
                # the mode is one of logger.mode's checked choices (wandb types it as a Literal)
                init_args: dict[str, Any] = {**kwargs, "mode": mode}
                self.run = wandb.init(settings=wandb.Settings(init_timeout=timeout, **silent), **init_args)
                self.mode = mode
                break
            except Exception as e:
                failures.append(f"{mode}: {_reason(e)}")
        if self.run is None:
            warn(f"W&B disabled: init failed ({'; '.join(failures)}); metrics go to {self.path} only")
        elif failures:
            warn(f"W&B {self.requested_mode} init failed or timed out after at most {timeout:g}s "
                 f"(${INIT_TIMEOUT_ENV}) ({failures[0]}); logging offline instead "
                 f"(`wandb sync {run_dir}/wandb` later)")
        elif silent:
            url = getattr(self.run, "url", None) if self.mode == "online" else None
            files = getattr(self.run, "dir", None)  # <run dir>/wandb/<run>/files
            print(f"[hps_exp] W&B {self.mode} run: {url or (Path(files).parent if files else run_dir)}",
                  file=sys.stderr)

    def _wandb_failed(self, what: str, e: BaseException) -> None:
        warn(f"W&B {what} failed ({_reason(e)}); W&B is off for the rest of this job, metrics go to {self.path}")
        run, self.run = self.run, None
        try:
            run.finish(exit_code=1)
        except Exception:
            pass

    # ------------------------------------------------------------------------- logging

    def next_stage(self) -> None:
        """Steps of the next stage continue after the last one logged (also implied by a new stage name)."""
        self._stage = None

    def log(self, metrics: dict[str, Any], step: int, stage: str | None = None) -> None:
        """One row: `step` is the stage-local step; `stage` defaults to the metric names' prefix."""
        stage = stage or stage_of(metrics)
        if stage != self._stage:
            self._stage, self._base = stage, self._last
        global_step = self._last = self._base + step
        row = {"stage": stage, "step": step, "global_step": global_step, **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is None:
            return
        if global_step < self._wandb_last:  # only after a rewind within one job: W&B cannot take steps back
            if not self._warned_rewind:
                warn(f"W&B cannot rewind: steps of {stage!r} up to global step {self._wandb_last} are not sent "
                     f"again (they are in {self.path})")
                self._warned_rewind = True
            return
        try:
            self.run.log(metrics, step=global_step)
            self._wandb_last = global_step
        except Exception as e:
            self._wandb_failed("log", e)

    def rewind(self, stage: str, step: int) -> None:
        """Forget what an interrupted run logged beyond `step` of `stage`: drop that stage's rows with a
        larger step and every row logged after the stage began that belongs to another stage (later stages).
        Call it right after `stage` resumes from a checkpoint at `step` (0 for a fresh start)."""
        rows, damaged = read_rows(self.path)
        first = next((i for i, r in enumerate(rows) if r["stage"] == stage), len(rows))
        kept = rows[:first] + [r for r in rows[first:] if r["stage"] == stage and r["step"] <= step]
        if damaged or len(kept) != len(rows):
            write_rows(self.path, kept)
        # Continue the stage's global steps where its kept rows put them (else after the last kept row).
        own = [r for r in kept if r["stage"] == stage]
        self._stage = stage
        self._last = kept[-1]["global_step"] if kept else 0
        self._base = own[0]["global_step"] - own[0]["step"] if own else self._last

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            try:
                self.run.summary.update(metrics)
            except Exception as e:
                self._wandb_failed("summary", e)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=exit_code)
            except Exception as e:
                warn(f"W&B finish failed ({_reason(e)}); metrics are in {self.path}")
