"""Training checkpoints: one DCP (torch.distributed.checkpoint) directory per stage, reshardable on load (any world
size or strategy), beside a `meta.json` that names the run it belongs to. Written by the trainer every
`trainer.save_every` steps, at each epoch's end and on SIGTERM/SIGINT; read back by its resume.

A checkpoint is published like every directory of this package (hps_exp.io.publish_dir): written under a temp name,
then renamed over the last one, so a kill mid-save leaves the previous checkpoint (at its path, or at its `.old`
twin when the kill fell between the two renames: `find_checkpoint` looks there too).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from hps_exp.distributed import World

META = "meta.json"   # beside the DCP files: the stage's key and record, the step and the seconds trained so far


class CheckpointMismatch(Exception):
    """The checkpoint found was made by another run (other stage key): resuming would mix two runs."""


class CheckpointDamaged(Exception):
    """The checkpoint of this run cannot be loaded (truncated, a file missing)."""


def _state(module: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    # FQNs without DDP/FSDP wrapper prefixes and (for FSDP2) sharded DTensors: reshardable on load.
    model_sd, optim_sd = get_state_dict(module, opt)
    # Frozen parameters (a LoRA run's base weights, tied aliases included: torch's ignore_frozen_params keeps a tied
    # lm_head) are left out: the resumed run rebuilds them from the same base, which its stage key names. They were
    # ~90 % of a SmolLM2 LoRA checkpoint. A wrapper's name ends with the plain FQN (module.x, _orig_mod.x).
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if not any(n == k or n.endswith("." + k) for n in frozen)}, optim_sd


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def save_checkpoint(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer, step: int, world: World,
                    meta: dict | None = None) -> None:
    """DCP save into a temp directory of this process (host + pid: two savers never share one), then rank 0
    writes `meta.json` (the stage's key, the step, the training seconds so far) and renames it over `path`:
    an interrupted save never corrupts the last checkpoint. Multi-node runs need `path` on storage every node
    sees. A collective: every rank calls it."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from hps_exp.io import owner_tag, publish_dir

    path = Path(path)
    tag = world.broadcast_object(owner_tag() if world.is_main else None)
    tmp = path.with_name(f".{path.name}.tmp-{tag}-step{step}")
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    model_sd, optim_sd = _state(module, opt)
    with warnings.catch_warnings():   # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        # The RNG states too: stages that train with dropout (SFT) resume to the same numbers.
        dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step), **rng_state(world.device)},
                 checkpoint_id=str(tmp))
    world.barrier()
    if world.is_main:
        (tmp / META).write_text(json.dumps({"step": step, **(meta or {})}, indent=2, sort_keys=True))
        publish_dir(tmp, path, aside=_old(path))
    world.barrier()


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json ({} when it has none: its load then tells whether it is damaged)."""
    f = Path(path) / META
    if not f.is_file():
        return {}
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointMismatch(f"{f} is unreadable ({e}); delete {path} to start afresh") from None
    return meta if isinstance(meta, dict) else {}


def check_meta(found: Path, meta: dict, key: str, record: dict | None) -> None:
    """Refuse a checkpoint made under another stage key, naming what differs (its record against ours)."""
    if meta.get("key") == key:
        return
    if "key" not in meta:
        # saved by a Trainer given no key (a direct caller's, not a stage's): nothing to compare it with
        what = "records no stage key (saved by a trainer given none): cannot tell whether it is this run's"
    else:
        from hps_exp.rundir import flat

        a, b = flat(meta.get("record") or {}), flat(record or {})
        diff = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
                if a.get(k, "<unset>") != b.get(k, "<unset>") and not k.endswith("__type__")]
        shown = "; ".join(diff[:8]) or f"stage key {meta['key']} -> {key}"
        what = f"was made by another run ({shown})"
    raise CheckpointMismatch(f"checkpoint {found} {what}: use another hydra.run.dir, or trainer.resume=false to "
                             f"start this stage afresh (the checkpoint is then replaced)")


def find_checkpoint(path: Path) -> Path | None:
    """The checkpoint to resume from: `path`, or its `.old` twin when a save died between the renames."""
    path = Path(path)
    for p in (path, _old(path)):
        if p.exists():
            return p
    return None


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a checkpoint keeps: the CPU generator's, and the current CUDA device's when training on CUDA
    (dropout masks on the GPU come from it)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def load_checkpoint(path: Path, module: torch.nn.Module, opt: torch.optim.Optimizer,
                    device: torch.device | None = None) -> int:
    """Load a checkpoint into `module`/`opt` (any world size or strategy); returns its step. The RNG states are
    restored too (the CUDA one only when both the checkpoint and `device` are CUDA)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    device = device or torch.device("cpu")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model_sd, optim_sd = _state(module, opt)
    # a CPU checkpoint resumed on CUDA has no CUDA RNG state: keep the current one
    rngs = {k: v for k, v in rng_state(device).items() if k in saved or k == "rng"}
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0), **rngs}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(state, checkpoint_id=str(path))
    # not strict: the frozen parameters are not in the checkpoint and stay as built. A trainable one missing from
    # the checkpoint already failed in dcp.load ("Missing key in checkpoint state_dict").
    set_state_dict(module, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    set_rng_state(state, device)
    return int(state["step"])
