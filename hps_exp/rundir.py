"""What a run dir already holds, and whether a new job may use it.

A run dir belongs to one run: its identity is the key of every stage the run plans (`dry_run`'s keys, which
cover every setting that changes a result, the data's content and the code) plus its config for messages.
A rerun into a dir whose metrics.json is `completed` with the same stage keys reuses that result (nothing
is redone or rewritten); with other keys it is refused, naming the settings that differ, unless
`trainer.resume=false` asks to redo the run there. This is what lets a whole sweep be rerun into its dirs:
finished jobs are skipped, the interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hps_exp.cache import code_fingerprint

if TYPE_CHECKING:
    from hps_exp.io import FileLock

CONFIG_OMIT = ("dry_run",)


class RunDirConflict(Exception):
    """The run dir holds another run (or a live job): refused before any work, leaving the dir as it was."""


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"trainer.lr": 2e-4, ...}: a nested config as dotted keys (what a user types as an override)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def identity(config: dict, planned: list, overrides: list[str] | None = None) -> dict:
    """The run's identity (stored in metrics.json): its stages' keys, the code, the config it ran with."""
    return {"code": code_fingerprint(), "stages": [[name, key] for name, key, _ in planned],
            "config": {k: v for k, v in flat(config).items() if k not in CONFIG_OMIT},
            "overrides": list(overrides or [])}


def recorded(run_dir: Path) -> dict | None:
    """The run dir's metrics.json, or None when there is none (or it cannot be read: nothing to protect)."""
    try:
        data = json.loads((Path(run_dir) / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def differences(old: dict, new: dict, limit: int = 8) -> str:
    """What differs between two identities, as a user would fix it: config keys, else code, else stage keys."""
    a, b = old.get("config") or {}, new.get("config") or {}
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    named = [k for k in keys if not k.endswith("._target_")]   # a class path follows from the names shown
    keys = named or keys
    parts = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... ({len(keys)} settings)")
    if old.get("code") != new.get("code"):
        parts.append(f"the package code (fingerprint {old.get('code')} -> {new.get('code')})")
    if not parts:
        old_stages, new_stages = dict(map(tuple, old.get("stages") or [])), dict(map(tuple, new["stages"]))
        changed = [s for s in new_stages if old_stages.get(s) != new_stages[s]]
        parts.append(f"the content of an input (data or model files): stage key of {', '.join(changed) or '?'}")
    return "; ".join(parts)


def decide(run_dir: Path, new: dict, resume: bool) -> dict | None:
    """The completed metrics.json to reuse (same stage keys), or None to run. Raises RunDirConflict when the dir
    holds a completed run with other keys and `resume` is true."""
    old = recorded(run_dir)
    if old is None or not resume:
        return None
    old_id = old.get("identity")
    if old.get("status") != "completed":
        # An interrupted run's checkpoint resumes only this run (the trainer checks the checkpoint's own key
        # too, e.g. after a kill that left no record); refused here, before any work.
        if (isinstance(old_id, dict) and old_id.get("stages") != new["stages"]
                and any((Path(run_dir) / "checkpoints").glob("*/meta.json"))):
            raise RunDirConflict(f"{run_dir} holds the checkpoint of an interrupted run with other settings: "
                                 f"{differences(old_id, new)}. Use another hydra.run.dir, or trainer.resume=false "
                                 f"to start afresh there (the checkpoint is replaced)")
        return None
    if not isinstance(old_id, dict):
        raise RunDirConflict(f"{run_dir} holds a completed run that recorded no stage keys (an older version): "
                             f"cannot tell whether it is this run. Use another hydra.run.dir, or "
                             f"trainer.resume=false to redo the run there (its results are replaced)")
    if old_id.get("stages") == new["stages"]:
        return old
    raise RunDirConflict(f"{run_dir} holds a completed run with other settings: {differences(old_id, new)}. Use "
                         f"another hydra.run.dir, or trainer.resume=false to redo the run there (its results are "
                         f"replaced)")


def restore_overrides(run_dir: Path) -> None:
    """Put the recorded run's overrides back into .hydra/overrides.yaml (Hydra rewrites it with every new job's
    before the app starts; the tables read it to describe the job)."""
    old = recorded(run_dir) or {}
    overrides = (old.get("identity") or {}).get("overrides") if isinstance(old.get("identity"), dict) else None
    target = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not isinstance(overrides, list) or not target.parent.is_dir():
        return
    from omegaconf import OmegaConf

    from hps_exp.io import atomic_write_text

    atomic_write_text(target, OmegaConf.to_yaml(OmegaConf.create(overrides)))


LOCK = ".hps_exp.lock"


def lock(run_dir: Path) -> FileLock:
    """The run dir's lock, held for the whole job: the same hydra.run.dir started twice is refused at once
    instead of two jobs writing one checkpoint and one metrics.jsonl. The lock dies with its holder."""
    from hps_exp.io import Busy, FileLock

    try:
        return FileLock(Path(run_dir) / LOCK).acquire(wait=False)
    except Busy as e:
        raise RunDirConflict(f"another job is running in {run_dir} ({e.holder or 'holder unknown'}): wait for it "
                             f"or use another hydra.run.dir") from None


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove what killed jobs left half-written in the run dir (we hold its lock, so no live job owns them):
    checkpoint temp dirs and a policy save's temp or old dir."""
    import shutil

    run_dir = Path(run_dir)
    partial = [*run_dir.glob("checkpoints/.*.tmp-*"), *run_dir.glob(".policy*.tmp-*"), *run_dir.glob(".policy*.old-*")]
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def _writable(path: Path) -> bool:
    """Whether `path` (or, when it does not exist yet, the nearest existing folder above it) can be written."""
    import os

    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


def check_writable(run_dir: Path, cache_dir: Path, planned: list) -> None:
    """Before any work: the run dir must be writable, and so must the cache when a stage will be built there
    (a read-only cache holding every entry is fine)."""
    from hps_exp.config import ConfigError

    if not _writable(run_dir):
        raise ConfigError(f"hydra.run.dir={run_dir} is not writable")
    missing = [name for name, _, status in planned if status == "miss"]
    if missing and not _writable(cache_dir):
        raise ConfigError(f"cache_dir={cache_dir} is not writable and lacks the entries of "
                          f"{', '.join(dict.fromkeys(missing))}: make it writable or point cache_dir elsewhere")
